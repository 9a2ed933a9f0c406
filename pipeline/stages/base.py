"""What every stage shares: numpy column batches (as Ray Data hands them over), their rows, and column checks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]


def require_columns(columns: Iterable[str], stage: str, needed: Iterable[str]) -> None:
    """A missing column is a programming error: raise naming the stage and the columns."""
    columns = list(columns)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise KeyError(f"stage {stage} needs column(s) {', '.join(missing)}; got {', '.join(columns)}")


def batch_rows(batch: Batch) -> list[dict[str, Any]]:
    """A numpy column batch as a list of row dicts (Arrow nulls arrive as None in object columns)."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def as_list(value: Any) -> list | None:
    """A list cell from a numpy batch (arrives as ndarray, list or None)."""
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
