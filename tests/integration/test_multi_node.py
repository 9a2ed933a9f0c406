"""A local Ray cluster of a head and two worker raylets (`ray start`, own temp dir and ports, stopped by pid): the
CPU stage runs on both workers and the output is complete, each row exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import pattern_image

pytestmark = pytest.mark.integration
RAY = Path(sys.executable).with_name("ray")
# Token auth is switched on by `ray start` when ~/.ray/auth_token exists (another cluster's, on a shared machine);
# this private cluster on 127.0.0.1 runs without it, and so do its clients.
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}
# On SIGTERM `ray start --block` first asks the GCS to drain its node, for up to 30 s (for Serve on Kubernetes); a
# test cluster has nothing to drain, and the head's GCS may already be gone: stop at once.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}, **NO_AUTH, **NO_DRAIN, **extra}


WORKER_PORTS = 40
_given: list[range] = []  # worker port ranges handed to nodes started here: no later port is picked inside one


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        socks = [socket.socket() for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        picked = [s.getsockname()[1] for s in socks]
        ports += [p for p in picked if not any(p in r for r in _given)][: n - len(ports)]
        for s in socks:
            s.close()
    return ports


def start_node(args: list[str], temp_dir: Path, log: Path) -> subprocess.Popen:
    """`ray start --block` under `timeout`: its node stops with it, and by itself if the test dies."""
    node, manager, objects, agent, metrics, runtime_env, lo = free_ports(7)
    _given.append(range(lo, lo + WORKER_PORTS + 1))
    cmd = ["timeout", "900", str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
           f"--node-manager-port={manager}", f"--object-manager-port={objects}", f"--dashboard-agent-listen-port={agent}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
           f"--min-worker-port={lo}", f"--max-worker-port={lo + WORKER_PORTS}", "--disable-usage-stats", *args]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)


@pytest.fixture()
def cluster(tmp_path_factory):
    temp_dir = Path(f"/tmp/ivb-mn-{os.getpid()}")  # short: raylet socket paths have a length limit
    logs = tmp_path_factory.mktemp("cluster-logs")
    head_port, dashboard_port = free_ports(2)
    address = f"127.0.0.1:{head_port}"
    nodes = [start_node(["--head", f"--port={head_port}", "--num-cpus=0", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                         f"--ray-client-server-port={free_ports(1)[0]}"], temp_dir, logs / "head.log")]
    try:
        deadline = time.monotonic() + 120
        while not list(temp_dir.glob("session_*/logs/gcs_server.out")) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)
        for i in range(2):  # one after the other: raylets on one machine pick their socket names in the session dir
            for attempt in range(2):  # a raylet that did not join in 2 min (a loaded machine, a port taken) gets one more try
                log = logs / f"worker{i}-{attempt}.log"
                nodes.append(start_node([f"--address={address}", "--num-cpus=2",
                                         f"--resources={json.dumps({f'worker{i}': 1})}"], temp_dir, log))
                if wait_nodes(address, i + 1) == i + 1:
                    break
                stop([nodes.pop()])
            else:
                pytest.fail(f"worker raylet {i} did not join twice; its last log:\n{log.read_text()[-3000:]}")
        yield address, f"http://127.0.0.1:{dashboard_port}"
    finally:
        stop(nodes[::-1])
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop(nodes: list[subprocess.Popen]) -> None:
    """Our own `ray start` processes, by pid (each its own session): each stops its node's processes."""
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
    for node in nodes:
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(10)


def wait_nodes(address: str, count: int) -> int:
    """Alive nodes with CPUs once `count` of them are up, or after 2 min."""
    script = ("import ray, time; ray.init(address=%r, logging_level='ERROR'); t = time.time()\n"
              "while sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')) < %d and time.time() - t < 120:\n"
              "    time.sleep(1)\n"
              "print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')))") % (address, count)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=clean_env())
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines and lines[-1].isdigit(), out.stdout + out.stderr[-3000:]
    return int(lines[-1])


def preprocess_nodes(dashboard: str) -> dict[str, int]:
    """Per node id: CPU-stage tasks that ran there (from Ray's task table, through the head's state API)."""
    script = ("import json; from ray.util.state import list_tasks\n"
              "tasks = list_tasks(address=%r, filters=[('type', '=', 'NORMAL_TASK')], limit=10000, detail=True)\n"
              "nodes = {}\n"
              "for t in tasks:\n"
              "    if 'preprocess_block' in t.name and t.node_id:\n"
              "        nodes[t.node_id] = nodes.get(t.node_id, 0) + 1\n"
              "print(json.dumps(nodes))") % dashboard
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=clean_env())
    assert out.returncode == 0 and out.stdout.strip(), out.stdout + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_stage_runs_on_both_workers_and_output_is_exactly_once(cluster, tiny_model, tmp_path):
    address, dashboard = cluster
    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        pattern_image(448 + 8 * i, 448).save(images / f"{i:02d}.png")
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(images), "output": str(out), "model": str(tiny_model),
           "generation": {"max_new_tokens": 2}, "compute": {"batch_size": 2, "cpu_workers": 3}, "rows_per_shard": 4}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert wait_nodes(address, 2) == 2
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], capture_output=True, text=True,
                         env=clean_env(RAY_ADDRESS=address), timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    ids = [i for p in out.glob("part-*.parquet") for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    assert len(ids) == 24 and len(set(ids)) == 24
    assert (out / "_SUCCESS.json").exists()
    nodes = preprocess_nodes(dashboard)
    # 24 samples in blocks of 2 model batches of 2: 6 CPU-stage tasks, on both worker raylets (the head has no CPUs)
    assert len(nodes) == 2 and sum(nodes.values()) >= 6, nodes
