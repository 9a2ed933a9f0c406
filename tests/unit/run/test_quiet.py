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


CRASHER = r"""
import ctypes, faulthandler, sys
from pipeline.run.quiet import quiet_run
faulthandler.enable()  # as Ray's workers have it: a segfault's Python trace is written to fd 2
with quiet_run():
    print("last words before the crash", file=sys.stderr, flush=True)
    ctypes.string_at(0)  # SIGSEGV
"""


def test_a_crashing_process_loses_none_of_its_last_lines():
    """The filter is a process of its own: a segfault of the run cannot take the lines in the pipe with it (a thread
    of the crashed process copied them, and died with it: this output was empty)."""
    proc = subprocess.run([sys.executable, "-c", CRASHER], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == -11
    lines = proc.stderr.splitlines()
    assert lines[:2] == ["last words before the crash", "Fatal Python error: Segmentation fault"]
    assert any("in string_at" in line for line in lines)  # the trace's last frames, written as the process died
