"""A small run's fixed cost: what a job of a few images pays besides the model, with Ray already started.

In one driver process with its own local Ray (4 logical CPUs, as the tests use): a caption job over 4 images, then
the same job made incremental with 1 new image added (the nightly path: listing, the anti-join with the state, the
shard index, the end-of-run check), then the 4 images named in a JSONL manifest (most tests' input), each run
`--repeat` times into a fresh output. Prints each run's wall and the
Ray Data executions it started (every one is a plan Ray Data builds and runs; the shuffles among them start
aggregator actors, worker processes of their own). The model's share is the `Generate` execution.

    PYTHONPATH=. python bench/small_run.py [--repeat 2] [--work DIR] [--cold 2]

`--cold N`: also N runs of a 1-image caption job from the command line (`python -m pipeline.cli run`), each a new
process that starts its own local Ray, as a user's first small job does: the wall of each.

To compare two checkouts, run it from each (`PYTHONPATH=<checkout>`), one after the other on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml


class Executions(logging.Handler):
    """Counts Ray Data's 'execution finished in X seconds' lines and sums their seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.seconds, self.model_s = 0, 0.0, 0.0
        self._generate = False

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "Execution plan of Dataset" in msg:
            self._generate = "Generate" in msg
        elif "execution finished in" in msg:
            took = float(msg.rsplit("execution finished in", 1)[1].split()[0])
            self.count += 1
            self.seconds += took
            if self._generate:
                self.model_s += took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/internvl-batch-small-run"))
    parser.add_argument("--cold", type=int, default=0, help="1-image CLI runs, each a new process with its own Ray")
    args = parser.parse_args()
    import ray

    from pipeline.config import parse_job
    from pipeline.embedded.tiny_model import make_tiny_model
    from pipeline.run.runner import run_job
    from tests.conftest import pattern_image

    model = args.work / "tiny-model"
    if not (model / "config.json").exists():
        make_tiny_model(model)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    seen = Executions()
    # the streaming executor's own logger: Ray Data configures "ray.data" when it first runs, dropping handlers there
    logger = logging.getLogger("ray.data._internal.execution.streaming_executor")
    print("| run | wall | Ray Data executions | their seconds | of which the model stage |")
    print("|---|---|---|---|---|")
    for i in range(args.repeat):
        images, out = args.work / "images", args.work / "out"
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        images.mkdir(parents=True)
        for k in range(4):
            pattern_image(448 + 8 * k, 448).save(images / f"{k}.png")
        job = {"task": "caption", "input": str(images), "output": str(out), "model": str(model), "incremental": True,
               "rows_per_shard": 2, "compute": {"batch_size": 2}, "generation": {"max_new_tokens": 2}}
        (args.work / "job.yaml").write_text(yaml.safe_dump(job))
        manifest = args.work / "manifest.jsonl"
        manifest.write_text("".join(json.dumps({"uri": str(images / f"{k}.png")}) + "\n" for k in range(4)))
        for name in ("first run, 4 images", "incremental, 1 new of 5", "manifest of the 4 images"):
            if name.startswith("incremental"):
                pattern_image(600, 448).save(images / "new.png")
            if name.startswith("manifest"):
                job = {**job, "input": str(manifest), "output": str(args.work / "out-manifest"), "incremental": False}
                shutil.rmtree(job["output"], ignore_errors=True)
            seen.count, seen.seconds, seen.model_s = 0, 0.0, 0.0
            logger.removeHandler(seen)
            logger.addHandler(seen)
            logger.setLevel(logging.INFO)
            started = time.perf_counter()
            run_job(parse_job(job, source="bench"), echo=lambda line: None)
            wall = time.perf_counter() - started
            print(f"| {name} (#{i + 1}) | {wall:.1f} s | {seen.count} | {seen.seconds:.1f} s | {seen.model_s:.1f} s |",
                  flush=True)
    ray.shutdown()
    for i in range(args.cold):
        print(f"| cold CLI run, 1 image (#{i + 1}) | {cold_run(args.work, model):.1f} s |  |  |  |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def cold_run(work: Path, model: Path) -> float:
    """Wall of `python -m pipeline.cli run` over one image into a fresh output, in a new process (its own Ray)."""
    import subprocess
    import sys

    from tests.conftest import pattern_image

    folder = work / "cold"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pattern_image(448, 448).save(folder / "a.png")
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump({"task": "caption", "input": str(folder / "a.png"), "output": str(folder / "out"),
                                   "model": str(model), "generation": {"max_new_tokens": 2}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job)], check=True, capture_output=True, env=env)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
