"""Model stage for caption and vqa: one output row per (sample, question), batched generation.

The vision encoder runs once per sample however many questions it carries. A question with a schema is decoded
under it and its parsed answer goes to the typed `answer` column; one cut off at max_new_tokens is a `truncated` row.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.errors import ErrorType, PromptError
from pipeline.io.schema import output_schema, to_table
from pipeline.structured.answers import AnswerError, parse_answer
from pipeline.model.requests import PromptRequest
from collections.abc import Callable
from pipeline.model.prompts import user_text
from pipeline.model.sampling import row_seed
from pipeline.stages.base import Batch, batch_rows, require_columns
from pipeline.stages.model_stage import AsyncStage, ModelStage, Requests, fail, questions_of


class Generate(ModelStage):
    """Adds `response`, `prompt`, token counts, `mean_logprob`, `infer_ms` (and `answer` with a schema); ids
    `<sample id>#<k>` for several questions. A sampled answer depends only on (generation.seed, the row's id)."""

    method = "generate"

    def __init__(self, job: JobConfig, engine: Any | None = None, *, load: Callable[[], Any] | None = None) -> None:
        super().__init__(job, engine, load=load)
        self.generation_json = json.dumps(job.generation.model_dump(), sort_keys=True)
        self.schema = output_schema(job)
        self.constrained = bool(job.answer_schemas())

    def prepare(self, batch: Batch) -> tuple[list[dict[str, Any]], Requests]:
        require_columns(batch, "generate", self.reads)
        gen = self.job.generation
        out: list[dict[str, Any]] = []
        todo = Requests()
        for sample in batch_rows(batch):
            questions = questions_of(self.job, sample)
            tiles: int | None = None
            for k, (question, schema) in enumerate(questions):
                row = dict(self.base_row(sample), sample_id=sample["id"], question=question, question_index=k,
                           task=self.job.task, model=self.job.model, generation=self.generation_json, prompt=None,
                           response=None, num_input_tokens=0, num_generated_tokens=0, mean_logprob=None, infer_ms=0.0)
                if len(questions) > 1:
                    row["id"] = f"{sample['id']}#{k}"
                out.append(row)
                if row["status"] != "ok":
                    continue
                try:
                    text = user_text(task=self.job.task, prompt=self.job.effective_prompt, question=question)
                except PromptError as err:
                    fail(row, ErrorType.BAD_INPUT, str(err))
                    continue
                ids = self.engine.prompt_ids(text, [int(t) for t in sample["tiles_per_image"]],
                                             video=sample["media_type"] == "video")
                row.update(prompt=text, num_input_tokens=len(ids))
                if self.too_long(row, len(ids) + 1):  # room for one generated token at least
                    continue
                tiles = todo.add_sample(sample) if tiles is None else tiles
                todo.add((row, schema), ids, tiles, schema=schema,
                         seed=row_seed(gen.seed, row["id"]) if gen.do_sample else None)
        return out, todo

    def fill(self, rows: list[dict[str, Any]], answered: list[tuple[Any, Any]], per_request_ms: float) -> pa.Table:
        for (row, schema), result in answered:
            row["infer_ms"] = per_request_ms
            if self.fill_failure(row, result):
                continue
            row.update(response=result.text, num_generated_tokens=len(result.token_ids),
                       mean_logprob=float(np.mean(result.logprobs)) if result.logprobs else None)
            if schema is not None:
                try:
                    row["answer"] = parse_answer(result.text, schema, max_new_tokens=self.job.generation.max_new_tokens,
                                                 finished=result.finished)
                except AnswerError as err:  # the raw text stays in `response`
                    fail(row, err.error_type, str(err))
        names = dict.fromkeys([*self.schema.names, *(k for r in rows for k in r)])
        return to_table({name: [r.get(name) for r in rows] for name in names}, self.schema)

    def call_args(self, requests: list[PromptRequest], samples: list[np.ndarray]) -> tuple[tuple, dict[str, Any]]:
        gen = self.job.generation
        constrained = {"schemas": [r.schema for r in requests]} if self.constrained else {}
        return (([r.ids for r in requests], samples, [r.sample for r in requests]),
                dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, temperature=gen.temperature,
                     top_p=gen.top_p, seeds=[r.seed for r in requests] if gen.do_sample else None, **constrained))


class AsyncGenerate(AsyncStage, Generate):
    """Generate with an async engine (vLLM): several batches in flight per replica."""
