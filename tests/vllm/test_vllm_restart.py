"""A job whose vLLM processes die mid-run: the replica restarts (Ray's actor restart: max_restarts) and re-runs its
batches in flight (max_task_retries); no row becomes an error for it, and the rows are the transformers engine's.

The processes killed are found only in this test's own process tree (tests/procs.py): Ray is started by this
pytest process (ray_local), so its actors and their vLLM processes are below it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pipeline.cli import app  # noqa: E402
from pipeline.config import parse_job  # noqa: E402
from pipeline.stages.generate import Generate  # noqa: E402
from tests.conftest import pattern_image  # noqa: E402
from tests.helpers import preprocessed, read_output  # noqa: E402
from tests.procs import own_processes  # noqa: E402
from tests.vllm.conftest import ENGINE_OPTIONS  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

SIZES = [(448 + 64 * k, 448 + 32 * (k % 5)) for k in range(14)]
ENGINE_CORE = r"EngineCore"
WORKER = r"VLLM::Worker|VllmWorker"
REPLICA = r"MapWorker\(MapBatches\(AsyncGenerate\)\)"  # the model stage's Ray actor
WAIT_S = 900


def replica_engine_cores():
    """The engine-core processes of this job's replica (below its Ray actor; other tests' engines live in this
    process tree too)."""
    return [core for actor in own_processes(REPLICA) for core in own_processes(ENGINE_CORE, root=actor.pid)]


def wait_for(what: str, check, timeout: float = WAIT_S):
    """Poll until check() gives something truthy; fail naming `what` after timeout seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_engine_core_then_worker_restart_the_replica_and_lose_no_row(ray_local, tiny_model, hf_engine, tmp_path):
    inputs = tmp_path / "images"
    inputs.mkdir()
    images = {f"img{k:02d}.png": pattern_image(w, h) for k, (w, h) in enumerate(SIZES)}
    for name, picture in images.items():
        picture.save(inputs / name)
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(inputs) + "/", "output": str(out), "model": str(tiny_model),
           "generation": {"max_new_tokens": 48}, "rows_per_shard": 1,
           "compute": {"batch_size": 1, "engine": "vllm", "device": "cpu",
                       "vllm": dict(ENGINE_OPTIONS, max_concurrent_batches=2)}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = {}
    runner = threading.Thread(target=lambda: result.update(run=CliRunner().invoke(app, ["run", str(path)])))
    runner.start()

    def shards() -> int:
        return len(list(out.glob("part-*.parquet")))

    # the first replica serves a batch, then its engine core is killed
    wait_for("a first shard", shards)
    (core,) = wait_for("the engine core", replica_engine_cores)
    written = shards()
    core.kill()
    # Ray restarts the replica (a new engine core); once it has served a batch, one of its workers is killed
    new_core = wait_for("a restarted engine core", lambda: [p for p in replica_engine_cores() if p.pid != core.pid])
    wait_for("a shard from the restarted replica", lambda: shards() > written + 1)
    assert shards() < len(SIZES), "the job ended before its worker could be killed: give it more work"
    (worker,) = wait_for("the new replica's worker", lambda: own_processes(WORKER, root=new_core[0].pid))
    worker.kill()
    runner.join(timeout=WAIT_S)
    run = result["run"]
    assert run.exit_code == 0, run.output

    rows = read_output(str(out)).to_pylist()
    assert sorted(Path(r["uri"]).name for r in rows) == sorted(images)  # every sample once
    assert {r["status"] for r in rows} == {"ok"}  # no model_error row for the deaths
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["rows_ok"] == len(images) and success["errors_by_type"] == {}
    assert len(success["replicas"]) == 3  # the replica's process three times: first start and two restarts

    reference = parse_job(dict(job, compute={"batch_size": 1, "engine": "transformers"}))
    batch = preprocessed(reference, inputs, {name: None for name in images})
    want = {Path(r["uri"]).name: r["response"] for r in Generate(reference, engine=hf_engine)(batch).to_pylist()}
    assert {Path(r["uri"]).name: r["response"] for r in rows} == want
