"""Timing for the benches: wall time and CPU time of this process and its children (psutil).

The machine is shared and noisy, so CPU time is the steadier measure, and it is what "per core" means. It must
include child processes: the CPU stage may decode in a persistent child (pipeline.media.sandbox, `decode.isolate`),
whose time `time.process_time()` would miss.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import psutil

_ME = psutil.Process()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (ns resolution), its reaped and its live children (clock ticks)."""
    reaped = os.times()
    total = time.process_time() + reaped.children_user + reaped.children_system
    for child in _ME.children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # exited meanwhile (then counted as reaped, or lost: a rare restart)
            continue
        total += t.user + t.system
    return total


class Clock:
    """Wall and CPU seconds of calls, kept per key (one list entry per call)."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def run(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        w, c = time.perf_counter(), cpu_seconds()
        out = fn(*args)
        self.cpu.setdefault(key, []).append(cpu_seconds() - c)
        self.wall.setdefault(key, []).append(time.perf_counter() - w)
        return out

    def median(self, key: str, cpu: bool = True) -> float:
        return statistics.median((self.cpu if cpu else self.wall)[key])

    def total(self, prefix: str, cpu: bool = True) -> float:
        """Median over rounds of the summed time of every key starting with `prefix` (keys run once per round)."""
        times = self.cpu if cpu else self.wall
        return statistics.median(sum(r) for r in zip(*(v for k, v in times.items() if k.startswith(prefix))))
