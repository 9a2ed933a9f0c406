"""What the two model stages share: the replica's engine, the requests of a batch, typed failures, batch timing.

A stage turns each sample into output rows and each row it can ask about into `PromptRequest`s; the engine
answers them in calls packed by tokens (model/batching.py); a request that fails becomes an error row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.errors import ErrorType
from pipeline.io.schema import output_schema
from pipeline.media.decode import pictures_from_bytes, tiles_from_bytes
from pipeline.model import engines
from pipeline.model.batching import in_calls
from pipeline.model.requests import Failure, PromptRequest, subset
from pipeline.stages.busy_clock import BusyClock
from pipeline.stages.poison_guard import PoisonGuard
from pipeline.stages.base import Batch, Columns, as_list

log = logging.getLogger(__name__)

# Input columns the model stages consume rather than pass through.
CONSUMED_COLUMNS = ("pixels", "picture_sizes", "questions")
# The first row of each model batch carries when and where the batch ran (for the run's busy fraction) and what it
# did (samples through the model, tokens generated: per-replica rates); the write stage takes it out of the rows
# and into the shard's stats, so it is never written.
BATCH_COLUMN = "__batch"
# `cache_queries` / `cache_hits`: the replica's prompt tokens looked up in vLLM's prefix cache and found there so
# far (cumulative, like `busy`; null on engines without a prefix cache).
BATCH_TYPE = pa.struct([("replica", pa.string()), ("ready", pa.float64()), ("start", pa.float64()), ("end", pa.float64()),
                        ("samples", pa.int64()), ("tokens", pa.int64()), ("busy", pa.float64()),
                        ("cache_queries", pa.int64()), ("cache_hits", pa.int64())])
# Exit status of a replica's process whose vLLM engine died: Ray restarts the actor (run/resources.py).
ENGINE_DEAD_EXIT = 75


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
        """Index of a sample's tiles (or, for vllm-native, its pictures) in this batch's samples."""
        sizes = sample.get("picture_sizes")
        if sizes is not None:
            from pipeline.model.vllm_native import Pictures

            self.samples.append(Pictures(pictures_from_bytes(sample["pixels"], [list(s) for s in sizes]),
                                         video=sample["media_type"] == "video"))
        else:
            self.samples.append(tiles_from_bytes(sample["pixels"], int(sample["num_tiles"])))
        return len(self.samples) - 1

    def add(self, target: Any, ids: list[int], sample: int, labels: list[list[int]] | None = None,
            schema: dict[str, Any] | None = None, seed: int | None = None) -> None:
        self.requests.append(PromptRequest(ids, sample, labels, schema=schema, seed=seed))
        self.targets.append(target)


class ModelStage:
    """A model stage over one replica: reads the CPU stage's columns, returns output rows (one table per batch).

    A stage `prepare`s a batch (output rows, and the requests of the rows it can ask about), the engine answers the
    requests (`call_args` says how: `method` of the engine), and the stage `fill`s the rows with the results. The
    sync `__call__` (transformers) packs the requests into calls by tokens with the out-of-memory fallback
    (model/batching.py); `AsyncStage` (vLLM) hands the whole batch over at once and awaits it, so several batches
    are in flight and vLLM schedules its own memory.
    """

    reads = ("id", "uri", "pixels", "num_tiles", "tiles_per_image", "media_type", "status")
    method = ""  # the engine's method: generate or score

    @classmethod
    def columns(cls, job: JobConfig) -> Columns:
        """Reads the CPU stage's tiles; adds the task's output columns (and the batch record the writer takes out);
        drops the tiles and the questions it asked."""
        return Columns(reads=cls.reads, adds=(*output_schema(job).names, BATCH_COLUMN), drops=CONSUMED_COLUMNS)

    def __init__(self, job: JobConfig, engine: Any | None = None, *, load: Callable[[], Any] | None = None) -> None:
        """`engine`: one already loaded (the stage leaves it open); else `load()` makes the replica's (the run's
        choice, run/replica.load_replica), or a transformers engine of the job's model."""
        self.job = job
        self.owns_engine = engine is None  # closed with the stage only if the stage loaded it
        self.engine = engine or (load() if load is not None else engines.load("transformers", job))
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.ready = time.time()
        self.guard = PoisonGuard()
        self.busy = BusyClock()

    def __call__(self, batch: Batch) -> pa.Table:
        started = time.time()
        self.busy.begin()
        try:
            rows, todo = self.prepare(batch)
            clock = time.perf_counter()
            results = in_calls(self.call, todo.requests, todo.samples, max_tokens=self.job.compute.max_batch_tokens)
            self.guard.check(results)
        except BaseException:
            self.busy.end()
            raise
        return self.finish(rows, todo, results, time.perf_counter() - clock, started)

    def prepare(self, batch: Batch) -> tuple[list[dict[str, Any]], Requests]:
        """The batch's output rows, and the requests of those the model answers."""
        raise NotImplementedError

    def fill(self, rows: list[dict[str, Any]], answered: list[tuple[Any, Any]], per_request_ms: float) -> pa.Table:
        """The output table: rows with each (target, result) pair filled in."""
        raise NotImplementedError

    def call_args(self, requests: list[PromptRequest], samples: list[np.ndarray]) -> tuple[tuple, dict[str, Any]]:
        """Positional and keyword arguments of the engine's `method` for these requests."""
        raise NotImplementedError

    def call(self, requests: list[PromptRequest], samples: list[np.ndarray]) -> list[Any]:
        args, kwargs = self.call_args(requests, samples)
        return getattr(self.engine, self.method)(*args, **kwargs)

    def finish(self, rows: list[dict[str, Any]], todo: Requests, results: list[Any], model_s: float,
               started: float) -> pa.Table:
        """fill(), then the batch's timing cell on the first row."""
        table = self.fill(rows, list(zip(todo.targets, results)), model_s * 1000.0 / max(len(todo.requests), 1))
        tokens = sum(r.get("num_generated_tokens") or 0 for r in rows)
        cache = getattr(self.engine, "prefix_cache", None)
        timing = {"replica": self.replica, "ready": self.ready, "start": started, "end": time.time(),
                  "samples": len(todo.samples), "tokens": int(tokens), "busy": self.busy.end(),
                  "cache_queries": getattr(cache, "queries", None), "cache_hits": getattr(cache, "hits", None)}
        cells = [timing] + [None] * (table.num_rows - 1) if table.num_rows else []
        return table.append_column(pa.field(BATCH_COLUMN, BATCH_TYPE), pa.array(cells, BATCH_TYPE))

    @staticmethod
    def base_row(sample: dict[str, Any]) -> dict[str, Any]:
        """A sample's columns as an output row starts from (tiles and question lists dropped)."""
        return {k: v for k, v in sample.items() if k not in CONSUMED_COLUMNS}

    def too_long(self, row: dict[str, Any], tokens: int) -> bool:
        """Make the row a too_long error if `tokens` (its prompt and what must follow it) exceed the model's context;
        True if it did. Found here, the model is never called with it."""
        limit = getattr(self.engine, "max_context", None)
        if limit is None or tokens <= limit:
            return False
        fail(row, ErrorType.TOO_LONG, f"the prompt needs {tokens} tokens (image tokens, text and what follows), "
                                      f"more than the model's context of {limit}")
        return True

    @staticmethod
    def fill_failure(row: dict[str, Any], result: Any) -> bool:
        """Record a Failure result on its row; True if it was one."""
        if isinstance(result, Failure):
            fail(row, result.error_type, result.message)
            return True
        return False

    def __del__(self) -> None:
        if not getattr(self, "owns_engine", False):
            return
        close = getattr(getattr(self, "engine", None), "close", None)  # a replica's ranks, devices, vLLM engine
        if close is not None:
            close()


class AsyncStage:
    """A model stage whose `__call__` is a coroutine, for engines with `<method>_async` (vLLM): Ray Data keeps up
    to compute.vllm.max_concurrent_batches batches in flight per replica (the actor's max_concurrency), and the
    engine serves their requests together. One engine call per batch: no packing, no out-of-memory fallback (the
    engine schedules its own memory); if the call raises, each sample is asked alone, all in flight at once, and
    those it raises on become model_error rows (a poison sample costs one row, as on the sync path).

    `prepare` (chat template, tokenising prompts of thousands of tokens) runs in a thread of its own, so the actor's
    event loop stays free for the other batches in flight. If the engine itself has died (vLLM's engine-core or a
    worker process is gone), no sample is to blame: the replica's process ends (`restart_replica`) and Ray starts
    it anew and runs its batches again (the actor's max_restarts and max_task_retries, run/resources.py), so no row
    becomes an error for it."""

    async def __call__(self: Any, batch: Batch) -> pa.Table:
        started = time.time()
        self.busy.begin()
        try:
            rows, todo = await asyncio.get_running_loop().run_in_executor(self.prepare_thread(), self.prepare, batch)
            clock = time.perf_counter()
            results: list[Any] = []
            if todo.requests:
                try:
                    results = await self.call_async(todo.requests, todo.samples)
                except Exception as err:  # noqa: BLE001 - a dead engine, or a poison sample: find it
                    self.check_engine(err)
                    results = await self.each_sample_alone(todo.requests, todo.samples)
                self.guard.check(results)
        except BaseException:
            self.busy.end()
            raise
        return self.finish(rows, todo, results, time.perf_counter() - clock, started)

    def prepare_thread(self: Any) -> ThreadPoolExecutor:
        """The one thread that prepares this stage's batches (one: the tokenizer is not shared between threads)."""
        if getattr(self, "_prepare_thread", None) is None:
            self._prepare_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        return self._prepare_thread

    def check_engine(self: Any, err: BaseException) -> None:
        """Restart the replica if the engine has died (the error is then not the batch's); else return."""
        if getattr(self.engine, "dead", False):
            cause = getattr(self.engine, "death_cause", lambda: None)() or f"{type(err).__name__}: {err}"
            self.restart_replica(cause)

    def restart_replica(self: Any, cause: str) -> None:
        """End this replica's process, so that Ray restarts it with a new engine and re-runs its batches in flight.
        What is left of the dead engine (the other vLLM processes) is shut down first."""
        log.error("replica %s: vLLM's engine died (%s); its process exits so that Ray restarts it and runs its "
                  "batches again", self.replica, " ".join(str(cause).split()))
        with contextlib.suppress(Exception):
            self.engine.close()
        logging.shutdown()
        os._exit(ENGINE_DEAD_EXIT)

    async def call_async(self: Any, requests: list[PromptRequest], samples: list[np.ndarray]) -> list[Any]:
        args, kwargs = self.call_args(requests, samples)
        return await getattr(self.engine, f"{self.method}_async")(*args, **kwargs)

    async def each_sample_alone(self: Any, requests: list[PromptRequest], samples: list[np.ndarray]) -> list[Any]:
        async def alone(s: int) -> tuple[list[int], list[Any]]:
            mine = [i for i, r in enumerate(requests) if r.sample == s]
            try:
                return mine, await self.call_async(*subset(requests, samples, [s], mine))
            except Exception as err:  # noqa: BLE001
                self.check_engine(err)
                failure = Failure(ErrorType.MODEL_ERROR,
                                  f"the model failed on this sample: {type(err).__name__}: {err}", failed=err)
                return mine, [failure] * len(mine)

        results: list[Any] = [None] * len(requests)
        for mine, answers in await asyncio.gather(*(alone(s) for s in range(len(samples)))):
            for i, r in zip(mine, answers):
                results[i] = r
        return results
