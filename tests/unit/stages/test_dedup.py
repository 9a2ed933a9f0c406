"""dedup: exact's pure parts: the key of a sample, the choice of representatives, the copied rows, the hash of a
batch read as the CPU stage reads it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.config import parse_job
from pipeline.io.schema import DUPLICATE_OF, TODO_COLUMN
from pipeline.stages.dedup import (
    KEY_COLUMN,
    REP_COLUMN,
    MediaHash,
    choose_representatives,
    duplicate_rows,
    media_key,
    prefixed,
    row_questions,
)


def test_the_key_is_the_media_in_order_and_the_rows_questions():
    assert media_key(["a"]) == media_key(["a"], [])
    assert media_key(["a"]) != media_key(["b"])
    assert media_key(["a", "b"]) != media_key(["b", "a"])  # a multi-image sample is its pictures in order
    assert media_key(["a"], ["what?"]) != media_key(["a"], ["where?"])
    assert media_key(["a"], ["what?"]) != media_key(["a"])
    assert row_questions({"questions": np.array(["q1", "q2"], dtype=object)}) == ["q1", "q2"]
    assert row_questions({"question": "q"}) == ["q"] and row_questions({"question": None}) == []


def test_the_smallest_id_of_a_key_is_its_representative_whatever_the_order():
    keys = pa.table({"id": ["c", "a", "b", "d", "e", "f"], KEY_COLUMN: ["k1", "k1", "k1", "k2", None, None]})
    for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3]):
        dups = choose_representatives(keys.take(order))
        assert sorted(zip(dups.column("id").to_pylist(), dups.column(REP_COLUMN).to_pylist())) == [("b", "a"), ("c", "a")]
    # samples without a key (unreadable) are never duplicates, even of each other
    assert choose_representatives(keys.slice(4)).num_rows == 0


def beside(rows: pa.Table, dup: pa.Table) -> pa.Table:
    """What the fill pass's join gives: each representative's row with its duplicate's prefixed input row."""
    for name in dup.column_names:
        rows = rows.append_column(name, pa.concat_arrays([dup.column(name).combine_chunks()] * rows.num_rows))
    return rows


def test_a_duplicate_copies_its_representatives_rows_with_its_own_id_and_columns():
    rep_rows = pa.table({"id": ["a#0", "a#1"], "uri": ["s3://b/a.png"] * 2, "response": ["red", "two"],
                         "status": ["ok", "ok"], "sample_id": ["a", "a"], "question_index": pa.array([0, 1], pa.int32()),
                         "source": ["x", "x"], "attempt": pa.array([1, 1], pa.int32()),
                         DUPLICATE_OF: pa.nulls(2, pa.string())})
    dup = prefixed(pa.table({"id": ["b", "b"], "uri": ["s3://b/b.png"] * 2, "source": ["y", "y"],
                             REP_COLUMN: ["a", "a"], TODO_COLUMN: [None, ["b#1"]], "__wds": ["m", "m"]}))
    rows = duplicate_rows(beside(rep_rows, dup.slice(0, 1)), frozenset({"__wds"}))
    assert rows.column_names == rep_rows.column_names  # the representative's columns, in its order
    assert rows.sort_by("id").to_pylist() == [
        {"id": "b#0", "uri": "s3://b/b.png", "response": "red", "status": "ok", "sample_id": "b", "question_index": 0,
         "source": "y", "attempt": 1, DUPLICATE_OF: "a"},
        {"id": "b#1", "uri": "s3://b/b.png", "response": "two", "status": "ok", "sample_id": "b", "question_index": 1,
         "source": "y", "attempt": 1, DUPLICATE_OF: "a"}]
    # resumed half written: only the rows it still misses
    half = duplicate_rows(beside(rep_rows, dup.slice(1, 1)))
    assert half.column("id").to_pylist() == ["b#1"]


def test_the_hash_pass_reads_media_as_the_cpu_stage_and_keys_unreadable_samples_none(tmp_path):
    (tmp_path / "a.png").write_bytes(b"same bytes")
    (tmp_path / "b.png").write_bytes(b"same bytes")
    (tmp_path / "c.png").write_bytes(b"other bytes")
    job = parse_job({"task": "caption", "input": str(tmp_path), "output": str(tmp_path / "out"), "model": "m",
                     "dedup": "exact"})
    uris = [str(tmp_path / n) for n in ("a.png", "b.png", "c.png", "gone.png")]
    keys = MediaHash(job)({"id": np.array(["a", "b", "c", "d"], dtype=object), "uri": np.array(uris, dtype=object)})
    k = keys.column(KEY_COLUMN).to_pylist()
    assert k[0] == k[1] and k[0] != k[2] and k[3] is None
