"""The trained tiny model's tokenizer: a byte-level BPE trained on the world's prompts and answers."""

from __future__ import annotations

import json
import re

from pipeline.embedded import world as W
from pipeline.embedded.tiny_model import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_MESSAGE,
    IM_END,
    IM_START,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VIDEO_TOKEN,
)


def world_texts() -> list[str]:
    """Every prompt and answer of the world, plus the template's own words."""
    texts = [DEFAULT_SYSTEM_MESSAGE, W.CAPTION, W.WHAT_SHAPE, W.WHAT_COLOR, W.WHAT_BACKGROUND, W.VIDEO_CAPTION,
             W.WHICH_WAY, "system", "user", "assistant", "Image-1: ", "Image-2: "]
    texts += [W.which_image(s) for s in W.SHAPES] + [W.is_there(s) for s in W.SHAPES]
    texts += [W.is_color(c) for c in W.COLORS]
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
