"""Build a tiny, seeded, offline InternVL checkpoint (native transformers format) for tests and demos.

Its text attention has 2 heads of 32 (1 key/value head) by default, which vLLM's CPU attention needs (head_dim
>= 32); `text_head_dim=16` gives the earlier layout of 4 heads of 16 (2 key/value heads). hidden_size is 64 either
way, so every weight has the same shape and, seeded alike, the same values; only how q/k/v split into heads (and
so the outputs) differ. The checkpoint carries processor_config.json (model/processor_files.py) for vLLM.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from pipeline.model.processor_files import write_processor

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO_TOKEN]

IMAGE_SIZE = 448
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5
IMAGE_SEQ_LENGTH = int((IMAGE_SIZE // PATCH_SIZE * DOWNSAMPLE_RATIO) ** 2)  # 256 tokens per tile
TOKENIZER_VOCAB_SIZE = 768
DEFAULT_SYSTEM_MESSAGE = "You are InternVL, a tiny test model."

CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif item['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WORDS = (
    "the a an this that image picture photo scene view shows showing of with and or in on at by from into is are "
    "has have there here red green blue yellow orange purple pink brown black white grey gray bright dark pale "
    "small large big tiny tall wide round square soft sharp cat dog bird horse fish tree flower leaf house car "
    "boat train sky sea lake river beach mountain hill road bridge person people man woman child sitting standing "
    "walking running next near under above behind left right top bottom center middle corner edge light shadow "
    "sun moon cloud rain snow water grass field forest city street building window door wall table chair book "
    "cup plate colour color gradient noise pattern texture stripe line dot shape background foreground"
).split()

# lm_head rows of tokens that are not whole lower-case words are damped so greedy output reads as words.
NON_WORD_LOGIT_SCALE = 0.1
TEXT_INIT_STD = 0.2
TEXT_HIDDEN_SIZE = 64
TEXT_HEAD_DIMS = (32, 16)  # 32: servable by vLLM on CPU (the default); 16: the earlier layout
VISION_INIT_STD = 0.05


def _corpus(num_sentences: int = 4000) -> list[str]:
    """Return a fixed, deterministic English-like corpus built from ``WORDS``."""
    rng = random.Random(1234)
    sentences = []
    for _ in range(num_sentences):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        sentences.append(text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?", ","]))
    return sentences


def build_tokenizer() -> Qwen2Tokenizer:
    """Train a small Qwen2-style byte-level BPE tokenizer with the InternVL special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    bpe_model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe_model["vocab"],
        merges=[tuple(merge) for merge in bpe_model["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO_TOKEN],
        start_image_token=IMG_START,
        end_image_token=IMG_END,
        context_image_token=IMG_CONTEXT,
        video_token=VIDEO_TOKEN,
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer: Qwen2Tokenizer, *, text_head_dim: int = TEXT_HEAD_DIMS[0]) -> InternVLConfig:
    """Return a tiny InternVL3-style config (InternViT-like vision tower + Qwen2 LM) matching ``tokenizer``; the LM
    has hidden size 64 in heads of ``text_head_dim``, two query heads per key/value head."""
    if text_head_dim not in TEXT_HEAD_DIMS:
        raise ValueError(f"text_head_dim must be one of {TEXT_HEAD_DIMS}, got {text_head_dim}")
    heads = TEXT_HIDDEN_SIZE // text_head_dim
    vision_config = InternVLVisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_act="gelu",
        norm_type="layer_norm",
        layer_norm_eps=1e-6,
        attention_bias=True,
        use_qk_norm=False,
        use_mean_pooling=True,
        use_absolute_position_embeddings=True,
        layer_scale_init_value=0.1,
        initializer_range=VISION_INIT_STD,
    )
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=TEXT_INIT_STD,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        architectures=["InternVLForConditionalGeneration"],
    )


def _word_token_ids(tokenizer: Qwen2Tokenizer) -> list[int]:
    """Return ids of tokens that decode to a space-prefixed whole word or to punctuation."""
    vocab = tokenizer.get_vocab()
    pieces = [f"Ġ{word}" for word in WORDS] + [".", ",", "!", "?"]
    return sorted(vocab[piece] for piece in set(pieces) if piece in vocab)


def build_model(config: InternVLConfig, tokenizer: Qwen2Tokenizer, seed: int = 0) -> InternVLForConditionalGeneration:
    """Instantiate the model with seeded weights whose greedy output depends on the image and reads as words."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    with torch.no_grad():
        row_scale = torch.full((config.text_config.vocab_size, 1), NON_WORD_LOGIT_SCALE)
        row_scale[_word_token_ids(tokenizer)] = 1.0
        model.lm_head.weight.mul_(row_scale)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return model.eval()


TRAINED_DIR = Path(__file__).resolve().parent / "tiny_trained"


def write_trained_tiny_model(out_dir: str | Path) -> Path:
    """Copy the committed trained checkpoint to ``out_dir``, with its processor settings: plain weights, no training
    code needed (training/train_tiny.py in a checkout made them; the world is pipeline/embedded/world). The weights are
    committed gzipped (1.4 MB instead of 10: the constructed encoder is mostly zeros) and written out plain."""
    import gzip
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(TRAINED_DIR.iterdir()):
        if not src.is_file() or src.name.startswith("."):
            continue
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as f, open(out_dir / src.stem, "wb") as out:
                shutil.copyfileobj(f, out)
        else:
            shutil.copyfile(src, out_dir / src.name)
    write_processor(out_dir, image_seq_length=IMAGE_SEQ_LENGTH)
    return out_dir


def make_tiny_model(out_dir: str | Path, *, seed: int = 0, text_head_dim: int = TEXT_HEAD_DIMS[0],
                    trained: bool = False) -> Path:
    """Write a deterministic tiny InternVL checkpoint, tokenizer, chat template and processor settings to
    ``out_dir``: seeded random weights, or with ``trained`` the committed checkpoint that sees the world of
    pipeline/embedded/world."""
    if trained:
        return write_trained_tiny_model(out_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(build_config(tokenizer, text_head_dim=text_head_dim), tokenizer, seed=seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_processor(out_dir, image_seq_length=IMAGE_SEQ_LENGTH)
    return out_dir
