"""Structured annotation through the real pipeline: jobs/annotate_structured.yaml on the tiny model, local Ray, inputs
and outputs in local folders. Every answer parses and validates, the `answer` column has the derived Arrow type,
batched equals one at a time, and a too small max_new_tokens gives `truncated` rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import load_job
from tests.conftest import REPO
from tests.helpers import read_output

pytestmark = pytest.mark.integration
pytest.importorskip("xgrammar")

EXAMPLE = REPO / "jobs" / "annotate_structured.yaml"
# what the example's schema (enum, integer, boolean, array, nested object) becomes
ANSWER_TYPE = pa.struct([
    ("subject", pa.string()), ("count", pa.int64()), ("indoor", pa.bool_()), ("tags", pa.list_(pa.string())),
    ("main_object", pa.struct([("name", pa.string()), ("position", pa.string())])),
])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """20 different noise images of three sizes (1 or 3 tiles at max_tiles 2)."""
    folder = tmp_path_factory.mktemp("structured-images")
    rng = np.random.default_rng(19)
    for i in range(20):
        w, h = [(448, 448), (896, 448), (500, 380)][i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def run_example(tiny_model, images, out, *overrides):
    from pipeline.run.runner import run_job

    job = load_job(EXAMPLE, [f"input={images}", f"output={out}", f"model={tiny_model}", "tiling.max_tiles=2",
                             *overrides])
    summary = run_job(job, echo=lambda _: None)
    return job, summary, read_output(out)


def test_every_answer_of_a_20_sample_job_parses_validates_and_is_typed(ray_local, tiny_model, images, tmp_path):
    from jsonschema import validate

    job, summary, table = run_example(tiny_model, images, tmp_path / "batched", "compute.batch_size=8")
    assert (summary.rows_out, summary.rows_ok) == (20, 20), summary.errors_by_type
    assert table.schema.field("answer").type == ANSWER_TYPE
    assert pq.read_schema(next((tmp_path / "batched").glob("part-*.parquet"))).field("answer").type == ANSWER_TYPE
    rows = table.to_pylist()
    for row in rows:
        value = json.loads(row["response"])
        validate(value, job.answer_schema)
        assert row["answer"] == value  # every field is required: nothing left null
    assert len({r["response"] for r in rows}) > 10  # answers depend on the image
    # ready to filter
    answer = table.column("answer")
    subjects = pc.struct_field(answer, "subject")
    some = rows[0]["answer"]["subject"]
    assert table.filter(pc.equal(subjects, some)).num_rows == sum(r["answer"]["subject"] == some for r in rows)
    assert pc.struct_field(pc.struct_field(answer, "main_object"), "position").type == pa.string()

    # greedy: one sample per model call gives the same answers
    _, _, alone = run_example(tiny_model, images, tmp_path / "alone", "compute.batch_size=1")
    assert {r["id"]: r["response"] for r in alone.to_pylist()} == {r["id"]: r["response"] for r in rows}


def test_too_small_max_new_tokens_gives_truncated_rows(ray_local, tiny_model, images, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(images.glob("*.png"))[:4]:
        (few / path.name).write_bytes(path.read_bytes())
    _, summary, table = run_example(tiny_model, few, tmp_path / "out", "generation.max_new_tokens=8")
    assert summary.errors_by_type == {"truncated": 4}
    assert table.schema.field("answer").type == ANSWER_TYPE  # an all-error shard keeps the column's type
    for row in table.to_pylist():
        assert (row["status"], row["error_type"], row["answer"]) == ("error", "truncated", None)
        assert "max_new_tokens=8" in row["error_message"] and row["response"].startswith('{"sub')
