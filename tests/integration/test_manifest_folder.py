"""A folder holding only manifest files, given as `input` with `input_format: auto`, is read as a folder of
manifests (it used to be refused: "no images or videos found (skipped: {'.jsonl': 3})")."""

from __future__ import annotations

import json

import pytest

from pipeline.config import parse_job
from tests.conftest import pattern_image

pytestmark = pytest.mark.integration


def test_a_folder_of_only_manifests_is_read_as_manifests(ray_local, tiny_model, tmp_path):
    from pipeline.run.runner import plan_job, run_job

    folder = tmp_path / "lists"
    folder.mkdir()
    (tmp_path / "images").mkdir()
    pattern_image(64, 48).save(tmp_path / "images" / "a.png")
    for k in range(3):  # relative URIs: resolved against the folder given as input
        (folder / f"part-{k}.jsonl").write_text("\n".join(json.dumps({"id": f"{k}-{i}", "uri": "../images/a.png"})
                                                         for i in range(4)))
    (folder / "_SUCCESS").write_text("")  # a marker: neither a manifest nor media
    job = parse_job({"task": "caption", "input": str(folder),
                     "output": str(tmp_path / "out"), "model": str(tiny_model), "generation": {"max_new_tokens": 2}})
    assert job.input_format == "auto"
    plan = plan_job(job, echo=lambda _: None)
    assert plan.inputs.kind == "manifest" and plan.samples == 12 and plan.skipped == {}
    assert {r["uri"] for r in plan.inputs.samples.take_all()} == {f"{folder}/../images/a.png"}
    summary = run_job(job, echo=lambda _: None)
    assert (summary.rows_in, summary.rows_ok) == (12, 12)


def test_a_folder_of_media_and_a_stray_manifest_is_still_media(ray_local, tiny_model, tmp_path):
    from pipeline.run.runner import plan_job

    pattern_image(64, 48).save(tmp_path / "a.png")
    (tmp_path / "list.csv").write_text("uri\na.png\n")
    job = parse_job({"task": "caption", "input": str(tmp_path), "output": str(tmp_path / "out"), "model": str(tiny_model)})
    plan = plan_job(job, echo=lambda _: None)
    assert plan.inputs.kind == "files" and plan.samples == 1 and plan.skipped == {".csv": 1}
