"""End to end: `internvl-batch run` on local Ray against the SeaweedFS S3 server, results read back from S3."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.io.schema import OUTPUT_SCHEMA
from tests.conftest import pattern_image
from tests.helpers import read_output

pytestmark = pytest.mark.integration

# name -> (width, height, expected tiles with max_tiles=12)
IMAGES = {"one.jpg": (448, 448, 1), "seven.png": (1344, 896, 7), "thirteen.jpg": (1792, 1344, 13)}


@pytest.fixture(scope="module")
def s3(s3_server, ray_local, tiny_model):
    fs = s3fs.S3FileSystem()
    for name, (w, h, _) in IMAGES.items():
        buf = io.BytesIO()
        pattern_image(w, h).save(buf, "PNG" if name.endswith("png") else "JPEG", quality=95)
        fs.pipe(f"bucket/e2e/images/{name}", buf.getvalue())
    fs.pipe("bucket/e2e/images/broken.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg")
    fs.pipe("bucket/e2e/images/README.txt", b"not media")
    fs.put(str(tiny_model) + "/", "bucket/models/tiny/", recursive=True)
    return fs


def run_cli(tmp_path, job: dict, *extra: str):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return CliRunner().invoke(app, ["run", str(path), *extra])


def prompt_overhead(tiny_model) -> int:
    """Tokens of the rendered chat template besides the image (the image placeholder itself is one token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}]
    return len(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]) - 1


def test_caption_images_from_s3_to_s3(s3, s3_server, tiny_model, tmp_path):
    job = {
        "task": "caption", "input": "s3://bucket/e2e/images/", "output": "s3://bucket/e2e/captions/",
        "model": "s3://bucket/models/tiny/", "model_cache": str(tmp_path / "cache"),
        "generation": {"max_new_tokens": 6}, "compute": {"batch_size": 2},
    }
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    table = read_output("bucket/e2e/captions", s3)
    assert table.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted([*IMAGES, "broken.jpg"])  # one row per input; the .txt is not an input
    overhead = prompt_overhead(tiny_model)
    for name, (w, h, tiles) in IMAGES.items():
        row = rows[name]
        assert row["status"] == "ok" and row["error_type"] is None
        assert (row["num_tiles"], row["width"], row["height"]) == (tiles, w, h)
        assert row["num_input_tokens"] == overhead + 2 + 256 * tiles
        assert row["num_generated_tokens"] == 6 and row["response"]
        assert row["model"] == "s3://bucket/models/tiny/" and json.loads(row["generation"])["max_new_tokens"] == 6
        assert row["task"] == "caption" and row["prompt"] == "Describe the image in detail."
    assert rows["broken.jpg"]["status"] == "error" and rows["broken.jpg"]["error_type"] == "decode_error"
    assert len(set(table.column("id").to_pylist())) == table.num_rows

    success = json.loads(s3.cat("bucket/e2e/captions/_SUCCESS.json"))
    assert (success["rows_in"], success["rows_out"], success["rows_ok"], success["rows_error"]) == (4, 4, 3, 1)
    assert success["errors_by_type"] == {"decode_error": 1} and success["skipped_inputs"] == {".txt": 1}
    assert success["tiles"] == 21
    assert not any(name.startswith("__") for name in table.schema.names)  # timing columns stay out of the output
    (replica, usage), = success["replicas"].items()
    assert usage["batches"] >= 2 and 0 < usage["busy_s"] <= usage["span_s"]
    assert (usage["samples"], usage["generated_tokens"]) == (3, 18) and usage["tokens_per_s"] > 0
    assert usage["images_per_s"] == pytest.approx(3 / usage["busy_s"], rel=1e-2)
    assert "images/s" in result.output and "output tokens/s" in result.output
    assert 0 < success["model_busy_fraction"] <= 1
    assert_no_secrets(s3_server, result.output, [s3.cat_file(p) for p in s3.find("bucket/e2e/captions")])
    assert (tmp_path / "cache").exists()  # the s3:// checkpoint was copied into the node-local cache

    # the finished job re-run does nothing and says so; a changed configuration is refused; overwrite starts over
    shards = sorted(s3.glob("bucket/e2e/captions/part-*.parquet"))
    again = run_cli(tmp_path, job)
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert sorted(s3.glob("bucket/e2e/captions/part-*.parquet")) == shards
    changed = run_cli(tmp_path, job, "--set", "tiling.max_tiles=6")
    assert changed.exit_code == 2 and "other settings: tiling" in changed.output and "overwrite" in changed.output
    assert run_cli(tmp_path, job, "--set", "overwrite=true", "--set", "tiling.max_tiles=6").exit_code == 0
    assert read_output("bucket/e2e/captions", s3).num_rows == 4


def test_vqa_manifest_with_passthrough(s3, tiny_model, tmp_path):
    manifest = [
        {"uri": "s3://bucket/e2e/images/one.jpg", "question": "What colour is it?", "source": "a", "rank": 1},
        {"uri": "s3://bucket/e2e/images/one.jpg", "question": "Is it round?", "source": "b", "rank": 2},
        {"id": "mine", "uri": "s3://bucket/e2e/images/seven.png", "question": "How many?", "source": "c", "rank": 3},
        {"uri": "s3://bucket/e2e/images/missing.jpg", "question": "Where?", "source": "d", "rank": 4},
    ]
    s3.pipe("bucket/e2e/vqa.jsonl", "\n".join(json.dumps(r) for r in manifest).encode())
    job = {
        "task": "vqa", "input": "s3://bucket/e2e/vqa.jsonl", "output": "s3://bucket/e2e/vqa-out",
        "model": str(tiny_model), "prompt": "{question} Answer briefly.", "generation": {"max_new_tokens": 4},
        "tiling": {"max_tiles": 6},
    }
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    rows = sorted(read_output("bucket/e2e/vqa-out", s3).to_pylist(), key=lambda r: r["rank"])
    assert [r["source"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[0]["prompt"] == "What colour is it? Answer briefly." and rows[0]["question"] == "What colour is it?"
    assert rows[0]["id"] != rows[1]["id"] and rows[2]["id"] == "mine"
    assert rows[2]["num_tiles"] == 7  # 3x2 grid (max 6) + thumbnail
    assert rows[3]["status"] == "error" and rows[3]["error_type"] == "not_found"
    assert all(r["status"] == "ok" and r["response"] for r in rows[:3])


# What every run printed on stderr before it was quieted (the libraries' chatter, none of it for the user).
STDERR_NOISE = ("Writing model shards", "Loading weights", "it/s]", "Token authentication is enabled",
                "constructor arguments in the object store", "streaming_executor.py", "Progress bars disabled")


def test_demo_command_runs_on_a_fresh_workdir(tmp_path):
    """The README's first command: `internvl-batch demo` (local folders here; the S3 path is tested above). It
    builds the tiny model and runs a job on local Ray; its stderr holds none of the libraries' noise."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_AUTH_MODE", "HF_HUB_DISABLE_PROGRESS_BARS"))}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--workdir", str(tmp_path / "demo"), "--no-s3"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = re.search(r"rows in / out\D+(\d+) / (\d+)", proc.stdout)
    assert counts and counts.group(1) == counts.group(2) == "44", proc.stdout  # 9 images x 4 + 4 videos x 2 questions
    assert "accuracy:" in proc.stdout and "truth" in proc.stdout  # the trained model's answers next to the truth
    assert (tmp_path / "demo" / "results" / "_SUCCESS.json").exists()
    noise = [line for line in proc.stderr.splitlines() if any(n in line for n in STDERR_NOISE)]
    assert noise == [], proc.stderr


def test_verbose_run_keeps_the_library_lines(tmp_path):
    """--verbose shows what a run hides: the hidden lines are real, and hiding them is the quiet default's doing."""
    pattern_image(448, 448).save(tmp_path / "a.png")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"task": "caption", "input": str(tmp_path / "a.png"), "output": str(tmp_path / "out"),
                                   "model": str(tmp_path / "demo-model"), "generation": {"max_new_tokens": 2}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_AUTH_MODE"))}
    made = subprocess.run([sys.executable, "-m", "pipeline.cli", "make-tiny-model", str(tmp_path / "demo-model")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert made.returncode == 0, made.stderr
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(job), "--verbose"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "constructor arguments in the object store" in proc.stderr and "streaming_executor.py" in proc.stderr


def test_missing_model_fails_before_any_work(tmp_path):
    (tmp_path / "img").mkdir()
    pattern_image(64, 64).save(tmp_path / "img" / "a.png")
    job = {"task": "caption", "input": str(tmp_path / "img"), "output": str(tmp_path / "out"), "model": str(tmp_path / "nope")}
    result = run_cli(tmp_path, job)
    assert result.exit_code == 2 and "no such folder" in result.output
    assert not (tmp_path / "out").exists()


def test_mixed_images_and_videos_from_s3(s3, tiny_model, tmp_path):
    from tests.media import make_video

    s3.pipe("bucket/mixed/a.jpg", s3.cat("bucket/e2e/images/one.jpg"))
    s3.pipe("bucket/mixed/b.mp4", make_video(45, 15, width=320, height=240))
    s3.pipe("bucket/mixed/c.webm", make_video(20, 10, kind="webm"))
    s3.pipe("bucket/mixed/d.mkv", b"\x1a\x45\xdf\xa3 broken matroska")
    job = {"task": "caption", "input": "s3://bucket/mixed/", "output": "s3://bucket/mixed-out/", "model": str(tiny_model),
           "generation": {"max_new_tokens": 3}, "video": {"num_frames": 4}}
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in read_output("bucket/mixed-out", s3).to_pylist()}
    assert sorted(rows) == ["a.jpg", "b.mp4", "c.webm", "d.mkv"]
    assert rows["a.jpg"]["media_type"] == "image" and rows["a.jpg"]["num_frames"] is None
    mp4 = rows["b.mp4"]
    assert (mp4["status"], mp4["media_type"], mp4["num_frames"], mp4["fps"], mp4["duration_s"]) == ("ok", "video", 45, 15.0, 3.0)
    assert mp4["frame_indices"] == [5, 16, 27, 38] and mp4["tiles_per_image"] == [1, 1, 1, 1] and mp4["num_tiles"] == 4
    assert mp4["num_input_tokens"] == video_prompt_length(tiny_model, 4)
    assert rows["c.webm"]["status"] == "ok" and rows["c.webm"]["num_frames"] == 20
    assert rows["d.mkv"]["status"] == "error" and rows["d.mkv"]["error_type"] == "decode_error"


def video_prompt_length(tiny_model, frames: int) -> int:
    """Prompt tokens of a caption request over a video of `frames` 1-tile frames, from the tokenizer directly."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    body = "\n".join(f"Frame{i + 1}: <img>" + "<IMG_CONTEXT>" * 256 + "</img>" for i in range(frames))
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the image in detail."}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).replace("<video>", body)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_manifest_with_uris_and_questions(s3, tiny_model, tmp_path):
    rows = [
        {"id": "pair", "uris": ["s3://bucket/e2e/images/seven.png", "s3://bucket/e2e/images/one.jpg"],
         "questions": ["Which one is larger?", "Are they the same?"], "split": "train"},
        {"id": "single", "uris": ["s3://bucket/e2e/images/one.jpg"], "questions": None, "split": "val"},
    ]
    s3.pipe("bucket/e2e/multi.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    job = {"task": "vqa", "input": "s3://bucket/e2e/multi.jsonl", "output": "s3://bucket/e2e/multi-out",
           "model": str(tiny_model), "questions": ["What is shown?"], "generation": {"max_new_tokens": 3}}
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    out = {r["id"]: r for r in read_output("bucket/e2e/multi-out", s3).to_pylist()}
    assert sorted(out) == ["pair#0", "pair#1", "single"]
    assert [out[f"pair#{k}"]["question"] for k in (0, 1)] == ["Which one is larger?", "Are they the same?"]
    assert out["single"]["question"] == "What is shown?" and out["single"]["question_index"] == 0
    pair = out["pair#0"]
    assert pair["media_type"] == "images" and pair["tiles_per_image"] == [7, 1] and pair["num_tiles"] == 8
    assert pair["sample_id"] == "pair" and pair["split"] == "train" and "questions" not in pair
    assert all(r["status"] == "ok" and r["response"] for r in out.values())
    success = json.loads(s3.cat("bucket/e2e/multi-out/_SUCCESS.json"))
    assert success["rows_in"] == success["rows_out"] == 3


def test_filter_job_writes_scores_and_passed_subset(s3, tiny_model, tmp_path):
    s3.pipe("bucket/filter/in.jsonl", "\n".join(json.dumps(r) for r in [
        {"uri": "s3://bucket/e2e/images/one.jpg", "source": "a"},
        {"uri": "s3://bucket/e2e/images/seven.png", "source": "b"},
        {"uri": "s3://bucket/e2e/images/thirteen.jpg", "source": "c"},
        {"uri": "s3://bucket/e2e/images/broken.jpg", "source": "d"},
    ]).encode())
    job = {"task": "score", "input": "s3://bucket/filter/in.jsonl", "output": "s3://bucket/filter/scored",
           "output_passed": "s3://bucket/filter/passed", "model": str(tiny_model),
           "criteria": [{"name": "blurry", "prompt": "Is this image blurry?", "labels": ["no", "yes"],
                         "filter": {"min_score": 0.0}},
                        {"name": "quality", "prompt": "Rate the quality 0-9.", "scale": {"min": 0, "max": 9}}]}
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    scored = read_output("bucket/filter/scored", s3)
    rows = {r["source"]: r for r in scored.to_pylist()}
    assert all(rows[s]["status"] == "ok" and 0 <= rows[s]["score_blurry"] <= 1 and 0 <= rows[s]["rating_quality"] <= 9
               for s in "abc")
    assert rows["d"]["status"] == "error" and rows["d"]["passed"] is False
    passed = read_output("bucket/filter/passed", s3)
    assert sorted(passed.column("source").to_pylist()) == ["a", "b", "c"]
    assert passed.column_names == ["id", "uri", "source"]  # the input's columns: a manifest for the next stage
    success = json.loads(s3.cat("bucket/filter/scored/_SUCCESS.json"))
    assert success["rows_in"] == success["rows_ok"] + success["rows_error"] == 4
    assert success["rows_passed"] == 3
    assert sum(success["score_histograms"]["blurry"]) == 3 and sum(success["score_histograms"]["quality"]) == 3

    # Thresholds that cut rows, placed between the scores (and ratings) just seen: each rule keeps only the middle
    # row, so each of min and max cuts a row the other keeps. The `passed` column, the passed subset and the count
    # must agree. A re-run reproduces each score within 1e-6 (same samples, same batches), inside the gaps.
    for name, key, low, high in (("blurry", "score_blurry", "min_score", "max_score"),
                                 ("quality", "rating_quality", "min_rating", "max_rating")):
        ranked = sorted("abc", key=lambda s: rows[s][key])
        values = [rows[s][key] for s in ranked]
        assert values[1] - values[0] > 1e-5 and values[2] - values[1] > 1e-5, values
        rule = {low: (values[0] + values[1]) / 2, high: (values[1] + values[2]) / 2}
        criteria = [{**c, "filter": rule if c["name"] == name else None} for c in job["criteria"]]
        out, passed_out = f"bucket/filter/{name}-cut", f"bucket/filter/{name}-passed"
        result = run_cli(tmp_path, {**job, "output": f"s3://{out}", "output_passed": f"s3://{passed_out}",
                                    "criteria": [{k: v for k, v in c.items() if v is not None} for c in criteria]})
        assert result.exit_code == 0, result.output
        again = {r["source"]: r for r in read_output(out, s3).to_pylist()}
        assert all(again[s][key] == pytest.approx(rows[s][key], abs=1e-6) for s in "abc")
        assert [s for s in "abcd" if again[s]["passed"]] == [ranked[1]], (rule, values)
        assert read_output(passed_out, s3).column("source").to_pylist() == [ranked[1]]
        assert json.loads(s3.cat(f"{out}/_SUCCESS.json"))["rows_passed"] == 1


def test_a_crash_between_the_two_writes_of_a_filter_shard_is_repaired_on_resume(s3, tiny_model, tmp_path):
    """The passed shard is written first: a run that died before the output shard leaves an orphan passed shard
    (made here as that crash leaves it: the output shard and _SUCCESS.json removed). Resuming removes it and
    processes its rows again, so each passing row is in output_passed exactly once; a passed subset that does not
    match the output's passed count fails the run's accounting."""
    s3.pipe("bucket/window/in.jsonl", "\n".join(json.dumps({"uri": f"s3://bucket/e2e/images/{n}", "source": n})
                                                 for n in ("one.jpg", "seven.png", "thirteen.jpg")).encode())
    job = {"task": "score", "input": "s3://bucket/window/in.jsonl", "output": "s3://bucket/window/scored",
           "output_passed": "s3://bucket/window/passed", "model": str(tiny_model), "rows_per_shard": 1,
           "compute": {"batch_size": 1},
           "criteria": [{"name": "blurry", "prompt": "Is this image blurry?", "labels": ["no", "yes"],
                         "filter": {"min_score": 0.0}}]}
    assert run_cli(tmp_path, job).exit_code == 0
    passed = sorted(s3.glob("bucket/window/passed/part-*.passed.parquet"))
    shards = sorted(s3.glob("bucket/window/scored/part-*.parquet"))
    assert [p.replace("/passed/", "/scored/").replace(".passed.parquet", ".parquet") for p in passed] == shards
    assert len(shards) >= 2  # one passed shard per output shard (every row passes), named after it
    victim = shards[-1]
    s3.rm(victim)
    s3.rm("bucket/window/scored/_SUCCESS.json")
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    assert "removed 1 passed shard(s)" in result.output
    sources = read_output("bucket/window/passed", s3).column("source").to_pylist()
    assert sorted(sources) == ["one.jpg", "seven.png", "thirteen.jpg"]  # each exactly once
    assert json.loads(s3.cat("bucket/window/scored/_SUCCESS.json"))["rows_passed"] == 3

    s3.pipe("bucket/window/passed/part-stray.parquet", s3.cat(passed[0]))  # a row the output does not account for
    s3.rm("bucket/window/scored/_SUCCESS.json")
    result = run_cli(tmp_path, job)
    assert result.exit_code != 0 and "accounting failed for output_passed: 4 rows" in result.output, result.output


@pytest.mark.parametrize("family", ["qwen2", "llama", "phi3", "internlm2"])
def test_job_runs_on_an_original_format_checkpoint(family, ray_local, tmp_path):
    """Each language-model family: an original-format (remote-code layout) checkpoint is converted on load."""
    from tests.unit.model.test_convert import original_config, original_state, write_original, write_original_tokenizer

    tokenizers = write_original_tokenizer(tmp_path / "tokenizer")
    config = original_config(family, "300m", tokenizers, image_size=448)
    model = write_original(tmp_path / f"InternVL-{family}", config, original_state(config), tokenizers)
    (tmp_path / "img").mkdir()
    pattern_image(896, 448).save(tmp_path / "img" / "a.png")
    job = {"task": "caption", "input": str(tmp_path / "img"), "output": str(tmp_path / "out"), "model": str(model),
           "model_cache": str(tmp_path / "cache"), "generation": {"max_new_tokens": 3}}
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    row = pq.read_table(next((tmp_path / "out").glob("part-*.parquet"))).to_pylist()[0]
    assert row["status"] == "ok" and row["num_tiles"] == 3 and row["num_generated_tokens"] >= 1
    assert any(p.name.startswith("converted-") for p in (tmp_path / "cache").iterdir())


@pytest.mark.parametrize("inputs", [3, 100])
def test_plan_reads_and_tiles_in_one_task_and_gathers_before_writing(inputs, ray_local, capsys):
    """Small inputs too: Ray Data must not split the read blocks (which would keep reading a separate stage)."""
    import pyarrow as pa

    from pipeline.config import parse_job
    from pipeline.io.output import OutputFolder
    from pipeline.run.dataset import build_dataset
    from pipeline.run.resources import resources_for

    job = parse_job({"task": "caption", "input": "in", "output": "out", "model": "m"})
    rows = pa.table({"id": [f"{i}" for i in range(inputs)], "uri": [f"/x/{i}.png" for i in range(inputs)]})
    build_dataset(job, OutputFolder("out"), rows, resources_for(job, cluster_cpus=4, cluster_gpus=0)).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[-1]
    assert "TaskPoolMapOperator[ReadInputRows->MapBatches(preprocess_block)]" in optimized
    assert "TaskPoolMapOperator[MapBatches(_gather)->MapBatches(write_batch)]" in optimized


def test_shards_hold_at_least_rows_per_shard_rows(ray_local, tiny_model, tmp_path):
    """Model batches of 2 rows and shards of 3: a shard takes whole blocks (4 rows), never a 1-row remainder."""
    (tmp_path / "img").mkdir()
    for i in range(13):
        pattern_image(64 + 8 * i, 64).save(tmp_path / "img" / f"{i:02d}.png")
    job = {"task": "caption", "input": str(tmp_path / "img"), "output": str(tmp_path / "out"), "model": str(tiny_model),
           "rows_per_shard": 3, "compute": {"batch_size": 2}, "generation": {"max_new_tokens": 2}}
    result = run_cli(tmp_path, job)
    assert result.exit_code == 0, result.output
    sizes = sorted(pq.read_metadata(p).num_rows for p in (tmp_path / "out").glob("part-*.parquet"))
    assert sum(sizes) == 13 and sum(n < 3 for n in sizes) <= 1, sizes  # only the run's last rows may fall short


def assert_no_secrets(server, output: str, blobs: list[bytes]) -> None:
    """Neither the command's output, nor the files written, nor Ray's session logs hold the credentials."""
    import glob

    logs = [open(p, "rb").read() for p in glob.glob("/tmp/ray/session_latest/logs/**/*", recursive=True)
            if os.path.isfile(p)]
    for secret in (server.secret_key, server.access_key):
        assert secret not in output
        assert not any(secret.encode() in blob for blob in blobs + logs)
