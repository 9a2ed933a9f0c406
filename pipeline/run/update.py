"""Changed settings re-run in place (`--update`), as Ray Data work.

A run with `update` takes the output's rows whose `settings` id is not one of the job's (its own settings, or a
retry rung's) as rows still to do. Everything it makes waits in `_update/` (io/output/staged.py) until it is
placed: an `ok` row replaces the old row of its id inside that row's shard (the shard rewritten whole under the
same name, its passed rows with it); a failed row leaves the old row where it is (nothing is lost; the next update
tries it again); a row the output did not have yet joins a new shard named from its ids. Placing is the same write
when repeated, so a run that dies midway leaves every id once (old or new) and the next run finishes the placing
before it plans. The driver holds counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JobConfig, max_attempt, rung_job
from pipeline.config.fingerprint import Resolved, settings, settings_id
from pipeline.io.output import OutputFolder
from pipeline.io.output.staged import INPUT_COLUMNS_KEY
from pipeline.io.storage import get_filesystem
from pipeline.run.retry import crash_point
from pipeline.run.sources import LIST_CPUS, POSITION_COLUMN, SHARD_COLUMN, read_shards
from pipeline.run.shuffles import column_sums, lists_by, one_table, partitions_for, shard_rows, unchanged

STAGED_COLUMN = "__staged"  # the staged file a row waits in


@dataclass
class Placed:
    """What placing an update's rows did."""

    replaced: int = 0  # old rows replaced by their new row
    kept: int = 0  # old rows kept because their new row failed
    added: int = 0  # rows the output did not hold before

    def add(self, other: Placed) -> None:
        self.replaced, self.kept, self.added = self.replaced + other.replaced, self.kept + other.kept, self.added + other.added

    def describe(self) -> str:
        failed = f"; {self.kept} kept their old row (their new row failed)" if self.kept else ""
        return f"update: {self.replaced} row(s) replaced in place, {self.added} added{failed}"


def current_settings(job: JobConfig, resolved: Resolved) -> list[str]:
    """The settings ids rows of this job may carry: its own, and each retry rung's."""
    return sorted({settings_id(settings(rung_job(job, a), resolved)) for a in range(1, max_attempt(job.retry) + 1)})


def _read(folder: OutputFolder, name: str, ids: list[str]) -> tuple[pa.Table, list[str]]:
    """The rows of these ids in one staged file (a name), and which of its columns came from the input."""
    fs, path = get_filesystem(f"{folder.staged.url}/{name}", folder.storage)
    table = pq.read_table(path, filesystem=fs)
    columns = json.loads((table.schema.metadata or {}).get(INPUT_COLUMNS_KEY, b'["id", "uri"]'))
    rows = table.filter(pc.is_in(table.column("id"), value_set=pa.array(ids, pa.string())))
    return rows.replace_schema_metadata(None), columns


def _passed(rows: pa.Table, input_columns: list[str]) -> pa.Table | None:
    """The passing rows with their input columns (the passed subset's rows), for a score job with a filter."""
    if "passed" not in rows.column_names:
        return None
    kept = rows.filter(pc.fill_null(rows.column("passed"), False))
    return kept.select([c for c in input_columns if c in kept.column_names])


def _replace(batch: dict[str, Any], folder: OutputFolder) -> pa.Table:
    """Ray task body: in each output shard of the batch, the old rows of the given ids replaced by their staged rows."""
    replaced = 0
    for shard, ids, staged in zip(batch[SHARD_COLUMN], batch["ids"], batch["staged"]):
        ids = [str(i) for i in ids]
        old = folder.read_shard(str(shard))
        parts = [_read(folder, str(f), ids) for f in sorted(set(staged))]
        new = pa.concat_tables([rows for rows, _ in parts], promote_options="default")
        kept = old.filter(pc.invert(pc.is_in(old.column("id"), value_set=pa.array(ids, pa.string()))))
        table = pa.concat_tables([kept, new], promote_options="default")
        folder.replace_shard(str(shard), table, _passed(table, parts[0][1]) if folder.passed_url else None)
        replaced += new.num_rows
    return pa.table({"n": pa.array([replaced], pa.int64())})


def _add(batch: dict[str, Any], folder: OutputFolder) -> pa.Table:
    """Ray task body: the staged rows the output did not hold, written as new shards (one per staged file)."""
    added = 0
    for staged, ids in zip(batch[STAGED_COLUMN], batch["ids"]):
        rows, columns = _read(folder, str(staged), [str(i) for i in ids])
        folder.write_shard(rows, _passed(rows, columns) if folder.passed_url else None)
        added += rows.num_rows
    return pa.table({"n": pa.array([added], pa.int64())})


def _sum(ds: Any) -> int:
    return column_sums(ds, ["n"])["n"] if ds is not None else 0


def place_staged(folder: OutputFolder, echo: Callable[[str], None]) -> Placed:
    """Put every row an update staged in its place (see the module docstring), then clear `_update/`. Up to one
    partition of rows (1M), each staged block finds its rows' shards in one table of the output's ids and the rows
    are grouped in one task: no shuffle, whose aggregator actors cost seconds each to start."""
    files = folder.staged.files()
    if not files:
        return Placed()
    staged = read_shards(files, folder.storage, ["id", "status"], source=True).rename_columns(
        {SHARD_COLUMN: STAGED_COLUMN}).drop_columns([POSITION_COLUMN])
    shards = folder.shards()
    partitions = partitions_for(shard_rows(files) + shard_rows(shards))
    if shards:
        where = read_shards(shards, folder.storage, ["id"], source=True).drop_columns([POSITION_COLUMN])
        if partitions == 1:
            table = one_table(where, unchanged, WHERE_SCHEMA)
            staged = staged.map_batches(_locate, fn_kwargs={"where": table}, batch_format="pyarrow", batch_size=None)
        else:
            staged = staged.join(where, join_type="left_outer", num_partitions=partitions, on=("id",))
    else:
        staged = staged.map_batches(lambda b: b.append_column(SHARD_COLUMN, pa.nulls(b.num_rows, pa.string())),
                                    batch_format="pyarrow", batch_size=None)
    staged = staged.materialize()

    def where(rule: Callable[[pa.Table], pa.Array]) -> Any:
        return staged.map_batches(lambda b: b.filter(rule(b)), batch_format="pyarrow", batch_size=None)

    in_output = lambda b: pc.is_valid(b.column(SHARD_COLUMN))  # noqa: E731
    ok = lambda b: pc.equal(pc.fill_null(b.column("status"), ""), "ok")  # noqa: E731
    kept = where(lambda b: pc.and_(in_output(b), pc.invert(ok(b)))).count()
    tasks = {"fn_kwargs": {"folder": folder}, "batch_size": 1, "batch_format": "numpy",
             "num_cpus": LIST_CPUS}
    replacing = lists_by(where(lambda b: pc.and_(in_output(b), ok(b))), SHARD_COLUMN,
                         {"id": "ids", STAGED_COLUMN: "staged"}, partitions)
    replaced = _sum(replacing.map_batches(_replace, **tasks))
    crash_point("update-replaced")
    adding = lists_by(where(lambda b: pc.invert(in_output(b))), STAGED_COLUMN, {"id": "ids"}, partitions)
    placed = Placed(replaced=replaced, kept=kept, added=_sum(adding.map_batches(_add, **tasks)))
    folder.staged.clear()
    echo(placed.describe())
    return placed


WHERE_SCHEMA = pa.schema([("id", pa.string()), (SHARD_COLUMN, pa.string())])


def _locate(block: pa.Table, where: Any) -> pa.Table:
    """Ray task body: each staged row with the output shard its id is in (null: not in the output; a row per shard
    where the output holds the id twice, as the hash join gives), from `where` (a reference to the one table of the
    output's (id, shard))."""
    import ray

    if not block.num_rows:
        return block
    return block.join(ray.get(where), keys="id", join_type="left outer")
