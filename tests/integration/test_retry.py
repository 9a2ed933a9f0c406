"""Retries with degraded settings, with the faults really made: prompts longer than the model's context, a model call
over a replica's memory cap, a driver SIGKILLed between the two writes of a retry. Every id ends up exactly once
in the output, with the attempt and the overrides that wrote it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.run.retry import CRASH_ENV
from tests.conftest import pattern_image
from tests.helpers import output_rows, read_output
from tests.media import make_video

pytestmark = pytest.mark.integration

CONTEXT = 1000  # tokens: 3 tiles (768 image tokens) fit with the prompt, 4 tiles (1024) do not
LADDER = [{"tiling.max_tiles": 3}, {"tiling.max_tiles": 1}]  # 1792x448 -> 5 tiles, then 4 (too long), then 1


@pytest.fixture(scope="module")
def short_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a context of CONTEXT tokens."""
    folder = tmp_path_factory.mktemp("short") / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two images that fit the context (3 tiles), two that do not (5 tiles), one broken file."""
    folder = tmp_path_factory.mktemp("retry-images")
    for i in range(2):
        pattern_image(896 + 8 * i, 448).save(folder / f"fits{i}.png")
        pattern_image(1792 + 8 * i, 448).save(folder / f"wide{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def caption_job(model: Path, input: str, output: str, **keys) -> dict:
    return {"task": "caption", "input": input, "output": output, "model": str(model), "rows_per_shard": 2,
            "compute": {"batch_size": 2}, "generation": {"max_new_tokens": 6}, **keys}


def run_cli(tmp_path: Path, job: dict, *extra: str):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return CliRunner().invoke(app, ["run", str(path), *extra])


def by_name(rows: list[dict]) -> dict[str, dict]:
    assert len({r["id"] for r in rows}) == len(rows), "an id is in the output more than once"
    return {Path(r["uri"]).stem: r for r in rows}


def test_prompts_too_long_for_the_context_succeed_on_a_lower_rung(ray_local, short_model, images, tmp_path):
    out = tmp_path / "out"
    job = caption_job(short_model, str(images), str(out), retry={"errors": ["too_long"], "ladder": LADDER})
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    assert "retry: attempt 2 (tiling.max_tiles=3): 2 row(s)" in result.output
    assert "retry: attempt 3 (tiling.max_tiles=1): 2 row(s)" in result.output
    rows = by_name(output_rows(out))
    assert len(rows) == 5
    for i in range(2):
        fits, wide = rows[f"fits{i}"], rows[f"wide{i}"]
        assert (fits["status"], fits["attempt"], fits["degraded"], fits["num_tiles"]) == ("ok", 1, None, 3)
        assert (wide["status"], wide["attempt"], wide["num_tiles"]) == ("ok", 3, 1)
        assert json.loads(wide["degraded"]) == {"tiling.max_tiles": 1}
    broken = rows["broken"]  # not a retryable type: one try
    assert (broken["error_type"], broken["attempt"]) == ("decode_error", 1)
    assert not (out / "_retry").exists()
    summary = json.loads((out / "_SUCCESS.json").read_text())
    assert summary["rows_by_attempt"] == {"1": 3, "3": 2} and summary["rows_retried"] == 4

    # a retried row is what the lighter settings give on their own
    alone = tmp_path / "alone"
    only_wide = tmp_path / "wide"
    only_wide.mkdir()
    for i in range(2):
        shutil.copy(images / f"wide{i}.png", only_wide)
    job = caption_job(short_model, str(only_wide), str(alone), tiling={"max_tiles": 1})
    assert run_cli(tmp_path, job).exit_code == 0
    for name, row in by_name(output_rows(alone)).items():
        assert row["response"] == rows[name]["response"] and row["num_input_tokens"] == rows[name]["num_input_tokens"]


def test_samples_over_the_token_budget_succeed_when_the_finished_job_is_rerun_with_a_retry_section(
        ray_local, tiny_model, tmp_path):
    """With min_tiles 2 an image costs at least 3 tiles (768 tokens), over the job's 512-token budget: too_large
    rows, while the video fits its frames to the budget. Re-running the finished job with a retry section (not part
    of the fingerprint) re-processes exactly the images; the video's shard is not touched."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        pattern_image(448 + 448 * i, 448).save(folder / f"image{i}.png")
    (folder / "clip.mp4").write_bytes(make_video(12, 6.0))
    out = tmp_path / "out"
    job = caption_job(tiny_model, str(folder), str(out), rows_per_shard=1, compute={"batch_size": 1},
                      tiling={"min_tiles": 2, "max_tokens_per_sample": 512})
    assert run_cli(tmp_path, job).exit_code == 0
    rows = by_name(output_rows(out))
    assert [rows[f"image{i}"]["error_type"] for i in range(2)] == ["too_large"] * 2
    assert rows["clip"]["status"] == "ok" and rows["clip"]["num_tiles"] == 2
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    job["retry"] = {"errors": ["too_large"], "ladder": [{"tiling.min_tiles": 1}]}
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    assert "2 error row(s) of types too_large set aside" in result.output
    rows = by_name(output_rows(out))
    assert len(rows) == 3
    for i in range(2):
        image = rows[f"image{i}"]
        assert (image["status"], image["attempt"], image["num_tiles"]) == ("ok", 2, 1)
        assert json.loads(image["degraded"]) == {"tiling.min_tiles": 1}
    assert rows["clip"]["attempt"] == 1
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    clip = next(p.name for p in out.glob("part-*.parquet") if pq.read_table(p).column("id")[0].as_py() == rows["clip"]["id"])
    assert after[clip] == before[clip]  # the video's shard is untouched; the images' were written again
    assert all(after.get(name) != stamp for name, stamp in before.items() if name != clip)
    assert (out / "_SUCCESS.json").exists() and not (out / "_retry").exists()


def test_retry_errors_tries_rows_that_went_through_the_whole_ladder_again_on_s3(s3_server, ray_local, short_model,
                                                                                images, tmp_path):
    """On a real object store: a ladder too short leaves too_long rows at their last attempt; a plain re-run leaves
    them be; `--retry-errors` with a longer ladder fixes exactly them (their shards rewritten, the others not)."""
    fs = s3fs.S3FileSystem()
    for p in images.iterdir():
        fs.pipe(f"bucket/retry/in/{p.name}", p.read_bytes())
    fs.put(str(short_model) + "/", "bucket/retry/model/", recursive=True)
    output = "s3://bucket/retry/out"
    job = caption_job("s3://bucket/retry/model", "s3://bucket/retry/in", output,
                      retry={"errors": ["too_long"], "ladder": LADDER[:1]})
    assert run_cli(tmp_path, job).exit_code == 0
    rows = by_name(read_output(output, fs).to_pylist())
    assert [(rows[f"wide{i}"]["error_type"], rows[f"wide{i}"]["attempt"]) for i in range(2)] == [("too_long", 2)] * 2

    again = run_cli(tmp_path, job)
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output  # the ladder was done

    fs.invalidate_cache()
    before = {p: fs.info(p)["ETag"] for p in fs.glob("bucket/retry/out/part-*.parquet")}
    job["retry"]["ladder"] = LADDER[1:]
    result = run_cli(tmp_path, job, "--retry-errors")
    assert result.exit_code == 0, result.output
    rows = by_name(read_output(output, fs).to_pylist())
    assert len(rows) == 5
    for i in range(2):
        wide = rows[f"wide{i}"]
        assert (wide["status"], wide["attempt"], json.loads(wide["degraded"])) == ("ok", 3, {"tiling.max_tiles": 1})
        assert rows[f"fits{i}"]["attempt"] == 1
    assert rows["broken"]["error_type"] == "decode_error"  # not a type the job retries
    fs.invalidate_cache()
    after = {p: fs.info(p)["ETag"] for p in fs.glob("bucket/retry/out/part-*.parquet")}
    unchanged = [p for p in before if after.get(p) == before[p]]
    with_errors = {p for p in before if p not in unchanged}
    assert with_errors and unchanged  # only the shards that held a wide row were rewritten
    fs.invalidate_cache()
    assert not [p for p in fs.find("bucket/retry/out/_retry") if p.endswith(".parquet")]  # no row left waiting


def run_killed_at(point: str, job: dict, folder: Path) -> subprocess.CompletedProcess:
    path = folder / f"job-{point}.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))} | {CRASH_ENV: point}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(path)], capture_output=True, text=True,
                          env=env, timeout=600, start_new_session=True)


@pytest.mark.parametrize("point", ["retry-pass-written", "retry-set-aside"])
def test_driver_sigkilled_between_the_two_writes_of_a_retry_then_rerun_each_id_once(point, ray_local, short_model,
                                                                                     images, tmp_path):
    """retry-pass-written: the retried rows are in the output, the rows they replace still wait in `_retry/`.
    retry-set-aside: a finished job's error rows are copied aside, their shards not yet rewritten. Either way a
    reader of the output sees each id once, and the next run completes the retry."""
    out = tmp_path / "out"
    job = caption_job(short_model, str(images), str(out), retry={"errors": ["too_long"], "ladder": LADDER})
    if point == "retry-set-aside":  # a finished job with error rows, then re-run with a retry section
        assert run_cli(tmp_path, {k: v for k, v in job.items() if k != "retry"}).exit_code == 0
    killed = run_killed_at(point, job, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not (out / "_SUCCESS.json").exists()
    assert list((out / "_retry").glob("attempt-*/*.parquet"))
    partial = by_name(output_rows(out))  # each id at most once, even now
    assert {"fits0", "fits1", "broken"} <= set(partial)

    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    rows = by_name(output_rows(out))
    assert len(rows) == 5
    for i in range(2):
        assert (rows[f"wide{i}"]["status"], rows[f"wide{i}"]["attempt"]) == ("ok", 3)
        assert rows[f"fits{i}"]["attempt"] == 1
    assert not (out / "_retry").exists()


def test_a_vqa_sample_retries_only_the_question_that_failed(ray_local, short_model, tmp_path):
    """A long question does not fit the context beside 3 tiles but does beside 1; the sample's short question
    keeps its first answer (3 tiles), and only the long one's row is written again, at attempt 2."""
    folder = tmp_path / "in"
    folder.mkdir()
    pattern_image(896, 448).save(folder / "a.png")
    long_question = "Describe " + "every single detail " * 40 + "please."
    out = tmp_path / "out"
    job = {"task": "vqa", "input": str(folder), "output": str(out), "model": str(short_model),
           "questions": ["What is this?", long_question], "generation": {"max_new_tokens": 4},
           "retry": {"errors": ["too_long"], "ladder": [{"tiling.max_tiles": 1}]}}
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    assert "retry: attempt 2 (tiling.max_tiles=1): 1 row(s) of 1 sample(s)" in result.output
    rows = {r["question_index"]: r for r in output_rows(out)}
    assert len(rows) == 2 and len({r["id"] for r in rows.values()}) == 2
    assert (rows[0]["status"], rows[0]["attempt"], rows[0]["num_tiles"]) == ("ok", 1, 3)
    assert (rows[1]["status"], rows[1]["attempt"], rows[1]["num_tiles"]) == ("ok", 2, 1)
