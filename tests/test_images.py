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


def test_16_bit_greyscale_is_scaled_not_clipped():
    import numpy as np

    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0..65535
    src = Image.fromarray(ramp)  # mode I;16
    out = np.asarray(decode_image(encode(src, "PNG")))
    assert out.shape == (16, 16, 3) and out[..., 0].ravel().tolist() == list(range(256))


def test_animation_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "lime", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert decode_image(buf.getvalue()).getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_only_when_asked():
    src = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    src.save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (40, 20)  # as the cards: orientation ignored
    assert decode_image(buf.getvalue(), exif_transpose=True).size == (20, 40)


def test_palette_with_transparency_becomes_rgb():
    src = Image.new("P", (8, 8), 1)
    src.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    buf = io.BytesIO()
    src.save(buf, "PNG", transparency=0)
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (10, 200, 30)
