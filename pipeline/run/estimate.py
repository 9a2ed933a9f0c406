"""What a run would cost, before it runs: tiles, visual tokens and GPU-hours, from a few samples' image headers and
the model catalogue's sizing. An estimate (a rule of thumb), printed by `plan` and at the start of every run, with
the GPU memory split a vLLM replica will use (model/gpu_memory.py); a model that cannot fit its GPUs stops here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import MediaError, RunError
from pipeline.io.fetch import read_input
from pipeline.io.image_column import cell_media
from pipeline.io.storage import extension, get_filesystem
from pipeline.io.webdataset import WDS_COLUMN
from pipeline.media.budget import TOKENS_PER_TILE, tile_count
from pipeline.media.video import VIDEO_EXTENSIONS
from pipeline.model.catalog import ModelInfo, find_model
from pipeline.model.gpu_memory import ACCELERATOR_GIB, checkpoint_config, describe_split
from pipeline.run.resources import replica_memory
from pipeline.stages.preprocess import job_input_rule

SAMPLED = 32  # samples whose image headers are read
HEADER_BYTES = 64 * 1024  # enough for the size of a JPEG, PNG or WebP (not its pixels)
GPU_TFLOPS, MFU = 989.0, 0.4  # H100 dense bf16, at the utilisation bench/h100_estimate.py assumes
VIT_TOKENS = 1025  # a 448 px tile through InternViT: 32 x 32 patches + class token
PROMPT_TOKENS = 40  # chat template and question, besides the image tokens


def picture_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from the first bytes of an image, or None (not an image, header too long)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(head)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - an estimate: an unreadable header is left out
        return None


def image_size(url: str, job: JobConfig) -> tuple[int, int] | None:
    """Width and height from the first bytes of an image, or None (no such object, not an image, header too long,
    or a URI the job may not read: read as the run reads, confined, and one try for a URL)."""
    try:
        head = read_input(url, rule=job_input_rule(job), storage=job.storage,
                          http={**job.http.model_dump(), "attempts": 1}, limit=HEADER_BYTES)
    except Exception:  # noqa: BLE001 - an estimate: an unreadable header is left out
        return None
    return picture_size(head)


def member_size(shard: str, offset: int, size: int, job: JobConfig) -> tuple[int, int] | None:
    """Width and height from the first bytes of a shard's member (its byte range; the shard is the job's own input)."""
    try:
        fs, path = get_filesystem(shard, job.storage)
        head = fs.cat_file(path, start=offset, end=offset + min(size, HEADER_BYTES))
    except Exception:  # noqa: BLE001 - an estimate: an unreadable header is left out
        return None
    return picture_size(head)


def sample_media(job: JobConfig, row: dict[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
    """(name, size getter) of each picture of a sample: its URI(s), a WebDataset sample's members (a header's byte
    range each), or the pictures its row carries (`image_column`)."""
    packed = row.get(WDS_COLUMN)
    if packed:
        return [(m["name"], partial(member_size, packed["shard"], int(m["offset"]), int(m["size"]), job))
                for m in packed["media"] or []]
    if job.image_column:
        try:
            return [(name, partial(picture_size, data)) for name, data in cell_media(row.get(job.image_column), job.image_column)]
        except MediaError:
            return []
    return [(u, partial(image_size, u, job)) for u in row.get("uris") or [row["uri"]]]


def sample_tiles(job: JobConfig, row: dict[str, Any]) -> int | None:
    """Tiles the model would see for one sample (videos: frames x tiles per frame), None if not known."""
    media = sample_media(job, row)
    if any(extension(name) in VIDEO_EXTENSIONS for name, _ in media):
        return job.video.num_frames * job.video.tiles_per_frame
    t = job.tiling
    per_image = max(t.min_tiles, t.max_tiles // max(1, len(media)))
    sizes = [size() for _, size in media]
    if not sizes or any(s is None for s in sizes):
        return None
    return sum(tile_count(w, h, min_tiles=t.min_tiles, max_tiles=per_image, thumbnail=t.thumbnail) for w, h in sizes)


def gpu_hours(model: ModelInfo, *, samples: int, rows: int, tiles_per_sample: float, new_tokens: int) -> float:
    """FLOPs of the vision tower once per sample, the prompt's prefill and the answer per row, at MFU of an H100."""
    vision = 2 * model.vision_params_b * 1e9 * VIT_TOKENS * tiles_per_sample * samples
    lm = 2 * (model.params_b - model.vision_params_b) * 1e9
    text = lm * rows * (tiles_per_sample * TOKENS_PER_TILE + PROMPT_TOKENS + new_tokens)
    return (vision + text) / (GPU_TFLOPS * 1e12 * MFU) / 3600


def cluster_gpu() -> tuple[str | None, float | None]:
    """The accelerator type of the cluster's GPUs (Ray's `accelerator_type:X` node resource) and its memory in GiB:
    of the smallest where nodes differ (a replica may land on any); (None, None) without GPUs, no GiB if unknown."""
    import ray

    kinds = {key.split(":", 1)[1] for node in ray.nodes() if node.get("Alive") and node["Resources"].get("GPU")
             for key in node["Resources"] if key.startswith("accelerator_type:")}
    known = sorted((ACCELERATOR_GIB[k], k) for k in kinds if k in ACCELERATOR_GIB)
    if known:
        return known[0][1], known[0][0]
    return (", ".join(sorted(kinds)) or None), None


def gpu_memory(job: JobConfig) -> dict[str, Any] | None:
    """The GPU memory split of one vLLM replica on this cluster's GPUs (run/resources.replica_memory), as figures;
    None where there is none (transformers, replicas on CPU). A model that cannot fit raises JobError."""
    from pipeline.run.execute import cluster_resources

    try:
        resources = cluster_resources(job)
    except RunError:  # too few GPUs for the job: the run says so when it starts
        return None
    if resources.engine != "vllm" or not resources.on_gpu:
        return None
    accelerator, gib = cluster_gpu()
    config = checkpoint_config(job.model, storage=job.storage, revision=job.model_revision)
    split = replica_memory(job, resources, config=config, gpu_gib=gib)
    if split is None:
        return {"accelerator": accelerator, "note": "GPU memory or the model's config unknown to the plan; each "
                                                    "replica sizes vLLM's share when it loads"}
    return {"accelerator": accelerator, **split.figures(), "line": describe_split(split)}


def estimate_plan(job: JobConfig, plan: Any) -> dict[str, Any]:
    """Tiles, visual tokens and GPU-hours of the rows left to do, from up to SAMPLED samples' headers, and the GPU
    memory split of a vLLM replica."""
    memory = gpu_memory(job)
    rows = plan.inputs.samples.limit(SAMPLED).take_all() if plan.samples_todo else []
    with ThreadPoolExecutor(8) as pool:
        known = [t for t in pool.map(lambda r: sample_tiles(job, r), rows) if t is not None]
    mean = sum(known) / len(known) if known else None
    out: dict[str, Any] = {"sampled": len(known), "tiles_per_sample": round(mean, 2) if mean is not None else None,
                           "tiles": None, "visual_tokens": None, "gpu_hours": None, "model": None,
                           "gpu_memory": memory}
    if not plan.samples_todo:
        return {**out, "tiles": 0, "visual_tokens": 0, "gpu_hours": 0.0}
    if mean is None:
        return out
    out["tiles"] = round(mean * plan.samples_todo)
    out["visual_tokens"] = round(mean * TOKENS_PER_TILE * plan.rows_todo)
    model = find_model(job.model)
    if model is not None:
        new_tokens = 1 if job.task == "score" else job.generation.max_new_tokens
        out["model"] = model.name
        out["gpu_hours"] = round(gpu_hours(model, samples=plan.samples_todo, rows=plan.rows_todo, tiles_per_sample=mean,
                                           new_tokens=new_tokens), 3)
    return out


def describe_estimate(estimate: dict[str, Any]) -> str:
    """The estimate as one line, and the GPU memory split of a vLLM replica on a second where there is one."""
    memory = estimate.get("gpu_memory")
    split = "" if not memory else f"\nGPU memory of a vLLM replica ({memory['accelerator']}): {memory.get('line') or memory['note']}"
    if estimate.get("tiles") == 0:
        return "estimate: nothing left to do" + split
    if estimate.get("tiles") is None:
        return "estimate: no image header could be read from the samples left to do" + split
    line = (f"estimate: ~{estimate['tiles']} tiles ({estimate['tiles_per_sample']} a sample, from {estimate['sampled']} "
            f"headers), ~{estimate['visual_tokens']} visual tokens")
    if estimate.get("gpu_hours") is not None:
        line += f", ~{estimate['gpu_hours']} H100 GPU-hours for {estimate['model']} (at {MFU:.0%} of {GPU_TFLOPS:g} TFLOP/s)"
    return line + split
