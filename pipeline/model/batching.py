"""How a model batch reaches the engine: its requests (model/requests.py) in calls packed by padded tokens, each
call isolated on failure (model/fallback.py: out of memory → sample by sample; else the poison sample bisected out).

With `compute.max_batch_tokens` a replica's batch is split into calls of samples of similar length, none carrying
more than 25% padding; greedy results do not depend on the grouping (batched equals one at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.model.fallback import call_or_isolate
from pipeline.model.requests import EngineCall, PromptRequest, subset


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
        for i, r in zip(mine, call_or_isolate(call, *subset(requests, samples, group, mine))):
            results[i] = r
    return results
