"""CPU stage throughput, exact mode: our preprocessing vs the model cards' `load_image`, same JPEGs, one process.

Both sides read the same JPEG bytes from local disk and tile with max_tiles=12 + thumbnail.
- ours:  Preprocess.prepare: read -> decode -> grid resize + thumbnail resize -> tiles cut from the grid array
         with one copy into a preallocated uint8 block -> bytes (normalisation happens on the model's device, so it
         is not CPU-stage work).
- cards: bench/cards.py `load_image`: Image.open().convert('RGB') -> dynamic_preprocess (resize, crop each tile,
         thumbnail) -> per tile the cards' torchvision transform (Resize no-op on a 448 tile, ToTensor, Normalize),
         reproduced operation for operation (torchvision is not installed; see bench/cards.py) -> torch.stack.
Every image's tiles are checked bit for bit: normalize_tiles(ours) == the cards' float32 tensor.

Rounds alternate between the two sides; the ratio of medians is printed for wall time and for process CPU time
(the machine is shared and noisy: CPU time, of this process and its children, is what "per core" means and
is the steadier of the two; bench/timing.py). torch runs
with one thread. `--profile` adds a per-step breakdown of both sides for each image size.

    PYTHONPATH=. python bench/cpu_stage.py [--rounds 5] [--set camera|web|all] [--profile]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cards  # noqa: E402
from bench.media import camera_jpeg  # noqa: E402
from bench.timing import Clock, cpu_seconds  # noqa: E402
from pipeline.config import parse_job  # noqa: E402
from pipeline.media.tiling import choose_grid, normalize_tiles  # noqa: E402
from pipeline.stages.preprocess import Preprocess  # noqa: E402

CAMERA = [(4032, 3024), (4000, 3000), (3024, 4032), (1920, 1080), (6000, 4000)]
WEB = [(640, 480), (1024, 1024), (1280, 720), (2048, 1536), (800, 1200), (3000, 1000)]


def image_set(name: str) -> list[Path]:
    """Cached photo-like JPEGs at quality 90: each size as a 'natural' and a 'noisy' picture (bench/media.py)."""
    sizes = {"camera": CAMERA, "web": WEB, "all": CAMERA + WEB}[name]
    return [camera_jpeg(kind, w, h, seed=i) for i, (w, h) in enumerate(sizes) for kind in ("natural", "noisy")]


def profile(path: Path) -> dict[str, float]:
    """Median ms of each step of both sides for one image (5 runs each)."""
    data = path.read_bytes()

    def med(fn, n: int = 5) -> tuple[float, object]:
        times, out = [], None
        for _ in range(n):
            t = cpu_seconds()
            out = fn()
            times.append(cpu_seconds() - t)
        return statistics.median(times) * 1000, out

    steps: dict[str, float] = {}

    def decode():
        im = Image.open(io.BytesIO(data))
        im.load()
        return im

    steps["decode"], image = med(decode)
    cols, rows = choose_grid(width=image.width, height=image.height)
    steps["grid resize"], grid = med(lambda: image.resize((cols * 448, rows * 448)))
    steps["thumb resize"], thumb = med(lambda: image.resize((448, 448)))
    steps["np.asarray(grid)"], arr = med(lambda: np.asarray(grid))
    out = np.empty((cols * rows + 1, 448, 448, 3), np.uint8)

    def cut():
        out[:-1].reshape(rows, cols, 448, 448, 3)[...] = arr.reshape(rows, 448, cols, 448, 3).transpose(0, 2, 1, 3, 4)
        out[-1] = np.asarray(thumb)

    steps["tile copy + thumb"], _ = med(cut)
    steps["tobytes"], _ = med(out.tobytes)
    steps["cards: convert('RGB') copy"], _ = med(lambda: image.convert("RGB"))
    tiles = cards.dynamic_preprocess(image, use_thumbnail=True)
    steps["cards: crops"], _ = med(
        lambda: [grid.crop((c * 448, r * 448, c * 448 + 448, r * 448 + 448)) for r in range(rows) for c in range(cols)])
    transform = cards.build_transform(448)
    steps["cards: per-tile transform"], values = med(lambda: [transform(t) for t in tiles])
    steps["cards: torch.stack"], _ = med(lambda: torch.stack(values))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", default="camera", choices=["camera", "web", "all"])
    parser.add_argument("--profile", action="store_true", help="per-step breakdown for each image size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = image_set(args.set)
    stage = Preprocess(parse_job({"task": "caption", "input": "x", "output": "y", "model": "m"}))
    tiles = 0
    for p in paths:  # same pixels as the cards feed the model, bit for bit, for every image
        row = stage.prepare(str(p))
        pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["num_tiles"], 448, 448, 3)
        assert np.array_equal(normalize_tiles(pixels), cards.load_image(str(p)).numpy()), p
        tiles += row["num_tiles"]
    clock = Clock()
    for _ in range(args.rounds):
        for p in paths:
            clock.run(f"ours {p.name}", stage.prepare, str(p))
        for p in paths:
            clock.run(f"cards {p.name}", cards.load_image, str(p))

    n = len(paths)
    print(f"images: {n} photo-like JPEGs q90 ({args.set}: {len(paths) // 2} sizes x natural/noisy, {tiles} tiles), "
          f"{args.rounds} alternating rounds, 1 thread; tiles bit-identical to the cards' (checked)")
    print(f"{'image':34s} {'ours ms':>8s} {'cards ms':>9s} {'ratio':>6s}   (CPU time, medians)")
    for p in paths:
        o, c = clock.median(f"ours {p.name}"), clock.median(f"cards {p.name}")
        print(f"{p.name:34s} {o * 1000:8.1f} {c * 1000:9.1f} {c / o:6.2f}x")
    for label, cpu in (("wall", False), ("cpu", True)):
        o, c = clock.total("ours ", cpu), clock.total("cards ", cpu)
        print(f"{label:4s}: ours {n / o:6.2f} images/s {tiles / o:7.1f} tiles/s | cards {n / c:6.2f} images/s "
              f"{tiles / c:7.1f} tiles/s | ratio ours/cards: {c / o:.2f}x")
    if args.profile:
        print("\nper-step profile (CPU ms, median of 5), natural pictures:")
        for p in paths[::2]:
            steps = profile(p)
            ours = sum(v for k, v in steps.items() if not k.startswith("cards"))
            extra = sum(v for k, v in steps.items() if k.startswith("cards"))
            shared = steps["decode"] + steps["grid resize"] + steps["thumb resize"]
            print(f"  {p.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
            print(f"    shared (decode + 2 resizes) {shared:.1f} ms; ours adds {ours - shared:.1f}; cards add {extra:.1f}"
                  f" -> ceiling for an exact pipeline with zero overhead: {(shared + extra) / shared:.2f}x")


if __name__ == "__main__":
    main()
