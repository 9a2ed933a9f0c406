"""Rows waiting for a retry: the write stage sets them aside, a shard is rewritten without rows copied out of it
(safe to repeat after a crash at any step), and each id stays once in the output."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import parse_job
from pipeline.io.output import OutputFolder
from pipeline.io.output.layout import passed_name, shard_name, source_shard
from pipeline.stages.write import WriteShards
from tests.outputs import done_rows

BASE = {"task": "caption", "input": "in", "model": "m"}
LADDER = {"errors": ["too_long"], "ladder": [{"tiling.max_tiles": 2}]}


def rows_with_errors(ids: list[str], errors: dict[str, str]) -> pa.Table:
    """ok rows, except the ids in `errors` (id -> error_type)."""
    table = done_rows(ids, [f"/x/{i}.jpg" for i in ids])
    status = pa.array(["error" if i in errors else "ok" for i in ids], pa.string())
    kinds = pa.array([errors.get(i) for i in ids], pa.string())
    table = table.set_column(table.schema.get_field_index("status"), "status", status)
    return table.set_column(table.schema.get_field_index("error_type"), "error_type", kinds)


def ids_under(folder) -> list[str]:
    return sorted(i for p in folder.glob("part-*.parquet") for i in pq.read_table(p).column("id").to_pylist())


def test_the_writer_sets_retryable_error_rows_aside_while_a_rung_is_left(tmp_path):
    job = parse_job({**BASE, "output": str(tmp_path), "retry": LADDER})
    batch = rows_with_errors(["a", "b", "c"], {"b": "too_long", "c": "decode_error"})
    stats = WriteShards(job, OutputFolder(str(tmp_path)))(batch).to_pylist()[0]
    assert (stats["rows"], stats["deferred"]) == (3, 1)
    assert ids_under(tmp_path) == ["a", "c"]  # c's type is not retried
    aside = pq.read_table(next((tmp_path / "_retry" / "attempt-2").glob("*.parquet")))
    assert aside.column("id").to_pylist() == ["b"] and aside.column("attempt").to_pylist() == [1]
    written = pq.read_table(tmp_path / stats["file"])
    assert written.column("attempt").to_pylist() == [1, 1] and written.column("degraded").to_pylist() == [None, None]

    last = tmp_path / "last"  # the last rung: a failure is final, and the row says which settings wrote it
    job = parse_job({**BASE, "output": str(last), "retry": LADDER})
    stats = WriteShards(job, OutputFolder(str(last)), attempt=2)(batch).to_pylist()[0]
    assert stats["deferred"] == 0 and ids_under(last) == ["a", "b", "c"]
    written = pq.read_table(last / stats["file"])
    assert set(written.column("attempt").to_pylist()) == {2}
    assert json.loads(written.column("degraded")[0].as_py()) == {"tiling.max_tiles": 2}


def test_without_a_retry_section_error_rows_stay_in_the_output(tmp_path):
    job = parse_job({**BASE, "output": str(tmp_path)})
    stats = WriteShards(job, OutputFolder(str(tmp_path)))(rows_with_errors(["a", "b"], {"b": "too_long"})).to_pylist()[0]
    assert stats["deferred"] == 0 and ids_under(tmp_path) == ["a", "b"] and not (tmp_path / "_retry").exists()


def test_supersede_rewrites_a_shard_without_the_rows_copied_aside_and_can_be_repeated_after_a_crash(tmp_path):
    out, passed = tmp_path / "out", tmp_path / "passed"
    folder = OutputFolder(str(out), passed_url=str(passed))
    table = rows_with_errors(["a", "b", "c"], {"b": "too_long"})
    shard = folder.write_shard(table, table.filter(pc.equal(table.column("status"), "ok")).select(["id", "uri"]))
    folder.pending.write_from(table.filter(pc.equal(table.column("id"), "b")), 2, shard)
    assert folder.pending.rewrites_left() == {shard: [folder.pending.files()[2][0]]}
    assert source_shard(folder.pending.files()[2][0]) == shard

    # the crash: the new shard (and its passed shard) written, the old ones not yet deleted
    kept = table.filter(pc.not_equal(table.column("id"), "b"))
    new = shard_name(["a", "c"])
    assert folder.write_shard(kept, pq.read_table(passed / passed_name(shard))) == new
    assert ids_under(out) == ["a", "a", "b", "c", "c"]

    assert folder.pending.supersede(shard, ["b"]) == new  # what the next run does
    assert ids_under(out) == ["a", "c"] and folder.pending.rewrites_left() == {}
    assert [p.name for p in passed.glob("*.parquet")] == [passed_name(new)]
    assert pq.read_table(passed / passed_name(new)).column("id").to_pylist() == ["a", "c"]
    assert folder.pending.supersede(shard, ["b"]) is None  # done: nothing left to do


def test_a_pass_clears_its_folder_and_the_last_one_leaves_no_retry_folder(tmp_path):
    pending = OutputFolder(str(tmp_path)).pending
    rows = rows_with_errors(["a", "b"], {"a": "too_long", "b": "too_long"})
    pending.write(rows.slice(0, 1), 2)
    pending.write(rows.slice(1, 1), 3)
    assert list(pending.files()) == [2, 3] and pending.url(2).endswith("/_retry/attempt-2")
    pending.clear(2)
    assert list(pending.files()) == [3]
    pending.clear(3)
    assert pending.files() == {} and not (tmp_path / "_retry").exists()
