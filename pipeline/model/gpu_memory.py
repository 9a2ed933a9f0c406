"""One GPU, two users, one budget: the replica's vision tower (ours, in the Ray actor's CUDA context) beside vLLM
(the language model and its KV cache, in vLLM's own processes).

vLLM takes `gpu_memory_utilization` of the whole GPU as if it were alone (its default, 0.92). `memory_split` gives
the vision side what it needs — this process's CUDA context, the tower's and projector's weights, and its activation
peak: one chunk of tiles through the tower (`InternVLEngine.image_features` runs VISION_CHUNK_TILES at a time, so the
peak does not grow with the batch) plus the features of every tile in flight — and hands vLLM the rest. It then
checks that vLLM's share holds the language model's weights per tp rank, vLLM's own runtime (its CUDA context and
graphs, the activations of its largest step) and a KV cache for one request of the longest length (vLLM refuses to
start without it). With tp > 1 the tower sits on the replica's first GPU only; vLLM's fraction is the same on every
rank, so that GPU decides.

Pure arithmetic over the checkpoint's config (shapes, never weights), in GiB; the figures are estimates, checked
against a GPU by bench/device_check.py. `docs/gpu-memory.md` holds the catalogue's table (`memory_table`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

GIB = 1024**3
VISION_CHUNK_TILES = 32  # tiles per vision forward: ~33k tokens, enough to keep an H100 busy
VLLM_DEFAULT_UTILIZATION = 0.92  # vLLM 0.32's default gpu_memory_utilization: never hand vLLM more than it asks
CUDA_CONTEXT_GIB = 0.75  # a process's CUDA context, cuBLAS workspace and kernels (torch 2.x, lazy module loading)
VLLM_GRAPHS_GIB = 1.0  # vLLM's CUDA-graph pool for its decode batch sizes
VLLM_STEP_TOKENS = 16384  # vLLM's largest default step (max_num_batched_tokens on H100/H200 and larger)
VLLM_MAX_SEQS = 1024  # vLLM's largest default max_num_seqs: its sampler's logits at start-up are this many rows
ALLOCATOR_SLACK = 1.2  # torch's caching allocator rounds and fragments blocks of varying size
# Memory the device reports (nvidia-smi's MiB / 1024), by Ray's accelerator type (the `accelerator_type:X` resource).
ACCELERATOR_GIB = {"H100": 79.6, "H200": 140.4, "A100-80G": 80.0, "A100-40G": 40.0, "H20": 95.6, "L40S": 45.0,
                   "L4": 22.5, "A10G": 22.5, "B200": 179.1, "GB200": 184.0, "T4": 15.0}


@dataclass(frozen=True)
class VisionShape:
    """An InternViT tower: transformer layers over (image_size / patch)^2 patches + a class token per tile."""

    width: int
    layers: int
    mlp: int
    heads: int
    image_size: int = 448
    patch: int = 14

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1

    def params(self) -> int:
        """Weights of the tower: attention and MLP with biases, two norms and two layer scales a layer, embeddings."""
        w, m = self.width, self.mlp
        layer = 4 * w * w + 4 * w + 2 * w * m + m + w + 6 * w
        return self.layers * layer + 3 * self.patch**2 * w + (self.tokens + 2) * w


@dataclass(frozen=True)
class LanguageShape:
    """A decoder-only language model as vLLM shards it over tp ranks."""

    vocab: int
    width: int
    mlp: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int  # max_position_embeddings: vLLM's max_model_len when the job sets none
    tied: bool = False

    def kv_heads_per_rank(self, tp: int) -> int:
        """vLLM splits the key/value heads over the ranks, or replicates them where there are fewer than tp."""
        return max(1, self.kv_heads // tp)

    def params_per_rank(self, tp: int) -> float:
        """Weights one tp rank holds: embeddings and lm_head split by vocabulary, q/o/MLP split, k/v per its heads."""
        q = self.heads * self.head_dim
        kv = 2 * self.width * self.head_dim * self.kv_heads_per_rank(tp)
        layer = (2 * self.width * q + 3 * self.width * self.mlp) / tp + kv + 2 * self.width
        return self.layers * layer + self.vocab * self.width * (1 if self.tied else 2) / tp

    def kv_bytes_per_token(self, tp: int, dtype_bytes: int) -> int:
        """KV cache bytes one token takes on one rank: keys and values of its heads in every layer."""
        return 2 * self.layers * self.kv_heads_per_rank(tp) * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class ModelShapes:
    """What the split needs of a checkpoint: its vision tower, its language model, and how they meet."""

    vision: VisionShape
    language: LanguageShape
    downsample: float = 0.5  # pixel shuffle: a tile's patches become tokens of 1 / downsample^2 times the width
    feature_layer: int = -1  # another layer than the last keeps every layer's hidden states in the forward

    @property
    def tokens_per_tile(self) -> int:
        return int((self.vision.image_size // self.vision.patch * self.downsample) ** 2)

    def projector_params(self) -> int:
        wide = int(self.vision.width / self.downsample**2)
        return 2 * wide + wide * self.language.width + self.language.width**2 + 2 * self.language.width


def _first(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), default)


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def shapes_from_config(config: Mapping[str, Any]) -> ModelShapes:
    """ModelShapes of a checkpoint's config.json: native transformers (`vision_config` + `text_config`) or original
    InternVL (`vision_config` + `llm_config`)."""
    v = config["vision_config"]
    t = config.get("text_config") or config["llm_config"]
    heads = int(t["num_attention_heads"])
    vision = VisionShape(width=int(v["hidden_size"]), layers=int(v["num_hidden_layers"]), mlp=int(v["intermediate_size"]),
                         heads=int(v["num_attention_heads"]), image_size=_side(v.get("image_size", 448)),
                         patch=_side(v.get("patch_size", 14)))
    language = LanguageShape(
        vocab=int(t["vocab_size"]), width=int(t["hidden_size"]), mlp=int(t["intermediate_size"]),
        layers=int(t["num_hidden_layers"]), heads=heads, kv_heads=int(_first(t, "num_key_value_heads", default=heads)),
        head_dim=int(_first(t, "head_dim", default=int(t["hidden_size"]) // heads)),
        context=int(_first(t, "max_position_embeddings", default=32768)),
        tied=bool(_first(t, "tie_word_embeddings", default=config.get("tie_word_embeddings", False))))
    return ModelShapes(vision, language, downsample=float(config.get("downsample_ratio", 0.5)),
                       feature_layer=int(_first(config, "vision_feature_layer", "select_layer", default=-1)))


@dataclass(frozen=True)
class MemorySplit:
    """One GPU of a vLLM replica, in GiB: what the vision side holds, the fraction vLLM gets, what that holds."""

    gpu_gib: float
    tp: int
    tiles_in_flight: int
    chunk_tiles: int
    context_gib: float  # this process's CUDA context
    vision_weights_gib: float  # tower + projector
    vision_peak_gib: float  # activations of one chunk + features of every tile in flight
    vllm_fraction: float  # gpu_memory_utilization
    vllm_gib: float
    language_gib: float  # language-model weights per rank
    vllm_runtime_gib: float  # vLLM's context, graphs, step activations and sampler
    kv_gib: float  # what is left for the KV cache
    kv_tokens: int
    min_kv_tokens: int  # one request of max_model_len
    fits: bool
    limit: str = ""  # what does not fit: "heads" (tp), "vision", "weights" or "kv"; "" where it fits
    reason: str = ""  # the same, in a sentence with its numbers

    @property
    def vision_gib(self) -> float:
        return self.context_gib + self.vision_weights_gib + self.vision_peak_gib

    def figures(self) -> dict[str, Any]:
        """The split as plain figures (`plan --json`, the device check)."""
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


def vision_peak_bytes(shapes: ModelShapes, *, tiles_in_flight: int, chunk_tiles: int, dtype_bytes: int) -> float:
    """Activation peak of the vision side: one chunk through the tower (the widest moment is the MLP: the residual,
    the normed input, fc1's output and its GELU, with room for the attention's q/k/v; SDPA and flash attention
    never hold the score matrix), normalised pixels of the chunk, the projector, and the features of every tile in
    flight, which stay on the device until their call's language model takes them."""
    v, d = shapes.vision, shapes.language.width
    chunk = min(chunk_tiles, tiles_in_flight)
    layer = v.tokens * (4 * v.width + 2 * v.mlp) * dtype_bytes
    if shapes.feature_layer != -1:  # transformers keeps every layer's output to pick one
        layer += v.layers * v.tokens * v.width * dtype_bytes
    pixels = v.image_size**2 * 3 * (1 + 4 + dtype_bytes)  # uint8 upload, float32 normalisation, model dtype
    projector = shapes.tokens_per_tile * (2 * int(v.width / shapes.downsample**2) + 2 * d) * dtype_bytes
    features = tiles_in_flight * shapes.tokens_per_tile * d * dtype_bytes
    return chunk * (layer + pixels + projector) * ALLOCATOR_SLACK + features


def vllm_runtime_bytes(language: LanguageShape, *, tp: int, dtype_bytes: int, step_tokens: int, max_seqs: int) -> float:
    """What vLLM holds besides weights and KV cache: its process's CUDA context, its CUDA graphs, the activations of
    its largest step (profiled at start-up) and its sampler's float32 logits for max_seqs rows."""
    hidden = step_tokens * (4 * language.width + (2 * language.mlp + 2 * language.heads * language.head_dim) / tp)
    sampler = 2 * max_seqs * language.vocab * 4
    return (CUDA_CONTEXT_GIB + VLLM_GRAPHS_GIB) * GIB + hidden * dtype_bytes + sampler


def memory_split(shapes: ModelShapes, *, gpu_gib: float, tp: int = 1, dtype_bytes: int = 2, tiles_in_flight: int,
                 min_kv_tokens: int, chunk_tiles: int = VISION_CHUNK_TILES, utilization: float | None = None,
                 kv_cache_gib: float | None = None, share: float = 1.0, step_tokens: int = VLLM_STEP_TOKENS,
                 max_seqs: int = VLLM_MAX_SEQS) -> MemorySplit:
    """The split of one GPU between the vision side and vLLM, and whether the model fits.

    utilization: the job's own compute.vllm.gpu_memory_utilization (checked, not chosen); kv_cache_gib: the job's
    kv_cache_memory_bytes (vLLM then sizes the KV cache by it instead of by the fraction); share: the part of the
    GPU this replica may use (compute.gpus_per_replica below 1: several replicas on one GPU).
    """
    weights = (shapes.vision.params() + shapes.projector_params()) * dtype_bytes / GIB
    peak = vision_peak_bytes(shapes, tiles_in_flight=tiles_in_flight, chunk_tiles=chunk_tiles,
                             dtype_bytes=dtype_bytes) / GIB
    ours = CUDA_CONTEXT_GIB + weights + peak
    usable = gpu_gib * min(share, 1.0)
    if utilization is None:
        utilization = max(0.0, min(VLLM_DEFAULT_UTILIZATION, math.floor((usable - ours) / gpu_gib * 100) / 100))
    language = shapes.language.params_per_rank(tp) * dtype_bytes / GIB
    runtime = vllm_runtime_bytes(shapes.language, tp=tp, dtype_bytes=dtype_bytes, step_tokens=step_tokens,
                                 max_seqs=max_seqs) / GIB
    vllm = utilization * gpu_gib
    kv = kv_cache_gib if kv_cache_gib is not None else vllm - language - runtime
    per_token = shapes.language.kv_bytes_per_token(tp, dtype_bytes)
    kv_tokens = max(0, int(kv * GIB // per_token))
    need_kv = min_kv_tokens * per_token / GIB
    limit, reason = "", ""
    lm = shapes.language
    if lm.heads % tp or (lm.kv_heads % tp and tp % lm.kv_heads):
        limit = "heads"
        what = f"{lm.heads} attention heads" if lm.heads % tp else f"{lm.kv_heads} key/value heads"
        reason = f"vLLM cannot split the language model's {what} over tp={tp} ranks"
    elif kv_cache_gib is None and ours > usable - vllm:
        limit = "vision"
        reason = (f"the vision side needs {ours:.1f} GiB but gpu_memory_utilization {utilization:.2f} leaves it "
                  f"{max(usable - vllm, 0):.1f} GiB")
    elif language + runtime > (vllm if kv_cache_gib is None else usable - ours):
        limit = "weights"
        reason = (f"the language model ({language:.1f} GiB a rank) and vLLM's runtime ({runtime:.1f} GiB) do not fit "
                  f"in vLLM's {vllm if kv_cache_gib is None else usable - ours:.1f} GiB")
    elif kv_tokens < min_kv_tokens or (kv_cache_gib is not None and ours + language + runtime + kv > usable):
        limit = "kv"
        reason = (f"the language model ({language:.1f} GiB a rank) and vLLM's runtime ({runtime:.1f} GiB) leave "
                  f"{max(kv, 0):.1f} GiB for the KV cache; one request of {min_kv_tokens:,} tokens needs {need_kv:.1f} GiB")
    return MemorySplit(gpu_gib=gpu_gib, tp=tp, tiles_in_flight=tiles_in_flight, chunk_tiles=chunk_tiles,
                       context_gib=CUDA_CONTEXT_GIB, vision_weights_gib=weights, vision_peak_gib=peak,
                       vllm_fraction=utilization, vllm_gib=vllm, language_gib=language, vllm_runtime_gib=runtime,
                       kv_gib=kv, kv_tokens=kv_tokens, min_kv_tokens=min_kv_tokens, fits=not limit, limit=limit, reason=reason)


def describe_split(split: MemorySplit) -> str:
    """One line: what the vision side takes, vLLM's fraction and what it holds."""
    tp = f", tp={split.tp}" if split.tp > 1 else ""
    return (f"{split.gpu_gib:g} GiB a GPU{tp}: vision tower {split.vision_weights_gib:.1f} GiB + activations "
            f"{split.vision_peak_gib:.1f} GiB ({split.tiles_in_flight} tiles in flight, {split.chunk_tiles} at a time) "
            f"+ CUDA context {split.context_gib:.2f} GiB; vLLM gpu_memory_utilization {split.vllm_fraction:.2f} "
            f"({split.vllm_gib:.1f} GiB): language model {split.language_gib:.1f} GiB a rank + runtime "
            f"{split.vllm_runtime_gib:.1f} GiB + KV cache {max(split.kv_gib, 0):.1f} GiB ({split.kv_tokens:,} tokens; "
            f"one request of max_model_len needs {split.min_kv_tokens:,})")


# -- a job's split: its batches, tiles and vLLM keys; at load, this GPU and the checkpoint's config -----------------


def largest_sample_tiles(job: Any) -> int:
    """The most tiles one sample of the job can have: max_tiles + thumbnail, or a video's frames x tiles each."""
    per_frame = job.video.tiles_per_frame + (job.tiling.thumbnail and job.video.tiles_per_frame > 1)
    return max(job.tiling.max_tiles + job.tiling.thumbnail, job.video.num_frames * per_frame)


def split_for_job(job: Any, config: Mapping[str, Any], gpu_gib: float) -> MemorySplit:
    """memory_split for a job (a JobConfig) on a GPU of gpu_gib: tiles in flight are batch_size x the largest sample
    x compute.vllm.max_concurrent_batches; the KV cache must hold one request of compute.vllm.max_model_len (default:
    the model's context, as vLLM does); compute.vllm's gpu_memory_utilization and kv_cache_memory_bytes are kept;
    compute.gpus_per_replica below 1 gives the replica that part of the GPU."""
    shapes = shapes_from_config(config)
    options = job.compute.vllm
    return memory_split(
        shapes, gpu_gib=gpu_gib, tp=job.compute.tp, dtype_bytes=4 if job.compute.dtype == "float32" else 2,
        tiles_in_flight=job.compute.batch_size * largest_sample_tiles(job) * options.max_concurrent_batches,
        min_kv_tokens=options.max_model_len or shapes.language.context, utilization=options.gpu_memory_utilization,
        kv_cache_gib=options.kv_cache_memory_bytes / GIB if options.kv_cache_memory_bytes else None,
        share=job.compute.gpus_per_replica if job.compute.tp == 1 else 1.0, max_seqs=options.max_num_seqs or VLLM_MAX_SEQS)


def checkpoint_config(model: str, *, storage: Mapping[str, Any] | None = None, revision: str | None = None
                      ) -> dict[str, Any] | None:
    """A checkpoint's config.json without its weights: a local folder's, a remote prefix's, a hub id's (one small
    download, cached), else the catalogue's shapes for a model it names (model/catalog.py); None if none is known."""
    import json
    from pathlib import Path

    from pipeline.io.storage import get_filesystem, is_remote
    from pipeline.model.catalog import find_model

    try:
        if is_remote(model):
            fs, path = get_filesystem(model, storage)
            return json.loads(fs.cat_file(f"{path.rstrip('/')}/config.json"))
        local = Path(model.removeprefix("file://")).expanduser()
        if local.exists():
            return json.loads((local / "config.json").read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "config.json", revision=revision)).read_text())
    except Exception:  # noqa: BLE001 - offline, gated, no such file: the catalogue may still know the model
        known = find_model(model)
        return known.config() if known is not None else None


def vllm_options(job: Any) -> dict[str, Any]:
    """The vLLM engine options of a replica: compute.vllm's, and where the job leaves gpu_memory_utilization unset
    and the replica is on a CUDA GPU, the fraction memory_split leaves vLLM on this GPU beside the vision tower."""
    options = job.compute.vllm.engine_options()
    if "gpu_memory_utilization" in options:
        return options
    from pipeline.model.device import local_plan

    if local_plan(job.compute.device, job.compute.dtype).device != "cuda":
        return options
    config = checkpoint_config(job.model, storage=job.storage, revision=job.model_revision)
    if config is not None:
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
        split = split_for_job(job, config, total)
        if not split.fits:
            from pipeline.errors import ModelLoadError

            raise ModelLoadError(f"model {job.model!r} does not fit this GPU beside its vision tower: {split.reason} "
                                 f"({describe_split(split)}); use a larger compute.tp, or set compute.vllm.max_model_len")
        options["gpu_memory_utilization"] = split.vllm_fraction
    return options


MEMORY_GPUS = {"80 GB": 79.6, "141 GB": 140.4}  # H100 / A100 80 GB and H200, as the devices report them (GiB)
MEMORY_TPS = (1, 2, 4, 8)


def memory_table() -> list[dict[str, str]]:
    """docs/gpu-memory.md's table: per catalogue model, the vision side (weights + activation peak) and, per GPU and
    tp, vLLM's gpu_memory_utilization and the KV cache left (GiB), or what does not fit; for a job with the
    defaults (batch 8, 12 tiles + thumbnail, 4 batches in flight, bf16, max_model_len = the model's context)."""
    from pipeline.config import parse_job
    from pipeline.model.catalog import MODELS

    rows = []
    for m in MODELS:
        row: dict[str, str] = {"model": m.name}
        for gpu, gib in MEMORY_GPUS.items():
            for tp in MEMORY_TPS:
                job = parse_job({"task": "caption", "input": "in", "output": "out", "model": m.name, "compute": {"tp": tp}})
                split = split_for_job(job, m.config(), gib)
                if "vision GiB" not in row:
                    row["vision GiB"] = f"{split.vision_weights_gib:.1f} + {split.vision_peak_gib:.1f}"
                row[f"{gpu} tp={tp}"] = (f"{split.vllm_fraction:.2f}, KV {split.kv_gib:.0f}" if split.fits
                                         else f"no ({split.limit})")
        rows.append(row)
    return rows
