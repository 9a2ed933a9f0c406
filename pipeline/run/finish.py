"""After the run: read the output back, check every expected row is there exactly once, write _SUCCESS.json last."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import Criterion, JobConfig
from pipeline.errors import RunError
from pipeline.io.incremental import record_run
from pipeline.io.markers import SUCCESS_FILE
from pipeline.io.passed import check_passed
from pipeline.io.schema import Totals, column
from pipeline.io.shards import shard_files
from pipeline.io.storage import get_filesystem
from pipeline.model.scoring import histogram
from pipeline.run.plan import RunPlan
from pipeline.run.summary import RunSummary, replica_usage
from pipeline.stages.write import ShardStats


@dataclass
class OutputCounts(Totals):
    """What is really in an output, read back from every shard."""

    unique_ids: int = 0  # distinct ids among the rows: equal to rows when every row is there once
    files: int = 0  # shards
    score_histograms: dict[str, list[int]] = field(default_factory=dict)
    rows_passed: int | None = None

    def summary_fields(self) -> dict[str, Any]:
        """The RunSummary fields these counts fill."""
        return dict(rows_out=self.rows, rows_ok=self.ok, rows_error=self.rows - self.ok, errors_by_type=self.errors,
                    tiles=self.tiles, input_tokens=self.input_tokens, generated_tokens=self.generated_tokens,
                    files=self.files, score_histograms=self.score_histograms, rows_passed=self.rows_passed)


def summarize_output(output: str, options: Mapping[str, Any] | None = None, *, criteria: Sequence[Criterion] = (),
                     with_passed: bool = False) -> OutputCounts:
    """Counts read back from every shard under `output` (so the summary reports what is really there)."""
    fs, _ = get_filesystem(output, options)
    files = shard_files(output, options)
    score_cols = [column("score", c) for c in criteria]
    cols = ["id", "status", "error_type", "num_tiles", "num_input_tokens", "num_generated_tokens", *score_cols]
    cols += ["passed"] if with_passed else []
    tables = [pq.read_table(f, columns=cols, filesystem=fs) for f in files]
    if not tables:
        return OutputCounts(rows_passed=0 if with_passed else None)
    table = pa.concat_tables(tables)
    return OutputCounts.count(
        table, unique_ids=pc.count_distinct(table.column("id")).as_py(), files=len(files),
        score_histograms={(c.name or "score"): histogram(table.column(column("score", c)).to_pylist()) for c in criteria},
        rows_passed=int(pc.sum(pc.fill_null(table.column("passed"), False).cast(pa.int64())).as_py() or 0) if with_passed else None,
    )


def write_success(output: str, summary: RunSummary, options: Mapping[str, Any] | None = None) -> None:
    """Write _SUCCESS.json last: its presence means every shard is in place."""
    fs, path = get_filesystem(output, options)
    with fs.open(f"{path.rstrip('/')}/{SUCCESS_FILE}", "w") as f:
        f.write(summary.to_json())


def finish(job: JobConfig, plan: RunPlan, shards: list[ShardStats], *, started: float) -> RunSummary:
    """Account for every row of the plan, then write _SUCCESS.json (incremental: record the objects taken)."""
    criteria = job.score_criteria() if job.task == "score" else []
    counts = summarize_output(job.output, job.storage, criteria=criteria, with_passed=job.has_filter)
    busy, replicas = replica_usage([b for s in shards for b in s.batches])
    summary = RunSummary(
        rows_in=plan.rows_in, **counts.summary_fields(), wall_s=time.perf_counter() - started,
        fingerprint=job.fingerprint(), task=job.task, model=job.model, output=job.output,
        skipped_inputs=plan.listing.skipped, rows_this_run=sum(s.rows for s in shards),
        tiles_this_run=sum(s.tiles for s in shards), tokens_this_run=sum(s.generated_tokens for s in shards),
        model_busy_fraction=busy, replicas=replicas,
    )
    if counts.rows != plan.rows_in or counts.unique_ids != plan.rows_in:
        raise RunError(
            f"accounting failed: {plan.rows_in} rows expected, {counts.rows} rows in the output "
            f"({counts.unique_ids} distinct ids); _SUCCESS.json not written"
        )
    problem = check_passed(job.output, job.output_passed, counts.rows_passed or 0, job.storage) if job.output_passed else None
    if problem:
        raise RunError(f"accounting failed for output_passed: {problem}; _SUCCESS.json not written")
    if job.incremental:
        record_run(job.output, plan.taken, job.storage)
        summary.objects_taken = len(plan.taken)
    write_success(job.output, summary, job.storage)
    return summary
