"""Train the tiny InternVL that sees the world of pipeline/embedded/world: `python -m training.train_tiny OUT --seed 0`.

Writes OUT/ (config.json, generation_config.json, model.safetensors, tokenizer files with the chat template): a
native `InternVLForConditionalGeneration` checkpoint that the pipeline loads like any other, whose answers mean
something. Deterministic for a seed and thread count (README: the measured run and its time).

Architecture: the real one at small width. 448 px tiles, 14 px patches, a 4-layer InternViT-style encoder (256 wide,
16 heads, RMSNorm), pixel shuffle 0.5 to 256 tokens per tile, the InternVL MLP projector, a 2-layer Qwen2 language model
(128 wide, 4 heads of 32, 2 key/value heads), the InternVL special tokens and a chat template; a byte-level BPE
tokenizer trained on the world's prompts, so every answer word is one token.

A mixed model, part constructed by hand, part trained, on the model's real inputs (tiles cut by pipeline.media,
prompts built by pipeline.model.transformers_engine.Prompter):
1. constructed: the encoder's first three layers and layer 4's attention (seeing.py: chroma mask, shape moments,
   colours, background); trained: layer 4's MLP, the shape classifier, on thumbnails / single tiles / video frames
   (shape_head.py, on the samples of samples.py);
2. constructed: the projector, which passes each tile's global features (moments, colours, shape logits) and a
   marker (model.py);
3. constructed: three heads of the language model's first layer: head 0 reads the image block nearest before the
   text (the thumbnail, the second image of a pair, the last video frame), head 1 the mean of all image blocks (last
   frame minus the mean: the motion), head 2 the shape / colour words of the question (set_ask_head); every other
   head scores image tokens -REPEL, the MLPs are gated off on image tokens and nothing writes the marker, so the
   image reaches the text through heads 0 and 1 only (model.py);
4. trained: everything else of the language model, on the answers (loss on answer tokens and the closing
   <|im_end|>), with `text_logits`, a forward over the text tokens alone that joins heads 0 and 1's image side
   (image_part, cached once per sequence) into their softmax: equal to the transformers forward on the full prompt
   (tests/unit/training/test_train_parity.py), at a few hundredths of its cost (forward.py; the loop: language.py).

This module runs the steps in order (`train`) and is the command line; the tokenizer is tokenizer.py.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from training.forward import Layouts, make_items
from training.language import train_language
from training.model import build_config, new_model, tile_embedding
from training.samples import make_samples
from training.shape_head import full_features, train_shape_head
from training.tokenizer import build_tokenizer


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
        """The same plan with `factor` times the samples of each kind."""
        import dataclasses

        return dataclasses.replace(self, images=max(4, int(self.images * factor)),
                                   pairs=max(2, int(self.pairs * factor)), videos=max(2, int(self.videos * factor)))


def save(model, tokenizer, out: Path) -> None:
    """float32 safetensors (the constructed steps have gains past float16's range), tokenizer, chat template."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def train(out: Path, *, seed: int = 0, workers: int = 2, plan: Plan = Plan(), log=print,
          deadline_s: float = 29 * 60) -> Path:
    """Build, train and save the model to `out` (the stages of the module docstring); returns `out`."""
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
    """The command line: `python -m training.train_tiny OUT --seed 0`."""
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
