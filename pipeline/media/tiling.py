"""InternVL dynamic tiling: pick a grid for an image, resize once, cut 448 px tiles (pure functions).

Behaviour follows the InternVL model cards (`dynamic_preprocess`) exactly; tests check every case in
tests/data/tiling_cases.json, which was computed with the cards' own code. `tiling.mode: fast` (images decoded at a
reduced JPEG DCT scale, see images.load_tiles) keeps the grid and tile count and approximates the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

TILE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


TilingMode = Literal["exact", "fast"]


@dataclass(frozen=True)
class Tiles:
    """uint8 tiles (num_tiles, size, size, 3) of one image, the grid they were cut from, and the image's size.

    `source_size` is the (width, height) of the full-resolution image (what the cards see), also when fast mode
    decoded it at a reduced scale; the grid is always chosen from it.
    """

    pixels: np.ndarray
    grid: tuple[int, int]  # (columns, rows)
    source_size: tuple[int, int]  # (width, height)

    @property
    def num_tiles(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class Reduced:
    """How the pixels of an image decoded at a reduced scale (fast mode) map onto the full-resolution image.

    `box` is the region of the reduced image that covers the whole full image, in reduced pixels: JPEG DCT scaling
    rounds the reduced size up, so the last row/column of pixels covers only part of a reduced pixel.
    """

    full_size: tuple[int, int]  # (width, height) of the full-resolution image
    box: tuple[float, float, float, float]


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


def grid_pixels(
    *, width: int, height: int, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = TILE_SIZE
) -> tuple[int, int]:
    """The (width, height) an image of this size is resized to before it is cut into tiles."""
    cols, rows = choose_grid(width=width, height=height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    return cols * tile_size, rows * tile_size


def tile_image(
    image: Image.Image,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    thumbnail: bool = True,
    tile_size: int = TILE_SIZE,
    reduced: Reduced | None = None,
) -> Tiles:
    """Resize an RGB image to its grid once and cut it into tiles (row-major), plus a thumbnail if > 1 tile.

    Exact (reduced=None): the cards' two Pillow resizes of the full image with Pillow's default filter (bicubic):
    the grid and the 448 px thumbnail, bit for bit.
    Fast (`reduced` given: the image was decoded at 1/2, 1/4 or 1/8 scale, still at least the grid's size): the grid
    is a bilinear resize of the reduced image's `box`, the thumbnail a box-average of the grid (`Image.reduce`). The
    DCT-scaled decode has already low-passed the image, so bilinear from at most 2x the grid's size both costs less
    than bicubic and stays closer to the exact tiles (no overshoot on top of the decoder's filter): on a noisy 12 MP
    photo 42 ms and 43.5 dB PSNR against the exact grid, vs 68 ms and 42.6 dB for bicubic. Reducing the grid by its
    integer (cols, rows) factors gives the thumbnail in ~5 ms (50 dB) instead of a ~25 ms resize (55 dB).
    bench/fast_mode.py measures the whole path against exact.

    The output is written once into one preallocated C-contiguous block: the grid image's array is cut into tiles
    with a reshape/transpose view copied in a single assignment, the thumbnail copied after it.
    """
    if image.mode != "RGB":
        raise ValueError(f"tile_image needs an RGB image, got mode {image.mode!r}")
    width, height = reduced.full_size if reduced is not None else image.size
    cols, rows = choose_grid(width=width, height=height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    num_grid = cols * rows
    with_thumbnail = thumbnail and num_grid != 1
    size = (cols * tile_size, rows * tile_size)
    if reduced is None:
        grid_image = image.resize(size)
        thumb_image = image.resize((tile_size, tile_size)) if with_thumbnail else None
    else:
        grid_image = image.resize(size, Image.Resampling.BILINEAR, box=reduced.box)
        thumb_image = grid_image.reduce((cols, rows)) if with_thumbnail else None
    pixels = np.empty((num_grid + with_thumbnail, tile_size, tile_size, 3), np.uint8)
    grid = np.asarray(grid_image).reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4)
    pixels[:num_grid].reshape(rows, cols, tile_size, tile_size, 3)[...] = grid
    if thumb_image is not None:
        pixels[num_grid] = np.asarray(thumb_image)
    return Tiles(pixels=pixels, grid=(cols, rows), source_size=(width, height))


def normalize_tiles(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) tiles -> float32 (N, 3, H, W), ImageNet mean/std of x/255, as the cards feed the model.

    numpy reference of what the model stage does on device (engine.normalize); used in tests and benchmarks.
    """
    x = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2))
