"""Resource planning and the summary arithmetic, without starting Ray."""

import json

import pytest

from pipeline.config import parse_job
from pipeline.runner import RunError, plan_resources, summarize_shards

BASE = {"task": "caption", "input": "in", "output": "out", "model": "m"}


def test_cpu_cluster_leaves_cpus_for_preprocessing():
    r = plan_resources(parse_job(BASE, overrides=["compute.replicas=2"]), cluster_cpus=8, cluster_gpus=0)
    assert (r.replicas, r.gpus_per_replica, r.cpu_workers) == (2, 0.0, 6)


def test_gpu_cluster_puts_replicas_on_gpus():
    r = plan_resources(parse_job(BASE, overrides=["compute.replicas=4"]), cluster_cpus=32, cluster_gpus=4)
    assert (r.gpus_per_replica, r.cpu_workers) == (1.0, 32)


def test_explicit_cpu_workers_and_cpu_device_on_gpu_cluster():
    job = parse_job(BASE, overrides=["compute.device=cpu", "compute.cpu_workers=3"])
    r = plan_resources(job, cluster_cpus=16, cluster_gpus=8)
    assert (r.gpus_per_replica, r.cpu_workers) == (0.0, 3)


def test_cuda_without_gpus_is_refused():
    with pytest.raises(RunError, match="GPUs"):
        plan_resources(parse_job(BASE, overrides=["compute.device=cuda"]), cluster_cpus=4, cluster_gpus=0)


def test_summary_adds_up_shards():
    shards = [
        dict(file="a", rows=3, ok=2, errors=json.dumps({"decode_error": 1}), tiles=5, input_tokens=900, generated_tokens=20,
             histograms="{}", passed=-1),
        dict(file="b", rows=2, ok=1, errors=json.dumps({"decode_error": 1}), tiles=2, input_tokens=600, generated_tokens=10,
             histograms="{}", passed=-1),
    ]
    s = summarize_shards(parse_job(BASE), shards, rows_in=5, wall_s=2.0, skipped={})
    assert (s.rows_out, s.rows_ok, s.rows_error, s.errors_by_type) == (5, 3, 2, {"decode_error": 2})
    assert s.samples_per_s == 2.5 and json.loads(s.to_json())["tokens_per_s"] == 15.0
