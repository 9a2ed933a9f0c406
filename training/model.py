"""The trained tiny model's config and its constructed parts outside the encoder: the projector, the reader heads and
the ask head of the language model's first layer, and the masks of the entries training keeps as constructed
(train_tiny's docstring: why each is there)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.embedded import world as W
from pipeline.embedded.tiny_model import DOWNSAMPLE_RATIO, IMAGE_SEQ_LENGTH
from training import seeing as S

TEXT_HIDDEN = 128
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
HEAD_DIM = 32
MARKER = 100.0  # image tokens carry it in MARKER_DIM; text tokens never
NUM_FEATURES = len(S.GLOBAL_CHANNELS)  # 14: centroid, colour, background, variances, A, B, shape logits
MARKER_DIM = 23
LAST_DIMS = range(32, 32 + NUM_FEATURES)  # layer 0, head 0: the last image block's features
MEAN_DIMS = range(64, 64 + NUM_FEATURES)  # layer 0, head 1: the mean over all image blocks
# the words a question asks about or for (one-hot in ASK_DIMS of their embeddings)
ASKABLE = (*W.SHAPES, *W.COLORS, "shape", "color", "background")
ASK_FLAG_DIM = 24  # embedding flag of an askable word
ASK_DIMS = [*range(14, 23), 25]  # free embedding dims (0-13: features, 23: marker)
ASK_OUT = range(96, 96 + len(ASKABLE))  # layer 0, head 2: the askable words before a token (the question's)
MOTION_DIMS = (80, 81)  # layer 0, heads 0 - 1: the last image block's centroid minus the mean's (video motion)
MOTION_GAIN = 4.0
ASK_FREQ = 14  # rotary pair (nearly constant) that scores the flag
ASK_SCORE = 6.0  # x the normalised flag (>~ 3): askable words score >= ~18, other text 0, image tokens -REPEL
OFFSET = 20.0  # keeps the projector's GELU in its linear range
# per-feature scale into the language model (seeing.GLOBAL_CHANNELS order)
FEATURE_SCALE = torch.tensor([4.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 10.0, 10.0, 3.0, 3.0, 0.5, 0.5, 0.5])
RECENCY_FREQ = 9  # rotary pair whose frequency (1e6^(-9/16) ~ 4.2e-4) makes a recency slope over <= 3600 tokens
CONST_FREQ = 15  # rotary pair of the lowest frequency: constant over the sequence
REPEL = 100.0  # every head but the reader heads scores image tokens -REPEL
MLP_GATE = 100.0  # every MLP unit's gate on an image token: -MLP_GATE (the normalised marker is ~ m_hat)
RECENCY_SIGN = -1.0  # nearer image tokens score higher (the sign of rotate_half)


def build_config(tokenizer):
    """The trained tiny model's InternVLConfig: the constructed encoder's shape and a 2-layer Qwen2."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(**S.vision_config_kwargs())
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS, head_dim=HEAD_DIM, hidden_act="silu",
        max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
        image_seq_length=IMAGE_SEQ_LENGTH, downsample_ratio=DOWNSAMPLE_RATIO, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
    )


def new_model(config, tokenizer, *, seed: int):
    """A seeded model with every constructed part written (encoder, projector, reader and ask heads)."""
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=config.text_config.pad_token_id, bos_token_id=None)
    S.set_vision(model.model.vision_tower)
    set_projector(model)
    set_reader_heads(model)
    set_ask_head(model, tokenizer)
    return model


@torch.no_grad()
def set_projector(model) -> None:
    """Pixel-shuffled tokens (4 x 256 channels) -> LayerNorm -> linear -> GELU -> linear: pass each tile's global
    channels (the same on every token) scaled by FEATURE_SCALE, plus MARKER in MARKER_DIM."""
    proj = model.model.multi_modal_projector
    width = proj.layer_norm.normalized_shape[0]
    assert width == 4 * S.HIDDEN
    # the LayerNorm's statistics are dominated by the four constant channels: its std is ~constant
    x = torch.zeros(width)
    x[[0, S.HIDDEN, 2 * S.HIDDEN, 3 * S.HIDDEN]] = S.BIG
    sigma = float(x.std(unbiased=False))
    zero_channel = S.HIDDEN - 1  # never written
    for p in proj.parameters():
        p.zero_()
    proj.layer_norm.weight.fill_(1.0)
    for i, ch in enumerate(S.GLOBAL_CHANNELS):
        # (LN[ch] - LN[zero]) * sigma = the channel itself, whatever the LayerNorm's mean
        proj.linear_1.weight[i, ch] = sigma
        proj.linear_1.weight[i, zero_channel] = -sigma
        proj.linear_1.bias[i] = OFFSET
        proj.linear_2.weight[i, i] = FEATURE_SCALE[i]
        proj.linear_2.bias[i] = -OFFSET * FEATURE_SCALE[i]
    proj.linear_2.bias[MARKER_DIM] = MARKER


def tile_embedding(features: torch.Tensor) -> torch.Tensor:
    """(N, 14) per-tile global features -> (N, TEXT_HIDDEN) what the projector gives every token of the tile: its
    arithmetic (GELU(f + OFFSET) scaled, minus the offset; very negative shape logits are clipped there too)."""
    out = torch.zeros(features.shape[0], TEXT_HIDDEN)
    out[:, :NUM_FEATURES] = (F.gelu(features + OFFSET) - OFFSET) * FEATURE_SCALE
    out[:, MARKER_DIM] = MARKER
    return out


def frozen_masks(model) -> dict[str, torch.Tensor]:
    """Parameter-name -> mask of the entries the reader heads own (kept as constructed while training)."""
    layer = model.model.language_model.layers[0]
    att = layer.self_attn
    masks = {}
    q = torch.zeros_like(att.q_proj.weight, dtype=torch.bool)
    q[: 2 * HEAD_DIM] = True
    masks["model.language_model.layers.0.self_attn.q_proj.weight"] = q
    qb = torch.zeros_like(att.q_proj.bias, dtype=torch.bool)
    qb[: 2 * HEAD_DIM] = True
    masks["model.language_model.layers.0.self_attn.q_proj.bias"] = qb
    for name in ("k_proj", "v_proj"):
        w = torch.zeros_like(getattr(att, name).weight, dtype=torch.bool)
        w[:HEAD_DIM] = True
        masks[f"model.language_model.layers.0.self_attn.{name}.weight"] = w
        b = torch.zeros_like(getattr(att, name).bias, dtype=torch.bool)
        b[:HEAD_DIM] = True
        masks[f"model.language_model.layers.0.self_attn.{name}.bias"] = b
    o = torch.zeros_like(att.o_proj.weight, dtype=torch.bool)
    o[:, : 2 * HEAD_DIM] = True
    masks["model.language_model.layers.0.self_attn.o_proj.weight"] = o
    masks["model.language_model.layers.0.input_layernorm.weight"] = torch.ones_like(layer.input_layernorm.weight,
                                                                                    dtype=torch.bool)
    emb = torch.zeros_like(model.model.language_model.embed_tokens.weight, dtype=torch.bool)
    emb[:, MARKER_DIM] = True
    masks["model.language_model.embed_tokens.weight"] = emb
    half = HEAD_DIM // 2
    for li, layer in enumerate(model.model.language_model.layers):
        att = layer.self_attn
        pre = f"model.language_model.layers.{li}"
        q = masks.setdefault(f"{pre}.self_attn.q_proj.weight", torch.zeros_like(att.q_proj.weight, dtype=torch.bool))
        qb = masks.setdefault(f"{pre}.self_attn.q_proj.bias", torch.zeros_like(att.q_proj.bias, dtype=torch.bool))
        k = masks.setdefault(f"{pre}.self_attn.k_proj.weight", torch.zeros_like(att.k_proj.weight, dtype=torch.bool))
        kb = masks.setdefault(f"{pre}.self_attn.k_proj.bias", torch.zeros_like(att.k_proj.bias, dtype=torch.bool))
        for head in range(TEXT_HEADS):
            q[head * HEAD_DIM + CONST_FREQ] = q[head * HEAD_DIM + CONST_FREQ + half] = True
            qb[head * HEAD_DIM + CONST_FREQ] = qb[head * HEAD_DIM + CONST_FREQ + half] = True
        for kv in range(TEXT_KV_HEADS):
            k[kv * HEAD_DIM + CONST_FREQ] = k[kv * HEAD_DIM + CONST_FREQ + half] = True
            kb[kv * HEAD_DIM + CONST_FREQ] = kb[kv * HEAD_DIM + CONST_FREQ + half] = True
        norm = masks.setdefault(f"{pre}.input_layernorm.weight",
                                torch.zeros_like(layer.input_layernorm.weight, dtype=torch.bool))
        norm[MARKER_DIM] = True
        # the marker stays what the projector wrote: nothing writes into MARKER_DIM, the MLPs' gates on it are fixed
        o = masks.setdefault(f"{pre}.self_attn.o_proj.weight", torch.zeros_like(att.o_proj.weight, dtype=torch.bool))
        o[MARKER_DIM] = True
        down = torch.zeros_like(layer.mlp.down_proj.weight, dtype=torch.bool)
        down[MARKER_DIM] = True
        masks[f"{pre}.mlp.down_proj.weight"] = down
        gate = torch.zeros_like(layer.mlp.gate_proj.weight, dtype=torch.bool)
        gate[:, MARKER_DIM] = True
        masks[f"{pre}.mlp.gate_proj.weight"] = gate
        post = torch.zeros_like(layer.post_attention_layernorm.weight, dtype=torch.bool)
        post[MARKER_DIM] = True
        masks[f"{pre}.post_attention_layernorm.weight"] = post
    for name, m in _ask_masks(model).items():
        masks[name] = masks[name] | m if name in masks else m
    return masks


@torch.no_grad()
def set_reader_heads(model) -> None:
    """Layer 0 heads 0 and 1 (sharing key/value head 0): keys and values only on image tokens (the marker), head 0
    with a recency slope (rotary pair RECENCY_FREQ) so it reads the image block nearest before the text, head 1
    uniform over all image blocks; values copy the tile features into LAST_DIMS / MEAN_DIMS."""
    lm = model.model.language_model
    layer = lm.layers[0]
    att = layer.self_attn
    layer.input_layernorm.weight.fill_(1.0)
    lm.embed_tokens.weight[:, MARKER_DIM] = 0.0
    # rms of an image token ~ sqrt(MARKER^2 / hidden): the marker after the norm is ~ sqrt(hidden)
    m_hat = math.sqrt(TEXT_HIDDEN)
    rms = MARKER / m_hat
    half = HEAD_DIM // 2
    for p in (att.q_proj.weight, att.k_proj.weight, att.v_proj.weight):
        p[: 2 * HEAD_DIM if p is att.q_proj.weight else HEAD_DIM] = 0.0
    att.q_proj.bias[: 2 * HEAD_DIM] = 0.0
    att.k_proj.bias[:HEAD_DIM] = 0.0
    att.v_proj.bias[:HEAD_DIM] = 0.0
    omega = 1e6 ** (-2 * RECENCY_FREQ / HEAD_DIM)
    scale = math.sqrt(HEAD_DIM)
    slope, base = 0.03, 25.0  # score ~ base - (slope / omega) sin(omega d)
    # keys: the constant pair and the recency pair's second component carry the marker (1 after scaling)
    att.k_proj.weight[CONST_FREQ, MARKER_DIM] = 1.0 / m_hat
    att.k_proj.weight[RECENCY_FREQ + half, MARKER_DIM] = 1.0 / m_hat
    for head in (0, 1):
        att.q_proj.bias[head * HEAD_DIM + CONST_FREQ] = base * scale
    att.q_proj.bias[RECENCY_FREQ] = RECENCY_SIGN * (slope / omega) * scale
    for i in range(NUM_FEATURES):
        att.v_proj.weight[i, i] = rms
        att.o_proj.weight[:, i] = 0.0
        att.o_proj.weight[:, HEAD_DIM + i] = 0.0
        att.o_proj.weight[LAST_DIMS[i], i] = 1.0
        att.o_proj.weight[MEAN_DIMS[i], HEAD_DIM + i] = 1.0
    for j in range(NUM_FEATURES, HEAD_DIM):
        att.o_proj.weight[:, j] = 0.0
        att.o_proj.weight[:, HEAD_DIM + j] = 0.0
    for i, d in enumerate(MOTION_DIMS):  # centroid x, y: last minus mean
        att.o_proj.weight[d, i] = MOTION_GAIN
        att.o_proj.weight[d, HEAD_DIM + i] = -MOTION_GAIN
    # every other head of both layers: a fixed score of -REPEL on image tokens (the constant rotary pair), so only
    # the reader heads see the image; training then needs no image tokens in those heads (forward.text_logits)
    for li, layer in enumerate(lm.layers):
        att = layer.self_attn
        layer.input_layernorm.weight[MARKER_DIM] = 1.0
        # image tokens stay as the projector made them, so that layer 1's -REPEL on them holds whatever training
        # does: no output writes MARKER_DIM, and every MLP unit's gate is -MLP_GATE on the marker (SiLU(-100) = 0
        # on image tokens; text tokens have no marker, so it is inert there)
        att.o_proj.weight[MARKER_DIM] = 0.0
        layer.mlp.down_proj.weight[MARKER_DIM] = 0.0
        layer.post_attention_layernorm.weight[MARKER_DIM] = 1.0
        layer.mlp.gate_proj.weight[:, MARKER_DIM] = -MLP_GATE / m_hat
        for head in range(2 if li == 0 else 0, TEXT_HEADS):
            for d in (CONST_FREQ, CONST_FREQ + half):
                att.q_proj.weight[head * HEAD_DIM + d] = 0.0
                att.q_proj.bias[head * HEAD_DIM + d] = 0.0
            att.q_proj.bias[head * HEAD_DIM + CONST_FREQ] = REPEL * scale / 10.0
        for kv in range(1 if li == 0 else 0, TEXT_KV_HEADS):
            for d in (CONST_FREQ, CONST_FREQ + half):
                att.k_proj.weight[kv * HEAD_DIM + d] = 0.0
                att.k_proj.bias[kv * HEAD_DIM + d] = 0.0
            att.k_proj.weight[kv * HEAD_DIM + CONST_FREQ, MARKER_DIM] = -10.0 / m_hat


def askable_ids(tokenizer) -> dict[int, int]:
    """Token id -> index in ASKABLE, for each askable word with and without its leading space."""
    out = {}
    for i, word in enumerate(ASKABLE):
        for form in (word, " " + word):
            (tid,) = tokenizer(form, add_special_tokens=False)["input_ids"]
            out[tid] = i
    return out


@torch.no_grad()
def set_ask_head(model, tokenizer) -> None:
    """Layer 0 head 2 (key/value head 1, shared with head 3): copies which shape / colour words came before a token
    into ASK_OUT. Askable words carry a flag (ASK_FLAG_DIM) and their one-hot (ASK_DIMS) in their embeddings; the
    head's query is a constant on rotary pair ASK_FREQ, its key the flag, its value the one-hot. So at an answer's
    tokens the question's shape or colour sits next to what the reader heads saw, and the MLP only has to compare
    them: learnt from scratch, "which image shows a circle?" is a saddle (each pair asks both its shapes, so neither
    the image nor the question alone says anything about the answer) that training did not leave in 3000 steps."""
    lm = model.model.language_model
    att = lm.layers[0].self_attn
    emb = lm.embed_tokens.weight
    emb[:, ASK_FLAG_DIM] = 0.0
    emb[:, list(ASK_DIMS)] = 0.0
    for tid, i in askable_ids(tokenizer).items():
        emb[tid, ASK_FLAG_DIM] = 1.0
        emb[tid, ASK_DIMS[i]] = 1.0
    q0, kv0 = 2 * HEAD_DIM, HEAD_DIM
    keep_q = att.q_proj.bias[q0 + CONST_FREQ].clone()  # the -REPEL on image tokens (set_reader_heads)
    keep_k = att.k_proj.weight[kv0 + CONST_FREQ].clone()
    att.q_proj.weight[q0:q0 + HEAD_DIM] = 0.0
    att.q_proj.bias[q0:q0 + HEAD_DIM] = 0.0
    att.q_proj.bias[q0 + CONST_FREQ] = keep_q
    att.q_proj.bias[q0 + ASK_FREQ] = ASK_SCORE * math.sqrt(HEAD_DIM)
    for proj in (att.k_proj, att.v_proj):
        proj.weight[kv0:kv0 + HEAD_DIM] = 0.0
        proj.bias[kv0:kv0 + HEAD_DIM] = 0.0
    att.k_proj.weight[kv0 + CONST_FREQ] = keep_k
    att.k_proj.weight[kv0 + ASK_FREQ, ASK_FLAG_DIM] = 1.0
    for j, d in enumerate(ASK_DIMS):
        att.v_proj.weight[kv0 + j, d] = 1.0
    att.o_proj.weight[:, q0:q0 + HEAD_DIM] = 0.0
    for j, d in enumerate(ASK_OUT):
        att.o_proj.weight[d, q0 + j] = 1.0


def _ask_masks(model) -> dict[str, torch.Tensor]:
    lm = model.model.language_model
    att = lm.layers[0].self_attn
    pre = "model.language_model.layers.0.self_attn"
    q0, kv0 = 2 * HEAD_DIM, HEAD_DIM
    out = {}
    for name, rows in (("q_proj", slice(q0, q0 + HEAD_DIM)), ("k_proj", slice(kv0, kv0 + HEAD_DIM)),
                       ("v_proj", slice(kv0, kv0 + HEAD_DIM))):
        for kind in ("weight", "bias"):
            m = torch.zeros_like(getattr(getattr(att, name), kind), dtype=torch.bool)
            m[rows] = True
            out[f"{pre}.{name}.{kind}"] = m
    o = torch.zeros_like(att.o_proj.weight, dtype=torch.bool)
    o[:, q0:q0 + HEAD_DIM] = True
    out[f"{pre}.o_proj.weight"] = o
    e = torch.zeros_like(lm.embed_tokens.weight, dtype=torch.bool)
    e[:, [ASK_FLAG_DIM, *ASK_DIMS]] = True
    out["model.language_model.embed_tokens.weight"] = e
    return out
