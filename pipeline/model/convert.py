"""Convert original-format InternVL checkpoints (`InternVLChatModel`, remote code) into native transformers ones.

No remote code runs: config.json is read as JSON and the weights as safetensors. Every key is renamed, or split
for fused projections, by an explicit rule; a key no rule knows is refused, and every source tensor must land in
the native model exactly once (checked against the key set and shapes of the native model for that config).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    InternVLForConditionalGeneration,
    PreTrainedConfig,
)

from pipeline.errors import ConversionError
from pipeline.io.storage import get_filesystem, is_remote, prefix_version
from pipeline.model.cache import cache_root, remote_entry
from pipeline.model.convert_config import (
    CHAT_FORMATS,
    NAMED_TOKENS,
    TOKENIZER_FILES,
    chat_template,
    convert_config,
    is_original_format,
)
from pipeline.model.convert_weights import convert_state_dict, load_original_weights
from pipeline.model.processor_files import DEFAULT_MAX_TILES, write_processor


def _remote_tokenizer(source: Path, stage: str) -> None:
    """Load a remote-code tokenizer (the job allowed it) and save its fast backend as a plain native tokenizer."""
    from transformers import PreTrainedTokenizerFast

    remote = AutoTokenizer.from_pretrained(str(source), trust_remote_code=True)
    if not remote.is_fast:
        raise ConversionError(f"remote-code tokenizer {type(remote).__name__!r} in {str(source)!r} has no fast "
                              "(tokenizers) backend to convert; pass tokenizer= a native tokenizer instead")
    native = PreTrainedTokenizerFast(tokenizer_object=remote.backend_tokenizer, **remote.special_tokens_map)
    native.save_pretrained(stage)


def convert_tokenizer(source: str | Path, template: str | None, *, trust_remote_code: bool = False) -> Any:
    """The source tokenizer with the named image/video tokens and the cards' chat template. A tokenizer that is
    remote code is refused unless trust_remote_code (then its fast backend is kept, its code is not)."""
    with tempfile.TemporaryDirectory() as stage:
        src = Path(source)
        config_file = src / "tokenizer_config.json"
        tok_config = json.loads(config_file.read_text()) if src.is_dir() and config_file.exists() else {}
        if tok_config.get("auto_map") and trust_remote_code:
            _remote_tokenizer(src, stage)
        elif src.is_dir():  # copy only tokenizer files: the folder's config.json names a remote-code model type
            if tok_config.get("auto_map"):
                raise ConversionError(
                    f"tokenizer {tok_config.get('tokenizer_class')!r} in {str(source)!r} needs remote code; "
                    "pass tokenizer= a native tokenizer folder or hub id (e.g. the matching *-hf checkpoint), "
                    "or set trust_remote_code: true with a pinned model_revision in the job"
                )
            for name in TOKENIZER_FILES:
                if (src / name).exists():
                    shutil.copy2(src / name, Path(stage) / name)
        else:
            AutoTokenizer.from_pretrained(str(source)).save_pretrained(stage)
        base = AutoTokenizer.from_pretrained(stage)
        vocab = base.get_vocab()
        for token in ("<img>", "</img>", "<IMG_CONTEXT>"):
            if token not in vocab:
                raise ConversionError(f"tokenizer of {str(source)!r} has no {token!r} token")
        extra = base.extra_special_tokens
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra or [])
        tokenizer = AutoTokenizer.from_pretrained(
            stage, extra_special_tokens=list(dict.fromkeys(extra + list(NAMED_TOKENS.values()))), **NAMED_TOKENS
        )
    if template in CHAT_FORMATS:  # the cards' chat() formats with this template, never the tokenizer's own
        sep = CHAT_FORMATS[template].sep.strip()
        if sep not in vocab:
            raise ConversionError(f"template {template!r} ends turns with {sep!r}, which the tokenizer lacks")
        tokenizer.chat_template = chat_template(template)
    elif not tokenizer.chat_template:
        raise ConversionError(f"template {template!r} is not known ({sorted(CHAT_FORMATS)}) and the tokenizer has none")
    return tokenizer


def _generation_config(tokenizer: Any, config: Mapping[str, Any], text: PreTrainedConfig) -> GenerationConfig:
    """Stop at the template's turn separator (as the cards' chat() does) and at the LM's own eos."""
    eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
    chat = CHAT_FORMATS.get(config.get("template", ""))
    sep = [tokenizer.convert_tokens_to_ids(chat.sep.strip())] if chat else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id
    return GenerationConfig(eos_token_id=list(dict.fromkeys(sep + [e for e in eos if e is not None])),
                            pad_token_id=pad, bos_token_id=text.bos_token_id)


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser()


def _fetch(url: str, dest: Path, options: Mapping[str, Any] | None) -> Path:
    """Copy a remote checkpoint prefix into ``dest``."""
    fs, path = get_filesystem(url, options)
    if not fs.exists(f"{path.rstrip('/')}/config.json"):
        raise ConversionError(f"{url!r}: no config.json under that prefix")
    fs.get(path.rstrip("/") + "/", str(dest) + "/", recursive=True)
    return dest


def _native_model(src_dir: Path, tokenizer: str | None, trust_remote_code: bool = False) -> tuple[InternVLForConditionalGeneration, Any]:
    """The converted model (weights assigned, no random init) and tokenizer for a local original checkpoint."""
    if not (src_dir / "config.json").exists():
        raise ConversionError(f"{str(src_dir)!r}: no config.json")
    config = json.loads((src_dir / "config.json").read_text())
    if not is_original_format(config):
        arch = config.get("architectures")
        raise ConversionError(f"{str(src_dir)!r} is not an original-format InternVL checkpoint ({arch!r})")
    tok = convert_tokenizer(tokenizer or src_dir, config.get("template"), trust_remote_code=trust_remote_code and not tokenizer)
    native = convert_config(config, image_token_id=tok.context_image_token_id)
    if native.image_token_id >= native.text_config.vocab_size:
        vocab = native.text_config.vocab_size
        raise ConversionError(f"<IMG_CONTEXT> has id {native.image_token_id}, outside the LM's {vocab} embeddings")
    state = convert_state_dict(load_original_weights(src_dir), config)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(native)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = _generation_config(tok, config, native.text_config)
    return model, tok


def convert_checkpoint(
    src: str,
    dst: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Convert an original checkpoint (local or fsspec URL) into a native one at ``dst`` (local or fsspec URL).

    Returns the local folder holding the result: ``dst`` itself, or for a remote ``dst`` its node-local cache entry
    (the one `pipeline.model.checkpoints.cache_checkpoint(dst)` then reuses). A remote ``src`` is copied to a scratch
    folder in the cache and deleted afterwards. ``tokenizer`` (folder or hub id) replaces the source tokenizer, which
    is needed when that one is remote code (InternLM2/3). Peak memory is about the checkpoint's size.
    """
    remote = is_remote(src) or is_remote(dst)
    cache = cache_root(cache_dir)
    if remote:
        cache.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix=".convert-", dir=cache) if remote else contextlib.nullcontext("")
    with scratch as work:
        src_dir = _fetch(src, Path(work) / "src", storage_options) if is_remote(src) else _local(src)
        model, tok = _native_model(src_dir, tokenizer, trust_remote_code)
        out = Path(work) / "native" if is_remote(dst) else _local(dst)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        original = json.loads((src_dir / "config.json").read_text())
        write_processor(out, image_seq_length=model.config.image_seq_length,  # for vLLM (compute.engine)
                        tile_size=model.config.vision_config.image_size[0],
                        max_tiles=int(original.get("max_dynamic_patch") or DEFAULT_MAX_TILES))
        if is_remote(dst):
            fs, path = get_filesystem(dst, storage_options)
            fs.put(str(out) + "/", path.rstrip("/") + "/", recursive=True)
            final = remote_entry(dst, cache_dir, prefix_version(dst, storage_options))  # cache_checkpoint(dst)'s
            shutil.rmtree(final, ignore_errors=True)
            out = out.rename(final)
    return out
