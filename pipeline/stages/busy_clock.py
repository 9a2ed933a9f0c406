"""A replica's busy seconds, for its busy fraction and per-replica rates."""

from __future__ import annotations

import time


class BusyClock:
    """A replica's busy seconds: time with at least one batch in flight, so batches in flight together (the async
    stage) count once; cumulative, read at each batch's end into its timing (`busy`)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.in_flight = 0
        self.since = 0.0

    def begin(self) -> None:
        if self.in_flight == 0:
            self.since = time.time()
        self.in_flight += 1

    def end(self) -> float:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.total += time.time() - self.since
            return self.total
        return self.total + time.time() - self.since
