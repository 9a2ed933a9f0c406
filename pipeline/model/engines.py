"""Which language engine a replica runs, and loading it: transformers (`engine.InternVLEngine`), vLLM behind our
tiles and vision tower (`vllm_engine.VLLMEngine`), or vLLM's own InternVL path (`vllm_native.VLLMNativeEngine`:
pictures in, vLLM tiles and encodes them; the peers' baseline).

The choice is made once, on the driver, when the run is planned (run/resources.py), and travels to the model stage
with the job; `load` runs on the worker. No torch or vLLM at import.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pipeline.config import JobConfig
from pipeline.errors import JobError

Engine = Literal["transformers", "vllm", "vllm-native"]
ENGINES = ("transformers", "vllm", "vllm-native")
VLLM_ENGINES = ("vllm", "vllm-native")  # vLLM serves the replica: an async model stage, vLLM's own processes
VLLM_INSTALL = "pip install 'internvl-batch[vllm]'"


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def choose_engine(setting: str, *, on_gpu: bool, vllm_installed: bool) -> Engine:
    """compute.engine for a run: `transformers`, `vllm` and `vllm-native` as asked (the vLLM ones need vLLM
    installed); `auto` is vLLM when it is installed and the replicas are on GPUs, else transformers (CPU runs and the
    tiny models keep that path). `vllm-native` is never chosen for you: it is the baseline to compare with."""
    if setting == "transformers":
        return "transformers"
    if setting in VLLM_ENGINES:
        if not vllm_installed:
            raise JobError(f"compute.engine: {setting}, but vLLM is not installed here ({VLLM_INSTALL}), or use "
                           "compute.engine: transformers")
        return setting  # type: ignore[return-value]
    if setting != "auto":
        raise JobError(f"compute.engine: unknown engine {setting!r} (auto, {', '.join(ENGINES)})")
    return "vllm" if vllm_installed and on_gpu else "transformers"


def load(engine: Engine, job: JobConfig) -> Any:
    """The replica's engine of that kind, in this process (a tp > 1 transformers replica is run/replica.py's)."""
    common = dict(device=job.compute.device, dtype=job.compute.dtype, revision=job.model_revision,
                  cache_dir=job.model_cache, storage_options=job.storage, trust_remote_code=job.trust_remote_code)
    if engine == "vllm":
        from pipeline.model.gpu_memory import vllm_options  # on a GPU: vLLM's share beside our vision tower
        from pipeline.model.vllm_engine import VLLMEngine

        return VLLMEngine.load(job.model, tp=job.compute.tp, options=vllm_options(job), **common)
    if engine == "vllm-native":
        from pipeline.model.vllm_native import VLLMNativeEngine

        return VLLMNativeEngine.load(job.model, tp=job.compute.tp, options=job.compute.vllm.engine_options(),
                                     tiling=job.tiling, video=job.video, **common)
    from pipeline.model.transformers_engine import InternVLEngine

    return InternVLEngine.load(job.model, **common)
