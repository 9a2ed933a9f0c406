"""Every run that writes holds the output's lease, and one that lost it writes nothing more: a run frozen (SIGSTOP)
past its lease while a second run takes over writes no further shard once it wakes and exits non-zero; two runs
started together into one output: one runs, the other is refused naming the holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import s3fs
import yaml

from tests.conftest import pattern_image
from tests.helpers import wait_for, output_rows

pytestmark = pytest.mark.integration


def start_run(job: dict, folder: Path, env: dict[str, str]) -> subprocess.Popen:
    path = folder / f"job-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(job))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def run_env() -> dict[str, str]:
    """The run's own environment: its own local Ray, the test's S3 credentials."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}


def tree(pid: int) -> list[psutil.Process]:
    """A process we started and everything below it (its local Ray included)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_a_frozen_run_that_lost_its_lease_writes_nothing_more(s3_server, tiny_model, tmp_path):
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    for i in range(16):
        buf = tmp_path / f"{i}.png"
        pattern_image(448 + 8 * i, 448).save(buf)
        fs.put(str(buf), f"bucket/fence/in/{i:02d}.png")
    out = "bucket/fence/out"
    job = {"task": "caption", "input": "s3://bucket/fence/in/", "output": f"s3://{out}/", "model": str(tiny_model),
           "rows_per_shard": 2, "compute": {"batch_size": 2}, "generation": {"max_new_tokens": 150},
           "lock_ttl_s": 10}

    def shards() -> dict[str, str]:
        fs.invalidate_cache()
        return {p: fs.info(p)["ETag"] for p in fs.glob(f"{out}/part-*.parquet")}

    first = start_run(job, tmp_path, run_env())
    frozen = []
    try:
        wait_for(lambda: len(shards()) >= 2, 300, "two shards from the first run")
        frozen = tree(first.pid)
        for proc in frozen:  # the whole run: its driver, its local Ray and its workers
            proc.send_signal(signal.SIGSTOP)
        time.sleep(13)  # past its 10 s lease on the store's clock
        second = start_run(job, tmp_path, run_env())
        log, _ = second.communicate(timeout=600)
        assert second.returncode == 0, log
        assert "lease: took over" in log and f"pid{first.pid}:" in "".join(log.split()), log
        after_second = shards()
    finally:
        for proc in frozen:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    first_log, _ = first.communicate(timeout=300)
    assert first.returncode != 0, first_log
    said = " ".join(first_log.split())
    # the second run finished and released the lease before the first woke: it finds it gone
    assert "this run stopped writing: its lease" in said and ("was removed" in said or "taken over by" in said), first_log
    assert shards() == after_second  # the woken run wrote no further shard, and rewrote none
    rows = output_rows(out, fs)
    assert len(rows) == 16 and len({r["id"] for r in rows}) == 16
    assert fs.exists(f"{out}/_SUCCESS.json")


def test_two_runs_started_together_one_runs_the_other_is_refused(tiny_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        pattern_image(448 + 8 * i, 448).save(images / f"{i}.png")
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(images), "output": str(out), "model": str(tiny_model),
           "generation": {"max_new_tokens": 4}}
    runs = [start_run(job, tmp_path, run_env()) for _ in range(2)]
    logs = [r.communicate(timeout=600)[0] for r in runs]
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 2], logs
    winner, loser = (0, 1) if runs[0].returncode == 0 else (1, 0)
    said = "".join(logs[loser].split())  # the console folds long lines
    assert f"anotherrunholds{out}/_LOCK(host" in said and f"pid{runs[winner].pid}," in said, logs[loser]
    rows = output_rows(out)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
