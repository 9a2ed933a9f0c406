"""Peak memory of a 10k-input run vs a 1k-input run: memory must not grow with the number of inputs (<= 1.1x).

Setup: 10,000 small PNGs (64x64 by default: square, so one 448 px tile each with the default tiling; a 64x48
image would become a 4x3 grid + thumbnail = 13 tiles, as the cards' aspect-ratio rule picks), content varied
by seed, and the tiny model. Each size runs as a `caption` job (job defaults, max_new_tokens 4) over a JSONL
manifest of the first N images (`uri` column), in a fresh child process of this script: the child calls
`pipeline.run.runner.run_job`, which starts a local Ray (GCS, raylet, workers: all descendants of the child).

Measured from this (parent) process, every --interval seconds (0.25 by default) with psutil:
- total: the sum of RSS over the child and all its descendants (the headline number; peak over time);
- driver: the child alone; largest worker: the largest single descendant; and the peak of each kind of
  process (Ray GCS, raylet, Ray workers summed, other Ray processes such as the dashboard agent);
- PSS summed (every 4th sample): RSS counts pages of Ray's shared-memory object store in every process that
  maps them, PSS shares them out, so PSS is the closer figure for what the machine really spends;
- the object store's bytes in use, polled by the child from the raylet once a second (Ray internal API).
Then the ratio 10k/1k of each, and where the growth is.

    python bench/memory_scaling.py [--sizes 1000 10000] [--max-new-tokens 4] [--image-size 64] [--interval 0.25]
                                   [--object-store-mb N]   # the job's compute.object_store_mb (default: auto)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1024**2
KINDS = ("driver", "gcs", "raylet", "workers", "ray other")


def make_images(folder: Path, n: int, size: int) -> list[str]:
    """n small PNGs: a seeded gradient with a seeded rectangle, so no two are alike."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size]
    uris = []
    for i in range(n):
        rng = np.random.default_rng(i)
        base, slope = rng.integers(0, 256, 3), rng.integers(1, 8, 3)
        rgb = np.stack([(base[c] + slope[c] * (x + (c + 1) * y)) % 256 for c in range(3)], axis=-1).astype(np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        rgb[y0:y0 + size // 3, x0:x0 + size // 3] = rng.integers(0, 256, 3)
        path = folder / f"{i:05d}.png"
        Image.fromarray(rgb, "RGB").save(path)
        uris.append(str(path))
    return uris


def kind_of(proc: psutil.Process, driver_pid: int) -> tuple[str, str]:
    """(kind, short label) of a process in the run's tree; Ray workers are named by their current task."""
    if proc.pid == driver_pid:
        return "driver", "driver"
    argv = proc.cmdline() or [proc.name()]
    cmd = " ".join(argv)
    if "gcs_server" in argv[0]:
        return "gcs", "gcs_server"
    if "raylet" in argv[0]:
        return "raylet", "raylet"
    if cmd.startswith("ray::") and "Agent" in argv[0]:  # ray::DashboardAgent, ray::RuntimeEnvAgent
        return "ray other", argv[0].split(" ")[0][5:]
    if cmd.startswith("ray::") or "default_worker.py" in cmd:  # ray::Class.method -> ray::Class (role, not call)
        return "workers", re.sub(r"\.[A-Za-z_]\w*$", "", argv[0].split(" ")[0])[:60]
    script = next((a for a in argv[1:] if a.endswith(".py")), argv[0])
    return "ray other", Path(script).name[:40]


class TreeSampler(threading.Thread):
    """Samples RSS (and every 4th time PSS) of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.samples: list[dict] = []  # {t, total, pss, kind sums..., largest, largest_label}
        self.peak_per_label: dict[str, int] = {}
        self.at_peak: list[tuple[str, int]] = []  # (label, RSS) of every process when the total peaked

    def run(self) -> None:
        root = psutil.Process(self.pid)
        start, tick = time.perf_counter(), 0
        while not self.stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            sums = dict.fromkeys(KINDS, 0)
            largest, largest_label, pss = 0, "", 0 if tick % 4 == 0 else None
            now: list[tuple[str, int]] = []
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if pss is not None:
                        pss += p.memory_full_info().pss
                    kind, label = kind_of(p, self.pid)
                except psutil.Error:  # ended between listing and reading
                    continue
                sums[kind] += rss
                now.append((label, rss))
                key = f"{kind}: {label}"
                self.peak_per_label[key] = max(self.peak_per_label.get(key, 0), rss)
                if kind != "driver" and rss > largest:
                    largest, largest_label = rss, label
            self.samples.append(dict(t=time.perf_counter() - start, total=sum(sums.values()), pss=pss, largest=largest,
                                     largest_label=largest_label, processes=len(procs), **sums))
            if self.samples[-1]["total"] >= max(r["total"] for r in self.samples):
                self.at_peak = sorted(now, key=lambda x: -x[1])
            tick += 1
            self.stop.wait(self.interval)

    def summary(self) -> dict:
        s = self.samples
        top = max(s, key=lambda r: r["largest"])
        return dict(
            total=max(r["total"] for r in s), pss=max(r["pss"] for r in s if r["pss"] is not None),
            largest=top["largest"], largest_label=top["largest_label"],
            processes=max(r["processes"] for r in s), **{k: max(r[k] for r in s) for k in KINDS},
            when_total=max(s, key=lambda r: r["total"])["t"] / s[-1]["t"],
            timeline=[s[min(len(s) - 1, int(len(s) * q))] for q in (0.1, 0.3, 0.5, 0.7, 0.9)],
        )


def run_child(args: argparse.Namespace) -> None:
    """In the child: run the job (run_job starts Ray), poll the object store, write the result file."""
    from pipeline.config import parse_job
    from pipeline.run.runner import run_job

    store = {"peak_used": 0, "capacity": 0, "spilled": 0, "polls": 0}
    done = threading.Event()

    def poll_store() -> None:
        import ray

        while not ray.is_initialized() and not done.is_set():
            time.sleep(0.2)
        try:
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address

            state = get_state_from_address(ray.get_runtime_context().gcs_address)
            while not done.is_set():
                stats = get_memory_info_reply(state).store_stats
                store.update(peak_used=max(store["peak_used"], stats.object_store_bytes_used),
                             capacity=stats.object_store_bytes_avail, spilled=stats.spilled_bytes_total,
                             polls=store["polls"] + 1)
                done.wait(1.0)
        except Exception as err:  # noqa: BLE001 - optional figure; say why it is missing
            store["error"] = f"{type(err).__name__}: {err}"

    poller = threading.Thread(target=poll_store, daemon=True)
    poller.start()
    compute = {"object_store_mb": args.object_store_mb} if args.object_store_mb else {}
    job = parse_job({"task": "caption", "input": args.manifest, "output": args.output, "model": args.model,
                     "generation": {"max_new_tokens": args.max_new_tokens}, "compute": compute}, source="bench")
    start = time.perf_counter()
    summary = run_job(job, echo=lambda line: print(f"    | {line}", flush=True))
    wall = time.perf_counter() - start
    done.set()
    poller.join(timeout=5)
    success = json.loads((Path(args.output) / "_SUCCESS.json").read_text())
    Path(args.result).write_text(json.dumps(dict(wall=wall, rows_ok=summary.rows_ok, rows_error=summary.rows_error,
                                                 tiles=summary.tiles, store=store,
                                                 model_busy_fraction=success.get("model_busy_fraction"))))


def measure(n: int, uris: list[str], tmp: Path, model: Path, args: argparse.Namespace) -> dict:
    """Run one size in a fresh child process while sampling its process tree."""
    manifest = tmp / f"manifest-{n}.jsonl"
    manifest.write_text("".join(json.dumps({"uri": u}) + "\n" for u in uris[:n]))
    result = tmp / f"result-{n}.json"
    cmd = [sys.executable, __file__, "--child", "--manifest", str(manifest), "--output", str(tmp / f"out-{n}"),
           "--model", str(model), "--result", str(result), "--max-new-tokens", str(args.max_new_tokens),
           "--object-store-mb", str(args.object_store_mb)]
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    sampler = TreeSampler(child.pid, args.interval)
    sampler.start()
    code = child.wait()
    sampler.stop.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"the {n}-input run failed with exit code {code}")
    out = json.loads(result.read_text())
    out.update(n=n, child_s=time.perf_counter() - start, peaks=sampler.summary(), per_label=sampler.peak_per_label,
               at_peak=sampler.at_peak)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--object-store-mb", type=int, default=0,
                        help="the job's compute.object_store_mb (default 0: the pipeline's own budget)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--manifest", "--output", "--model", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    from pipeline.embedded.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        uris = make_images(tmp / "images", max(args.sizes), args.image_size)
        model = make_tiny_model(tmp / "model")
        print(f"setup: {len(uris)} {args.image_size}x{args.image_size} PNGs and the tiny model in "
              f"{time.perf_counter() - t:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        runs = []
        for n in args.sizes:
            print(f"run {n} inputs:", flush=True)
            runs.append(measure(n, uris, tmp, model, args))
            r = runs[-1]
            print(f"    -> {r['wall']:.1f} s in run_job ({r['n'] / r['wall']:.1f} images/s), {r['child_s']:.1f} s for the "
                  f"whole child process; {r['rows_ok']} ok, {r['rows_error']} errors, {r['tiles']} tiles", flush=True)

    mb = lambda v: f"{v / MiB:8.0f} MiB"  # noqa: E731
    print()
    print(f"peak memory over time, sampled every {args.interval} s (RSS unless marked), "
          f"caption, max_new_tokens {args.max_new_tokens}, job defaults"
          + (f"; compute.object_store_mb {args.object_store_mb}" if args.object_store_mb else ""))
    header = "".join(f"{r['n']:>14} inputs" for r in runs)
    ratio_head = f"   ratio {runs[-1]['n']}/{runs[0]['n']}" if len(runs) > 1 else ""
    print(f"{'':34}{header}{ratio_head}")
    rows = [("total RSS, driver + all descendants", "total"), ("total PSS (shared pages shared out)", "pss"),
            ("driver (bench child, run_job)", "driver"), ("largest single worker", "largest"),
            ("Ray GCS", "gcs"), ("raylet", "raylet"), ("Ray workers, summed", "workers"), ("other Ray processes", "ray other")]
    for label, key in rows:
        values = [r["peaks"][key] for r in runs]
        ratio = f"   {values[-1] / values[0]:6.2f}x" if len(runs) > 1 and values[0] else ""
        print(f"{label:36}" + "".join(f"{mb(v):>20}" for v in values) + ratio)
    stores = [r["store"] for r in runs]
    if all(s.get("polls") for s in stores):
        values = [s["peak_used"] for s in stores]
        ratio = f"   {values[-1] / values[0]:6.2f}x" if len(runs) > 1 and values[0] else ""
        print(f"{'object store in use (raylet)':36}" + "".join(f"{mb(v):>20}" for v in values) + ratio
              + f"   (capacity {stores[0]['capacity'] / MiB:.0f} MiB; spilled "
              + ", ".join(f"{s['spilled'] / MiB:.0f}" for s in stores) + " MiB)")
    else:
        print("object store: not measured (" + "; ".join(s.get("error", "no polls") for s in stores) + ")")
    print(f"{'largest worker was':36}" + "".join(f"{r['peaks']['largest_label'][:19]:>20}" for r in runs))
    print(f"{'processes in the tree (most)':36}" + "".join(f"{r['peaks']['processes']:>20}" for r in runs))
    print(f"{'total peak at (fraction of run)':36}" + "".join(f"{r['peaks']['when_total']:>20.2f}" for r in runs))
    print(f"{'run_job wall time':36}" + "".join(f"{r['wall']:>18.1f} s" for r in runs))
    print(f"{'whole child process':36}" + "".join(f"{r['child_s']:>18.1f} s" for r in runs)
          + f"   (load average at the end {os.getloadavg()[0]:.1f})")
    for r in runs:
        line = ", ".join(f"{mb(s['total']).strip()} (driver {s['driver'] / MiB:.0f})" for s in r["peaks"]["timeline"])
        print(f"  {r['n']} inputs, total RSS at 10/30/50/70/90% of the run: {line}")
    for r in runs:
        print(f"  {r['n']} inputs, processes at the total peak (MiB): "
              + ", ".join(f"{label} {rss / MiB:.0f}" for label, rss in r["at_peak"]))
    if len(runs) > 1:
        first, last = runs[0], runs[-1]
        ratio = last["peaks"]["total"] / first["peaks"]["total"]
        verdict = "PASS" if ratio <= 1.1 else "FAIL"
        print(f"ratio of peaks {last['n']}/{first['n']} (total RSS): {ratio:.3f}x  target <= 1.1x: {verdict}")
        grown = sorted(((last["per_label"].get(k, 0) - first["per_label"].get(k, 0), k) for k in last["per_label"]),
                       reverse=True)
        print("largest growth by process (peak RSS, same role):",
              ", ".join(f"{k} {d / MiB:+.0f} MiB" for d, k in grown[:4]))


if __name__ == "__main__":
    main()
