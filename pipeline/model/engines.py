"""Which language engine a replica runs, and loading it: transformers (`engine.InternVLEngine`) or vLLM
(`vllm_engine.VLLMEngine`: our vision tower, vLLM for the language model).

The choice is made once, on the driver, when the run is planned (run/resources.py), and travels to the model stage
with the job; `load` runs on the worker. No torch or vLLM at import.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pipeline.config import JobConfig
from pipeline.errors import JobError

Engine = Literal["transformers", "vllm"]
VLLM_INSTALL = "pip install 'internvl-batch[vllm]'"


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def choose_engine(setting: str, *, on_gpu: bool, vllm_installed: bool) -> Engine:
    """compute.engine for a run: `transformers` and `vllm` as asked (vllm must be installed); `auto` is vLLM when it
    is installed and the replicas are on GPUs, else transformers (CPU runs and the tiny models keep that path)."""
    if setting == "transformers":
        return "transformers"
    if setting == "vllm":
        if not vllm_installed:
            raise JobError(f"compute.engine: vllm, but vLLM is not installed here ({VLLM_INSTALL}), or use "
                           "compute.engine: transformers")
        return "vllm"
    if setting != "auto":
        raise JobError(f"compute.engine: unknown engine {setting!r} (auto, transformers or vllm)")
    return "vllm" if vllm_installed and on_gpu else "transformers"


def load(engine: Engine, job: JobConfig) -> Any:
    """The replica's engine of that kind, in this process (a tp > 1 transformers replica is run/replica.py's)."""
    common = dict(device=job.compute.device, dtype=job.compute.dtype, revision=job.model_revision,
                  cache_dir=job.model_cache, storage_options=job.storage, trust_remote_code=job.trust_remote_code)
    if engine == "vllm":
        from pipeline.model.gpu_memory import vllm_options  # on a GPU: vLLM's share beside our vision tower
        from pipeline.model.vllm_engine import VLLMEngine

        return VLLMEngine.load(job.model, tp=job.compute.tp, options=vllm_options(job), **common)
    from pipeline.model.engine import InternVLEngine

    return InternVLEngine.load(job.model, **common)
