"""Model stage for task score: label probabilities of every criterion, one forward pass, one row per sample."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.io.schema import column, output_schema, to_table
from pipeline.model.requests import PromptRequest
from collections.abc import Callable
from pipeline.model.scoring import evaluate, label_token_ids, passes
from pipeline.stages.base import Batch, batch_rows, require_columns
from pipeline.stages.model_stage import AsyncStage, ModelStage, Requests


class Score(ModelStage):
    """Adds per criterion `score`, `label`, `label_probs` (and `rating` for scales), `passed` with a filter."""

    method = "score"

    def __init__(self, job: JobConfig, engine: Any | None = None, *, load: Callable[[], Any] | None = None) -> None:
        super().__init__(job, engine, load=load)
        self.criteria = job.score_criteria()
        self.labels = [label_token_ids(self.engine.tokenizer, c.answers) for c in self.criteria]
        self.schema = output_schema(job)
        self.single = self.criteria[0].name == ""

    def prepare(self, batch: Batch) -> tuple[list[dict[str, Any]], Requests]:
        require_columns(batch, "score", self.reads)
        out: list[dict[str, Any]] = []
        todo = Requests()
        prompt = self.criteria[0].prompt if self.single else json.dumps({c.name: c.prompt for c in self.criteria})
        for sample in batch_rows(batch):
            row = self.base_row(sample)
            row.update(sample_id=sample["id"], question_index=0, task="score", model=self.job.model, response=None,
                       prompt=prompt, num_input_tokens=0, num_generated_tokens=0, infer_ms=0.0)
            out.append(row)
            if row["status"] != "ok":
                continue
            tiles_per_image = [int(t) for t in sample["tiles_per_image"]]
            prompts = [self.engine.prompt_ids(c.prompt, tiles_per_image, video=sample["media_type"] == "video")
                       for c in self.criteria]
            row["num_input_tokens"] = sum(map(len, prompts))
            # each label, then the end of the answer, follows the prompt
            if self.too_long(row, max(len(ids) + max(map(len, self.labels[c])) + 1 for c, ids in enumerate(prompts))):
                continue
            tiles = todo.add_sample(sample)
            for c, ids in enumerate(prompts):
                todo.add((row, c), ids, tiles, self.labels[c])
        return out, todo

    def fill(self, rows: list[dict[str, Any]], answered: list[tuple[Any, Any]], per_request_ms: float) -> pa.Table:
        for (row, c), result in answered:
            row["infer_ms"] = per_request_ms * len(self.criteria)
            if not self.fill_failure(row, result) and row["status"] == "ok":
                row.update(evaluate(self.criteria[c], result))
        for row in rows:
            if self.single and row["status"] == "ok":
                row["response"] = row.get("label")
            if self.job.has_filter:
                row["passed"] = row["status"] == "ok" and all(
                    passes(c.filter, score=row.get(column("score", c)), rating=row.get(column("rating", c)))
                    for c in self.criteria)
        columns = {name: [r.get(name) for r in rows] for name in dict.fromkeys([*self.schema.names, *(k for r in rows for k in r)])}
        return to_table(columns, self.schema)

    def call_args(self, requests: list[PromptRequest], samples: list[np.ndarray]) -> tuple[tuple, dict[str, Any]]:
        return ([r.ids for r in requests], samples, [r.sample for r in requests], [r.labels for r in requests]), {}


class AsyncScore(AsyncStage, Score):
    """Score with an async engine (vLLM): several batches in flight per replica."""
