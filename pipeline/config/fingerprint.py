"""What made an output and each of its rows.

- `fingerprint(job)`: the job file's part: sha256 over everything in it that changes results (model, prompt,
  questions, tiling, frames, generation, schema), not where or how fast.
- `settings(job, resolved)`: everything that made a row, the job's part and what the run resolved (`Resolved`: the
  engine and dtype `auto` became, and the checkpoint's content), as one mapping; `settings_id` names it. Every row
  carries the id of the settings that wrote it (a retry rung's rows, the rung's); the full settings are kept in the
  output (`_settings/<id>.json`).
- `output_fingerprint(job, resolved)`: what must match for a run to resume an output: the job's fingerprint, the
  engine, the dtype and the checkpoint's content (bf16 tokens can differ between engines; the same path re-uploaded
  with other weights answers differently).
- `identity(job)`: what gives an output its ids and columns (task, how many questions, criteria, schema or not,
  incremental): a run that updates rows in place (`--update`) may change settings, never this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Resolved:
    """What a run resolved that the job file leaves open: the engine and dtype `auto` became, and the checkpoint's
    content (model/checkpoints.checkpoint_id)."""

    engine: str
    dtype: str
    checkpoint: str


def _digest(value: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:n]


def _schemas(job: Any) -> dict[str, Any] | None:
    return {"job": job.answer_schema, "questions": job.question_schemas} if job.answer_schemas() else None


def fingerprint(job: Any) -> str:
    """sha256 over everything in the job file that changes results (model, prompt, tiling, generation), not where
    or how fast. `job`: a JobConfig."""
    relevant = {
        "task": job.task,
        "model": job.model,
        "model_revision": job.model_revision,
        "trust_remote_code": job.trust_remote_code,
        "prompt": job.effective_prompt,
        "questions": job.question_texts,
        "incremental": job.incremental,
        "score": [c.model_dump() for c in job.score_criteria()] if job.task == "score" else None,
        "tiling": job.tiling.model_dump(),
        "video": job.video.model_dump(),
        "generation": job.generation.model_dump(),
    }
    if job.answer_schemas():  # only then, so the fingerprints of jobs without one stay as they were
        relevant["schema"] = _schemas(job)
    if job.compute.engine == "vllm-native":  # vLLM's processor tiles the pictures, not the cards' tiling
        relevant["tiles_by"] = "vllm-native"
    if job.dedup != "none":  # only then, as above: its rows have a duplicate_of column, so no mixing with others
        relevant["dedup"] = job.dedup
    return _digest(relevant)


def settings(job: Any, resolved: Resolved) -> dict[str, Any]:
    """Everything that made a row written by `job` (a retry rung's job for its rows) in a run that resolved
    `resolved`."""
    values = {
        **asdict(resolved),
        "model": job.model,
        "model_revision": job.model_revision,
        "prompt": job.effective_prompt,
        "questions": job.question_texts,
        "score": [c.model_dump() for c in job.score_criteria()] if job.task == "score" else None,
        "schema": _schemas(job),
        "tiling": job.tiling.model_dump(),
        "video": job.video.model_dump(),
        "generation": job.generation.model_dump(),
    }
    if job.dedup != "none":  # only then, so the settings ids of jobs without it stay as they were
        values["dedup"] = job.dedup
    return values


def settings_id(values: dict[str, Any]) -> str:
    """The name of a settings mapping (the `settings` column of every row)."""
    return _digest(values, 12)


def output_fingerprint(job: Any, resolved: Resolved) -> str:
    """What must match for a run to resume an output (`_JOB.json`'s fingerprint)."""
    return _digest({"job": fingerprint(job), **asdict(resolved)})


def identity(job: Any) -> dict[str, Any]:
    """What gives an output its ids and columns: a run may update rows in place only where this matches."""
    return {
        "task": job.task,
        "incremental": job.incremental,
        "questions": len(job.question_texts) if job.question_texts else None,
        "criteria": [c.name for c in job.score_criteria()] if job.task == "score" else None,
        "filter": job.has_filter,
        "schema": bool(job.answer_schemas()),
        **({"dedup": job.dedup} if job.dedup != "none" else {}),  # the duplicate_of column
    }


def changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two settings (or identity) mappings, each as `key: old -> new`."""
    def short(value: Any) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{k}: {short(before.get(k))} -> {short(now.get(k))}" for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)]
