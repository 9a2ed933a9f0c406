"""`tiling.mode: fast` vs `exact` on camera-size JPEGs: throughput ratio and fidelity (PSNR of fast vs exact tiles).

Both modes run `pipeline.media.images.load_tiles` on the same JPEG bytes (read from disk each time) and produce the
bytes the CPU stage ships (`.tobytes()`), max_tiles=12 + thumbnail:
- exact: full decode, the cards' two bicubic resizes (bit-identical to the cards).
- fast:  when the grid is at most half the picture both ways, DCT-scaled decode (1/2, 1/4, 1/8; never below the
         grid's size), bilinear grid resize from it, thumbnail by Image.reduce of the grid; otherwise == exact.
Checked: same grid and tile count in both modes for every picture; PSNR over all tile pixels of each picture
(min and median printed; the target is >= 40 dB). Rounds alternate; ratio of medians for wall and CPU time (bench/timing.py).

    PYTHONPATH=. python bench/fast_mode.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.media import camera_jpeg  # noqa: E402
from bench.timing import Clock  # noqa: E402
from pipeline.media.images import load_tiles  # noqa: E402

CAMERA = [(4032, 3024), (4000, 3000), (3024, 4032), (1920, 1080), (6000, 4000)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def run(path: Path, mode: str) -> bytes:
    return load_tiles(path.read_bytes(), max_tiles=12, thumbnail=True, mode=mode).pixels.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    paths = [camera_jpeg(kind, w, h, seed=i) for i, (w, h) in enumerate(CAMERA) for kind in ("natural", "noisy")]
    fidelity = {}
    for p in paths:
        exact, fast = (load_tiles(p.read_bytes(), mode=m) for m in ("exact", "fast"))
        assert exact.grid == fast.grid and exact.num_tiles == fast.num_tiles, p
        assert exact.source_size == fast.source_size, p
        fidelity[p.name] = psnr(exact.pixels, fast.pixels)
    clock = Clock()
    for _ in range(args.rounds):
        for mode in ("exact", "fast"):
            for p in paths:
                clock.run(f"{mode} {p.name}", run, p, mode)
    print(f"images: {len(paths)} photo-like JPEGs q90 (5 camera sizes x natural/noisy), {args.rounds} alternating "
          f"rounds; same grid and tile count in both modes (checked)")
    print(f"{'image':34s} {'exact ms':>9s} {'fast ms':>8s} {'ratio':>6s} {'PSNR dB':>8s}   (CPU time, medians)")
    for p in paths:
        e, f = clock.median(f"exact {p.name}"), clock.median(f"fast {p.name}")
        print(f"{p.name:34s} {e * 1000:9.1f} {f * 1000:8.1f} {e / f:5.2f}x {fidelity[p.name]:8.2f}")

    for label, cpu in (("wall", False), ("cpu", True)):
        e, f = clock.total("exact ", cpu), clock.total("fast ", cpu)
        print(f"{label:4s}: exact {len(paths) / e:6.2f} images/s | fast {len(paths) / f:6.2f} images/s | "
              f"ratio fast/exact: {e / f:.2f}x")
    finite = [v for v in fidelity.values() if v != float("inf")]
    print(f"PSNR fast vs exact over all tile pixels of each picture: min {min(finite):.2f} dB, median "
          f"{statistics.median(fidelity.values()):.2f} dB ({len(fidelity) - len(finite)} pictures identical: grid "
          f"not 2x smaller)")


if __name__ == "__main__":
    main()
