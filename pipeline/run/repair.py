"""Duplicates repaired: an output where an id appears more than once keeps one row per id, as Ray Data work.

Which copy stays (KEEP_RULE) is a pure function of the rows and the shards' names, so every run and `internvl-batch
repair` decide alike: an `ok` row before an error row; among equals, the copy in the shard whose name sorts first,
then the first in that shard. Each affected shard is rewritten once, without its dropped copies, through
`OutputFolder.replace_shard` (new shard first, old deleted after): a repair cut short leaves every id at least once
and is finished by running it again. Only the copies to drop and the shards they are in are grouped; the driver gets
counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.output import OutputFolder
from pipeline.run.sources import LIST_CPUS, POSITION_COLUMN, SHARD_COLUMN, read_shards
from pipeline.run.shuffles import column_sums, partitions_for

KEEP_RULE = ("an ok row before an error row, then the copy in the shard whose name sorts first, then the first in "
             "that shard")


@dataclass
class Repair:
    """What a repair did."""

    ids: int = 0  # ids that were held more than once
    removed: int = 0  # rows removed
    shards: int = 0  # shards rewritten

    def describe(self) -> str:
        return (f"repair: {self.ids} id(s) were in the output more than once; removed {self.removed} duplicate row(s) "
                f"from {self.shards} shard(s), keeping {KEEP_RULE}")


def _to_drop(group: pa.Table) -> pa.Table:
    """All copies of one id: the copies to drop (every one but the keeper), as (shard, position)."""
    order = pc.sort_indices(pa.table({
        "error": pc.not_equal(pc.fill_null(group.column("status"), "error"), "ok"),
        "shard": group.column(SHARD_COLUMN), "position": group.column(POSITION_COLUMN)}),
        sort_keys=[("error", "ascending"), ("shard", "ascending"), ("position", "ascending")])
    return group.take(order).slice(1).select([SHARD_COLUMN, POSITION_COLUMN])


def _rewrite(batch: dict[str, Any], folder: OutputFolder) -> pa.Table:
    """Ray task body: rewrite each shard of the batch without the copies at the given positions."""
    removed = 0
    for shard, positions in zip(batch[SHARD_COLUMN], batch["positions"]):
        table = folder.read_shard(str(shard))
        keep = pc.invert(pc.is_in(pa.array(range(table.num_rows), pa.int64()),
                                  value_set=pa.array([int(p) for p in positions], pa.int64())))
        folder.replace_shard(str(shard), table.filter(keep))
        removed += len(positions)
    return pa.table({"removed": pa.array([removed], pa.int64()), "shards": pa.array([len(batch[SHARD_COLUMN])], pa.int64())})


def repair_duplicates(folder: OutputFolder) -> Repair:
    """Keep one row per id in the output (KEEP_RULE); what was done (nothing: `Repair()`)."""
    from ray.data.aggregate import AsList, Count

    files = folder.shards()
    if not files:
        return Repair()
    rows = read_shards(files, folder.storage, ["id", "status"], source=True).materialize()
    partitions = partitions_for(rows.count())
    held = rows.groupby("id", num_partitions=partitions).aggregate(Count(alias_name="n"))
    twice = held.map_batches(lambda b: b.filter(pc.greater(b.column("n"), 1)), batch_format="pyarrow",
                             batch_size=None).materialize()
    ids = twice.count()
    if not ids:
        return Repair()
    copies = rows.join(twice.select_columns(["id"]), join_type="left_semi", num_partitions=partitions, on=("id",))
    drops = copies.groupby("id").map_groups(_to_drop, batch_format="pyarrow")
    per_shard = drops.groupby(SHARD_COLUMN, num_partitions=partitions).aggregate(
        AsList(POSITION_COLUMN, alias_name="positions"))
    done = per_shard.map_batches(_rewrite, fn_kwargs={"folder": folder}, batch_size=1, batch_format="numpy",
                                 num_cpus=LIST_CPUS)
    totals = column_sums(done, ["removed", "shards"])
    return Repair(ids=ids, removed=totals["removed"], shards=totals["shards"])


def repair_output(folder: OutputFolder, echo: Callable[[str], None]) -> Repair:
    """Repair an output's duplicates and say what was done (nothing to say when there were none)."""
    done = repair_duplicates(folder)
    if done.ids:
        echo(done.describe())
    return done
