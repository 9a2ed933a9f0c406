"""A poison sample or a broken model: the replica's judgement over its failures."""

from __future__ import annotations

from typing import Any

from pipeline.model.requests import Failure

# Samples in a row the model may fail on (each alone) before the replica decides the model, not the samples, is
# broken.
POISON_LIMIT = 8


class PoisonGuard:
    """Tells a poison sample (the model raises on it alone; it becomes a model_error row) from a broken model: once
    `limit` samples in a row have failed that way with none served in between (2, if the replica has served none
    yet), the replica stops the job with the cause, rather than turning every sample into an error row."""

    def __init__(self, limit: int = POISON_LIMIT) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.served = False

    def check(self, results: list[Any]) -> None:
        failures = {id(r): r for r in results if isinstance(r, Failure) and r.failed is not None}  # one per sample
        if any(not isinstance(r, Failure) for r in results):
            self.in_a_row, self.served = 0, True
        self.in_a_row += len(failures)
        if failures and self.in_a_row >= (self.limit if self.served else min(2, self.limit)):
            cause = next(iter(failures.values())).failed
            raise RuntimeError(f"the model failed on {self.in_a_row} samples in a row, each alone, and served none "
                               f"in between: {type(cause).__name__}: {cause}") from cause
