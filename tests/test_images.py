"""Decoding: RGB as the cards convert it; broken or oversized input becomes a classified MediaError."""

import io

import pytest
from PIL import Image

from pipeline.images import MediaError, decode_image


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_modes_become_rgb_like_the_cards(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    src = Image.new(mode, (20, 10))
    data = encode(src, fmt)
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert out.tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_garbage_is_decode_error():
    with pytest.raises(MediaError) as err:
        decode_image(b"definitely not an image")
    assert err.value.error_type == "decode_error"


def test_truncated_is_decode_error():
    data = encode(Image.new("RGB", (256, 256), "red"), "JPEG")
    with pytest.raises(MediaError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.error_type == "decode_error"


def test_pixel_limit_checked_before_decoding():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(MediaError) as err:
        decode_image(data, max_pixels=5000)
    assert err.value.error_type == "too_large"
