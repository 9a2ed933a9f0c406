"""The engine's device work and the GPU memory split on CUDA (run with `pytest -m gpu`; not run on the CPU-only
development machine, where tests/unit/model/test_engine_device.py and test_gpu_memory.py run their CPU halves)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pipeline.config import parse_job
from pipeline.model.transformers_engine import InternVLEngine
from pipeline.model.gpu_memory import GIB, checkpoint_config, split_for_job
from tests.unit.model.test_engine_device import full_vocabulary_generate, host_copies

pytestmark = pytest.mark.gpu


def test_chunked_vision_and_device_logprobs_on_cuda(tiny_model, samples):
    """float32 on CUDA: chunks of tiles give one pass's features, the log-probabilities are the full-vocabulary
    way's, and no vocabulary-wide tensor comes back to the host."""
    engine = InternVLEngine.load(str(tiny_model), device="cuda", dtype="float32")
    with torch.inference_mode():
        whole = torch.cat(engine.image_features(samples, 64))
        for chunk in (1, 5):
            torch.testing.assert_close(torch.cat(engine.image_features(samples, chunk)), whole, rtol=1e-5, atol=1e-5)
        prompts = [engine.prompt_ids("Describe.", [len(s)]) for s in samples]
        with host_copies() as seen:
            got = engine.generate(prompts, samples, max_new_tokens=8)
        want = full_vocabulary_generate(engine, prompts, samples, max_new_tokens=8)
    assert not [shape for shape in seen if engine.model.config.text_config.vocab_size in shape]
    for g, (tokens, logprobs) in zip(got, want):
        assert g.token_ids == tokens
        np.testing.assert_allclose(g.logprobs, logprobs, atol=1e-5)


def test_a_vllm_replica_on_cuda_takes_its_share_beside_the_tower(tiny_model, samples):
    """No gpu_memory_utilization in the job: the replica hands vLLM the split's fraction of this GPU, and a batch of
    13-tile samples runs beside it."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    from pipeline.model import engines

    job = parse_job({"task": "caption", "input": "in", "output": "out", "model": str(tiny_model),
                     "compute": {"engine": "vllm", "vllm": {"max_model_len": 8192, "enforce_eager": True}}})
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    split = split_for_job(job, checkpoint_config(str(tiny_model)), total)
    engine = engines.load("vllm", job)
    try:
        assert engine.llm.vllm_config.cache_config.gpu_memory_utilization == split.vllm_fraction
        prompts = [engine.prompt_ids("Describe.", [len(samples[2])])] * 8
        out = engine.generate(prompts, [samples[2]] * 8, max_new_tokens=4)
        assert all(g.token_ids for g in out)
        free, _ = torch.cuda.mem_get_info()
        assert free > 0
    finally:
        engine.close()
