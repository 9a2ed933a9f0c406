"""vLLM's processes as on a GPU: the engine core and the model's workers in processes of their own (vLLM's default
layout, the lane's), tensor parallel over two workers; a start that fails says why and what to change; a CPU
replica with no compute.vllm keys starts beside other processes; a vLLM without the class the plugin patches is
refused at load."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from pipeline.errors import ModelLoadError  # noqa: E402
from pipeline.model.vllm_start import (CPU_KV_CACHE_MAX, cpu_defaults, cpu_kv_cache_bytes, explain,  # noqa: E402
                                       root_cause, thread_binding)
from tests.procs import own_processes  # noqa: E402
from tests.vllm.conftest import ENGINE_OPTIONS  # noqa: E402
from tests.vllm.test_vllm_parity import MAX_NEW_TOKENS, compare  # noqa: E402

pytestmark = pytest.mark.vllm

ENGINE_CORE = r"EngineCore"
WORKER = r"VLLM::Worker|VllmWorker"


def test_the_model_runs_in_worker_processes_as_on_a_gpu(vllm_engine):
    """The lane runs vLLM's default layout: not the in-process executor that VLLM_ENABLE_V1_MULTIPROCESSING=0 gives."""
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "1"
    assert vllm_engine.llm.vllm_config.parallel_config.distributed_executor_backend == "mp"
    assert own_processes(ENGINE_CORE) and len(own_processes(WORKER)) >= 1


def test_tensor_parallel_two_workers_give_the_transformers_tokens(tiny_model, hf_engine, cases, figures):
    """compute.tp: 2 on vLLM: two worker processes (threads bound to their own CPUs: vllm_start.thread_binding), the
    greedy tokens of every layout in one call, and label scores, equal to the transformers engine's."""
    from pipeline.model.vllm_engine import VLLMEngine

    before = {p.pid for p in own_processes(WORKER)}
    engine = VLLMEngine.load(str(tiny_model), device="cpu", options=ENGINE_OPTIONS, tp=2)
    try:
        assert engine.llm.vllm_config.parallel_config.tensor_parallel_size == 2
        assert len([p for p in own_processes(WORKER) if p.pid not in before]) == 2
        prompts, samples = [], []
        for _, text, tiles, video, pixels in cases:
            samples.append(pixels)
            prompts.append(hf_engine.prompt_ids(text, tiles, video=video))
        want = hf_engine.generate(prompts, samples, max_new_tokens=MAX_NEW_TOKENS)
        got = engine.generate(prompts, samples, max_new_tokens=MAX_NEW_TOKENS)
        for k, (g, w) in enumerate(zip(got, want)):
            compare(g, w, figures, f"tp=2 row {k}")
        labels = [[hf_engine.tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no", " red car")]]
        scores = engine.score(prompts[:1], samples[:1], [0], labels)
        want_scores = hf_engine.score(prompts[:1], samples[:1], [0], labels)
        assert max(abs(a - b) for a, b in zip(scores[0], want_scores[0])) < 1e-4
    finally:
        engine.close()


def test_a_failed_start_names_vllms_root_cause_and_the_key_that_fixes_it(tiny_model):
    """A KV cache larger than the host's memory: vLLM's worker refuses it in its own process; the replica's error
    carries that process's message and the compute.vllm key, not "See root cause above"."""
    from pipeline.model.vllm_engine import VLLMEngine

    with pytest.raises(ModelLoadError) as info:
        VLLMEngine.load(str(tiny_model), device="cpu", options=dict(ENGINE_OPTIONS, kv_cache_memory_bytes=1 << 50))
    message = str(info.value)
    assert "Available memory on node" in message and "requested memory for kv" in message
    assert "compute.vllm.kv_cache_memory_bytes" in message and "See root cause" not in message
    assert "\n" not in message  # the run's error shows a replica's last line


def test_start_failures_seen_in_vllms_logs_are_explained():
    """The messages vLLM 0.32 logs for the usual failed starts (from its source), each mapped to the key to change."""
    log = "\n".join([
        "(EngineCore pid=1) ERROR [core.py:1510] EngineCore failed to start.",
        "Traceback (most recent call last):",
        '  File "cpu_worker.py", line 83, in __init__',
        "ValueError: Available memory on node 0 (17.15/23.54 GiB) on startup is less than desired CPU memory "
        "utilization (0.92, 21.66 GiB). On the CPU backend, ...",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ])
    cause = root_cause(log)
    assert cause.startswith("ValueError: Available memory on node 0")
    assert "compute.vllm.gpu_memory_utilization" in explain(cause, RuntimeError("x"))
    gpu = ("ValueError: To serve at least one request with the model's max seq len (32768), (4.0 GiB KV cache is "
           "needed, which is larger than the available KV cache memory (1.2 GiB).")
    assert "compute.vllm.max_model_len" in explain(root_cause(gpu), RuntimeError("x"))
    assert "gpu_memory_utilization" in explain(root_cause("ValueError: Free memory on device cuda:0 (10/80 GiB) on "
                                                          "startup is less than desired GPU memory utilization"), None)
    assert root_cause("no exception here") is None
    assert explain(None, RuntimeError("boom")) == "RuntimeError: boom"


def test_cpu_defaults_and_thread_binding():
    """A CPU replica without a KV size gets one that fits beside other processes; tp ranks on one NUMA node get
    CPUs of their own (vLLM's own binding wants one node per rank and refuses)."""
    assert cpu_kv_cache_bytes(18 << 30) == CPU_KV_CACHE_MAX and cpu_kv_cache_bytes(2 << 30) == 512 << 20
    assert cpu_defaults({}, available=18 << 30) == {"kv_cache_memory_bytes": CPU_KV_CACHE_MAX}
    assert cpu_defaults({"gpu_memory_utilization": 0.3}, available=1) == {"gpu_memory_utilization": 0.3}
    assert cpu_defaults({"kv_cache_memory_bytes": 5}, available=1) == {"kv_cache_memory_bytes": 5}
    assert thread_binding([0, 1], 2, numa_nodes=1) == "0|1"
    assert thread_binding(range(8), 2, numa_nodes=1) == "0,1,2,3|4,5,6,7"
    assert thread_binding([0], 2, numa_nodes=1) == "0|0"
    assert thread_binding(range(8), 2, numa_nodes=2) is None and thread_binding(range(8), 1, numa_nodes=1) is None


def test_a_cpu_replica_with_no_vllm_memory_keys_starts_beside_other_processes(tiny_model, hf_engine, cases):
    """A new user's `compute.engine: vllm, device: cpu` and no compute.vllm memory keys: vLLM's own default reserves
    92% of the host's RAM and refuses to start when anything else holds memory (this lane's machine has other jobs);
    the replica's default KV cache (vllm_start.cpu_defaults) starts, and answers as the transformers engine.
    (enforce_eager only spares the lane torch.compile's minutes; with no key at all it starts too, slower.)"""
    from pipeline.model.vllm_engine import VLLMEngine

    engine = VLLMEngine.load(str(tiny_model), device="cpu", options={"enforce_eager": True})
    try:
        cache = engine.llm.vllm_config.cache_config
        assert 0 < cache.kv_cache_memory_bytes <= CPU_KV_CACHE_MAX
        _, text, tiles, video, pixels = cases[0]
        ids = hf_engine.prompt_ids(text, tiles, video=video)
        want = hf_engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS)[0]
        assert engine.generate([ids], [pixels], max_new_tokens=MAX_NEW_TOKENS)[0].token_ids == want.token_ids
    finally:
        engine.close()


def test_a_vllm_without_the_patched_class_is_refused_naming_its_version(tiny_model, monkeypatch):
    import vllm
    from vllm.model_executor.models import interns1

    from pipeline.model.vllm_engine import VLLMEngine

    monkeypatch.delattr(interns1, "InternS1ImageEmbeddingInputs")
    with pytest.raises(ModelLoadError, match=f"vLLM {vllm.__version__} is not supported.*vllm>=0.32,<0.33"):
        VLLMEngine.load(str(tiny_model), device="cpu", options=ENGINE_OPTIONS)
