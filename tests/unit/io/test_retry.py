"""Rows waiting for a retry: the write stage sets them aside, a shard is rewritten without rows copied out of it
(safe to repeat after a crash at any step), and each id stays once in the output."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import parse_job
from pipeline.io.passed import passed_name
from pipeline.io.retry import (FROM, clear_pending, pending_files, pending_rewrites, pending_url, source_shard,
                               supersede, write_pending)
from pipeline.io.shards import shard_name, write_shard
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
    stats = WriteShards(job)(batch).to_pylist()[0]
    assert (stats["rows"], stats["deferred"]) == (3, 1)
    assert ids_under(tmp_path) == ["a", "c"]  # c's type is not retried
    aside = pq.read_table(next((tmp_path / "_retry" / "attempt-2").glob("*.parquet")))
    assert aside.column("id").to_pylist() == ["b"] and aside.column("attempt").to_pylist() == [1]
    written = pq.read_table(tmp_path / stats["file"])
    assert written.column("attempt").to_pylist() == [1, 1] and written.column("degraded").to_pylist() == [None, None]

    last = tmp_path / "last"  # the last rung: a failure is final, and the row says which settings wrote it
    job = parse_job({**BASE, "output": str(last), "retry": LADDER})
    stats = WriteShards(job, attempt=2)(batch).to_pylist()[0]
    assert stats["deferred"] == 0 and ids_under(last) == ["a", "b", "c"]
    written = pq.read_table(last / stats["file"])
    assert set(written.column("attempt").to_pylist()) == {2}
    assert json.loads(written.column("degraded")[0].as_py()) == {"tiling.max_tiles": 2}


def test_without_a_retry_section_error_rows_stay_in_the_output(tmp_path):
    job = parse_job({**BASE, "output": str(tmp_path)})
    stats = WriteShards(job)(rows_with_errors(["a", "b"], {"b": "too_long"})).to_pylist()[0]
    assert stats["deferred"] == 0 and ids_under(tmp_path) == ["a", "b"] and not (tmp_path / "_retry").exists()


def test_supersede_rewrites_a_shard_without_the_rows_copied_aside_and_can_be_repeated_after_a_crash(tmp_path):
    out, passed = tmp_path / "out", tmp_path / "passed"
    table = rows_with_errors(["a", "b", "c"], {"b": "too_long"})
    shard = write_shard(table, str(out))
    write_shard(table.filter(pc.equal(table.column("status"), "ok")).select(["id", "uri"]), str(passed),
                name=passed_name(shard))
    write_pending(table.filter(pc.equal(table.column("id"), "b")), str(out), 2, name=FROM + shard)
    assert pending_rewrites(str(out)) == {shard: [pending_files(str(out))[2][0]]}
    assert source_shard(pending_files(str(out))[2][0]) == shard

    # the crash: the new shard (and its passed shard) written, the old ones not yet deleted
    kept = table.filter(pc.not_equal(table.column("id"), "b"))
    new = shard_name(["a", "c"])
    write_shard(pq.read_table(passed / passed_name(shard)), str(passed), name=passed_name(new))
    write_shard(kept, str(out), name=new)
    assert ids_under(out) == ["a", "a", "b", "c", "c"]

    assert supersede(str(out), shard, ["b"], output_passed=str(passed)) == new  # what the next run does
    assert ids_under(out) == ["a", "c"] and pending_rewrites(str(out)) == {}
    assert [p.name for p in passed.glob("*.parquet")] == [passed_name(new)]
    assert pq.read_table(passed / passed_name(new)).column("id").to_pylist() == ["a", "c"]
    assert supersede(str(out), shard, ["b"], output_passed=str(passed)) is None  # done: nothing left to do


def test_a_pass_clears_its_folder_and_the_last_one_leaves_no_retry_folder(tmp_path):
    out = str(tmp_path)
    rows = rows_with_errors(["a", "b"], {"a": "too_long", "b": "too_long"})
    write_pending(rows.slice(0, 1), out, 2)
    write_pending(rows.slice(1, 1), out, 3)
    assert list(pending_files(out)) == [2, 3] and pending_url(out, 2).endswith("/_retry/attempt-2")
    clear_pending(out, 2)
    assert list(pending_files(out)) == [3]
    clear_pending(out, 3)
    assert pending_files(out) == {} and not (tmp_path / "_retry").exists()
