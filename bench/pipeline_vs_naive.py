"""The whole pipeline vs a naive sequential loop: same tiny model, same photo-like JPEGs, same answers, 2 cores.

- naive: one Python process, the model loaded once with plain transformers, then for each image in turn the
         cards' `load_image` (max_num=12; torchvision's operations in PIL + torch, bench/cards.py)
         and one `generate` call for that one sample, prompt laid out as the cards' `chat()` does
         (`<img>` + `<IMG_CONTEXT>` x 256 x tiles + `</img>\\n{prompt}` in the checkpoint's chat template), greedy.
         torch keeps its default thread count (2 on this machine): what a naive user gets.
- ours:  `internvl-batch run` as a library call, `pipeline.run.runner.run_job(parse_job({...}))`, with the job defaults
         (compute.batch_size 8, replicas 1, cpu_workers auto; on CPU a batch's prompts go through the language model
         in groups of equal length), on a local Ray the run starts itself, output to a temporary folder. Ray runs each task/actor with OMP_NUM_THREADS = its num_cpus (1), printed below.
Both ask the caption prompt with the same max_new_tokens and both sides' responses are compared image by image
(batched == one-at-a-time is a project guarantee; a difference is printed, not hidden).

Rounds alternate naive / ours. The first `ours` run is "cold": its wall time includes starting Ray (GCS, raylet,
workers) and the model actor. Later `ours` runs are "warm": Ray is already up, but each run still starts its
model actor and loads the model (the naive wall time includes its model load too; the loop alone is also shown).
The machine is shared and noisy, so besides the medians the script prints every round, the best round of each
side, the CPU seconds of each side's whole process tree, the model stage's busy fraction and the rate from the
model actor's ready to its last batch (both from _SUCCESS.json when present).

    python bench/pipeline_vs_naive.py [--images 96] [--max-new-tokens 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cards import load_image as cards_load_image  # noqa: E402  the cards' reference load_image
from bench.media import noisy_photo as photo_like  # noqa: E402  smooth colour waves + sensor noise
from pipeline.config import parse_job  # noqa: E402
from pipeline.embedded.tiny_model import make_tiny_model  # noqa: E402

PROMPT = "Describe the image in detail."  # the caption task's default prompt, asked on both sides
# Mixed camera / phone / web sizes (tiles with max_num=12: 13, 13, 9, 9, 13, 13, 13, 13, 13, 10, 7, 13)
SIZES = [(4032, 3024), (3024, 4032), (1920, 1080), (1280, 720), (1080, 1350), (2048, 1536), (1600, 1200),
         (800, 600), (640, 480), (1024, 1024), (3000, 2000), (500, 375)]


class CpuMeter(threading.Thread):
    """CPU seconds (user + system) spent by this process and all its descendants (Ray's GCS, raylet, workers) between
    start() and finish(), polled every 0.5 s so a process that ends in between counts up to its last poll.
    The machine is shared: wall times move with other people's load, CPU seconds less (though a 2-thread torch
    burns more CPU waiting for its descheduled other thread when the machine is busy)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.base: dict[int, float] = {p.pid: used for p, used in self._tree()}  # processes already running
        self.last: dict[int, float] = {}
        self.model: set[int] = set()  # pids that ran the Generate (model) actor

    @staticmethod
    def _tree() -> list[tuple[psutil.Process, float]]:
        me = psutil.Process()
        out = []
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times()
                out.append((p, t.user + t.system))
            except psutil.Error:
                pass
        return out

    def run(self) -> None:
        while True:
            for p, used in self._tree():
                self.last[p.pid] = used
                try:
                    if "Generate" in " ".join(p.cmdline()[:1]):
                        self.model.add(p.pid)
                except psutil.Error:
                    pass
            if self.done.wait(0.5):
                break

    def finish(self) -> tuple[float, float]:
        """(CPU seconds of the whole tree, of the model actor) since start."""
        self.done.set()
        self.join()
        for p, used in self._tree():
            self.last[p.pid] = used
        spent = {pid: used - self.base.get(pid, 0.0) for pid, used in self.last.items()}
        return sum(spent.values()), sum(spent[pid] for pid in self.model)


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = folder / f"{i:04d}.jpg"
        photo_like(w, h, seed=i).save(path, quality=90)
        paths.append(path)
    return paths


def naive_run(model_dir: Path, paths: list[Path], max_new_tokens: int) -> tuple[dict[str, str], float, float, int]:
    """Load the model, then load_image + generate one image at a time. Returns responses, wall, loop time, tiles."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = InternVLForConditionalGeneration.from_pretrained(model_dir).eval()
    template = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + PROMPT}], tokenize=False,
                                       add_generation_prompt=True)
    loop_start = time.perf_counter()
    responses, tiles = {}, 0
    for path in paths:
        pixel_values = cards_load_image(str(path), max_num=12)
        tiles += len(pixel_values)
        query = template.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (256 * len(pixel_values)) + "</img>", 1)
        enc = tok(query, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, pixel_values=pixel_values, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, enc["input_ids"].shape[1]:]
        responses[path.name] = tok.decode(new, skip_special_tokens=True).strip()
    end = time.perf_counter()
    return responses, end - start, end - loop_start, tiles


def ours_run(model_dir: Path, images: Path, output: Path, max_new_tokens: int) -> tuple[dict[str, str], float, dict, list[str]]:
    """One run_job call; returns responses by file name, wall time, _SUCCESS.json and the run's echo lines."""
    import pyarrow.dataset as pads

    from pipeline.run.runner import run_job

    job = parse_job({"task": "caption", "input": str(images), "output": str(output), "model": str(model_dir),
                     "generation": {"max_new_tokens": max_new_tokens}},
                    source="bench")
    lines: list[str] = []
    start = time.perf_counter()
    run_job(job, echo=lines.append)
    wall = time.perf_counter() - start
    table = pads.dataset(output, format="parquet", ignore_prefixes=[".", "_"]).to_table(columns=["uri", "status", "response"])
    bad = [r for r in table.to_pylist() if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"ours: {len(bad)} rows are not ok, e.g. {bad[0]}")
    responses = {Path(u).name: r for u, r in zip(table.column("uri").to_pylist(), table.column("response").to_pylist())}
    success = json.loads((output / "_SUCCESS.json").read_text())
    return responses, wall, success, lines


def ray_worker_threads() -> int:
    """torch's thread count inside a 1-CPU Ray task (what the model actor and CPU tasks get)."""
    import ray

    @ray.remote(num_cpus=1)
    def threads() -> int:
        import torch as t

        return t.get_num_threads()

    return ray.get(threads.remote())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="naive/ours pairs; the first ours run is cold")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        paths = make_images(tmp / "images", args.images)
        model_dir = make_tiny_model(tmp / "model")
        megapixels = sum(w * h for w, h in (SIZES[i % len(SIZES)] for i in range(args.images))) / 1e6
        print(f"setup: {args.images} JPEGs ({megapixels:.0f} MP, {sum(p.stat().st_size for p in paths) / 1e6:.0f} MB) "
              f"and the tiny model in {time.perf_counter() - t:.0f} s; load average {os.getloadavg()[0]:.1f}")

        naive_walls, naive_loops, ours_walls = [], [], []
        naive_cpu, ours_cpu, model_cpu = [], [], []
        naive_resp: dict[str, str] = {}
        mismatches: set[str] = set()
        success: dict = {}
        tiles = 0
        for r in range(args.rounds):
            meter = CpuMeter()
            meter.start()
            naive_resp, wall, loop, tiles = naive_run(model_dir, paths, args.max_new_tokens)
            naive_cpu.append(meter.finish()[0])
            naive_walls.append(wall)
            naive_loops.append(loop)
            print(f"round {r + 1}: naive {wall:6.1f} s (loop {loop:.1f} s, torch threads {torch.get_num_threads()})", flush=True)
            meter = CpuMeter()
            meter.start()
            ours_resp, wall, success, lines = ours_run(model_dir, tmp / "images", tmp / f"out{r}", args.max_new_tokens)
            cpu, model = meter.finish()
            ours_cpu.append(cpu)
            model_cpu.append(model)
            ours_walls.append(wall)
            print(f"round {r + 1}: ours  {wall:6.1f} s ({'cold: includes starting Ray' if r == 0 else 'warm: Ray already up'})",
                  flush=True)
            if r == 0:
                for line in lines:
                    print(f"    | {line}")
            missing = set(naive_resp) ^ set(ours_resp)
            if missing:
                raise SystemExit(f"images on one side only: {sorted(missing)[:5]}")
            mismatches |= {k for k in naive_resp if naive_resp[k] != ours_resp[k]}
            for k in sorted(k for k in naive_resp if naive_resp[k] != ours_resp[k])[:3]:
                print(f"    DIFFERENT {k}: naive {naive_resp[k]!r} vs ours {ours_resp[k]!r}")
        threads = ray_worker_threads()

    n = args.images
    naive = statistics.median(naive_walls)
    naive_loop = statistics.median(naive_loops)
    cold = ours_walls[0]
    warm = statistics.median(ours_walls[1:]) if len(ours_walls) > 1 else None
    print()
    print(f"images: {n} photo-like JPEGs of {len(SIZES)} sizes ({tiles} tiles), caption, max_new_tokens "
          f"{args.max_new_tokens}, greedy, {os.cpu_count()} cores (load average at the end {os.getloadavg()[0]:.1f}); "
          f"{args.rounds} alternating rounds (medians)")
    print(f"naive (model load + load_image/generate per image, torch {torch.get_num_threads()} threads): "
          f"{naive:6.1f} s  {n / naive:5.2f} images/s   (loop only {naive_loop:.1f} s, {n / naive_loop:.2f} images/s)")
    print(f"ours cold (run_job incl. Ray startup, torch {threads} thread per task/actor):  "
          f"{cold:6.1f} s  {n / cold:5.2f} images/s   ratio ours/naive {naive / cold:.2f}x")
    if warm is not None:
        print(f"ours warm (run_job, Ray already up; actor start + model load included):  "
              f"{warm:6.1f} s  {n / warm:5.2f} images/s   ratio ours/naive {naive / warm:.2f}x")
        best_naive, best_warm = min(naive_walls), min(ours_walls[1:])
        print(f"best of rounds (least disturbed by other load): naive {best_naive:.1f} s, ours warm {best_warm:.1f} s, "
              f"ratio {best_naive / best_warm:.2f}x; all rounds: naive "
              + ", ".join(f"{w:.0f}" for w in naive_walls) + " s; ours " + ", ".join(f"{w:.0f}" for w in ours_walls) + " s")
    print(f"CPU seconds, all processes (user + system; steadier than wall time on a shared machine): naive "
          f"{statistics.median(naive_cpu):.1f} s, ours cold {ours_cpu[0]:.1f} s"
          + (f", ours warm {statistics.median(ours_cpu[1:]):.1f} s" if len(ours_cpu) > 1 else "")
          + "; of which the model actor (1 thread, incl. its start-up and model load) "
          + ", ".join(f"{m:.1f}" for m in model_cpu) + " s")
    same = n - len(mismatches)
    print(f"responses identical naive vs ours: {same}/{n}" + ("" if not mismatches else f"  DIFFERENT: {sorted(mismatches)}"))
    if "model_busy_fraction" in success:
        print(f"model stage busy fraction (last run's _SUCCESS.json): {success['model_busy_fraction']}")
    spans = [r.get("span_s") for r in (success.get("replicas") or {}).values()]
    if spans and all(spans):  # steady state: from the replica's model loaded to its last batch's end
        span = max(spans)     # (an upper bound: the CPU stage already works while the model actor starts)
        print(f"ours steady state (last run, model loaded -> last batch, _SUCCESS.json replicas): {span:6.1f} s  "
              f"{n / span:5.2f} images/s   ratio vs naive loop only {naive_loop / span:.2f}x "
              f"(upper bound: tiles made while the actor started are not in this span)")


if __name__ == "__main__":
    main()
