"""Job files are validated up front: unknown keys, bad values and credentials are named; exit code 2."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_job, parse_job
from pipeline.errors import JobError
from tests.conftest import REPO

BASE = {"task": "caption", "input": "/data/in", "output": "/data/out", "model": "/models/tiny"}


def test_defaults():
    job = parse_job(BASE)
    assert (job.tiling.max_tiles, job.tiling.min_tiles, job.tiling.thumbnail) == (12, 1, True)
    assert job.generation.do_sample is False and job.compute.device == "auto" and job.compute.dtype == "auto"
    assert job.effective_prompt == "Describe the image in detail."


def test_unknown_key_lists_valid_keys():
    with pytest.raises(JobError) as err:
        parse_job({**BASE, "tiling": {"max_tile": 4}})
    msg = str(err.value)
    assert "tiling.max_tile: unknown key" in msg and "max_tiles, max_tokens_per_sample, min_tiles, mode, thumbnail" in msg


def test_unknown_top_level_key():
    with pytest.raises(JobError, match=r"modle: unknown key; valid keys here: .*model"):
        parse_job({**BASE, "modle": "x"})


def test_every_error_names_its_field():
    with pytest.raises(JobError) as err:
        parse_job({"task": "translate", "input": "x", "tiling": {"max_tiles": 0}, "compute": {"device": "tpu"}})
    msg = str(err.value)
    for field in ("task:", "output: required", "model: required", "tiling.max_tiles:", "compute.device:"):
        assert field in msg


def test_min_above_max_tiles():
    with pytest.raises(JobError, match="min_tiles"):
        parse_job({**BASE, "tiling": {"min_tiles": 8, "max_tiles": 4}})


@pytest.mark.parametrize("key", ["key", "secret", "aws_secret_access_key"])
def test_credentials_refused_in_storage(key):
    with pytest.raises(JobError, match="credential") as err:
        parse_job({**BASE, "storage": {key: "AKIAVERYSECRET"}})
    assert "AKIAVERYSECRET" not in str(err.value)


def test_vqa_prompt_needs_question_placeholder():
    with pytest.raises(JobError, match=r"\{question\}"):
        parse_job({**BASE, "task": "vqa", "prompt": "Answer briefly."})
    assert parse_job({**BASE, "task": "vqa"}).effective_prompt == "{question}"


def test_overrides_are_typed():
    job = parse_job(BASE, overrides=["compute.batch_size=16", "tiling.thumbnail=false", "prompt=Say hi"])
    assert job.compute.batch_size == 16 and job.tiling.thumbnail is False and job.prompt == "Say hi"


def test_fingerprint_tracks_results_not_resources():
    a = parse_job(BASE)
    assert a.fingerprint() == parse_job(BASE, overrides=["compute.replicas=4", "output=/elsewhere"]).fingerprint()
    assert a.fingerprint() != parse_job(BASE, overrides=["tiling.max_tiles=6"]).fingerprint()
    assert a.fingerprint() != parse_job(BASE, overrides=["generation.max_new_tokens=7"]).fingerprint()


def test_engine_keys_are_validated_and_not_fingerprinted():
    job = parse_job(BASE, overrides=["compute.engine=vllm", "compute.vllm.max_num_seqs=64",
                                     "compute.vllm.gpu_memory_utilization=0.8"])
    assert job.compute.engine == "vllm" and job.compute.vllm.max_concurrent_batches == 8
    # the batch size follows the engine unless set (vLLM keeps 32 x 8 samples in flight, docs/vllm-runtime.md)
    assert (job.compute.batch_size_for("transformers"), job.compute.batch_size_for("vllm")) == (8, 32)
    assert parse_job(BASE, overrides=["compute.batch_size=4"]).compute.batch_size_for("vllm") == 4
    assert job.compute.vllm.engine_options() == {"max_num_seqs": 64, "gpu_memory_utilization": 0.8, "enforce_eager": False}
    assert parse_job(BASE).compute.engine == "auto"
    assert job.fingerprint() == parse_job(BASE).fingerprint()  # both engines give the same greedy tokens
    with pytest.raises(JobError, match=r"compute\.vllm\.max_num_seq: unknown key; valid keys here: .*max_num_seqs"):
        parse_job(BASE, overrides=["compute.vllm.max_num_seq=4"])
    with pytest.raises(JobError, match="compute.engine"):
        parse_job(BASE, overrides=["compute.engine=tgi"])
    with pytest.raises(JobError, match="gpu_memory_utilization"):
        parse_job(BASE, overrides=["compute.vllm.gpu_memory_utilization=1.5"])


def test_cli_bad_job_exits_2_and_writes_nothing(tmp_path):
    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    job.write_text(yaml.safe_dump({**BASE, "output": str(out), "generation": {"max_new_token": 5}}))
    result = CliRunner().invoke(app, ["run", str(job)])
    assert result.exit_code == 2
    assert "generation.max_new_token: unknown key" in result.output
    assert not out.exists()


def test_cli_missing_job_file(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such job file" in result.output


def test_examples_in_jobs_folder_are_valid():

    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert jobs, "jobs/ has no examples"
    for path in jobs:
        load_job(path)


def test_score_job_keys():
    job = parse_job({**BASE, "task": "score", "prompt": "Is it blurry?", "filter": {"min_score": 0.5}})
    assert job.score_criteria()[0].answers == ["yes", "no"] and job.has_filter
    with pytest.raises(JobError, match="only for task score"):
        parse_job({**BASE, "labels": ["a", "b"]})
    with pytest.raises(JobError, match="needs the question"):
        parse_job({**BASE, "task": "score"})
    with pytest.raises(JobError, match="labels or scale"):
        parse_job({**BASE, "task": "score", "prompt": "q", "labels": ["a", "b"], "scale": {"min": 0, "max": 3}})
    with pytest.raises(JobError, match=r"criteria\.0\.name"):
        parse_job({**BASE, "task": "score", "criteria": [{"name": "Bad Name", "prompt": "q"}]})
    with pytest.raises(JobError, match="distinct"):
        parse_job({**BASE, "task": "score", "criteria": [{"name": "a", "prompt": "q"}, {"name": "a", "prompt": "r"}]})
    with pytest.raises(JobError, match="need a scale"):
        parse_job({**BASE, "task": "score", "criteria": [{"name": "a", "prompt": "q", "filter": {"min_rating": 3}}]})


def test_models_command_lists_the_seed_families():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("InternVL3-1B", "InternVL3-78B", "InternVL2_5-26B", "Mini-InternVL-Chat-4B-V1-5", "Phi-3-mini"):
        assert name in result.output


# ------------------------------------------------------------------------------------------------- schema


def test_fingerprints_of_jobs_without_a_schema_are_unchanged():
    """Outputs written before the `schema` key existed still resume."""
    assert parse_job(BASE).fingerprint() == "0b1a1bc3f6195c02"
    assert parse_job({**BASE, "task": "vqa", "questions": ["a", "b"]}).fingerprint() == "37b238d234d75ecb"


def test_dedup_enters_fingerprint_settings_and_identity_only_when_on():
    from pipeline.config.fingerprint import Resolved, identity, settings

    resolved = Resolved(engine="transformers", dtype="float32", checkpoint="c")
    off, on = parse_job({**BASE, "dedup": "none"}), parse_job({**BASE, "dedup": "exact"})
    assert off.fingerprint() == parse_job(BASE).fingerprint() == "0b1a1bc3f6195c02"  # outputs without it resume
    assert "dedup" not in settings(off, resolved) and "dedup" not in identity(off)
    assert on.fingerprint() != off.fingerprint()
    assert settings(on, resolved)["dedup"] == identity(on)["dedup"] == "exact"
    with pytest.raises(JobError, match="dedup"):
        parse_job({**BASE, "dedup": "fuzzy"})


def test_schema_key_inline_file_and_per_question(tmp_path):
    pytest.importorskip("xgrammar")
    from tests.schemas import SCHEMA, SMALL

    inline = parse_job({**BASE, "schema": SCHEMA})
    assert inline.answer_schema == SCHEMA and inline.answer_schemas() == [SCHEMA]
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "answer.json").write_text(json.dumps(SCHEMA))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({**BASE, "schema": "schemas/answer.json"}))  # relative to the job file
    from_file = load_job(job_file)
    assert from_file.answer_schema == SCHEMA and from_file.fingerprint() == inline.fingerprint()
    assert inline.fingerprint() != parse_job(BASE).fingerprint()
    assert inline.fingerprint() != parse_job({**BASE, "schema": SMALL}).fingerprint()

    vqa = parse_job({**BASE, "task": "vqa", "schema": SMALL,
                     "questions": [{"question": "Describe it.", "schema": SCHEMA}, "Is it ok?"]})
    assert vqa.question_texts == ["Describe it.", "Is it ok?"]
    assert vqa.questions_asked() == [("Describe it.", SCHEMA), ("Is it ok?", SMALL)]
    plain = parse_job({**BASE, "task": "vqa", "questions": ["Describe it.", "Is it ok?"]})
    assert plain.questions_asked() == [("Describe it.", None), ("Is it ok?", None)]
    assert vqa.fingerprint() != plain.fingerprint()


@pytest.mark.parametrize("extra, message", [
    ({"task": "score", "prompt": "Blurry?", "schema": {"type": "boolean"}}, "schema: only for tasks caption and vqa"),
    ({"schema": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
     r"schema \$\.uniqueItems: uniqueItems is not supported"),
    ({"schema": "/nonexistent/answer.json"}, "schema file /nonexistent/answer.json not found"),
    ({"task": "vqa", "questions": [{"question": "q", "schema": {"type": "object", "properties": {"a": {}}}}]},
     r"questions\[0\]\.schema \$\.properties\.a: an unconstrained value"),
    ({"task": "vqa", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
      "questions": [{"question": "q", "schema": {"type": "object", "properties": {"n": {"type": "string"}}}}]},
     r"cannot share one answer column: schema \$\.n: schemas\[1\] gives the answer type string"),
])
def test_bad_schemas_name_the_problem(extra, message):
    pytest.importorskip("xgrammar")
    with pytest.raises(JobError, match=message):
        parse_job({**BASE, **extra})


def test_cli_schema_the_grammar_backend_cannot_compile_exits_2(tmp_path):
    pytest.importorskip("xgrammar")
    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": r"\bword\b"}}}
    job.write_text(yaml.safe_dump({**BASE, "output": str(out), "schema": schema}))
    result = CliRunner().invoke(app, ["run", str(job)])
    assert result.exit_code == 2
    assert "schema $.properties.name: the grammar backend (xgrammar) cannot compile this schema" in result.output
    assert "Word boundary" in result.output and not out.exists()


def test_yaml_boolean_labels_are_the_words_typed(tmp_path):
    """`labels: [yes, no]` as the README writes it: YAML 1.1 reads those as booleans, which the labels (strings)
    refused. Label lists keep the words as typed; every other key keeps YAML's types."""
    path = tmp_path / "job.yaml"
    path.write_text("task: score\ninput: in\noutput: out\nmodel: m\nprompt: Is it blurry?\n"
                    "labels: [yes, no]\noverwrite: yes\ntiling: {thumbnail: off}\n")
    job = load_job(path)
    assert job.labels == ["yes", "no"] and job.score_criteria()[0].answers == ["yes", "no"]
    assert job.overwrite is True and job.tiling.thumbnail is False
    path.write_text("task: score\ninput: in\noutput: out\nmodel: m\ncriteria:\n"
                    "  - {name: a, prompt: p, labels: [On, Off, TRUE, n]}\n  - {name: b, prompt: q, labels: [1, 10]}\n")
    assert [c.labels for c in load_job(path).criteria] == [["On", "Off", "TRUE", "n"], ["1", "10"]]
    assert load_job(path, ["labels=[yes, no]", "criteria=null", "prompt=q"]).labels == ["yes", "no"]
    parsed = parse_job({**BASE, "task": "score", "prompt": "q", "labels": [True, False]})  # already parsed: yes/no
    assert parsed.labels == ["yes", "no"]
    assert load_job(REPO / "jobs" / "filter_images.yaml").criteria[0].labels == ["no", "yes"]


RETRY = {"errors": ["too_large", "timeout", "model_error"],
         "ladder": [{"tiling.max_tiles": 6, "video.num_frames": 8},
                    {"tiling.max_tiles": 2, "video.num_frames": 4, "generation.max_new_tokens": 64}]}


def test_retry_rungs_apply_in_turn_and_are_not_fingerprinted():
    from pipeline.config import max_attempt, rung_job, rung_overrides

    job = parse_job({**BASE, "retry": RETRY})
    assert job.fingerprint() == parse_job(BASE).fingerprint()
    assert max_attempt(job.retry) == 3 and rung_job(job, 1) is job and rung_overrides(job.retry, 1) == {}
    second, third = rung_job(job, 2), rung_job(job, 3)
    assert (second.tiling.max_tiles, second.video.num_frames, second.generation.max_new_tokens) == (6, 8, 128)
    assert (third.tiling.max_tiles, third.video.num_frames, third.generation.max_new_tokens) == (2, 4, 64)
    assert rung_overrides(job.retry, 9) == RETRY["ladder"][-1]  # past the ladder (--retry-errors): its last rung
    assert parse_job({**BASE, "retry": {}}).retry.errors == ["read_error", "too_large", "timeout", "crashed",
                                                            "model_error", "too_long"]


@pytest.mark.parametrize("retry, named", [
    ({"ladder": [{"model": "other"}]}, "retry.ladder: ladder[0]: 'model' cannot be changed by a retry; allowed: tiling.max_tiles"),
    ({"ladder": [{}, {"tiling.max_tiles": 0}]}, "retry.ladder[1]: tiling.max_tiles: Input should be greater than or equal to 1"),
    ({"ladder": [{"tiling.min_tiles": 20}]}, "retry.ladder[0]: tiling: min_tiles (20) must not exceed max_tiles (12)"),
    ({"errors": ["oom"]}, "retry.errors: unknown error type(s) ['oom']"),
    ({"ladders": []}, "retry.ladders: unknown key; valid keys here: errors, ladder"),
])
def test_a_bad_retry_section_fails_fast_naming_the_key(retry, named):
    with pytest.raises(JobError) as err:
        parse_job({**BASE, "retry": retry})
    assert named in str(err.value), str(err.value)


def test_a_job_for_annotate_needs_no_input_or_output(tmp_path):
    """parse_job / load_job with model_only leave input and output out; without it both are still required, and a
    run refuses a job read for annotate() before it touches anything."""
    with pytest.raises(JobError) as err:
        parse_job({"task": "caption", "model": "m"})
    assert "input: required key is missing" in str(err.value) and "output: required key is missing" in str(err.value)
    job = parse_job({"task": "caption", "model": "m"}, model_only=True)
    assert (job.input, job.output) == (None, None)
    path = tmp_path / "annotate.yaml"
    path.write_text("task: score\nmodel: m\nprompt: Is it red?\n")
    assert load_job(path, model_only=True).task == "score"
    from pipeline.config import with_overrides
    from pipeline.run.plan import output_folder, preflight

    assert with_overrides(job, {"compute.replicas": 2}).compute.replicas == 2  # stays a job for annotate()
    for step in (output_folder, lambda j: preflight(j, print)):
        with pytest.raises(JobError, match=r"input and output: required for a run"):
            step(job)
