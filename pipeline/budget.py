"""Visual-token arithmetic: how many tokens a sample's tiles cost, what fits a budget, how to pack model calls.

InternVL turns every 448 px tile into `image_seq_length` (256) tokens. With `tiling.max_tokens_per_sample` each
sample gets the largest tile (or frame) count whose tokens fit; with `compute.max_batch_tokens` a replica's batch
is split into calls of samples of similar length, none carrying more than 25% padding.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.tiling import choose_grid

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
    """Frames of a video that fit `tokens` (at least one), each costing at most tiles_per_frame tiles (plus a
    thumbnail when a frame is cut into several)."""
    per_frame = (tiles_per_frame + (1 if thumbnail and tiles_per_frame > 1 else 0)) * tokens_per_tile
    return max(1, min(num_frames, tokens // per_frame))


MAX_PADDING = 0.25  # padding a call may carry, as a fraction of its real prompt tokens, before it is split


def pack_calls(lengths: Sequence[int], *, max_tokens: int | None, sizes: Sequence[int] | None = None,
               max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Split items into groups of similar lengths: a group ends when its padded size (rows x longest length) would
    exceed max_tokens, or exceed its real tokens by more than max_padding. Item i is `sizes[i]` rows (default 1:
    e.g. a sample's questions) of at most `lengths[i]` tokens.

    Every item is in exactly one group; an item over the budget gets a group of its own. max_tokens None: one group
    (packing is off).
    """
    if max_tokens is None:
        return [list(range(len(lengths)))] if len(lengths) else []
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = sizes if sizes is not None else [1] * len(lengths)
    groups: list[list[int]] = []
    current: list[int] = []
    rows = real = 0
    for i in order:  # ascending, so the newest item is the longest of its group
        padded = (rows + sizes[i]) * lengths[i]
        over_budget = max_tokens is not None and padded > max_tokens
        too_padded = padded > (1 + max_padding) * (real + sizes[i] * lengths[i])
        if current and (over_budget or too_padded):
            groups.append(current)
            current, rows, real = [], 0, 0
        current.append(i)
        rows += sizes[i]
        real += sizes[i] * lengths[i]
    if current:
        groups.append(current)
    return groups


def equal_length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped by length (no padding within a group), groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    return list(groups.values())
