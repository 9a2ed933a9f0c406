"""Shuffles sized by their rows, and totals summed block by block (pipeline/run/shuffles.py)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import ray

from pipeline.run import shuffles


@pytest.fixture
def cpus(monkeypatch):
    def set_cpus(n: int) -> None:
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(n)})
    return set_cpus


def test_partitions_follow_the_rows_up_to_two_per_cpu(cpus):
    cpus(4)
    assert shuffles.partitions_for(0) == 1
    assert shuffles.partitions_for(5) == 1  # a small job: one aggregator actor, not eight
    assert shuffles.partitions_for(shuffles.ROWS_PER_PARTITION + 1) == 2
    assert shuffles.partitions_for(10**9) == 8
    assert shuffles.partitions_for(None) == 8  # unknown: two per CPU, as before
    cpus(1000)
    assert shuffles.partitions_for(10**9) == shuffles.MAX_PARTITIONS


def test_block_sums_one_row_whatever_the_block():
    block = pa.table({"a": pa.array([1, 2, None], pa.int64()), "b": pa.array([5, 5, 5], pa.int64())})
    assert shuffles.block_sums(block, ["a", "b", "missing"]).to_pylist() == [{"a": 3, "b": 15, "missing": 0}]
    empty = block.slice(0, 0)
    assert shuffles.block_sums(empty, ["a"]).to_pylist() == [{"a": 0}]


def test_shard_rows_guess():
    assert shuffles.shard_rows(["x", "y"], 10) == 20
    assert shuffles.shard_rows([]) == 0


def test_ids_grouped_in_one_table_count_as_the_shuffle_does():
    """group_ids (a one-partition job's id check, in one task) gives the columns and sums of the hash shuffle's
    aggregation: e and d summed, a sample's first row counted, its sample_id kept though output rows carry none."""
    from pipeline.run import ids

    expected = pa.table({"id": ["a", "b", "b"], "sample_id": ["s1", "s2", "s2"], "first": [1, 1, 0]})
    done = pa.table({"id": ["a", "a", "c"]})
    tagged = pa.concat_tables([ids.tag_expected(expected), ids.tag_done(done)])
    grouped = {r["id"]: r for r in ids.group_ids(tagged).to_pylist()}
    assert grouped == {"a": {"id": "a", "e": 1, "d": 2, "first": 1, "sample_id": "s1", "w": 0},
                       "b": {"id": "b", "e": 2, "d": 0, "first": 1, "sample_id": "s2", "w": 0},
                       "c": {"id": "c", "e": 0, "d": 1, "first": 0, "sample_id": None, "w": 0}}
    counts = ids.indicators(ids.group_ids(tagged)).to_pylist()
    assert sum(r["dup_done"] for r in counts) == 1 and sum(r["dup_expected"] for r in counts) == 1
    assert sum(r["missing"] for r in counts) == 1 and sum(r["unexpected"] for r in counts) == 1
    assert ids.group_ids(ids.ID_SCHEMA.empty_table()).num_rows == 0


def test_a_block_of_samples_keeps_those_with_rows_to_write_and_which_rows():
    """todo_samples with one partition: each block of samples is checked against one table of the missing rows,
    as the join does with several."""
    from pipeline.io.schema import TODO_COLUMN
    from pipeline.run import ids

    block = pa.table({"id": ["s1", "s2", "s3"], "uri": ["a", "b", "c"]})
    missing = pa.table({"id": ["s1#q1", "s3#q0", "s3#q1"], "sample_id": ["s1", "s3", "s3"]})
    todo = ids.todo_rows(block, ids._per_sample(missing), multi_row=True)
    assert todo.column("id").to_pylist() == ["s1", "s3"] and todo.column("uri").to_pylist() == ["a", "c"]
    assert [sorted(ids_) for ids_ in todo.column(TODO_COLUMN).to_pylist()] == [["s1#q1"], ["s3#q0", "s3#q1"]]
    samples = ids.todo_rows(block, missing.select(["sample_id"]), multi_row=False)
    assert samples.column_names == ["id", "uri"] and samples.column("id").to_pylist() == ["s1", "s3"]


def test_one_task_takes_blocks_without_rows_or_columns():
    """An incremental run with nothing new hands the id check empty blocks that have no columns at all."""
    from pipeline.run import ids

    empty = pa.table({})
    assert shuffles._apply(ids.group_ids, ids.ID_SCHEMA, empty, empty).num_rows == 0
    block = ids.tag_done(pa.table({"id": ["a"]}))
    assert shuffles._apply(ids.group_ids, ids.ID_SCHEMA, empty, block).column("id").to_pylist() == ["a"]


def test_lists_by_key_in_one_table_as_the_group_by_gathers_them():
    rows = pa.table({"shard": ["b", "a", "b"], "id": ["1", "2", "3"], "staged": ["x", "y", "z"]})
    grouped = shuffles._lists(rows, "shard", {"id": "ids", "staged": "staged"})
    assert sorted(grouped.to_pylist(), key=lambda r: r["shard"]) == [
        {"shard": "a", "ids": ["2"], "staged": ["y"]}, {"shard": "b", "ids": ["1", "3"], "staged": ["x", "z"]}]
    assert shuffles._lists(rows.slice(0, 0), "shard", {"id": "ids"}).num_rows == 0
