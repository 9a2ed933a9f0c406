"""Run a job end to end: preflight -> plan -> execute -> finish. The run package is the only one that uses Ray."""

from __future__ import annotations

import _thread
import time
from collections.abc import Callable

from pipeline.config import JobConfig
from pipeline.errors import JobError, LeaseLostError, LockedError, RunError
from pipeline.io.output import OutputFolder
from pipeline.io.output.lease import renewed
from pipeline.run.execute import execute, init_ray
from pipeline.run.finish import finish
from pipeline.run.estimate import describe_estimate, estimate_plan
from pipeline.run.plan import RunPlan, check_output_state, job_errors, output_folder, plan_run, preflight
from pipeline.run.retry import prepare_retries, retry_passes
from pipeline.run.summary import RunSummary, RunTally


def run_job(job: JobConfig, *, echo: Callable[[str], None] = print, retry_errors: bool = False) -> RunSummary:
    """Run a job end to end and return its summary; _SUCCESS.json is written last.

    Re-running the same job into the same output resumes it: samples whose rows are all written are skipped,
    rows of half-written samples are not written twice, and a finished job does nothing. Every run holds the
    output's lease while it writes (a second run into the same output is refused naming the holder; one that loses
    its lease stops writing at once). An incremental job takes only objects new or changed since its last
    successful run. A job with a `retry` section tries failed samples again, rung by rung (`retry_errors`: also the
    output's error rows that have been through the whole ladder already).
    """
    started = time.perf_counter()
    preflight(job, echo)  # the model and the input, before the output is touched
    folder = output_folder(job)
    try:
        with job_errors(job):
            held = folder.take_lease(job.lock_ttl_s, kind="retry-errors" if retry_errors else "run")
    except LockedError as err:
        raise JobError(str(err)) from None
    if held.took_over:
        echo(f"lease: took over {folder.lock_url} from {held.took_over}")
    try:
        with renewed(held, on_lost=lambda _: _thread.interrupt_main()) as beat:
            try:
                return _run(job, folder.fenced(held), echo, retry_errors, started=started)
            except KeyboardInterrupt:
                if beat.lost is None:
                    raise
                raise LeaseLostError(f"this run stopped writing: {beat.lost}") from None
    except LeaseLostError as err:
        raise RunError(f"{err}. Rows written before are kept; the run that holds the output finishes it.") from None


def plan_job(job: JobConfig, *, echo: Callable[[str], None] = print) -> RunPlan:
    """The dry run: validate, probe, list, resume and estimate what a run would do; no model, no lease, nothing written."""
    folder = output_folder(job)
    preflight(job, echo, folder=folder, dry_run=True)
    init_ray()
    plan = plan_run(job, folder, echo, dry_run=True)
    plan.estimate = estimate_plan(job, plan)
    echo(describe_estimate(plan.estimate))
    return plan


def _run(job: JobConfig, folder: OutputFolder, echo: Callable[[str], None], retry_errors: bool, *,
         started: float) -> RunSummary:
    with job_errors(job):
        check_output_state(job, folder, echo)
    init_ray()
    prepare_retries(job, folder, echo, retry_errors=retry_errors)
    plan = plan_run(job, folder, echo)
    plan.estimate = estimate_plan(job, plan)
    echo(describe_estimate(plan.estimate))
    tally = RunTally()
    if plan.rows_todo:
        execute(job, folder, plan, echo, started=started, tally=tally)
    elif not folder.pending.files():
        echo("nothing to do: every row of this job is already in the output")
    retry_passes(job, folder, plan, echo, started=started, tally=tally)
    plan.todo = None  # the samples processed are not needed while the output is accounted for
    return finish(job, folder, plan, tally, started=started)
