"""Tensor parallelism on GPUs (NCCL): run with `pytest -m gpu` on a node with at least 2 CUDA devices.

Not run on the CPU-only development machine; the CPU (gloo) versions are in tests/integration/test_tensor_parallel.py.
"""

import numpy as np
import pytest
import torch

from pipeline.config import parse_job
from tests.conftest import pattern_image

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def needs_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")


def test_tp2_on_nccl_matches_tp1(tiny_model_tp):
    import ray

    from pipeline.model.transformers_engine import InternVLEngine
    from pipeline.run.replica import TensorParallelEngine

    ray.init(num_gpus=2, ignore_reinit_error=True)
    job = parse_job({"task": "caption", "input": "in", "output": "out", "model": str(tiny_model_tp),
                     "compute": {"tp": 2, "device": "cuda", "dtype": "float32"}})
    sharded = TensorParallelEngine(job)
    try:
        assert sharded.on_gpu
        single = InternVLEngine.load(str(tiny_model_tp), device="cuda", dtype="float32")
        samples = [np.asarray(pattern_image(448, 448), np.uint8)[None]]
        prompts = [single.prompt_ids("Describe.", [1])]
        a, b = sharded.generate(prompts, samples, [0], max_new_tokens=8), single.generate(prompts, samples, [0], max_new_tokens=8)
        assert a[0].token_ids == b[0].token_ids and np.allclose(a[0].logprobs, b[0].logprobs, atol=1e-3)
        for shapes in sharded.local_shapes():
            q = next(v for k, v in shapes.items() if k.endswith("layers.0.self_attn.q_proj.weight"))
            assert q[0] == single.model.config.text_config.hidden_size // 2
    finally:
        sharded.close()


def test_tp2_bf16_flash_attention_loads(tiny_model_tp):
    import importlib.util

    import ray

    from pipeline.run.replica import TensorParallelEngine

    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn not installed")
    ray.init(num_gpus=2, ignore_reinit_error=True)
    job = parse_job({"task": "caption", "input": "in", "output": "out", "model": str(tiny_model_tp),
                     "compute": {"tp": 2, "device": "cuda"}})
    engine = TensorParallelEngine(job)
    try:
        samples = [np.asarray(pattern_image(448, 448), np.uint8)[None]]
        assert engine.generate([engine.prompt_ids("Describe.", [1])], samples, [0], max_new_tokens=4)[0].token_ids
    finally:
        engine.close()
