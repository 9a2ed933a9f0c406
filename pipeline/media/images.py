"""Decode image bytes into RGB, as the cards do (`Image.open(...).convert('RGB')`), with classified failures.

Where the cards' plain convert would be wrong we fix the input first: 16-bit and 32-bit greyscale are scaled to
8 bits (convert would clip them to white), animations give their first frame. EXIF orientation is applied only
when asked (the cards do not apply it).

`load_tiles` is the CPU stage's one call per image: bytes -> tiles. In `fast` mode a JPEG whose tile grid is at
most half its size (both ways) is decoded at a reduced DCT scale (Pillow's `draft`: 1/2, 1/4 or 1/8, never below
the grid's size), which the grid is chosen for before any pixel is decoded, from the full-resolution size in the
header, so that fast and exact modes pick the same grid and tile count. Anything else is decoded and tiled exactly.
"""

from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.errors import MediaError
from pipeline.media.tiling import TILE_SIZE, Reduced, Tiles, TilingMode, grid_pixels, tile_image

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2x MAX_IMAGE_PIXELS) by default


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the cards convert it, with high-bit-depth greyscale scaled rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).round().astype(np.uint8), "L")
    return image.convert("RGB")


# Where each margin (left, top, right, bottom) of the stored image ends up once ImageOps.exif_transpose applies
# the EXIF orientation (2: mirror, 3: rotate 180, 4: flip, 5: transpose, 6: rotate 270, 7: transverse, 8: rotate 90).
_MARGINS_AFTER = {1: (0, 1, 2, 3), 2: (2, 1, 0, 3), 3: (2, 3, 0, 1), 4: (0, 3, 2, 1),
                  5: (1, 0, 3, 2), 6: (3, 0, 1, 2), 7: (3, 2, 1, 0), 8: (1, 2, 3, 0)}


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation ImageOps.exif_transpose will apply (read from the header, no pixel decoded)."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if value in _MARGINS_AFTER else 1


def _draft(image: Image.Image, target: tuple[int, int], orientation: int) -> Reduced | None:
    """Ask the JPEG decoder for the smallest DCT scale whose output still covers `target` (displayed orientation).

    Returns None (exact decode) unless the image is a JPEG at least twice the target's size both ways.
    """
    if image.format not in ("JPEG", "MPO"):
        return None
    width, height = image.size  # as stored; the grid was chosen for the displayed (maybe transposed) size
    transposed = orientation in (5, 6, 7, 8)
    target_w, target_h = (target[1], target[0]) if transposed else target
    if width // target_w < 2 or height // target_h < 2:
        return None
    drafted = image.draft(image.mode, (target_w, target_h))
    if drafted is None or image.size == (width, height):
        return None
    _, (_, _, covered_w, covered_h) = drafted
    margins = (0.0, 0.0, image.width - covered_w, image.height - covered_h)
    left, top, right, bottom = (margins[i] for i in _MARGINS_AFTER[orientation])
    shown_w, shown_h = (image.height, image.width) if transposed else image.size
    full = (height, width) if transposed else (width, height)
    return Reduced(full_size=full, box=(left, top, shown_w - right, shown_h - bottom))


def _decode(
    data: bytes,
    *,
    max_pixels: int,
    exif_transpose: bool,
    plan: Callable[[int, int], tuple[int, int] | None] | None = None,
) -> tuple[Image.Image, Reduced | None]:
    """Decode bytes into RGB. `plan`, if given, is called with the full-resolution displayed (width, height) before
    any pixel is decoded, and returns the size the pixels are needed at (decode a JPEG at a reduced scale that still
    covers it) or None (decode exactly); it may raise MediaError."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    reduced = None
    try:
        # Our limit replaces Pillow's own decompression-bomb limit (so a job may allow larger images), and is
        # checked from the header before any pixel is decoded.
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise MediaError("too_large", f"image is {image.width}x{image.height}, over the {max_pixels} pixel limit")
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # an animation: its first frame
            orientation = _orientation(image) if exif_transpose else 1
            if plan is not None and image.width and image.height:
                shown = (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size
                target = plan(*shown)
                if target is not None:
                    reduced = _draft(image, target, orientation)
            image.load()
            if exif_transpose:
                ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError("too_large", str(err)) from None
    except UnidentifiedImageError:
        raise MediaError("decode_error", "not a recognised image format") from None
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise many types on malformed bytes; all mean "bad file"
        raise MediaError("decode_error", f"image could not be decoded: {type(err).__name__}: {err}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    if image.width == 0 or image.height == 0:
        raise MediaError("decode_error", f"image has no pixels ({image.width}x{image.height})")
    return _to_rgb(image), reduced


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = False) -> Image.Image:
    """Decode bytes into an RGB image; raise MediaError('too_large' | 'decode_error') on bad input.

    The size is checked from the header before any pixel is decoded.
    """
    return _decode(data, max_pixels=max_pixels, exif_transpose=exif_transpose)[0]


def load_tiles(
    data: bytes,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    thumbnail: bool = True,
    mode: TilingMode = "exact",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = False,
    tile_size: int = TILE_SIZE,
    choose_max_tiles: Callable[[int, int], int] | None = None,
) -> Tiles:
    """Image bytes -> uint8 tiles (see tile_image); `source_size` is the full-resolution (displayed) size.

    exact: bit-identical to the cards. fast: JPEGs at least twice their grid's size are decoded at a reduced DCT
    scale and resized from there (same grid, same tile count; 42+ dB PSNR against exact, see bench/fast_mode.py);
    other formats and images near their grid's size are tiled exactly.
    `choose_max_tiles(width, height)`, if given, replaces max_tiles with a setting picked from the image's
    full-resolution size before any pixel is decoded (e.g. a visual-token budget); it may raise MediaError.
    min_tiles is capped at the max_tiles in use.
    """
    if mode not in ("exact", "fast"):
        raise ValueError(f"tiling mode must be 'exact' or 'fast', got {mode!r}")
    limit = max_tiles

    def plan(width: int, height: int) -> tuple[int, int] | None:
        nonlocal limit
        if choose_max_tiles is not None:
            limit = choose_max_tiles(width, height)
        if mode == "exact":
            return None
        return grid_pixels(width=width, height=height, min_tiles=min(min_tiles, limit), max_tiles=limit,
                           tile_size=tile_size)

    image, reduced = _decode(data, max_pixels=max_pixels, exif_transpose=exif_transpose, plan=plan)
    return tile_image(image, min_tiles=min(min_tiles, limit), max_tiles=limit, thumbnail=thumbnail,
                      tile_size=tile_size, reduced=reduced)
