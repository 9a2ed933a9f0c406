"""Train the tiny InternVL that sees the world of `world.py`: `python -m pipeline.embedded.train_tiny OUT --seed 0`.

Writes OUT/ (config.json, generation_config.json, model.safetensors, tokenizer files with the chat template): a
native `InternVLForConditionalGeneration` checkpoint that the pipeline loads like any other, whose answers mean
something. Deterministic for a seed and thread count (README: the measured run and its time).

Architecture: the real one at small width. 448 px tiles, 14 px patches, a 4-layer InternViT-style encoder (256 wide,
16 heads, RMSNorm), pixel shuffle 0.5 to 256 tokens per tile, the InternVL MLP projector, a 2-layer Qwen2 language model
(128 wide, 4 heads of 32, 2 key/value heads), the InternVL special tokens and a chat template; a byte-level BPE
tokenizer trained on the world's prompts, so every answer word is one token.

A mixed model, part constructed by hand, part trained, on the model's real inputs (tiles cut by pipeline.media,
prompts built by pipeline.model.engine.Prompter):
1. constructed: the encoder's first three layers and layer 4's attention (seeing.py: chroma mask, shape moments,
   colours, background); trained: layer 4's MLP, the shape classifier, on thumbnails / single tiles / video frames;
2. constructed: the projector, which passes each tile's global features (moments, colours, shape logits) and a
   marker;
3. constructed: three heads of the language model's first layer: head 0 reads the image block nearest before the
   text (the thumbnail, the second image of a pair, the last video frame), head 1 the mean of all image blocks (last
   frame minus the mean: the motion), head 2 the shape / colour words of the question (set_ask_head); every other
   head scores image tokens -REPEL, the MLPs are gated off on image tokens and nothing writes the marker, so the
   image reaches the text through heads 0 and 1 only;
4. trained: everything else of the language model, on the answers (loss on answer tokens and the closing
   <|im_end|>), with `text_logits`, a forward over the text tokens alone that joins heads 0 and 1's image side
   (image_part, cached once per sequence) into their softmax: equal to the transformers forward on the full prompt
   (tests/unit/embedded/test_train_parity.py), at a few hundredths of its cost.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.embedded import seeing as S
from pipeline.embedded import world as W
from pipeline.embedded.tiny_model import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_MESSAGE,
    DOWNSAMPLE_RATIO,
    IM_END,
    IM_START,
    IMAGE_SEQ_LENGTH,
    IMAGE_SIZE,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    PAD_TOKEN,
    PATCH_SIZE,
    SPECIAL_TOKENS,
    VIDEO_TOKEN,
)
from pipeline.media.images import load_tiles
from pipeline.media.tiling import tile_image
from pipeline.media.video import sample_frame_indices

IGNORE = -100
NUM_FRAMES = 8
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


# ---------------------------------------------------------------------------------------------- tokenizer

def world_texts() -> list[str]:
    """Every prompt and answer of the world, plus the template's own words."""
    texts = [DEFAULT_SYSTEM_MESSAGE, W.CAPTION, W.WHAT_SHAPE, W.WHAT_COLOR, W.WHAT_BACKGROUND, W.VIDEO_CAPTION,
             W.WHICH_WAY, "system", "user", "assistant", "Image-1: ", "Image-2: "]
    texts += [W.which_image(s) for s in W.SHAPES] + [W.is_there(s) for s in W.SHAPES] + [W.is_color(c) for c in W.COLORS]
    texts += [f"Frame{i}: " for i in range(1, 10)]
    for color in W.COLORS:
        for shape in W.SHAPES:
            texts += [f"a {color} {shape} on a {bg} background" for bg in W.BACKGROUNDS]
            texts += [f"a {color} {shape} moving {d}" for d in W.DIRECTIONS]
    texts += [*W.SHAPES, *W.COLORS, *W.BACKGROUNDS, *W.DIRECTIONS, "yes", "no", "Image-1", "Image-2"]
    return texts


def build_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer in which every answer word is one token (with and without its leading
    space); the InternVL special tokens and the chat template of tiny_model."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    texts = world_texts()
    words = sorted({w for t in texts for w in re.findall(r"[A-Za-z]+", t)})
    corpus = texts * 20 + [" ".join(words)] * 20 + words * 20
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token=None, bos_token=None,
        eos_token=IM_END, pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO_TOKEN],
        start_image_token=IMG_START, end_image_token=IMG_END, context_image_token=IMG_CONTEXT, video_token=VIDEO_TOKEN,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    for word in [*W.SHAPES, *W.COLORS, *W.BACKGROUNDS, *W.DIRECTIONS, "yes", "no"]:
        for form in (word, " " + word):
            if len(tokenizer(form, add_special_tokens=False)["input_ids"]) != 1:
                raise AssertionError(f"{form!r} is not one token")
    return tokenizer


# ---------------------------------------------------------------------------------------------- model

def build_config(tokenizer):
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


def _frozen_masks(model) -> dict[str, torch.Tensor]:
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
    masks["model.language_model.layers.0.input_layernorm.weight"] = torch.ones_like(layer.input_layernorm.weight, dtype=torch.bool)
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
        norm = masks.setdefault(f"{pre}.input_layernorm.weight", torch.zeros_like(layer.input_layernorm.weight, dtype=torch.bool))
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
    # the reader heads see the image; training then needs no image tokens in those heads (train_tiny.text_logits)
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
    half = HEAD_DIM // 2
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


REPEL = 100.0
MLP_GATE = 100.0  # every MLP unit's gate on an image token: -MLP_GATE (the normalised marker is ~ m_hat)


RECENCY_SIGN = -1.0  # nearer image tokens score higher (the sign of rotate_half)


# ---------------------------------------------------------------------------------------------- samples

@dataclass
class Sample:
    """One training sample: per-tile features and its questions with answers."""

    kind: str  # "image" | "pair" | "video"
    tiles_per_image: tuple[int, ...]
    features: torch.Tensor  # (tiles, 11): seeing.fast_features (the shape logits come from the classifier)
    qa: list[tuple[str, str]]
    shape_tiles: list[tuple[int, int]]  # (tile index, shape class) of tiles that show the whole shape (classifier)

    @property
    def layout(self) -> tuple:
        return (self.kind, self.tiles_per_image)


TRAIN_TILES = {1: 0.22, 3: 0.08, 4: 0.08, 5: 0.14, 7: 0.08, 9: 0.08, 10: 0.1, 11: 0.08, 13: 0.14}
PAIR_TILES = {1: 0.4, 3: 0.15, 4: 0.15, 5: 0.15, 7: 0.15}  # per image of a pair (max_tiles 12 // 2 = 6)


def _pick(rng: np.random.Generator, weights: dict[int, float]) -> int:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], dtype=np.float64)
    return int(keys[rng.choice(len(keys), p=p / p.sum())])


def train_size(rng: np.random.Generator, tiles: int, *, max_tiles: int = 12) -> tuple[int, int]:
    """An image size with exactly `tiles` tiles; mostly at most 1200 px per side (cheap to draw), sometimes any."""
    sides = (W.IMAGE_SIDES[0], 1200) if rng.random() < 0.75 else W.IMAGE_SIDES
    for _ in range(5000):
        width, height = W.sample_size(rng, sides=sides)
        if W.tiles_for(width, height, max_tiles=max_tiles) == tiles:
            return width, height
    return W.size_with_tiles(rng, tiles, max_tiles=max_tiles)


def image_qa(scene: W.Scene) -> list[tuple[str, str]]:
    qa = list(W.image_answers(scene).items())
    qa += [(q, "yes" if yes else "no") for q, yes in W.image_yes_no(scene).items()]
    return qa


def make_image(rng: np.random.Generator) -> Sample:
    drawn = W.draw_image(rng, size=train_size(rng, _pick(rng, TRAIN_TILES)))
    tiles = load_tiles(drawn.data, max_tiles=12).pixels
    return Sample("image", (len(tiles),), S.fast_features(tiles), image_qa(drawn.scene),
                  [(len(tiles) - 1, W.SHAPES.index(drawn.scene.shape))])


def make_pair(rng: np.random.Generator) -> Sample:
    sizes = (train_size(rng, _pick(rng, PAIR_TILES), max_tiles=6), train_size(rng, _pick(rng, PAIR_TILES), max_tiles=6))
    pair = W.draw_pair(rng, sizes=sizes)
    parts = [load_tiles(im.data, max_tiles=6).pixels for im in pair.images]
    shapes = tuple(im.scene.shape for im in pair.images)
    qa = [(W.which_image(s), "Image-1" if s == shapes[0] else "Image-2") for s in shapes]
    n0 = len(parts[0])
    return Sample("pair", (n0, len(parts[1])), S.fast_features(np.concatenate(parts)), qa,
                  [(n0 - 1, W.SHAPES.index(shapes[0])), (n0 + len(parts[1]) - 1, W.SHAPES.index(shapes[1]))])


def video_frames(spec: W.VideoSpec) -> np.ndarray:
    """The 8 frames the pipeline samples from spec's video, rendered directly and passed through the same codec (an
    8-frame H.264 stream at the video's size), without drawing and encoding every frame."""
    import av

    indices = sample_frame_indices(num_frames=spec.num_frames, fps=spec.fps, num_segments=NUM_FRAMES)
    data = W.encode_video([spec.frame(i) for i in indices], fps=spec.fps)
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == NUM_FRAMES
    return np.stack(frames)


def make_video(rng: np.random.Generator) -> Sample:
    spec = W.sample_video_spec(rng)
    frames = video_frames(spec)
    tiles = np.concatenate([tile_image(Image.fromarray(f, "RGB"), min_tiles=1, max_tiles=1).pixels for f in frames])
    qa = list(W.video_answers(spec.scene, spec.direction).items())
    label = W.SHAPES.index(spec.scene.shape)
    return Sample("video", (1,) * NUM_FRAMES, S.fast_features(tiles), qa, [(i, label) for i in (0, 7)])


MAKERS = {"image": make_image, "pair": make_pair, "video": make_video}
KIND_ID = {"image": 1, "pair": 2, "video": 3}


def make_sample(seed: int, kind: str, index: int) -> Sample:
    """The index-th sample of a kind: a pure function of (seed, kind, index)."""
    return MAKERS[kind](np.random.default_rng([seed, KIND_ID[kind], index]))


def _make_chunk(args: tuple[int, str, list[int]]) -> list[Sample]:
    seed, kind, indices = args
    torch.set_num_threads(1)
    return [make_sample(seed, kind, i) for i in indices]


def make_samples(seed: int, plan: dict[str, int], *, workers: int) -> list[Sample]:
    """Samples of each kind (same result for any worker count)."""
    jobs = []
    for kind, count in plan.items():
        step = 25
        jobs += [(seed, kind, list(range(lo, min(count, lo + step)))) for lo in range(0, count, step)]
    if workers <= 1:
        chunks = [_make_chunk(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_make_chunk, jobs, chunksize=1)
    return [s for c in chunks for s in c]


# ---------------------------------------------------------------------------------------------- shape classifier

def train_shape_head(model, samples: Sequence[Sample], *, seed: int, steps: int, log) -> None:
    """Layer 4's MLP: A and B of a tile that shows a whole shape -> shape logits (C_SHAPE..+3). Inputs are
    standardised inside fc1 (the standardisation folded into its weights)."""
    xs, ys = [], []
    for s in samples:
        for tile, label in s.shape_tiles:
            xs.append(s.features[tile, S.CLASSIFIER_FEATURES])
            ys.append(label)
    x = torch.stack(xs).double()
    y = torch.tensor(ys)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xn = ((x - mu) / sd).float()
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(xn.shape[1], S.MLP), torch.nn.GELU(), torch.nn.Linear(S.MLP, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.0))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    n = len(xn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits at every barrier
    for step in range(steps):
        idx = torch.randint(0, n, (256,), generator=gen)
        loss = F.cross_entropy(net(xn[idx]), y[idx])
        for g in opt.param_groups:
            g["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    with torch.no_grad():
        acc = float((net(xn).argmax(-1) == y).float().mean())
    log(f"  shape classifier: {n} tiles, train accuracy {acc:.4f}")
    mlp = model.model.vision_tower.encoder.layer[3].mlp
    with torch.no_grad():
        w1 = net[0].weight.double() / sd[None, :]
        b1 = net[0].bias.double() - (w1 * mu[None, :]).sum(1)
        mlp.fc1.weight.zero_()
        mlp.fc1.weight[:, S.CLASSIFIER_INPUTS] = w1.float()
        mlp.fc1.bias.copy_(b1.float())
        mlp.fc2.weight.zero_()
        mlp.fc2.bias.zero_()
        mlp.fc2.weight[S.C_SHAPE:S.C_SHAPE + 3] = net[2].weight
        mlp.fc2.bias[S.C_SHAPE:S.C_SHAPE + 3] = net[2].bias


@torch.no_grad()
def shape_logits(model, inputs: torch.Tensor) -> torch.Tensor:
    """Layer 4's MLP on (N, 2) A, B -> (N, 3): the same arithmetic as the encoder."""
    mlp = model.model.vision_tower.encoder.layer[3].mlp
    w1 = mlp.fc1.weight[:, S.CLASSIFIER_INPUTS]
    h = F.gelu(inputs @ w1.T + mlp.fc1.bias)
    return h @ mlp.fc2.weight[S.C_SHAPE:S.C_SHAPE + 3].T + mlp.fc2.bias[S.C_SHAPE:S.C_SHAPE + 3]


def full_features(model, features: torch.Tensor) -> torch.Tensor:
    """(N, 11) fast features + the classifier's logits -> (N, 14), the order of seeing.GLOBAL_CHANNELS."""
    return torch.cat([features, shape_logits(model, features[:, S.CLASSIFIER_FEATURES])], dim=-1)


# ---------------------------------------------------------------------------------------------- language model

class Layouts:
    """Per (layout, question): the prompt's text token ids and their positions in the full prompt (exactly
    Prompter.prompt_ids), and the positions of each tile's image tokens."""

    def __init__(self, tokenizer) -> None:
        from pipeline.model.engine import Prompter

        self.tokenizer = tokenizer
        self.prompter = Prompter(tokenizer, IMAGE_SEQ_LENGTH)
        self.image_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.eos_id = tokenizer.convert_tokens_to_ids(IM_END)
        self._cache: dict = {}
        self._answers: dict = {}

    def prompt(self, layout: tuple, question: str) -> tuple[list[int], list[int], int]:
        """(text ids, their positions, the first image token's position); image tokens follow tile by tile."""
        key = (layout, question)
        if key not in self._cache:
            kind, tiles = layout
            ids = self.prompter.prompt_ids(question, list(tiles), video=kind == "video")
            text = [(i, t) for i, t in enumerate(ids) if t != self.image_id]
            image = [i for i, t in enumerate(ids) if t == self.image_id]
            assert len(image) == sum(tiles) * IMAGE_SEQ_LENGTH
            self._cache[key] = ([t for _, t in text], [i for i, _ in text], image)
        return self._cache[key]

    def answer(self, text: str) -> list[int]:
        if text not in self._answers:
            self._answers[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]
        return self._answers[text]


def _rope(lm, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lm.rotary_emb(x, positions)


def _heads(proj, x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, _ = x.shape
    return proj(x).view(b, t, n, HEAD_DIM).transpose(1, 2)


@torch.no_grad()
def image_part(model, pos: torch.Tensor, img: torch.Tensor, img_pos: torch.Tensor,
               img_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What layer 0's reader heads (0 and 1, key/value head 0) get from the image tokens at each text position:
    the log-sum-exp of their scores on the image keys (B, 2, T) and the image values' softmax-weighted mean
    (B, 2, T, HEAD_DIM). All the entries involved are constructed and frozen and the reader queries are their bias
    alone (q_proj rows zero), so this depends on the sample and the positions only: computed once per training
    item, the language model's training never touches an image token again."""
    lm = model.model.language_model
    layer = lm.layers[0]
    att = layer.self_attn
    assert not att.q_proj.weight[: 2 * HEAD_DIM].any(), "reader queries must be bias-only"
    b, t = pos.shape
    q = att.q_proj.bias[: 2 * HEAD_DIM].view(1, 2, 1, HEAD_DIM).expand(b, 2, t, HEAD_DIM)
    cos, sin = _rope(lm, img, pos)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    shared = img.stride(0) == 0 and img_pos.stride(0) == 0  # one image for every row (make_sample_items)
    one = slice(0, 1) if shared else slice(None)
    xi = layer.input_layernorm(img[one])
    ki = _heads(att.k_proj, xi, TEXT_KV_HEADS)[:, :1]
    vi = _heads(att.v_proj, xi, TEXT_KV_HEADS)[:, :1]
    ci, si = _rope(lm, xi, img_pos[one])
    ki = ki * ci[:, None] + _rotate_half(ki) * si[:, None]
    scores = (q @ ki.transpose(-1, -2)) / math.sqrt(HEAD_DIM)  # (B, 2, T, I)
    mask = (img_pos[:, None, :] < pos[:, :, None]) & img_valid[:, None, :]  # (B, T, I)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where no image token precedes
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return lse, weights @ vi


def text_logits(model, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, img_lse: torch.Tensor,
                img_value: torch.Tensor) -> torch.Tensor:
    """Logits at the text tokens of B prompts, as the full model computes them there (tests/unit/embedded checks
    it against the transformers forward): the image tokens reach the text only through layer 0's reader heads
    (every other head scores them -REPEL, exp(-100) of a weight), whose image side is image_part's (img_lse,
    img_value), joined to their text side in one softmax. ids/pos/valid: (B, T) text tokens, their positions in the
    full prompt, not padding."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    lm = model.model.language_model
    h = lm.embed_tokens(ids)
    b, t, _ = h.shape
    causal = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]  # (B, Tq, Tk)
    causal = causal | torch.eye(t, dtype=torch.bool)[None]
    cos, sin = _rope(lm, h, pos)
    for li, layer in enumerate(lm.layers):
        att = layer.self_attn
        x = layer.input_layernorm(h)
        q = _heads(att.q_proj, x, TEXT_HEADS)
        k = _heads(att.k_proj, x, TEXT_KV_HEADS)
        v = _heads(att.v_proj, x, TEXT_KV_HEADS)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(TEXT_HEADS // TEXT_KV_HEADS, dim=1)
        v = v.repeat_interleave(TEXT_HEADS // TEXT_KV_HEADS, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)  # (B, H, Tq, Tk)
        scores = scores.masked_fill(~causal[:, None], float("-inf"))
        if li == 0:
            both = torch.softmax(torch.cat([scores[:, :2], img_lse[..., None]], dim=-1), dim=-1)
            reader = both[..., :t] @ v[:, :2] + both[..., t:] * img_value
            rest = torch.softmax(scores[:, 2:], dim=-1) @ v[:, 2:]
            out = torch.cat([reader, rest], dim=1)
        else:
            out = torch.softmax(scores, dim=-1) @ v
        h = h + att.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


@dataclass
class Item:
    """One training sequence: prompt text + answer, its positions, targets and the reader heads' image side."""

    kind: str
    ids: torch.Tensor  # (T,)
    pos: torch.Tensor
    target: torch.Tensor
    img_lse: torch.Tensor  # (2, T)
    img_value: torch.Tensor  # (2, T, HEAD_DIM)


def make_item(model, layouts: Layouts, sample: Sample, emb: torch.Tensor, question: str, answer: str) -> Item:
    """emb: (tiles, hidden) what the projector gives every token of each tile."""
    return make_sample_items(model, layouts, sample, emb, [(question, answer)])[0]


def make_sample_items(model, layouts: Layouts, sample: Sample, emb: torch.Tensor,
                      qa: Sequence[tuple[str, str]]) -> list[Item]:
    """One Item per (question, answer) of a sample; the image side computed for all its questions at once."""
    rows = []
    for question, answer in qa:
        ids, pos, image = layouts.prompt(sample.layout, question)
        ans = layouts.answer(answer)
        full_pos = pos + list(range(pos[-1] + 1, pos[-1] + len(ans)))
        rows.append((ids + ans[:-1], full_pos, [IGNORE] * (len(ids) - 1) + ans, image))
    image = rows[0][3]
    assert all(r[3] == image for r in rows)  # the questions follow the image tokens
    t = max(len(r[0]) for r in rows)
    pos = torch.stack([torch.tensor(r[1] + [r[1][-1] + 1 + j for j in range(t - len(r[1]))]) for r in rows])
    img = emb.repeat_interleave(IMAGE_SEQ_LENGTH, dim=0)[None].expand(len(rows), -1, -1)
    img_pos = torch.tensor(image)[None].expand(len(rows), -1)
    lse, value = image_part(model, pos, img, img_pos, torch.ones(img_pos.shape, dtype=torch.bool))
    return [Item(sample.kind, torch.tensor(ids), torch.tensor(p), torch.tensor(tg), lse[i, :, :len(ids)],
                 value[i, :, :len(ids)]) for i, (ids, p, tg, _) in enumerate(rows)]


def _collate(items: Sequence[Item], pad_id: int) -> tuple[torch.Tensor, ...]:
    t = max(len(it.ids) for it in items)
    bsz = len(items)
    ids = torch.full((bsz, t), pad_id)
    pos = torch.zeros((bsz, t), dtype=torch.long)
    valid = torch.zeros((bsz, t), dtype=torch.bool)
    target = torch.full((bsz, t), IGNORE)
    lse = torch.full((bsz, 2, t), float("-inf"))
    value = torch.zeros((bsz, 2, t, HEAD_DIM))
    for i, it in enumerate(items):
        n = len(it.ids)
        ids[i, :n] = it.ids
        pos[i, :n] = it.pos
        pos[i, n:] = it.pos[-1] + 1 + torch.arange(t - n)
        valid[i, :n] = True
        target[i, :n] = it.target
        lse[i, :, :n] = it.img_lse
        value[i, :, :n] = it.img_value
    return ids, pos, valid, target, lse, value


def lm_batch_logits(model, items: Sequence[Item], pad_id: int) -> torch.Tensor:
    """(B, T, vocab) logits at the items' text tokens (right-padded)."""
    ids, pos, valid, _, lse, value = _collate(items, pad_id)
    return text_logits(model, ids, pos, valid, lse, value)


def lm_batch(model, items: Sequence[Item], pad_id: int) -> tuple[torch.Tensor, dict]:
    """Loss (mean over answer tokens and <|im_end|>) of a batch of items."""
    ids, pos, valid, target, lse, value = _collate(items, pad_id)
    logits = text_logits(model, ids, pos, valid, lse, value)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
    with torch.no_grad():
        ok = target != IGNORE
        exact = ((logits.argmax(-1) == target) | ~ok).all(-1).float().mean()
    return loss, {"loss": float(loss.detach()), "exact": float(exact)}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_items(model, layouts: Layouts, samples: Sequence[Sample], embeds: Sequence[torch.Tensor]) -> list[Item]:
    return [it for smp, emb in zip(samples, embeds) for it in make_sample_items(model, layouts, smp, emb, smp.qa)]


KIND_WEIGHTS = {"image": 0.6, "pair": 0.2, "video": 0.2}  # share of the batches of each kind


def train_language(model, items: Sequence[Item], *, steps: int, lr: float, seed: int, log, pad_id: int,
                   batch_size: int = 64, deadline: float | None = None) -> None:
    """The language model (all but the constructed entries) on the items, batches of one kind drawn with
    KIND_WEIGHTS, cosine learning rate."""
    gen = np.random.default_rng([seed, 11])
    by_kind = defaultdict(list)
    for it in items:
        by_kind[it.kind].append(it)
    kinds = sorted(by_kind)
    p = np.asarray([KIND_WEIGHTS[k] for k in kinds])
    named = dict(model.named_parameters())
    params = [p_ for n, p_ in named.items() if n.startswith(("model.language_model.", "lm_head."))]
    masks = {named[n]: ~m for n, m in _frozen_masks(model).items()}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    frozen_values = {p_: p_.detach().clone() for p_ in masks}
    model.train()
    start = time.time()
    stats = defaultdict(lambda: defaultdict(list))
    order = {k: gen.permutation(len(v)) for k, v in by_kind.items()}
    cursor = dict.fromkeys(kinds, 0)
    for step in range(steps):
        if deadline is not None and time.time() > deadline:
            log(f"  stopping at the time limit, step {step}/{steps}")
            break
        kind = kinds[int(gen.choice(len(kinds), p=p / p.sum()))]
        pool = by_kind[kind]
        if cursor[kind] + batch_size > len(pool):
            order[kind], cursor[kind] = gen.permutation(len(pool)), 0
        batch = [pool[j] for j in order[kind][cursor[kind]:cursor[kind] + batch_size]]
        cursor[kind] += batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=max(10, steps // 30))
        loss, info = lm_batch(model, batch, pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p_, keep in masks.items():
            if p_.grad is not None:
                p_.grad.mul_(keep)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for p_, keep in masks.items():  # AdamW's momentum never moves the constructed entries
                p_.copy_(torch.where(keep, p_, frozen_values[p_]))
        for k, v in info.items():
            stats[kind][k].append(v)
        if (step + 1) % 250 == 0 or step == steps - 1:
            parts = [f"{kind}:loss={np.mean(v['loss'][-30:]):.3f},exact={np.mean(v['exact'][-30:]):.2f}"
                     for kind, v in sorted(stats.items())]
            log(f"  language step {step + 1}/{steps} " + " ".join(parts) + f" ({time.time() - start:.0f}s)")
    model.eval()


# ---------------------------------------------------------------------------------------------- main

@dataclass(frozen=True)
class Plan:
    """How much of everything one run draws and trains on."""

    images: int = 500
    pairs: int = 400
    videos: int = 400
    shape_steps: int = 2000
    language_steps: int = 1000
    language_lr: float = 3e-3

    def scaled(self, factor: float) -> Plan:
        import dataclasses

        return dataclasses.replace(self, images=max(4, int(self.images * factor)), pairs=max(2, int(self.pairs * factor)),
                                   videos=max(2, int(self.videos * factor)))


def save(model, tokenizer, out: Path) -> None:
    """float32 safetensors (the constructed steps have gains past float16's range), tokenizer, chat template."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def train(out: Path, *, seed: int = 0, workers: int = 2, plan: Plan = Plan(), log=print,
          deadline_s: float = 29 * 60) -> Path:
    t0 = time.time()
    deadline = t0 + deadline_s
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # tiny values late in training would otherwise slow every step down
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    model = new_model(config, tokenizer, seed=seed)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; vocab {len(tokenizer)}")
    samples = make_samples(seed, {"image": plan.images, "pair": plan.pairs, "video": plan.videos}, workers=workers)
    log(f"data: {len(samples)} samples, {sum(len(s.features) for s in samples)} tiles ({time.time() - t0:.0f}s)")
    train_shape_head(model, samples, seed=seed, steps=plan.shape_steps, log=log)
    embeds = [tile_embedding(full_features(model, s.features)) for s in samples]
    log(f"shape head done ({time.time() - t0:.0f}s)")
    layouts = Layouts(tokenizer)
    items = make_items(model, layouts, samples, embeds)
    log(f"{len(items)} training sequences, the reader heads' image side cached ({time.time() - t0:.0f}s)")
    train_language(model, items, steps=plan.language_steps, lr=plan.language_lr, seed=seed, log=log,
                   pad_id=tokenizer.pad_token_id, deadline=deadline - 60)
    log(f"language done ({time.time() - t0:.0f}s)")
    save(model, tokenizer, out)
    log(f"wrote {out} ({time.time() - t0:.0f}s)")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads and data-drawing processes")
    parser.add_argument("--scale", type=float, default=1.0, help="scale the amount of data (quick runs: 0.1)")
    parser.add_argument("--steps", type=int, default=None, help="language-model steps (default: the plan's)")
    parser.add_argument("--minutes", type=float, default=29.0, help="stop the language model's training by then")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    plan = Plan().scaled(args.scale)
    if args.steps is not None:
        import dataclasses

        plan = dataclasses.replace(plan, language_steps=args.steps)
    train(args.out, seed=args.seed, workers=args.threads, plan=plan, log=log, deadline_s=args.minutes * 60)


if __name__ == "__main__":
    main()
