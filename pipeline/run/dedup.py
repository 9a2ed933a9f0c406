"""`dedup: exact` as Ray Data work, in two phases around the streaming pipeline, which stays as it is.

1. Before it: a hash pass reads every sample's media (as the CPU stage does) and keys it (stages/dedup.media_key);
   a group-by on the key picks one representative per key (the smallest id); the plan's samples to do lose their
   duplicates, which wait (their input rows only) for phase 2.
2. After it (and its retry passes): a fill pass joins the representatives' rows in the output with the duplicates
   and writes the copies through the output folder's fenced writer, so every id is written once and a resumed run
   fills a duplicate whose representative an earlier run computed without the model.

The hash pass covers all of the job's samples, not only those left to do, so a resumed run picks the same
representatives as the first and knows which of them are done. The driver holds counts only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JobConfig
from pipeline.io.output import OutputFolder
from pipeline.io.storage import get_filesystem
from pipeline.io.webdataset import WDS_COLUMN
from pipeline.run.plan import RunPlan
from pipeline.run.resources import PREPROCESS_CPUS, WRITE_CPUS
from pipeline.run.shuffles import one_table, partitions_for, shard_rows
from pipeline.run.sources import read_shards
from pipeline.run.summary import RunTally
from pipeline.stages.dedup import (
    DUP_PREFIX,
    KEY_COLUMN,
    KEY_SCHEMA,
    REP_COLUMN,
    MediaHash,
    choose_representatives,
    duplicate_rows,
    prefixed,
)
from pipeline.stages.write import ShardStats, WriteShards

HASH_BATCH = 16  # samples per hash call: the media of a batch is read, hashed and dropped before the next


@dataclass
class Duplicates:
    """What the hash pass found: how many of the job's samples are duplicates, and those still to fill (their input
    rows with REP_COLUMN, carried media dropped; a dataset)."""

    found: int
    todo: Any
    todo_samples: int
    filled_rows: int = 0
    filled_samples: int = 0

    def summary_fields(self, tally: RunTally) -> dict[str, Any]:
        """`_SUCCESS.json`'s dedup figures: duplicates found, rows copied, and the model time they saved (copied
        samples x this run's model busy seconds per computed sample; None when this run computed none)."""
        _, usage = tally.replica_usage()
        busy, samples = sum(u["busy_s"] for u in usage.values()), sum(u["samples"] for u in usage.values())
        saved = round(self.filled_samples * busy / samples, 3) if samples else None
        return {"duplicates_found": self.found, "rows_copied": self.filled_rows, "model_s_saved": saved}


def _hash_block(block: dict, job: JobConfig) -> pa.Table:
    """Ray task body of the hash pass: (id, key) for a block of samples."""
    return MediaHash(job)(block)


def carried_columns(job: JobConfig) -> list[str]:
    """Input columns that carry media bytes (never written out, not kept while duplicates wait)."""
    return [WDS_COLUMN] + ([job.image_column] if job.image_column else [])


def split_duplicates(job: JobConfig, plan: RunPlan, echo: Callable[[str], None]) -> Duplicates:
    """Phase 1: key every sample, choose representatives, and take the duplicates out of `plan.todo` (which the
    model stage then sees without them); the duplicates left to fill are returned. Up to one partition of samples
    (1M), the representatives are chosen in one task and each block of samples is checked against them: no shuffle,
    whose aggregator actors cost seconds each to start."""
    import ray

    partitions = partitions_for(plan.samples)
    keys = plan.inputs.samples.map_batches(_hash_block, fn_kwargs={"job": job}, batch_size=HASH_BATCH,
                                           batch_format="numpy", num_cpus=PREPROCESS_CPUS)
    names = plan.todo.schema().names
    drop = [c for c in carried_columns(job) if c in names]
    waiting = plan.todo.drop_columns(drop) if drop else plan.todo
    if partitions == 1:
        table = one_table(keys, choose_representatives, KEY_SCHEMA)
        dups = ray.data.from_arrow_refs([table])
        each = {"fn_kwargs": {"dups": table}, "batch_format": "pyarrow", "batch_size": None}
        todo = waiting.map_batches(_with_representative, **each).materialize()
        plan.todo = plan.todo.map_batches(_not_duplicate, **each)
    else:
        dups = keys.groupby(KEY_COLUMN, num_partitions=partitions).map_groups(choose_representatives,
                                                                               batch_format="pyarrow").materialize()
        todo = waiting.join(dups, join_type="inner", num_partitions=partitions, on=("id",)).materialize()
        plan.todo = plan.todo.join(dups.select_columns(["id"]), join_type="left_anti", num_partitions=partitions,
                                   on=("id",))
    found, todo_samples = dups.count(), todo.count()
    plan.samples_todo -= todo_samples
    echo(f"dedup: {found} of {plan.samples} samples are duplicates of another (same media bytes and questions); "
         f"{plan.samples_todo} sample(s) go to the model, {todo_samples} duplicate(s) copy their rows after it")
    return Duplicates(found=found, todo=todo, todo_samples=todo_samples)


def _with_representative(block: pa.Table, dups: Any) -> pa.Table:
    """Ray task body: the block's samples that are duplicates, each with its REP_COLUMN (`dups`: a reference to the
    one table of (id, REP_COLUMN), read zero-copy from the object store)."""
    import ray

    if not block.num_rows:
        return block
    table = ray.get(dups)
    at = pc.index_in(block.column("id"), value_set=table.column("id"))
    found = pc.is_valid(at)
    return block.filter(found).append_column(REP_COLUMN, table.column(REP_COLUMN).take(at.filter(found)))


def _not_duplicate(block: pa.Table, dups: Any) -> pa.Table:
    """Ray task body: the block's samples that are no duplicate (representatives and unique samples)."""
    import ray

    if not block.num_rows:
        return block
    return block.filter(pc.is_null(pc.index_in(block.column("id"), value_set=ray.get(dups).column("id"))))


def _copy_block(joined: pa.Table, carried: frozenset[str], writer: WriteShards) -> pa.Table:
    """Ray task body of the fill pass: a block of representatives' rows x their duplicates -> one shard of copies."""
    rows = duplicate_rows(joined, carried)
    stats = ShardStats.count(rows)
    if rows.num_rows:
        stats.file = writer.publish(rows)
    firsts = int(pc.sum(pc.equal(rows.column("question_index"), 0)).as_py() or 0) if rows.num_rows else 0
    return stats.to_table().append_column("samples", pa.array([firsts], pa.int64()))


def fill_duplicates(job: JobConfig, folder: OutputFolder, dups: Duplicates, echo: Callable[[str], None], *,
                    input_columns: list[str]) -> Duplicates:
    """Phase 2: the duplicates' rows, copied from their representatives' rows in the output, written as shards
    through the fenced writer. A duplicate whose representative has no row in the output is left missing (the
    accounting then names it)."""
    shards = folder.shards()
    if not dups.todo_samples or not shards:
        return dups
    fs, path = get_filesystem(shards[0], job.storage)
    columns = pq.read_schema(path, filesystem=fs).names
    rows = read_shards(shards, job.storage, columns)
    waiting = dups.todo.map_batches(prefixed, batch_format="pyarrow", batch_size=None)
    joined = rows.join(waiting, join_type="inner", num_partitions=partitions_for(shard_rows(shards, job.rows_per_shard)),
                       on=("sample_id",),
                       right_on=(DUP_PREFIX + REP_COLUMN,))
    writer = WriteShards(job, folder, input_columns)
    copied = joined.map_batches(_copy_block, batch_size=job.rows_per_shard, batch_format="pyarrow", num_cpus=WRITE_CPUS,
                                fn_kwargs={"carried": frozenset(carried_columns(job)), "writer": writer})
    for row in copied.iter_rows():
        dups.filled_rows += int(row["rows"])
        dups.filled_samples += int(row["samples"])  # by their first rows
    echo(f"dedup: {dups.filled_rows} row(s) of {dups.todo_samples} duplicate(s) copied from their representatives")
    return dups

