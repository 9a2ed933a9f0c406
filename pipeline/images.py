"""Decode image bytes into RGB, as the cards do (`Image.open(...).convert('RGB')`), with classified failures.

Where the cards' plain convert would be wrong we fix the input first: 16-bit and 32-bit greyscale are scaled to
8 bits (convert would clip them to white), animations give their first frame. EXIF orientation is applied only
when asked (the cards do not apply it).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2x MAX_IMAGE_PIXELS) by default


class MediaError(Exception):
    """A sample that cannot be used; `error_type` is one of the documented output error types."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


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


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = False) -> Image.Image:
    """Decode bytes into an RGB image; raise MediaError('too_large' | 'decode_error') on bad input.

    The size is checked from the header before any pixel is decoded.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
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
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
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
    return _to_rgb(image)
