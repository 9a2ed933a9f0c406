"""internvl-batch: run InternVL vision-language models over large image and video collections with Ray Data.

The public API: `load_job` / `parse_job` -> `JobConfig`, `run_job(job) -> RunSummary`, `annotate(ds, job)` (a job's
model as a Ray Data transform in the caller's own program: docs/ray-data-api.md), and the error classes.
Imported lazily, so `import pipeline.media.tiling` does not pull in Ray or torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "JobConfig": "pipeline.config", "load_job": "pipeline.config", "parse_job": "pipeline.config",
    "run_job": "pipeline.run.runner", "annotate": "pipeline.run.annotate", "RunSummary": "pipeline.run.summary",
    "ErrorType": "pipeline.errors", "JobError": "pipeline.errors", "RunError": "pipeline.errors",
    "InputError": "pipeline.errors", "MediaError": "pipeline.errors", "ModelLoadError": "pipeline.errors",
    "LockedError": "pipeline.errors", "SecretError": "pipeline.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
