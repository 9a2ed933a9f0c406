"""After the run: account for every row with Ray Data aggregations over the output, then write _SUCCESS.json last.

Totals (rows, ok, errors by type, tiles, tokens, score histograms, passed) are summed from one small row per
shard (run/totals.py); "every expected id exactly once" is the id grouping of `pipeline/run/ids.py` over the
expected rows and the output's ids. An incremental run whose output's shard index holds (run/committed.py) counts
and checks only the shards added since the last successful run. The driver holds totals only, and names one
missing and one duplicated id when the check fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.config.fingerprint import Resolved, output_fingerprint
from pipeline.errors import RunError
from pipeline.io.output import OutputFolder
from pipeline.io.output.state import COMPACT_AFTER
from pipeline.run import ids
from pipeline.run.committed import Committed, read_committed, write_index
from pipeline.run.plan import RunPlan, expected_rows
from pipeline.run.repair import repair_output
from pipeline.run.sources import read_own_files
from pipeline.run.shuffles import column_sums, partitions_for, shard_rows
from pipeline.run.summary import RunSummary, RunTally
from pipeline.run.totals import OutputCounts, per_shard_totals, score_columns_of, sum_totals, totals_names
from pipeline.run.update import Placed

def count_output_ids(job: JobConfig, folder: OutputFolder, plan: RunPlan, files: list[str] | None = None) -> ids.IdCounts:
    """The plan's expected rows and the output's ids (of `files`, default every shard), grouped by id."""
    expected = plan.inputs.keys.map_batches(expected_rows, fn_kwargs={"job": job}, batch_format="pyarrow", batch_size=None)
    files = folder.shards() if files is None else files
    partitions = partitions_for(plan.rows_expected + shard_rows(files, job.rows_per_shard))
    return ids.count_ids(expected, ids.read_ids(files, job.storage) if files else None, partitions)


def rows_in(job: JobConfig, counts: ids.IdCounts, prior: Committed | None) -> int:
    """The rows the output must hold: the job's expected rows (incremental: also earlier runs' rows)."""
    return counts.rows_any + (prior.rows if prior else 0) if job.incremental else counts.rows_expected


def check_ids(job: JobConfig, counts: ids.IdCounts, rows_in: int, rows_out: int) -> None:
    """Every expected row is in the output exactly once, and the output holds rows_in rows; else RunError naming
    one missing and one duplicated id."""
    unexpected = counts.unexpected if not job.incremental else 0  # earlier incremental runs' rows stay
    if rows_out == rows_in and not counts.missing and not counts.dup_done and not unexpected:
        return
    named = []
    if counts.missing:
        named.append(f"{counts.missing} missing (e.g. {ids.first_where(counts.table, 'missing')!r})")
    if counts.dup_done:
        named.append(f"{counts.dup_done} written more than once (e.g. {ids.first_where(counts.table, 'dup_done')!r})")
    if unexpected:
        named.append(f"{unexpected} not expected (e.g. {ids.first_where(counts.table, 'unexpected')!r})")
    distinct = counts.rows_done + counts.unexpected  # ids the output holds
    raise RunError(f"accounting failed: {rows_in} rows expected, {rows_out} rows in the output ({distinct} distinct "
                   f"ids{'; ' + ', '.join(named) if named else ''}); _SUCCESS.json not written")


def _write_delta(batch: pa.Table, folder: OutputFolder, stamp: str) -> pa.Table:
    """Ray task body: one block of (uri, version) rows as one file of the run's state delta (through the folder, so
    the write is fenced)."""
    if batch.num_rows:
        folder.state.write_part(stamp, batch)
    return pa.table({"rows": pa.array([batch.num_rows], pa.int64())})


def write_delta(folder: OutputFolder, rows: Any, stamp: str) -> int:
    """A dataset of (uri, version) rows written as the state delta `stamp`; how many rows."""
    return column_sums(rows.map_batches(_write_delta, fn_kwargs={"folder": folder, "stamp": stamp},
                                        batch_format="pyarrow", batch_size=None), ["rows"])["rows"]


def record_state(folder: OutputFolder, plan: RunPlan) -> None:
    """Incremental: write the objects this run took as the state's delta (compacting the state now and then)."""
    import ray

    folder.state.keep_legacy()  # an early version's _INCREMENTAL.json becomes the first delta
    if plan.samples:
        write_delta(folder, plan.inputs.state_rows(), plan.stamp)
    deltas = folder.state.deltas()
    if len(deltas) > COMPACT_AFTER:  # one delta instead of many: written first, then the merged ones removed
        merged = read_own_files([f for files in deltas.values() for f in files], folder.storage)
        write_delta(folder, merged.repartition(max(1, int(ray.cluster_resources().get("CPU", 1)))),
                    f"{plan.stamp}-compacted")
        folder.state.remove_folders(list(deltas))


def account(job: JobConfig, folder: OutputFolder, plan: RunPlan, echo: Callable[[str], None]) -> Accounting:
    """Count and check the output: for an incremental run whose shard index holds, the shards added since the last
    success plus the committed totals; otherwise every shard. Duplicates found are repaired first."""
    criteria = job.score_criteria() if job.task == "score" else []
    names = totals_names(score_columns_of(criteria), job.has_filter)
    listing = folder.shards(detail=True)
    prior = read_committed(folder, listing, names) if job.incremental else None
    files = prior.added(listing) if prior else list(listing)
    id_counts = count_output_ids(job, folder, plan, files)
    if prior is not None and (id_counts.unexpected or id_counts.dup_done):  # not what a nightly run adds: check all
        echo("accounting: the shards added since the last success hold ids this run did not expect; every shard is "
             "counted and checked")
        prior, files = None, list(listing)
        id_counts = count_output_ids(job, folder, plan, files)
    repaired = 0
    if id_counts.dup_done:  # written twice during the run (a writer that lost its lease, a copy): keep one row each
        repaired = repair_output(folder, echo).removed
        listing = folder.shards(detail=True)
        prior, files = None, list(listing)
        id_counts = count_output_ids(job, folder, plan, files)
    per_shard = per_shard_totals(folder, files, criteria=criteria, with_passed=job.has_filter) if files else None
    sums = sum_totals(per_shard, names) if per_shard is not None else {}
    if prior is not None:
        sums = {n: prior.sums.get(n, 0) + sums.get(n, 0) for n in names}
    counts = OutputCounts.from_sums(sums, len(listing), [n for n, _ in score_columns_of(criteria)], job.has_filter)
    return Accounting(counts, id_counts, rows_in(job, id_counts, prior), repaired, per_shard, whole=prior is None)


@dataclass
class Accounting:
    """What the end-of-run accounting found."""

    counts: OutputCounts  # totals over every shard
    ids: ids.IdCounts  # the id grouping (of the shards it read)
    rows_in: int  # rows the output must hold
    repaired: int  # duplicate rows removed
    per_shard: Any  # the index rows of the shards it read (None: none)
    whole: bool  # it read every shard


def finish(job: JobConfig, folder: OutputFolder, plan: RunPlan, tally: RunTally, *, started: float,
           resolved: Resolved, echo: Callable[[str], None] = print, placed: Placed | None = None,
           extra: dict[str, Any] | None = None) -> RunSummary:
    """Account for every row of the plan, then write _SUCCESS.json (incremental first: the objects taken, then the
    shards committed). `extra`: more RunSummary fields (dedup's figures)."""
    done = account(job, folder, plan, echo)
    busy, replicas = tally.replica_usage()
    summary = RunSummary(
        rows_in=done.rows_in, **done.counts.summary_fields(), wall_s=time.perf_counter() - started,
        fingerprint=output_fingerprint(job, resolved), task=job.task, model=job.model, output=job.output,
        skipped_inputs=plan.skipped, rows_this_run=tally.rows,
        tiles_this_run=tally.tiles, tokens_this_run=tally.generated_tokens,
        model_busy_fraction=busy, replicas=replicas, rows_retried=tally.deferred,
        rows_repaired=plan.rows_repaired + done.repaired,
        rows_updated=placed.replaced if placed else 0, rows_update_failed=placed.kept if placed else 0,
        **(extra or {}),
    )
    check_ids(job, done.ids, done.rows_in, done.counts.rows)
    problem = folder.check_passed(done.counts.rows_passed or 0) if job.output_passed else None
    if problem:
        raise RunError(f"accounting failed for output_passed: {problem}; _SUCCESS.json not written")
    if job.incremental:  # the state before the index: a crash between them leaves shards the index does not trust
        record_state(folder, plan)
        write_index(folder, done.per_shard, plan.stamp, whole=done.whole)
        folder.state.record_run(plan.stamp, plan.samples)
        summary.objects_taken = plan.samples
    folder.finish(summary.to_json())
    return summary
