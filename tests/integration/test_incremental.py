"""Incremental runs take only new or changed objects; two runs cannot hold the output at once."""

from __future__ import annotations

import io
import json

import pytest
import s3fs
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import LockedError
from pipeline.io.output import OutputFolder
from pipeline.io.output.lease import renewed
from pipeline.io.storage import object_version
from tests.conftest import pattern_image
from tests.helpers import output_rows

pytestmark = pytest.mark.integration


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    pattern_image(w, h).save(buf, "PNG")
    return buf.getvalue()


def test_pure_helpers():
    assert object_version({"ETag": '"abc"', "size": 3}) == "abc"
    assert object_version({"size": 3, "mtime": 12.5}) == "3-12.5"


def test_local_lock_is_exclusive(tmp_path):
    folder = OutputFolder(str(tmp_path))
    with renewed(folder.take_lease(30)):
        with pytest.raises(LockedError, match="another run holds"):
            folder.take_lease(30)
    with renewed(folder.take_lease(30)):  # released after the first run
        pass


def test_add_three_change_one_processes_exactly_four(s3_server, ray_local, tiny_model, tmp_path):
    fs = s3fs.S3FileSystem()
    for i in range(5):
        fs.pipe(f"bucket/nightly/in/{i}.png", png(448 + 8 * i, 448))
    job = {"task": "caption", "input": "s3://bucket/nightly/in/", "output": "s3://bucket/nightly/out/",
           "model": str(tiny_model), "incremental": True, "generation": {"max_new_tokens": 2}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    first = CliRunner().invoke(app, ["run", str(path)])
    assert first.exit_code == 0, first.output
    assert "5 of 5 objects are new or changed" in first.output

    for i in range(5, 8):  # add 3
        fs.pipe(f"bucket/nightly/in/{i}.png", png(448 + 8 * i, 448))
    fs.pipe("bucket/nightly/in/0.png", png(900, 448))  # change 1
    second = CliRunner().invoke(app, ["run", str(path)])
    assert second.exit_code == 0, second.output
    assert "4 of 8 objects are new or changed" in second.output
    success = json.loads(fs.cat("bucket/nightly/out/_SUCCESS.json"))
    assert success["objects_taken"] == 4 and success["rows_out"] == 9  # 5 + 4: the changed object has a new row
    rows = output_rows("bucket/nightly/out", fs)
    assert len({r["id"] for r in rows}) == 9 and sum(r["uri"].endswith("/0.png") for r in rows) == 2
    runs = fs.glob("bucket/nightly/out/_runs/*.json")
    assert sorted(json.loads(fs.cat(r))["objects_taken"] for r in runs) == [4, 5]

    third = CliRunner().invoke(app, ["run", str(path)])
    assert third.exit_code == 0 and "0 of 8 objects are new or changed" in third.output

    # a second run while one holds the lock (a scheduled run that overlaps) is refused and says so
    with renewed(OutputFolder("s3://bucket/nightly/out/").take_lease(60)):
        overlapping = CliRunner().invoke(app, ["run", str(path)])
    assert overlapping.exit_code == 2 and "another run holds" in overlapping.output
    assert fs.glob("bucket/nightly/out/_state/*/*.parquet") and not fs.exists("bucket/nightly/out/_INCREMENTAL.json")


def test_a_nightly_run_reads_only_new_shards_and_still_catches_an_id_twice(ray_local, tiny_model, tmp_path):
    """The second run trusts the shard index for what the first committed; a committed shard copied under another
    name is not trusted: that run counts every shard, finds the ids twice and keeps one row each."""
    import shutil

    images = tmp_path / "in"
    images.mkdir()
    for i in range(4):
        pattern_image(448 + 8 * i, 448).save(images / f"{i}.png")
    out = tmp_path / "out"
    job = {"task": "caption", "input": str(images), "output": str(out), "model": str(tiny_model), "incremental": True,
           "rows_per_shard": 2, "compute": {"batch_size": 2}, "generation": {"max_new_tokens": 2}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert CliRunner().invoke(app, ["run", str(path)]).exit_code == 0
    assert list((out / "_index").glob("*/*.parquet"))
    first_shards = len(list(out.glob("part-*.parquet")))

    pattern_image(600, 448).save(images / "new.png")
    second = CliRunner().invoke(app, ["run", str(path)])
    assert second.exit_code == 0, second.output
    assert "1 of 5 objects are new or changed" in second.output
    assert f"{first_shards} shard(s) committed by earlier runs are not read again" in second.output
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert (success["rows_in"], success["rows_out"], success["files"]) == (5, 5, first_shards + 1)

    copied = sorted(out.glob("part-*.parquet"))[0]
    shutil.copy(copied, out / "part-copied.parquet")
    twice = len(output_rows(out)) - 5
    pattern_image(640, 448).save(images / "newer.png")
    third = CliRunner().invoke(app, ["run", str(path)])
    assert third.exit_code == 0, third.output
    said = " ".join(third.output.split())
    assert "every shard is counted and checked" in said and f"removed {twice} duplicate row(s)" in said, said
    rows = output_rows(out)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    shards, index = list(out.glob("part-*.parquet")), list((out / "_index").glob("*/*.parquet"))
    assert len(shards) >= 3 and len(index) == 1  # the whole index written anew: every shard in one file


def test_the_state_checked_in_each_listing_task_or_by_a_hash_join_finds_the_same_objects(ray_local, tmp_path,
                                                                                         monkeypatch):
    """new_objects: a small state is put in the object store and checked by every listing task; a large one goes
    through Ray Data's hash join. Both keep exactly the objects new or changed since the state was written."""
    import pyarrow as pa
    import ray

    from pipeline.run import sources

    folder = OutputFolder(str(tmp_path / "out"))
    uris = [f"s3://b/{i}.jpg" for i in range(10)]
    folder.state.write_part("run1", pa.table({"uri": uris[:4], "version": ["v1"] * 4}))
    folder.state.write_part("run2", pa.table({"uri": uris[4:6], "version": ["v1"] * 2}))
    listing = ray.data.from_arrow([pa.table({"uri": uris[:5], "version": ["v1", "v2", "v1", "v1", "v1"]}),
                                   pa.table({"uri": uris[5:], "version": ["v1"] * 5})]).materialize()
    found = {}
    for rows in (sources.BROADCAST_ROWS, 0):
        monkeypatch.setattr(sources, "BROADCAST_ROWS", rows)
        table = pa.concat_tables(ray.get(sources.new_objects(folder, listing).to_arrow_refs()))
        found[rows] = sorted(zip(table.column("uri").to_pylist(), table.column("version").to_pylist()))
    assert found[0] == found[sources.BROADCAST_ROWS] == [(uris[1], "v2"), *[(u, "v1") for u in uris[6:]]]
