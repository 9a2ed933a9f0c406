"""What the GPU tests share: they skip where no CUDA device is visible, and the 1-, 7- and 13-tile samples."""

import pytest
import torch

from pipeline.media.tiling import tile_image
from tests.conftest import pattern_image

TILED_SIZES = [(448, 448), (1344, 896), (1792, 1344)]  # 1, 7 and 13 tiles


@pytest.fixture(scope="module", autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.fixture(scope="module")
def samples():
    return [tile_image(pattern_image(w, h)).pixels for w, h in TILED_SIZES]
