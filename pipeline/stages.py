"""The pipeline's stages as plain Python callables over column batches (dict of numpy arrays).

Ray Data runs them (see runner.py), but nothing here imports Ray, so tests call them directly.
- `Preprocess` (CPU): reads `uri`, adds `pixels` (uint8 tile bytes), `num_tiles`, `width`, `height`, `status`...
- `Generate` (model replica): reads `pixels`, `num_tiles`, `question`, adds `response`, token counts, `infer_ms`.
- `WriteShards`: writes each batch of output rows as one Parquet shard, returns one stats row per shard.
A bad sample becomes a row with `status = error`, an `error_type` and a message; it never stops the batch.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.images import MediaError, decode_image
from pipeline.output import OUTPUT_SCHEMA, PREPROCESS_SCHEMA, shard_stats, to_table, write_shard
from pipeline.prompts import PromptError, user_text
from pipeline.storage import read_bytes
from pipeline.tiling import TILE_SIZE, tile_image

Batch = dict[str, np.ndarray]

# Error types written to `error_type` (documented in the README).
ERROR_TYPES = ("not_found", "read_error", "decode_error", "too_large", "bad_input", "model_error")


def _require(batch: Batch, stage: str, *columns: str) -> None:
    missing = [c for c in columns if c not in batch]
    if missing:
        raise KeyError(f"stage {stage} needs column(s) {', '.join(missing)}; got {', '.join(batch)}")


def tiles_from_bytes(data: bytes | None, num_tiles: int) -> np.ndarray:
    """The uint8 (num_tiles, 448, 448, 3) view of a `pixels` cell."""
    return np.frombuffer(data or b"", dtype=np.uint8).reshape(num_tiles, TILE_SIZE, TILE_SIZE, 3)


class Preprocess:
    """CPU stage: read bytes through fsspec, decode, tile exactly as the cards; uint8 out."""

    def __init__(self, job: JobConfig) -> None:
        self.tiling = job.tiling
        self.storage = dict(job.storage)

    def tile_one(self, uri: str) -> dict[str, Any]:
        """Everything the CPU stage adds for one URI; failures become an error row."""
        start = time.perf_counter()
        row: dict[str, Any] = dict(pixels=None, num_tiles=0, width=None, height=None, status="ok", error_type=None, error_message=None)
        try:
            try:
                data = read_bytes(uri, self.storage)
            except FileNotFoundError:
                raise MediaError("not_found", f"no such object: {uri}") from None
            except (OSError, ValueError) as err:
                raise MediaError("read_error", f"could not read {uri}: {type(err).__name__}: {err}") from None
            image = decode_image(data)
            tiles = tile_image(
                image, min_tiles=self.tiling.min_tiles, max_tiles=self.tiling.max_tiles, thumbnail=self.tiling.thumbnail
            )
            row.update(pixels=tiles.pixels.tobytes(), num_tiles=tiles.num_tiles, width=image.width, height=image.height)
        except MediaError as err:
            row.update(status="error", error_type=err.error_type, error_message=str(err))
        row["preprocess_ms"] = (time.perf_counter() - start) * 1000.0
        return row

    def __call__(self, batch: Batch) -> pa.Table:
        _require(batch, "preprocess", "id", "uri")
        rows = [self.tile_one(str(uri)) for uri in batch["uri"]]
        added = {f.name: [r[f.name] for r in rows] for f in PREPROCESS_SCHEMA}
        passthrough = {k: v for k, v in batch.items() if k not in added}
        return to_table({**added, **passthrough}, PREPROCESS_SCHEMA)


class Generate:
    """Model stage: one instance drives one replica; batched greedy/sampled generation over a batch of rows."""

    def __init__(self, job: JobConfig, engine: Any | None = None) -> None:
        from pipeline.engine import InternVLEngine  # torch/transformers load on the worker, not the driver

        self.job = job
        self.engine = engine or InternVLEngine.load(
            job.model, device=job.compute.device, dtype=job.compute.dtype, revision=job.model_revision,
            cache_dir=job.model_cache, storage_options=job.storage,
        )
        self.generation_json = json.dumps(job.generation.model_dump(), sort_keys=True)

    def __call__(self, batch: Batch) -> pa.Table:
        _require(batch, "generate", "id", "uri", "pixels", "num_tiles", "status")
        n = len(batch["id"])
        prompt_col: list[str | None] = [None] * n
        response: list[str | None] = [None] * n
        n_in = np.zeros(n, dtype=np.int32)
        n_out = np.zeros(n, dtype=np.int32)
        mean_lp: list[float | None] = [None] * n
        status = list(batch["status"])
        error_type = list(batch["error_type"])
        error_message = list(batch["error_message"])
        questions = batch.get("question", [None] * n)

        requests, rows = [], []
        for i in range(n):
            if status[i] != "ok":
                continue
            try:
                text = user_text(task=self.job.task, prompt=self.job.effective_prompt, question=questions[i])
            except PromptError as err:
                status[i], error_type[i], error_message[i] = "error", "bad_input", str(err)
                continue
            tiles = int(batch["num_tiles"][i])
            ids = self.engine.prompt_ids(text, [tiles])
            prompt_col[i], n_in[i] = text, len(ids)
            requests.append((ids, tiles_from_bytes(batch["pixels"][i], tiles)))
            rows.append(i)

        start = time.perf_counter()
        for i, result in zip(rows, self._generate(requests)):
            if isinstance(result, str):
                status[i], error_type[i], error_message[i] = "error", "model_error", result
            else:
                response[i], n_out[i] = result.text, len(result.token_ids)
                mean_lp[i] = float(np.mean(result.logprobs)) if result.logprobs else None
        infer_ms = (time.perf_counter() - start) * 1000.0 / max(len(rows), 1)
        done = set(rows)

        out: dict[str, Any] = {k: v for k, v in batch.items() if k != "pixels"}
        out.update(
            task=[self.job.task] * n,
            prompt=prompt_col,
            response=response,
            num_input_tokens=n_in,
            num_generated_tokens=n_out,
            mean_logprob=mean_lp,
            model=[self.job.model] * n,
            generation=[self.generation_json] * n,
            status=status,
            error_type=error_type,
            error_message=error_message,
            infer_ms=np.asarray([infer_ms if i in done else 0.0 for i in range(n)], dtype=np.float64),
        )
        return to_table(out, OUTPUT_SCHEMA)

    def _generate(self, requests: list[tuple[list[int], np.ndarray]]) -> list[Any]:
        """Generations for the batch; if it runs out of device memory, one sample at a time, and a sample that
        still does not fit becomes an error message instead of a result."""
        import torch

        gen = self.job.generation
        params = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, temperature=gen.temperature,
                      top_p=gen.top_p, seed=gen.seed if gen.do_sample else None)
        if not requests:
            return []
        try:
            return self.engine.generate(requests, **params)
        except torch.OutOfMemoryError:
            if len(requests) == 1:
                return [f"out of device memory for one sample ({len(requests[0][0])} prompt tokens)"]
        return [r for request in requests for r in self._generate([request])]


class WriteShards:
    """Write stage: one Parquet shard per batch (named from its ids), one stats row back for the summary."""

    def __init__(self, job: JobConfig) -> None:
        self.output = job.output
        self.storage = dict(job.storage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        _require({name: None for name in batch.column_names}, "write", *OUTPUT_SCHEMA.names)
        name = write_shard(batch, self.output, self.storage)
        return pa.Table.from_pylist([shard_stats(batch, name)])
