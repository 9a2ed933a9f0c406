"""Sampling that depends only on (seed, row): each output row draws from its own generator, whatever batch it is in.

`row_seed` derives a row's seed from the job's seed and the output row's id; both engines take one seed per prompt
(vLLM: one `SamplingParams(seed=...)` per request; transformers: `RowSampler`). Sampled answers of the two engines
are not the same (different random number generators and kernels); each engine's are reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

TRANSFORMERS_TOP_K = 50  # transformers' generate samples with this top-k when the generation config sets none


def row_seed(seed: int, row: int | str) -> int:
    """A 63-bit seed for one output row from the job's seed and the row's id (e.g. f"{sample_id}#{question}")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:8], "little") >> 1


class RowSampler:
    """A transformers logits processor that samples every row with its own torch.Generator (seeded per row) and
    leaves only the drawn token finite, so `generate`'s greedy step picks it.

    Temperature, top-k and top-p are transformers' own warpers in transformers' order, after the processors generate
    adds itself (min_new_tokens and the like), so a row's distribution is what `do_sample=True` would draw from;
    only the random stream differs: one per row instead of one for the batch.
    """

    def __init__(self, seeds: Sequence[int], *, temperature: float, top_p: float, top_k: int | None) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.seeds = [int(s) for s in seeds]
        self.generators: list[torch.Generator] | None = None
        self.warpers: list[Any] = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        top_k = TRANSFORMERS_TOP_K if top_k is None else top_k
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if len(self.seeds) != scores.shape[0]:
            raise ValueError(f"{len(self.seeds)} seeds for a batch of {scores.shape[0]} rows")
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        drawn = torch.cat([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), drawn] = 0.0
        return out
