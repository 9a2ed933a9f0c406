"""Original-format InternVL configs to native ones: vision tower, language-model family, chat format."""


from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from transformers import (
    InternVLConfig,
    InternVLVisionConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedConfig,
    Qwen2Config,
)

from pipeline.errors import ConversionError

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
