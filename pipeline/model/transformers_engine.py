"""One InternVL model replica: load a native checkpoint, build prompt ids, normalise tiles, batched generate.

Knows nothing of Ray Data or the job's storage layout. Checkpoints load with `InternVLForConditionalGeneration`
(no remote code) from a local folder, an s3:// (any fsspec) prefix copied once per node into a local cache, or a
hub id (a snapshot in the Hugging Face cache, fetched where a network exists); original-format ones converted.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ModelLoadError
from pipeline.media.tiling import IMAGENET_MEAN, IMAGENET_STD
from pipeline.model.batching import equal_length_groups
from pipeline.model.checkpoints import prepare_checkpoint
from pipeline.model.device import DeviceChoice, local_plan
from pipeline.model.gpu_memory import VISION_CHUNK_TILES
from pipeline.model.logprobs import ChosenLogprobs
from pipeline.model.prompts import ImageTokens, chat_messages, expand_image_placeholders
from pipeline.model.sampling import RowSampler
from pipeline.model.scoring import answer_logprob


@dataclass(frozen=True)
class Generation:
    """One prompt's generated tokens, their log-probabilities and text.

    finished: generation ended by itself (EOS; vLLM's finish_reason "stop"), False when it was cut off at
    max_new_tokens (vLLM's "length"); a schema answer cut off before its JSON closed becomes a `truncated` row.
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finished: bool = True


def open_checkpoint(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    storage_options: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[str, DeviceChoice]:
    """What every engine's load starts with: the checkpoint made local and native (model/checkpoints.py), and
    this process's device plan; transformers' progress bars off (per-shard bars from every replica would flood the
    job log)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    plan = local_plan(device, dtype)
    return prepare_checkpoint(model, cache_dir=cache_dir, options=storage_options,
                              trust_remote_code=trust_remote_code, revision=revision), plan


@contextlib.contextmanager
def loading(model: str) -> Iterator[None]:
    """Any failure while a checkpoint loads means it cannot serve: a ModelLoadError that says which and why."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"model {model!r} could not be loaded: {type(err).__name__}: {err}") from err


def require_divisible_heads(model: str, path: str, tp: int) -> None:
    """transformers' tensor-parallel plan splits the attention heads and key/value heads between the tp ranks: a
    model whose head counts tp does not divide cannot be sharded that way (it would fail on every sample)."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(path).text_config
    heads = {"attention heads": text.num_attention_heads,
             "key/value heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads}
    bad = [f"{n} {what}" for what, n in heads.items() if n % tp]
    if bad:
        raise ModelLoadError(f"model {model!r} cannot be split over compute.tp={tp} ranks: its language model has "
                             f"{' and '.join(bad)}, not divisible by {tp}; use a tp that divides them")


def require_chat_template(model: str, tokenizer: Any) -> None:
    if not tokenizer.chat_template:
        raise ModelLoadError(f"model {model!r} has no chat template (tokenizer_config.json or chat_template.jinja)")


def context_length(config: Any) -> int | None:
    """The language model's context (max_position_embeddings of the text config), if the config says."""
    value = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    return int(value) if value else None


def cache_keyword(model: Any) -> str:
    """The name transformers gives the KV cache in a model's forward and output: `cache` where the installed
    transformers has it (5.2x; `past_key_values` is deprecated there and removed in 5.40), else `past_key_values`
    (earlier 5.x, e.g. the vLLM lane's, which vLLM 0.32 holds below 5.20)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Prompter:
    """Prompt building, which needs only the tokenizer (with its chat template) and the tokens per tile."""

    def __init__(self, tokenizer: Any, image_seq_length: int, max_context: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_tokens = ImageTokens.from_tokenizer(tokenizer)
        self.image_seq_length = image_seq_length
        self.max_context = max_context  # the language model's context in tokens; a longer prompt is a too_long row

    @classmethod
    def load(cls, path: str | Path, revision: str | None = None) -> Prompter:
        """Tokenizer and image_seq_length of a local native checkpoint, without its weights."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path, revision=revision)
        return cls(AutoTokenizer.from_pretrained(path, revision=revision), int(getattr(config, "image_seq_length", 256)),
                   context_length(config))

    def prompt_text(self, text: str, tiles_per_image: Sequence[int], *, video: bool = False) -> str:
        """The full prompt string: chat template rendered, image (or video frame) placeholders expanded."""
        messages = chat_messages(text, num_images=len(tiles_per_image), video=video)
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return expand_image_placeholders(
            rendered, tiles_per_image=list(tiles_per_image), tokens=self.image_tokens,
            image_seq_length=self.image_seq_length, video=video,
        )

    def prompt_ids(self, text: str, tiles_per_image: Sequence[int], *, video: bool = False) -> list[int]:
        """Token ids of the full prompt."""
        return self.tokenizer(self.prompt_text(text, tiles_per_image, video=video), add_special_tokens=False)["input_ids"]


class InternVLEngine(Prompter):
    """A loaded replica (or one tensor-parallel rank of it): tokenizer, chat template, model on its device."""

    def __init__(self, model: Any, tokenizer: Any, plan: DeviceChoice) -> None:
        super().__init__(tokenizer, int(getattr(model.config, "image_seq_length", 256)), context_length(model.config))
        self.model = model
        self.plan = plan
        context_id = tokenizer.convert_tokens_to_ids(self.image_tokens.context)
        if context_id != model.config.image_token_id:
            raise ModelLoadError(
                f"tokenizer's image token {self.image_tokens.context!r} has id {context_id}, "
                f"but the model expects image_token_id {model.config.image_token_id}"
            )
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=plan.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=plan.device).view(1, 3, 1, 1)
        self._grammar: Any = None
        self.cache_name = cache_keyword(model)

    @property
    def grammar(self) -> Any:
        """The replica's grammar backend (xgrammar over this tokenizer), made at the first prompt with a schema."""
        if self._grammar is None:
            from pipeline.model.constrained import GrammarBackend

            self._grammar = GrammarBackend.for_engine(self)
        return self._grammar

    @classmethod
    def load(cls, model: str, *, revision: str | None = None, tp: int = 1, **where: Any) -> InternVLEngine:
        """Load an InternVL checkpoint onto this process's device: native as it is, original format converted first
        (pipeline.model.convert); remote code is never run. `where`: open_checkpoint's arguments.

        tp > 1: this process is one rank of an initialised torch.distributed group of tp processes; the language
        model loads with transformers' tensor-parallel plan, each rank reading only its shard of every weight.
        """
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        path, plan = open_checkpoint(model, revision=revision, **where)
        if tp > 1:
            require_divisible_heads(model, path, tp)
        with loading(model):
            tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
            sharding = {"tp_plan": "auto", "tp_size": tp} if tp > 1 else {}
            net = InternVLForConditionalGeneration.from_pretrained(
                path, revision=revision, dtype=plan.dtype, attn_implementation=plan.attn_implementation, **sharding
            )
        require_chat_template(model, tokenizer)
        return cls((net if tp > 1 else net.to(plan.device)).eval(), tokenizer, plan)

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) tiles -> model dtype (N, 3, H, W), ImageNet mean/std of x/255, computed on device."""
        with warnings.catch_warnings():  # tiles are read-only views of Arrow buffers; we never write to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(np.ascontiguousarray(pixels))
        x = x.to(self.plan.device).permute(0, 3, 1, 2)
        # in place on the one float32 copy: the cards' arithmetic (x/255, minus mean, over std, float32), equal to
        # the numpy reference bit for bit (within 1e-5 of the cards' recorded values), at half the time of fresh tensors
        x = x.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std)
        return x.to(self.plan.dtype)

    def image_features(self, samples: Sequence[np.ndarray], chunk_tiles: int = VISION_CHUNK_TILES) -> list[torch.Tensor]:
        """Vision tower + projector over all tiles of all samples; one (tiles x 256, hidden) block each. Tiles go
        through in chunks of `chunk_tiles`, normalised chunk by chunk, so the activation peak is one chunk's however
        many tiles a batch holds (model/gpu_memory.py sizes the GPU from it); tiles never attend to each other in the
        tower, so the features are those of one pass over all tiles."""
        pixels, config = np.concatenate(list(samples), axis=0), self.model.config
        features: torch.Tensor | None = None
        for start in range(0, len(pixels), chunk_tiles):
            chunk = self.model.model.get_image_features(
                pixel_values=self.normalize(pixels[start:start + chunk_tiles]),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output
            if features is None:  # filled in place: no second copy of all features, as a concatenation would make
                features = chunk.new_empty((len(pixels), *chunk.shape[1:]))
            features[start:start + len(chunk)] = chunk
        blocks = torch.split(features, [len(s) for s in samples], dim=0)
        return [b.reshape(-1, b.shape[-1]) for b in blocks]

    def embed(self, prompts: Sequence[list[int]], features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input embeddings with each prompt's image tokens replaced by its sample's features."""
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        input_ids, attention = input_ids.to(self.plan.device), attention.to(self.plan.device)
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = input_ids == self.model.config.image_token_id
        for row, feats in enumerate(features):
            if int(mask[row].sum()) != feats.shape[0]:
                raise ValueError(f"prompt {row} has {int(mask[row].sum())} image tokens for {feats.shape[0]} image features")
        if mask.any():
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), torch.cat(list(features)).to(embeds.dtype))
        return embeds, attention

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[list[int]],
        samples: Sequence[np.ndarray],
        owners: Sequence[int] | None = None,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seeds: Sequence[int] | None = None,
        min_new_tokens: int = 0,
        schemas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[Generation]:
        """Generate for a batch of prompts; prompt i shows the tiles of samples[owners[i]] (default: samples[i]).

        The vision encoder runs once per sample, however many prompts (questions) share it. Sampling: `seeds`, one
        per prompt, makes each prompt's answer depend only on its seed (model/sampling.py), never on the batch;
        without seeds it draws from torch's global generator. `min_new_tokens`: end tokens suppressed until then
        (a fixed answer length with = max_new_tokens, as benches use).
        schemas: one entry per prompt (or None for none): schemas[i], a checked JSON Schema dict, constrains prompt i's
        answer to JSON of that schema (pipeline.model.constrained); a None entry leaves that prompt free. The vLLM
        engine takes the same argument; constrained.py's docstring says what it must do to give equal answers.
        """
        if not prompts:
            return []
        owners = list(range(len(prompts))) if owners is None else list(owners)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        features = self.image_features(samples)
        return self._by_language_group(prompts, lambda group: self._generate(
            [prompts[i] for i in group], [features[owners[i]] for i in group],
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
            top_p=top_p, seeds=None if seeds is None else [seeds[i] for i in group],
            schemas=None if schemas is None else [schemas[i] for i in group]))

    def language_groups(self, prompts: Sequence[list[int]]) -> list[list[int]]:
        """How a call's prompts go through the language model: on GPU all at once (left-padded; batched decode steps
        cost little more than one), on CPU in groups of equal length: a padded batch's attention takes the masked
        path there, ~2x the causal kernel (bench/pipeline_vs_naive.py; results do not depend on the grouping)."""
        if self.plan.device != "cpu":
            return [list(range(len(prompts)))]
        return equal_length_groups([len(p) for p in prompts])

    def _by_language_group(self, prompts: Sequence[list[int]], run: Any) -> list[Any]:
        """run(indices) over each of language_groups(prompts); results put back in prompt order."""
        results: list[Any] = [None] * len(prompts)
        for group in self.language_groups(prompts):
            for i, result in zip(group, run(group)):
                results[i] = result
        return results

    def _generate(self, prompts: Sequence[list[int]], features: Sequence[torch.Tensor], *, max_new_tokens: int,
                  min_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                  seeds: Sequence[int] | None, schemas: Sequence[Mapping[str, Any] | None] | None = None,
                  ) -> list[Generation]:
        """generate() for prompts with their image features."""
        from transformers import LogitsProcessorList

        embeds, attention = self.embed(prompts, features)
        greedy = dict(temperature=None, top_p=None, top_k=None)
        processors = LogitsProcessorList()
        if schemas is not None and any(s is not None for s in schemas):  # first: a sampler draws among allowed tokens
            processors.append(self.grammar.logits_processor(schemas))
        if not do_sample:
            sampling: dict[str, Any] = dict(greedy, do_sample=False)
        elif seeds is None:
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p)
        else:  # each row draws with its own generator; generate's greedy step takes the drawn token
            processors.append(RowSampler(seeds, temperature=temperature, top_p=top_p,
                                         top_k=self.model.generation_config.top_k))
            sampling = dict(greedy, do_sample=False)
        recorder = ChosenLogprobs(self.model)  # reads the raw logits, so its place in the list does not matter
        processors.append(recorder)
        sampling["logits_processor"] = processors
        if min_new_tokens:  # else the generation config's
            sampling["min_new_tokens"] = min_new_tokens
        with recorder:
            sequences = self.model.generate(
                inputs_embeds=embeds,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
                **sampling,
            )
        logprobs = recorder.values(sequences)  # (rows, steps) floats: no vocabulary-wide array leaves the device
        new_tokens = sequences.cpu()  # with inputs_embeds only, sequences hold just the new tokens
        results = []
        for row in range(len(prompts)):
            tokens = new_tokens[row].tolist()
            end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_ids), None)
            tokens = tokens[:end]
            lp = logprobs[row, : len(tokens)].tolist()
            text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(Generation(token_ids=tokens, logprobs=lp, text=text, finished=end is not None))
        return results

    @torch.inference_mode()
    def score(
        self,
        prompts: Sequence[list[int]],
        samples: Sequence[np.ndarray],
        owners: Sequence[int],
        labels: Sequence[Sequence[list[int]]],
    ) -> list[list[float]]:
        """log P(answer = label | prompt) for each prompt's labels: the label's tokens, then the end of the answer
        (any of the eos ids generation stops at; pipeline/model/scoring.py), without a generate loop.

        One forward over the prompts gives every label's first token; one short forward over every label's tokens,
        continuing from the prompts' cache, gives the rest and the end.
        """
        if not prompts:
            return []
        features = self.image_features(samples)
        return self._by_language_group(prompts, lambda group: self._score(
            [prompts[i] for i in group], [features[owners[i]] for i in group], [labels[i] for i in group]))

    def _score(self, prompts: Sequence[list[int]], features: Sequence[torch.Tensor],
               labels: Sequence[Sequence[list[int]]]) -> list[list[float]]:
        """score() for prompts with their image features."""
        embeds, attention = self.embed(prompts, features)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        pairs = [(i, j) for i, options in enumerate(labels) for j in range(len(options))]
        rows = torch.tensor([i for i, _ in pairs], device=attention.device)
        cache = getattr(out, self.cache_name)
        cache.reorder_cache(rows)  # one cached prompt per (prompt, label) pair
        width = max(len(labels[i][j]) for i, j in pairs)
        cont = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
        cont_mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for p, (i, j) in enumerate(pairs):  # every label token goes in: the step after the last one holds the end
            seq = labels[i][j]
            cont[p, : len(seq)] = torch.tensor(seq)
            cont_mask[p, : len(seq)] = 1
        cont, cont_mask = cont.to(attention.device), cont_mask.to(attention.device)
        start = attention[rows].sum(-1, keepdim=True)
        more = self.model(
            input_ids=cont, attention_mask=torch.cat([attention[rows], cont_mask], dim=-1),
            position_ids=start + torch.arange(width, device=attention.device), **{self.cache_name: cache},
        )
        rest = torch.log_softmax(more.logits.float(), dim=-1)
        end = sorted(self.eos_ids)
        # only the vocabulary columns the answers read (label and end tokens) leave the device
        read = sorted({t for options in labels for seq in options for t in seq} | set(end))
        column = {t: k for k, t in enumerate(read)}
        index = torch.tensor(read, device=first.device)
        first, rest = first.index_select(-1, index).cpu(), rest.index_select(-1, index).cpu()
        result: list[list[float]] = [[0.0] * len(options) for options in labels]
        for p, (i, j) in enumerate(pairs):
            seq = labels[i][j]
            result[i][j] = answer_logprob([first[i], *rest[p, : len(seq)]], [column[t] for t in seq],
                                          [column[e] for e in end])
        return result
