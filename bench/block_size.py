"""Rows per CPU task (`run/dataset.py` BLOCK_BATCHES x batch_size): the tasks per second Ray sustains against the
tiles one task holds.

Both measurements run the pipeline's own CPU stage (`read_rows` + `preprocess_block`, wired as `build_dataset`
wires them, the run's DataContext) in a fresh driver process with its own local Ray; a light task after it takes
the tiles out of the object store, as the model stage would, and keeps a count.
- overhead: rows of objects that do not exist (each becomes a not_found row at once: no read, no decode, no
  tiles), in blocks of 4 to 256 rows: wall, hence tasks per second and the cost of one task.
- memory: 13-tile camera-size JPEGs (4000x3000, max_tiles 12 + thumbnail: 7.8 MB of uint8 tiles each) in blocks of
  4, 16 and 64 rows: the stage's wall and the largest CPU worker's peak RSS (VmHWM, baseline included).

    PYTHONPATH=. python bench/block_size.py [--rows 6000] [--blocks 4 8 16 32 64 128 256] [--images 64]
                                            [--image-blocks 4 16 64]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.flat_listing import worker_peaks_mb


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
    rows = ray.data.from_arrow(pa.table({"id": [f"r{i}" for i in range(len(uris))], "uri": uris}))
    cpu_task = {"num_cpus": PREPROCESS_CPUS, "memory": PREPROCESS_MEMORY}
    started = time.perf_counter()
    ds, _ = read_rows(rows, per_block, workers, cpu_task)
    ds = ds.map_batches(preprocess_block, fn_kwargs={"job": job}, batch_size=None, batch_format="numpy",
                        compute=ray.data.TaskPoolStrategy(size=workers), **cpu_task)
    done = ds.map_batches(_count, batch_format="pyarrow", batch_size=None, num_cpus=0.1).sum("n")
    print(json.dumps({"rows": done, "wall_s": round(time.perf_counter() - started, 2), "workers": workers,
                      "task_rss_mb": max(worker_peaks_mb(), default=0), "load": os.getloadavg()[0]}))


def measure(per_block: int, uris: list[str], work: Path) -> dict:
    listing = work / "uris.json"
    listing.write_text(json.dumps(uris))
    out = subprocess.run([sys.executable, __file__, "--child", str(per_block), str(listing)], check=False,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"block {per_block} failed: {out.stdout[-2000:]}{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == len(uris), result
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--blocks", type=int, nargs="*", default=[4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-blocks", type=int, nargs="*", default=[4, 16, 64])
    parser.add_argument("--work", type=Path, default=Path("/tmp/internvl-batch-block-size"))
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        return child(int(args.child[0]), json.loads(Path(args.child[1]).read_text()))
    args.work.mkdir(parents=True, exist_ok=True)
    missing = [f"/nonexistent/block-size/{i:07d}.jpg" for i in range(args.rows)]
    print("| rows a task | tasks | wall | tasks/s | ms a task | CPU workers | load |")
    print("|---|---|---|---|---|---|---|")
    for per_block in args.blocks:
        r = measure(per_block, missing, args.work)
        tasks = -(-args.rows // per_block)
        print(f"| {per_block} | {tasks} | {r['wall_s']} s | {tasks / r['wall_s']:.0f} | "
              f"{1000 * r['wall_s'] * r['workers'] / tasks:.1f} | {r['workers']} | {r['load']:.1f} |", flush=True)
    if args.images:
        from bench.media import camera_jpeg

        photos = [str(camera_jpeg("natural", 4000, 3000, seed=s)) for s in range(4)]
        images = [photos[i % len(photos)] for i in range(args.images)]
        print(f"\n| rows a task ({args.images} 13-tile JPEGs) | wall | images/s | largest worker peak RSS | load |")
        print("|---|---|---|---|---|")
        for per_block in args.image_blocks:
            r = measure(per_block, images, args.work)
            print(f"| {per_block} | {r['wall_s']} s | {args.images / r['wall_s']:.2f} | {r['task_rss_mb']} MB "
                  f"| {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
