"""The one place that decides where a replica runs: GPU or CPU, its dtype and attention kernel.

`compute.device: auto` means CUDA when GPUs are there, else CPU; the run plan (counting the cluster's GPUs), the
tensor-parallel launcher and each replica (looking at its own devices) all ask `wants_gpu`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ModelLoadError


def wants_gpu(device: str, *, gpus_available: float) -> bool:
    """Whether a job's compute.device puts replicas on GPUs, given how many GPUs there are (cluster or process)."""
    return device == "cuda" or (device == "auto" and gpus_available > 0)


@dataclass(frozen=True)
class DeviceChoice:
    """Where and how a replica runs."""

    device: str
    dtype: Any  # torch.dtype
    attn_implementation: str


def plan_device(device: str = "auto", dtype: str = "auto", *, cuda_available: bool, flash_attn_available: bool) -> DeviceChoice:
    """bf16 + flash_attention_2 (when installed) on GPU, fp32 + sdpa on CPU, unless the job says otherwise."""
    import torch

    if device == "cuda" and not cuda_available:
        raise ModelLoadError("compute.device is 'cuda' but no CUDA device is visible to this replica")
    use_cuda = wants_gpu(device, gpus_available=float(cuda_available))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    resolved = dtypes[dtype] if dtype != "auto" else (torch.bfloat16 if use_cuda else torch.float32)
    attn = "flash_attention_2" if use_cuda and flash_attn_available and resolved != torch.float32 else "sdpa"
    return DeviceChoice(device="cuda" if use_cuda else "cpu", dtype=resolved, attn_implementation=attn)


def local_plan(device: str = "auto", dtype: str = "auto") -> DeviceChoice:
    """plan_device for this process's hardware."""
    import torch

    return plan_device(device, dtype, cuda_available=torch.cuda.is_available(),
                       flash_attn_available=importlib.util.find_spec("flash_attn") is not None)
