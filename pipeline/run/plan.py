"""Before the run: preflight checks (seconds, no model loaded) and the plan of what is left to do (resume).

Preflight reads the output's state, the model's config.json and the input listing; the plan says which output rows
the job must hold, which are already written, and which samples still need work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.credentials import is_missing_credentials, missing_credentials_message
from pipeline.errors import InputError, JobError, ModelLoadError
from pipeline.io.incremental import new_or_changed, read_state
from pipeline.io.inputs import InputListing, derive_id, list_inputs
from pipeline.io.markers import JOB_FILE, read_marker
from pipeline.io.passed import remove_orphans
from pipeline.io.schema import reserved_columns
from pipeline.io.shards import clear_results, existing_ids, shard_files
from pipeline.io.storage import list_versions
from pipeline.model.checkpoints import check_checkpoint

Echo = Callable[[str], None]


@dataclass
class RunPlan:
    """What a run will do."""

    listing: InputListing  # the samples this job covers (incremental: only new or changed objects)
    rows_in: int  # output rows the output must hold when the run is done (earlier incremental runs' included)
    rows_expected: int  # output rows of this run's samples
    rows_done: int  # of those, already in the output
    todo: pa.Table  # samples with rows still to write
    skip_ids: list[str]  # rows of half-written samples that must not be written twice
    taken: dict[str, str] = field(default_factory=dict)  # incremental: object URI -> version taken this run

    @property
    def rows_todo(self) -> int:
        return self.rows_expected - self.rows_done


def preflight(job: JobConfig, echo: Echo) -> InputListing:
    """Check the output's state and the model, and list the input; every failure is a JobError naming its cause."""
    try:
        check_output_state(job, echo)
        check_checkpoint(job.model, job.storage)
        listing = list_inputs(job.input, job.storage)
    except ModelLoadError as err:
        raise JobError(str(err)) from None
    except InputError as err:
        raise JobError(f"input: {err}") from None
    except PermissionError as err:
        raise JobError(f"access denied ({err}) reading {job.input!r} or {job.output!r}; check the AWS credentials "
                       "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile or role)") from None
    except Exception as err:  # noqa: BLE001 - botocore's NoCredentialsError, without importing botocore here
        if not is_missing_credentials(err):
            raise
        raise JobError(f"{job.input!r} / {job.output!r}: {missing_credentials_message()}") from None
    clash = sorted(reserved_columns(job) & set(listing.table.column_names))
    if clash:
        raise JobError(f"input {job.input!r} has columns this {job.task} job writes itself: {', '.join(clash)}; rename them")
    if listing.table.num_rows == 0:
        skipped = f" (skipped: {listing.skipped})" if listing.skipped else ""
        raise JobError(f"input {job.input!r}: no images or videos found{skipped}")
    return listing


def check_output_state(job: JobConfig, echo: Echo) -> None:
    """Overwrite clears; otherwise an output may only be resumed by the configuration that started it."""
    targets = [job.output] + ([job.output_passed] if job.output_passed else [])
    if job.overwrite:
        for target in targets:
            removed = clear_results(target, job.storage)
            if removed:
                echo(f"overwrite: removed {removed} earlier result files from {target}")
        return
    marker = read_marker(job.output, JOB_FILE, job.storage)
    if marker is None:
        if shard_files(job.output, job.storage):
            raise JobError(f"output {job.output!r} holds Parquet files of an unknown run (no {JOB_FILE}); "
                           "choose another output or pass --set overwrite=true to replace them")
        return
    if marker.get("fingerprint") != job.fingerprint():
        raise JobError(
            f"output {job.output!r} holds results of another configuration (fingerprint {marker.get('fingerprint')}, "
            f"model {marker.get('model')!r}; this job: {job.fingerprint()}, model {job.model!r}). Model, revision, "
            "prompt, questions, schema, tiling, video sampling and generation must match to resume; choose another output "
            "or pass --set overwrite=true to start a new run there"
        )
    if job.output_passed:
        orphans = remove_orphans(job.output, job.output_passed, job.storage)
        if orphans:
            echo(f"resume: removed {orphans} passed shard(s) of rows an earlier run did not finish writing; "
                 "they are processed again")


def expected_ids(job: JobConfig, rows: pa.Table) -> list[list[str]]:
    """Per sample, the ids of the output rows it must produce (one per question)."""
    default = len(job.questions) if job.questions else 1
    counts = ([default] * rows.num_rows if "questions" not in rows.column_names else
              [n if n > 0 else default for n in pc.list_value_length(rows.column("questions")).fill_null(0).to_pylist()])
    if job.task == "score":
        counts = [1] * rows.num_rows
    return [[sid] if n == 1 else [f"{sid}#{k}" for k in range(n)]
            for sid, n in zip(rows.column("id").to_pylist(), counts)]


def take_new_or_changed(job: JobConfig, listing: InputListing, echo: Echo) -> tuple[InputListing, dict[str, str]]:
    """Incremental: keep only rows whose object is new or changed; their ids include the object's version."""
    versions = list_versions(job.input, job.storage)
    uris = listing.table.column("uri").to_pylist()
    state = read_state(job.output, job.storage)
    changed = set(new_or_changed({u: versions[u] for u in uris if u in versions}, state))
    keep = [i for i, u in enumerate(uris) if u in changed]
    table = listing.table.take(pa.array(keep, pa.int64()))
    kept = table.column("uri").to_pylist()
    table = table.set_column(0, "id", pa.array([derive_id(f"{u}@{versions[u]}") for u in kept], pa.string()))
    table = table.append_column("source_version", pa.array([versions[u] for u in kept], pa.string()))
    echo(f"incremental: {len(keep)} of {len(uris)} objects are new or changed since the last successful run")
    return InputListing(table=table, skipped=listing.skipped), {u: versions[u] for u in kept}


def plan_run(job: JobConfig, listing: InputListing, echo: Echo) -> RunPlan:
    """Resume: which samples still have rows to write, and which of their rows are already there."""
    taken: dict[str, str] = {}
    if job.incremental:
        listing, taken = take_new_or_changed(job, listing, echo)
    per_sample = expected_ids(job, listing.table)
    done = set(existing_ids(job.output, job.storage))
    expected = {r for ids in per_sample for r in ids}
    rows_in = len(expected) + (len(done - expected) if job.incremental else 0)  # earlier runs' rows stay
    todo = [i for i, ids in enumerate(per_sample) if not all(r in done for r in ids)]
    skip_ids = sorted(r for i in todo for r in per_sample[i] if r in done)
    rows = listing.table.take(pa.array(todo, pa.int64())) if len(todo) < listing.table.num_rows else listing.table
    plan = RunPlan(listing=listing, rows_in=rows_in, rows_expected=len(expected), rows_done=len(done & expected),
                   todo=rows, skip_ids=skip_ids, taken=taken)
    echo(f"{listing.table.num_rows} samples ({rows_in} output rows) from {job.input}"
         + (f"; skipped non-media files {listing.skipped}" if listing.skipped else ""))
    if plan.rows_done:
        echo(f"resuming: {plan.rows_done} of {plan.rows_expected} rows are already in {job.output}; "
             f"{rows.num_rows} samples to process")
    return plan
