"""Driver peak RSS and wall time of `plan` and of a resumed run, for manifests of 100k, 1M and 10M rows.

Synthetic URIs (local paths that do not exist: the rows left to do become `not_found` rows, so the model's cost
stays out of the figures); the resumed run finds all but 1,000 rows already in the output, written with the
project's own writer. Each measurement is a fresh driver process (local Ray started inside it) that reports its
own peak RSS: VmHWM of /proc/self/status, the high-water mark of its own address space. Not getrusage's
ru_maxrss, which Linux carries across fork and exec: a child started by this script would report this script's
peak (the rows `prepare` built), which grows with the row count although the driver does not. Ray's worker
processes are not the driver and are not counted.

    PYTHONPATH=. python bench/driver_scaling.py [--rows 100000 1000000 10000000] [--left 1000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

MANIFEST_FILES = 16


def uris(start: int, stop: int) -> list[str]:
    return [f"/nonexistent/bench/images/{i:09d}.jpg" for i in range(start, stop)]


def prepare(work: Path, rows: int, left: int, model: Path) -> Path:
    """The manifest folder, the output with all but `left` rows done, and the job file; reused when present."""
    from pipeline.config import parse_job
    from pipeline.io.inputs import derive_id
    from tests.outputs import done_rows, write_done

    base = work / f"n{rows}"
    job_file = base / "job.yaml"
    if job_file.exists():
        return job_file
    (base / "manifest").mkdir(parents=True, exist_ok=True)
    step = -(-rows // MANIFEST_FILES)
    for s in range(0, rows, step):
        pq.write_table(pa.table({"uri": uris(s, min(rows, s + step))}), base / "manifest" / f"part-{s:09d}.parquet")
    job = {"task": "caption", "input": str(base / "manifest"), "input_format": "manifest", "output": str(base / "out"),
           "model": str(model), "generation": {"max_new_tokens": 2}}
    config = parse_job(job)
    shards: list[str] = []
    for s in range(left, rows, 1_000_000):  # rows [left, rows) are done
        part = uris(s, min(rows, s + 1_000_000))
        shards += write_done(config, done_rows([derive_id(u) for u in part], part), rows_per_shard=250_000)
    (base / "done.json").write_text(json.dumps(shards))
    job_file.write_text(yaml.safe_dump(job))
    return job_file


def peak_rss_mb() -> int:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(what: str, job_file: str) -> None:
    """One measurement in this process: `plan` or `run`; prints wall time and this process's peak RSS."""
    from pipeline.config import load_job
    from pipeline.run.runner import plan_job, run_job

    started = time.perf_counter()
    job = load_job(job_file)
    lines: list[tuple[float, str]] = []
    echo = lambda line: lines.append((time.perf_counter() - started, line))
    if what == "plan":
        figures = plan_job(job, echo=echo).figures()
    else:
        summary = run_job(job, echo=echo)
        figures = {"rows_out": summary.rows_out, "rows_this_run": summary.rows_this_run}
    wall = time.perf_counter() - started
    print(json.dumps({"wall_s": round(wall, 1), "rss_mb": peak_rss_mb(), "phases": phases(lines, wall), **figures}))


def phases(lines: list[tuple[float, str]], wall: float) -> dict[str, float]:
    """Seconds in each step, from when the run's lines were printed: to the end of the plan (the resume line),
    the model stage up to its last shard, and the end-of-run accounting after it."""
    planned = next((t for t, line in lines if line.startswith("resuming:")), None)
    shards = [t for t, line in lines if line.startswith("[")]
    out = {"plan": round(planned, 1)} if planned is not None else {}
    if shards:
        out.update(execute=round(shards[-1] - (planned or 0), 1), finish=round(wall - shards[-1], 1))
    return out


def measure(what: str, job_file: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, str(job_file)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed: {out.stdout[-2000:]}{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--left", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/internvl-batch-driver-scaling"))
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "JOB"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    from pipeline.embedded.tiny_model import make_tiny_model

    model = args.work / "tiny-model"
    if not (model / "config.json").exists():
        make_tiny_model(model)
    print("| rows | plan: driver peak RSS | plan: wall | resumed run: driver peak RSS | resumed run: wall |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        job_file = prepare(args.work, rows, args.left, model)
        plan = measure("plan", job_file)
        assert plan["rows_todo"] == args.left, plan
        run = measure("run", job_file)
        assert run["rows_out"] == rows and run["rows_this_run"] == args.left, run
        print(f"| {rows:,} | {plan['rss_mb']} MB | {plan['wall_s']} s | {run['rss_mb']} MB | {run['wall_s']} s |", flush=True)
        print(f"  phases (s): plan {plan['phases']}, resumed run {run['phases']}; load {os.getloadavg()[0]:.1f}",
              flush=True)
        # the run completed the output: make it resumable again for the next measurement of the same size
        done = set(json.loads((job_file.parent / "done.json").read_text()))
        for p in (job_file.parent / "out").glob("part-*.parquet"):
            if p.name not in done:
                p.unlink()
        (job_file.parent / "out" / "_SUCCESS.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
