"""Write stage: each batch of output rows becomes one Parquet shard (named from its ids); one stats row back.

A resumed sample whose rows are partly written carries, in its input row, the ids of the rows still missing
(`TODO_COLUMN`): only those are written, so no row is written twice and no global list reaches the writers.

A score job with `output_passed` also writes the passing rows, with only their input columns, as a shard of the
same name there: a manifest ready for the next stage.

Every row records which try wrote it (`attempt`, 1 = the first), the retry rung's overrides (`degraded`, JSON;
null on a first try) and the id of the settings that made it (`settings`). With a `retry` section, an error row of a retryable type that has a rung left goes to the
output's `_retry/` folder instead (`pipeline/io/output/pending.py`), to be tried again by the run's next pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig, max_attempt, rung_overrides
from pipeline.io.inputs import input_kind
from pipeline.io.output import OutputFolder
from pipeline.io.output.pending import retryable
from pipeline.io.output.staged import INPUT_COLUMNS_KEY
from pipeline.io.schema import DUPLICATE_OF, OUTPUT_SCHEMA, TODO_COLUMN, WRITE_FIELDS, Totals
from pipeline.io.webdataset import typed_text_columns
from pipeline.stages.base import Columns, require_columns
from pipeline.stages.model_stage import BATCH_COLUMN, BATCH_TYPE


@dataclass
class ShardStats(Totals):
    """What one write did: the shard's name (empty if nothing was left to write), its totals, the model batches."""

    file: str = ""
    deferred: int = 0  # error rows put aside for the next retry pass (in `rows`, not in the output yet)
    batches: list[dict[str, Any]] = field(default_factory=list)  # replica, ready, start, end

    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist([asdict(self)], schema=SHARD_STATS_SCHEMA)

    @classmethod
    def from_row(cls, row: Any) -> ShardStats:
        """From a row of the stats table as Ray Data yields it (a map column may arrive as pairs)."""
        errors = row["errors"]
        return cls(file=row["file"], rows=int(row["rows"]), deferred=int(row["deferred"] or 0), ok=int(row["ok"]),
                   errors={str(k): int(v) for k, v in (errors.items() if isinstance(errors, dict) else errors or [])},
                   tiles=int(row["tiles"]), input_tokens=int(row["input_tokens"]),
                   generated_tokens=int(row["generated_tokens"]), batches=[dict(b) for b in row["batches"] or []])


SHARD_STATS_SCHEMA = pa.schema([
    ("file", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()), ("errors", pa.map_(pa.string(), pa.int64())),
    ("tiles", pa.int64()), ("input_tokens", pa.int64()), ("generated_tokens", pa.int64()),
    ("batches", pa.list_(BATCH_TYPE)), ("deferred", pa.int64()),
])


class WriteShards:
    """Reads the output columns; writes them, skipping rows a resumed run finds already written."""

    def __init__(self, job: JobConfig, folder: OutputFolder, input_columns: list[str] | None = None, *,
                 attempt: int = 1, settings_id: str | None = None, staged: bool = False) -> None:
        self.job = job
        self.folder = folder
        self.settings_id = settings_id
        self.staged = staged  # an update: every row waits in _update/ until it is placed (run/update.py)
        self.input_columns = [c for c in input_columns or ["id", "uri"] if c != TODO_COLUMN]
        self.attempt = attempt
        overrides = rung_overrides(job.retry, attempt)
        self.degraded = json.dumps(overrides, sort_keys=True) if overrides else None
        # error types put aside for another try: only while the ladder has a rung left (an update does not retry)
        self.retry_errors = job.retry.errors if job.retry and attempt < max_attempt(job.retry) and not staged else []
        self.shards_input = input_kind(job.input, job.input_format) == "webdataset"  # its text columns have a type

    @staticmethod
    def columns(job: JobConfig) -> Columns:
        """Reads the output columns; hands on one stats row per shard, nothing of its input."""
        return Columns(reads=tuple(OUTPUT_SCHEMA.names), adds=tuple(SHARD_STATS_SCHEMA.names), keeps_input=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch.column_names, "write", OUTPUT_SCHEMA.names)
        batches: list[dict[str, Any]] = []
        if BATCH_COLUMN in batch.column_names:
            batches = [b for b in batch.column(BATCH_COLUMN).to_pylist() if b is not None]
            batch = batch.drop_columns([BATCH_COLUMN])
        if self.shards_input:
            batch = typed_text_columns(batch)
        if TODO_COLUMN in batch.column_names:  # a resumed sample: only the rows its input row says are missing
            todo = batch.column(TODO_COLUMN).to_pylist()
            keep = [t is None or i in t for i, t in zip(batch.column("id").to_pylist(), todo)]
            batch = batch.drop_columns([TODO_COLUMN]).filter(pa.array(keep, pa.bool_()))
        n = batch.num_rows
        for f, value in zip(WRITE_FIELDS, (self.attempt, self.degraded, self.settings_id)):
            batch = batch.append_column(f, pa.array([value] * n, f.type))
        if self.job.dedup != "none" and DUPLICATE_OF not in batch.column_names:  # computed here: a duplicate of none
            batch = batch.append_column(DUPLICATE_OF, pa.nulls(n, pa.string()))
        stats = ShardStats.count(batch, batches=batches)
        if batch.num_rows == 0:
            return stats.to_table()
        if self.staged:  # which columns are the input's: the passed subset's rows are made when they are placed
            meta = {INPUT_COLUMNS_KEY: json.dumps(self.input_columns)}
            stats.file = self.folder.staged.write(batch.replace_schema_metadata(meta))
            return stats.to_table()
        if self.retry_errors:
            again = retryable(batch, self.retry_errors)
            if pc.any(again).as_py():
                aside = batch.filter(again)
                self.folder.pending.write(aside, self.attempt + 1)
                stats.deferred = aside.num_rows
                batch = batch.filter(pc.invert(again))
                if batch.num_rows == 0:
                    return stats.to_table()
        stats.file = self.publish(batch)
        return stats.to_table()

    def publish(self, batch: pa.Table) -> str:
        """Write finished rows as one shard (and, with `output_passed`, their passing rows there); its name."""
        passed = None
        if self.job.output_passed:  # the passing rows, with their input columns: a manifest for the next stage
            passed = batch.filter(pc.fill_null(batch.column("passed"), False))
            passed = passed.select([c for c in self.input_columns if c in passed.column_names])
        return self.folder.write_shard(batch, passed)
