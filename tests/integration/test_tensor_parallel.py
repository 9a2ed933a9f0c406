"""Tensor-parallel replicas (compute.tp) and several replicas per job, on CPU with gloo.

tp = 2 gives the same tokens and log-probabilities as tp = 1 (free and under a schema), with each rank holding half
of every sharded language-model weight; the placement plan is right for tp in {1, 2, 4, 8}; a job whose rank (or replica) is killed
mid-run recovers with every input exactly once.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from pipeline.config import parse_job
from pipeline.errors import RunError
from pipeline.run.replica import device_layout, replica_bundles, replica_resources
from pipeline.run.resources import resources_for
from tests.conftest import REPO, pattern_image
from tests.procs import own_pids
from tests.helpers import output_rows
from tests.schemas import SMALL

BASE = {"task": "caption", "input": "in", "output": "out", "model": "m"}
SHARDED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output rows
ROW_SHARDED = ("o_proj", "down_proj")  # split by input columns


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_bundles_and_requests_per_tp(tp):
    assert replica_bundles(tp, on_gpu=True) == [{"CPU": 1.0, "GPU": 1.0}] * tp
    assert replica_bundles(tp, on_gpu=False) == [{"CPU": 1.0}] * tp
    assert replica_resources(tp, on_gpu=True) == {"CPU": float(tp), "GPU": float(tp)}
    job = parse_job(BASE, overrides=[f"compute.tp={tp}", "compute.replicas=2"])
    r = resources_for(job, cluster_cpus=96, cluster_gpus=16, node_gpus=8)
    assert (r.tp, r.on_gpu, r.gpus_per_replica, r.replicas) == (tp, True, float(max(tp, 1)), (2, 2))
    args = r.model_stage_args()
    if tp == 1:
        assert args == {"num_cpus": 1.0, "num_gpus": 1.0}
    else:  # the feeding actor holds nothing; its placement group's bundles go to its tp rank actors
        assert args == {"num_cpus": 0, "num_gpus": 0}


def test_tp_needs_enough_gpus_on_one_node():
    job = parse_job(BASE, overrides=["compute.tp=8"])
    with pytest.raises(RunError, match="tp=8 needs 8 GPUs on one node; the largest node has 4"):
        resources_for(job, cluster_cpus=64, cluster_gpus=16, node_gpus=4)
    with pytest.raises(RunError, match=r"needs GPUs \(8 per replica\) but the cluster has 4"):
        resources_for(job, cluster_cpus=64, cluster_gpus=4, node_gpus=4)


def test_cpu_replicas_take_cpus_from_preprocessing():
    r = resources_for(parse_job(BASE, overrides=["compute.tp=2"]), cluster_cpus=4, cluster_gpus=0)
    assert (r.on_gpu, r.cpus_per_replica, r.rank_cpus, r.cpu_workers, r.note) == (False, 2.0, 1.0, 2, None)
    # Two tp=2 replicas on 4 CPUs would leave nothing for preprocessing: their ranks share 3 CPUs instead.
    r = resources_for(parse_job(BASE, overrides=["compute.tp=2", "compute.replicas=2"]), cluster_cpus=4, cluster_gpus=0)
    assert (r.cpus_per_replica, r.rank_cpus, r.cpu_workers) == (1.5, 0.75, 1) and "CPUs shared" in r.note


def test_autoscaling_replicas_range():
    r = resources_for(parse_job(BASE, overrides=["compute.replicas=[1, 4]"]), cluster_cpus=32, cluster_gpus=4)
    assert r.replicas == (1, 4)
    with pytest.raises(Exception, match="1 <= min <= max"):
        parse_job(BASE, overrides=["compute.replicas=[0, 2]"])
    with pytest.raises(Exception, match="gpus_per_replica"):
        parse_job(BASE, overrides=["compute.tp=2", "compute.gpus_per_replica=0.5"])


def test_device_layout_lets_ranks_see_each_other():
    assert device_layout([[3], [1]]) == ("1,3", [1, 0])
    assert device_layout([[0], [1], [2], [3], [4], [5], [6], [10]]) == ("0,1,2,3,4,5,6,10", [0, 1, 2, 3, 4, 5, 6, 7])
    assert device_layout([[], []]) == (None, [0, 1])
    with pytest.raises(ValueError, match="exactly one GPU"):
        device_layout([[0, 1], [2]])


@pytest.mark.integration
def test_tp2_equals_tp1_and_shards_the_weights(ray_local, tiny_model_tp):
    from pipeline.model.transformers_engine import InternVLEngine
    from pipeline.run.replica import TensorParallelEngine

    job = parse_job({**BASE, "model": str(tiny_model_tp)}, overrides=["compute.tp=2", "compute.device=cpu"])
    sharded = TensorParallelEngine(job)
    try:
        table = ray_local.util.placement_group_table(sharded._group())
        assert table["strategy"] == "STRICT_PACK" and list(table["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}]
        single = InternVLEngine.load(str(tiny_model_tp), device="cpu")
        full = {n: tuple(p.shape) for n, p in single.model.named_parameters()}
        for rank in sharded.local_shapes():
            assert rank.keys() == full.keys()
            for name, shape in rank.items():
                if ".language_model.layers." in name and name.endswith(".weight") and any(k in name for k in SHARDED):
                    assert shape == (full[name][0] // 2, full[name][1]), name
                elif ".language_model.layers." in name and any(k in name for k in ROW_SHARDED):
                    assert shape == (full[name][0], full[name][1] // 2), name
                elif "vision_tower" in name or "projector" in name:
                    assert shape == full[name], name  # the vision side is replicated
        rng = np.random.default_rng(7)
        samples = [np.asarray(pattern_image(448, 448), np.uint8)[None],
                   rng.integers(0, 256, (3, 448, 448, 3), dtype=np.uint8),
                   rng.integers(0, 256, (7, 448, 448, 3), dtype=np.uint8)]
        prompts = [single.prompt_ids(q, [len(s)]) for q, s in zip(["Describe.", "What is here?", "Colours?"], samples)]
        a = sharded.generate(prompts, samples, [0, 1, 2], max_new_tokens=12)
        b = single.generate(prompts, samples, [0, 1, 2], max_new_tokens=12)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids and x.text == y.text
            assert np.allclose(x.logprobs, y.logprobs, atol=1e-4)
        if importlib.util.find_spec("xgrammar") is not None:  # schemas reach every rank; their masks agree
            schemas = [SMALL, None, SMALL]
            a = sharded.generate(prompts, samples, [0, 1, 2], max_new_tokens=24, schemas=schemas)
            b = single.generate(prompts, samples, [0, 1, 2], max_new_tokens=24, schemas=schemas)
            assert [(x.token_ids, x.finished) for x in a] == [(y.token_ids, y.finished) for y in b]
            assert a[0].finished and a[0].text.startswith('{"ok":')
        labels = [[single.tokenizer.encode(w, add_special_tokens=False) for w in ("yes", "no")]] * 3
        assert np.allclose(sharded.score(prompts, samples, [0, 1, 2], labels),
                           single.score(prompts, samples, [0, 1, 2], labels), atol=1e-4)
    finally:
        sharded.close()


def _run_and_kill(job: dict, pattern: str, out, kill_one: bool = True):
    """Run the job in-process (local Ray); once its first shard is written, SIGKILL one process matching pattern."""
    from pipeline.run.runner import run_job

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_job(parse_job(job), echo=lambda _: None)),
                              daemon=True)
    runner.start()
    deadline = time.monotonic() + 600
    while not list(out.glob("part-*.parquet")):
        assert runner.is_alive() and time.monotonic() < deadline, "no first shard"
        time.sleep(0.2)
    victims = own_pids(pattern)  # the in-process local Ray's processes: this process's tree only
    assert victims, f"no process matching {pattern}"
    os.kill(victims[0] if kill_one else victims[-1], signal.SIGKILL)
    runner.join(900)
    assert "summary" in result, "the job did not finish"
    rows = output_rows(out)
    return result["summary"], rows


@pytest.fixture()
def twelve_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        pattern_image(320 + 40 * i, 240 + 16 * i).save(folder / f"img{i:02d}.jpg")
    return folder


@pytest.mark.integration
def test_tp2_job_survives_a_killed_rank(ray_local, tiny_model_tp, twelve_images, tmp_path):
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(twelve_images), "output": str(out), "model": str(tiny_model_tp),
           "rows_per_shard": 2, "generation": {"max_new_tokens": 60},
           "compute": {"tp": 2, "batch_size": 2, "device": "cpu"}}
    summary, rows = _run_and_kill(job, r"ray::Rank", out)
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12 and all(r["status"] == "ok" for r in rows)
    assert summary.rows_out == summary.rows_ok == 12


@pytest.mark.integration
def test_two_replicas_share_the_work_and_survive_a_killed_replica(ray_local, tiny_model, twelve_images, tmp_path):
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(twelve_images), "output": str(out), "model": str(tiny_model),
           "rows_per_shard": 2, "generation": {"max_new_tokens": 3000},
           "compute": {"replicas": 2, "batch_size": 1, "device": "cpu"}}
    # Both replicas load before the first batch is dispatched; otherwise, on a loaded machine, the first one can take
    # every batch while the second is still importing torch (and the work is not shared at all). Long answers make a
    # batch slower than preprocessing a sample, so batches queue and Ray Data hands them to both replicas: while one
    # replica keeps up with the input alone, it gets them all, which is right, but shares nothing. (The tiny model
    # writes 400 tokens in 0.4 s, faster than a loaded machine tiles a sample: 3000 take a few seconds.)
    import ray

    ctx = ray.data.DataContext.get_current()
    saved, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 600
    try:
        summary, rows = _run_and_kill(job, r"MapBatches\(Generate\)", out)
    finally:
        ctx.wait_for_min_actors_s = saved
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12 and all(r["status"] == "ok" for r in rows)
    worked = [name for name, usage in summary.replicas.items() if usage["batches"] > 0]
    assert len(worked) >= 2, summary.replicas  # both replicas (and the killed one's replacement) took batches


def test_readme_sizing_table_is_the_computed_one():

    from pipeline.model.catalog import MODELS, markdown, sizing_table

    assert markdown(sizing_table()) in (REPO / "docs" / "clusters.md").read_text()
    by_name = {m.name: m for m in MODELS}
    assert by_name["InternVL3-78B"].gb_per_gpu(4) < 80 / 1.25 < by_name["InternVL3-78B"].gb_per_gpu(2)
    assert by_name["InternVL3-1B"].gpus_needed(24) == 1


SMALL_MACHINE = """
import json, sys
import ray
from pipeline.config import parse_job
from pipeline.run.runner import run_job

ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
job = json.loads(sys.argv[1])
for name, compute in (("tp2", {"tp": 2}), ("replicas2", {"replicas": 2})):
    lines = []
    summary = run_job(parse_job({**job, "output": job["output"] + name,
                                 "compute": {**compute, "device": "cpu", "batch_size": 2}}), echo=lines.append)
    print(json.dumps({"name": name, "rows_ok": summary.rows_ok, "lines": lines}))
ray.shutdown()
"""


@pytest.mark.integration
def test_tp2_and_two_replicas_run_on_a_two_cpu_machine(tiny_model_tp, tmp_path):
    """A laptop-sized cluster (2 CPUs): tp=2 and two replicas both run, their CPUs shared, and the log says so."""
    import json
    import sys

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        pattern_image(448 + 32 * i, 448).save(folder / f"{i}.png")
    job = {"task": "caption", "input": str(folder), "output": str(tmp_path / "out-"), "model": str(tiny_model_tp),
           "generation": {"max_new_tokens": 2}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    proc = subprocess.run([sys.executable, "-c", SMALL_MACHINE, json.dumps(job)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"name"')]
    assert [(r["name"], r["rows_ok"]) for r in results] == [("tp2", 4), ("replicas2", 4)]
    for r in results:
        assert sum(line.startswith("CPUs shared:") for line in r["lines"]) == 1, r["lines"]
