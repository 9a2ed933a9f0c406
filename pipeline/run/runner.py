"""Run a job end to end: preflight -> plan -> execute -> finish. The run package is the only one that uses Ray."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.config import JobConfig
from pipeline.errors import JobError, LockedError
from pipeline.io.lock import run_lock
from pipeline.run.execute import execute, init_ray
from pipeline.run.finish import finish
from pipeline.run.estimate import describe_estimate, estimate_plan
from pipeline.io.retry import pending_files
from pipeline.run.plan import RunPlan, plan_run, preflight
from pipeline.run.retry import prepare_retries, retry_passes
from pipeline.run.summary import RunSummary, RunTally


def run_job(job: JobConfig, *, echo: Callable[[str], None] = print, retry_errors: bool = False) -> RunSummary:
    """Run a job end to end and return its summary; _SUCCESS.json is written last.

    Re-running the same job into the same output resumes it: samples whose rows are all written are skipped,
    rows of half-written samples are not written twice, and a finished job does nothing. An incremental job
    holds the output's lock and takes only objects new or changed since its last successful run. A job with a
    `retry` section tries failed samples again, rung by rung (`retry_errors`: also the output's error rows that
    have been through the whole ladder already).
    """
    if not job.incremental:
        return _run(job, echo, retry_errors)
    try:
        with run_lock(job.output, job.storage, ttl_s=job.lock_ttl_s):
            return _run(job, echo, retry_errors)
    except LockedError as err:
        raise JobError(str(err)) from None


def plan_job(job: JobConfig, *, echo: Callable[[str], None] = print) -> RunPlan:
    """The dry run: validate, probe, list, resume and estimate what a run would do; no model, nothing written."""
    preflight(job, echo, dry_run=True)
    init_ray()
    plan = plan_run(job, echo, dry_run=True)
    plan.estimate = estimate_plan(job, plan)
    echo(describe_estimate(plan.estimate))
    return plan


def _run(job: JobConfig, echo: Callable[[str], None], retry_errors: bool = False) -> RunSummary:
    started = time.perf_counter()
    preflight(job, echo)
    init_ray()
    prepare_retries(job, echo, retry_errors=retry_errors)
    plan = plan_run(job, echo)
    plan.estimate = estimate_plan(job, plan)
    echo(describe_estimate(plan.estimate))
    tally = RunTally()
    if plan.rows_todo:
        execute(job, plan, echo, started=started, tally=tally)
    elif not pending_files(job.output, job.storage):
        echo("nothing to do: every row of this job is already in the output")
    retry_passes(job, plan, echo, started=started, tally=tally)
    plan.todo = None  # the samples processed are not needed while the output is accounted for
    return finish(job, plan, tally, started=started)
