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
