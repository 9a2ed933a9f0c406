"""vLLM on CUDA (run with `pytest -m gpu tests/gpu/test_vllm_gpu.py` where `internvl-batch[vllm]` is installed):
bf16 parity with the transformers engine, tensor parallelism (tp=2), and a job whose `auto` engine is vLLM.

Not run on the CPU-only development machine (the CPU parity tests are tests/vllm/, in the vLLM lane). In bf16 the
two engines' kernels differ, so near-tied tokens may flip late in an answer: the tests compare the answers' first
tokens and the log-probabilities along them, and label scores, with bf16 tolerances.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from pipeline.config import parse_job  # noqa: E402
from tests.conftest import pattern_image  # noqa: E402
from tests.gpu.conftest import TILED_SIZES as SIZES  # noqa: E402

pytestmark = pytest.mark.gpu

SAME_PREFIX = 4  # greedy tokens that must agree in bf16
BF16_LOGPROB_TOL = 5e-2
BF16_SCORE_TOL = 5e-2
# eager (no torch.compile, no CUDA graphs): the tests check answers, and bench/device_check.py gives them minutes
OPTIONS = {"gpu_memory_utilization": 0.3, "max_model_len": 8192, "enforce_eager": True}


def compare(a, b) -> None:
    """Two engines' generations of one prompt agree in bf16: first tokens equal, log-probs close along them."""
    n = min(SAME_PREFIX, len(a.token_ids), len(b.token_ids))
    assert a.token_ids[:n] == b.token_ids[:n]
    np.testing.assert_allclose(a.logprobs[:n], b.logprobs[:n], atol=BF16_LOGPROB_TOL)


def test_bf16_vllm_matches_transformers(tiny_model, samples):
    from pipeline.model.transformers_engine import InternVLEngine
    from pipeline.model.vllm_engine import VLLMEngine

    hf = InternVLEngine.load(str(tiny_model), device="cuda", dtype="bfloat16")
    engine = VLLMEngine.load(str(tiny_model), device="cuda", dtype="bfloat16", options=OPTIONS)
    try:
        assert engine.plan.dtype == torch.bfloat16 and next(engine.model.parameters()).is_cuda
        prompts = [hf.prompt_ids("Describe the image in detail.", [len(p)]) for p in samples]
        prompts.append(hf.prompt_ids("What colour is it?", [len(samples[1])]))  # a second question on a sample
        owners = [0, 1, 2, 1]
        want = hf.generate(prompts, samples, owners, max_new_tokens=12)
        got = engine.generate(prompts, samples, owners, max_new_tokens=12)
        for a, b in zip(got, want):
            compare(a, b)
        tokenizer = hf.tokenizer  # an attribute, not a method (tests/unit/test_gpu_suite.py checks method calls)
        labels = [[tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no", " red car")]] * 3
        scores = engine.score(prompts[:3], samples, [0, 1, 2], labels)
        np.testing.assert_allclose(scores, hf.score(prompts[:3], samples, [0, 1, 2], labels), atol=BF16_SCORE_TOL)
    finally:
        engine.close()


def test_tp2_vllm_matches_tp1(tiny_model, samples):
    """tensor_parallel_size = compute.tp: vLLM's own workers on this process's two GPUs, same answers as tp=1."""
    from pipeline.model.vllm_engine import VLLMEngine

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    prompts, want = None, None
    for tp in (1, 2):
        engine = VLLMEngine.load(str(tiny_model), device="cuda", dtype="bfloat16", tp=tp, options=OPTIONS)
        try:
            assert engine.llm.vllm_config.parallel_config.tensor_parallel_size == tp
            prompts = [engine.prompt_ids("Describe the image in detail.", [len(p)]) for p in samples]
            got = asyncio.run(engine.generate_async(prompts, samples, max_new_tokens=12))
        finally:
            engine.close()
        if want is None:
            want = got
        for a, b in zip(got, want):
            compare(a, b)


def test_a_job_on_gpus_runs_vllm_with_auto(tiny_model, tmp_path):
    """compute.engine auto with vLLM installed and a GPU: the plan picks vLLM, and the job writes every row."""
    import ray

    from pipeline.run.runner import run_job

    for k in range(4):
        pattern_image(*SIZES[k % 3]).save(tmp_path / f"{k}.png")
    job = parse_job({"task": "caption", "input": str(tmp_path), "output": str(tmp_path / "out"), "model": str(tiny_model),
                     "generation": {"max_new_tokens": 8}, "compute": {"batch_size": 2, "vllm": OPTIONS}})
    lines: list[str] = []
    ray.init(ignore_reinit_error=True)
    try:
        summary = run_job(job, echo=lines.append)
    finally:
        ray.shutdown()
    assert any("vllm replica(s)" in line for line in lines), lines
    assert summary.rows_ok == 4 and 0 < summary.generated_tokens <= 32
    (usage,) = summary.replicas.values()
    assert usage["images_per_s"] > 0 and usage["tokens_per_s"] > 0
