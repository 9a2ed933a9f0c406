"""The fingerprint of a job: what must match for an output to be resumed by it (results, not where or how fast)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(job: Any) -> str:
    """sha256 over everything that changes results (model, prompt, tiling, generation), not where or how fast.
    `job`: a JobConfig."""
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
        relevant["schema"] = {"job": job.answer_schema, "questions": job.question_schemas}
    if job.compute.engine == "vllm-native":  # vLLM's processor tiles the pictures, not the cards' tiling
        relevant["tiles_by"] = "vllm-native"
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
