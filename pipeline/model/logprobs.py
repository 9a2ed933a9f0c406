"""The log-probability of each generated token, computed on the model's device while transformers' `generate` runs.

Asking `generate` for `output_logits` keeps every step's full-vocabulary logits and hands them back, which the
engine then had to softmax and copy to the host: 8 rows x 128 steps x 151,674 float32 logits is ~620 MB a call.
`ChosenLogprobs` keeps one step's log-softmax (rows x vocab) on the device and, per step, only the chosen token's
value (rows floats); what reaches the host is (rows x steps) floats.

How: a forward hook on the model sees each step's raw logits (what `output_logits` returned: before any logits
processor, min_new_tokens' end-token suppression, a grammar or a sampler); the same object is a logits processor, whose
`input_ids` at step t end with the token chosen at step t - 1, so that step's log-probability is gathered then; the
last step's token is read from the finished sequences. Each step's log-softmax is computed exactly as before (float32,
same device), so the numbers are the same.
"""

from __future__ import annotations

from typing import Any

import torch


class ChosenLogprobs:
    """A transformers logits processor (it leaves the scores as they are) and, inside `with`, a forward hook on the
    model: after `generate`, `values(sequences)` are the log-probabilities of the chosen tokens, on the host."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.raw: torch.Tensor | None = None  # the current step's logits (the model's output, last position)
        self.previous: torch.Tensor | None = None  # log-softmax of the step whose token is not known yet
        self.chosen: list[torch.Tensor] = []  # per step: (rows,) log-probabilities of the chosen tokens
        self._hook: Any = None

    def __enter__(self) -> ChosenLogprobs:
        self._hook = self.model.register_forward_hook(self._capture)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        self.raw = output.logits[:, -1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.chosen.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(self.raw.to(device=scores.device, dtype=torch.float32), dim=-1)
        return scores

    def values(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, steps) float32 on the host for `sequences`, the new tokens generate returned (rows, steps); steps
        generate ran and then took back (a deferred stop check) are left out."""
        steps = sequences.shape[1]
        if len(self.chosen) < steps and self.previous is not None:
            self.chosen.append(self.previous.gather(1, sequences[:, -1:].to(self.previous.device)).squeeze(1))
        self.previous = self.raw = None
        if not steps:
            return torch.zeros((sequences.shape[0], 0))
        return torch.stack(self.chosen[:steps], dim=1).cpu()
