"""The run's stderr filter drops exactly Ray's one misleading core-worker line, and nothing else."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

WRITER = r"""
import os, sys
from pipeline.run.quiet import quiet_run
with quiet_run():
    print("before", file=sys.stderr, flush=True)
    os.write(2, b"[2026-12-01 20:57:51,525 E 8287 8287] core_worker.cc:2465: Actor with class name: "
                b"'MapWorker(MapBatches(Generate))' and ID: 'a30e' has constructor arguments in the object store and "
                b"max_restarts > 0. If the arguments in the object store go out of scope or are lost, ...\n")
    os.write(2, b"[2026-12-01 20:57:52,000 E 8287 8287] core_worker.cc:99: something that matters\n")
    subprocess_line = b"a line from a child, no newline"
    os.write(2, subprocess_line)
print("\nafter", file=sys.stderr, flush=True)
raise SystemExit(3)
"""


def test_the_filter_drops_only_the_known_line_and_keeps_order():
    proc = subprocess.run([sys.executable, "-c", WRITER], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == ["before", "[2026-12-01 20:57:52,000 E 8287 8287] core_worker.cc:99: something "
                                        "that matters", "a line from a child, no newline", "after"]


def test_verbose_filters_nothing():
    verbose = WRITER.replace("quiet_run()", "quiet_run(verbose=True)")
    proc = subprocess.run([sys.executable, "-c", verbose], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "has constructor arguments in the object store" in proc.stderr
