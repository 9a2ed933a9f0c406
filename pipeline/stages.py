"""The pipeline's stages as plain Python callables over column batches (dict of numpy arrays).

Ray Data runs them (see runner.py), but nothing here imports Ray, so tests call them directly.
- `Preprocess` (CPU): reads `uri` / `uris`, adds `pixels` (uint8 tile bytes), `num_tiles`, `tiles_per_image`,
  `media_type`, video facts (`num_frames`, `frame_indices`, `fps`, `duration_s`), `status`...
- `Generate` (model replica): one output row per (sample, question); adds `response`, token counts, `infer_ms`.
  The vision encoder runs once per sample however many questions it carries.
- `WriteShards`: writes each batch of output rows as one Parquet shard, returns one stats row per shard.
A bad sample becomes a row with `status = error`, an `error_type` and a message; it never stops the batch.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.budget import frames_within, max_tiles_within, pack_calls
from pipeline.config import DecodeConfig, JobConfig, TilingConfig, VideoConfig
from pipeline.images import MediaError, load_tiles
from pipeline.output import OUTPUT_SCHEMA, PREPROCESS_SCHEMA, TIMING_FIELDS, shard_stats, to_table, write_shard
from pipeline.prompts import PromptError, user_text
from pipeline.sandbox import Sandbox
from pipeline.scoring import column, evaluate, label_token_ids, passes, score_fields
from pipeline.storage import extension, read_bytes
from pipeline.tiling import TILE_SIZE, tile_image
from pipeline.video import VIDEO_EXTENSIONS, VideoLimits, looks_like_video, sample_video

Batch = dict[str, np.ndarray]

# Error types written to `error_type` (documented in the README).
ERROR_TYPES = ("not_found", "read_error", "decode_error", "too_large", "unsupported", "timeout", "crashed", "bad_input",
               "model_error")
# Input columns the model stage consumes rather than passes through.
CONSUMED_COLUMNS = ("pixels", "questions")


def _require(columns: Any, stage: str, *needed: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise KeyError(f"stage {stage} needs column(s) {', '.join(missing)}; got {', '.join(columns)}")


def _rows(batch: Batch) -> list[dict[str, Any]]:
    """A numpy column batch as a list of row dicts (NaN-free: Arrow nulls arrive as None in object columns)."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _as_list(value: Any) -> list | None:
    """A list cell from a numpy batch (arrives as ndarray, list or None)."""
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else None


def tiles_from_bytes(data: bytes | None, num_tiles: int) -> np.ndarray:
    """The uint8 (num_tiles, 448, 448, 3) view of a `pixels` cell."""
    return np.frombuffer(data or b"", dtype=np.uint8).reshape(num_tiles, TILE_SIZE, TILE_SIZE, 3)


def image_tiles(data: bytes, tiling: TilingConfig, max_tiles: int, tokens: int | None = None) -> tuple[np.ndarray, int, int]:
    """Decode one image and cut it into tiles: (uint8 tiles, width, height). tiling.mode fast decodes big JPEGs at a
    reduced DCT scale. With a visual-token budget, the largest tile count whose tokens fit, from the header's size."""

    def within_budget(width: int, height: int) -> int:
        fitting = max_tiles_within(width, height, tokens=tokens, min_tiles=min(tiling.min_tiles, max_tiles),
                                   max_tiles=max_tiles, thumbnail=tiling.thumbnail)
        if fitting is None:
            raise MediaError("too_large", f"even min_tiles={tiling.min_tiles} tiles exceed the budget of {tokens} "
                                          "visual tokens (tiling.max_tokens_per_sample)")
        return fitting

    tiles = load_tiles(data, min_tiles=min(tiling.min_tiles, max_tiles), max_tiles=max_tiles, thumbnail=tiling.thumbnail,
                       mode=tiling.mode, max_pixels=tiling.max_image_pixels, exif_transpose=tiling.exif_transpose,
                       choose_max_tiles=within_budget if tokens is not None else None)
    return tiles.pixels, tiles.source_size[0], tiles.source_size[1]


def video_tiles(data: bytes, video: VideoConfig, tiling: TilingConfig) -> dict[str, Any]:
    """Sample frames (the cards' segment middles) and tile each with tiles_per_frame (1: a single 448 px resize,
    as the cards); with a visual-token budget, as many frames as fit."""
    frames = video.num_frames
    if tiling.max_tokens_per_sample is not None:
        frames = frames_within(frames, tokens=tiling.max_tokens_per_sample, tiles_per_frame=video.tiles_per_frame,
                               thumbnail=tiling.thumbnail)
    limits = VideoLimits(max_duration_s=video.max_duration_s, max_frames=video.max_frames, max_pixels=video.max_pixels)
    sampled = sample_video(data, num_segments=frames, start_s=video.start_s, end_s=video.end_s, limits=limits)
    per_frame = dict(min_tiles=min(tiling.min_tiles, video.tiles_per_frame), max_tiles=video.tiles_per_frame)
    tiles = [tile_image(Image.fromarray(frame, "RGB"), **per_frame,
                        thumbnail=tiling.thumbnail).pixels for frame in sampled.frames]
    return dict(pixels=np.concatenate(tiles), tiles_per_image=[len(t) for t in tiles], media_type="video",
                width=int(sampled.frames.shape[2]), height=int(sampled.frames.shape[1]), num_frames=sampled.num_frames,
                frame_indices=sampled.indices, fps=sampled.fps, duration_s=sampled.duration_s)


_SANDBOXES: dict[tuple, Sandbox] = {}  # per worker process: one decoder child per function, reused across tasks


def isolated(fn: Any, decode: DecodeConfig) -> Any:
    """fn, run in this worker's decoder child process (pipeline.sandbox): a crash or hang costs one error row."""
    key = (fn.__module__, fn.__qualname__, decode.timeout_s, decode.attempts)
    if key not in _SANDBOXES:
        _SANDBOXES[key] = Sandbox(fn, timeout_s=decode.timeout_s, attempts=decode.attempts)
    return _SANDBOXES[key]


class Preprocess:
    """CPU stage: read bytes through fsspec, decode, tile images / sample and tile video frames; uint8 out.

    Decoding runs in a child process for the media `decode.isolate` names (video by default: decoders of
    containers and codecs are where crashes and hangs come from)."""

    def __init__(self, job: JobConfig) -> None:
        self.tiling = job.tiling
        self.video = job.video
        self.storage = dict(job.storage)
        isolate = job.decode.isolate
        self.image_tiles = isolated(image_tiles, job.decode) if isolate == "all" else image_tiles
        self.video_tiles = isolated(video_tiles, job.decode) if isolate in ("all", "video") else video_tiles

    def read(self, uri: str) -> bytes:
        """Bytes of one object; missing objects and storage failures become classified errors."""
        try:
            return read_bytes(uri, self.storage)
        except FileNotFoundError:
            raise MediaError("not_found", f"no such object: {uri}") from None
        except (OSError, ValueError) as err:
            raise MediaError("read_error", f"could not read {uri}: {type(err).__name__}: {err}") from None

    def _images(self, uris: list[str]) -> dict[str, Any]:
        """One or several images; several share the tile budget (max_tiles // n each, as InternVL 2.5 does) and
        the visual-token budget (an equal share each)."""
        budget = max(1, self.tiling.max_tiles // len(uris))
        tokens = self.tiling.max_tokens_per_sample // len(uris) if self.tiling.max_tokens_per_sample else None
        done = [self.image_tiles(self.read(u), self.tiling, budget, tokens)
                for u in uris]
        return dict(pixels=np.concatenate([d[0] for d in done]), tiles_per_image=[len(d[0]) for d in done],
                    media_type="image" if len(uris) == 1 else "images", width=done[0][1], height=done[0][2])

    def prepare(self, uri: str, uris: list[str] | None = None) -> dict[str, Any]:
        """Everything the CPU stage adds for one sample; failures become an error row."""
        start = time.perf_counter()
        row: dict[str, Any] = {f.name: None for f in PREPROCESS_SCHEMA}
        row.update(num_tiles=0, status="ok")
        try:
            if uris and len(uris) > 1:
                row.update(self._images(uris))
            else:
                data = self.read(uri)
                if extension(uri) in VIDEO_EXTENSIONS or looks_like_video(data):
                    row.update(self.video_tiles(data, self.video, self.tiling))
                else:
                    pixels, width, height = self.image_tiles(data, self.tiling, self.tiling.max_tiles,
                                                             self.tiling.max_tokens_per_sample)
                    row.update(pixels=pixels, tiles_per_image=[len(pixels)], media_type="image", width=width, height=height)
            row["num_tiles"] = len(row["pixels"])
            row["pixels"] = row["pixels"].tobytes()
        except MediaError as err:
            row.update(pixels=None, status="error", error_type=err.error_type, error_message=str(err))
        row["preprocess_ms"] = (time.perf_counter() - start) * 1000.0
        return row

    def tile_one(self, uri: str) -> dict[str, Any]:
        """prepare() for a single-URI sample."""
        return self.prepare(uri)

    def __call__(self, batch: Batch) -> pa.Table:
        _require(batch, "preprocess", "id", "uri")
        uris = batch.get("uris")
        rows = [self.prepare(str(u), _as_list(uris[i]) if uris is not None else None) for i, u in enumerate(batch["uri"])]
        added = {f.name: [r[f.name] for r in rows] for f in PREPROCESS_SCHEMA}
        passthrough = {k: v for k, v in batch.items() if k not in added}
        return to_table({**added, **passthrough}, PREPROCESS_SCHEMA)


def load_engine(job: JobConfig) -> Any:
    """The job's model replica; torch and transformers load here, on the worker, never on the driver.

    With compute.tp > 1 the replica is a group of rank actors driven from here (pipeline.replica)."""
    if job.compute.tp > 1:
        from pipeline.replica import TensorParallelEngine

        return TensorParallelEngine(job)
    from pipeline.engine import InternVLEngine

    return InternVLEngine.load(job.model, device=job.compute.device, dtype=job.compute.dtype, revision=job.model_revision,
                               cache_dir=job.model_cache, storage_options=job.storage, trust_remote_code=job.trust_remote_code)


def questions_of(job: JobConfig, row: dict[str, Any]) -> list[str | None]:
    """The questions asked of one sample: the row's `questions`, else the job's, else the row's `question`."""
    own = _as_list(row.get("questions"))
    if own:
        return [str(q) for q in own]
    if job.questions:
        return list(job.questions)
    return [row.get("question")]


class ModelStage:
    """What both model stages share: the replica's engine, and timing columns for the run summary."""

    def __init__(self, job: JobConfig, engine: Any | None = None) -> None:
        self.job = job
        self.engine = engine or load_engine(job)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.ready = time.time()

    def __call__(self, batch: Batch) -> pa.Table:
        start = time.time()
        table = self.run(batch)
        values = (self.replica, self.ready, start, time.time())
        for name, value in zip(TIMING_FIELDS, values):
            table = table.append_column(name, pa.array([value] * table.num_rows))
        return table

    def run(self, batch: Batch) -> pa.Table:
        raise NotImplementedError

    def __del__(self) -> None:
        close = getattr(getattr(self, "engine", None), "close", None)  # a tensor-parallel replica's ranks and devices
        if close is not None:
            close()


class Generate(ModelStage):
    """Model stage: one instance drives one replica; batched generation over a batch of samples."""

    def __init__(self, job: JobConfig, engine: Any | None = None) -> None:
        super().__init__(job, engine)
        self.generation_json = json.dumps(job.generation.model_dump(), sort_keys=True)

    def run(self, batch: Batch) -> pa.Table:
        _require(batch, "generate", "id", "uri", "pixels", "num_tiles", "tiles_per_image", "media_type", "status")
        out: list[dict[str, Any]] = []
        prompts: list[list[int]] = []
        samples: list[np.ndarray] = []
        owners: list[int] = []  # prompt -> index in samples
        pending: list[int] = []  # prompt -> index in out
        for sample in _rows(batch):
            questions = questions_of(self.job, sample)
            base = {k: v for k, v in sample.items() if k not in CONSUMED_COLUMNS}
            tiles = None
            for k, question in enumerate(questions):
                row = dict(base, sample_id=sample["id"], question=question, question_index=k, task=self.job.task,
                           model=self.job.model, generation=self.generation_json, prompt=None, response=None,
                           num_input_tokens=0, num_generated_tokens=0, mean_logprob=None, infer_ms=0.0)
                if len(questions) > 1:
                    row["id"] = f"{sample['id']}#{k}"
                out.append(row)
                if row["status"] != "ok":
                    continue
                try:
                    text = user_text(task=self.job.task, prompt=self.job.effective_prompt, question=question)
                except PromptError as err:
                    row.update(status="error", error_type="bad_input", error_message=str(err))
                    continue
                if tiles is None:
                    tiles = tiles_from_bytes(sample["pixels"], int(sample["num_tiles"]))
                    samples.append(tiles)
                ids = self.engine.prompt_ids(text, [int(t) for t in sample["tiles_per_image"]],
                                             video=sample["media_type"] == "video")
                row.update(prompt=text, num_input_tokens=len(ids))
                prompts.append(ids)
                owners.append(len(samples) - 1)
                pending.append(len(out) - 1)

        start = time.perf_counter()
        results = self._generate(prompts, samples, owners)
        per_prompt_ms = (time.perf_counter() - start) * 1000.0 / max(len(prompts), 1)
        for index, result in zip(pending, results):
            row = out[index]
            row["infer_ms"] = per_prompt_ms
            if isinstance(result, str):
                row.update(status="error", error_type="model_error", error_message=result)
            else:
                row.update(response=result.text, num_generated_tokens=len(result.token_ids),
                           mean_logprob=float(np.mean(result.logprobs)) if result.logprobs else None)
        columns = {name: [r.get(name) for r in out] for name in dict.fromkeys(k for r in out for k in r)}
        return to_table(columns, OUTPUT_SCHEMA)

    def _generate(self, prompts: list[list[int]], samples: list[np.ndarray], owners: list[int]) -> list[Any]:
        gen = self.job.generation
        params = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, temperature=gen.temperature,
                      top_p=gen.top_p, seed=gen.seed if gen.do_sample else None)
        return in_calls(lambda p, s, o, _: self.engine.generate(p, s, o, **params), prompts, samples, owners,
                        max_tokens=self.job.compute.max_batch_tokens)


def in_calls(call: Any, prompts: list, samples: list[np.ndarray], owners: list[int], extras: list | None = None, *,
             max_tokens: int | None = None) -> list[Any]:
    """call(prompts, samples, owners, extras) over groups of samples (each with all its prompts, so its tiles go
    through the vision encoder once) packed by padded prompt tokens (compute.max_batch_tokens); results in
    prompt order. Greedy results do not depend on the grouping: batched equals one at a time."""
    extras = extras if extras is not None else [None] * len(prompts)
    per_sample = [[i for i, o in enumerate(owners) if o == s] for s in range(len(samples))]
    lengths = [max((len(prompts[i]) for i in mine), default=0) for mine in per_sample]
    results: list[Any] = [None] * len(prompts)
    for group in pack_calls(lengths, max_tokens=max_tokens, sizes=[len(m) for m in per_sample]):
        index = {s: k for k, s in enumerate(group)}
        mine = [i for s in group for i in per_sample[s]]
        part = with_memory_fallback(call, [prompts[i] for i in mine], [samples[s] for s in group],
                                    [index[owners[i]] for i in mine], [extras[i] for i in mine])
        for i, r in zip(mine, part):
            results[i] = r
    return results


def with_memory_fallback(call: Any, prompts: list, samples: list[np.ndarray], owners: list[int],
                         extras: list | None = None) -> list[Any]:
    """call(prompts, samples, owners, extras) for the whole batch; if the device runs out of memory, again one
    sample (with all its prompts) at a time, and a sample that still does not fit gets an error message."""
    import torch

    if not prompts:
        return []
    extras = extras if extras is not None else [None] * len(prompts)
    try:
        return call(prompts, samples, owners, extras)
    except torch.OutOfMemoryError:
        if len(samples) == 1:
            return [f"out of device memory for one sample ({len(samples[0])} tiles)"] * len(prompts)
    results: list[Any] = [None] * len(prompts)
    for s, sample in enumerate(samples):
        mine = [i for i, o in enumerate(owners) if o == s]
        part = with_memory_fallback(call, [prompts[i] for i in mine], [sample], [0] * len(mine), [extras[i] for i in mine])
        for i, r in zip(mine, part):
            results[i] = r
    return results


class Score(ModelStage):
    """Model stage for task score: label probabilities of every criterion, one forward pass, one row per sample."""

    def __init__(self, job: JobConfig, engine: Any | None = None) -> None:
        super().__init__(job, engine)
        self.criteria = job.score_criteria()
        self.labels = [label_token_ids(self.engine.tokenizer, c.answers) for c in self.criteria]
        self.schema = output_schema(job)

    def run(self, batch: Batch) -> pa.Table:
        _require(batch, "score", "id", "uri", "pixels", "num_tiles", "tiles_per_image", "media_type", "status")
        out: list[dict[str, Any]] = []
        prompts, samples, owners, labels, pending = [], [], [], [], []
        single = self.criteria[0].name == ""
        for sample in _rows(batch):
            row = {k: v for k, v in sample.items() if k not in CONSUMED_COLUMNS}
            row.update(sample_id=sample["id"], question_index=0, task="score", model=self.job.model, response=None,
                       prompt=self.criteria[0].prompt if single else json.dumps({c.name: c.prompt for c in self.criteria}),
                       num_input_tokens=0, num_generated_tokens=0, infer_ms=0.0)
            out.append(row)
            if row["status"] != "ok":
                continue
            samples.append(tiles_from_bytes(sample["pixels"], int(sample["num_tiles"])))
            tiles = [int(t) for t in sample["tiles_per_image"]]
            for c, criterion in enumerate(self.criteria):
                ids = self.engine.prompt_ids(criterion.prompt, tiles, video=sample["media_type"] == "video")
                row["num_input_tokens"] += len(ids)
                prompts.append(ids)
                owners.append(len(samples) - 1)
                labels.append(self.labels[c])
                pending.append((len(out) - 1, c))
        start = time.perf_counter()
        results = in_calls(lambda p, s, o, e: self.engine.score(p, s, o, e), prompts, samples, owners, labels,
                           max_tokens=self.job.compute.max_batch_tokens)
        per_sample_ms = (time.perf_counter() - start) * 1000.0 / max(len(samples), 1)
        for (index, c), result in zip(pending, results):
            row = out[index]
            row["infer_ms"] = per_sample_ms
            if isinstance(result, str):
                row.update(status="error", error_type="model_error", error_message=result)
            elif row["status"] == "ok":
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


def output_schema(job: JobConfig) -> pa.Schema:
    """Our typed columns for this job: the common ones, plus the score columns of a score job."""
    if job.task != "score":
        return OUTPUT_SCHEMA
    return pa.schema([*OUTPUT_SCHEMA, *score_fields(job.score_criteria(), with_passed=job.has_filter)])


class WriteShards:
    """Write stage: one Parquet shard per batch (named from its ids), one stats row back for the summary.

    A score job with `output_passed` also writes the passing rows, with only their input columns, as a shard of
    the same name there: a manifest ready for the next stage.
    """

    def __init__(self, job: JobConfig, input_columns: list[str] | None = None, skip_ids: list[str] | None = None) -> None:
        self.job = job
        self.input_columns = input_columns or ["id", "uri"]
        self.skip_ids = pa.array(skip_ids or [], pa.string())  # rows a resumed run finds already written

    def __call__(self, batch: pa.Table) -> pa.Table:
        _require(batch.column_names, "write", *OUTPUT_SCHEMA.names)
        if len(self.skip_ids):
            batch = batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=self.skip_ids)))
        if batch.num_rows == 0:
            return pa.Table.from_pylist([shard_stats(batch, "")])
        stats = shard_stats(batch, "")
        batch = batch.drop_columns([c for c in TIMING_FIELDS if c in batch.column_names])
        stats["file"] = name = write_shard(batch, self.job.output, self.job.storage)
        if self.job.output_passed:
            kept = batch.filter(pc.fill_null(batch.column("passed"), False))
            if kept.num_rows:
                columns = [c for c in self.input_columns if c in kept.column_names]
                write_shard(kept.select(columns), self.job.output_passed, self.job.storage)
        return pa.Table.from_pylist([stats])
