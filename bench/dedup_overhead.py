"""What `dedup: exact` costs when there is nothing to save: the same job over distinct pictures (no duplicates),
`dedup: none` vs `dedup: exact`, side by side on one local Ray, tiny model on CPU.

The difference is the hash pass (every sample's media read and hashed once more, then one group-by over the keys)
and the join that takes the (no) duplicates out of the samples to do; the fill pass has nothing to copy. A warm-up run starts Ray first, so neither side pays for it; then the
two jobs alternate for `--rounds` rounds, each into a fresh output. Printed: every round's wall time, the medians,
their ratio (exact / none) and the load average (the machine is shared).

    PYTHONPATH=. python bench/dedup_overhead.py [--images 64] [--rounds 1] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.media import noisy_photo  # noqa: E402  smooth colour waves + sensor noise
from pipeline.config import parse_job  # noqa: E402
from pipeline.embedded.tiny_model import make_tiny_model  # noqa: E402


def timed_run(images: Path, out: Path, model: Path, dedup: str, max_new_tokens: int) -> tuple[float, dict]:
    """One run of the job into a fresh output: its wall time and its summary."""
    from pipeline.run.runner import run_job

    job = parse_job({"task": "caption", "input": str(images), "output": str(out), "model": str(model),
                     "dedup": dedup, "generation": {"max_new_tokens": max_new_tokens}})
    start = time.perf_counter()
    summary = run_job(job, echo=lambda _: None)
    return time.perf_counter() - start, summary.__dict__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "model")
        images = root / "images"
        images.mkdir()
        for k in range(args.images):  # web-size photos, each its own bytes
            noisy_photo(640, 480, seed=k).save(images / f"{k:04d}.jpg", quality=90)
        timed_run(images, root / "warm", model, "none", args.max_new_tokens)  # starts Ray and warms the caches
        walls: dict[str, list[float]] = {"none": [], "exact": []}
        for r in range(args.rounds):
            for dedup in ("none", "exact"):
                wall, summary = timed_run(images, root / f"{dedup}-{r}", model, dedup, args.max_new_tokens)
                walls[dedup].append(wall)
                print(f"round {r} dedup={dedup:5s}: {wall:6.1f} s, {summary['rows_ok']} rows ok, "
                      f"duplicates found {summary['duplicates_found']}")
        none, exact = statistics.median(walls["none"]), statistics.median(walls["exact"])
        print(f"{args.images} distinct pictures: dedup none {none:.1f} s, exact {exact:.1f} s, "
              f"ratio exact/none {exact / none:.2f}x (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
