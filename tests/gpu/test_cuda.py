"""GPU-only checks (run with `pytest -m gpu` on a CUDA machine; deselected by default)."""

import numpy as np
import pytest
import torch

from pipeline.media.tiling import tile_image
from pipeline.model.transformers_engine import InternVLEngine
from tests.conftest import pattern_image

pytestmark = pytest.mark.gpu


def test_auto_plan_uses_bf16_on_cuda(tiny_model):
    engine = InternVLEngine.load(str(tiny_model), device="auto")
    assert engine.plan.device == "cuda" and engine.plan.dtype == torch.bfloat16
    assert next(engine.model.parameters()).is_cuda


def test_batched_generation_on_cuda_matches_single(tiny_model):
    engine = InternVLEngine.load(str(tiny_model), device="cuda", dtype="float32")
    pixels = [tile_image(pattern_image(w, h)).pixels for w, h in [(448, 448), (1344, 896)]]
    prompts = [engine.prompt_ids("Describe.", [len(p)]) for p in pixels]
    batched = engine.generate(prompts, pixels, max_new_tokens=6)
    for prompt, tiles, got in zip(prompts, pixels, batched):
        single = engine.generate([prompt], [tiles], max_new_tokens=6)[0]
        assert got.token_ids == single.token_ids
        np.testing.assert_allclose(got.logprobs, single.logprobs, atol=1e-3)


def test_flash_attention_when_installed(tiny_model):
    pytest.importorskip("flash_attn")
    engine = InternVLEngine.load(str(tiny_model), device="cuda")
    assert engine.plan.attn_implementation == "flash_attention_2"
