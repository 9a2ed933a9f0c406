"""`annotate(ds, job)` inside a user's own Ray Data program: the example program run as a user runs it, and the same
answers as a CLI run of the same job on the same pictures (given by URI, and as bytes in an image column)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import annotate
from pipeline.cli import app
from pipeline.config import parse_job
from pipeline.embedded import world as W
from pipeline.io.schema import WRITE_FIELDS, output_schema
from tests.helpers import read_output

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "annotate_my_dataset.py"
RUN_ONLY = {f.name for f in WRITE_FIELDS} | {"__batch", "pixels", "picture_sizes"}  # never in annotate()'s rows


def test_example_program_writes_one_row_per_input(tmp_path, tiny_model_trained):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's would be
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(EXAMPLE), str(tiny_model_trained), str(out), "--pictures", "8"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    table = pq.read_table(out)
    job = parse_job({"task": "caption", "model": str(tiny_model_trained)}, model_only=True)
    assert set(output_schema(job).names) <= set(table.column_names)
    assert not RUN_ONLY & set(table.column_names)
    rows = sorted(table.to_pylist(), key=lambda r: r["uri"])
    # 8 pictures, the program's filter drops the blue ones (every 4th from the 3rd)
    assert [Path(r["uri"]).name for r in rows] == [f"picture-{i:03d}.png" for i in range(8) if i % 4 != 2]
    for r in rows:
        assert (r["status"], r["task"], r["response"]) == ("ok", "caption", f"a {r['color']} {r['shape']} on a white background")
    assert len({r["id"] for r in rows}) == len(rows)
    assert f"{Path(rows[0]['uri']).name} ({rows[0]['color']} {rows[0]['shape']}): a " in done.stdout


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("annotate-in")
    rng = np.random.default_rng(28)
    for i in range(4):
        drawn = W.draw_image(rng, tiles=1, fmt=("jpeg", "png")[i % 2])
        (folder / f"p{i}.{'jpg' if drawn.format == 'jpeg' else 'png'}").write_bytes(drawn.data)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg after all")
    return folder


def test_same_answers_as_a_cli_run(tmp_path, ray_local, tiny_model_trained, pictures):
    import ray

    job = {"task": "vqa", "model": str(tiny_model_trained), "questions": [W.CAPTION, W.WHAT_SHAPE],
           "generation": {"max_new_tokens": 24}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**job, "input": str(pictures), "output": str(tmp_path / "out")}))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    ran = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}

    files = sorted(pictures.iterdir())
    by_uri = ray.data.from_items([{"uri": str(p), "tag": p.stem} for p in files])
    got = {r["id"]: r for r in annotate(by_uri, job).take_all()}
    assert got.keys() == ran.keys() and len(got) == 2 * len(files)  # the same ids: a row per question
    fields = ("uri", "sample_id", "question", "question_index", "status", "error_type", "response", "num_tiles")
    for i, row in got.items():
        assert {k: row[k] for k in fields} == {k: ran[i][k] for k in fields}
        assert row["tag"] == Path(row["uri"]).stem  # the caller's own column passed through
    assert sum(r["status"] == "error" for r in got.values()) == 2  # broken.jpg: one error row per question

    # the same pictures carried as bytes ({bytes, path}, as Hugging Face stores images); the job file read for it
    job_file = tmp_path / "annotate.yaml"
    job_file.write_text(yaml.safe_dump({**job, "image_column": "image"}))
    by_bytes = ray.data.from_items([{"image": {"bytes": p.read_bytes(), "path": p.name}} for p in files])
    carried = annotate(by_bytes, job_file, replicas=1).take_all()
    answers = {(Path(r["uri"]).name, r["question_index"]): (r["status"], r["response"]) for r in ran.values()}
    assert {(r["uri"], r["question_index"]): (r["status"], r["response"]) for r in carried} == answers
    assert "image" not in carried[0]  # the bytes end at the CPU stage
