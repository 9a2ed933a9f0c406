"""Tiling and normalisation reproduce the facts computed with the InternVL cards' own code."""

import hashlib
import io
import json

import numpy as np
import pytest

from pipeline.media.images import load_tiles
from pipeline.media.tiling import candidate_grids, choose_grid, grid_pixels, normalize_tiles, tile_image
from tests.conftest import DATA, pattern_image

TILING_CASES = json.loads((DATA / "tiling_cases.json").read_text())["cases"]
NORMALIZE_CASES = json.loads((DATA / "normalize_cases.json").read_text())["cases"]


def case_id(c: dict) -> str:
    return f"{c['width']}x{c['height']}-max{c['max_num']}-min{c.get('min_num', 1)}-thumb{int(c.get('use_thumbnail', 1))}"


@pytest.mark.parametrize("case", TILING_CASES, ids=case_id)
def test_tiling_matches_cards(case):
    tiles = tile_image(
        pattern_image(case["width"], case["height"]),
        min_tiles=case["min_num"],
        max_tiles=case["max_num"],
        thumbnail=case["use_thumbnail"],
    )
    assert tiles.grid == (case["grid_cols"], case["grid_rows"])
    assert tiles.num_tiles == case["num_tiles"]
    assert tiles.pixels.dtype == np.uint8 and tiles.pixels.shape == (case["num_tiles"], 448, 448, 3)
    assert hashlib.sha256(np.ascontiguousarray(tiles.pixels).tobytes()).hexdigest() == case["tiles_uint8_sha256"]


@pytest.mark.parametrize("case", TILING_CASES[::7], ids=case_id)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_load_tiles_from_png_bytes_matches_cards(case, mode):
    """The CPU stage's bytes -> tiles call gives the facts' tiles (PNG is lossless; fast mode never reduces PNGs)."""
    buf = io.BytesIO()
    pattern_image(case["width"], case["height"]).save(buf, "PNG", compress_level=1)
    tiles = load_tiles(buf.getvalue(), min_tiles=case["min_num"], max_tiles=case["max_num"],
                       thumbnail=case["use_thumbnail"], mode=mode)
    assert tiles.grid == (case["grid_cols"], case["grid_rows"]) and tiles.source_size == (case["width"], case["height"])
    assert hashlib.sha256(tiles.pixels.tobytes()).hexdigest() == case["tiles_uint8_sha256"]


def test_grid_pixels_is_the_grid_times_the_tile_size():
    assert grid_pixels(width=4032, height=3024) == (4 * 448, 3 * 448)
    assert grid_pixels(width=100, height=1000, max_tiles=6) == (448, 6 * 448)


@pytest.mark.parametrize("case", NORMALIZE_CASES, ids=case_id)
def test_normalize_matches_cards(case):
    tiles = tile_image(pattern_image(case["width"], case["height"]), max_tiles=case["max_num"])
    values = normalize_tiles(tiles.pixels)
    assert list(values.shape) == case["shape"] and values.dtype == np.float32
    np.testing.assert_allclose(values.reshape(-1)[: len(case["first_values"])], case["first_values"], atol=1e-5)
    assert abs(float(values.mean(dtype=np.float64)) - case["mean"]) < 1e-5
    assert abs(float(values.std(dtype=np.float64)) - case["std"]) < 1e-5


def test_grids_respect_bounds():
    grids = candidate_grids(min_tiles=2, max_tiles=6)
    assert all(2 <= c * r <= 6 for c, r in grids) and (1, 1) not in grids


@pytest.mark.parametrize("bad", [dict(min_tiles=0, max_tiles=4), dict(min_tiles=5, max_tiles=4)])
def test_bad_bounds_raise(bad):
    with pytest.raises(ValueError):
        candidate_grids(**bad)


def test_empty_image_raises():
    with pytest.raises(ValueError, match="no pixels"):
        choose_grid(width=0, height=10)
