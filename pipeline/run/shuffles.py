"""How the run's shuffles are sized, and totals over a dataset without one.

A hash shuffle (a groupby, a join) runs one aggregator actor per partition, each a worker process of its own that
starts on every call: seconds of fixed cost per partition. Partitions are therefore sized by the rows shuffled
(ROWS_PER_PARTITION each) where the run knows them, not by the cluster: a job of a few thousand rows shuffles through
one, a nightly run into a 100M-row output through as many as the cluster holds.

Ray Data's global aggregates (`Dataset.sum`, `aggregate(Sum(...))` with no key) run through a hash-shuffle operator
whose aggregator is an actor: a fresh worker process on every call, seconds of fixed cost each. A run computes
several totals, so here each block is reduced to one row of sums by a task (workers are reused), and those rows are
added up as they stream in: the driver holds one row at a time, whatever the dataset's size.

A shuffle of one partition (a job of up to ROWS_PER_PARTITION rows) gathers every row in one aggregator anyway:
`in_one_task` does the same work in one Ray task instead (a reused worker), without the actor's start — ~4 s of
each id check on 2 CPUs, twice a run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig

ROWS_PER_PARTITION = 1_000_000  # ids of ~50 bytes: ~50 MB a partition, well inside an aggregator's memory
MAX_PARTITIONS = 128
SHARD_ROWS_GUESS = JobConfig.model_fields["rows_per_shard"].default  # where the job is not at hand


def partitions_for(rows: int | None = None) -> int:
    """Hash partitions for a shuffle of about `rows` rows: one per ROWS_PER_PARTITION, at most two per CPU of the
    cluster (and MAX_PARTITIONS); unknown `rows`: two per CPU. At least 1."""
    import ray

    most = max(1, min(MAX_PARTITIONS, 2 * int(ray.cluster_resources().get("CPU", 1))))
    if rows is None:
        return most
    return max(1, min(most, -(-rows // ROWS_PER_PARTITION)))


def known_rows(ds: Any) -> int | None:
    """The rows of a dataset when they are known without running it (a materialized one), else None."""
    from ray.data.dataset import MaterializedDataset

    return ds.count() if isinstance(ds, MaterializedDataset) else None


def shard_rows(files: Sequence[Any], rows_per_shard: int = SHARD_ROWS_GUESS) -> int:
    """About how many rows output shards hold (a shard holds rows_per_shard, give or take a batch)."""
    return len(files) * rows_per_shard


def block_sums(batch: pa.Table, names: Sequence[str]) -> pa.Table:
    """One row: each column of `names` summed over the block (0 where absent, empty or null)."""
    sums = {}
    for n in names:
        total = pc.sum(batch.column(n)).as_py() if n in batch.column_names and batch.num_rows else None
        sums[n] = pa.array([int(total or 0)], pa.int64())
    return pa.table(sums)


def column_sums(ds: Any, names: Sequence[str]) -> dict[str, int]:
    """Each column of `names` summed over the dataset `ds` (which runs, side effects included, exactly once)."""
    totals = dict.fromkeys(names, 0)
    parts = ds.map_batches(block_sums, fn_kwargs={"names": list(names)}, batch_format="pyarrow", batch_size=None)
    for part in parts.iter_batches(batch_size=None, batch_format="pyarrow"):
        for n in names:
            totals[n] += int(pc.sum(part.column(n)).as_py() or 0) if part.num_rows else 0
    return totals


def _apply(fn: Callable[[pa.Table], pa.Table], schema: pa.Schema, *blocks: pa.Table) -> pa.Table:
    rows = [b for b in blocks if b.num_rows]  # an empty block may have no columns at all (nothing new tonight)
    return fn(pa.concat_tables(rows, promote_options="default") if rows else schema.empty_table())


def one_table(ds: Any, fn: Callable[[pa.Table], pa.Table], schema: pa.Schema) -> Any:
    """A reference to `fn` over all of `ds` (its blocks with rows concatenated; `schema`'s empty table if none has
    any), computed in one Ray task: the driver holds the blocks' references only."""
    import ray

    return ray.remote(_apply).remote(fn, schema, *ds.to_arrow_refs())


def unchanged(table: pa.Table) -> pa.Table:
    """`one_table`'s fn where the rows are wanted as they are."""
    return table


def in_one_task(ds: Any, fn: Callable[[pa.Table], pa.Table], schema: pa.Schema) -> Any:
    """`one_table` as a materialized dataset: a one-partition shuffle's work without its aggregator actor."""
    import ray

    return ray.data.from_arrow_refs([one_table(ds, fn, schema)])


def _lists(table: pa.Table, key: str, lists: dict[str, str]) -> pa.Table:
    grouped = table.group_by(key).aggregate([(column, "list") for column in lists])
    return pa.table({key: grouped.column(key),
                     **{alias: grouped.column(f"{column}_list") for column, alias in lists.items()}})


def lists_by(ds: Any, key: str, lists: dict[str, str], partitions: int) -> Any:
    """Rows grouped by the string column `key`, each string column of `lists` gathered as a list named by its value:
    in one task at one partition, else Ray Data's hash group-by."""
    from functools import partial

    from ray.data.aggregate import AsList

    if partitions == 1:
        schema = pa.schema([(key, pa.string()), *[(column, pa.string()) for column in lists]])
        return in_one_task(ds, partial(_lists, key=key, lists=lists), schema)
    return ds.groupby(key, num_partitions=partitions).aggregate(
        *[AsList(column, alias_name=alias) for column, alias in lists.items()])
