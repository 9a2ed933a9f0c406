"""A score pass vs generating the answer text, same tiny model, same images, same batches, one process.

- score:    Score stage: one forward over the prompts gives the labels' probabilities (yes/no here; the tiny
            model's "yes" is 3 tokens and "no" 2, so the short continuation forward over label tokens is included).
- generate: Generate stage asking the same question, greedy, for each answer length in `--answer-tokens`
            (2 is the least a parsed "Yes" + end-of-answer needs; instruct models usually say more).
Both include the vision tower and prompt building; rounds alternate; medians, as ratios. The tiny model's
vision tower dominates its cost, so the gain shown here is the decode loop's share; a real model's language model
is far larger relative to its vision tower (InternVL3-1B: 0.5B vs 0.3B parameters), so each decode step costs more.

    python bench/score_vs_generate.py [--images 16] [--batch 8] [--answer-tokens 2 8 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import parse_job  # noqa: E402
from pipeline.embedded.tiny_model import make_tiny_model  # noqa: E402
from pipeline.model.transformers_engine import InternVLEngine  # noqa: E402
from pipeline.stages.generate import Generate
from pipeline.stages.preprocess import Preprocess
from pipeline.stages.score import Score  # noqa: E402
from tests.conftest import pattern_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model")
        sizes = [(448, 448), (896, 448), (1344, 896), (640, 480)]
        uris = []
        for i in range(args.images):
            w, h = sizes[i % len(sizes)]
            pattern_image(w + i, h).save(Path(tmp) / f"{i}.png")
            uris.append(str(Path(tmp) / f"{i}.png"))
        base = {"input": tmp, "output": tmp, "model": str(model)}
        question = "Is this image blurry?"
        score_job = parse_job({**base, "task": "score", "prompt": question})
        gen_jobs = {n: parse_job({**base, "task": "caption", "prompt": question, "generation": {"max_new_tokens": n}})
                    for n in args.answer_tokens}
        pre = Preprocess(score_job)
        from ray.data.block import BlockAccessor

        batches = []
        for start in range(0, len(uris), args.batch):
            part = uris[start:start + args.batch]
            table = pre({"id": np.array(part, dtype=object), "uri": np.array(part, dtype=object)})
            batches.append(BlockAccessor.for_block(table).to_batch_format("numpy"))
        engine = InternVLEngine.load(str(model), device="cpu")
        scorer = Score(score_job, engine=engine)
        generators = {n: Generate(job, engine=engine) for n, job in gen_jobs.items()}
        tiles = sum(int(n) for b in batches for n in b["num_tiles"])
        score_t: list[float] = []
        gen_t: dict[int, list[float]] = {n: [] for n in generators}
        for _ in range(args.rounds):
            t = time.perf_counter()
            for b in batches:
                scorer(b)
            score_t.append(time.perf_counter() - t)
            for n, generator in generators.items():
                t = time.perf_counter()
                for b in batches:
                    generator(b)
                gen_t[n].append(time.perf_counter() - t)
    s = statistics.median(score_t)
    print(f"{args.images} images ({tiles} tiles), batches of {args.batch}, {args.rounds} alternating rounds, 1 thread")
    print(f"score pass (label probabilities): {args.images / s:6.2f} images/s")
    for n, times in gen_t.items():
        g = statistics.median(times)
        print(f"generate {n:>3} answer tokens:        {args.images / g:6.2f} images/s   ratio score/generate: {g / s:.2f}x")


if __name__ == "__main__":
    main()
