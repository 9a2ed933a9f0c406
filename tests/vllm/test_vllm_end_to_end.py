"""End to end with `compute.engine: vllm`: `internvl-batch run` on local Ray, inputs and outputs in the SeaweedFS
S3 server, the model from S3; the rows equal a transformers run of the same job; the replica's prefix-cache hit
rate is in the run's table and _SUCCESS.json."""

from __future__ import annotations

import io
import json
import re

import pytest

pytest.importorskip("vllm")

import s3fs  # noqa: E402
import yaml  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pipeline.cli import app  # noqa: E402
from tests.conftest import pattern_image  # noqa: E402
from tests.helpers import read_output  # noqa: E402
from tests.vllm.conftest import ENGINE_OPTIONS  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

IMAGES = {"one.jpg": (448, 448), "seven.png": (1344, 896), "thirteen.jpg": (1792, 1344)}
QUESTIONS = ["Describe the image.", "What colour is it?", "Is it dark?"]


@pytest.fixture(scope="module")
def s3(s3_server, ray_local, tiny_model):
    fs = s3fs.S3FileSystem()
    for name, (w, h) in IMAGES.items():
        buf = io.BytesIO()
        pattern_image(w, h).save(buf, "PNG" if name.endswith("png") else "JPEG", quality=95)
        fs.pipe(f"bucket/vllm/images/{name}", buf.getvalue())
    fs.pipe("bucket/vllm/images/broken.jpg", b"\xff\xd8\xff\xe0 not a jpeg")
    fs.put(str(tiny_model) + "/", "bucket/vllm/model/", recursive=True)
    return fs


def run_job(tmp_path, job: dict):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return CliRunner().invoke(app, ["run", str(path)])


def test_vqa_job_on_vllm_equals_transformers(s3, tmp_path):
    job = {"task": "vqa", "input": "s3://bucket/vllm/images/", "questions": QUESTIONS, "model": "s3://bucket/vllm/model/",
           "model_cache": str(tmp_path / "cache"), "generation": {"max_new_tokens": 6},
           "compute": {"batch_size": 1, "engine": "vllm", "vllm": dict(ENGINE_OPTIONS, max_concurrent_batches=3)}}
    result = run_job(tmp_path, dict(job, output="s3://bucket/vllm/out-vllm/"))
    assert result.exit_code == 0, result.output
    assert "vllm replica(s)" in result.output and "output tokens/s" in result.output
    reference = dict(job, output="s3://bucket/vllm/out-hf/", compute={"batch_size": 1, "engine": "transformers"})
    assert run_job(tmp_path, reference).exit_code == 0

    got = {r["id"]: r for r in read_output("bucket/vllm/out-vllm", s3).to_pylist()}
    want = {r["id"]: r for r in read_output("bucket/vllm/out-hf", s3).to_pylist()}
    assert got.keys() == want.keys() and len(got) == 4 * len(QUESTIONS)
    for key, row in want.items():
        same = ("status", "error_type", "response", "num_input_tokens", "num_generated_tokens", "num_tiles")
        assert {k: got[key][k] for k in same} == {k: row[k] for k in same}, key
    assert sum(r["status"] == "ok" for r in got.values()) == 9

    success = json.loads(s3.cat("bucket/vllm/out-vllm/_SUCCESS.json"))
    assert (success["rows_out"], success["rows_ok"]) == (12, 9) and success["generated_tokens"] == 54
    (usage,) = success["replicas"].values()
    assert usage["samples"] == 3 and usage["generated_tokens"] == 54 and usage["tokens_per_s"] > 0
    # vLLM's prefix cache, per replica: each image's three questions share its KV blocks (1, 7 and 13 tiles)
    assert usage["prefix_cache_queries"] == success["input_tokens"] and usage["prefix_cache_hit_rate"] > 0.5
    table = re.sub(r"[\s│]+", " ", result.output)  # the run's table, its cells unwrapped
    assert f"prefix cache {usage['prefix_cache_hit_rate']:.0%} of prompt tokens" in table
