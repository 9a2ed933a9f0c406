"""InternVL dynamic tiling: pick a grid for an image, resize once, cut 448 px tiles (pure functions).

Behaviour follows the InternVL model cards (`dynamic_preprocess`) exactly; tests check every case in
tests/data/tiling_cases.json, which was computed with the cards' own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

TILE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Tiles:
    """uint8 tiles (num_tiles, size, size, 3) of one image and the grid they were cut from."""

    pixels: np.ndarray
    grid: tuple[int, int]  # (columns, rows)

    @property
    def num_tiles(self) -> int:
        return int(self.pixels.shape[0])


def candidate_grids(*, min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) grids with min_tiles <= cols*rows <= max_tiles, in the cards' order.

    The cards build a set and sort it by tile count; ties in the later search depend on that order, so we keep
    the same construction (set iteration order of small-int tuples is deterministic in CPython).
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(
    *, width: int, height: int, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = TILE_SIZE
) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's; on a tie the larger grid wins when the image
    has more than half the grid's pixel area (the cards' rule)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels: {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles=min_tiles, max_tiles=max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_image(
    image: Image.Image,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    thumbnail: bool = True,
    tile_size: int = TILE_SIZE,
) -> Tiles:
    """Resize an RGB image to its grid once and cut it into tiles (row-major), plus a thumbnail if > 1 tile.

    Tiles are views into the resized image's array copied once into one contiguous uint8 block.
    """
    if image.mode != "RGB":
        raise ValueError(f"tile_image needs an RGB image, got mode {image.mode!r}")
    cols, rows = choose_grid(
        width=image.width, height=image.height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size
    )
    resized = np.asarray(image.resize((cols * tile_size, rows * tile_size)))
    grid_tiles = (
        resized.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile_size, tile_size, 3)
    )
    if thumbnail and cols * rows != 1:
        thumb = np.asarray(image.resize((tile_size, tile_size)))
        pixels = np.concatenate([grid_tiles, thumb[None]], axis=0)
    else:
        pixels = np.ascontiguousarray(grid_tiles)
    return Tiles(pixels=pixels, grid=(cols, rows))


def normalize_tiles(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) tiles -> float32 (N, 3, H, W), ImageNet mean/std of x/255, as the cards feed the model.

    numpy reference of what the model stage does on device (engine.normalize); used in tests and benchmarks.
    """
    x = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2))
