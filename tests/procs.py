"""Finding the processes a test may signal: only those in a process tree the test itself started.

A machine-wide search (`pgrep -f`, every /proc entry) would find another user's Ray workers on a shared machine
or a developer's laptop; these helpers look only below a root process the test owns (the job subprocess it
started, or this process for a Ray instance started in-process), so a SIGKILL can never reach anyone else.
"""

from __future__ import annotations

import os
import re

import psutil


def own_processes(pattern: str, root: int | None = None) -> list[psutil.Process]:
    """Processes below `root` (default: this process; the root itself excluded) whose command line matches the
    regular expression `pattern`, oldest first."""
    regex = re.compile(pattern)
    try:
        tree = psutil.Process(root or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in tree:
        try:
            if regex.search(" ".join(proc.cmdline())):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sorted(found, key=lambda p: (p.create_time(), p.pid))


def own_pids(pattern: str, root: int | None = None) -> list[int]:
    """The pids of own_processes(pattern, root)."""
    return [p.pid for p in own_processes(pattern, root)]
