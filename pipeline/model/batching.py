"""How a model batch reaches the engine: one request per prompt, calls packed by padded tokens, the
out-of-memory fallback that retries sample by sample, and the search for a poison sample that makes a call raise.
A request that cannot be served ends as a `Failure`.

With `compute.max_batch_tokens` a replica's batch is split into calls of samples of similar length, none carrying
more than 25% padding; greedy results do not depend on the grouping (batched equals one at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipeline.errors import ErrorType


@dataclass(frozen=True)
class PromptRequest:
    """One prompt for the engine: its token ids, which sample's tiles it shows, (score) its labels' tokens, and
    (generate) the JSON Schema its answer must follow, (sampling) its output row's seed."""

    ids: list[int]
    sample: int  # index into the call's samples
    labels: list[list[int]] | None = None
    schema: Mapping[str, Any] | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Failure:
    """A request the model could not serve; it becomes an error row of this type. `failed`: the exception the
    model raised on this request's sample alone (None for failures found before or without a model call)."""

    error_type: ErrorType
    message: str
    failed: BaseException | None = field(default=None, compare=False, repr=False)


# call(requests, samples) -> one result per request, where request.sample indexes `samples`.
EngineCall = Callable[[list[PromptRequest], list[np.ndarray]], list[Any]]


MAX_PADDING = 0.25  # padding a call may carry, as a fraction of its real prompt tokens, before it is split


def pack_calls(lengths: Sequence[int], *, max_tokens: int | None, sizes: Sequence[int] | None = None,
               max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Split items into groups of similar lengths: a group ends when its padded size (rows x longest length) would
    exceed max_tokens, or exceed its real tokens by more than max_padding. Item i is `sizes[i]` rows (default 1:
    e.g. a sample's questions) of at most `lengths[i]` tokens.

    Every item is in exactly one group; an item over the budget gets a group of its own. max_tokens None: one group
    (packing is off).
    """
    if max_tokens is None:
        return [list(range(len(lengths)))] if len(lengths) else []
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = sizes if sizes is not None else [1] * len(lengths)
    groups: list[list[int]] = []
    current: list[int] = []
    rows = real = 0
    for i in order:  # ascending, so the newest item is the longest of its group
        padded = (rows + sizes[i]) * lengths[i]
        over_budget = max_tokens is not None and padded > max_tokens
        too_padded = padded > (1 + max_padding) * (real + sizes[i] * lengths[i])
        if current and (over_budget or too_padded):
            groups.append(current)
            current, rows, real = [], 0, 0
        current.append(i)
        rows += sizes[i]
        real += sizes[i] * lengths[i]
    if current:
        groups.append(current)
    return groups


def equal_length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped by length (no padding within a group), groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    return list(groups.values())


def in_calls(call: EngineCall, requests: Sequence[PromptRequest], samples: Sequence[np.ndarray], *,
             max_tokens: int | None = None) -> list[Any]:
    """call(requests, samples) over groups of samples (each with all its requests, so its tiles go through the
    vision encoder once) packed by padded prompt tokens (compute.max_batch_tokens); results in request order."""
    per_sample = [[i for i, r in enumerate(requests) if r.sample == s] for s in range(len(samples))]
    lengths = [max((len(requests[i].ids) for i in mine), default=0) for mine in per_sample]
    results: list[Any] = [None] * len(requests)
    for group in pack_calls(lengths, max_tokens=max_tokens, sizes=[len(m) for m in per_sample]):
        mine = [i for s in group for i in per_sample[s]]
        for i, r in zip(mine, with_memory_fallback(call, *subset(requests, samples, group, mine))):
            results[i] = r
    return results


def with_memory_fallback(call: EngineCall, requests: list[PromptRequest], samples: list[np.ndarray]) -> list[Any]:
    """call() for the whole batch. If memory runs out (the device's, or the host's: the CPU allocator): again one
    sample (with all its requests) at a time, and a sample that still does not fit becomes a Failure. If the call
    raises anything else: the batch is split in halves, and halves of those, until the sample(s) it fails on are found; each becomes a Failure naming
    the cause (`failed`: the exception), the others get their results, equal to running them alone. Whether the
    model itself is broken (failing on every sample) is the caller's to decide (stages/model_stage.PoisonGuard)."""
    import torch

    if not requests:
        return []
    try:
        return call(requests, samples)
    except Exception as err:  # noqa: BLE001 - out of memory, or a poison sample: find it
        if is_out_of_memory(err):
            if len(samples) == 1:
                where = "device" if isinstance(err, torch.OutOfMemoryError) else "host"
                failure = Failure(ErrorType.MODEL_ERROR, f"out of {where} memory for one sample ({len(samples[0])} tiles)")
                return [failure] * len(requests)
            parts = [[s] for s in range(len(samples))]
        elif len(samples) == 1:
            failure = Failure(ErrorType.MODEL_ERROR, f"the model failed on this sample: {type(err).__name__}: {err}",
                              failed=err)
            return [failure] * len(requests)
        else:
            half = len(samples) // 2
            parts = [list(range(half)), list(range(half, len(samples)))]
    results: list[Any] = [None] * len(requests)
    for part in parts:
        mine = [i for i, r in enumerate(requests) if r.sample in part]
        for i, r in zip(mine, with_memory_fallback(call, *subset(requests, samples, part, mine))):
            results[i] = r
    return results


def is_out_of_memory(err: BaseException) -> bool:
    """A device (CUDA) or host (the CPU allocator) out-of-memory error."""
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)


def subset(requests: Sequence[PromptRequest], samples: Sequence[np.ndarray], keep: list[int],
            mine: list[int]) -> tuple[list[PromptRequest], list[np.ndarray]]:
    """The requests `mine` and the samples `keep` they show, with sample indices renumbered into `keep`."""
    index = {s: k for k, s in enumerate(keep)}
    return ([replace(requests[i], sample=index[requests[i].sample]) for i in mine],
            [samples[s] for s in keep])
