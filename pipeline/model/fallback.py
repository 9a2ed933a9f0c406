"""A model call that raised, isolated: out of memory → the samples one at a time (`one_sample_each`); anything
else → the call bisected (`halves`) until the poison sample is alone. A sample that still fails becomes a `Failure`;
the others get their results, equal to running them alone."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ErrorType
from pipeline.model.requests import EngineCall, Failure, PromptRequest, subset


def call_or_isolate(call: EngineCall, requests: list[PromptRequest], samples: list[np.ndarray]) -> list[Any]:
    """call() for the whole batch. If memory runs out (the device's, or the host's: the CPU allocator): again one
    sample (with all its requests) at a time, and a sample that still does not fit becomes a Failure. If the call
    raises anything else: the batch is split in halves, and halves of those, until the sample(s) it fails on are found; each becomes a Failure naming
    the cause (`failed`: the exception), the others get their results, equal to running them alone. Whether the
    model itself is broken (failing on every sample) is the caller's to decide (stages/poison_guard.PoisonGuard)."""
    if not requests:
        return []
    try:
        return call(requests, samples)
    except Exception as err:  # noqa: BLE001 - out of memory, or a poison sample: find it
        if len(samples) == 1:
            return [sample_failure(err, samples[0])] * len(requests)
        parts = one_sample_each(len(samples)) if is_out_of_memory(err) else halves(len(samples))
    results: list[Any] = [None] * len(requests)
    for part in parts:
        mine = [i for i, r in enumerate(requests) if r.sample in part]
        for i, r in zip(mine, call_or_isolate(call, *subset(requests, samples, part, mine))):
            results[i] = r
    return results


def one_sample_each(n: int) -> list[list[int]]:
    """The out-of-memory fallback: the call again, one sample (with all its requests) at a time."""
    return [[s] for s in range(n)]


def halves(n: int) -> list[list[int]]:
    """The poison bisection: a call that raised is split in halves (and those again) until the sample it fails on is
    alone."""
    return [list(range(n // 2)), list(range(n // 2, n))]


def sample_failure(err: BaseException, sample: np.ndarray) -> Failure:
    """One sample that still fails alone: out of memory (it does not fit), or a poison sample naming the cause."""
    import torch

    if is_out_of_memory(err):
        where = "device" if isinstance(err, torch.OutOfMemoryError) else "host"
        return Failure(ErrorType.MODEL_ERROR, f"out of {where} memory for one sample ({len(sample)} tiles)")
    return Failure(ErrorType.MODEL_ERROR, f"the model failed on this sample: {type(err).__name__}: {err}", failed=err)


def is_out_of_memory(err: BaseException) -> bool:
    """A device (CUDA) or host (the CPU allocator) out-of-memory error."""
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)


