"""Convert original-format InternVL checkpoints (`InternVLChatModel`, remote code) into native transformers ones.

No remote code runs: config.json is read as JSON and the weights as safetensors. Every key is renamed, or split
for fused projections, by an explicit rule; a key no rule knows is refused, and every source tensor must land in
the native model exactly once (checked against the key set and shapes of the native model for that config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedConfig,
    Qwen2Config,
)

from pipeline.checkpoints import DEFAULT_CACHE, is_remote
from pipeline.storage import get_filesystem

NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
TOKENIZER_FILES = (
    "tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "special_tokens_map.json", "chat_template.jinja",
)
# Original LM model_type -> native text config class. InternLM2/3 are Llama-architecture (InternLM2 fuses wqkv).
TEXT_CONFIGS: dict[str, type[PreTrainedConfig]] = {
    "qwen2": Qwen2Config, "llama": LlamaConfig, "phi3": Phi3Config, "internlm2": LlamaConfig, "internlm3": LlamaConfig,
}
_GENERIC_FIELDS = {f.name for f in dataclasses.fields(PreTrainedConfig)} | {"rope_parameters", "layer_types"}

_OLD_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
_V25_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """One of the cards' conversation templates (MPT style: system + sep, then role + message + sep per turn)."""

    system: str
    user: str
    assistant: str
    sep: str
    default_system: str


_CHATML = ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n")
CHAT_FORMATS = {  # the `template` names of the original configs (the cards' conversation.py)
    "internvl2_5": ChatFormat(*_CHATML, sep="<|im_end|>\n", default_system=_V25_SYSTEM),
    "internlm2-chat": ChatFormat(*_CHATML, sep="<|im_end|>", default_system=_OLD_SYSTEM),
    "Hermes-2": ChatFormat(*_CHATML, sep="<|im_end|>", default_system=_OLD_SYSTEM),
    "phi3-chat": ChatFormat("<|system|>\n", "<|user|>\n", "<|assistant|>\n", sep="<|end|>", default_system=_OLD_SYSTEM),
}


class ConversionError(ValueError):
    """The checkpoint cannot be converted faithfully; the message names the offending key, field or file."""


def is_original_format(config: Mapping[str, Any]) -> bool:
    """True for an original InternVLChatModel config (needs remote code), False for anything else."""
    return "InternVLChatModel" in (config.get("architectures") or []) or config.get("model_type") == "internvl_chat"


def _jinja(text: str) -> str:
    """A Jinja string literal for ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(name: str) -> str:
    """Jinja reproducing the cards' conversation template ``name``; an image item renders `<IMG_CONTEXT>\\n`."""
    if name not in CHAT_FORMATS:
        raise ConversionError(f"template {name!r} is not known; known: {sorted(CHAT_FORMATS)}")
    f = CHAT_FORMATS[name]
    content = (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% elif item['type'] == 'video' %}{{ '<video>\\n' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    )
    sep = "{{ " + _jinja(f.sep) + " }}"
    return (
        "{% if messages and messages[0]['role'] == 'system' %}{% set turns = messages[1:] %}"
        "{% for message in messages[:1] %}{{ " + _jinja(f.system) + " }}" + content + sep + "{% endfor %}"
        "{% else %}{% set turns = messages %}{{ " + _jinja(f.system + f.default_system + f.sep) + " }}{% endif %}"
        "{% for message in turns %}{% if message['role'] == 'assistant' %}{{ " + _jinja(f.assistant) + " }}"
        "{% else %}{{ " + _jinja(f.user) + " }}{% endif %}" + content + sep + "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + _jinja(f.assistant) + " }}{% endif %}"
    )


def _rope_parameters(llm: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 `rope_parameters` from an old-style `rope_theta` + `rope_scaling`."""
    scaling = dict(llm.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    rope_type = "longrope" if rope_type == "su" else rope_type
    params = {"rope_type": rope_type, "rope_theta": float(llm.get("rope_theta", 10000.0)), **scaling}
    if rope_type == "longrope":
        params.setdefault("original_max_position_embeddings", llm.get("original_max_position_embeddings", 4096))
    return params


def _text_config(llm: Mapping[str, Any]) -> PreTrainedConfig:
    """The native text config for the original `llm_config` (InternLM2/3 become Llama)."""
    family = llm.get("model_type")
    if family not in TEXT_CONFIGS:
        raise ConversionError(f"llm_config.model_type {family!r} is not supported; supported: {sorted(TEXT_CONFIGS)}")
    cls = TEXT_CONFIGS[family]
    fields = {f.name for f in dataclasses.fields(cls)} - _GENERIC_FIELDS
    kwargs = {k: v for k, v in llm.items() if k in fields}
    if family == "internlm2":  # wqkv/wo carry `bias`; the feed-forward never has one
        kwargs.update(attention_bias=bool(llm.get("bias", False)), mlp_bias=False)
    elif family == "internlm3":  # q/k/v follow `qkv_bias`, o_proj and the MLP `bias`; Llama ties o_proj to q/k/v
        if bool(llm.get("qkv_bias", False)) != bool(llm.get("bias", False)):
            raise ConversionError("llm_config: internlm3 with qkv_bias != bias has no native Llama equivalent")
        kwargs.update(attention_bias=bool(llm.get("bias", False)), mlp_bias=bool(llm.get("bias", False)))
    return cls(**kwargs, rope_parameters=_rope_parameters(llm))


def _vision_config(vision: Mapping[str, Any]) -> InternVLVisionConfig:
    """The native vision config for the original InternViT `vision_config`."""
    if vision.get("model_type", "intern_vit_6b") != "intern_vit_6b":
        raise ConversionError(f"vision_config.model_type {vision.get('model_type')!r} is not InternViT (intern_vit_6b)")
    norm_type = vision.get("norm_type", "rms_norm")
    if norm_type not in ("rms_norm", "layer_norm"):
        raise ConversionError(f"vision_config.norm_type {norm_type!r} is not rms_norm or layer_norm")
    eps = float(vision.get("layer_norm_eps", 1e-6))
    if vision.get("qk_normalization") and eps != 1e-6:  # native q_norm/k_norm always use eps 1e-6
        raise ConversionError(f"vision_config.layer_norm_eps {eps} with qk_normalization: native qk-norm eps is 1e-6")
    return InternVLVisionConfig(
        hidden_size=vision["hidden_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        attention_bias=bool(vision.get("qkv_bias", False)),
        use_qk_norm=bool(vision.get("qk_normalization", False)),
        norm_type=norm_type,
        layer_norm_eps=eps,
        hidden_act=vision.get("hidden_act", "gelu"),
        image_size=vision.get("image_size", 448),
        patch_size=vision.get("patch_size", 14),
        num_channels=vision.get("num_channels", 3),
        initializer_range=vision.get("initializer_range", 0.02),
        use_mean_pooling=True,  # no final norm, as in InternViT
        use_absolute_position_embeddings=True,
    )


def convert_config(config: Mapping[str, Any], *, image_token_id: int) -> InternVLConfig:
    """Map an original InternVLChatConfig dict to InternVLConfig; ``image_token_id`` is `<IMG_CONTEXT>`'s id."""
    if not is_original_format(config):
        raise ConversionError(f"config has architectures {config.get('architectures')!r}: not an InternVLChatModel")
    for field in ("use_backbone_lora", "use_llm_lora"):
        if config.get(field):
            raise ConversionError(f"{field}={config[field]}: merge the LoRA weights before converting")
    if config.get("ps_version", "v2") != "v2":  # v1 leaves the shuffled grid transposed; native has no such mode
        raise ConversionError(f"ps_version {config.get('ps_version')!r}: only 'v2' pixel shuffle is native")
    vision = _vision_config(config["vision_config"])
    text = _text_config(config["llm_config"])
    ratio = float(config.get("downsample_ratio", 0.5))
    image_size = int(config.get("force_image_size") or vision.image_size[0])
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=int((image_size // vision.patch_size[0]) ** 2 * ratio**2),
        downsample_ratio=ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=int(config.get("select_layer", -1)),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(text.tie_word_embeddings),
        architectures=["InternVLForConditionalGeneration"],
    )


Produce = Callable[[re.Match[str], torch.Tensor], list[tuple[str, torch.Tensor]]]


def _to(template: str) -> Produce:
    """A rule target: one tensor under the expanded name."""
    return lambda m, t: [(m.expand(template), t)]


def _split_equal(template: str) -> Produce:
    """InternViT's fused attn.qkv: rows are [q; k; v]."""
    def produce(m: re.Match[str], t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if t.shape[0] % 3:
            raise ConversionError(f"{m.string!r}: fused qkv has {t.shape[0]} rows, not a multiple of 3")
        return [(m.expand(template.format(p)), c.clone()) for p, c in zip("qkv", t.chunk(3, dim=0))]
    return produce


def _split_wqkv(template: str, heads: int, kv_heads: int, head_dim: int) -> Produce:
    """InternLM2's fused wqkv: rows are [kv_heads, heads/kv_heads q heads + k + v, head_dim]."""
    groups = heads // kv_heads
    def produce(m: re.Match[str], t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if t.shape[0] != (heads + 2 * kv_heads) * head_dim:
            raise ConversionError(f"{m.string!r}: {t.shape[0]} rows, expected (heads + 2*kv_heads) * head_dim")
        grid = t.reshape(kv_heads, groups + 2, head_dim, *t.shape[1:])
        parts = {"q": grid[:, :groups], "k": grid[:, groups], "v": grid[:, groups + 1]}
        return [(m.expand(template.format(p)), g.reshape(-1, *t.shape[1:]).clone()) for p, g in parts.items()]
    return produce


def _rules(config: Mapping[str, Any]) -> list[tuple[re.Pattern[str], Produce]]:
    """The (source key pattern, producer) rules for this checkpoint's vision tower and LM family."""
    V, VL, T = "model.vision_tower.", r"vision_model\.encoder\.layers\.(\d+)\.", r"model.vision_tower.encoder.layer.\1."
    rules: list[tuple[str, Produce]] = [
        (r"vision_model\.embeddings\.class_embedding", _to(V + "embeddings.cls_token")),
        (r"vision_model\.embeddings\.position_embedding", _to(V + "embeddings.position_embeddings")),
        (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
         _to(V + r"embeddings.patch_embeddings.projection.\1")),
        (VL + r"attn\.qkv\.(weight|bias)", _split_equal(T + r"attention.{}_proj.\2")),
        (VL + r"attn\.(q|k)_norm\.weight", _to(T + r"attention.\2_norm.weight")),
        (VL + r"attn\.proj\.(weight|bias)", _to(T + r"attention.projection_layer.\2")),
        (VL + r"mlp\.(fc1|fc2)\.(weight|bias)", _to(T + r"mlp.\2.\3")),
        (VL + r"norm1\.(weight|bias)", _to(T + r"layernorm_before.\2")),
        (VL + r"norm2\.(weight|bias)", _to(T + r"layernorm_after.\2")),
        (VL + r"ls(1|2)", _to(T + r"lambda_\2")),
        (r"mlp1\.0\.(weight|bias)", _to(r"model.multi_modal_projector.layer_norm.\1")),
        (r"mlp1\.1\.(weight|bias)", _to(r"model.multi_modal_projector.linear_1.\1")),
        (r"mlp1\.3\.(weight|bias)", _to(r"model.multi_modal_projector.linear_2.\1")),
    ]
    llm = config["llm_config"]
    LL, LT = r"language_model\.model\.layers\.(\d+)\.", r"model.language_model.layers.\1."
    if llm.get("model_type") == "internlm2":
        heads = llm["num_attention_heads"]
        kv_heads = llm.get("num_key_value_heads") or heads
        rules += [
            (r"language_model\.model\.tok_embeddings\.weight", _to("model.language_model.embed_tokens.weight")),
            (LL + r"attention\.wqkv\.(weight|bias)",
             _split_wqkv(LT + r"self_attn.{}_proj.\2", heads, kv_heads, llm["hidden_size"] // heads)),
            (LL + r"attention\.wo\.(weight|bias)", _to(LT + r"self_attn.o_proj.\2")),
            (LL + r"feed_forward\.w1\.weight", _to(LT + "mlp.gate_proj.weight")),
            (LL + r"feed_forward\.w3\.weight", _to(LT + "mlp.up_proj.weight")),
            (LL + r"feed_forward\.w2\.weight", _to(LT + "mlp.down_proj.weight")),
            (LL + r"attention_norm\.weight", _to(LT + "input_layernorm.weight")),
            (LL + r"ffn_norm\.weight", _to(LT + "post_attention_layernorm.weight")),
            (r"language_model\.output\.weight", _to("lm_head.weight")),
        ]
    else:
        if llm.get("model_type") == "phi3":
            suffix = r"self_attn\.(?:qkv|o)_proj\.weight|mlp\.(?:gate_up|down)_proj\.weight"
        else:
            suffix = r"self_attn\.[qkvo]_proj\.(?:weight|bias)|mlp\.(?:gate|up|down)_proj\.(?:weight|bias)"
        rules += [
            (r"language_model\.model\.embed_tokens\.weight", _to("model.language_model.embed_tokens.weight")),
            (LL + rf"({suffix}|input_layernorm\.weight|post_attention_layernorm\.weight)", _to(LT + r"\2")),
            (r"language_model\.lm_head\.weight", _to("lm_head.weight")),
        ]
    rules.append((r"language_model\.model\.norm\.weight", _to("model.language_model.norm.weight")))
    return [(re.compile(pattern), produce) for pattern, produce in rules]


def _native_shapes(config: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Key -> shape of the native model's state dict for this original config (built on the meta device)."""
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(convert_config(config, image_token_id=0))
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_state_dict(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename (and split fused q/k/v of) every original key into the native model's state-dict names."""
    rules = _rules(config)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key in sorted(state):
        match = next(((m, produce) for pattern, produce in rules if (m := pattern.fullmatch(key))), None)
        if match is None:
            raise ConversionError(f"unrecognised key {key!r} in the original checkpoint")
        for new_key, tensor in match[1](match[0], state[key]):
            if new_key in out:
                raise ConversionError(f"keys {origin[new_key]!r} and {key!r} both map to {new_key!r}")
            out[new_key], origin[new_key] = tensor, key
    if sum(t.numel() for t in out.values()) != sum(t.numel() for t in state.values()):
        raise ConversionError("converted tensors do not hold exactly the source elements")  # a split lost some
    embed, head = "model.language_model.embed_tokens.weight", "lm_head.weight"
    if config["llm_config"].get("tie_word_embeddings") and embed in out:
        if head in out and not torch.equal(out[head], out[embed]):
            raise ConversionError(f"tie_word_embeddings is set but {origin[head]!r} differs from {origin[embed]!r}")
        out[head] = out[embed]
    expected = _native_shapes(config)
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(f"{origin[k]!r} -> {k!r}" for k in set(out) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"native model keys missing from the checkpoint: {missing}; unexpected: {unexpected}")
    for k, shape in expected.items():
        if out[k].shape != shape:
            got = tuple(out[k].shape)
            raise ConversionError(f"{origin.get(k, k)!r} -> {k!r} has shape {got}, the native model {tuple(shape)}")
    return out


def load_original_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a local checkpoint folder: model.safetensors, or the shards its index lists (checked)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = load_file(folder / shard)
            listed = {k for k, s in weight_map.items() if s == shard}
            if set(tensors) != listed or set(tensors) & set(state):
                raise ConversionError(f"shard {shard!r} does not hold exactly the keys the index assigns to it")
            state.update(tensors)
        return state
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    found = sorted(p.name for p in folder.iterdir())
    raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json (found {found})")


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
    (the one `pipeline.checkpoints.cache_checkpoint(dst)` then reuses). A remote ``src`` is copied to a scratch
    folder in the cache and deleted afterwards. ``tokenizer`` (folder or hub id) replaces the source tokenizer, which
    is needed when that one is remote code (InternLM2/3). Peak memory is about the checkpoint's size.
    """
    remote = is_remote(src) or is_remote(dst)
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    if remote:
        cache.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix=".convert-", dir=cache) if remote else contextlib.nullcontext("")
    with scratch as work:
        src_dir = _fetch(src, Path(work) / "src", storage_options) if is_remote(src) else _local(src)
        model, tok = _native_model(src_dir, tokenizer, trust_remote_code)
        out = Path(work) / "native" if is_remote(dst) else _local(dst)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        if is_remote(dst):
            fs, path = get_filesystem(dst, storage_options)
            fs.put(str(out) + "/", path.rstrip("/") + "/", recursive=True)
            final = cache / hashlib.sha256(dst.rstrip("/").encode()).hexdigest()[:16]  # cache_checkpoint's naming
            shutil.rmtree(final, ignore_errors=True)
            out = out.rename(final)
    return out
