"""annotate()'s pieces without Ray: the job it runs and the input rows it makes of the caller's rows."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline.errors import InputError, JobError
from pipeline.io.confine import input_rule, refusal
from pipeline.io.inputs import derive_id
from pipeline.run.annotate import dataset_rows, model_job
from tests.conftest import REPO


def test_import_pipeline_stays_light():
    snippet = ("import sys, pipeline; assert 'ray' not in sys.modules and 'torch' not in sys.modules; "
               "from pipeline import annotate; assert annotate.__module__ == 'pipeline.run.annotate'; print('ok')")
    done = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_model_job_from_a_mapping_a_file_or_a_job(tmp_path):
    job = model_job({"task": "caption", "model": "m"}, replicas=(1, 2))
    assert job.compute.replica_range == (1, 2) and job.input is None
    path = tmp_path / "job.yaml"
    path.write_text("task: caption\nmodel: m\noutput: /somewhere\n")
    assert model_job(path).output == "/somewhere" and model_job(str(path)) == model_job(path)
    assert model_job(job) is job
    with pytest.raises(JobError, match="compute.replicas"):
        model_job(job, replicas=0)
    with pytest.raises(TypeError, match="JobConfig, a dict or a job file path"):
        model_job(42)  # type: ignore[arg-type]


def test_rows_get_ids_as_a_manifest_gives_them(tmp_path):
    rows = dataset_rows(pa.table({"uri": ["a.jpg", "/abs/b.png"], "tag": ["x", "y"]}), image_column=None, base="/data")
    assert rows.column_names == ["id", "uri", "tag"]
    assert rows.column("uri").to_pylist() == ["/data/a.jpg", "/abs/b.png"]
    assert rows.column("id").to_pylist() == [derive_id("/data/a.jpg"), derive_id("/abs/b.png")]
    given = dataset_rows(pa.table({"id": ["mine", None], "uri": ["/a.jpg", "/a.jpg"], "question": ["q1", "q2"]}),
                         image_column=None, base="/")
    assert given.column("id").to_pylist() == ["mine", derive_id("/a.jpg", "q2")]
    carried = dataset_rows(pa.table({"image": [{"bytes": b"...", "path": "p.jpg"}]}), image_column="image", base="/")
    assert carried.column("uri").to_pylist() == ["p.jpg"] and carried.column("id").to_pylist() == [derive_id("p.jpg")]
    with pytest.raises(InputError, match="has no 'uri'"):
        dataset_rows(pa.table({"path": ["a.jpg"]}), image_column=None, base="/")
    with pytest.raises(InputError, match="columns the output uses: status"):
        dataset_rows(pa.table({"uri": ["/a.jpg"], "status": ["new"]}), image_column=None, base="/")


def test_without_an_input_local_files_and_the_allowed_prefixes_may_be_read():
    rule = input_rule(None, ["s3://bucket/images"])
    assert refusal("/data/a.jpg", rule) is None and refusal("s3://bucket/images/a.jpg", rule) is None
    assert "outside the allowed inputs" in refusal("s3://other/a.jpg", rule)
    assert refusal("http://169.254.169.254/latest", rule) is not None  # the metadata service: never
