"""Model stage for task score: label probabilities of every criterion, one forward pass, one row per sample."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.io.schema import column, output_schema, to_table
from pipeline.model.batching import PromptRequest
from pipeline.model.scoring import evaluate, label_token_ids, passes
from pipeline.stages.base import Batch, batch_rows, require_columns
from pipeline.stages.model_stage import ModelStage, Requests


class Score(ModelStage):
    """Adds per criterion `score`, `label`, `label_probs` (and `rating` for scales), `passed` with a filter."""

    def __init__(self, job: JobConfig, engine: Any | None = None, *, rank_cpus: float | None = None) -> None:
        super().__init__(job, engine, rank_cpus=rank_cpus)
        self.criteria = job.score_criteria()
        self.labels = [label_token_ids(self.engine.tokenizer, c.answers) for c in self.criteria]
        self.schema = output_schema(job)

    def run(self, batch: Batch) -> pa.Table:
        require_columns(batch, "score", self.reads)
        out: list[dict[str, Any]] = []
        todo = Requests()
        single = self.criteria[0].name == ""
        prompt = self.criteria[0].prompt if single else json.dumps({c.name: c.prompt for c in self.criteria})
        for sample in batch_rows(batch):
            row = self.base_row(sample)
            row.update(sample_id=sample["id"], question_index=0, task="score", model=self.job.model, response=None,
                       prompt=prompt, num_input_tokens=0, num_generated_tokens=0, infer_ms=0.0)
            out.append(row)
            if row["status"] != "ok":
                continue
            tiles = todo.add_sample(sample)
            tiles_per_image = [int(t) for t in sample["tiles_per_image"]]
            for c, criterion in enumerate(self.criteria):
                ids = self.engine.prompt_ids(criterion.prompt, tiles_per_image, video=sample["media_type"] == "video")
                row["num_input_tokens"] += len(ids)
                todo.add((row, c), ids, tiles, self.labels[c])
        results, per_request_ms = todo.run(self._score, max_tokens=self.job.compute.max_batch_tokens)
        for (row, c), result in results:
            row["infer_ms"] = per_request_ms * len(self.criteria)
            if not self.fill_failure(row, result) and row["status"] == "ok":
                row.update(evaluate(self.criteria[c], result))
        for row in out:
            if single and row["status"] == "ok":
                row["response"] = row.get("label")
            if self.job.has_filter:
                row["passed"] = row["status"] == "ok" and all(
                    passes(c.filter, score=row.get(column("score", c)), rating=row.get(column("rating", c)))
                    for c in self.criteria)
        columns = {name: [r.get(name) for r in out] for name in dict.fromkeys([*self.schema.names, *(k for r in out for k in r)])}
        return to_table(columns, self.schema)

    def _score(self, requests: list[PromptRequest], samples: list[np.ndarray]) -> list[Any]:
        return self.engine.score([r.ids for r in requests], samples, [r.sample for r in requests],
                                 [r.labels for r in requests])
