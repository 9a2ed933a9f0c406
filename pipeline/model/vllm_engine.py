"""A vLLM-backed replica: our tiles and our vision tower (transformers), vLLM for the language model and KV cache.

The interface is InternVLEngine's (`prompt_ids`, `generate`, `score`, `tokenizer`, `close`), plus `generate_async`
and `score_async` for a model stage that keeps several batches in flight (stages/model_stage.AsyncStage).

- Vision: the checkpoint's vision tower and projector only (vllm_support.load_vision). Tiles are normalised and
  encoded by InternVLEngine's own `normalize` / `image_features` (borrowed below), so features are the
  transformers engine's, bit for bit; the vision pass runs in a thread of its own while vLLM keeps stepping.
- Language: vLLM's AsyncLLM serves the same native checkpoint with `enable_mm_embeds=True` and
  `limit_mm_per_prompt={"image": 0, "video": 0}`, so it builds no vision tower of its own. A prompt goes in as token
  ids with ONE `<IMG_CONTEXT>` per image (a video frame is an image: `Frame1: <IMG_CONTEXT>\\n...`) and one
  `(tiles x 256, hidden)` embedding per image; vLLM expands each to `<img>` + 256 x tiles `<IMG_CONTEXT>` + `</img>`,
  which gives back exactly the ids `prompt_ids` builds. Several questions on one sample share the image's KV blocks
  through automatic prefix caching (vLLM hashes the embedding): a sample's first prompt goes first and its others
  follow once it is prefilled (vllm_support.each_sample_prefilled_once), or they would race past the cache.
- Sampling: each prompt gets its own `SamplingParams(seed=...)` from `seeds`, so a sampled answer depends only on
  its seed, never on what else is in flight. top_k follows the checkpoint's generation_config, or transformers'
  default of 50, as InternVLEngine samples. Per-prompt options are built in one place (`_params`).
- Scoring: log P(label, then the end of the answer) from `logprob_token_ids` at the sampled position (as
  scoring.answer_logprob), one request per distinct label prefix,
  deeper prefixes after shallower ones so that they read the prompt's KV from the prefix cache. (Prompt log-probs
  with `skip_reading_prefix_cache=False` are unsafe: positions the cache covered come back as uninitialised memory,
  which happens when the prompt length is a multiple of the block size.)
- Tensor parallel: `tp` ranks are vLLM's own worker processes (mp executor) on the GPUs Ray gave this actor.

AsyncLLM runs on a private event loop in a background thread (vllm_support.LoopThread): `generate` blocks on it,
`generate_async` awaits it from any other loop. vLLM's engine core always runs in a process of its own (spawned on
CPU, or once CUDA is initialised: the main module must be import-safe); VLLM_ENABLE_V1_MULTIPROCESSING=0 only keeps
the model in that process instead of one more worker process.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import uuid
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.errors import ModelLoadError
from pipeline.media.tiling import IMAGENET_MEAN, IMAGENET_STD
from pipeline.model.device import DeviceChoice
from pipeline.model.transformers_engine import (
    Generation,
    InternVLEngine,
    Prompter,
    context_length,
    loading,
    open_checkpoint,
    require_chat_template,
)
from pipeline.model.processor_files import has_processor
from pipeline.model.sampling import TRANSFORMERS_TOP_K
from pipeline.model.scoring import logsumexp
from pipeline.model.vllm_start import ErrorLog, cpu_environment, environment
from pipeline.model.vllm_support import (
    LoopThread,
    PrefixCacheTally,
    check_plugin,
    each_sample_prefilled_once,
    engine_args,
    load_vision,
)


class VLLMEngine(Prompter):
    """One replica: vision tower + projector (transformers) on this process's device, vLLM for the language model."""

    # InternVLEngine's tile normalisation and vision pass, unchanged (they use only self.model / plan / _mean / _std).
    normalize = InternVLEngine.normalize
    image_features = InternVLEngine.image_features

    embeddings = True  # vLLM gets image embeddings (ours), never pixels

    def __init__(self, config: Any, tokenizer: Any, plan: DeviceChoice, path: str, *, vision: Any = None,
                 options: Mapping[str, Any] | None = None, tp: int = 1) -> None:
        from transformers import GenerationConfig

        super().__init__(tokenizer, int(getattr(config, "image_seq_length", 256)), context_length(config))
        self.model = vision
        self.plan = plan
        self.path = path
        ids = tokenizer.convert_tokens_to_ids
        self.context_id = ids(self.image_tokens.context)
        self.start_id, self.end_id = ids(self.image_tokens.start), ids(self.image_tokens.end)
        if self.context_id != config.image_token_id:
            raise ModelLoadError(f"tokenizer's image token {self.image_tokens.context!r} has id {self.context_id}, "
                                 f"but the model expects image_token_id {config.image_token_id}")
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json
            generation = GenerationConfig()
        eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.top_k = generation.top_k if generation.top_k is not None else TRANSFORMERS_TOP_K
        self.vocab_size = int(config.text_config.vocab_size)
        self._blocked: dict[int, float] | None = None  # token ids a schema answer may not use (made at the first schema)
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=plan.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=plan.device).view(1, 3, 1, 1)
        if self.embeddings:
            check_plugin()
        on_cpu = plan.device == "cpu"
        args = engine_args(path, plan.dtype, options, tp=tp, on_cpu=on_cpu, embeddings=self.embeddings)
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]  # request ids unique across replicas' logs
        self.prefix_cache = PrefixCacheTally()
        self.errors = ErrorLog()
        self._vision_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision")
        self._loop = LoopThread()
        try:
            with environment({**self.errors.env, **(cpu_environment(tp) if on_cpu else {})}):
                try:  # built on its loop, so its output handler runs there
                    self.llm = self._loop.run(self._start(args, self.prefix_cache.stat_logger()))
                except Exception as err:  # noqa: BLE001 - vLLM's root cause is in its processes' logs
                    raise self.errors.start_failed(err) from err
            atexit.register(_close_at_exit, weakref.ref(self))  # after vLLM's own: runs before them
            limit = getattr(getattr(self.llm, "model_config", None), "max_model_len", None)
            if limit:  # compute.vllm.max_model_len may be shorter than the model's own context
                self.max_context = min(int(limit), self.max_context or int(limit))
        except BaseException:
            self._loop.stop()
            self._vision_thread.shutdown()
            self.errors.close()
            raise

    @staticmethod
    async def _start(args: Any, stat_logger: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        # our stat logger turns vLLM's statistics on (the prefix cache's hits), without its periodic log lines
        return AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger])

    @classmethod
    def load(cls, model: str, *, revision: str | None = None, tp: int = 1, options: Mapping[str, Any] | None = None,
             **where: Any) -> VLLMEngine:
        """Load a native (or convertible original-format) checkpoint: vision part here, language model in vLLM.
        `options`: vLLM engine arguments (compute.vllm's, or any other AsyncEngineArgs field); `where`:
        engine.open_checkpoint's arguments (device, dtype, cache_dir, storage_options, trust_remote_code)."""
        from transformers import AutoTokenizer

        path, plan = open_checkpoint(model, revision=revision, **where)  # a local folder, also for hub ids
        if not has_processor(path):
            raise ModelLoadError(f"model {model!r} has no processor_config.json, which vLLM reads the image tokens "
                                 "from: convert the checkpoint again with `internvl-batch convert` (it writes one), "
                                 "or use compute.engine: transformers")
        with loading(model):
            tokenizer = AutoTokenizer.from_pretrained(path)
            vision = load_vision(path, plan)
        require_chat_template(model, tokenizer)
        return cls(vision.config, tokenizer, plan, path, vision=vision, options=options, tp=tp)

    # -- public interface: the arguments are `_generate`'s and `_score`'s -----------------------------------------

    def generate(self, *args: Any, **kwargs: Any) -> list[Generation]:
        """Generate for a batch of prompts (InternVLEngine.generate's contract; see `_generate`), blocking."""
        return self._loop.run(self._generate(*args, **kwargs))

    async def generate_async(self, *args: Any, **kwargs: Any) -> list[Generation]:
        """generate() as a coroutine, awaitable from any event loop: calls in flight together share vLLM's batches."""
        return await self._loop.wait(self._generate(*args, **kwargs))

    def score(self, *args: Any, **kwargs: Any) -> list[list[float]]:
        """log P(label token sequence | prompt) for each prompt's labels (InternVLEngine.score's contract)."""
        return self._loop.run(self._score(*args, **kwargs))

    async def score_async(self, *args: Any, **kwargs: Any) -> list[list[float]]:
        """score() as a coroutine, for any event loop."""
        return await self._loop.wait(self._score(*args, **kwargs))

    @property
    def dead(self) -> bool:
        """Whether vLLM's engine has died (its engine-core or a worker process is gone): it will not serve again,
        the replica must be started anew (stages/model_stage.AsyncStage)."""
        llm = self.__dict__.get("llm")
        return llm is None or bool(llm.errored)

    def death_cause(self) -> str | None:
        """What vLLM's processes logged as the root cause of the engine's death, if they logged one."""
        return self.errors.cause()

    def close(self) -> None:
        """Shut vLLM's engine core down and stop the loop thread (idempotent). Also run at the process's exit
        (registered at start), before vLLM's own exit handlers stop its engine core under a running output
        handler, which would log the dead engine as a failure at the end of every job."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            try:
                self._loop.run(self._shutdown(llm))
            finally:
                self._loop.stop()
                self._vision_thread.shutdown()
                self.errors.close()

    @staticmethod
    async def _shutdown(llm: Any) -> None:
        # AsyncLLM.shutdown() stops the engine core before it cancels its output handler, which then logs the dead
        # engine as a failure; cancel the handler first, on its own loop.
        handler = getattr(llm, "output_handler", None)
        if handler is not None and not handler.done():
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        llm.shutdown()

    # -- internals -------------------------------------------------------------------------------------------------

    def split_prompt(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """A full prompt (as prompt_ids builds it) as vLLM takes it: each `<img> <IMG_CONTEXT> x n </img>` block
        becomes one `<IMG_CONTEXT>`; also returns each block's n (its image's feature rows)."""
        compact: list[int] = []
        sizes: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] != self.start_id:
                compact.append(ids[i])
                i += 1
                continue
            try:
                end = ids.index(self.end_id, i + 1)
            except ValueError:
                raise ValueError(f"prompt has an image start token at {i} and no end token") from None
            if any(t != self.context_id for t in ids[i + 1:end]):
                raise ValueError(f"prompt's image block at {i} holds tokens other than the image context token")
            compact.append(self.context_id)
            sizes.append(end - i - 1)
            i = end + 1
        return compact, sizes

    def _requests(self, prompts: Sequence[list[int]], features: Sequence[torch.Tensor],
                  owners: Sequence[int]) -> list[dict[str, Any]]:
        """One vLLM prompt per prompt: compact ids, and its sample's features cut into one tensor per image."""
        requests = []
        for row, (ids, owner) in enumerate(zip(prompts, owners)):
            compact, sizes = self.split_prompt(ids)
            feats = features[owner]
            if sum(sizes) != feats.shape[0]:
                raise ValueError(f"prompt {row} has {sum(sizes)} image tokens for {feats.shape[0]} image features")
            request: dict[str, Any] = {"prompt_token_ids": compact}
            if sizes:
                request["multi_modal_data"] = {"image": list(torch.split(feats, sizes))}
            requests.append(request)
        return requests

    async def _features(self, samples: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Vision tower + projector over all tiles of the call, in the vision thread (the loop keeps serving vLLM's
        outputs meanwhile); on the host, as vLLM's inputs are serialised to its engine-core process."""

        def encode() -> list[torch.Tensor]:
            with torch.inference_mode():
                return [f.cpu() for f in self.image_features(samples)]

        if not samples:
            return []
        return await asyncio.get_running_loop().run_in_executor(self._vision_thread, encode)

    async def _final(self, request: dict[str, Any], params: Any, prefilled: asyncio.Event | None = None) -> Any:
        """The finished RequestOutput of one request; `prefilled` is set once its prompt is in the KV cache (its
        first token is out: outputs are then asked for as they come, the last holding them all)."""
        if prefilled is not None:
            from vllm.sampling_params import RequestOutputKind

            params = params.clone()
            params.output_kind = RequestOutputKind.CUMULATIVE
        final = None
        async for output in self.llm.generate(request, params, f"{self._prefix}-{next(self._ids)}"):
            final = output  # FINAL_ONLY: the one output; CUMULATIVE: the last has every token
            if prefilled is not None:
                prefilled.set()
        return final

    def _params(self, n: int, *, max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, seeds: Sequence[int] | None = None,
                schemas: Sequence[Mapping[str, Any] | None] | None = None) -> list[Any]:
        """One SamplingParams per prompt, from generate's keyword arguments (InternVLEngine.generate's); per-prompt
        options, each prompt's seed and JSON Schema, go in here."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        for name, values in (("seeds", seeds), ("schemas", schemas)):
            if values is not None and len(values) != n:
                raise ValueError(f"{len(values)} {name} for {n} prompts")
        sampling = dict(temperature=temperature, top_p=top_p, top_k=self.top_k) if do_sample else dict(temperature=0.0)
        common = dict(max_tokens=max_new_tokens, min_tokens=min_new_tokens, logprobs=0, detokenize=False,
                      stop_token_ids=sorted(self.eos_ids), output_kind=RequestOutputKind.FINAL_ONLY, **sampling)
        return [SamplingParams(seed=None if seeds is None or not do_sample else int(seeds[i]),
                               **self._constraint(None if schemas is None else schemas[i]), **common)
                for i in range(n)]

    def _constraint(self, schema: Mapping[str, Any] | None) -> dict[str, Any]:
        """SamplingParams fields that constrain one answer to a JSON Schema (model/constrained.py's docstring says
        why each is needed for answers equal to the transformers engine's); none for a free prompt.

        vLLM's xgrammar lets special tokens into JSON strings: those few are blocked by a logit bias of -inf (a
        few dozen entries a request; an `allowed_token_ids` of every other id is ~151k ids a request, serialised to
        the engine core and made into a vocabulary-wide mask). Log-probs stay the raw ones, as before."""
        if schema is None:
            return {}
        from vllm.sampling_params import StructuredOutputsParams

        from pipeline.structured.grammar import grammar_schema

        return {"structured_outputs": StructuredOutputsParams(json=grammar_schema(schema)),
                "logit_bias": self.blocked_bias()}

    def blocked_bias(self) -> dict[int, float]:
        """The logit bias that keeps a schema answer off the tokens it may never hold (constrained.blocked_token_ids)."""
        if self._blocked is None:
            from pipeline.model.constrained import blocked_token_ids

            blocked = blocked_token_ids(self.tokenizer, sorted(self.eos_ids))
            self._blocked = {t: float("-inf") for t in blocked if t < self.vocab_size}
        return self._blocked

    async def _generate(self, prompts: Sequence[list[int]], samples: Sequence[np.ndarray],
                        owners: Sequence[int] | None = None, **options: Any) -> list[Generation]:
        """Prompt i shows the tiles of samples[owners[i]] (default: samples[i]); `options` are InternVLEngine.generate's
        keyword arguments (max_new_tokens, do_sample, temperature, top_p, min_new_tokens; seeds and schemas: one per
        prompt)."""
        if not prompts:
            return []
        owners = list(range(len(prompts))) if owners is None else list(owners)
        params = self._params(len(prompts), **options)
        requests = self._requests(prompts, await self._features(samples), owners)
        outputs = await each_sample_prefilled_once(
            [lambda event, r=r, p=p: self._final(r, p, event) for r, p in zip(requests, params)], owners)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [float(step[t].logprob) for step, t in zip(completion.logprobs, tokens)]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(Generation(token_ids=tokens, logprobs=logprobs, text=text,
                                      finished=completion.finish_reason != "length"))
        return results

    async def _next_logprobs(self, request: dict[str, Any], tokens: Sequence[int]) -> dict[int, float]:
        """log P(token | request's prompt) for each of tokens: one step, read at the sampled position (always
        computed, whatever the prefix cache held), at most MAX_LOGPROB_TOKEN_IDS tokens a request."""
        from vllm import SamplingParams
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS, RequestOutputKind

        chunks = [list(tokens[k:k + MAX_LOGPROB_TOKEN_IDS]) for k in range(0, len(tokens), MAX_LOGPROB_TOKEN_IDS)]
        outs = await asyncio.gather(*(self._final(request, SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=chunk, detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY)) for chunk in chunks))
        found: dict[int, float] = {}
        for chunk, out in zip(chunks, outs):
            step = out.outputs[0].logprobs[0]
            found.update({t: float(step[t].logprob) for t in chunk})
        return found

    async def _score(self, prompts: Sequence[list[int]], samples: Sequence[np.ndarray], owners: Sequence[int],
                     labels: Sequence[Sequence[list[int]]]) -> list[list[float]]:
        """Breadth-first over each prompt's label prefixes: depth d asks, for every distinct d-token prefix, the
        log-probs of the tokens that follow it in some label; depth d+1 starts once depth d is done, so it reads
        the prompt's (and the prefix's) KV blocks from the prefix cache instead of recomputing them."""
        if not prompts:
            return []
        requests = self._requests(prompts, await self._features(samples), owners)
        result = [[0.0] * len(options) for options in labels]
        end = sorted(self.eos_ids)
        longest = max((len(seq) for options in labels for seq in options), default=0)
        for depth in range(longest + 1):  # a label's tokens, then the end of the answer (scoring.answer_logprob)
            asks: dict[tuple[int, tuple[int, ...]], set[int]] = {}
            for i, options in enumerate(labels):
                for seq in options:
                    if len(seq) >= depth:
                        wanted = asks.setdefault((i, tuple(seq[:depth])), set())
                        wanted.update([seq[depth]] if len(seq) > depth else end)
            jobs = [lambda _, r=dict(requests[i], prompt_token_ids=requests[i]["prompt_token_ids"] + list(prefix)),
                    t=sorted(tokens): self._next_logprobs(r, t) for (i, prefix), tokens in asks.items()]
            # depth 0: a sample's first prompt (criterion) before its others, so they read its image's KV blocks
            found = await each_sample_prefilled_once(jobs, [owners[i] if depth == 0 else k
                                                            for k, (i, _) in enumerate(asks)])
            logprobs = dict(zip(asks, found))
            for i, options in enumerate(labels):
                for j, seq in enumerate(options):
                    if len(seq) > depth:
                        result[i][j] += logprobs[(i, tuple(seq[:depth]))][seq[depth]]
                    elif len(seq) == depth:
                        result[i][j] += logsumexp([logprobs[(i, tuple(seq))][e] for e in end])
        return result


def _close_at_exit(engine: weakref.ref) -> None:
    alive = engine()
    if alive is not None:
        with contextlib.suppress(Exception):
            alive.close()
