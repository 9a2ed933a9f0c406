"""Original InternVL checkpoints convert to native ones: every weight lands once, outputs match the original math.

The original checkpoints here are tiny and seeded, with the original key names and config layout, for each LM
family (Qwen2, Llama, Phi-3, InternLM2 with fused grouped wqkv, InternLM3) and both InternViT flavours (300M:
LayerNorm + qkv bias; 6B: RMSNorm + qk-normalisation). The reference forward below is plain torch written from the
original modelling code, never transformers' InternVL classes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, InternVLForConditionalGeneration, LlamaConfig, Phi3Config, Qwen2Config

from pipeline.embedded.tiny_model import _corpus
from pipeline.errors import ConversionError
from pipeline.model.checkpoints import cache_checkpoint
from pipeline.model.convert import convert_checkpoint
from pipeline.model.convert_config import chat_template, convert_config, is_original_format
from pipeline.model.convert_weights import convert_state_dict

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
]
IMAGE, PATCH, TOKENS_PER_IMAGE = 56, 14, 4  # 4x4 patches, pixel-shuffled to 2x2 tokens
V_DIM, V_HEADS, V_INTER, V_LAYERS = 32, 2, 64, 2
T_DIM, T_HEADS, T_KV, T_INTER, T_LAYERS = 48, 4, 2, 96, 2
FAMILIES = ["qwen2", "llama", "phi3", "internlm2", "internlm3"]
TOWERS = ["300m", "6b"]
TEMPLATES = {"llama": "Hermes-2", "phi3": "phi3-chat"}  # the others use "internvl2_5", as InternVL 2.5 / 3 do
PHI3_FACTORS = [1.0, 1.1, 1.3, 1.7, 2.2, 3.0]  # short_factor, one per rotary frequency (head_dim 12)


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> Path:
    return write_original_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_original_tokenizer(folder: Path) -> Path:
    """An original-style (transformers 4.x layout) tokenizer: image tokens present, no named tokens, no template."""
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(300), trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token=None,
                         bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         additional_special_tokens=SPECIALS[1:])
    tok.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    cfg.pop("backend", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def token_id(tokenizer_files: Path, token: str) -> int:
    data = json.loads((tokenizer_files / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in data["added_tokens"]}.get(token, data["model"]["vocab"].get(token))


def original_config(family: str, tower: str, tokenizer_files: Path, image_size: int = IMAGE) -> dict:
    """An InternVLChatConfig as the original checkpoints write it (remote-code config layout)."""
    big = tower == "6b"
    vision = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": V_DIM,
        "num_hidden_layers": V_LAYERS, "num_attention_heads": V_HEADS, "intermediate_size": V_INTER,
        "image_size": image_size, "patch_size": PATCH, "num_channels": 3, "hidden_act": "gelu",
        "norm_type": "rms_norm" if big else "layer_norm", "layer_norm_eps": 1e-6, "qkv_bias": not big,
        "qk_normalization": big, "drop_path_rate": 0.1, "dropout": 0.0, "attention_dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 0.1, "use_flash_attn": True,
    }
    llm = {
        "architectures": [f"{family}ForCausalLM"], "model_type": family, "vocab_size": 320, "hidden_size": T_DIM,
        "intermediate_size": T_INTER, "num_hidden_layers": T_LAYERS, "num_attention_heads": T_HEADS,
        "num_key_value_heads": T_KV, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": None, "eos_token_id": token_id(tokenizer_files, "<|endoftext|>"), "pad_token_id": None,
        "torch_dtype": "bfloat16", "attn_implementation": "flash_attention_2", "transformers_version": "4.37.2",
    }
    if family == "qwen2":
        llm.update(use_sliding_window=False, sliding_window=32768, max_window_layers=70)
    elif family == "phi3":
        llm.update(num_key_value_heads=T_HEADS, rope_theta=10000.0, max_position_embeddings=131072,
                   original_max_position_embeddings=4096, sliding_window=262144, embd_pdrop=0.0, resid_pdrop=0.0,
                   rope_scaling={"type": "su", "short_factor": PHI3_FACTORS, "long_factor": [4.0] * 6})
    elif family == "internlm2":  # bias=True exercises the wqkv/wo bias split (the released models have none)
        llm.update(bias=True, rope_scaling={"type": "dynamic", "factor": 2.0},
                   auto_map={"AutoModel": "modeling_internlm2.InternLM2ForCausalLM"})
    elif family == "internlm3":
        llm.update(head_dim=T_DIM // T_HEADS, qkv_bias=False, bias=False,
                   rope_scaling={"rope_type": "dynamic", "factor": 6.0})
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "vision_config": vision, "llm_config": llm, "downsample_ratio": 0.5, "force_image_size": image_size,
        "select_layer": -1, "template": TEMPLATES.get(family, "internvl2_5"), "ps_version": "v2",
        "dynamic_image_size": True,
        "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12, "use_backbone_lora": 0,
        "use_llm_lora": 0, "torch_dtype": "bfloat16",
    }


def original_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights under the original key names (InternVisionModel, mlp1, the LM's own names)."""
    gen = torch.Generator().manual_seed(seed)
    s: dict[str, torch.Tensor] = {}

    def put(prefix: str, shapes: dict[str, tuple[int, ...]], base: float = 0.0) -> None:
        for name, shape in shapes.items():
            s[prefix + name] = base + 0.2 * torch.randn(*shape, generator=gen)

    v, llm = config["vision_config"], config["llm_config"]
    family, kv, hd, vocab = llm["model_type"], llm["num_key_value_heads"], T_DIM // T_HEADS, llm["vocab_size"]
    put("vision_model.embeddings.", {
        "class_embedding": (1, 1, V_DIM), "patch_embedding.weight": (V_DIM, 3, PATCH, PATCH),
        "patch_embedding.bias": (V_DIM,), "position_embedding": (1, (v["image_size"] // PATCH) ** 2 + 1, V_DIM),
    })
    for i in range(V_LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        put(p, {"attn.qkv.weight": (3 * V_DIM, V_DIM), "attn.proj.weight": (V_DIM, V_DIM), "attn.proj.bias": (V_DIM,),
                "mlp.fc1.weight": (V_INTER, V_DIM), "mlp.fc1.bias": (V_INTER,), "mlp.fc2.weight": (V_DIM, V_INTER),
                "mlp.fc2.bias": (V_DIM,)})
        put(p, {"ls1": (V_DIM,), "ls2": (V_DIM,)}, base=0.5)
        put(p, {"norm1.weight": (V_DIM,), "norm2.weight": (V_DIM,)}, base=1.0)
        if v["qkv_bias"]:
            put(p, {"attn.qkv.bias": (3 * V_DIM,)})
        if v["qk_normalization"]:
            put(p, {"attn.q_norm.weight": (V_DIM,), "attn.k_norm.weight": (V_DIM,)}, base=1.0)
        if v["norm_type"] == "layer_norm":
            put(p, {"norm1.bias": (V_DIM,), "norm2.bias": (V_DIM,)})
    put("mlp1.", {"0.weight": (4 * V_DIM,)}, base=1.0)
    put("mlp1.", {"0.bias": (4 * V_DIM,), "1.weight": (T_DIM, 4 * V_DIM), "1.bias": (T_DIM,),
                  "3.weight": (T_DIM, T_DIM), "3.bias": (T_DIM,)})
    if family == "internlm2":
        put("language_model.", {"model.tok_embeddings.weight": (vocab, T_DIM), "output.weight": (vocab, T_DIM)})
    else:
        put("language_model.", {"model.embed_tokens.weight": (vocab, T_DIM), "lm_head.weight": (vocab, T_DIM)})
    put("language_model.model.", {"norm.weight": (T_DIM,)}, base=1.0)
    fused = (T_HEADS + 2 * kv) * hd
    for i in range(T_LAYERS):
        p = f"language_model.model.layers.{i}."
        if family == "internlm2":
            put(p, {"attention.wqkv.weight": (fused, T_DIM), "attention.wqkv.bias": (fused,),
                    "attention.wo.weight": (T_DIM, T_DIM), "attention.wo.bias": (T_DIM,),
                    "feed_forward.w1.weight": (T_INTER, T_DIM), "feed_forward.w3.weight": (T_INTER, T_DIM),
                    "feed_forward.w2.weight": (T_DIM, T_INTER)})
            put(p, {"attention_norm.weight": (T_DIM,), "ffn_norm.weight": (T_DIM,)}, base=1.0)
            continue
        put(p, {"input_layernorm.weight": (T_DIM,), "post_attention_layernorm.weight": (T_DIM,)}, base=1.0)
        put(p, {"self_attn.o_proj.weight": (T_DIM, T_DIM), "mlp.down_proj.weight": (T_DIM, T_INTER)})
        if family == "phi3":
            put(p, {"self_attn.qkv_proj.weight": (fused, T_DIM), "mlp.gate_up_proj.weight": (2 * T_INTER, T_DIM)})
            continue
        put(p, {"self_attn.q_proj.weight": (T_HEADS * hd, T_DIM), "self_attn.k_proj.weight": (kv * hd, T_DIM),
                "self_attn.v_proj.weight": (kv * hd, T_DIM), "mlp.gate_proj.weight": (T_INTER, T_DIM),
                "mlp.up_proj.weight": (T_INTER, T_DIM)})
        if family == "qwen2":
            put(p, {"self_attn.q_proj.bias": (T_HEADS * hd,), "self_attn.k_proj.bias": (kv * hd,),
                    "self_attn.v_proj.bias": (kv * hd,)})
    return s


def write_original(folder: Path, config: dict, state: dict, tokenizer_files: Path, *, shards: int = 1) -> Path:
    """Write config.json, the weights (one file, or shards + index) and the tokenizer files, as the hub has them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for f in tokenizer_files.iterdir():
        shutil.copy2(f, folder / f.name)
    keys = sorted(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors")
        return folder
    weight_map = {}
    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[n::shards]}
        save_file(part, folder / name)
        weight_map |= dict.fromkeys(part, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ---- the reference: the original modelling code's math in plain torch -------------------------------------------


def norm(x, s, prefix, kind, eps=1e-6):
    if kind == "layer_norm":
        return F.layer_norm(x, x.shape[-1:], s[prefix + ".weight"], s[prefix + ".bias"], eps)
    return s[prefix + ".weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def lin(x, s, prefix):
    return F.linear(x, s[prefix + ".weight"], s.get(prefix + ".bias"))


def reference_image_features(s: dict, config: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternVisionModel -> drop CLS -> pixel_shuffle (v2) -> mlp1, as InternVLChatModel.extract_feature does."""
    v = config["vision_config"]
    kind, hd = v["norm_type"], V_DIM // V_HEADS
    x = F.conv2d(pixels, s["vision_model.embeddings.patch_embedding.weight"],
                 s["vision_model.embeddings.patch_embedding.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    b, n = x.shape[0], x.shape[1] + 1
    x = torch.cat([s["vision_model.embeddings.class_embedding"].expand(b, -1, -1), x], 1)
    x = x + s["vision_model.embeddings.position_embedding"]
    hidden = [x]
    for i in range(V_LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        qkv = lin(norm(x, s, p + "norm1", kind), s, p + "attn.qkv")
        q, k, val = qkv.reshape(b, n, 3, V_HEADS, hd).permute(2, 0, 3, 1, 4)
        if v["qk_normalization"]:  # over all heads at once, as InternAttention does
            q = norm(q.transpose(1, 2).flatten(-2), s, p + "attn.q_norm", "rms_norm")
            k = norm(k.transpose(1, 2).flatten(-2), s, p + "attn.k_norm", "rms_norm")
            q, k = (z.view(b, n, V_HEADS, hd).transpose(1, 2) for z in (q, k))
        attn = (torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5, -1) @ val).transpose(1, 2).reshape(b, n, V_DIM)
        x = x + lin(attn, s, p + "attn.proj") * s[p + "ls1"]
        x = x + lin(F.gelu(lin(norm(x, s, p + "norm2", kind), s, p + "mlp.fc1")), s, p + "mlp.fc2") * s[p + "ls2"]
        hidden.append(x)
    x = hidden[config["select_layer"]][:, 1:]
    side = int(x.shape[1] ** 0.5)
    x = x.reshape(b, side, side, -1)  # pixel_shuffle(scale 0.5), ps_version v2
    nb, w, h, c = x.shape
    x = x.view(nb, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(nb, h // 2, w // 2, c * 4).permute(0, 2, 1, 3).contiguous().reshape(b, -1, c * 4)
    x = F.layer_norm(x, x.shape[-1:], s["mlp1.0.weight"], s["mlp1.0.bias"])
    return lin(F.gelu(lin(x, s, "mlp1.1")), s, "mlp1.3")


def rotate_half(x):
    return torch.cat([-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]], -1)


def reference_lm(s: dict, llm: dict, input_ids: torch.Tensor, image_features: torch.Tensor, image_id: int):
    """The LM as each family's original modelling code computes it; returns (hidden states per layer, logits)."""
    family, kv, hd = llm["model_type"], llm["num_key_value_heads"], T_DIM // T_HEADS
    groups, (b, t) = T_HEADS // kv, input_ids.shape
    P = "language_model.model."
    x = s[P + ("tok_embeddings.weight" if family == "internlm2" else "embed_tokens.weight")][input_ids].clone()
    x[input_ids == image_id] = image_features.reshape(-1, T_DIM)
    inv_freq = 1.0 / (llm["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    scale = 1.0
    if family == "phi3":  # Phi3SuScaledRotaryEmbedding, short sequence
        inv_freq = inv_freq / torch.tensor(PHI3_FACTORS)
        ratio = llm["max_position_embeddings"] / llm["original_max_position_embeddings"]
        scale = math.sqrt(1 + math.log(ratio) / math.log(llm["original_max_position_embeddings"]))
    freqs = torch.outer(torch.arange(t).float(), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos() * scale, torch.cat([freqs, freqs], -1).sin() * scale
    mask = torch.full((t, t), float("-inf")).triu(1)
    hidden = [x]
    for i in range(T_LAYERS):
        p = f"{P}layers.{i}."
        if family == "internlm2":  # wqkv rows: [kv head, (groups q heads, k, v), head_dim]
            qkv = lin(norm(x, s, p + "attention_norm", "rms_norm"), s, p + "attention.wqkv")
            qkv = qkv.reshape(b, t, kv, groups + 2, hd)
            q, k, val = qkv[..., :groups, :].reshape(b, t, T_HEADS, hd), qkv[..., -2, :], qkv[..., -1, :]
        else:
            h = norm(x, s, p + "input_layernorm", "rms_norm")
            if family == "phi3":
                q, k, val = lin(h, s, p + "self_attn.qkv_proj").split([T_HEADS * hd, kv * hd, kv * hd], -1)
            else:
                q, k, val = (lin(h, s, p + f"self_attn.{n}_proj") for n in "qkv")
            q, k, val = q.reshape(b, t, T_HEADS, hd), k.reshape(b, t, kv, hd), val.reshape(b, t, kv, hd)
        q, k, val = q.transpose(1, 2), k.transpose(1, 2), val.transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, val = k.repeat_interleave(groups, 1), val.repeat_interleave(groups, 1)  # q head i reads kv head i // groups
        attn = (torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5 + mask, -1) @ val).transpose(1, 2).reshape(b, t, T_DIM)
        if family == "internlm2":
            x = x + lin(attn, s, p + "attention.wo")
            h = norm(x, s, p + "ffn_norm", "rms_norm")
            up = F.silu(lin(h, s, p + "feed_forward.w1")) * lin(h, s, p + "feed_forward.w3")
            x = x + lin(up, s, p + "feed_forward.w2")
            hidden.append(x)
            continue
        x = x + lin(attn, s, p + "self_attn.o_proj")
        h = norm(x, s, p + "post_attention_layernorm", "rms_norm")
        if family == "phi3":
            gate, up = lin(h, s, p + "mlp.gate_up_proj").chunk(2, -1)
        else:
            gate, up = lin(h, s, p + "mlp.gate_proj"), lin(h, s, p + "mlp.up_proj")
        x = x + lin(F.silu(gate) * up, s, p + "mlp.down_proj")
        hidden.append(x)
    x = norm(x, s, P + "norm", "rms_norm")
    head = s["language_model.output.weight" if family == "internlm2" else "language_model.lm_head.weight"]
    return hidden, F.linear(x, head)


def sorted_values(tensors) -> torch.Tensor:
    return torch.sort(torch.cat([t.detach().flatten().float() for t in tensors])).values


# ---- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower", TOWERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_matches_original_math(family, tower, tokenizer_files, tmp_path):
    config = original_config(family, tower, tokenizer_files)
    config["select_layer"] = -2 if family == "llama" else -1  # features from the second-to-last ViT layer
    state = original_state(config, seed=FAMILIES.index(family) * 2 + TOWERS.index(tower))
    src = write_original(tmp_path / "orig", config, state, tokenizer_files, shards=2 if tower == "6b" else 1)
    dst = convert_checkpoint(str(src), str(tmp_path / "native"))
    processor = json.loads((dst / "processor_config.json").read_text())  # what vLLM needs to serve it
    assert processor["image_seq_length"] == TOKENS_PER_IMAGE
    assert processor["image_processor"]["size"] == {"height": IMAGE, "width": IMAGE}

    model, info = InternVLForConditionalGeneration.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
    native = model.state_dict()
    if model.config.tie_word_embeddings:
        del native["lm_head.weight"]
    assert sum(t.numel() for t in native.values()) == sum(t.numel() for t in state.values())
    assert torch.equal(sorted_values(native.values()), sorted_values(state.values()))  # each element exactly once

    image_id = token_id(tokenizer_files, "<IMG_CONTEXT>")
    assert model.config.image_token_id == image_id and model.config.image_seq_length == TOKENS_PER_IMAGE
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))
    text = [token_id(tokenizer_files, "<|im_start|>"), 40, 41]
    start, end = token_id(tokenizer_files, "<img>"), token_id(tokenizer_files, "</img>")
    ids = [*text, start, *[image_id] * TOKENS_PER_IMAGE, end]
    ids = torch.tensor([ids * 2 + [50, 51, 52]])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output
        out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True)
        expected_features = reference_image_features(state, config, pixels)
        expected_hidden, expected_logits = reference_lm(state, config["llm_config"], ids, expected_features, image_id)
    torch.testing.assert_close(features, expected_features, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.hidden_states[1], expected_hidden[1], atol=1e-4, rtol=0)  # after LM layer 0
    torch.testing.assert_close(out.logits, expected_logits, atol=1e-4, rtol=0)


def test_state_dict_bookkeeping_loads_strictly(tokenizer_files):
    config = original_config("internlm2", "6b", tokenizer_files)
    state = original_state(config)
    converted = convert_state_dict(state, config)
    model = InternVLForConditionalGeneration(convert_config(config, image_token_id=9))
    assert set(converted) == set(model.state_dict())
    assert all(converted[k].shape == v.shape for k, v in model.state_dict().items())
    model.load_state_dict(converted, strict=True)
    wqkv = state["language_model.model.layers.0.attention.wqkv.weight"].reshape(T_KV, 4, 12, T_DIM)
    layer = "model.language_model.layers.0.self_attn."
    torch.testing.assert_close(converted[layer + "q_proj.weight"][12:24], wqkv[0, 1], rtol=0, atol=0)  # q1 reads kv0
    torch.testing.assert_close(converted[layer + "k_proj.weight"][12:], wqkv[1, 2], rtol=0, atol=0)
    bias = state["language_model.model.layers.0.attention.wqkv.bias"].reshape(T_KV, 4, 12)
    torch.testing.assert_close(converted[layer + "v_proj.bias"], bias[:, 3].flatten(), rtol=0, atol=0)


def test_unknown_key_is_refused_by_name(tokenizer_files):
    config = original_config("qwen2", "300m", tokenizer_files)
    keys = ("vision_model.encoder.layers.0.attn.rel_pos.weight", "foo",
            "language_model.model.layers.0.self_attn.rotary_emb.inv_freq")
    for key in keys:
        state = original_state(config) | {key: torch.zeros(3)}
        with pytest.raises(ConversionError, match=re.escape(f"unrecognised key '{key}'")):
            convert_state_dict(state, config)


def test_dropped_or_renamed_weight_is_detected(tokenizer_files):
    config = original_config("phi3", "6b", tokenizer_files)
    state = original_state(config)
    dropped = {k: v for k, v in state.items() if k != "mlp1.1.bias"}
    with pytest.raises(ConversionError, match=r"missing.*model\.multi_modal_projector\.linear_1\.bias"):
        convert_state_dict(dropped, config)
    renamed = dict(state)
    renamed["language_model.model.final_norm.weight"] = renamed.pop("language_model.model.norm.weight")
    with pytest.raises(ConversionError, match="unrecognised key 'language_model.model.final_norm.weight'"):
        convert_state_dict(renamed, config)
    shifted = dict(state)  # a layer index the config does not have: recognised name, but no such native weight
    shifted["vision_model.encoder.layers.7.ls1"] = shifted.pop("vision_model.encoder.layers.1.ls1")
    message = "'vision_model.encoder.layers.7.ls1' -> 'model.vision_tower.encoder.layer.7.lambda_1'"
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert_state_dict(shifted, config)
    wrong = state | {"mlp1.3.weight": torch.zeros(T_DIM, T_DIM + 1)}
    with pytest.raises(ConversionError, match=r"'mlp1\.3\.weight' .* shape"):
        convert_state_dict(wrong, config)
    extra_bias = state | {"language_model.model.layers.0.self_attn.o_proj.bias": torch.zeros(T_DIM)}
    with pytest.raises(ConversionError, match="unrecognised key"):  # phi3 has no attention biases
        convert_state_dict(extra_bias, config)


def test_tied_embeddings_fill_lm_head(tokenizer_files, tmp_path):
    config = original_config("qwen2", "300m", tokenizer_files)
    config["llm_config"]["tie_word_embeddings"] = True
    state = original_state(config)
    del state["language_model.lm_head.weight"]
    dst = convert_checkpoint(str(write_original(tmp_path / "o", config, state, tokenizer_files)), str(tmp_path / "n"))
    model, info = InternVLForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not any(info.values()) and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    state["language_model.lm_head.weight"] = torch.zeros_like(state["language_model.model.embed_tokens.weight"])
    with pytest.raises(ConversionError, match="differs"):
        convert_state_dict(state, config)


def test_config_mapping(tokenizer_files):
    config = original_config("internlm2", "6b", tokenizer_files)
    config["select_layer"] = -2
    native = convert_config(config, image_token_id=11)
    v, t = native.vision_config, native.text_config
    assert (v.use_qk_norm, v.norm_type, v.attention_bias, v.use_mean_pooling) == (True, "rms_norm", False, True)
    sizes = (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size)
    assert sizes == (V_DIM, V_LAYERS, V_HEADS, V_INTER)
    assert (v.image_size, v.patch_size, v.layer_norm_eps) == ((IMAGE, IMAGE), (PATCH, PATCH), 1e-6)
    assert isinstance(t, LlamaConfig) and t.attention_bias and not t.mlp_bias and t.head_dim == T_DIM // T_HEADS
    assert t.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
    assert (native.image_token_id, native.vision_feature_layer, native.downsample_ratio) == (11, -2, 0.5)
    assert native.projector_hidden_act == "gelu" and not native.tie_word_embeddings
    phi3 = convert_config(original_config("phi3", "300m", tokenizer_files), image_token_id=11).text_config
    assert isinstance(phi3, Phi3Config) and phi3.rope_parameters["rope_type"] == "longrope"
    assert phi3.rope_parameters["original_max_position_embeddings"] == 4096 and phi3.sliding_window == 262144
    qwen = convert_config(original_config("qwen2", "300m", tokenizer_files), image_token_id=11)
    assert isinstance(qwen.text_config, Qwen2Config) and qwen.vision_config.norm_type == "layer_norm"
    assert qwen.vision_config.attention_bias and not qwen.vision_config.use_qk_norm


@pytest.mark.parametrize(("field", "value", "message"), [
    ("ps_version", "v1", "ps_version 'v1'"),
    ("use_llm_lora", 16, "use_llm_lora=16"),
    ("architectures", ["InternVLForConditionalGeneration"], "not an InternVLChatModel"),
])
def test_config_refusals(tokenizer_files, field, value, message):
    config = original_config("qwen2", "300m", tokenizer_files)
    config[field] = value
    if field == "architectures":
        config["model_type"] = "internvl"
    with pytest.raises(ConversionError, match=message):
        convert_config(config, image_token_id=0)
    config = original_config("internlm3", "6b", tokenizer_files)
    config["vision_config"]["layer_norm_eps"] = 1e-5
    with pytest.raises(ConversionError, match="layer_norm_eps"):
        convert_config(config, image_token_id=0)
    config["llm_config"]["model_type"] = "mistral"
    with pytest.raises(ConversionError, match="llm_config.model_type 'mistral'"):
        convert_config(original_config("qwen2", "300m", tokenizer_files) | {"llm_config": config["llm_config"]},
                       image_token_id=0)


def test_is_original_format():
    assert is_original_format({"architectures": ["InternVLChatModel"]})
    assert is_original_format({"model_type": "internvl_chat"})
    assert not is_original_format({"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl"})


MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]


def test_tokenizer_named_tokens_template_and_generation_config(tokenizer_files, tmp_path):
    config = original_config("qwen2", "300m", tokenizer_files)
    src = write_original(tmp_path / "o", config, original_state(config), tokenizer_files)
    dst = convert_checkpoint(str(src), str(tmp_path / "n"))
    tok = AutoTokenizer.from_pretrained(dst)
    named = (tok.start_image_token, tok.end_image_token, tok.context_image_token, tok.video_token)
    assert named == ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    image_token_id = json.loads((dst / "config.json").read_text())["image_token_id"]
    assert tok.context_image_token_id == token_id(tokenizer_files, "<IMG_CONTEXT>") == image_token_id
    assert tok.start_image_token_id == token_id(tokenizer_files, "<img>")
    assert "<|im_start|>" in tok.all_special_tokens and "<quad>" in tok.all_special_tokens  # kept the original extras
    system = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == (f"<|im_start|>system\n{system}<|im_end|>\n"
                        "<|im_start|>user\n<IMG_CONTEXT>\nDescribe.<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [token_id(tokenizer_files, t) for t in ("<|im_end|>", "<|endoftext|>")]


def test_chat_templates_follow_the_cards_conversation_templates(tokenizer_files):
    tok = AutoTokenizer.from_pretrained(tokenizer_files)
    tok.chat_template = chat_template("phi3-chat")
    system = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == f"<|system|>\n{system}<|end|><|user|>\n<IMG_CONTEXT>\nDescribe.<|end|><|assistant|>\n"
    tok.chat_template = chat_template("internvl2_5")
    turns = [{"role": "system", "content": "Be brief."}, *MESSAGES, {"role": "assistant", "content": "A cat."},
             {"role": "user", "content": "Colour?"}]
    assert tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nDescribe.<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nColour?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ConversionError, match="template 'vicuna_v1.1'"):
        chat_template("vicuna_v1.1")


def test_remote_code_tokenizer_is_refused_unless_replaced(tokenizer_files, tmp_path):
    config = original_config("internlm2", "300m", tokenizer_files)
    src = write_original(tmp_path / "o", config, original_state(config), tokenizer_files)
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    tok_config |= {"tokenizer_class": "InternLM2Tokenizer",
                   "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}
    (src / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ConversionError, match="'InternLM2Tokenizer'.*needs remote code"):
        convert_checkpoint(str(src), str(tmp_path / "n"))
    dst = convert_checkpoint(str(src), str(tmp_path / "n"), tokenizer=str(tokenizer_files))
    assert AutoTokenizer.from_pretrained(dst).context_image_token == "<IMG_CONTEXT>"


def test_fsspec_source_and_destination(tokenizer_files, tmp_path):
    config = original_config("llama", "300m", tokenizer_files)
    state = {k: v.to(torch.bfloat16) for k, v in original_state(config).items()}  # as the released checkpoints are
    local = write_original(tmp_path / "o", config, state, tokenizer_files, shards=3)
    fs = fsspec.filesystem("memory")
    fs.put(str(local) + "/", "/convert-test/orig/", recursive=True)
    try:
        dst = convert_checkpoint("memory://convert-test/orig", "memory://convert-test/native",
                                 cache_dir=tmp_path / "cache")
        assert fs.exists("/convert-test/native/config.json") and fs.exists("/convert-test/native/tokenizer_config.json")
        assert dst == cache_checkpoint("memory://convert-test/native", cache_dir=tmp_path / "cache")  # reused, no copy
        model, info = InternVLForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
        assert not any(info.values()) and model.dtype == torch.bfloat16
        assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
        assert not list((tmp_path / "cache").glob(".convert-*"))  # the scratch copy of the source is gone
    finally:
        fs.rm("/convert-test", recursive=True)


def test_bad_shard_index_and_native_source_are_refused(tokenizer_files, tmp_path):
    config = original_config("qwen2", "300m", tokenizer_files)
    src = write_original(tmp_path / "o", config, original_state(config), tokenizer_files, shards=2)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors"}
    index["weight_map"][key] = other.get(index["weight_map"][key], "model-00001-of-00002.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="shard"):
        convert_checkpoint(str(src), str(tmp_path / "n"))
    native_src = tmp_path / "native-src"
    native_src.mkdir()
    native_config = {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl"}
    (native_src / "config.json").write_text(json.dumps(native_config))
    with pytest.raises(ConversionError, match="not an original-format"):
        convert_checkpoint(str(native_src), str(tmp_path / "n2"))


def test_engine_runs_a_converted_checkpoint(tokenizer_files, tmp_path):
    from pipeline.model.transformers_engine import InternVLEngine

    config = original_config("phi3", "6b", tokenizer_files)
    src = write_original(tmp_path / "o", config, original_state(config), tokenizer_files)
    dst = convert_checkpoint(str(src), str(tmp_path / "n"))
    engine = InternVLEngine.load(str(dst), device="cpu", dtype="float32")
    ids = engine.prompt_ids("Describe.", [1])
    assert ids.count(token_id(tokenizer_files, "<IMG_CONTEXT>")) == TOKENS_PER_IMAGE
    tiles = np.random.default_rng(0).integers(0, 256, (1, IMAGE, IMAGE, 3), dtype=np.uint8)
    out = engine.model.generate(input_ids=torch.tensor([ids]), pixel_values=engine.normalize(tiles), max_new_tokens=3,
                                do_sample=False, eos_token_id=sorted(engine.eos_ids), pad_token_id=engine.pad_id)
    assert out.shape[1] > len(ids)
    assert token_id(tokenizer_files, "<|end|>") in engine.eos_ids  # phi3-chat turns end at <|end|>


def test_remote_code_tokenizer_with_trust_remote_code(tokenizer_files, tmp_path):
    """trust_remote_code lets conversion run the checkpoint's tokenizer code; only its fast backend is kept."""
    config = original_config("internlm2", "300m", tokenizer_files)
    src = write_original(tmp_path / "o", config, original_state(config), tokenizer_files)
    (src / "tokenization_custom.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    tok_config |= {"tokenizer_class": "CustomTokenizer",
                   "auto_map": {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}}
    (src / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ConversionError, match="trust_remote_code"):
        convert_checkpoint(str(src), str(tmp_path / "refused"))
    dst = convert_checkpoint(str(src), str(tmp_path / "n"), trust_remote_code=True)
    native = AutoTokenizer.from_pretrained(dst)
    assert "auto_map" not in json.loads((dst / "tokenizer_config.json").read_text())  # no code travels on
    reference = AutoTokenizer.from_pretrained(str(tokenizer_files))
    assert native("<img>a cat</img>")["input_ids"] == reference("<img>a cat</img>")["input_ids"]


def test_trust_remote_code_needs_a_pinned_revision():
    from pipeline.config import parse_job
    from pipeline.errors import JobError

    base = {"task": "caption", "input": "in", "output": "out", "model": "OpenGVLab/InternVL2_5-2B"}
    for revision in (None, "main", "v1.0"):
        with pytest.raises(JobError, match="40-character commit"):
            parse_job({**base, "trust_remote_code": True, "model_revision": revision})
    job = parse_job({**base, "trust_remote_code": True, "model_revision": "0123456789abcdef0123456789abcdef01234567"})
    assert job.trust_remote_code and job.fingerprint() != parse_job(base).fingerprint()
