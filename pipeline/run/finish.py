"""After the run: account for every row with Ray Data aggregations over the output, then write _SUCCESS.json last.

Totals (rows, ok, errors by type, tiles, tokens, score histograms, passed) are summed from one small row per
block; "every expected id exactly once" is the id grouping of `pipeline/run/ids.py` over the expected rows and the
output's ids. The driver holds totals only, and names one missing and one duplicated id when the check fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Criterion, JobConfig
from pipeline.config.fingerprint import Resolved, output_fingerprint
from pipeline.errors import ErrorType, RunError
from pipeline.io.output import OutputFolder
from pipeline.io.output.pending import attempts_of
from pipeline.io.output.state import COMPACT_AFTER
from pipeline.io.schema import Totals, column
from pipeline.model.scoring import HISTOGRAM_BINS, histogram
from pipeline.run import ids
from pipeline.run.plan import RunPlan, expected_rows
from pipeline.run.repair import repair_output
from pipeline.run.update import Placed
from pipeline.run.sources import read_files, read_shards
from pipeline.run.summary import RunSummary, RunTally

ERROR_KINDS = [e.value for e in ErrorType] + ["unknown"]
MAX_COUNTED_ATTEMPT = 10  # the summary counts rows by attempt up to here (a ladder has at most 8 rungs)


@dataclass
class OutputCounts(Totals):
    """What is really in an output, summed over every shard."""

    files: int = 0  # shards
    score_histograms: dict[str, list[int]] = field(default_factory=dict)
    rows_passed: int | None = None
    by_attempt: dict[str, int] = field(default_factory=dict)

    def summary_fields(self) -> dict[str, Any]:
        """The RunSummary fields these counts fill."""
        return dict(rows_out=self.rows, rows_ok=self.ok, rows_error=self.rows - self.ok, errors_by_type=self.errors,
                    tiles=self.tiles, input_tokens=self.input_tokens, generated_tokens=self.generated_tokens,
                    files=self.files, score_histograms=self.score_histograms, rows_passed=self.rows_passed,
                    rows_by_attempt=self.by_attempt)


def block_totals(batch: pa.Table, score_columns: Sequence[tuple[str, str]], with_passed: bool) -> pa.Table:
    """One row of counts for a block of output rows (summed over all blocks by a Ray Data aggregation)."""
    total = Totals.count(batch)
    row: dict[str, int] = {"rows": total.rows, "ok": total.ok, "tiles": total.tiles, "input_tokens": total.input_tokens,
                           "generated_tokens": total.generated_tokens}
    for kind in ERROR_KINDS:
        row[f"error:{kind}"] = total.errors.get(kind, 0)
    attempts = attempts_of(batch)
    for a in range(1, MAX_COUNTED_ATTEMPT + 1):
        row[f"attempt:{a}"] = int(pc.sum(pc.equal(attempts, a).cast(pa.int64())).as_py() or 0)
    for name, col in score_columns:
        for k, n in enumerate(histogram(batch.column(col).to_pylist())):
            row[f"hist:{name}:{k}"] = n
    if with_passed:
        row["passed"] = int(pc.sum(pc.fill_null(batch.column("passed"), False).cast(pa.int64())).as_py() or 0)
    return pa.table({k: pa.array([v], pa.int64()) for k, v in row.items()})


def summarize_output(folder: OutputFolder, *, criteria: Sequence[Criterion] = (), with_passed: bool = False) -> OutputCounts:
    """Counts over every shard of the output (so the summary reports what is really there)."""
    from ray.data.aggregate import Sum

    files = folder.shards()
    options = folder.storage
    if not files:
        return OutputCounts(rows_passed=0 if with_passed else None)
    score_columns = [((c.name or "score"), column("score", c)) for c in criteria]
    cols = ["id", "status", "error_type", "attempt", "num_tiles", "num_input_tokens", "num_generated_tokens",
            *[col for _, col in score_columns], *(["passed"] if with_passed else [])]
    parts = read_shards(files, options, cols).map_batches(
        block_totals, fn_kwargs={"score_columns": score_columns, "with_passed": with_passed},
        batch_format="pyarrow", batch_size=None)
    names = block_totals(pa.table({c: pa.array([], pa.string() if c in ("id", "status", "error_type") else pa.float64())
                                   for c in cols}), score_columns, with_passed).column_names
    sums = {k: int(v or 0) for k, v in (parts.aggregate(*[Sum(n, alias_name=n) for n in names]) or {}).items()}
    return OutputCounts(
        rows=sums.get("rows", 0), ok=sums.get("ok", 0), tiles=sums.get("tiles", 0), input_tokens=sums.get("input_tokens", 0),
        generated_tokens=sums.get("generated_tokens", 0), files=len(files),
        errors={k: sums[f"error:{k}"] for k in ERROR_KINDS if sums.get(f"error:{k}")},
        score_histograms={name: [sums.get(f"hist:{name}:{k}", 0) for k in range(HISTOGRAM_BINS)] for name, _ in score_columns},
        rows_passed=sums.get("passed", 0) if with_passed else None,
        by_attempt={str(a): sums[f"attempt:{a}"] for a in range(1, MAX_COUNTED_ATTEMPT + 1) if sums.get(f"attempt:{a}")},
    )


def count_output_ids(job: JobConfig, folder: OutputFolder, plan: RunPlan) -> ids.IdCounts:
    """The plan's expected rows and the output's ids, grouped by id."""
    expected = plan.inputs.keys.map_batches(expected_rows, fn_kwargs={"job": job}, batch_format="pyarrow", batch_size=None)
    files = folder.shards()
    return ids.count_ids(expected, ids.read_ids(files, job.storage) if files else None, ids.partitions_for(job))


def check_ids(job: JobConfig, plan: RunPlan, counts: ids.IdCounts, rows_out: int) -> None:
    """Every expected row is in the output exactly once, and the output holds rows_in rows; else RunError naming
    one missing and one duplicated id."""
    unexpected = counts.unexpected if not job.incremental else 0  # earlier incremental runs' rows stay
    if rows_out == plan.rows_in and not counts.missing and not counts.dup_done and not unexpected:
        return
    named = []
    if counts.missing:
        named.append(f"{counts.missing} missing (e.g. {ids.first_where(counts.table, 'missing')!r})")
    if counts.dup_done:
        named.append(f"{counts.dup_done} written more than once (e.g. {ids.first_where(counts.table, 'dup_done')!r})")
    if unexpected:
        named.append(f"{unexpected} not expected (e.g. {ids.first_where(counts.table, 'unexpected')!r})")
    distinct = counts.rows_done + counts.unexpected  # ids the output holds
    raise RunError(f"accounting failed: {plan.rows_in} rows expected, {rows_out} rows in the output ({distinct} distinct "
                   f"ids{'; ' + ', '.join(named) if named else ''}); _SUCCESS.json not written")


def _write_delta(batch: pa.Table, folder: OutputFolder, stamp: str) -> pa.Table:
    """Ray task body: one block of (uri, version) rows as one file of the run's state delta (through the folder, so
    the write is fenced)."""
    if batch.num_rows:
        folder.state.write_part(stamp, batch)
    return pa.table({"rows": pa.array([batch.num_rows], pa.int64())})


def write_delta(folder: OutputFolder, rows: Any, stamp: str) -> int:
    """A dataset of (uri, version) rows written as the state delta `stamp`; how many rows."""
    return int(rows.map_batches(_write_delta, fn_kwargs={"folder": folder, "stamp": stamp}, batch_format="pyarrow",
                                batch_size=None).sum("rows") or 0)


def record_state(folder: OutputFolder, plan: RunPlan) -> str:
    """Incremental: write the objects this run took as the state's delta (compacting the state now and then)."""
    import ray

    stamp = plan.stamp
    folder.state.keep_legacy()  # an early version's _INCREMENTAL.json becomes the first delta
    if plan.samples:
        write_delta(folder, plan.inputs.state_rows(), stamp)
    deltas = folder.state.deltas()
    if len(deltas) > COMPACT_AFTER:  # one delta instead of many: written first, then the merged ones removed
        merged = read_files([f for files in deltas.values() for f in files], folder.storage)
        write_delta(folder, merged.repartition(max(1, int(ray.cluster_resources().get("CPU", 1)))), f"{stamp}-compacted")
        folder.state.remove_deltas(list(deltas))
    return folder.state.record_run(stamp, plan.samples)


def finish(job: JobConfig, folder: OutputFolder, plan: RunPlan, tally: RunTally, *, started: float,
           resolved: Resolved, echo: Callable[[str], None] = print, placed: Placed | None = None) -> RunSummary:
    """Account for every row of the plan, then write _SUCCESS.json (incremental: record the objects taken)."""
    criteria = job.score_criteria() if job.task == "score" else []
    id_counts = count_output_ids(job, folder, plan)
    repaired = plan.rows_repaired
    if id_counts.dup_done:  # written twice during the run (a writer that lost its lease, a copy): keep one row each
        repaired += repair_output(folder, echo, partitions=ids.partitions_for(job)).removed
        id_counts = count_output_ids(job, folder, plan)
    counts = summarize_output(folder, criteria=criteria, with_passed=job.has_filter)
    busy, replicas = tally.replica_usage()
    summary = RunSummary(
        rows_in=plan.rows_in, **counts.summary_fields(), wall_s=time.perf_counter() - started,
        fingerprint=output_fingerprint(job, resolved), task=job.task, model=job.model, output=job.output,
        skipped_inputs=plan.skipped, rows_this_run=tally.rows,
        tiles_this_run=tally.tiles, tokens_this_run=tally.generated_tokens,
        model_busy_fraction=busy, replicas=replicas, rows_retried=tally.deferred, rows_repaired=repaired,
        rows_updated=placed.replaced if placed else 0, rows_update_failed=placed.kept if placed else 0,
    )
    check_ids(job, plan, id_counts, counts.rows)
    problem = folder.check_passed(counts.rows_passed or 0) if job.output_passed else None
    if problem:
        raise RunError(f"accounting failed for output_passed: {problem}; _SUCCESS.json not written")
    if job.incremental:
        record_state(folder, plan)
        summary.objects_taken = plan.samples
    folder.finish(summary.to_json())
    return summary
