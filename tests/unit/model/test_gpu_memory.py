"""One GPU, two users: the split between our vision tower and vLLM, for every catalogue model, 80 and 141 GB GPUs,
tp 1/2/4/8; the table in docs/gpu-memory.md is the computed one; plan refuses what cannot fit, naming the numbers."""

from __future__ import annotations

import json

import pytest

from bench.internvl3_1b import INTERNVL3_1B
from pipeline.config import parse_job
from pipeline.errors import JobError, ModelLoadError
from pipeline.model import gpu_memory
from pipeline.model.catalog import MODELS, find_model, markdown
from pipeline.model.gpu_memory import (
    GIB,
    MEMORY_GPUS,
    MEMORY_TPS,
    VLLM_DEFAULT_UTILIZATION,
    checkpoint_config,
    memory_split,
    memory_table,
    shapes_from_config,
    split_for_job,
    vllm_options,
)
from pipeline.run.estimate import describe_estimate
from pipeline.run.resources import Resources, replica_memory
from tests.conftest import REPO

BY_NAME = {m.name: m for m in MODELS}


def job_for(model: str, **compute):
    return parse_job({"task": "caption", "input": "in", "output": "out", "model": model, "compute": compute})


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_the_shapes_give_the_cards_sizes(model):
    """The catalogue's shapes (vision tower, projector, language model) add up to the cards' parameter counts (within
    5%: the 1B cards round 0.94B to 0.9)."""
    shapes = shapes_from_config(model.config())
    total = shapes.vision.params() + shapes.projector_params() + shapes.language.params_per_rank(1)
    assert total / 1e9 == pytest.approx(model.params_b, rel=0.05 if model.params_b < 1 else 0.02)
    assert shapes.tokens_per_tile == 256 and shapes.vision.tokens == 1025


def test_native_and_original_configs_give_the_same_shapes():
    """InternVL3-1B's native config (the bench's, transformers layout) and the catalogue's (original layout)."""
    assert shapes_from_config(INTERNVL3_1B) == shapes_from_config(BY_NAME["InternVL3-1B"].config())


@pytest.mark.parametrize("gpu", MEMORY_GPUS)
@pytest.mark.parametrize("tp", MEMORY_TPS)
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_every_catalogue_model_on_80_and_141_gb_at_every_tp(model, tp, gpu):
    gib = MEMORY_GPUS[gpu]
    split = split_for_job(job_for(model.name, tp=tp), model.config(), gib)
    # the two users never hold more than the GPU, and vLLM never more than its own default
    assert split.vision_gib + split.vllm_gib <= gib and split.vllm_fraction <= VLLM_DEFAULT_UTILIZATION
    assert split.tiles_in_flight == 32 * 13 and split.chunk_tiles == 32
    shapes = shapes_from_config(model.config())
    divides = shapes.language.heads % tp == 0 and (shapes.language.kv_heads % tp == 0 or tp % shapes.language.kv_heads == 0)
    if split.fits:
        assert divides and split.kv_tokens >= shapes.language.context and not split.reason
        assert split.language_gib + split.vllm_runtime_gib + split.kv_gib == pytest.approx(split.vllm_gib)
    else:
        assert split.limit in ("heads", "weights", "kv") and split.reason
        assert (split.limit == "heads") == (not divides)


def test_the_expected_fits():
    """What an engineer would say from the weights alone, with the vision tower's share taken off."""
    fits = {(m.name, gpu, tp): split_for_job(job_for(m.name, tp=tp), m.config(), gib).fits
            for m in MODELS for gpu, gib in MEMORY_GPUS.items() for tp in MEMORY_TPS}
    assert fits["InternVL3-1B", "80 GB", 1] and not fits["InternVL3-1B", "80 GB", 4]  # 14 heads: not over 4
    assert fits["InternVL2_5-26B", "80 GB", 1]  # 51 GB of weights, 11 of them the 6B tower
    assert not fits["InternVL3-38B", "80 GB", 1] and fits["InternVL3-38B", "80 GB", 2]
    assert not fits["InternVL3-78B", "80 GB", 2] and fits["InternVL3-78B", "80 GB", 4]
    assert not fits["InternVL3-78B", "141 GB", 1] and fits["InternVL3-78B", "141 GB", 2]
    assert fits["InternVL3-38B", "141 GB", 1]


def test_a_6b_tower_takes_vllm_below_its_default():
    small = split_for_job(job_for("InternVL3-8B"), BY_NAME["InternVL3-8B"].config(), 79.6)
    large = split_for_job(job_for("InternVL3-38B", tp=2), BY_NAME["InternVL3-38B"].config(), 79.6)
    assert small.vllm_fraction == VLLM_DEFAULT_UTILIZATION
    assert large.vision_weights_gib > 10 and large.vllm_fraction < 0.85
    assert large.vllm_fraction * 79.6 + large.vision_gib <= 79.6


def test_chunks_bound_the_activation_peak():
    shapes = shapes_from_config(BY_NAME["InternVL3-38B"].config())
    split = dict(gpu_gib=79.6, tp=2, min_kv_tokens=32768)
    few, many = (memory_split(shapes, tiles_in_flight=n, **split) for n in (64, 640))
    whole = memory_split(shapes, tiles_in_flight=640, chunk_tiles=640, **split)
    features = 576 * 256 * shapes.language.width * 2 / GIB  # the only part that grows with the tiles in flight
    assert many.vision_peak_gib - few.vision_peak_gib == pytest.approx(features)
    assert whole.vision_peak_gib > 5 * many.vision_peak_gib


def test_the_jobs_own_keys_are_kept_and_checked():
    config = BY_NAME["InternVL3-38B"].config()
    own = split_for_job(job_for("InternVL3-38B", tp=2, vllm={"gpu_memory_utilization": 0.95}), config, 79.6)
    assert own.vllm_fraction == 0.95 and not own.fits and own.limit == "vision"  # 4 GB cannot hold a 10 GB tower
    short = split_for_job(job_for("Mini-InternVL-Chat-4B-V1-5", vllm={"max_model_len": 8192}),
                          BY_NAME["Mini-InternVL-Chat-4B-V1-5"].config(), 22.5)
    long = split_for_job(job_for("Mini-InternVL-Chat-4B-V1-5"), BY_NAME["Mini-InternVL-Chat-4B-V1-5"].config(), 22.5)
    assert short.fits and short.min_kv_tokens == 8192
    assert not long.fits and long.limit == "kv" and "131,072 tokens" in long.reason  # Phi-3's 128k context on 24 GB
    kv = split_for_job(job_for("InternVL3-1B", vllm={"kv_cache_memory_bytes": 2 * GIB}), BY_NAME["InternVL3-1B"].config(), 79.6)
    assert kv.fits and kv.kv_gib == 2.0


def test_replicas_sharing_a_gpu_split_their_part():
    """compute.gpus_per_replica 0.5: two replicas on one GPU, each with its vision side and its vLLM in half of it."""
    config = BY_NAME["InternVL3-2B"].config()
    half = split_for_job(job_for("InternVL3-2B", gpus_per_replica=0.5), config, 79.6)
    assert half.fits and half.vllm_fraction + half.vision_gib / 79.6 <= 0.5 and half.vllm_fraction >= 0.45
    config = BY_NAME["InternVL2_5-26B"].config()
    assert split_for_job(job_for("InternVL2_5-26B"), config, 79.6).fits
    shared = split_for_job(job_for("InternVL2_5-26B", gpus_per_replica=0.5), config, 79.6)
    assert not shared.fits and shared.limit == "weights"  # 37 GiB of language model in what half a GPU leaves


def test_the_docs_table_is_the_computed_one():
    table = markdown(memory_table())
    assert table in (REPO / "docs" / "gpu-memory.md").read_text()
    assert table.count("\n") == len(MODELS) + 1


def test_plan_refuses_a_model_that_cannot_fit_naming_the_numbers():
    vllm_on_gpu = Resources(replicas=(1, 1), cpus_per_replica=1, gpus_per_replica=1, cpu_workers=4, on_gpu=True,
                            engine="vllm")
    config = BY_NAME["InternVL3-78B"].config()
    with pytest.raises(JobError) as err:
        replica_memory(job_for("OpenGVLab/InternVL3-78B-hf"), vllm_on_gpu, config=config, gpu_gib=79.6)
    message = str(err.value)
    assert "does not fit a 79.6 GiB GPU at compute.tp=1" in message and "135.4 GiB a rank" in message
    assert "vision tower 10.6 GiB" in message and "compute.tp" in message
    split = replica_memory(job_for("OpenGVLab/InternVL3-78B-hf", tp=4), vllm_on_gpu, config=config, gpu_gib=79.6)
    assert split.fits and split.vllm_fraction == 0.78
    # no split for the transformers engine, replicas on CPU, or an unknown GPU
    on_cpu = Resources(replicas=(1, 1), cpus_per_replica=1, gpus_per_replica=0, cpu_workers=1, engine="vllm")
    assert replica_memory(job_for("m"), on_cpu, config=config, gpu_gib=79.6) is None
    assert replica_memory(job_for("m"), vllm_on_gpu, config=config, gpu_gib=None) is None


def test_plan_prints_the_split():
    split = split_for_job(job_for("InternVL3-8B"), BY_NAME["InternVL3-8B"].config(), 79.6)
    figures = {"tiles": 10, "tiles_per_sample": 1.0, "sampled": 10, "visual_tokens": 2560,
               "gpu_memory": {"accelerator": "H100", **split.figures(), "line": gpu_memory.describe_split(split)}}
    first, second = describe_estimate(figures).splitlines()
    assert first.startswith("estimate: ~10 tiles")
    assert second.startswith("GPU memory of a vLLM replica (H100): 79.6 GiB a GPU: vision tower 0.6 GiB")
    assert "gpu_memory_utilization 0.92" in second and "one request of max_model_len needs 32,768" in second
    json.dumps(figures)  # plan --json prints it


def test_the_config_is_read_without_weights(tiny_model):
    assert checkpoint_config(str(tiny_model)) == json.loads((tiny_model / "config.json").read_text())
    assert checkpoint_config("/nowhere/InternVL3-2B-hf") == BY_NAME["InternVL3-2B"].config()  # the catalogue's
    assert checkpoint_config("/nowhere/unknown") is None
    assert find_model("OpenGVLab/InternVL2_5-26B") is BY_NAME["InternVL2_5-26B"]


def test_a_vllm_replica_takes_the_split_on_cuda_only(tiny_model, monkeypatch):
    """On CPU (the vLLM lane) the options stay compute.vllm's; on a CUDA device (simulated here: no GPU on this
    machine; tests/gpu/test_gpu_memory.py runs it for real) the replica hands vLLM the split's fraction."""
    import torch

    from pipeline.model import device

    job = job_for(str(tiny_model), vllm={"max_model_len": 4096})
    own = job.compute.vllm.engine_options()
    assert vllm_options(job) == own and "gpu_memory_utilization" not in own
    monkeypatch.setattr(device, "local_plan", lambda *a: device.DeviceChoice("cuda", torch.bfloat16, "sdpa"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": int(79.6 * GIB)}))
    want = split_for_job(job, checkpoint_config(str(tiny_model)), 79.6).vllm_fraction
    assert vllm_options(job) == {**own, "gpu_memory_utilization": want} and want == VLLM_DEFAULT_UTILIZATION
    mine = job_for(str(tiny_model), vllm={"gpu_memory_utilization": 0.5})
    assert vllm_options(mine)["gpu_memory_utilization"] == 0.5  # the job's own fraction is never replaced
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 2 * GIB}))
    with pytest.raises(ModelLoadError, match="does not fit this GPU"):
        vllm_options(job_for(str(tiny_model)))
