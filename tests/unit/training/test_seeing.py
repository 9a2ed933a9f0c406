"""The constructed encoder computes what its fast twin (seeing.fast_features, what training uses) computes."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.embedded import world as W
from pipeline.media.images import load_tiles
from pipeline.media.tiling import normalize_tiles
from training import seeing as S


def test_encoder_equals_its_fast_twin_and_measures_the_shape():
    from transformers import InternVLVisionConfig, InternVLVisionModel

    vision = InternVLVisionModel(InternVLVisionConfig(**S.vision_config_kwargs())).eval()
    S.set_vision(vision)
    rng = np.random.default_rng(5)
    drawn = [W.draw_image(rng, tiles=1, fmt="png") for _ in range(3)]
    tiles = np.concatenate([load_tiles(d.data, max_tiles=12).pixels for d in drawn])
    fast = S.fast_features(tiles)
    hidden = S.vision_tokens(vision, torch.from_numpy(normalize_tiles(tiles)))[:, 1:]
    slow = hidden[:, :, S.GLOBAL_CHANNELS[:11]]
    assert float((slow - slow[:, :1]).abs().max()) < 1e-3  # the same global features on every token
    assert torch.allclose(slow[:, 0], fast, atol=1e-3)  # A and B differ by ~2e-4 (softmax over 1024 patches)
    for d, f in zip(drawn, fast):  # the first features are the shape's centroid in tile units
        ys, xs = np.mgrid[0:d.height, 0:d.width]
        mask = W.inside(d.scene, d.box, xs + 0.5, ys + 0.5)
        assert abs(float(f[0]) - float(((xs[mask] + 0.5) / d.width).mean())) < 0.01
        assert abs(float(f[1]) - float(((ys[mask] + 0.5) / d.height).mean())) < 0.01
