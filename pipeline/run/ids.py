"""Ids as Ray Data work: the expected output rows and the rows already written, grouped by id in one distributed
aggregation (in one Ray task for a job of one partition: run/shuffles.py). It answers, as counts, what the plan and
the end-of-run check need (duplicate inputs, rows done, rows missing, rows written twice), and gives the rows still
to write; the samples they belong to are found by a join (for one partition, each block of samples is checked
against one table of the missing rows). Nothing here collects ids on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.schema import TODO_COLUMN
from pipeline.run.shuffles import column_sums, in_one_task, one_table

ID_SCHEMA = pa.schema([("id", pa.string()), ("sample_id", pa.string()), ("e", pa.int64()), ("d", pa.int64()),
                       ("first", pa.int64()), ("w", pa.int64())])
# Per id after grouping: e (times expected), d (times in the output), first (1 for a sample's first row), sample_id,
# w (1 if a row waits for a retry pass in `_retry/`: done for the pass at hand, not in the output). The rules below
# take d as "done": the output's count, or 1 for a row that only waits (never a duplicate).
INDICATORS = {
    "rows_expected": lambda e, d: pc.greater_equal(e, 1),
    "dup_expected": lambda e, d: pc.greater(e, 1),
    "rows_done": lambda e, d: pc.and_(pc.greater_equal(e, 1), pc.greater_equal(d, 1)),
    "rows_any": lambda e, d: pc.or_(pc.greater_equal(e, 1), pc.greater_equal(d, 1)),
    "dup_done": lambda e, d: pc.greater(d, 1),
    "missing": lambda e, d: pc.and_(pc.greater_equal(e, 1), pc.equal(d, 0)),
    "unexpected": lambda e, d: pc.and_(pc.equal(e, 0), pc.greater_equal(d, 1)),
}


def read_ids(files: list[str], options: Any) -> Any:
    """The `id` column of output shards (column pruned) as a dataset."""
    from pipeline.run.sources import read_shards

    return read_shards(files, options, ["id"])


def tag_expected(batch: pa.Table) -> pa.Table:
    """Expected rows (id, sample_id, first: 1 on each sample's first row) tagged e=1."""
    n = batch.num_rows
    zeros = pa.array([0] * n, pa.int64())
    return pa.table([batch.column("id"), batch.column("sample_id"), pa.array([1] * n, pa.int64()), zeros,
                     batch.column("first").cast(pa.int64()), zeros], schema=ID_SCHEMA)


def tag_done(batch: pa.Table, waiting: bool = False) -> pa.Table:
    """Ids found in the output tagged d=1 (`waiting`: ids set aside for a retry, tagged w=1)."""
    n = batch.num_rows
    zeros, ones = pa.array([0] * n, pa.int64()), pa.array([1] * n, pa.int64())
    return pa.table([batch.column("id").cast(pa.string()), pa.nulls(n, pa.string()), zeros,
                     zeros if waiting else ones, zeros, ones if waiting else zeros], schema=ID_SCHEMA)


def done_count(batch: pa.Table) -> pa.Array:
    """The `d` the rules take: the output's count, or 1 for a row that only waits for a retry."""
    return pc.max_element_wise(batch.column("d"), batch.column("w"))


def indicators(batch: pa.Table) -> pa.Table:
    """Per grouped id, 0/1 for each count of INDICATORS, plus `samples` and `rows_out` to sum."""
    e, d = batch.column("e"), done_count(batch)
    cols = {name: rule(e, d).cast(pa.int64()) for name, rule in INDICATORS.items()}
    only_waiting = pc.and_(pc.and_(pc.greater_equal(e, 1), pc.equal(batch.column("d"), 0)), pc.greater_equal(batch.column("w"), 1))
    return pa.table({**cols, "rows_waiting": only_waiting.cast(pa.int64()), "samples": batch.column("first"),
                     "rows_out": batch.column("d")})


@dataclass
class IdCounts:
    """Totals over every id of a job and its output."""

    rows_expected: int = 0
    dup_expected: int = 0  # ids expected more than once (duplicate input ids)
    rows_done: int = 0  # expected and in the output
    rows_any: int = 0  # expected or in the output
    dup_done: int = 0  # ids the output holds more than once
    missing: int = 0  # expected, not in the output
    unexpected: int = 0  # in the output, not expected (earlier incremental runs' rows)
    rows_waiting: int = 0  # expected, not in the output, set aside for a retry pass
    samples: int = 0
    rows_out: int = 0  # rows in the output
    table: Any = None  # the grouped ids (a dataset: id, sample_id, e, d, first)


AGGREGATES = [("e", "sum"), ("d", "sum"), ("first", "sum"), ("sample_id", "max"), ("w", "max")]  # per id, both ways


def group_ids(tagged: pa.Table) -> pa.Table:
    """Tagged rows grouped by id in one table: what the hash shuffle's aggregation gives, for one partition."""
    grouped = tagged.group_by("id").aggregate(AGGREGATES)
    return grouped.rename_columns(["id", *[name for name, _ in AGGREGATES]])


def count_ids(expected: Any, done: Any | None, partitions: int, *, keep: bool = False,
              waiting: Any | None = None) -> IdCounts:
    """Group expected rows and output ids by id (one hash shuffle; one task where one partition does) and sum the
    INDICATORS; `keep`: materialize the grouped ids for a second pass (the rows left to write). `waiting`: ids set
    aside for a retry pass, done for this one but not in the output."""
    from ray.data.aggregate import Max, Sum

    tagged = expected.map_batches(tag_expected, batch_format="pyarrow", batch_size=None)
    if done is not None:
        tagged = tagged.union(done.map_batches(tag_done, batch_format="pyarrow", batch_size=None))
    if waiting is not None:
        tagged = tagged.union(waiting.map_batches(tag_done, fn_kwargs={"waiting": True}, batch_format="pyarrow",
                                                  batch_size=None))
    if partitions == 1:
        grouped = in_one_task(tagged, group_ids, ID_SCHEMA)
    else:
        ray_ops = {"sum": Sum, "max": Max}
        grouped = tagged.groupby("id", num_partitions=partitions).aggregate(
            *[ray_ops[op](name, alias_name=name) for name, op in AGGREGATES])
    if keep:
        grouped = grouped.materialize()
    names = [*INDICATORS, "rows_waiting", "samples", "rows_out"]
    totals = column_sums(grouped.map_batches(indicators, batch_format="pyarrow", batch_size=None), names)
    return IdCounts(**totals, table=grouped)


def first_where(grouped: Any, rule: str, column: str = "id") -> str | None:
    """One id (or its sample_id) for which an INDICATORS rule holds: to name it in an error."""
    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(INDICATORS[rule](batch.column("e"), done_count(batch)))

    rows = grouped.map_batches(keep, batch_format="pyarrow", batch_size=None).select_columns([column]).take(1)
    return rows[0][column] if rows else None


def first_duplicate_sample(grouped: Any) -> str | None:
    return first_where(grouped, "dup_expected", "sample_id")


def _missing_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(INDICATORS["missing"](batch.column("e"), done_count(batch))).select(["id", "sample_id"])


def _per_sample(rows: pa.Table) -> pa.Table:
    """Missing rows (id, sample_id) as one row per sample: sample_id and the ids of its missing rows."""
    grouped = rows.group_by("sample_id").aggregate([("id", "list")])
    return grouped.rename_columns(["sample_id", TODO_COLUMN])


def _sample_ids(rows: pa.Table) -> pa.Table:
    return rows.select(["sample_id"])


def todo_rows(block: pa.Table, wanted: pa.Table, multi_row: bool) -> pa.Table:
    """The samples of a block with rows still to write (`wanted`: their sample_id, and TODO_COLUMN where
    `multi_row`: then added to each sample kept)."""
    at = pc.index_in(block.column("id"), value_set=wanted.column("sample_id"))
    keep = pc.is_valid(at)
    todo = block.filter(keep)
    return todo.append_column(TODO_COLUMN, wanted.column(TODO_COLUMN).take(at.filter(keep))) if multi_row else todo


def _todo_block(block: pa.Table, wanted: Any, multi_row: bool) -> pa.Table:
    """Ray task body: todo_rows with `wanted` read (zero-copy) from the object store."""
    import ray

    return todo_rows(block, ray.get(wanted), multi_row) if block.num_rows else block


def _num_rows(table: pa.Table) -> int:
    return table.num_rows


MISSING_SCHEMA = pa.schema([("id", pa.string()), ("sample_id", pa.string())])


def todo_samples(samples: Any, grouped: Any, missing: int, partitions: int, *, multi_row: bool) -> tuple[Any, int]:
    """The samples with rows still to write (a join with the rows missing from the output), and how many.

    A sample of several rows carries the ids of its missing rows in TODO_COLUMN, so the writer skips the rest.
    With one partition (up to 1M rows) the missing rows are gathered into one table that each block of samples is
    checked against (no shuffle; the samples, which may carry pictures, stay where they are)."""
    from ray.data.aggregate import AsList

    rows = grouped.map_batches(_missing_rows, batch_format="pyarrow", batch_size=None)
    if partitions == 1:
        wanted = one_table(rows, _per_sample if multi_row else _sample_ids, MISSING_SCHEMA)
        todo = samples.map_batches(_todo_block, fn_kwargs={"wanted": wanted, "multi_row": multi_row},
                                   batch_format="pyarrow", batch_size=None)
        if not multi_row:
            return todo, missing
        import ray

        return todo, ray.get(ray.remote(_num_rows).remote(wanted))
    if not multi_row:  # one row a sample: the missing rows are the samples to do
        left = rows.select_columns(["sample_id"])
        return samples.join(left, join_type="left_semi", num_partitions=partitions, on=("id",), right_on=("sample_id",)), missing
    per_sample = rows.groupby("sample_id", num_partitions=partitions).aggregate(AsList("id", alias_name=TODO_COLUMN)).materialize()
    todo = samples.join(per_sample, join_type="inner", num_partitions=partitions, on=("id",), right_on=("sample_id",))
    return todo.drop_columns(["sample_id"]) if "sample_id" in todo.schema().names else todo, per_sample.count()
