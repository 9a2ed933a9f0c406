"""What the two model stages share: the replica's engine, the requests of a batch, typed failures, batch timing.

A stage turns each sample into output rows and each row it can ask about into `PromptRequest`s; the engine
answers them in calls packed by tokens (model/batching.py); a request that fails becomes an error row.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.errors import ErrorType
from pipeline.media.decode import tiles_from_bytes
from pipeline.model.batching import Failure, PromptRequest, in_calls
from pipeline.stages.base import Batch, as_list

# Input columns the model stages consume rather than pass through.
CONSUMED_COLUMNS = ("pixels", "questions")
# The first row of each model batch carries when and where the batch ran (for the run's busy fraction); the
# write stage takes it out of the rows and into the shard's stats, so it is never written.
BATCH_COLUMN = "__batch"
BATCH_TYPE = pa.struct([("replica", pa.string()), ("ready", pa.float64()), ("start", pa.float64()), ("end", pa.float64())])


def load_engine(job: JobConfig, rank_cpus: float | None = None) -> Any:
    """The job's model replica; torch and transformers load here, on the worker, never on the driver.

    With compute.tp > 1 the replica is a group of rank actors driven from here (run/replica.py), each reserving
    `rank_cpus` (the run plan's share; default one CPU)."""
    if job.compute.tp > 1:
        from pipeline.run.replica import TensorParallelEngine

        return TensorParallelEngine(job) if rank_cpus is None else TensorParallelEngine(job, rank_cpus=rank_cpus)
    from pipeline.model.engine import InternVLEngine

    return InternVLEngine.load(job.model, device=job.compute.device, dtype=job.compute.dtype, revision=job.model_revision,
                               cache_dir=job.model_cache, storage_options=job.storage, trust_remote_code=job.trust_remote_code)


def questions_of(job: JobConfig, row: dict[str, Any]) -> list[tuple[str | None, dict[str, Any] | None]]:
    """The questions asked of one sample, each with the schema its answer follows (None: free text): the row's
    `questions`, else the job's, else the row's `question`. Only the job's questions may have schemas of their own;
    the others follow the job's `schema`."""
    own = as_list(row.get("questions"))
    if own:
        return [(str(q), job.answer_schema) for q in own]
    if job.questions:
        return job.questions_asked()
    return [(row.get("question"), job.answer_schema)]


def fail(row: dict[str, Any], error_type: ErrorType, message: str) -> None:
    """Mark an output row as an error row."""
    row.update(status="error", error_type=str(error_type), error_message=message)


class Requests:
    """The prompts of one model batch: which row each answers, the tiles each sample shows (decoded once)."""

    def __init__(self) -> None:
        self.requests: list[PromptRequest] = []
        self.samples: list[np.ndarray] = []
        self.targets: list[Any] = []  # what each request's result belongs to (a row, or a (row, criterion) pair)

    def add_sample(self, sample: dict[str, Any]) -> int:
        """Index of a sample's tiles in this batch's samples."""
        self.samples.append(tiles_from_bytes(sample["pixels"], int(sample["num_tiles"])))
        return len(self.samples) - 1

    def add(self, target: Any, ids: list[int], sample: int, labels: list[list[int]] | None = None,
            schema: dict[str, Any] | None = None) -> None:
        self.requests.append(PromptRequest(ids, sample, labels, schema))
        self.targets.append(target)

    def run(self, call: Callable[[list[PromptRequest], list[np.ndarray]], list[Any]], *,
            max_tokens: int | None) -> tuple[list[tuple[Any, Any]], float]:
        """(target, result) per request, and the model time per request in ms."""
        start = time.perf_counter()
        results = in_calls(call, self.requests, self.samples, max_tokens=max_tokens)
        per_request_ms = (time.perf_counter() - start) * 1000.0 / max(len(self.requests), 1)
        return list(zip(self.targets, results)), per_request_ms


class ModelStage:
    """A model stage over one replica: reads the CPU stage's columns, returns output rows (one table per batch)."""

    reads = ("id", "uri", "pixels", "num_tiles", "tiles_per_image", "media_type", "status")

    def __init__(self, job: JobConfig, engine: Any | None = None, *, rank_cpus: float | None = None) -> None:
        self.job = job
        self.engine = engine or load_engine(job, rank_cpus)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.ready = time.time()

    def __call__(self, batch: Batch) -> pa.Table:
        start = time.time()
        table = self.run(batch)
        timing = {"replica": self.replica, "ready": self.ready, "start": start, "end": time.time()}
        cells = [timing] + [None] * (table.num_rows - 1) if table.num_rows else []
        return table.append_column(pa.field(BATCH_COLUMN, BATCH_TYPE), pa.array(cells, BATCH_TYPE))

    def run(self, batch: Batch) -> pa.Table:
        raise NotImplementedError

    @staticmethod
    def base_row(sample: dict[str, Any]) -> dict[str, Any]:
        """A sample's columns as an output row starts from (tiles and question lists dropped)."""
        return {k: v for k, v in sample.items() if k not in CONSUMED_COLUMNS}

    @staticmethod
    def fill_failure(row: dict[str, Any], result: Any) -> bool:
        """Record a Failure result on its row; True if it was one."""
        if isinstance(result, Failure):
            fail(row, result.error_type, result.message)
            return True
        return False

    def __del__(self) -> None:
        close = getattr(getattr(self, "engine", None), "close", None)  # a tensor-parallel replica's ranks and devices
        if close is not None:
            close()
