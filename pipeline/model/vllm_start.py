"""Starting vLLM's engine as a replica needs it: a CPU memory budget that starts beside other processes, tensor-
parallel ranks bound to CPUs on a one-NUMA-node machine, the vLLM version checked, and a failed start (or a death)
explained by the root cause vLLM logged and the compute.vllm key that fixes it.

Why a log file: vLLM's engine core and workers are processes of their own; when one fails to start, the replica's
process only gets "Engine core initialization failed. See root cause above", the cause being in the other process's
log lines. `vllm_support.vllm_plugin` (run by vLLM in each of its processes) adds a handler for vLLM's ERROR records
writing to the file that ERRORS_ENV names; `ErrorLog` makes that file and reads the cause back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ModelLoadError

ERRORS_ENV = "INTERNVL_BATCH_VLLM_ERRORS"
# The vLLM releases this engine is tested with (the vLLM lane) and pinned to in pyproject's `vllm` extra: the
# plugin patches a private class of vLLM's (interns1.InternS1ImageEmbeddingInputs).
VLLM_RANGE = ">=0.32,<0.33"
# CPU runs with neither kv_cache_memory_bytes nor gpu_memory_utilization: a KV cache of a quarter of the memory
# available at start, at most 4 GiB (vLLM's old CPU default, VLLM_CPU_KVCACHE_SPACE), instead of vLLM's default
# of 92% of the host's RAM, which refuses to start whenever anything else holds memory.
CPU_KV_CACHE_SHARE = 0.25
CPU_KV_CACHE_MAX = 4 << 30
CPU_KV_CACHE_MIN = 64 << 20

_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")
# vLLM's wrappers around the real cause (the engine core or a worker raised it in its own process)
_WRAPPERS = re.compile(r"initialization failed|See (?:the )?(?:root cause|stack trace)|EngineCore encountered")
# root cause (a pattern of vLLM's message) -> what fixes it, in this job's keys
START_FIXES: tuple[tuple[str, str], ...] = (
    (r"less than desired (?:CPU|GPU) memory utilization",
     ("other processes hold memory: lower compute.vllm.gpu_memory_utilization (the share of the device's memory "
      "vLLM reserves; on CPU, of the host's RAM) or set compute.vllm.kv_cache_memory_bytes")),
    (r"less than requested memory for kv",
     "not enough memory for the KV cache: lower compute.vllm.kv_cache_memory_bytes (or gpu_memory_utilization)"),
    (r"max seq len|maximum model length",
     ("the KV cache cannot hold one full-length request: lower compute.vllm.max_model_len, or give the KV cache "
      "more memory (compute.vllm.kv_cache_memory_bytes or gpu_memory_utilization)")),
    (r"No available memory for the cache blocks",
     "not enough memory for the KV cache: set compute.vllm.kv_cache_memory_bytes or raise gpu_memory_utilization"),
    (r"out of memory|OutOfMemory",
     ("out of device memory: lower compute.vllm.gpu_memory_utilization (room for the vision tower beside vLLM) or "
      "compute.vllm.max_num_seqs")),
    (r"NUMA nodes to bind",
     "tensor parallel on CPU: set VLLM_CPU_OMP_THREADS_BIND (e.g. 0-7|8-15), or lower compute.tp"),
)


def cpu_kv_cache_bytes(available: int) -> int:
    """The default KV cache of a CPU replica: CPU_KV_CACHE_SHARE of the memory available, within its bounds."""
    return int(max(CPU_KV_CACHE_MIN, min(CPU_KV_CACHE_MAX, available * CPU_KV_CACHE_SHARE)))


def cpu_defaults(options: Mapping[str, Any], *, available: int) -> dict[str, Any]:
    """Engine options for a CPU replica: a KV cache that fits beside other processes unless the job sized it."""
    options = dict(options)
    if options.get("kv_cache_memory_bytes") is None and options.get("gpu_memory_utilization") is None:
        options["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(available)
    return options


def thread_binding(cpus: Sequence[int], tp: int, numa_nodes: int) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for tp CPU workers where vLLM's own binding (one NUMA node per rank) cannot work:
    the allowed CPUs cut into tp contiguous groups (`0-3|4-7`), ranks sharing a CPU when there are fewer CPUs
    than ranks; None where vLLM's binding works (tp 1, or a NUMA node per rank)."""
    if tp <= 1 or numa_nodes >= tp or not cpus:
        return None
    cpus = sorted(cpus)
    size = max(1, len(cpus) // tp)
    groups = [cpus[r * size:(r + 1) * size] if len(cpus) >= tp else [cpus[r % len(cpus)]] for r in range(tp)]
    return "|".join(",".join(map(str, group)) for group in groups)


def cpu_environment(tp: int) -> dict[str, str]:
    """Environment variables vLLM's CPU processes need for this replica (set before the engine starts)."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return {}
    import vllm.utils.cpu_resource_utils as cpu_resources

    binding = thread_binding(sorted(os.sched_getaffinity(0)), tp, len(cpu_resources.get_visible_memory_node()))
    return {"VLLM_CPU_OMP_THREADS_BIND": binding} if binding else {}


def check_vllm_version() -> None:
    """Fail at load, naming the installed vLLM, when the private class the plugin patches is not there."""
    import vllm
    from vllm.model_executor.models import interns1

    if not hasattr(interns1, "InternS1ImageEmbeddingInputs"):
        raise ModelLoadError(f"vLLM {vllm.__version__} is not supported: the engine's vLLM plugin patches "
                             "vllm.model_executor.models.interns1.InternS1ImageEmbeddingInputs, which this vLLM does "
                             f"not have; install vllm{VLLM_RANGE} (pip install 'internvl-batch[vllm]')")


def log_errors_to_file() -> None:
    """In a vLLM process (from the plugin): append vLLM's ERROR records to the file ERRORS_ENV names, if any."""
    path = os.environ.get(ERRORS_ENV)
    if not path:
        return
    import vllm.logger  # noqa: F401 - vLLM configures its logger at import, which would drop a handler added before

    logger = logging.getLogger("vllm")
    for handler in list(logger.handlers):
        if getattr(handler, "internvl_batch", None) is not None:
            if handler.internvl_batch == path:
                return
            logger.removeHandler(handler)  # an earlier engine's, in this process
    handler = logging.FileHandler(path, delay=True)
    handler.setLevel(logging.ERROR)
    handler.internvl_batch = path  # type: ignore[attr-defined]
    logger.addHandler(handler)


def root_cause(log: str) -> str | None:
    """The first exception line of vLLM's error log that is not one of its wrappers ("See root cause above")."""
    found = [m.group(1) + ": " + m.group(2) for m in map(_EXCEPTION_LINE.match, map(str.strip, log.splitlines())) if m]
    real = [line for line in found if not _WRAPPERS.search(line)]
    return (real or found or [None])[0]


def explain(cause: str | None, error: BaseException) -> str:
    """One line: what vLLM said went wrong (its root cause, else the error the replica got) and the key to change."""
    said = cause or f"{type(error).__name__}: {error}".strip()
    fixes = [fix for pattern, fix in START_FIXES if re.search(pattern, said)]
    return " ".join(said.split()) + (f" -> {fixes[0]}" if fixes else "")


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Environment variables set while vLLM starts its processes (they inherit them), restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class ErrorLog:
    """The file vLLM's processes write their errors to while this engine lives (`env` goes in the environment
    while the engine starts: its processes inherit it), read back for a failed start or a dead engine."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="internvl-batch-vllm-", suffix=".log")
        os.close(fd)
        self.path = Path(name)
        self.env = {ERRORS_ENV: name}

    def cause(self) -> str | None:
        """The root cause in what vLLM's processes have logged so far."""
        try:
            return root_cause(self.path.read_text(errors="replace"))
        except OSError:
            return None

    def start_failed(self, error: BaseException) -> ModelLoadError:
        """The error a replica raises when vLLM's engine did not start: vLLM's root cause and the fix."""
        return ModelLoadError(f"vLLM's engine did not start: {explain(self.cause(), error)}")

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
