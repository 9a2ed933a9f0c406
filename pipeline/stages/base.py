"""What every stage shares: numpy column batches (as Ray Data hands them over), their rows, and column checks: each
stage declares the `Columns` it reads, adds and drops, and `check_stages` walks a chain of stages over the input's
columns when the dataset is built, so a missing column is named with its stage before any worker starts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import JobError

Batch = dict[str, np.ndarray]


def require_columns(columns: Iterable[str], stage: str, needed: Iterable[str]) -> None:
    """A missing column is a programming error: raise naming the stage and the columns."""
    columns = list(columns)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise KeyError(f"stage {stage} needs column(s) {', '.join(missing)}; got {', '.join(columns)}")


@dataclass(frozen=True)
class Columns:
    """A stage's contract: the columns it reads, those it adds, and those it drops (consumed, or all of its input
    with `keeps_input` False: the write stage hands on only its stats)."""

    reads: tuple[str, ...]
    adds: tuple[str, ...]
    drops: tuple[str, ...] = ()
    keeps_input: bool = True


def check_stages(columns: Iterable[str], stages: Sequence[tuple[str, Columns]]) -> list[str]:
    """The columns after the chain of (name, Columns) over input `columns`; JobError naming the first stage that
    reads a column neither the input nor an earlier stage gives, and who gave what."""
    have = list(columns)
    origin = "the input"
    for name, declared in stages:
        missing = [c for c in declared.reads if c not in have]
        if missing:
            raise JobError(f"stage {name} reads column(s) {', '.join(missing)}, which {origin} does not give "
                             f"(it gives {', '.join(have) or 'nothing'})")
        kept = [c for c in have if c not in declared.drops] if declared.keeps_input else []
        have = kept + [c for c in declared.adds if c not in kept]
        origin = f"stage {name}"
    return have


def batch_rows(batch: Batch) -> list[dict[str, Any]]:
    """A numpy column batch as a list of row dicts (Arrow nulls arrive as None in object columns)."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def as_list(value: Any) -> list | None:
    """A list cell from a numpy batch (arrives as ndarray, list or None)."""
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
