"""Confined inputs end to end: a manifest in a bucket names a local file (as file:// and as an absolute path) and an
object of another bucket; each becomes one bad_input row naming the rule, and none is read, by the workers or by
the plan's estimate (the local file's access time and the S3 proxy's request log say so)."""

from __future__ import annotations

import io
import json
import os
import time

import pytest

from pipeline.config import parse_job
from tests.conftest import pattern_image
from tests.helpers import read_output
from tests.s3_proxy import FlakyProxy

pytestmark = pytest.mark.integration


def test_a_remote_manifest_reaches_neither_local_files_nor_other_buckets(s3_server, ray_local, tiny_model, tmp_path):
    import s3fs

    from pipeline.run.runner import run_job

    buf = io.BytesIO()
    pattern_image(64, 48).save(buf, "PNG")
    image = buf.getvalue()
    fs = s3fs.S3FileSystem()
    if not fs.exists("other"):
        fs.mkdir("other")  # a bucket the same credentials can read, which the job was not given
    fs.pipe("other/secret.png", image)
    fs.pipe("bucket/confine/ok.png", image)
    secret, control = tmp_path / "secret.png", tmp_path / "control.png"
    for path in (secret, control):
        path.write_bytes(image)  # readable images: a read would decode fine and give an ok row
        os.utime(path, (1, time.time()))  # access time before modification time: the next read moves it
    control.read_bytes()
    assert os.stat(control).st_atime > 1  # on this filesystem a read shows (relatime or strictatime)
    rows = [{"id": "ok", "uri": "s3://bucket/confine/ok.png"}, {"id": "file-url", "uri": f"file://{secret}"},
            {"id": "absolute", "uri": str(secret)}, {"id": "other-bucket", "uri": "s3://other/secret.png"}]
    fs.pipe("bucket/confine/in.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    with FlakyProxy(s3_server.endpoint_url, failure_rate=0.0) as proxy:
        job = parse_job({"task": "caption", "input": "s3://bucket/confine/in.jsonl", "output": "s3://bucket/confine/out/",
                         "model": str(tiny_model), "generation": {"max_new_tokens": 2},
                         "storage": {"endpoint_url": proxy.endpoint_url}})
        summary = run_job(job, echo=lambda line: None)
        first_run = list(proxy.paths)
        # the job lists the other bucket: now it is read; local files stay refused whatever is listed
        again = parse_job({**job.model_dump(exclude_none=True), "output": "s3://bucket/confine/out2/",
                           "allowed_inputs": ["s3://other/"]})
        run_job(again, echo=lambda line: None)
    out = {r["id"]: r for r in read_output("bucket/confine/out", fs).to_pylist()}
    assert sorted(out) == ["absolute", "file-url", "ok", "other-bucket"]
    assert out["ok"]["status"] == "ok"
    for key, rule in (("file-url", "is a local path, and the input is remote"),
                      ("absolute", "is a local path, and the input is remote"),
                      ("other-bucket", "outside the allowed inputs (s3://bucket/)")):
        assert (out[key]["status"], out[key]["error_type"]) == ("error", "bad_input"), out[key]
        assert rule in out[key]["error_message"] and "refused" in out[key]["error_message"]
    assert summary.errors_by_type == {"bad_input": 3}
    assert os.stat(secret).st_atime == 1  # the local file was never read
    assert not [p for p in first_run if p.startswith("/other")]  # nor the other bucket
    assert any(p.startswith("/bucket/confine/ok.png") for p in first_run)  # the allowed object went this way

    out = {r["id"]: r for r in read_output("bucket/confine/out2", fs).to_pylist()}
    assert out["other-bucket"]["status"] == "ok" and "/other/secret.png" in proxy.paths[len(first_run):]
    assert [out[k]["error_type"] for k in ("file-url", "absolute")] == ["bad_input", "bad_input"]
    assert os.stat(secret).st_atime == 1
