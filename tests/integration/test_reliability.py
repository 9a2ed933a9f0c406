"""Faults really injected: a killed driver resumes without duplicates, a killed model actor is replaced, every
broken or unusual input becomes one row with the right error type."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import DATA, pattern_image
from tests.helpers import wait_for, output_rows, read_output
from tests.media import make_video
from tests.procs import own_pids

pytestmark = pytest.mark.integration


def clean_env() -> dict[str, str]:
    """A job's own environment: no test credentials, its own local Ray."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}


def start_job(job: dict, folder: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`internvl-batch run` of a job in a process of its own (`env`: default, clean_env())."""
    path = folder / f"job-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(job))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or clean_env(), start_new_session=True)


def shards(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(14):
        pattern_image(448 + 8 * i, 448).save(folder / f"{i:02d}.png")
    return folder


def test_driver_killed_then_rerun_resumes_exactly_once(images, tiny_model, tmp_path):
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(images), "output": str(out), "model": str(tiny_model), "rows_per_shard": 2,
           "compute": {"batch_size": 2}, "generation": {"max_new_tokens": 200}}
    first = start_job(job, tmp_path)
    try:
        wait_for(lambda: len(shards(out)) >= 2, 300, "two shards from the first run")
    finally:
        os.kill(first.pid, signal.SIGKILL)  # the driver only; its local Ray shares its fate
        first.wait(60)
    before: dict[str, int] = {}
    wait_for(lambda: (before.update(shards(out)) or True) and time.sleep(3) is None and shards(out) == before, 60,
             "the killed run's workers to stop writing")
    assert 2 <= len(output_rows(out)) < 14
    assert not (out / "_SUCCESS.json").exists()

    second = start_job(job, tmp_path)
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log
    assert "resuming:" in log
    rows = output_rows(out)
    assert len(rows) == 14 and len({r["id"] for r in rows}) == 14
    assert {Path(r["uri"]).name for r in rows} == {p.name for p in images.iterdir()}
    after = shards(out)
    assert all(after.get(name) == stamp for name, stamp in before.items())  # the finished part was not redone
    assert (out / "_SUCCESS.json").exists()


def test_model_actor_killed_mid_job_is_replaced(images, tiny_model, tmp_path):
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(images), "output": str(out), "model": str(tiny_model), "rows_per_shard": 2,
           "compute": {"batch_size": 2}, "generation": {"max_new_tokens": 200}}
    run = start_job(job, tmp_path)
    try:
        wait_for(lambda: len(shards(out)) >= 1, 300, "a first shard")
        victims = own_pids(r"MapBatches\(Generate\)", root=run.pid)  # in this job's process tree only
        assert victims, "no model actor process found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        log, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, log
    rows = output_rows(out)
    assert len(rows) == 14 and len({r["id"] for r in rows}) == 14 and all(r["status"] == "ok" for r in rows)


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_broken_and_unusual_media_become_rows(tiny_model, tmp_path):
    import numpy as np

    folder = tmp_path / "corpus"
    folder.mkdir()
    good = pattern_image(640, 480)
    gif = io.BytesIO()
    good.save(gif, "GIF", save_all=True, append_images=[pattern_image(640, 480).rotate(90)], duration=40)
    huge = _png(Image.new("1", (20000, 20000)))  # 400 Mpx declared, tiny file: refused before decoding
    corpus = {
        "good.jpg": (_jpeg(good), "ok"),
        "truncated.jpg": (_jpeg(good)[:2000], "decode_error"),
        "empty.png": (b"", "decode_error"),
        "text.jpg": (b"hello, I am not an image", "decode_error"),
        "palette.png": (_png(good.convert("P"), transparency=0), "ok"),
        "alpha.png": (_png(good.convert("RGBA")), "ok"),
        "cmyk.jpg": (_jpeg(good.convert("CMYK")), "ok"),
        "grey16.png": (_png(Image.fromarray((np.arange(640 * 480, dtype=np.uint32) % 65536).astype(np.uint16).reshape(480, 640))), "ok"),
        "animated.gif": (gif.getvalue(), "ok"),
        "huge.png": (huge, "too_large"),
        "clip.mp4": (make_video(20, 10), "ok"),
        "one-frame.mp4": (make_video(1, 10), "ok"),
        "broken.mp4": (make_video(20, 10)[:300], "decode_error"),
        "garbage.webm": (b"\x1a\x45\xdf\xa3" + b"\x00" * 64, "decode_error"),
    }
    for name, (data, _) in corpus.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(folder), "output": str(out), "model": str(tiny_model),
           "generation": {"max_new_tokens": 2}, "tiling": {"max_image_pixels": 100_000_000}, "video": {"num_frames": 2}}
    run = start_job(job, tmp_path)
    log, _ = run.communicate(timeout=600)
    assert run.returncode == 0, log
    rows = {Path(r["uri"]).name: r for r in output_rows(out)}
    assert sorted(rows) == sorted(corpus)  # one row per input
    for name, (_, expected) in corpus.items():
        row = rows[name]
        got = row["status"] if row["status"] == "ok" else row["error_type"]
        assert got == expected, (name, row["error_message"])
        if expected == "ok":
            assert row["response"] and row["num_tiles"] >= 1
        else:
            assert row["error_message"]
    assert rows["huge.png"]["error_message"].startswith("image is 20000x20000")


def test_decoder_segfault_costs_one_row_not_the_worker():
    """A randomly corrupted mp4 (found by fuzzing) on which decord segfaults every time. PyAV decodes it (with error
    concealment), so the pipeline's sample_video never reaches decord with it; decord itself, isolated as every
    video decode is, crashes its child process twice and the sample becomes a `crashed` error."""
    from pipeline.errors import MediaError
    from pipeline.media.sandbox import Sandbox
    from pipeline.media.video import sample_with_decord

    data = (DATA / "decord_segfault.mp4").read_bytes()
    box = Sandbox(sample_with_decord, timeout_s=60, attempts=2)
    with pytest.raises(MediaError) as err:
        box(data, num_segments=2)
    assert err.value.error_type == "crashed" and "SIGSEGV" in str(err.value) and "2 attempts" in str(err.value)
    assert len(box(make_video(20, 10), num_segments=4).indices) == 4  # the next sample decodes in a fresh child
    box.close()


def test_decode_that_takes_too_long_becomes_a_timeout_row(tmp_path):
    from pipeline.config import parse_job
    from pipeline.stages.preprocess import Preprocess

    (tmp_path / "long.mp4").write_bytes(make_video(600, 25, width=640, height=480))
    (tmp_path / "short.mp4").write_bytes(make_video(10, 10))
    job = parse_job({"task": "caption", "input": str(tmp_path), "output": str(tmp_path / "out"), "model": "m",
                     "decode": {"timeout_s": 0.3}, "video": {"num_frames": 64}})
    stage = Preprocess(job)
    slow = stage.prepare(str(tmp_path / "long.mp4"))
    assert (slow["status"], slow["error_type"]) == ("error", "timeout") and "0.3 s" in slow["error_message"]
    fine = Preprocess(parse_job({**job.model_dump(exclude_none=True), "decode": {"timeout_s": 60}})).prepare(
        str(tmp_path / "short.mp4"))
    assert fine["status"] == "ok" and fine["num_tiles"] == 64  # the next sample gets a fresh decoder child


def test_s3_throttling_is_retried_and_wrong_credentials_fail_fast(s3_server, tiny_model, tmp_path):
    """30% of S3 requests answered 503 SlowDown by a proxy: the job still succeeds, each input once."""
    import s3fs

    from tests.s3_proxy import FlakyProxy

    fs = s3fs.S3FileSystem()
    for i in range(6):
        buf = io.BytesIO()
        pattern_image(448 + 16 * i, 448).save(buf, "PNG")
        fs.pipe(f"bucket/flaky/in/{i}.png", buf.getvalue())
    job = {"task": "caption", "input": "s3://bucket/flaky/in/", "output": "s3://bucket/flaky/out/",
           "model": str(tiny_model), "generation": {"max_new_tokens": 2}, "rows_per_shard": 1,
           "compute": {"batch_size": 1}}  # a shard per input: more requests to fail
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with FlakyProxy(s3_server.endpoint_url, failure_rate=0.3) as proxy:
        env = {**clean_env(), **s3_server.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url}
        run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], capture_output=True, text=True,
                             env=env, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        assert proxy.counts["failed"] >= 5, proxy.counts  # the faults really happened
    out = read_output("bucket/flaky/out", fs, columns=["id", "status", "error_type"])
    ids = out.column("id").to_pylist()
    assert len(ids) == 6 and len(set(ids)) == 6
    # every image was really read through the throttled store (an empty read would be a decode_error row)
    assert out.column("status").to_pylist() == ["ok"] * 6, out.column("error_type").to_pylist()

    env = {**clean_env(), **s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    started = time.monotonic()
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--set", "output=s3://bucket/flaky/out2/"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "access denied" in bad.stdout + bad.stderr
    assert time.monotonic() - started < 5 + 3  # preflight within 5 s, plus the interpreter's start-up
    assert "wrong-secret" not in bad.stdout + bad.stderr


def test_no_credentials_at_all_exit_2_naming_where_the_chain_looked(tiny_model, tmp_path):
    """No AWS credentials anywhere (no variables, no profile files): exit 2 with the places the chain looked, no
    traceback, nothing written. The instance-metadata lookup is switched off so nothing leaves the machine; the
    endpoint is a closed loopback port (botocore fails to sign before connecting)."""
    job = {"task": "caption", "input": "s3://bucket/in/", "output": "s3://bucket/out/", "model": str(tiny_model)}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    (tmp_path / "home").mkdir()
    env = {**{k: v for k, v in clean_env().items() if not k.startswith("AWS_")}, "HOME": str(tmp_path / "home"),
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    out = run.stdout + run.stderr
    assert "no AWS credentials found" in out and "Traceback" not in out and "NoCredentialsError" not in out
    for place in ("AWS_ACCESS_KEY_ID", "profile 'default'", "~/.aws/credentials", "container role", "instance role"):
        assert place in out, place
    assert time.monotonic() - started < 60


def test_model_that_cannot_load_fails_fast_with_the_cause(images, tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    job = {"task": "caption", "input": str(images), "output": str(tmp_path / "out"), "model": str(broken)}
    started = time.monotonic()
    run = start_job(job, tmp_path)
    log, _ = run.communicate(timeout=300)
    assert run.returncode == 1, log
    assert "could not be loaded" in log and "fix the model and re-run" in log
    assert time.monotonic() - started < 120  # no endless restart loop
