"""CPU stage throughput: our preprocessing vs the model cards' per-tile `load_image`, same images, one process.

Both sides read the same JPEG/PNG bytes from local disk and tile with max_tiles=12 + thumbnail.
- ours:  read -> decode -> one resize -> tiles as views -> one contiguous uint8 block (normalisation happens
         on the model's device, so it is not CPU-stage work).
- cards: Image.open().convert('RGB') -> dynamic_preprocess (resize, crop each tile, thumbnail) -> per tile:
         Resize((448, 448), BICUBIC), ToTensor, Normalize -> stack float32. torchvision is not installed here, so the
         per-tile transform is done with the same operations in PIL + torch (resize, x/255, (x-mean)/std).
Runs alternate between the two sides and the median of several rounds is reported, as a ratio (machine noise
affects both alike).

    python bench/cpu_stage.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import parse_job
from pipeline.stages import Preprocess
from pipeline.tiling import normalize_tiles

SIZES = [(640, 480), (1024, 1024), (1280, 720), (1920, 1080), (2048, 1536), (4032, 3024), (800, 1200), (3000, 1000)]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth shapes plus sensor-like noise, so JPEG sizes and decode costs resemble camera pictures."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([
        128 + 100 * np.sin(x / (37 + 11 * c) + y / (53 + 7 * c) + rng.uniform(0, 6)) for c in range(3)
    ], axis=-1)
    img += rng.normal(0, 12, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def cards_load_image(path: str, max_num: int = 12, size: int = 448) -> torch.Tensor:
    """The cards' load_image: dynamic_preprocess, then per-tile transform (PIL + torch in place of torchvision)."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    aspect = w / h
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and w * h > 0.5 * size * size * r[0] * r[1]:
            best = r
    tw, th = size * best[0], size * best[1]
    resized = image.resize((tw, th))
    tiles = [resized.crop(((i % (tw // size)) * size, (i // (tw // size)) * size,
                           (i % (tw // size) + 1) * size, (i // (tw // size) + 1) * size))
             for i in range(best[0] * best[1])]
    if len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    out = []
    for tile in tiles:
        tile = tile.resize((size, size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(tile).copy()).permute(2, 0, 1).float().div(255)
        out.append((x - MEAN) / STD)
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (w, h) in enumerate(SIZES):
            path = Path(tmp) / f"{i}.jpg"
            photo_like(w, h, i).save(path, quality=90)
            paths.append(str(path))
        stage = Preprocess(parse_job({"task": "caption", "input": tmp, "output": tmp, "model": "m"}))
        tiles_ours = sum(stage.tile_one(p)["num_tiles"] for p in paths)
        tiles_cards = sum(len(cards_load_image(p)) for p in paths)
        assert tiles_ours == tiles_cards, (tiles_ours, tiles_cards)
        for p in paths[:2]:  # same pixels as the cards feed the model, bit for bit
            row = stage.tile_one(p)
            pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["num_tiles"], 448, 448, 3)
            assert np.array_equal(normalize_tiles(pixels), cards_load_image(p).numpy())
        ours, cards = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for p in paths:
                stage.tile_one(p)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            for p in paths:
                cards_load_image(p)
            cards.append(time.perf_counter() - t)
    n = len(paths)
    o, c = statistics.median(ours), statistics.median(cards)
    print(f"images: {n} camera-size JPEGs ({tiles_ours} tiles), {args.rounds} alternating rounds, 1 thread")
    print(f"ours  (exact tiles, uint8):          {n / o:7.2f} images/s  {tiles_ours / o:7.1f} tiles/s")
    print(f"cards (load_image, per-tile float32): {n / c:7.2f} images/s  {tiles_cards / c:7.1f} tiles/s")
    print(f"ratio ours/cards: {c / o:.2f}x")


if __name__ == "__main__":
    main()
