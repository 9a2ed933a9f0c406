"""The driver holds counts, not rows: manifests stream from Ray Data's readers, resume is an id grouping and a join,
accounting is aggregations; the dry run (`plan`) writes nothing. CI-sized (the bench runs 100k-10M rows)."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import parse_job
from pipeline.errors import JobError, RunError
from pipeline.io.schema import TODO_COLUMN
from pipeline.run.plan import rows_to_group
from tests.conftest import pattern_image
from tests.outputs import done_rows, write_done

pytestmark = pytest.mark.integration


def make_job(tiny_model, input_: str, output: str, **extra):
    return parse_job({"task": "caption", "input": input_, "output": output, "model": str(tiny_model), **extra})


def files_under(path) -> set[str]:
    return {str(p) for p in path.rglob("*")} if path.exists() else set()


def test_sharded_manifest_folder_streams_and_plan_writes_nothing(ray_local, tiny_model, tmp_path):
    from pipeline.run.runner import plan_job

    folder = tmp_path / "manifest"
    folder.mkdir()
    n, shards = 200_000, 8
    for s in range(shards):
        ids = range(s * n // shards, (s + 1) * n // shards)
        pq.write_table(pa.table({"uri": [f"s3://bucket/images/{i:07d}.jpg" for i in ids], "source": [s] * len(ids)}),
                       folder / f"part-{s}.parquet")
    job = make_job(tiny_model, str(folder), str(tmp_path / "out"), input_format="manifest")
    lines: list[str] = []
    plan = plan_job(job, echo=lines.append)
    figures = plan.figures()
    assert (figures["samples"], figures["rows"], figures["rows_done"], figures["rows_todo"]) == (n, n, 0, n)
    assert not isinstance(plan.todo, pa.Table)  # the samples stay a dataset: the driver holds counts
    assert rows_to_group(job, plan.inputs, []) == n  # too big to read once: streamed, counted from the footers
    assert f"{n} samples ({n} output rows)" in "\n".join(lines)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_duplicate_id_across_two_manifest_files_is_refused_naming_it(ray_local, tiny_model, tmp_path):
    from pipeline.run.runner import plan_job

    folder = tmp_path / "manifest"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"id": f"a-{i}", "uri": f"/x/a{i}.jpg"}) for i in range(50))
                                    + "\n" + json.dumps({"id": "dup-7", "uri": "/x/one.jpg"}))
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"id": f"b-{i}", "uri": f"/x/b{i}.jpg"}) for i in range(50))
                                    + "\n" + json.dumps({"id": "dup-7", "uri": "/x/other.jpg"}))
    job = make_job(tiny_model, str(folder), str(tmp_path / "out"), input_format="manifest")
    with pytest.raises(JobError, match="id 'dup-7' appears more than once"):
        plan_job(job, echo=lambda _: None)
    one = make_job(tiny_model, str(folder / "a.jsonl"), str(tmp_path / "out"))
    # a small manifest is read once, its rows counted: its id shuffle is one task (no aggregator actors to start)
    assert rows_to_group(one, plan_job(one, echo=lambda _: None).inputs, []) == 51


def test_resume_keeps_half_written_multi_question_samples_exactly_once(ray_local, tiny_model, tmp_path):
    from pipeline.run.plan import output_folder, plan_run

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": f"s{i}", "uri": f"/x/{i}.jpg", "questions": ["q1", "q2"]})
                                  for i in range(10)))
    job = parse_job({"task": "vqa", "input": str(manifest), "output": str(tmp_path / "out"), "model": str(tiny_model)})
    written = [f"s{i}#{k}" for i in range(8) for k in (0, 1)] + ["s8#0"]  # s8 half written, s9 not started
    write_done(job, done_rows(written, ["/x/0.jpg"] * len(written), sample_ids=[w.split("#")[0] for w in written]))
    plan = plan_run(job, output_folder(job), lambda _: None)
    assert (plan.rows_expected, plan.rows_done, plan.rows_todo, plan.samples_todo) == (20, 17, 3, 2)
    todo = {r["id"]: sorted(r[TODO_COLUMN]) for r in plan.todo.take_all()}
    assert todo == {"s8": ["s8#1"], "s9": ["s9#0", "s9#1"]}


def test_accounting_catches_a_missing_and_a_duplicated_row(ray_local, tiny_model, tmp_path):
    from pipeline.run.finish import check_ids, count_output_ids
    from pipeline.run.totals import summarize_output
    from pipeline.run.plan import output_folder, plan_run

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": f"m-{i}", "uri": f"/x/{i}.jpg"}) for i in range(50)))
    job = make_job(tiny_model, str(manifest), str(tmp_path / "out"))
    ids = [f"m-{i}" for i in range(50)]
    write_done(job, done_rows(ids, [f"/x/{i}.jpg" for i in range(50)]), rows_per_shard=25)
    folder = output_folder(job)
    plan = plan_run(job, folder, lambda _: None)
    assert plan.rows_todo == 0
    check_ids(job, count_output_ids(job, folder, plan), plan.rows_in, summarize_output(folder).rows)  # complete

    first = sorted((tmp_path / "out").glob("part-*.parquet"))[0]
    table = pq.read_table(first)
    missing = table.column("id")[3].as_py()
    pq.write_table(table.filter(pa.compute.not_equal(table.column("id"), missing)), first)  # inject a missing row
    kept = sorted(set(ids) - set(table.column("id").to_pylist()))[0]
    write_done(job, done_rows([kept], ["/x/again.jpg"]))  # and a duplicated one: rows in = rows out still
    counts = summarize_output(folder)
    assert counts.rows == 50
    with pytest.raises(RunError) as err:
        check_ids(job, count_output_ids(job, folder, plan), plan.rows_in, counts.rows)
    assert f"1 missing (e.g. {missing!r})" in str(err.value) and f"1 written more than once (e.g. {kept!r})" in str(err.value)
    assert "_SUCCESS.json not written" in str(err.value)


def test_plan_command_on_a_resumed_prefix(ray_local, tiny_model, tmp_path):
    images = tmp_path / "images"
    for sub in ("a", "b", "c/d"):
        (images / sub).mkdir(parents=True)
    names = ["top.png", "a/1.png", "a/2.png", "b/3.png", "c/d/4.png"]
    for i, name in enumerate(names):
        pattern_image(448 + 64 * i, 448).save(images / name)
    (images / "b" / "notes.txt").write_text("not media")
    out = tmp_path / "out"
    job = make_job(tiny_model, str(images), str(out))
    from pipeline.io.inputs import derive_id

    done = [str(images / n) for n in names[:2]]
    write_done(job, done_rows([derive_id(u) for u in done], done))
    before = files_under(out)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(exclude_none=True)))
    result = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert (figures["samples"], figures["rows"], figures["rows_done"], figures["rows_todo"]) == (5, 5, 2, 3)
    assert figures["skipped"] == {".txt": 1}
    assert figures["estimate"]["sampled"] == 5 and figures["estimate"]["tiles"] > 3
    assert files_under(out) == before  # nothing written, nothing removed


def test_s3_inventory_report_is_an_input(s3_server, ray_local, tiny_model, tmp_path):
    import s3fs

    from pipeline.run.runner import plan_job

    fs = s3fs.S3FileSystem()
    buf = io.BytesIO()
    pattern_image(64, 64).save(buf, "PNG")
    keys = ["inv/data/one.png", "inv/data/with space.png", "inv/data/sub/two.png", "inv/data/readme.txt"]
    for key in keys:
        fs.pipe(f"bucket/{key}", buf.getvalue())
    rows = [["bucket", k.replace(" ", "%20"), "70", "2026-01-01T00:00:00.000Z", f"etag{i}", "true", "false"]
            for i, k in enumerate(keys)]
    rows.append(["bucket", "inv/data/deleted.png", "0", "2026-01-01T00:00:00.000Z", "gone", "true", "true"])
    data = gzip.compress("\n".join(",".join(f'"{c}"' for c in r) for r in rows).encode())
    fs.pipe("bucket/inv/report/data/part-0.csv.gz", data)
    fs.pipe("bucket/inv/report/manifest.json", json.dumps({
        "sourceBucket": "bucket", "destinationBucket": "arn:aws:s3:::bucket", "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag, IsLatest, IsDeleteMarker",
        "files": [{"key": "inv/report/data/part-0.csv.gz", "size": len(data)}]}).encode())
    job = make_job(tiny_model, "s3://bucket/inv/report/manifest.json", str(tmp_path / "out"))
    plan = plan_job(job, echo=lambda _: None)
    uris = sorted(r["uri"] for r in plan.inputs.samples.take_all())
    assert uris == ["s3://bucket/inv/data/one.png", "s3://bucket/inv/data/sub/two.png", "s3://bucket/inv/data/with space.png"]
    assert plan.skipped == {".txt": 1} and plan.estimate["sampled"] == 3
    assert rows_to_group(job, plan.inputs, []) == 3  # the listing's count sizes the id shuffle: one task, no actors
