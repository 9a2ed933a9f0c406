"""What a nightly incremental run costs beside a fresh one: a run that takes 1,000 new objects into an output that
already holds a long history against the same 1,000 objects run into an empty output, side by side in one run.

The history is made by real incremental runs (the project's own writer, state table and shard index) over empty
files in a local folder: each is a `decode_error` row, so the model's cost stays out of every figure (the tiny model
is loaded, never called) and what is measured is the driver's work: listing, the anti-join with the state, reading
the ids of the shards added since the last success (the nightly path) and the end-of-run accounting. Each
measurement is a fresh driver process (local Ray started inside it) reporting its wall time, its own peak RSS (VmHWM)
and the seconds of each step from the lines the run printed.

    PYTHONPATH=. python bench/nightly_run.py [--history 100000] [--new 1000] [--nights 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def peak_rss_mb() -> int:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def add_files(folder: Path, start: int, count: int) -> None:
    """`count` empty .jpg files (decode_error rows) in `folder`, named from `start`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        (folder / f"{i:09d}.jpg").touch()


def job_file(base: Path, images: Path, model: Path) -> Path:
    path = base / "job.yaml"
    path.write_text(yaml.safe_dump({"task": "caption", "input": str(images), "output": str(base / "out"),
                                    "model": str(model), "incremental": True, "rows_per_shard": 10_000,
                                    "generation": {"max_new_tokens": 2}, "compute": {"batch_size": 64}}))
    return path


def child(job: str) -> None:
    """One run in this process; prints its wall time, peak RSS, step seconds and what the plan said."""
    from pipeline.config import load_job
    from pipeline.run.runner import run_job

    started = time.perf_counter()
    lines: list[tuple[float, str]] = []
    summary = run_job(load_job(job), echo=lambda line: lines.append((time.perf_counter() - started, line)))
    wall = time.perf_counter() - started
    planned = next((t for t, line in lines if line.startswith(("incremental:", "resuming:"))), None)
    said = [line for _, line in lines if "committed by earlier runs" in line or "every shard is counted" in line]
    print(json.dumps({"wall_s": round(wall, 1), "rss_mb": peak_rss_mb(), "plan_s": planned and round(planned, 1),
                      "rows_this_run": summary.rows_this_run, "rows_out": summary.rows_out, "said": said}))


def measure(job: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(job)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"run failed: {out.stdout[-2000:]}{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=100_000, help="objects the output already took")
    parser.add_argument("--new", type=int, default=1000, help="objects new tonight")
    parser.add_argument("--nights", type=int, default=2, help="nightly runs measured, one after another")
    parser.add_argument("--work", type=Path, default=Path("/tmp/internvl-batch-nightly"))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    from pipeline.embedded.tiny_model import make_tiny_model

    model = args.work / "tiny-model"
    if not (model / "config.json").exists():
        make_tiny_model(model)
    nightly, fresh = args.work / f"history-{args.history}", args.work / "fresh"
    if not (nightly / "out" / "_SUCCESS.json").exists():  # the history: one incremental run over it
        shutil.rmtree(nightly, ignore_errors=True)
        add_files(nightly / "images", 0, args.history)
        first = measure(job_file(nightly, nightly / "images", model))
        print(f"history: {first['rows_out']:,} rows written in {first['wall_s']} s (driver peak {first['rss_mb']} MB)")
    print("| run | rows this run | output rows | wall | plan | driver peak RSS | said |")
    print("|---|---|---|---|---|---|---|")
    for night in range(args.nights):
        total = len(list((nightly / "images").iterdir()))
        add_files(nightly / "images", total, args.new)
        shutil.rmtree(fresh, ignore_errors=True)
        add_files(fresh / "images", total, args.new)  # the same names, into an empty output
        walls = []
        for name, base in ((f"nightly {night + 1}", nightly), ("fresh", fresh)):
            got = measure(job_file(base, base / "images", model))
            assert got["rows_this_run"] == args.new, got
            walls.append(got["wall_s"])
            print(f"| {name} | {got['rows_this_run']:,} | {got['rows_out']:,} | {got['wall_s']} s | {got['plan_s']} s "
                  f"| {got['rss_mb']} MB | {'; '.join(got['said'])} |", flush=True)
        print(f"|  | nightly / fresh wall: {walls[0] / walls[1]:.2f}x |  |  |  |  |  |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
