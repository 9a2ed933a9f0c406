"""What the vLLM engine (vllm_engine.py) needs besides the engine itself: its vLLM plugin, vLLM's engine
arguments, loading only the vision tower and projector, the prefix cache's figures, and the private event loop
AsyncLLM lives on.

vLLM 0.32 refuses a batch of image embeddings of different sizes (its InternVL embedding schema has no dynamic
feature dimension, and the engine core dies on "inconsistent shapes"), which any two images of different tile
counts in one step are. `vllm_plugin` widens that schema; it must run in every vLLM process, so it is a vLLM general
plugin, registered in pyproject.toml:

    [project.entry-points."vllm.general_plugins"]
    internvl_batch = "pipeline.model.vllm_support:vllm_plugin"
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from pipeline.errors import ModelLoadError
from pipeline.model.device import DeviceChoice
from pipeline.model.vllm_start import check_vllm_version, cpu_defaults, log_errors_to_file

T = TypeVar("T")

# The vLLM engine options a job sets (compute.vllm); vLLM's own defaults apply to those it leaves out. Any other
# AsyncEngineArgs field is accepted here too (e.g. by the bench); an unknown name is refused.
VLLM_OPTIONS = (
    "gpu_memory_utilization", "max_num_seqs", "max_model_len", "enable_prefix_caching", "enable_chunked_prefill",
    "enforce_eager", "kv_cache_memory_bytes",
)
# Set by the engine itself: vLLM gets embeddings, never pixels.
FIXED_ARGS = {"enable_mm_embeds": True, "limit_mm_per_prompt": {"image": 0, "video": 0}}
# vllm-native's defaults: pictures in (a sample's images, or its video's frames, each an image), no video input.
NATIVE_ARGS = {"limit_mm_per_prompt": {"image": 16, "video": 0}}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
PLUGIN_GROUP = "vllm.general_plugins"


def vllm_plugin() -> None:
    """vLLM general plugin (run by vLLM in each of its processes): let one batch carry InternVL image embeddings of
    different sizes, by marking the total-feature-size dimension of vLLM's embedding schema dynamic; and send
    vLLM's errors where the replica can read them (vllm_start.ErrorLog)."""
    from typing import Annotated

    log_errors_to_file()
    check_vllm_version()

    from vllm.model_executor.models import interns1
    from vllm.utils.tensor_schema import TensorShape

    interns1.InternS1ImageEmbeddingInputs.__annotations__["data"] = Annotated[
        torch.Tensor | list[torch.Tensor], TensorShape("ni", "tifs", "hs", dynamic_dims={"tifs"})]


def check_plugin() -> None:
    """Fail at load, not at the first batch of mixed tile counts, when vLLM would not run vllm_plugin (or this vLLM
    lacks the class it patches)."""
    from importlib.metadata import entry_points

    import vllm.envs

    check_vllm_version()

    names = [ep.name for ep in entry_points(group=PLUGIN_GROUP) if ep.value == f"{__name__}:vllm_plugin"]
    if not names:
        raise ModelLoadError(f"vLLM engine: no {PLUGIN_GROUP!r} entry point runs {__name__}:vllm_plugin (install "
                             "internvl-batch with pip); without it mixed tile counts in one batch kill vLLM's engine")
    allowed = vllm.envs.VLLM_PLUGINS
    if allowed is not None and not set(names) & set(allowed):
        raise ModelLoadError(f"VLLM_PLUGINS={','.join(allowed)} leaves out this engine's vLLM plugin {names[0]!r}")


def engine_args(path: str, dtype: torch.dtype, options: Mapping[str, Any] | None = None, *, tp: int = 1,
                on_cpu: bool = False, embeddings: bool = True) -> Any:
    """AsyncEngineArgs for the checkpoint at path: the job's options over vLLM's defaults (on CPU, a KV cache that
    fits beside other processes: vllm_start.cpu_defaults), embeddings in (else pictures: NATIVE_ARGS), tp ranks as
    vLLM's own worker processes on this actor's GPUs (never Ray: the replica is one Ray Data actor)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown vLLM engine option(s) {', '.join(unknown)} (e.g. {', '.join(VLLM_OPTIONS)})")
    fixed_args = FIXED_ARGS if embeddings else {}
    fixed = sorted(set(options) & {*fixed_args, "tensor_parallel_size", "structured_outputs_config"})
    if fixed:
        raise ValueError(f"vLLM option(s) {', '.join(fixed)} are set by the engine (embeddings in; tp is compute.tp)")
    from vllm.config import StructuredOutputsConfig

    if on_cpu:
        import psutil

        options = cpu_defaults(options, available=psutil.virtual_memory().available)
    parallel = {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"} if tp > 1 else {}
    # schema answers (job key `schema`): xgrammar with no free whitespace, as model/constrained.py compiles them, so
    # greedy answers equal the transformers engine's; naming the backend stops a silent fallback to another one
    grammar = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
    chosen = {**options, **FIXED_ARGS} if embeddings else {**NATIVE_ARGS, **options}
    # disable_log_stats: no periodic stats lines; the engine's own stat logger still gets vLLM's statistics
    return AsyncEngineArgs(model=path, tokenizer=path, dtype=DTYPE_NAMES[dtype], disable_log_stats=True,
                           structured_outputs_config=grammar, **chosen, **parallel)


def vision_key(key: str) -> str | None:
    """A checkpoint tensor's name in InternVLModel if it belongs to the vision tower or projector, else None
    (transformers 5 saves `vision_tower.*`; other copies have `model.vision_tower.*`)."""
    name = key.removeprefix("model.")
    return name if name.startswith(VISION_PREFIXES) else None


def vision_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The vision tower's and projector's tensors of a native checkpoint, keyed as in InternVLModel; only the shards
    that hold them are opened, and of those only these tensors are read."""
    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({shard for key, shard in weight_map.items() if vision_key(key)})
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            for key in f.keys():
                if name := vision_key(key):
                    state[name] = f.get_tensor(key)
    if not state:
        raise ModelLoadError(f"checkpoint {str(path)!r} has no vision_tower / multi_modal_projector weights")
    return state


def load_vision(path: str | Path, plan: DeviceChoice) -> Any:
    """InternVLForConditionalGeneration with only its vision tower and projector: built on the meta device, the
    language model and lm_head deleted before anything is allocated, then the vision weights assigned, so the
    transformers language model never takes memory, on the device or on the host, whatever its size."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        net = AutoModelForImageTextToText.from_config(config, attn_implementation=plan.attn_implementation,
                                                      dtype=plan.dtype)
    del net.model.language_model, net.lm_head
    net.model.load_state_dict(vision_state_dict(path), strict=True, assign=True)
    left = [name for name, t in itertools.chain(net.named_parameters(), net.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"checkpoint {str(path)!r}: vision tensors not in the checkpoint: {', '.join(left[:5])}")
    return net.to(device=plan.device, dtype=plan.dtype).eval()


async def each_sample_prefilled_once(jobs: Sequence[Callable[[asyncio.Event | None], Awaitable[T]]],
                                     owners: Sequence[int]) -> list[T]:
    """Run one job per request (owners[i]: its sample) all at once, except that the other requests of a sample start
    only once its first request's prompt is in the KV cache: the event handed to that job (set once its first token
    is out; at the latest, when the job ends). A sample's only request gets no event.

    Why: vLLM looks a request up in the prefix cache once, when it first schedules it. A sample's questions sent
    together while other samples are in flight are all scheduled, each up to its image, before any has prefilled
    the image (the step's token budget goes to other samples' images), and then each prefills the image itself:
    measured on the lane, 3 questions on images of 1, 7 and 13 tiles in flight together took 25% of their prompt
    tokens from the cache, against 65% (the image prefilled once per sample) sent this way."""
    lead: dict[int, int] = {}
    for i, owner in enumerate(owners):
        lead.setdefault(owner, i)
    shared = {owner for owner in lead if list(owners).count(owner) > 1}
    ready = {owner: asyncio.Event() for owner in shared}

    async def run(i: int) -> T:
        owner = owners[i]
        if owner not in shared:
            return await jobs[i](None)
        if lead[owner] != i:
            await ready[owner].wait()
            return await jobs[i](None)
        try:
            return await jobs[i](ready[owner])
        finally:
            ready[owner].set()

    return list(await asyncio.gather(*(run(i) for i in range(len(jobs)))))


class PrefixCacheTally:
    """vLLM's prefix-cache statistics of one engine, summed: prompt tokens looked up (`queries`) and found in the
    cache (`hits`), as vLLM's own "prefix cache hit rate" counts them. Fed by the stat logger `stat_logger` makes
    (vLLM calls it on the engine's event loop with each step's scheduler statistics)."""

    def __init__(self) -> None:
        self.queries = 0
        self.hits = 0

    def stat_logger(self) -> Callable[..., Any]:
        """A vLLM stat-logger factory (AsyncLLM's `stat_loggers`) whose loggers add to this tally."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        tally = self

        class PrefixCacheLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                stats = getattr(scheduler_stats, "prefix_cache_stats", None)
                if stats is not None:
                    tally.queries += int(stats.queries)
                    tally.hits += int(stats.hits)

            def log_engine_initialized(self) -> None:
                pass

        return PrefixCacheLogger


class LoopThread:
    """A private asyncio loop in a daemon thread: AsyncLLM and all its requests live there, so any caller (a sync
    one, or another event loop such as a Ray Data async actor's) can use it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the loop and block until it is done (from any thread but the loop's own)."""
        return self._submit(coro).result()

    async def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the loop; await its result from another event loop."""
        return await asyncio.wrap_future(self._submit(coro))

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        if not self.thread.is_alive():  # a stopped loop would never run it: fail instead of waiting forever
            coro.close()
            raise RuntimeError("the vLLM engine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
