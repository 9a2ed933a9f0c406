"""The world generator keeps its contract: images and videos inside their bounds, the same seed drawing the same."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.embedded import world as W
from pipeline.media.images import load_tiles


def test_images_keep_the_contract():
    rng = np.random.default_rng(3)
    for i in range(12):
        tiles = W.TILE_COUNTS[i % len(W.TILE_COUNTS)]
        d = W.draw_image(rng, tiles=tiles)
        assert W.IMAGE_SIDES[0] <= min(d.width, d.height) and max(d.width, d.height) <= W.IMAGE_SIDES[1]
        assert 1 / 4 <= d.width / d.height <= 4
        assert len(load_tiles(d.data, max_tiles=12).pixels) == tiles
        short = min(d.width, d.height)
        b = d.box
        assert 0 <= b.x0 and b.x1 <= d.width and 0 <= b.y0 and b.y1 <= d.height
        assert 0.25 * short - 1e-6 <= max(b.width, b.height) <= 0.70 * short + 1e-6
        assert Image.open(io.BytesIO(d.data)).format == ("JPEG" if d.format == "jpeg" else "PNG")
        a = d.answers
        assert a[W.CAPTION] == f"a {d.scene.color} {d.scene.shape} on a {d.scene.background} background"
        assert (a[W.WHAT_SHAPE], a[W.WHAT_COLOR], a[W.WHAT_BACKGROUND]) == (d.scene.shape, d.scene.color,
                                                                             d.scene.background)


def test_drawing_is_seeded():
    a = W.draw_image(np.random.default_rng(9), tiles=5)
    b = W.draw_image(np.random.default_rng(9), tiles=5)
    assert a.data == b.data and a.answers == b.answers
    va = W.draw_video(np.random.default_rng(4), direction="left", size=(160, 120), fps=10, duration_s=2.0)
    vb = W.draw_video(np.random.default_rng(4), direction="left", size=(160, 120), fps=10, duration_s=2.0)
    assert va.spec == vb.spec and va.answers[W.WHICH_WAY] == "left"  # the same frames (the mp4 bytes may differ)


def test_video_moves_a_third_of_the_frame():
    for direction in W.DIRECTIONS:
        spec = W.sample_video_spec(np.random.default_rng(1), direction=direction)
        first, last = spec.box_at(0), spec.box_at(spec.num_frames - 1)
        along = spec.width if direction in ("left", "right") else spec.height
        moved = {"left": first.x0 - last.x0, "right": last.x0 - first.x0, "up": first.y0 - last.y0,
                 "down": last.y0 - first.y0}[direction]
        assert moved >= along / 3 - 1e-6
        for box in (first, last):
            assert 0 <= box.x0 and box.x1 <= spec.width and 0 <= box.y0 and box.y1 <= spec.height
