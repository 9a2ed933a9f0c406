"""The incremental lock is a lease: refused while it lives (naming its holder, age and expiry), taken over once a
dead run's lease has expired, and of several runs racing for one expired lock exactly one wins — on disk and on a
real S3 server (SeaweedFS conditional writes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.errors import LockedError
from pipeline.io.lock import LOCK_FILE, TAKEOVER_DIR, lease, run_lock
from pipeline.io.markers import write_marker
from tests.conftest import REPO

HOLD = """
import sys, time
from pipeline.io.lock import run_lock
with run_lock(sys.argv[1], ttl_s=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""

RACE = """
import sys, time
from pipeline.errors import LockedError
from pipeline.io.lock import acquire
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
try:
    acquire(sys.argv[1], 60.0)
    print("won")
except LockedError as err:
    print("refused", err)
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def test_a_live_lease_refuses_with_its_holder_and_is_released(tmp_path):
    with run_lock(str(tmp_path), ttl_s=30):
        with pytest.raises(LockedError, match=r"host .*, pid %d, since .*, \d+ s ago; its lease expires .*in \d+ s" % os.getpid()):
            with run_lock(str(tmp_path)):
                pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_without_a_lease_still_needs_a_person(tmp_path):
    """A lock written before leases existed (no expiry) is never taken over: the message says to delete it."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 999999, "since": "2026-01-01T02:00:00Z"}))
    with pytest.raises(LockedError, match=r"host node-7, pid 999999.*no expiry.*delete the lock file"):
        with run_lock(str(tmp_path)):
            pass


def test_the_heartbeat_renews_the_lease(tmp_path):
    with run_lock(str(tmp_path), ttl_s=0.6) as held:
        time.sleep(1.5)  # over two leases: renewed meanwhile, so still ours and still valid
        current = json.loads((tmp_path / LOCK_FILE).read_text())
        assert current["token"] == held["token"] and current["expires_s"] > time.time()


def _killed_holder(output: str, ttl: float) -> None:
    """A process that takes the lock, then is SIGKILLed: it leaves its lease behind."""
    holder = _python(HOLD, output, str(ttl), env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # our own child
        holder.wait()


def _output(where: str, tmp_path, request) -> str:
    """An output folder on disk, or a fresh prefix on the SeaweedFS server."""
    if where == "s3":
        request.getfixturevalue("s3_server")
        return f"s3://bucket/lock-{time.time_ns()}/out"
    return str(tmp_path / "out")


@pytest.mark.integration
@pytest.mark.parametrize("where", ["disk", "s3"])
def test_a_killed_runs_lock_refuses_until_it_expires_then_is_taken_over(where, tmp_path, request):
    output = _output(where, tmp_path, request)
    _killed_holder(output, ttl=4.0)
    with pytest.raises(LockedError, match=r"another run holds .*_LOCK \(host .*, pid \d+, .*its lease expires"):
        with run_lock(output):
            pass
    time.sleep(4.5)
    with run_lock(output) as held:  # expired: taken over, and this run completes holding it
        assert held["pid"] == os.getpid()
    with run_lock(output):  # released normally afterwards
        pass


@pytest.mark.integration
@pytest.mark.parametrize("where", ["disk", "s3"])
def test_runs_racing_for_an_expired_lock_exactly_one_wins(where, tmp_path, request):
    output = _output(where, tmp_path, request)
    write_marker(output, LOCK_FILE, lease(1.0, now=time.time() - 10))  # a dead run's lease, expired 9 s ago
    start = str(time.time() + 3.0)
    racers = [_python(RACE, output, start, env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(4)]
    outcomes = [r.communicate(timeout=120)[0].strip() for r in racers]
    assert sum(o == "won" for o in outcomes) == 1, outcomes
    assert all(o == "won" or o.startswith("refused") for o in outcomes), outcomes
    if where == "disk":
        assert len(os.listdir(tmp_path / "out" / TAKEOVER_DIR)) == 1
