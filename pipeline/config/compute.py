"""The job's `compute` section: replicas, batching, devices and the language engine's options."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.sections import _Section

# Model batches: 8 samples on transformers (a batch is one padded generate call); on vLLM, 32 samples and 8 batches in
# flight, Ray Data LLM's defaults: measured in docs/vllm-runtime.md (bench/vllm_inflight.py).
TRANSFORMERS_BATCH_SIZE = 8
VLLM_BATCH_SIZE = 32
VLLM_CONCURRENT_BATCHES = 8


class VLLMConfig(_Section):
    """vLLM engine options (compute.engine vllm, or auto on GPUs with vLLM installed); vLLM's own defaults apply
    where a field is left unset. Not part of the fingerprint: both engines give the same greedy tokens."""

    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of the replica's GPU memory vLLM may take for weights, activations "
                                      "and KV cache (vLLM's default 0.92; lower it when sharing a GPU).")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences in one vLLM scheduler step (vLLM's default).")
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + answer in tokens (default: the checkpoint's limit); a 13-tile "
                                "image alone is 3,328 image tokens.")
    enable_prefix_caching: bool | None = Field(
        None, description="Reuse the KV blocks of a shared prefix (several questions on one image); vLLM's default is on.")
    enable_chunked_prefill: bool | None = Field(None, description="Split long prefills across scheduler steps (vLLM's default).")
    enforce_eager: bool = Field(False, description="No CUDA graphs or torch.compile: faster start, slower steps.")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache size in bytes, instead of what gpu_memory_utilization leaves (CPU runs).")
    max_concurrent_batches: int = Field(
        VLLM_CONCURRENT_BATCHES, ge=1, le=64,
        description="Ray Data batches in flight per replica at once, so vLLM's continuous batching never drains "
                    "between batches (with compute.batch_size: the samples a replica has in flight; "
                    "docs/vllm-runtime.md).")

    def engine_options(self) -> dict[str, Any]:
        """The vLLM engine arguments this section sets (unset fields left to vLLM)."""
        return self.model_dump(exclude={"max_concurrent_batches"}, exclude_none=True)


class ComputeConfig(_Section):
    replicas: int | tuple[int, int] = Field(
        1, description="Model replicas, each holding one copy of the model: a number, or [min, max] to autoscale.")
    tp: int = Field(1, ge=1, le=64, description="Tensor-parallel degree: devices (and processes) per replica, on one node.")
    batch_size: int | None = Field(
        None, ge=1, description=f"Samples per model batch in one replica (default: {TRANSFORMERS_BATCH_SIZE} on "
                                f"transformers, {VLLM_BATCH_SIZE} on vLLM, which keeps compute.vllm.max_concurrent_batches "
                                "of them in flight).")
    max_batch_tokens: int | None = Field(
        None, ge=1, description="Token budget of one generate call: a replica's batch is split into calls of samples "
                                "of similar length whose padded prompt tokens fit, none padded by more than 25% (default: one call).")
    cpu_workers: int | None = Field(None, ge=1, description="Concurrent CPU preprocessing tasks (default: cluster CPUs not used by replicas).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses CUDA when a GPU is visible, else CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU.")
    gpus_per_replica: float = Field(1.0, gt=0, description="GPUs requested per replica when device is cuda (tp > 1: one per rank).")
    engine: Literal["auto", "transformers", "vllm", "vllm-native"] = Field(
        "auto", description="Language engine: transformers, or vLLM (continuous batching; `pip install "
                            "'internvl-batch[vllm]'`); auto: vLLM when it is installed and replicas are on GPUs. "
                            "vllm-native: vLLM's own InternVL path (pictures in, vLLM tiles and encodes them), the "
                            "baseline to compare with.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="vLLM engine options.")
    object_store_mb: int | None = Field(
        None, ge=64, description="Ray object-store memory the run's queues may hold (default: 8 model batches of the "
                                 "largest samples per replica, at least 256 MiB, at most half the cluster's object "
                                 "store): bounds memory however large the input.")

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"need a number >= 1 or [min, max] with 1 <= min <= max, got {list(value) if isinstance(value, tuple) else value}")
        return value

    @model_validator(mode="after")
    def _tp(self) -> ComputeConfig:
        if self.tp > 1 and self.gpus_per_replica != 1.0:
            raise ValueError("gpus_per_replica: with tp > 1 every rank holds one whole GPU; leave gpus_per_replica at 1")
        return self

    def batch_size_for(self, engine: str) -> int:
        """Samples per model batch on that engine: compute.batch_size, else the engine's default."""
        if self.batch_size is not None:
            return self.batch_size
        return TRANSFORMERS_BATCH_SIZE if engine == "transformers" else VLLM_BATCH_SIZE

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) replicas; equal for a fixed count."""
        return (self.replicas, self.replicas) if isinstance(self.replicas, int) else tuple(self.replicas)
