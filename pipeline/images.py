"""Decode image bytes into RGB, as the cards do (`Image.open(...).convert('RGB')`), with classified failures."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2x MAX_IMAGE_PIXELS) by default


class MediaError(Exception):
    """A sample that cannot be used; `error_type` is one of the documented output error types."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes into an RGB image; raise MediaError('too_large' | 'decode_error') on bad input.

    The size is checked from the header before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise MediaError("too_large", f"image is {image.width}x{image.height}, over the {max_pixels} pixel limit")
            image.load()
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError("too_large", str(err)) from None
    except UnidentifiedImageError:
        raise MediaError("decode_error", "not a recognised image format") from None
    except Exception as err:  # noqa: BLE001 - Pillow's plugins raise many types on malformed bytes; all mean "bad file"
        raise MediaError("decode_error", f"image could not be decoded: {type(err).__name__}: {err}") from None
    if image.width == 0 or image.height == 0:
        raise MediaError("decode_error", f"image has no pixels ({image.width}x{image.height})")
    return image if image.mode == "RGB" else image.convert("RGB")
