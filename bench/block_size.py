"""Rows per CPU task (`run/dataset.py` BLOCK_BATCHES x batch_size): the tasks per second Ray sustains against the
tiles one task holds.

Both measurements run the pipeline's own CPU stage (`read_rows` + `preprocess_block`, wired as `build_dataset`
wires them, the run's DataContext) in a fresh driver process with its own local Ray, after a first pass over a few
rows has started the workers; a light task after the stage takes the tiles out of the object store, as the model
stage would, and keeps a count.
- overhead: rows of objects that do not exist (each becomes a not_found row at once: no read, no decode, no
  tiles), in blocks of 4 to 256 rows: wall; a task's CPU and wall time in its worker (Ray Data's own stats of the
  stage); and the driver's CPU time per task (its Ray Data executor: a cap on the tasks per second one driver
  sustains, whatever the cluster), less what the driver uses doing nothing (10 s measured first: Ray's polling,
  the memory sampler) for as long as the stage ran; and how much the driver's heap (RssAnon) grew over the stage.
  CPU times are the steadier figures on a shared machine.
- memory: 13-tile camera-size JPEGs (4000x3000, max_tiles 12 + thumbnail: 7.8 MB of uint8 tiles each) in blocks of
  4, 16 and 32 rows: the stage's wall and CPU time (its tasks', from Ray Data's stats), and the largest private
  memory of a Ray worker (RssAnon, sampled every 0.1 s: what a task holds, and the worker's baseline).

    PYTHONPATH=. python bench/block_size.py [--rows 6000] [--blocks 4 8 16 32 64 128 256] [--images 32]
                                            [--image-blocks 4 16 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.flat_listing import TreeSampler, status_mb

IDLE_S = 10.0


def _count(batch: pa.Table) -> pa.Table:
    return pa.table({"n": [batch.num_rows]})


def child(per_block: int, uris: list[str]) -> None:
    """The CPU stage over `uris` in blocks of `per_block` rows; prints wall, rows and the largest worker's peak."""
    import ray

    from pipeline.config import parse_job
    from pipeline.run.dataset import PREPROCESS_MEMORY, preprocess_block, read_rows
    from pipeline.run.execute import configure_data_context, init_ray
    from pipeline.run.resources import PREPROCESS_CPUS

    job = parse_job({"task": "caption", "input": "unused", "output": "unused", "model": "unused"})
    init_ray()
    configure_data_context(512 * 1024**2)
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    cpu_task = {"num_cpus": PREPROCESS_CPUS, "memory": PREPROCESS_MEMORY}

    def stage(part: list[str]) -> int:
        rows = ray.data.from_arrow(pa.table({"id": [f"r{i}" for i in range(len(part))], "uri": part}))
        ds, _ = read_rows(rows, per_block, workers, cpu_task)
        ds = ds.map_batches(preprocess_block, fn_kwargs={"job": job}, batch_size=None, batch_format="numpy",
                            compute=ray.data.TaskPoolStrategy(size=workers), **cpu_task)
        ds = ds.map_batches(_count, batch_format="pyarrow", batch_size=None, num_cpus=0.1)
        done = sum(sum(t.column("n").to_pylist()) for t in ray.get(ds.to_arrow_refs()))  # no aggregate: a shuffle
        return done, ds.get_stats_summary()

    stage(uris[:workers])  # warm: the worker processes started and the pipeline's modules imported
    idle = measured(lambda: time.sleep(IDLE_S))  # what Ray's processes (and the sampler) use doing nothing
    before = status_mb(os.getpid(), "RssAnon")
    run = measured(lambda: stage(uris))
    driver_growth = status_mb(os.getpid(), "RssAnon") - before
    rows, summary = run["out"]
    op = stage_stats(summary)
    print(json.dumps({"rows": rows, "wall_s": round(run["wall"], 2), "tasks": op.cpu_time.count,
                      "task_cpu_s": op.cpu_time.mean, "task_wall_s": op.wall_time.mean, "stage_cpu_s": op.cpu_time.sum,
                      "driver_cpu_s": run["driver"] - idle["driver"] / idle["wall"] * run["wall"],
                      "task_private_mb": run["peak"], "driver_growth_mb": driver_growth, "load": os.getloadavg()[0]}))


def stage_stats(summary: Any) -> Any:
    """The CPU stage's operator in a Ray Data stats summary (the stage is an earlier dataset of the one run)."""
    todo = [summary]
    while todo:
        s = todo.pop()
        for op in s.operators_stats:
            if "preprocess_block" in op.operator_name:
                return op
        todo += s.parents
    raise LookupError("no preprocess_block operator in the stats")


def measured(fn: Callable[[], Any]) -> dict[str, Any]:
    """fn's result, wall, the driver's CPU seconds and the largest worker's peak RssAnon."""
    sampler = TreeSampler()
    sampler.start()
    started, driver = time.perf_counter(), time.process_time()
    out = fn()
    driver = time.process_time() - driver
    return {"out": out, "wall": time.perf_counter() - started, "driver": driver, "peak": sampler.stop()[0]}


def measure(per_block: int, uris: list[str], work: Path) -> dict:
    listing = work / "uris.json"
    listing.write_text(json.dumps(uris))
    for _ in range(3):  # a loaded machine sometimes fails Ray's start-up ("timed out during startup")
        out = subprocess.run([sys.executable, __file__, "--child", str(per_block), str(listing)], check=False,
                             capture_output=True, text=True)
        if out.returncode == 0 or "timed out during startup" not in out.stderr:
            break
    if out.returncode != 0:
        raise SystemExit(f"block {per_block} failed: {out.stdout[-2000:]}{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == len(uris), result
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--blocks", type=int, nargs="*", default=[4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--image-blocks", type=int, nargs="*", default=[4, 16, 32])
    parser.add_argument("--work", type=Path, default=Path("/tmp/internvl-batch-block-size"))
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        return child(int(args.child[0]), json.loads(Path(args.child[1]).read_text()))
    args.work.mkdir(parents=True, exist_ok=True)
    missing = [f"/nonexistent/block-size/{i:07d}.jpg" for i in range(args.rows)]
    print("| rows a task | tasks | wall | tasks/s | a task's CPU (worker) | a task's wall (worker) "
          "| driver CPU a task | driver heap growth | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for per_block in args.blocks:
        r = measure(per_block, missing, args.work)
        tasks = r["tasks"]
        print(f"| {per_block} | {tasks} | {r['wall_s']} s | {tasks / r['wall_s']:.1f} | {1000 * r['task_cpu_s']:.1f} ms "
              f"| {1000 * r['task_wall_s']:.1f} ms | {1000 * r['driver_cpu_s'] / tasks:.1f} ms "
              f"| {r['driver_growth_mb']} MB | {r['load']:.1f} |",
              flush=True)
    if args.images:
        from bench.media import camera_jpeg

        photos = [str(camera_jpeg("natural", 4000, 3000, seed=s)) for s in range(4)]
        images = [photos[i % len(photos)] for i in range(args.images)]
        print(f"\n| rows a task ({args.images} 13-tile JPEGs) | wall | CPU s an image | a worker's peak heap (RssAnon) "
              "| load |")
        print("|---|---|---|---|---|")
        for per_block in args.image_blocks:
            r = measure(per_block, images, args.work)
            print(f"| {per_block} | {r['wall_s']} s | {r['stage_cpu_s'] / args.images:.2f} | {r['task_private_mb']} MB "
                  f"| {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
