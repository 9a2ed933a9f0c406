"""Constrained decoding for the transformers engine: JSON Schema -> xgrammar grammar -> token masks in generate().

Usage in InternVLEngine._generate:

    backend = GrammarBackend.for_engine(engine)                # once per replica (tokenizer info + compiler)
    proc = backend.logits_processor(schemas)                    # once per generate() call; one entry per prompt,
    out = model.generate(inputs_embeds=..., logits_processor=[proc], ...)   # None = that prompt is unconstrained
    Generation.finished (EOS among the row's tokens) then tells a closed answer from one cut off at max_new_tokens.

The engine hook (pipeline/model/transformers_engine.py): `generate(prompts, samples, owners, *, max_new_tokens, ...,
schemas=None)`, where schemas is None or one entry per prompt (a checked JSON Schema dict, or None for a free prompt),
returns one `Generation` per prompt whose `finished` is False when it stopped at max_new_tokens. The Generate stage
parses and types the answers; the engine only constrains decoding. A vLLM engine gives the same greedy answers when it
  1. creates `LLM(..., structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})`: vLLM 0.32
     then compiles with exactly GRAMMAR_OPTIONS (no free whitespace, separators "," and ":"; its xgrammar 0.2.8 gives
     the rules 0.2.9 gives for every supported schema, differing only in the unreachable basic_any rules); naming the
     backend stops a silent fallback to guidance/outlines (for schemas we refuse at validation anyway);
  2. gives each prompt with a schema `SamplingParams(..., structured_outputs=StructuredOutputsParams(json=
     grammar_schema(schema)))` (`from vllm.sampling_params import StructuredOutputsParams`; the rewritten schema, never
     the raw one), a free prompt `structured_outputs=None`, all in one `llm.generate(prompts, [params...])`;
  3. forbids blocked_token_ids(tokenizer, eos_ids) in constrained prompts, e.g. `allowed_token_ids=` every other id
     below the model's vocab_size (vLLM builds its TokenizerInfo with plain from_huggingface, which lets them into
     JSON strings; `logit_bias` is clamped to -100, not exact);
  4. sets `Generation.finished = output.outputs[0].finish_reason != "length"`.
Where the checkpoint's generation_config lists several EOS ids, the last token may differ (vLLM's grammar ends only on
the tokenizer's EOS); the text and `finished` do not.

Why our own LogitsProcessor and not xgrammar.contrib.hf.LogitsProcessor (xgrammar 0.2.9):
- it needs a grammar for every row; a batch here mixes prompts with and without (or with different) schemas;
- it `assert`s on every accepted token and cannot tell afterwards which rows ended by EOS;
- it fills masks row by row in Python; BatchGrammarMatcher fills them in C++ (optionally threaded).
Both work the same way with inputs_embeds and left padding: generate() hands processors `input_ids` holding only the
generated tokens (shape (B, 0) at the first step), the mask depends only on each row's own generated tokens, and
padding lives in the prompt, which the processor never sees. transformers applies custom processors before its
sampling warpers (temperature/top-k/top-p), so sampling only ever sees grammar-allowed tokens.

TokenizerInfo.from_huggingface (xgrammar 0.2.9) does not recognise added special tokens of a byte-level tokenizer such
as ours (<IMG_CONTEXT>, <|im_start|>, ...): it decodes them as their literal text, so inside a JSON string the grammar
would allow the model to emit <IMG_CONTEXT>, which decode(skip_special_tokens=True) then drops. tokenizer_info()
blanks every special token (`blocked_token_ids`: all_special_ids and added tokens flagged special) except the stop
tokens; xgrammar then treats them as special (never allowed). vLLM 0.32's xgrammar backend calls from_huggingface as
it is, so a vLLM engine must forbid blocked_token_ids itself for constrained prompts to match.

xgrammar 0.2.9 (and 0.2.8, which vLLM 0.32 pins) lets raw control characters into strings bounded by minLength or
maxLength: grammar_schema() rewrites those bounds as an equivalent pattern before compiling (see its docstring).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import transformers
import xgrammar as xgr

from pipeline.errors import SchemaError
from pipeline.structured.grammar import GRAMMAR_OPTIONS, JSON_CHARACTERS, backend_message, check_grammar, schema_text

def blocked_token_ids(tokenizer: Any, stop_token_ids: Sequence[int]) -> list[int]:
    """Token ids an answer may never hold: every special token (all_special_ids and added tokens flagged special)
    except the stop tokens, which end it. Inside a JSON string xgrammar would otherwise allow them (see above)."""
    specials = set(getattr(tokenizer, "all_special_ids", [])) | {
        i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", True)}
    return sorted(specials - set(stop_token_ids))


def tokenizer_info(tokenizer: Any, *, vocab_size: int | None = None,
                   stop_token_ids: Sequence[int] | None = None) -> xgr.TokenizerInfo:
    """xgrammar's view of a Hugging Face tokenizer, with blocked_token_ids never allowed inside an answer.

    vocab_size: the model's lm_head width (the logits' last dimension), which may exceed the tokenizer's.
    stop_token_ids: the engine's EOS ids (default: the tokenizer's eos_token_id).
    """
    stops = sorted(set(stop_token_ids)) if stop_token_ids else [tokenizer.eos_token_id]
    base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
    blocked = set(blocked_token_ids(tokenizer, stops))
    if not blocked:
        return base
    size = base.vocab_size
    encoded: list[str] = [""] * size
    for token, idx in tokenizer.get_vocab().items():
        if idx < size and idx not in blocked:
            encoded[idx] = token
    return xgr.TokenizerInfo(encoded, base.vocab_type, vocab_size=size, stop_token_ids=stops,
                             add_prefix_space=base.add_prefix_space)


def unspellable(info: xgr.TokenizerInfo, characters: str = JSON_CHARACTERS) -> list[str]:
    """Characters no token can start with (so the grammar could never emit them): must be empty for JSON."""
    firsts: set[int] = set()
    special = set(info.special_token_ids)
    for idx, piece in enumerate(info.decoded_vocab):
        if piece and idx not in special:
            firsts.add(piece[0])
    return [c for c in dict.fromkeys(characters) if c.encode()[0] not in firsts]


class GrammarBackend:
    """xgrammar over one tokenizer: compiles schemas (cached) and makes a logits processor per generate() call.

    Thread-safe for compiling; one instance per replica; schemas compile with GRAMMAR_OPTIONS.
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int | None = None, stop_token_ids: Sequence[int] | None = None,
                 max_threads: int = 1) -> None:
        self.info = tokenizer_info(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        missing = unspellable(self.info)
        if missing:
            raise ValueError(f"the tokenizer cannot spell the JSON characters {missing}: no token starts with them, so "
                             f"no schema can be decoded with it")
        self.vocab_size = self.info.vocab_size
        self.max_threads = max_threads
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads)
        self._cache: dict[str, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_engine(cls, engine: Any, **kwargs: Any) -> GrammarBackend:
        """For an InternVLEngine: its tokenizer, its logits' width (the text model's vocab_size; a tensor-parallel
        rank's lm_head holds only a slice of it), its EOS ids."""
        width = int(engine.model.config.get_text_config().vocab_size)
        return cls(engine.tokenizer, vocab_size=width, stop_token_ids=sorted(engine.eos_ids), **kwargs)

    def compile(self, schema: Mapping[str, Any]) -> xgr.CompiledGrammar:
        key = schema_text(schema)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            compiled = self.compiler.compile_json_schema(key, **GRAMMAR_OPTIONS)
        except Exception as err:  # noqa: BLE001
            check_grammar(schema)  # raises with the path where it can
            raise SchemaError(f"the grammar backend (xgrammar) cannot compile this schema: {backend_message(err)}") \
                from None
        with self._lock:
            if len(self._cache) >= 1024:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = compiled
        return compiled

    def logits_processor(self, schemas: Sequence[Mapping[str, Any] | None]) -> SchemaLogitsProcessor:
        """A fresh processor for one generate() call over len(schemas) rows (in the batch's row order)."""
        return SchemaLogitsProcessor([None if s is None else self.compile(s) for s in schemas], self.vocab_size,
                                     max_threads=self.max_threads)


class SchemaLogitsProcessor(transformers.LogitsProcessor):
    """Masks each constrained row's logits to the tokens its grammar allows next. Single use: one generate() call.

    Rows whose grammar is None are left alone. rejected(row): a token outside the grammar was seen (the row is then no
    longer constrained; cannot happen with greedy or sampling, only if something after us forced a token). Whether a
    row ended by EOS is read from its tokens, not from here: generate() stops without calling processors again once
    every row has ended, so the grammar never sees the last EOS.
    """

    def __init__(self, grammars: Sequence[xgr.CompiledGrammar | None], vocab_size: int, *, max_threads: int = 1) -> None:
        self.grammars = list(grammars)
        self.vocab_size = vocab_size
        self.matchers = [None if g is None else xgr.GrammarMatcher(g) for g in self.grammars]
        self._rejected = [False] * len(self.grammars)
        self._batch = xgr.BatchGrammarMatcher(max_threads)
        self._bitmask = xgr.allocate_token_bitmask(len(self.grammars), vocab_size)
        self._steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.matchers):
            raise RuntimeError(f"logits processor built for {len(self.matchers)} rows got a batch of "
                               f"{input_ids.shape[0]} (one processor per generate() call, no beams)")
        if self._steps > 0:  # accept what was chosen at the previous step
            last = input_ids[:, -1].tolist()
            for row, matcher in enumerate(self.matchers):
                live = matcher is not None and not matcher.is_terminated() and not self._rejected[row]
                if live and not matcher.accept_token(last[row]):
                    self._rejected[row] = True
        self._steps += 1
        active = [row for row, m in enumerate(self.matchers)
                  if m is not None and not m.is_terminated() and not self._rejected[row]]
        if not active:
            return scores
        self._batch.batch_fill_next_token_bitmask([self.matchers[r] for r in active], self._bitmask, indices=active)
        bitmask = self._bitmask if scores.device.type == "cpu" else self._bitmask.to(scores.device, non_blocking=True)
        if scores.device.type in ("cpu", "cuda"):
            xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=self.vocab_size, indices=active)
        else:  # e.g. mps: the CPU kernel on a copy
            host = scores.float().cpu()
            xgr.apply_token_bitmask_inplace(host, self._bitmask, vocab_size=self.vocab_size, indices=active)
            scores = host.to(scores.device, scores.dtype)
        return scores

    def constrained(self, row: int) -> bool:
        return self.matchers[row] is not None

    def rejected(self, row: int) -> bool:
        return self._rejected[row]
