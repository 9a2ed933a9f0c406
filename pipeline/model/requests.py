"""What a model call is made of: one `PromptRequest` per prompt (which sample's tiles it shows), a `Failure` for one
the model could not serve, and `subset` to cut a call's requests and samples down to some of its samples."""

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


def subset(requests: Sequence[PromptRequest], samples: Sequence[np.ndarray], keep: list[int],
            mine: list[int]) -> tuple[list[PromptRequest], list[np.ndarray]]:
    """The requests `mine` and the samples `keep` they show, with sample indices renumbered into `keep`."""
    index = {s: k for k, s in enumerate(keep)}
    return ([replace(requests[i], sample=index[requests[i].sample]) for i in mine],
            [samples[s] for s in keep])
