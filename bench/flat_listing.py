"""One flat prefix listed in bounded parts: `plan` over a local folder of N empty .jpg files (hash names, one level)
and over a SeaweedFS prefix of N objects, with 1 and 2 listing workers, beside the same level listed by one task as
before (`list_level`).

Each measurement is a fresh driver process that starts its own local Ray: it lists the input (`list_objects`: wall,
parts, the most entries one task held, and of the Ray workers: the largest private memory, RssAnon sampled every
0.1 s, which is what a task holds, and the largest VmHWM, read from /proc before anything else runs in the
workers, which also counts the object-store pages a worker wrote its blocks into), then plans the job (`plan_job`:
wall, which lists again, and the driver's own peak RSS, VmHWM). Worker figures include each worker process's
baseline (Ray, pyarrow, the pipeline's modules). "Before" is
the same driver with every store listed as other stores still are: the top level by one task (`list_level`).

    PYTHONPATH=. python bench/flat_listing.py [--files 200000 1000000] [--s3 100000] [--s3-keys 10000]
                                              [--workers 1 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.driver_scaling import peak_rss_mb


def names(n: int) -> list[str]:
    rng = random.Random(n)
    return [f"{rng.getrandbits(64):016x}.jpg" for _ in range(n)]


def make_folder(folder: Path, n: int) -> None:
    """N empty files in one folder (reused when complete)."""
    if folder.is_dir() and sum(1 for _ in os.scandir(folder)) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in names(n):
        (folder / name).touch()


def fill_bucket(prefix: str, n: int) -> None:
    """N empty objects under one S3 prefix, uploaded in batches (s3fs sends each batch's requests concurrently)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    batch = 2000
    all_names = names(n)
    for start in range(0, n, batch):
        fs.pipe({f"{prefix}/{name}": b"" for name in all_names[start:start + batch]})


def descendants() -> dict[int, bool]:
    """The processes under this driver (/proc: the process tree), each with whether it is a Ray worker."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found[pid] = cmd.startswith("ray::") or "default_worker.py" in cmd
    return found


def status_mb(pid: int, field: str) -> int:
    """One memory figure of /proc/PID/status (VmHWM, RssAnon, ...), in MB; 0 once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) // 1024 for line in lines if line.startswith(f"{field}:")), 0)


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process (/proc/PID/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_peaks_mb() -> list[int]:
    """Peak RSS (VmHWM, MB) of each Ray worker process under this driver."""
    return [status_mb(pid, "VmHWM") for pid, worker in descendants().items() if worker]


class TreeSampler(threading.Thread):
    """Sampled every `interval` seconds until stopped: the largest private memory (RssAnon: the heap, not the
    object-store pages a worker wrote, which VmHWM also counts) of any one Ray worker, and the CPU seconds of every
    process under this driver, kept per process so that one Ray ends (an idle worker) is still counted."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, 0, threading.Event()
        self.start_cpu = {pid: cpu_s(pid) or 0.0 for pid in descendants()}
        self.cpu: dict[int, float] = {}

    def sample(self) -> None:
        for pid, worker in descendants().items():
            self.cpu[pid] = cpu_s(pid) or self.cpu.get(pid, 0.0)
            if worker:
                self.peak = max(self.peak, status_mb(pid, "RssAnon"))

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> tuple[int, float]:
        """The largest worker's peak RssAnon (MB), and the CPU seconds the processes under the driver used."""
        self.done.set()
        self.join()
        self.sample()
        return self.peak, sum(c - self.start_cpu.get(pid, 0.0) for pid, c in self.cpu.items())


def child(what: str, job_file: str) -> None:
    """One measurement in this process: listed in `parts`, or as before (`whole`: the top level by one task)."""
    from pipeline.config import load_job
    from pipeline.run import sources
    from pipeline.run.execute import init_ray
    from pipeline.run.runner import plan_job

    if what == "whole":
        sources.level_mode = lambda url, options: "whole"  # what list_objects did before ranges
    job = load_job(job_file)
    init_ray()
    sampler = TreeSampler()
    sampler.start()
    started = time.perf_counter()
    listing = sources.list_objects(job)
    list_s = round(time.perf_counter() - started, 1)
    rows = listing.rows.count()
    figures = {"rows": rows, "parts": listing.tasks, "largest": listing.largest or rows, "list_s": list_s,
               "task_private_mb": sampler.stop()[0], "task_rss_mb": max(worker_peaks_mb(), default=0)}
    started = time.perf_counter()
    samples = plan_job(job, echo=lambda line: None).figures()["samples"]
    print(json.dumps({**figures, "plan_s": round(time.perf_counter() - started, 1), "samples": samples,
                      "driver_rss_mb": peak_rss_mb(), "load": os.getloadavg()[0]}))


def measure(what: str, job_file: Path, workers: int, keys: int | None) -> dict:
    env = {**os.environ, "INTERNVL_BATCH_LIST_WORKERS": str(workers)}
    if keys:
        env["INTERNVL_BATCH_LIST_KEYS"] = str(keys)
    out = subprocess.run([sys.executable, __file__, "--child", what, str(job_file)], check=False, capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed: {out.stdout[-2000:]}{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(label: str, n: int, job_file: Path, workers: list[int], keys: int | None = None) -> None:
    """Rows of the table for one input: one task as before, then in parts with each number of workers."""
    rows = [("one task (before)", 1, measure("whole", job_file, 1, keys))]
    rows += [(f"parts, {w} worker(s)", w, measure("parts", job_file, w, keys)) for w in workers]
    for how, _, r in rows:
        assert r["rows"] == r["samples"] == n, r
        print(f"| {label} {n:,} | {how} | {r['list_s']} s | {r['parts']} | {r['largest']:,} | {r['task_private_mb']} MB "
              f"| {r['task_rss_mb']} MB | {r['plan_s']} s | {r['driver_rss_mb']} MB | {r['load']:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, nargs="*", default=[200_000, 1_000_000])
    parser.add_argument("--s3", type=int, nargs="*", default=[100_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--s3-keys", type=int, default=10_000,
                        help="entries a listing task holds at most, S3 runs (the default cap, 100k, is one part of 100k)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/internvl-batch-flat-listing"))
    parser.add_argument("--keep", action="store_true", help="keep the folders (they are deleted at the end)")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "JOB"))
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    from pipeline.embedded.tiny_model import make_tiny_model

    model = args.work / "tiny-model"
    if not (model / "config.json").exists():
        make_tiny_model(model)
    print("| input | listed by | list: wall | parts | most entries in one task | a worker's peak heap (RssAnon) "
          "| a worker's peak RSS (VmHWM) | plan: wall | plan: driver peak RSS | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        for n in args.files:
            folder = args.work / f"flat-{n}"
            make_folder(folder, n)
            job_file = args.work / f"flat-{n}.yaml"
            job_file.write_text(yaml.safe_dump({"task": "caption", "input": str(folder), "model": str(model),
                                                "output": str(args.work / f"out-{n}")}))
            report("local folder", n, job_file, args.workers)
            if not args.keep:
                shutil.rmtree(folder)
        if args.s3:
            from pipeline.embedded.s3_server import local_s3_server

            with local_s3_server(args.work / "s3", buckets=["bucket"]) as server:
                os.environ.update(server.env())  # the children find the server through the AWS chain
                for n in args.s3:
                    fill_bucket(f"bucket/flat-{n}", n)
                    job_file = args.work / f"s3-{n}.yaml"
                    job_file.write_text(yaml.safe_dump({"task": "caption", "input": f"s3://bucket/flat-{n}/",
                                                        "model": str(model), "output": str(args.work / f"out-s3-{n}")}))
                    report("SeaweedFS prefix", n, job_file, args.workers, args.s3_keys)
    finally:
        if not args.keep:
            shutil.rmtree(args.work / "s3", ignore_errors=True)


if __name__ == "__main__":
    main()
