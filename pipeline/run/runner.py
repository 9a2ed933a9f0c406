"""Run a job end to end: preflight -> plan -> execute -> finish. The run package is the only one that uses Ray."""

from __future__ import annotations

import _thread
import json
import time
from collections.abc import Callable
from types import SimpleNamespace

from pipeline.config import JobConfig
from pipeline.errors import JobError, LeaseLostError, LockedError, RunError
from pipeline.io.output import OutputFolder
from pipeline.io.output.lease import renewed
from pipeline.run.execute import execute, init_ray, resolve
from pipeline.io.output.layout import SUCCESS_FILE
from pipeline.run.dedup import fill_duplicates, split_duplicates
from pipeline.run.finish import finish
from pipeline.run.totals import summarize_output
from pipeline.run.repair import Repair, repair_duplicates
from pipeline.run.estimate import describe_estimate, estimate_plan
from pipeline.run.plan import (RunPlan, check_output_state, job_errors, output_folder, plan_run, preflight,
                               storage_errors)
from pipeline.run.retry import prepare_retries, retry_passes
from pipeline.run.summary import RunSummary, RunTally
from pipeline.run.update import current_settings, place_staged


def run_job(job: JobConfig, *, echo: Callable[[str], None] = print, retry_errors: bool = False,
            update: bool = False) -> RunSummary:
    """Run a job end to end and return its summary; _SUCCESS.json is written last.

    Re-running the same job into the same output resumes it: samples whose rows are all written are skipped,
    rows of half-written samples are not written twice, and a finished job does nothing. Every run holds the
    output's lease while it writes (a second run into the same output is refused naming the holder; one that loses
    its lease stops writing at once). An incremental job takes only objects new or changed since its last
    successful run. A job with a `retry` section tries failed samples again, rung by rung (`retry_errors`: also the
    output's error rows that have been through the whole ladder already). `update`: an output written with other
    settings (prompt, tiling, model, engine...) is resumed too, and its rows of other settings are re-run and
    replaced in place (run/update.py).
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
                return _run(job, folder.fenced(held), echo, retry_errors, started=started, update=update)
            except KeyboardInterrupt:
                if beat.lost is None:
                    raise
                raise LeaseLostError(f"this run stopped writing: {beat.lost}") from None
    except LeaseLostError as err:
        raise RunError(f"{err}. Rows written before are kept; the run that holds the output finishes it.") from None


def plan_job(job: JobConfig, *, echo: Callable[[str], None] = print, update: bool = False) -> RunPlan:
    """The dry run: validate, probe, list, resume and estimate what a run would do; no model, no lease, nothing written."""
    folder = output_folder(job)
    preflight(job, echo)
    init_ray()
    resolved = resolve(job)
    with job_errors(job):
        check_output_state(job, folder, resolved, echo, dry_run=True, update=update)
    plan = plan_run(job, folder, echo, dry_run=True, current=current_settings(job, resolved) if update else None)
    plan.estimate = estimate_plan(job, plan)
    echo(describe_estimate(plan.estimate))
    return plan


def _run(job: JobConfig, folder: OutputFolder, echo: Callable[[str], None], retry_errors: bool, *,
         started: float, update: bool = False) -> RunSummary:
    if update and job.dedup != "none":
        raise JobError("dedup: exact cannot be combined with --update (a duplicate's row would be replaced before its "
                       "representative's); run the update with dedup: none")
    init_ray()
    resolved = resolve(job)
    with job_errors(job):
        check_output_state(job, folder, resolved, echo, update=update)
    placed = place_staged(folder, echo)  # rows an update that died had made: in place before anything is planned
    prepare_retries(job, folder, echo, resolved=resolved, retry_errors=retry_errors)
    plan = plan_run(job, folder, echo, current=current_settings(job, resolved) if update else None)
    plan.estimate = estimate_plan(job, plan)
    echo(describe_estimate(plan.estimate))
    tally = RunTally()
    dups = split_duplicates(job, plan, echo) if job.dedup == "exact" and plan.rows_todo else None
    if plan.rows_todo and (dups is None or plan.samples_todo):
        execute(job, folder, plan, echo, started=started, resolved=resolved, tally=tally, staged=bool(plan.rows_stale))
        placed.add(place_staged(folder, echo))
    elif not plan.rows_todo and not folder.pending.files():
        echo("nothing to do: every row of this job is already in the output")
    retry_passes(job, folder, plan, echo, started=started, resolved=resolved, tally=tally)
    if dups is not None:  # after the retry passes: the representatives' rows are final
        fill_duplicates(job, folder, dups, echo, input_columns=plan.input_columns)
    plan.todo = None  # the samples processed are not needed while the output is accounted for
    summary = finish(job, folder, plan, tally, started=started, resolved=resolved, echo=echo, placed=placed,
                     extra=dups.summary_fields(tally) if dups is not None else None)
    return summary


def repair_output_folder(folder: OutputFolder, *, ttl_s: float = 300.0,
                         echo: Callable[[str], None] = print) -> Repair:
    """`internvl-batch repair`: hold the output's lease, keep one row per id (run/repair.py), and bring a finished
    run's `_SUCCESS.json` up to date with what is now in the output. No model is loaded."""
    init_ray()
    try:
        with storage_errors(folder.url):
            held = folder.take_lease(ttl_s, kind="repair")
    except LockedError as err:
        raise JobError(str(err)) from None
    with renewed(held):
        fenced = folder.fenced(held)
        done = repair_duplicates(fenced)
        echo(done.describe() if done.ids else f"repair: every id is in {folder.url} once; nothing to do")
        success = fenced.success()
        if done.removed and success is not None:
            criteria = [SimpleNamespace(name=name) for name in success.get("score_histograms") or {}]
            counts = summarize_output(fenced, criteria=criteria, with_passed=success.get("rows_passed") is not None)
            success.update(counts.summary_fields())
            success["rows_repaired"] = int(success.get("rows_repaired") or 0) + done.removed
            fenced.finish(json.dumps(success, indent=2, sort_keys=True))
            echo(f"repair: {SUCCESS_FILE} updated ({counts.rows} rows)")
    return done
