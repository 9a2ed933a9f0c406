"""What made every row is recorded and checked: rows carry a settings id (full settings in `_settings/`); an output
is refused to a run with other weights or another engine, naming what changed; `--update` re-runs the rows of other
settings in place, and a run killed while placing them leaves every id once, old or new."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import parse_job
from pipeline.config.fingerprint import Resolved, identity, settings, settings_id
from pipeline.embedded.tiny_model import make_tiny_model
from pipeline.run.plan import output_mismatch
from pipeline.run.retry import CRASH_ENV
from tests.conftest import pattern_image
from tests.helpers import output_rows

pytestmark = pytest.mark.integration

PROMPT = "Describe the image in detail."


def caption_job(model: Path, images: Path, out: Path, **keys) -> dict:
    return {"task": "caption", "input": str(images), "output": str(out), "model": str(model), "rows_per_shard": 4,
            "compute": {"batch_size": 4}, "generation": {"max_new_tokens": 3}, **keys}


def run_cli(folder: Path, job: dict, *extra: str):
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return CliRunner().invoke(app, ["run", str(path), *extra])


def one_row_per_id(out: Path) -> list[dict]:
    rows = output_rows(out)
    assert len({r["id"] for r in rows}) == len(rows), "an id is in the output more than once"
    return rows


def test_an_output_is_refused_to_another_engine_naming_what_changed():
    job = parse_job({"task": "caption", "input": "in", "output": "out", "model": "m"})
    before = Resolved(engine="transformers", dtype="bfloat16", checkpoint="sha256:aa")
    marker = {"fingerprint": "x", "settings": settings(job, before), "identity": identity(job)}
    problem = output_mismatch(marker, job, Resolved(engine="vllm", dtype="bfloat16", checkpoint="sha256:aa"))
    assert problem == 'holds results of other settings: engine: "transformers" -> "vllm"'
    assert output_mismatch(marker, job, before, update=True) is None  # --update may change settings
    other = parse_job({"task": "vqa", "input": "in", "output": "out", "model": "m", "questions": ["a", "b"]})
    assert 'another kind of job (questions: null -> 2; task: "caption" -> "vqa")' in output_mismatch(
        marker, other, before, update=True)


def test_settings_recorded_checkpoint_change_refused_and_update_in_place_survives_a_kill(ray_local, tmp_path):
    model = make_tiny_model(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        pattern_image(448 + 8 * i, 448).save(images / f"{i:02d}.png")
    out = tmp_path / "out"
    job = caption_job(model, images, out)
    first = run_cli(tmp_path, job)
    assert first.exit_code == 0, first.output
    rows = one_row_per_id(out)
    old_id = rows[0]["settings"]
    assert len(rows) == 20 and {r["settings"] for r in rows} == {old_id}
    recorded = json.loads((out / "_settings" / f"{old_id}.json").read_text())
    assert recorded["prompt"] == PROMPT and recorded["engine"] == "transformers" and recorded["dtype"] == "float32"
    assert recorded["checkpoint"].startswith("sha256:")

    make_tiny_model(model, seed=1)  # the same path, other weights
    refused = run_cli(tmp_path, job)
    assert refused.exit_code == 2 and "holds results of other settings: checkpoint:" in " ".join(refused.output.split())
    make_tiny_model(model, seed=0)  # the weights back (same content, same settings)
    assert run_cli(tmp_path, job).exit_code == 0

    changed = {**job, "prompt": "Describe the picture briefly."}
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(changed))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    killed = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path), "--update"], capture_output=True,
                            text=True, env=env | {CRASH_ENV: "update-replaced"}, timeout=900, start_new_session=True)
    assert killed.returncode != 0 and "20 row(s)" in killed.stdout and "re-run and replaced in place" in killed.stdout
    assert len(one_row_per_id(out)) == 20  # killed while placing: every id once, old or new
    assert list((out / "_update").glob("*.parquet"))  # the new rows still wait to be placed

    again = CliRunner().invoke(app, ["run", str(path), "--update"])
    assert again.exit_code == 0, again.output
    rows = one_row_per_id(out)
    new_id = settings_id(json.loads((out / "_settings" / f"{rows[0]['settings']}.json").read_text()))
    assert len(rows) == 20 and {r["settings"] for r in rows} == {new_id} and new_id != old_id
    assert {r["prompt"] for r in rows} == {"Describe the picture briefly."}
    assert not list((out / "_update").glob("*.parquet"))
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["rows_out"] == 20 and success["rows_updated"] >= 1
    plain = CliRunner().invoke(app, ["run", str(path)])  # the output now belongs to the new settings
    assert plain.exit_code == 0 and "nothing to do" in plain.output
