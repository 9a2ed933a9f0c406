"""Nightly runs that cost what is new: the shard index of an incremental output.

Each successful incremental run records the shards it committed (`_index/<run>/`: name, size, totals; io/output/
state.py). The next run trusts that record for every shard still there with the same size: an incremental run's
new objects have ids (uri@version) that no committed shard can hold, so the plan reads the ids of the shards added
since the last success only (a crashed run's, to resume it), and the end-of-run check counts and checks those
shards, adding the committed totals. Every id exactly once still holds: the new shards' ids are checked against the
run's expected rows, and anything unusual (an indexed shard missing, rewritten or listed twice; a new shard holding
ids the run did not expect) sends the run to the full accounting over every shard, which then writes a whole new
index. The driver holds the listing of shard names and sizes, never rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.io.output import OutputFolder
from pipeline.io.output.layout import basename
from pipeline.io.output.state import COMPACT_AFTER
from pipeline.run.sources import read_own_files
from pipeline.run.shuffles import column_sums
from pipeline.run.totals import INDEX_KEYS

INDEX_ROWS_PER_FILE = 100_000  # shards one index file lists (a row each, ~100 bytes)


@dataclass(frozen=True)
class Committed:
    """What earlier successful runs committed, still there unchanged: shard names and their summed totals."""

    shards: frozenset[str]
    sums: dict[str, int]

    @property
    def rows(self) -> int:
        return self.sums.get("rows", 0)

    def added(self, listing: dict[str, int]) -> list[str]:
        """The shards of a listing ({url: size}) that are not committed: those added since the last success."""
        return [u for u in listing if basename(u) not in self.shards]


def read_committed(folder: OutputFolder, listing: dict[str, int], names: list[str]) -> Committed | None:
    """The output's committed shards, if its index holds for the listing ({url: size}) and has the totals `names`;
    None: no index, or it does not hold (the full accounting runs)."""
    import ray

    files = [f for part in folder.state.index().values() for f in part]
    if not files:
        return None
    try:
        index = read_own_files(files, folder.storage).materialize()
        if not set(names) | set(INDEX_KEYS) <= set(index.schema().names):
            return None  # written for other columns (another version's error types)
        keys = [t for t in ray.get(index.select_columns(list(INDEX_KEYS)).to_arrow_refs()) if t.num_rows]
    except (OSError, ValueError, pa.ArrowException):
        return None
    table = pa.concat_tables(keys) if keys else pa.table({"shard": pa.array([], pa.string()), "size": pa.array([], pa.int64())})
    sizes = {basename(u): size for u, size in listing.items()}
    shards = table.column("shard").to_pylist()
    if len(set(shards)) != len(shards) or any(sizes.get(s) != n for s, n in zip(shards, table.column("size").to_pylist())):
        return None  # listed twice (a compaction cut short), or missing / rewritten since
    return Committed(frozenset(shards), column_sums(index, names) if shards else {})


def _write_part(batch: pa.Table, folder: OutputFolder, stamp: str) -> pa.Table:
    """Ray task body: one block of the shard index written through the folder (fenced)."""
    if batch.num_rows:
        folder.state.write_index_part(stamp, batch)
    return pa.table({"rows": pa.array([batch.num_rows], pa.int64())})


def write_index(folder: OutputFolder, per_shard: Any, stamp: str, *, whole: bool) -> None:
    """Record the shards this run committed (`per_shard`: their index rows, one block per shard read) in files of
    up to INDEX_ROWS_PER_FILE rows: the next run reads a file per task, and a file per shard made reading the index
    of a 1M-row output 16 s of task overhead. `whole`: the rows cover every shard of the output, so earlier index
    folders are removed after; otherwise they are compacted into one now and then."""
    before = list(folder.state.index())
    if per_shard is not None:
        per_shard = per_shard.materialize()  # the compaction's read; a run's rows are already materialized
        files = max(1, -(-per_shard.count() // INDEX_ROWS_PER_FILE))
        per_shard.repartition(files).map_batches(_write_part, fn_kwargs={"folder": folder, "stamp": stamp},
                                                 batch_format="pyarrow", batch_size=None).materialize()
    if whole:
        folder.state.remove_folders(before)
    elif len(before) + 1 > COMPACT_AFTER:
        merged = [f for part in folder.state.index().values() for f in part]
        write_index(folder, read_own_files(merged, folder.storage), f"{stamp}-compacted", whole=True)
