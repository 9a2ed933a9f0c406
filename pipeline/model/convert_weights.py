"""Original-format InternVL weights to native names: the vision tower (InternViT-300M / 6B), the projector and
every language-model family (Qwen2/2.5, Llama, Phi-3, InternLM2/3, whose fused wqkv is split). Every source tensor
lands in the native model exactly once; an unknown key is refused by name."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import InternVLForConditionalGeneration

from pipeline.errors import ConversionError
from pipeline.model.convert_config import convert_config

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
