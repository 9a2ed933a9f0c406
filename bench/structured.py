"""The cost of constraining: generated tokens/s with and without a JSON schema, tiny model, the same prompts, one run.

    PYTHONPATH=. python bench/structured.py [--samples 20] [--max-new-tokens 160] [--padded]

Through InternVLEngine.generate on CPU, torch at 1 thread; the schema is the tests' (tests/schemas.py: enum, integer,
boolean, array, nested object). A short untimed warm-up runs first (the grammar's first compile is timed on its own),
so both timed runs see a warm model. Free answers of the random-weight model never reach EOS (max_new_tokens each);
schema answers end when their JSON closes, so the fixed vision + prefill cost is spread over fewer tokens: the
decode-only ms/step (vision + prefill taken out) and the time inside the grammar processor are the like-for-like
figures. --padded: all prompts in one left-padded batch (the GPU way) instead of CPU's equal-length groups.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.embedded.tiny_model import make_tiny_model  # noqa: E402
from pipeline.model import constrained  # noqa: E402
from pipeline.model.transformers_engine import InternVLEngine  # noqa: E402
from tests.schemas import SCHEMA  # noqa: E402

QUESTIONS = ["Describe the animal.", "What is it?", "Answer in JSON now please."]  # three prompt lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--padded", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        engine = InternVLEngine.load(str(make_tiny_model(Path(tmp) / "tiny")), device="cpu")
    if args.padded:
        engine.language_groups = lambda p: [list(range(len(p)))]
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, (1, 448, 448, 3), dtype=np.uint8) for _ in range(args.samples)]
    prompts = [engine.prompt_ids(QUESTIONS[i % len(QUESTIONS)], [1]) for i in range(args.samples)]
    groups = len(engine.language_groups(prompts))

    start = time.perf_counter()
    engine.grammar.compile(SCHEMA)
    compile_s = time.perf_counter() - start
    engine.generate(prompts[:3], samples[:3], max_new_tokens=8)  # warm-up
    engine.generate(prompts[:3], samples[:3], max_new_tokens=8, schemas=[SCHEMA] * 3)

    def run(schemas):
        start = time.perf_counter()
        out = engine.generate(prompts, samples, max_new_tokens=args.max_new_tokens, schemas=schemas)
        seconds = time.perf_counter() - start
        # decode steps the calls ran: each group runs until its longest row ends (finished rows then idle)
        steps = sum(max(len(out[i].token_ids) for i in group) for group in engine.language_groups(prompts))
        return sum(len(g.token_ids) for g in out), seconds, sum(g.finished for g in out), steps

    spent = {"s": 0.0, "calls": 0}
    call = constrained.SchemaLogitsProcessor.__call__

    def timed(self, input_ids, scores):
        t = time.perf_counter()
        try:
            return call(self, input_ids, scores)
        finally:
            spent["s"] += time.perf_counter() - t
            spent["calls"] += 1

    start = time.perf_counter()  # vision + prefill + first token: the fixed cost both runs share
    engine.generate(prompts, samples, max_new_tokens=1)
    prefill_s = time.perf_counter() - start
    free = run(None)
    constrained.SchemaLogitsProcessor.__call__ = timed
    try:
        schema = run([SCHEMA] * len(prompts))
    finally:
        constrained.SchemaLogitsProcessor.__call__ = call

    mode = "one padded batch" if args.padded else f"{groups} equal-length groups"
    print(f"tiny model, CPU, 1 thread, {args.samples} prompts ({mode}), max_new_tokens={args.max_new_tokens}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"grammar compile (first time): {compile_s * 1000:.1f} ms")
    for name, (tokens, seconds, done, steps) in (("free:  ", free), ("schema:", schema)):
        decode_ms = (seconds - prefill_s) / max(steps - groups, 1) * 1000
        print(f"{name} {tokens:5d} tokens in {seconds:6.3f} s = {tokens / seconds:8.1f} tokens/s ({done} ended by EOS; "
              f"{steps} decode steps, decode-only {decode_ms:.2f} ms/step)")
    print(f"vision+prefill (max_new_tokens=1): {prefill_s:.3f} s")
    print(f"inside the grammar processor: {spent['s'] * 1000:.1f} ms over {spent['calls']} calls "
          f"({spent['s'] / spent['calls'] * 1000:.3f} ms/call, {spent['s'] / schema[1]:.1%} of the schema run)")
    print(f"ratio schema/free: tokens/s {(schema[0] / schema[1]) / (free[0] / free[1]):.3f}, "
          f"ms/step {(schema[1] / schema[3]) / (free[1] / free[3]):.3f}x")


if __name__ == "__main__":
    main()
