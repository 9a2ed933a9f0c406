"""Visual-token arithmetic: how many tokens a sample's tiles cost and what fits a budget.

InternVL turns every 448 px tile into `image_seq_length` (256) tokens. With `tiling.max_tokens_per_sample` each
sample gets the largest tile (or frame) count whose tokens fit. (Packing model calls by tokens: model/batching.py.)
"""

from __future__ import annotations

from pipeline.media.tiling import choose_grid

TOKENS_PER_TILE = 256  # (448 / 14)^2 patches, pixel-shuffled by 0.5 in each direction: the same for every InternVL


def tile_count(width: int, height: int, *, min_tiles: int, max_tiles: int, thumbnail: bool) -> int:
    """Tiles the cards' dynamic tiling makes of an image this size: the grid, plus a thumbnail when the grid has
    more than one tile."""
    cols, rows = choose_grid(width=width, height=height, min_tiles=min_tiles, max_tiles=max_tiles)
    return cols * rows + (1 if thumbnail and cols * rows > 1 else 0)


def max_tiles_within(width: int, height: int, *, tokens: int, min_tiles: int, max_tiles: int, thumbnail: bool,
                     tokens_per_tile: int = TOKENS_PER_TILE) -> int | None:
    """The max_tiles setting, at most `max_tiles`, that gives this image the most tiles within `tokens`; None if
    even min_tiles costs more."""
    best: tuple[int, int] | None = None  # (tiles, setting)
    for setting in range(min_tiles, max_tiles + 1):
        n = tile_count(width, height, min_tiles=min_tiles, max_tiles=setting, thumbnail=thumbnail)
        if n * tokens_per_tile <= tokens and (best is None or n > best[0]):
            best = (n, setting)
    return best[1] if best else None


def frames_within(num_frames: int, *, tokens: int, tiles_per_frame: int, thumbnail: bool,
                  tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """Frames of a video that fit `tokens`, each costing at most tiles_per_frame tiles (plus a thumbnail when a
    frame is cut into several); 0 when not even one frame fits (the sample is then too_large)."""
    per_frame = (tiles_per_frame + (1 if thumbnail and tiles_per_frame > 1 else 0)) * tokens_per_tile
    return min(num_frames, tokens // per_frame)
