"""The output's lease: refused while it lives (naming its holder, age and expiry), renewed by conditional writes,
taken over once a dead run stopped renewing it (judged on the store's clock), exactly one winner among runs racing
for an expired lease, and the fence: a run that lost its lease writes nothing more — on disk and on a real S3
server (SeaweedFS conditional writes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from pipeline.errors import LeaseLostError, LockedError
from pipeline.io.output import OutputFolder
from pipeline.io.output.layout import LOCK_FILE, shard_name
from pipeline.io.output.lease import acquire, check, new_content, renew, renewed
from pipeline.io.output.lockstore import lock_store
from tests.conftest import REPO
from tests.helpers import wait_for

HOLD = """
import sys, time
from pipeline.io.output import OutputFolder
from pipeline.io.output import lease
from pipeline.io.output.lease import renewed
if len(sys.argv) > 3:  # a holder on another machine: its pid means nothing here
    lease.machine = lambda: sys.argv[3]
with renewed(OutputFolder(sys.argv[1]).take_lease(float(sys.argv[2]))):
    print("held", flush=True)
    time.sleep(600)
"""

RACE = """
import sys, time
from pipeline.errors import LockedError
from pipeline.io.output.lease import acquire
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start together
try:
    acquire(sys.argv[1], 60.0)
    print("won")
except LockedError as err:
    print("refused", err)
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)}, **kw)


def _output(where: str, tmp_path, request) -> str:
    """An output folder on disk, or a fresh prefix on the SeaweedFS server."""
    if where == "s3":
        request.getfixturevalue("s3_server")
        return f"s3://bucket/lock-{time.time_ns()}/out"
    return str(tmp_path / "out")


def test_a_live_lease_refuses_with_its_holder_and_is_released(tmp_path):
    folder = OutputFolder(str(tmp_path))
    with renewed(folder.take_lease(30)):
        with pytest.raises(LockedError, match=r"host .*, pid %d, since .*, \d+ s ago; renewed 0 time\(s\), last \d+ s "
                                              r"ago; its lease expires in \d+ s" % os.getpid()):
            folder.take_lease(30)
    assert not (tmp_path / LOCK_FILE).exists() and os.listdir(tmp_path) == []  # nothing left behind


def test_a_lock_without_a_lease_still_needs_a_person(tmp_path):
    """A lock written before leases existed (no length) is never taken over: the message says to delete it."""
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 999999, "since": "2026-01-01T02:00:00Z"}))
    with pytest.raises(LockedError, match=r"host node-7, pid 999999.*no lease.*delete the lock file"):
        OutputFolder(str(tmp_path)).take_lease(30)


def test_the_heartbeat_renews_the_lease_by_conditional_writes(tmp_path):
    folder = OutputFolder(str(tmp_path))
    held = folder.take_lease(0.6)
    with renewed(held) as beat:
        time.sleep(1.5)  # over two leases: renewed meanwhile, so still ours and still fresh
        current = json.loads((tmp_path / LOCK_FILE).read_text())
        assert current["token"] == held.ref.token and current["renewals"] >= 2
        check(held.ref)
        assert renew(held) is None  # a renewal from a stale version is refused: the version moved on
    assert beat.lost is None and not (tmp_path / LOCK_FILE).exists()


@pytest.mark.integration
@pytest.mark.parametrize("where", ["disk", "s3"])
def test_the_fence_stops_a_run_whose_lease_was_taken_over_or_went_stale(where, tmp_path, request):
    output = _output(where, tmp_path, request)
    held = OutputFolder(output).take_lease(3.0)  # S3 times have a resolution of one second
    mine = OutputFolder(output).fenced(held)
    mine.write_shard(pa.table({"id": ["a"]}))  # fresh: writes go ahead
    time.sleep(3.2)  # not renewed for over 2/3 of its length: a stalled run stops writing before anyone may take over
    with pytest.raises(LeaseLostError, match=r"last renewed \d+ s ago \(lease 3 s\): the run stalled"):
        mine.write_shard(pa.table({"id": ["b"]}))
    time.sleep(1.2)
    other = acquire(f"{output}/{LOCK_FILE}", 30)  # expired on the store's clock: taken over
    with pytest.raises(LeaseLostError, match=r"taken over by host .*, pid %d" % os.getpid()):
        mine.finish("{}")
    assert renew(held) is None  # and its heartbeat would find it lost
    assert [u.rsplit("/", 1)[-1] for u in OutputFolder(output).shards()] == [shard_name(["a"])]  # "b" never landed
    assert OutputFolder(output).success() is None
    OutputFolder(output).fenced(other).write_shard(pa.table({"id": ["b"]}))  # the new holder writes


def _killed_holder(output: str, ttl: float, *machine: str) -> None:
    """A process that takes the lease, then is SIGKILLed: it leaves its lease behind."""
    holder = _python(HOLD, output, str(ttl), *machine)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # our own child
        holder.wait()


@pytest.mark.integration
@pytest.mark.parametrize("where", ["disk", "s3"])
def test_a_killed_runs_lease_refuses_until_it_expires_then_is_taken_over(where, tmp_path, request):
    output = _output(where, tmp_path, request)
    folder = OutputFolder(output)
    _killed_holder(output, 10.0, "another-node|boot|pid-ns")  # a run on another machine: only expiry tells
    with pytest.raises(LockedError, match=r"another run holds .*_LOCK \(host .*, pid \d+, .*its lease expires"):
        folder.take_lease(30)
    with renewed(_take_once_free(folder)) as beat:  # expired: taken over, and this run completes holding it
        assert beat.held.content["pid"] == os.getpid()
    with renewed(folder.take_lease(30)):  # released normally afterwards
        pass


def _take_once_free(folder: OutputFolder):
    """The lease, taken as soon as it is free (polled: on a loaded machine any fixed sleep is too short or too long)."""
    took = []

    def take() -> bool:
        try:
            took.append(folder.take_lease(30))
        except LockedError:
            return False
        return True

    wait_for(take, 60, "the killed run's lease to expire")
    return took[0]


def test_a_killed_run_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    """A crashed run re-run by hand on the same machine: its pid is gone, so nobody waits for the lease to expire."""
    output = str(tmp_path / "out")
    _killed_holder(output, 600.0)
    with renewed(OutputFolder(output).take_lease(30)) as beat:
        assert beat.held.took_over and "its process is gone" in beat.held.took_over
    assert "its process is gone" in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("where", ["disk", "s3"])
def test_runs_racing_for_an_expired_lease_exactly_one_wins(where, tmp_path, request):
    output = _output(where, tmp_path, request)
    if where == "disk":
        os.makedirs(output)
    assert lock_store(f"{output}/{LOCK_FILE}").create(new_content(1.0, "run")) is not None  # a dead run's lease
    start = str(time.time() + 3.0)  # by then 3 s old on the store's clock: expired
    racers = [_python(RACE, f"{output}/{LOCK_FILE}", start) for _ in range(4)]
    outcomes = [r.communicate(timeout=120)[0].strip() for r in racers]
    assert sum(o == "won" for o in outcomes) == 1, outcomes
    assert all(o == "won" or o.startswith("refused") for o in outcomes), outcomes
