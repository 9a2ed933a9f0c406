"""Retries as Ray Data work: error rows of retryable types are tried again, each rung of the job's ladder in turn.

A run's first pass puts such rows aside (`pipeline/io/output/pending.py`), then one pass per attempt runs the job with that
attempt's rung applied over the samples whose rows wait for it, exactly like a resume: the rows to do are the
pending rows not yet in the output (or in a later attempt's folder), found by the id grouping of `run/ids.py`. A
finished job's error rows are first copied aside and their shards rewritten without them (`prepare_retries`).
The driver keeps counts and file names only.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config.fingerprint import Resolved
from pipeline.config import DEFAULT_RETRY_ERRORS, JobConfig, max_attempt, rung_job, rung_overrides
from pipeline.errors import JobError, RunError
from pipeline.io.output import OutputFolder
from pipeline.io.output.pending import attempts_of, read_ids, retryable
from pipeline.io.storage import get_filesystem
from pipeline.run import ids
from pipeline.run.plan import RunPlan, multi_row
from pipeline.run.sources import LIST_CPUS, read_shards
from pipeline.run.shuffles import column_sums, partitions_for, shard_rows
from pipeline.run.summary import RunTally

Echo = Callable[[str], None]
CRASH_ENV = "INTERNVL_BATCH_CRASH_AT"  # tests: the driver SIGKILLs itself at this point of a retry


def crash_point(name: str) -> None:
    """Fault injection for the tests: a real SIGKILL of this process when CRASH_ENV names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def describe(job: JobConfig, attempt: int) -> str:
    overrides = rung_overrides(job.retry, attempt)
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the job's own settings"


# --- setting a finished job's error rows aside ---------------------------------------------------------------


def _set_aside(batch: dict[str, Any], job: JobConfig, folder: OutputFolder, errors: list[str], again: bool) -> pa.Table:
    """Ray task body: copy one output shard's retryable error rows to `_retry/attempt-<a+1>/from-<shard>`."""
    copied = 0
    last = max_attempt(job.retry)
    for url in batch["path"]:
        fs, path = get_filesystem(str(url), job.storage)
        names = pq.read_schema(path, filesystem=fs).names
        head = pq.read_table(path, columns=[c for c in ("id", "status", "error_type", "attempt") if c in names], filesystem=fs)
        if not pc.any(_to_retry(head, errors, last, again)).as_py():
            continue
        table = pq.read_table(path, filesystem=fs)
        rows = table.filter(_to_retry(table, errors, last, again))
        attempts = attempts_of(rows)
        for a in sorted(set(attempts.to_pylist())):
            folder.pending.write_from(rows.filter(pc.equal(attempts, a)), a + 1, path)
        copied += rows.num_rows
    return pa.table({"rows": pa.array([copied], pa.int64())})


def _to_retry(table: pa.Table, errors: list[str], last: int, again: bool) -> pa.Array:
    """Error rows of these types; unless `again`, only those that have not been through the whole ladder."""
    mask = retryable(table, errors)
    return mask if again else pc.and_(mask, pc.less(attempts_of(table), last))


def _rewrite(batch: dict[str, Any], folder: OutputFolder) -> pa.Table:
    """Ray task body: rewrite one output shard without the rows copied out of it."""
    for shard, files in zip(batch["shard"], batch["files"]):
        folder.pending.supersede(str(shard), read_ids([str(f) for f in files], folder.storage))
    return pa.table({"shards": pa.array([len(batch["shard"])], pa.int64())})


def complete_rewrites(folder: OutputFolder) -> int:
    """Rewrite every output shard that still holds rows copied aside (a crash may leave some); how many."""
    import ray

    todo = folder.pending.rewrites_left()
    if not todo:
        return 0
    items = ray.data.from_items([{"shard": s, "files": f} for s, f in todo.items()], override_num_blocks=min(len(todo), 256))
    items.map_batches(_rewrite, fn_kwargs={"folder": folder}, batch_size=1, batch_format="numpy",
                      num_cpus=LIST_CPUS).materialize()
    return len(todo)


def prepare_retries(job: JobConfig, folder: OutputFolder, echo: Echo, *, resolved: Resolved,
                    retry_errors: bool = False) -> None:
    """Before a run plans: finish the shard rewrites a crashed run left; then, for a job with a `retry` section (or
    with `--retry-errors`), set the output's retryable error rows aside for this run's retry passes."""
    from pipeline.run.execute import mark_output

    if folder.pending.rewrites_left():
        mark_output(job, folder, resolved)  # the output changes: no _SUCCESS.json until this run ends
        echo(f"retry: completed {complete_rewrites(folder)} shard rewrite(s) an earlier run left unfinished")
    if not (retry_errors or job.retry):
        return
    files = folder.shards()
    if not files:
        return
    if job.incremental:
        if retry_errors:
            raise JobError("--retry-errors: an incremental run reads only new or changed objects, so the samples of "
                           "earlier runs' error rows are not in its input; run the job without incremental into "
                           "another output, or re-run those objects")
        return
    errors = list(job.retry.errors) if job.retry else list(DEFAULT_RETRY_ERRORS)
    items = ray_items(files)
    copied = column_sums(items.map_batches(_set_aside, fn_kwargs={"job": job, "folder": folder, "errors": errors,
                                                                  "again": retry_errors},
                                           batch_size=1, batch_format="numpy", num_cpus=LIST_CPUS), ["rows"])["rows"] if items else 0
    if not copied:
        return
    mark_output(job, folder, resolved)
    echo(f"retry: {copied} error row(s) of types {', '.join(errors)} set aside to try again")
    crash_point("retry-set-aside")
    complete_rewrites(folder)


def ray_items(files: list[str]) -> Any:
    import ray

    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=min(len(files), 1024)) if files else None


# --- the retry passes -----------------------------------------------------------------------------------------


def _expected(batch: pa.Table) -> pa.Table:
    """Pending rows as expected rows (id, sample_id, first)."""
    sample = pc.coalesce(batch.column("sample_id"), batch.column("id"))
    return pa.table({"id": batch.column("id"), "sample_id": sample, "first": pa.array([0] * batch.num_rows, pa.int64())})


def retry_plan(job: JobConfig, folder: OutputFolder, plan: RunPlan, attempt: int, pending: dict[int, list[str]]) -> RunPlan:
    """The samples whose rows wait for attempt `attempt`: pending rows not already in the output or in a later
    attempt's folder (a crashed pass wrote them), joined with the run's inputs."""
    files = folder.shards()
    partitions = partitions_for(shard_rows([*pending[attempt], *files], job.rows_per_shard))
    expected = read_shards(pending[attempt], job.storage, ["id", "sample_id"]).map_batches(
        _expected, batch_format="pyarrow", batch_size=None)
    later = [f for a, fs in pending.items() if a > attempt for f in fs]  # a crashed pass put them there already
    counts = ids.count_ids(expected, ids.read_ids(files, job.storage) if files else None, partitions, keep=True,
                           waiting=ids.read_ids(later, job.storage) if later else None)
    todo, samples_todo = None, 0
    if counts.missing:
        todo, samples_todo = ids.todo_samples(plan.inputs.samples, counts.table, counts.missing, partitions,
                                              multi_row=multi_row(job, plan.input_columns))
        todo = todo.materialize()
        found = todo.count()
        if found != samples_todo:  # a pending row whose sample is not in this run's input: never drop it
            raise RunError(f"retry: {samples_todo - found} sample(s) waiting for attempt {attempt} are not in the input "
                           f"{job.input!r} any more (e.g. one of {ids.first_where(counts.table, 'missing')!r}); their rows "
                           f"stay in {folder.pending.url(attempt)}")
    return RunPlan(inputs=plan.inputs, samples=plan.samples, rows_in=plan.rows_in, rows_expected=counts.rows_expected,
                   rows_done=counts.rows_done, samples_todo=samples_todo, todo=todo, input_columns=plan.input_columns)


def retry_passes(job: JobConfig, folder: OutputFolder, plan: RunPlan, echo: Echo, *, started: float,
                 resolved: Resolved, tally: RunTally) -> None:
    """One pass per attempt with rows waiting for it, lowest first; each pass's folder is deleted once it is done."""
    from pipeline.run.execute import execute

    while pending := folder.pending.files():
        attempt = next(iter(pending))
        step = retry_plan(job, folder, plan, attempt, pending)
        if step.rows_todo:
            echo(f"retry: attempt {attempt} ({describe(job, attempt)}): {step.rows_todo} row(s) of {step.samples_todo} "
                 "sample(s)")
            execute(rung_job(job, attempt), folder, step, echo, started=started, resolved=resolved, attempt=attempt,
                    tally=tally)
            crash_point("retry-pass-written")
        folder.pending.clear(attempt)

