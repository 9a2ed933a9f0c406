"""Tests that SIGKILL a Ray worker find it only in a process tree they started, never machine-wide."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.conftest import REPO
from tests.procs import own_pids

SLEEP = "/bin/sleep"
ORPHAN = """
import os, sys
pid = os.fork()
if pid:
    print(pid, flush=True)
    sys.exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.execv(sys.argv[1], [sys.argv[2], "30"])
"""


def _wait_for_exec(pid: int, name: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if name in f.read():
                    return
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, f"process {pid} did not start"
        time.sleep(0.05)


def test_a_matching_process_outside_the_tree_is_never_a_target():
    """A decoy that looks like a Ray model actor, but belongs to nobody here (reparented away from this test, as
    another user's worker would be), is not found; one in this process's tree is."""
    tag = f"decoy-{uuid.uuid4().hex[:8]}"
    name = f"ray::MapWorker(MapBatches(Generate)) {tag}"
    out = subprocess.run([sys.executable, "-c", ORPHAN, SLEEP, name], capture_output=True, text=True, timeout=30)
    orphan = int(out.stdout.strip())
    mine = subprocess.Popen([name, "30"], executable=SLEEP)
    try:
        for pid in (orphan, mine.pid):
            _wait_for_exec(pid, name)
        # what a machine-wide search by command line would have matched (and the old tests killed): read from the
        # one pid this test started, not found by searching
        assert name in (Path("/proc") / str(orphan) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        found = own_pids(rf"MapBatches\(Generate\).* {tag}")
        assert orphan not in found and mine.pid in found
        assert own_pids(tag, root=mine.pid) == []  # below a root, the root excluded
    finally:
        mine.kill()
        mine.wait()
        os.kill(orphan, signal.SIGKILL)  # started by this test; it would end by itself after 30 s anyway


def test_no_test_searches_or_signals_processes_machine_wide():
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        if path.name == "test_own_processes.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""["'](pgrep|pkill|killall)["']|psutil\.(process_iter|pids)\b""", line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "machine-wide process search in tests (use tests.procs.own_pids):\n" + "\n".join(offenders)
