"""Run a job end to end: preflight -> plan -> execute -> finish. The run package is the only one that uses Ray."""

from __future__ import annotations

import time
from collections.abc import Callable

from pipeline.config import JobConfig
from pipeline.errors import JobError, LockedError
from pipeline.io.lock import run_lock
from pipeline.io.inputs import is_manifest
from pipeline.run.execute import execute
from pipeline.run.finish import finish
from pipeline.run.plan import plan_run, preflight
from pipeline.run.summary import RunSummary


def run_job(job: JobConfig, *, echo: Callable[[str], None] = print) -> RunSummary:
    """Run a job end to end and return its summary; _SUCCESS.json is written last.

    Re-running the same job into the same output resumes it: samples whose rows are all written are skipped,
    rows of half-written samples are not written twice, and a finished job does nothing. An incremental job
    holds the output's lock and takes only objects new or changed since its last successful run.
    """
    if not job.incremental:
        return _run(job, echo)
    if is_manifest(job.input):
        raise JobError("incremental: needs a prefix or glob input (object versions come from the listing), not a manifest")
    try:
        with run_lock(job.output, job.storage, ttl_s=job.lock_ttl_s):
            return _run(job, echo)
    except LockedError as err:
        raise JobError(str(err)) from None


def _run(job: JobConfig, echo: Callable[[str], None]) -> RunSummary:
    started = time.perf_counter()
    plan = plan_run(job, preflight(job, echo), echo)
    if plan.todo.num_rows == 0:
        echo("nothing to do: every row of this job is already in the output")
        return finish(job, plan, [], started=started)
    shards = execute(job, plan, echo, started=started)
    plan.todo = plan.todo.slice(0, 0)  # the rows processed are not needed while the output is read back
    return finish(job, plan, shards, started=started)
