"""Decoding: RGB as the cards convert it; broken or oversized input becomes a classified MediaError."""

import io

import pytest
from PIL import Image

from pipeline.errors import MediaError
from pipeline.media.images import decode_image


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


# --- load_tiles: bytes -> tiles, exact and fast modes ---------------------------------------------------------

import numpy as np  # noqa: E402

from pipeline.media.images import load_tiles  # noqa: E402
from pipeline.media.tiling import choose_grid, tile_image  # noqa: E402


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour waves, a few hard edges and sensor-like noise: JPEG-compressed like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / (23 + 9 * c) + y / (31 + 5 * c) + rng.uniform(0, 6)) for c in range(3)], -1)
    img[height // 3: height // 2, width // 4: width // 2] = (200, 40, 90)
    img += rng.normal(0, 4, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def test_exact_load_tiles_is_decode_then_tile():
    data = jpeg_bytes(photo(1000, 700))
    tiles = load_tiles(data, max_tiles=6)
    same = tile_image(decode_image(data), max_tiles=6)
    assert tiles.grid == same.grid and np.array_equal(tiles.pixels, same.pixels)
    assert tiles.source_size == (1000, 700) and tiles.pixels.flags.c_contiguous


@pytest.mark.parametrize("size, max_tiles", [((1203, 905), 2), ((2000, 1000), 2), ((905, 1801), 3), ((1900, 1900), 4),
                                             ((3600, 1000), 6)])
def test_fast_keeps_grid_and_is_close_to_exact(size, max_tiles):
    """A JPEG at least twice its grid's size: decoded at reduced DCT scale, same grid and tiles, >= 40 dB PSNR."""
    data = jpeg_bytes(photo(*size))
    exact, fast = load_tiles(data, max_tiles=max_tiles), load_tiles(data, max_tiles=max_tiles, mode="fast")
    cols, rows = choose_grid(width=size[0], height=size[1], max_tiles=max_tiles)
    assert size[0] >= 2 * 448 * cols and size[1] >= 2 * 448 * rows  # the case under test: fast really reduces
    assert fast.grid == exact.grid == (cols, rows) and fast.num_tiles == exact.num_tiles
    assert fast.source_size == exact.source_size == size
    assert fast.pixels.shape == exact.pixels.shape and fast.pixels.dtype == np.uint8
    assert not np.array_equal(fast.pixels, exact.pixels)  # it did take the reduced path
    assert psnr(fast.pixels, exact.pixels) >= 40.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_with_exif_orientation_maps_the_reduced_pixels_right(orientation):
    """2001x1795 at 1/4 scale leaves partial last reduced pixels (3/4 wide, 1/4 high); wherever the EXIF rotation
    moves them, the reduced pixels must map onto the full image (a wrong mapping scores 30-42 dB here)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg_bytes(photo(2001, 1795, seed=orientation), exif=exif)
    exact = load_tiles(data, max_tiles=1, exif_transpose=True)
    fast = load_tiles(data, max_tiles=1, exif_transpose=True, mode="fast")
    assert fast.grid == exact.grid and fast.source_size == exact.source_size
    assert exact.source_size == ((1795, 2001) if orientation >= 5 else (2001, 1795))
    assert psnr(fast.pixels, exact.pixels) >= 45.0


def test_fast_is_exact_for_png():
    buf = io.BytesIO()
    photo(2000, 1000).save(buf, "PNG")
    exact, fast = load_tiles(buf.getvalue(), max_tiles=2), load_tiles(buf.getvalue(), max_tiles=2, mode="fast")
    assert np.array_equal(fast.pixels, exact.pixels)


@pytest.mark.parametrize("size", [(640, 480), (1920, 1080), (1500, 1000), (200, 3000)])
def test_fast_is_exact_when_the_grid_is_not_twice_smaller(size):
    data = jpeg_bytes(photo(*size))
    exact, fast = load_tiles(data), load_tiles(data, mode="fast")
    assert fast.grid == exact.grid and np.array_equal(fast.pixels, exact.pixels)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_fast_handles_grey_and_cmyk_jpegs(mode):
    data = jpeg_bytes(photo(1800, 1000).convert(mode))
    exact, fast = load_tiles(data, max_tiles=2), load_tiles(data, max_tiles=2, mode="fast")
    assert fast.grid == exact.grid and psnr(fast.pixels, exact.pixels) >= 40.0


def test_fast_errors_are_classified_like_exact():
    data = jpeg_bytes(photo(1800, 1000))
    for mode in ("exact", "fast"):
        with pytest.raises(MediaError) as err:
            load_tiles(data[: len(data) // 2], max_tiles=2, mode=mode)
        assert err.value.error_type == "decode_error"
        with pytest.raises(MediaError) as err:
            load_tiles(data, max_pixels=1000, mode=mode)
        assert err.value.error_type == "too_large"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="exact"):
        load_tiles(jpeg_bytes(photo(64, 64)), mode="quick")


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_choose_max_tiles_sees_the_full_size_before_decoding(mode):
    """A budget picks max_tiles from the header's full-resolution size; fast mode then reduces for that grid."""
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: the budget must see the displayed size
    data = jpeg_bytes(photo(2000, 1000), exif=exif)
    seen = []

    def budget(width: int, height: int) -> int:
        seen.append((width, height))
        return 2

    tiles = load_tiles(data, min_tiles=3, max_tiles=12, mode=mode, exif_transpose=True, choose_max_tiles=budget)
    exact = load_tiles(data, min_tiles=2, max_tiles=2, exif_transpose=True)
    assert seen == [(1000, 2000)] and tiles.grid == exact.grid == (1, 2) and tiles.num_tiles == 3
    assert psnr(tiles.pixels, exact.pixels) >= (40.0 if mode == "fast" else float("inf"))

    def refuse(width: int, height: int) -> int:
        raise MediaError("too_large", "over budget")

    with pytest.raises(MediaError, match="over budget"):
        load_tiles(data, mode=mode, choose_max_tiles=refuse)
