"""What a nightly incremental run costs beside a fresh one: a run that takes 1,000 new objects into an output that
already holds a long history against the same 1,000 objects run into an empty output, side by side in one run.

The history is empty files in a local folder, each a `decode_error` row, so the model's cost stays out of every
figure (the tiny model is loaded, never called) and what is measured is the driver's work: listing, the anti-join
with the state, reading the ids of the shards added since the last success (the nightly path) and the end-of-run
accounting. A real incremental run takes the first `--seed` objects (the project's own writer, state table and
shard index); the rest of the history is written as one more successful run through the same output-folder code
(`OutputFolder.write_shard`, the state's `write_part`, `per_shard_totals` + `write_index`, `record_run`), its rows
copies of a real row with their own id, uri and version: a real run over 1M rows would take ~50 min on 2 cores. Each
measurement is a fresh driver process (local Ray started inside it) reporting its wall time, its own peak RSS (VmHWM)
and the seconds of each step from the lines the run printed.

    PYTHONPATH=. python bench/nightly_run.py [--history 100000] [--seed 10000] [--new 1000] [--nights 2] [--work DIR]
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


def grow_history(base: Path, seed: int, history: int, rows_per_shard: int = 10_000) -> None:
    """Objects `seed`..`history` of the folder written into the output as one more successful incremental run:
    shards of copies of a real row (each with its object's id, uri and version), their state delta, shard index and
    run record, through the project's output-folder code, so the next run reads them as it reads any run's."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from pipeline.io.inputs import derive_id
    from pipeline.io.output import OutputFolder
    from pipeline.io.output.state import run_stamp
    from pipeline.io.ranges import local_info
    from pipeline.io.storage import object_version
    from pipeline.run.committed import write_index
    from pipeline.run.execute import init_ray
    from pipeline.run.totals import per_shard_totals

    folder = OutputFolder(str(base / "out"))
    template = pq.read_table(folder.shards()[0]).slice(0, 1)
    stamp, shards, taken = run_stamp(), [], []
    for start in range(seed, history, rows_per_shard):
        uris = [str(base / "images" / f"{i:09d}.jpg") for i in range(start, min(start + rows_per_shard, history))]
        versions = [object_version(local_info(u)) for u in uris]
        rows = template.take([0] * len(uris))
        for name, values in (("id", [derive_id(f"{u}@{v}") for u, v in zip(uris, versions)]), ("uri", uris),
                             ("source_version", versions)):
            if name in rows.column_names:
                at = rows.column_names.index(name)
                rows = rows.set_column(at, name, pa.array(values, rows.schema.field(name).type))
        shards.append(folder.shard_url(folder.write_shard(rows)))
        taken.append(pa.table({"uri": uris, "version": versions}))
    per_file = max(1, 100_000 // rows_per_shard)  # the state in files of 100k rows, as a run writes a listing's blocks
    for start in range(0, len(taken), per_file):
        folder.state.write_part(stamp, pa.concat_tables(taken[start:start + per_file]))
    init_ray()
    try:
        write_index(folder, per_shard_totals(folder, shards), stamp, whole=False)
    finally:
        ray.shutdown()
    folder.state.record_run(stamp, history - seed)
    success = folder.success() or {}
    for key in ("rows_in", "rows_out", "rows_error", "objects_taken"):
        if key in success:
            success[key] = int(success[key]) + history - seed
    folder.finish(json.dumps(success, indent=2, sort_keys=True))


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
                      "rows_this_run": summary.rows_this_run, "rows_out": summary.rows_out, "said": said,
                      "lines": [f"{t:7.1f} s  {line}" for t, line in lines]}))


def measure(job: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(job)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"run failed: {out.stdout[-2000:]}{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--history", type=int, default=100_000, help="objects the output already took")
    parser.add_argument("--seed", type=int, default=10_000, help="history objects taken by a real run (the rest are "
                        "written as one more run through the output folder's code)")
    parser.add_argument("--new", type=int, default=1000, help="objects new tonight")
    parser.add_argument("--nights", type=int, default=2, help="nightly runs measured, one after another")
    parser.add_argument("--work", type=Path, default=Path("/tmp/internvl-batch-nightly"))
    parser.add_argument("--trace", action="store_true", help="each run's output lines, timed, on stderr")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    from pipeline.embedded.tiny_model import make_tiny_model

    model = args.work / "tiny-model"
    if not (model / "config.json").exists():
        make_tiny_model(model)
    nightly, fresh = args.work / f"history-{args.history}", args.work / "fresh"
    if not (nightly / "out" / "_SUCCESS.json").exists():  # the history: a real run, then the rest written as a run
        shutil.rmtree(nightly, ignore_errors=True)
        seed = min(args.seed, args.history)
        add_files(nightly / "images", 0, seed)
        first = measure(job_file(nightly, nightly / "images", model))
        print(f"history: {first['rows_out']:,} rows written by a run in {first['wall_s']} s "
              f"(driver peak {first['rss_mb']} MB)")
        if args.history > seed:
            started = time.perf_counter()
            add_files(nightly / "images", seed, args.history - seed)
            grow_history(nightly, seed, args.history)
            took = time.perf_counter() - started
            print(f"history: {args.history - seed:,} more rows written as one run in {took:.0f} s")
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
            if args.trace:
                print("\n".join(got["lines"]), file=sys.stderr)
            print(f"| {name} | {got['rows_this_run']:,} | {got['rows_out']:,} | {got['wall_s']} s | {got['plan_s']} s "
                  f"| {got['rss_mb']} MB | {'; '.join(got['said'])} |", flush=True)
        print(f"|  | nightly / fresh wall: {walls[0] / walls[1]:.2f}x |  |  |  |  |  |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
