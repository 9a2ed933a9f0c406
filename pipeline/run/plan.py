"""Before the run: preflight checks (seconds, no Ray, no model) and the plan of what is left to do (resume).

Preflight reads the output's state and the model's config.json, and probes the input. The plan is Ray Data work:
the expected output rows (one per question) and the ids already in the output are grouped by id in one
distributed aggregation, which finds duplicate input ids, rows done and rows left; the samples with rows left are
found by a join. The driver keeps counts only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.config.fingerprint import Resolved, changes, identity, output_fingerprint, settings
from pipeline.credentials import is_missing_credentials, missing_credentials_message
from pipeline.errors import InputError, JobError, ModelLoadError
from pipeline.io.inputs import duplicate_id_error, input_kind
from pipeline.io.listing import inventory_spec, is_glob, glob_root, manifest_files
from pipeline.io.output import OutputFolder
from pipeline.io.output.layout import JOB_FILE, RETRY_DIR
from pipeline.io.output.state import run_stamp
from pipeline.io.schema import reserved_columns
from pipeline.io.storage import get_filesystem
from pipeline.io.webdataset import has_braces, probe_shards
from pipeline.model.checkpoints import check_checkpoint
from pipeline.run import ids
from pipeline.run.committed import Committed, read_committed
from pipeline.run.repair import KEEP_RULE, repair_output
from pipeline.run.packed_inputs import read_job_inputs
from pipeline.run.shuffles import known_rows, partitions_for, shard_rows
from pipeline.run.sources import Inputs, read_shards
from pipeline.run.totals import score_columns_of, totals_names

Echo = Callable[[str], None]


@dataclass
class RunPlan:
    """What a run will do: counts, and the datasets it reads (none of their rows are held here)."""

    inputs: Inputs  # the samples this job covers (incremental: only new or changed objects)
    samples: int  # samples in `inputs`
    rows_in: int  # output rows the output must hold when the run is done (earlier incremental runs' included)
    rows_expected: int  # output rows of this run's samples
    rows_done: int  # of those, already in the output
    samples_todo: int  # samples with rows still to write
    todo: Any = None  # ray.data.Dataset of those samples (TODO_COLUMN: the rows left of a partly written sample)
    input_columns: list[str] = field(default_factory=list)
    rows_duplicated: int = 0  # ids the output holds more than once (a dry run; a run repairs them first)
    rows_repaired: int = 0  # duplicate rows a run removed before planning
    rows_stale: int = 0  # an update: rows made with other settings, re-run and replaced in place
    committed: int | None = None  # incremental: shards earlier successful runs committed, not read again
    rows_waiting: int = 0  # of rows_done, those set aside for a retry pass (in `_retry/`, not in the output yet)
    stamp: str = ""  # incremental: this run's name in the state
    estimate: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_todo(self) -> int:
        return self.rows_expected - self.rows_done

    @property
    def skipped(self) -> dict[str, int]:
        return self.inputs.skipped

    def figures(self) -> dict[str, Any]:
        """What `internvl-batch plan --json` prints, and every run starts with."""
        return {"samples": self.samples, "rows": self.rows_expected, "rows_done": self.rows_done,
                "rows_todo": self.rows_todo, "samples_todo": self.samples_todo, "rows_in": self.rows_in,
                "rows_waiting": self.rows_waiting, "rows_stale": self.rows_stale, "rows_duplicated": self.rows_duplicated,
                "skipped": self.skipped, "objects_listed": self.inputs.objects_listed, "estimate": self.estimate}


def output_folder(job: JobConfig) -> OutputFolder:
    """The job's output folder (and its passed subset), not yet fenced by a lease."""
    job.require_placed()
    return OutputFolder(job.output, job.storage, passed_url=job.output_passed)


def preflight(job: JobConfig, echo: Echo) -> None:
    """Check the model and probe the input, before the output is touched; every failure is a JobError naming its
    cause. (The output's state is checked once the run holds the output's lease: `check_output_state`.)"""
    job.require_placed()
    with job_errors(job):
        check_checkpoint(job.model, job.storage)
        probe_input(job)


@contextmanager
def job_errors(job: JobConfig) -> Iterator[None]:
    """Failures of the checks before a run (model, input, output, credentials) as JobErrors naming their cause."""
    try:
        with storage_errors(f"{job.input!r} / {job.output!r}"):
            yield
    except ModelLoadError as err:
        raise JobError(str(err)) from None
    except InputError as err:
        raise JobError(f"input: {err}") from None


@contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """Access denied and missing credentials reaching `where` as JobErrors saying what to check."""
    try:
        yield
    except PermissionError as err:
        raise JobError(f"access denied ({err}) reading or writing {where}; check the AWS credentials "
                       "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile or role)") from None
    except Exception as err:  # noqa: BLE001 - botocore's NoCredentialsError, without importing botocore here
        if not is_missing_credentials(err):
            raise
        raise JobError(f"{where}: {missing_credentials_message()}") from None


def probe_input(job: JobConfig) -> None:
    """The input exists (a manifest's files are listed, a prefix's first entry looked up), without listing it."""
    kind = input_kind(job.input, job.input_format)
    if job.image_column:  # the pictures are in manifests: under `auto`, a folder or glob is one of manifests
        if kind not in ("manifest", "files"):
            raise InputError(f"image_column: needs a Parquet manifest as input; {job.input!r} is read as {kind}")
        kind = "manifest"
    if job.incremental and kind == "manifest":
        raise JobError("incremental: needs a prefix, glob or inventory input (object versions come from the listing), "
                       "not a manifest")
    if kind == "manifest":
        manifest_files(job.input, job.storage)
    elif kind == "inventory":
        inventory_spec(job.input, job.storage)
    elif kind == "webdataset" and has_braces(job.input):
        probe_shards(job.input, job.storage)
    else:
        fs, path = get_filesystem(job.input, job.storage)
        if not fs.exists(glob_root(path) if is_glob(path) else path):
            raise InputError(f"input {job.input!r} does not exist (no such file, prefix or glob match)")


def check_output_state(job: JobConfig, folder: OutputFolder, resolved: Resolved, echo: Echo, *, dry_run: bool = False,
                       update: bool = False) -> None:
    """Overwrite clears (a dry run only says so); otherwise an output may only be resumed by the job and settings
    that started it (`update`: by other settings too, whose rows the run then re-runs in place; never by another
    task, question count or columns)."""
    if job.overwrite:
        for target in [job.output] + ([job.output_passed] if job.output_passed else []):
            if dry_run:
                found = len(folder.results(target))
                if found:
                    echo(f"overwrite: would remove {found} earlier result files from {target}")
                continue
            removed = folder.clear(target)
            if removed:
                echo(f"overwrite: removed {removed} earlier result files from {target}")
        return
    marker = folder.job_record()
    if marker is None:
        if folder.shards():
            raise JobError(f"output {job.output!r} holds Parquet files of an unknown run (no {JOB_FILE}); "
                           "choose another output or pass --set overwrite=true to replace them")
        return
    problem = output_mismatch(marker, job, resolved, update=update)
    if problem:
        raise JobError(f"output {job.output!r} {problem}; choose another output, pass --update to re-run the rows "
                       "whose settings changed in place, or --set overwrite=true to start a new run there")
    if job.output_passed and not dry_run:
        orphans = folder.remove_passed_orphans()
        if orphans:
            echo(f"resume: removed {orphans} passed shard(s) of rows an earlier run did not finish writing; "
                 "they are processed again")


def output_mismatch(marker: dict[str, Any], job: JobConfig, resolved: Resolved, *, update: bool = False) -> str | None:
    """Why a run of `job` may not write into an output whose `_JOB.json` is `marker` (None: it may). An output of an
    earlier version (no settings recorded) is resumed by the same job file."""
    if "settings" not in marker:
        if marker.get("fingerprint") == job.fingerprint():
            return None
        return (f"holds results of another configuration (fingerprint {marker.get('fingerprint')}, model "
                f"{marker.get('model')!r}; this job: {job.fingerprint()}, model {job.model!r}; written by an earlier "
                "version, which did not record its settings)")
    if marker.get("fingerprint") == output_fingerprint(job, resolved):
        return None
    if update:
        changed = changes(marker.get("identity") or {}, identity(job))
        return f"holds results of another kind of job ({'; '.join(changed)}): --update cannot change that" if changed else None
    changed = changes(marker["settings"], settings(job, resolved)) or ["the job's own fingerprint"]
    return f"holds results of other settings: {'; '.join(changed)}"


def question_counts(job: JobConfig, rows: pa.Table) -> list[int]:
    """Per sample, how many output rows it produces (one per question; a score job: one)."""
    if job.task == "score":
        return [1] * rows.num_rows
    default = len(job.questions) if job.questions else 1
    if "questions" not in rows.column_names:
        return [default] * rows.num_rows
    return [n if n > 0 else default for n in pc.list_value_length(rows.column("questions")).fill_null(0).to_pylist()]


def expected_ids(job: JobConfig, rows: pa.Table) -> list[list[str]]:
    """Per sample, the ids of the output rows it must produce (one per question)."""
    return [[sid] if n == 1 else [f"{sid}#{k}" for k in range(n)]
            for sid, n in zip(rows.column("id").to_pylist(), question_counts(job, rows))]


def expected_rows(batch: pa.Table, job: JobConfig) -> pa.Table:
    """One batch of samples as the output rows they must produce: `id`, `sample_id`, `first` (1 on a sample's first
    row, so samples can be counted after grouping by id). A Ray Data map function."""
    per_sample = expected_ids(job, batch)
    samples = batch.column("id").to_pylist()
    return pa.table({"id": pa.array([r for rows in per_sample for r in rows], pa.string()),
                     "sample_id": pa.array([s for s, rows in zip(samples, per_sample) for _ in rows], pa.string()),
                     "first": pa.array([int(k == 0) for rows in per_sample for k in range(len(rows))], pa.int64())})


def done_ids(job: JobConfig, folder: OutputFolder, *, dry_run: bool = False, current: list[str] | None = None,
             files: list[str] | None = None) -> tuple[Any, Any, int]:
    """The ids already in the output (in `files`, default every shard), and those set aside for a retry pass (done
    for the first pass), as datasets, or None (none there; a dry run of an overwrite); and how many rows are stale.
    `current` (an update): only rows made with one of these settings ids count as done; the others are stale, to be
    re-run and replaced."""
    if dry_run and job.overwrite:
        return None, None, 0
    files = folder.shards() if files is None else files
    pending = [f for attempt in folder.pending.files().values() for f in attempt]
    waiting = ids.read_ids(pending, job.storage) if pending else None
    if not files:
        return None, waiting, 0
    if current is None:
        return ids.read_ids(files, job.storage), waiting, 0
    rows = read_shards(files, job.storage, ["id", "settings"]).materialize()
    now = pa.array(current, pa.string())
    done = rows.map_batches(lambda b: b.filter(pc.is_in(pc.fill_null(b.column("settings"), ""), value_set=now)),
                            batch_format="pyarrow", batch_size=None).select_columns(["id"]).materialize()
    return done, waiting, rows.count() - done.count()


def plan_run(job: JobConfig, folder: OutputFolder, echo: Echo, *, dry_run: bool = False,
             current: list[str] | None = None) -> RunPlan:
    """Resume as Ray Data work: which samples still have rows to write, and which of their rows are already there.
    `current` (an update): the settings ids of rows that count as done; rows of other settings are re-run."""
    try:
        inputs = read_job_inputs(job, folder)
    except InputError as err:
        raise JobError(f"input: {err}") from None
    schema = inputs.samples.schema()  # None when nothing is new (an incremental run with no new object)
    columns = schema.names if schema is not None else ["id", "uri"]
    clash = sorted(reserved_columns(job) & set(columns))
    if clash:
        raise JobError(f"input {job.input!r} has columns this {job.task} job writes itself: {', '.join(clash)}; rename them")
    expected = inputs.keys.map_batches(expected_rows, fn_kwargs={"job": job}, batch_format="pyarrow", batch_size=None)
    prior = committed_shards(job, folder) if current is None else None
    added = prior.added(folder.shards(detail=True)) if prior else None  # a nightly run reads what is new only
    shards = folder.shards() if added is None else added
    done, waiting, stale = done_ids(job, folder, dry_run=dry_run, current=current, files=shards)
    partitions = partitions_for(rows_to_group(job, inputs, shards))
    counts = ids.count_ids(expected, done, partitions, keep=done is not None or waiting is not None, waiting=waiting)
    repaired = None
    if counts.dup_done and not dry_run:  # ids the output holds twice: keep one row each, then count again
        repaired = repair_output(folder, echo)
        prior = None
        shards = folder.shards()
        done, waiting, stale = done_ids(job, folder, current=current, files=shards)
        partitions = partitions_for(rows_to_group(job, inputs, shards))
        counts = ids.count_ids(expected, done, partitions, keep=True, waiting=waiting)
    if counts.dup_expected:
        raise JobError(f"input: {duplicate_id_error(job.input, ids.first_duplicate_sample(counts.table))}")
    samples = counts.samples
    if (inputs.objects_listed == 0) if job.incremental else samples == 0:
        skipped = f" (skipped: {inputs.skipped})" if inputs.skipped else ""
        raise JobError(f"input {job.input!r}: no images or videos found{skipped}")
    rows_in = counts.rows_any + (prior.rows if prior else 0) if job.incremental else counts.rows_expected
    todo, samples_todo = inputs.samples, samples
    if counts.rows_done:
        todo, samples_todo = ids.todo_samples(inputs.samples, counts.table, counts.missing, partitions,
                                                multi_row=multi_row(job, columns))
    plan = RunPlan(inputs=inputs, samples=samples, rows_in=rows_in, rows_expected=counts.rows_expected,
                   rows_done=counts.rows_done, samples_todo=samples_todo, todo=todo, input_columns=columns,
                   rows_duplicated=counts.dup_done, rows_repaired=repaired.removed if repaired else 0, rows_stale=stale,
                   committed=len(prior.shards) if prior else None,
                   stamp=run_stamp() if job.incremental else "")
    if inputs.listing and inputs.listing.note():
        echo(inputs.listing.note())
    if job.incremental:
        echo(f"incremental: {samples} of {inputs.objects_listed} objects are new or changed since the last successful run"
             + (f"; {plan.committed} shard(s) committed by earlier runs are not read again" if plan.committed else ""))
    echo(f"{samples} samples ({rows_in} output rows) from {job.input}"
         + (f"; skipped non-media files {inputs.skipped}" if inputs.skipped else ""))
    plan.rows_waiting = counts.rows_waiting
    if stale:
        echo(f"update: {stale} row(s) in {job.output} were made with other settings; "
             + ("a run with --update re-runs them and replaces them in place" if dry_run else
                "they are re-run and replaced in place (each old row stays until its new one is written)"))
    if plan.rows_done:
        echo(f"resuming: {plan.rows_done - plan.rows_waiting} of {plan.rows_expected} rows are already in {job.output}"
             + (f", {plan.rows_waiting} wait for a retry" if plan.rows_waiting else "")
             + f"; {samples_todo} samples to process")
    waiting = waiting_rows(folder) if plan.rows_waiting else {}
    if waiting:
        echo("retry: " + ", ".join(f"{n} row(s) wait for attempt {a}" for a, n in waiting.items())
             + f" (in {folder.child(RETRY_DIR)})")
    if plan.rows_duplicated:
        echo(f"{plan.rows_duplicated} ids appear more than once in {job.output}; a run repairs them first, keeping "
             f"{KEEP_RULE}")
    return plan


def rows_to_group(job: JobConfig, inputs: Inputs, files: list[Any]) -> int | None:
    """About how many rows the plan's id shuffle groups (None: unknown without reading the input): the expected
    rows, from a listing's or a materialized input's size (or a count taken before the rows are read: an inventory's
    media objects, Parquet footers), and the output shards' rows."""
    samples = inputs.listing.rows.count() if inputs.listing is not None else known_rows(inputs.keys)
    samples = known_rows(inputs.samples) if samples is None else samples  # keys derived from materialized samples
    samples = inputs.counted if samples is None else samples
    if samples is None:
        return None
    return samples * max(1, len(job.questions or [])) + shard_rows(files, job.rows_per_shard)


def waiting_rows(folder: OutputFolder) -> dict[int, int]:
    """Rows set aside for a retry pass, by attempt (from the files' footers)."""
    import pyarrow.parquet as pq

    counts = {}
    for attempt, files in folder.pending.files().items():
        fs, _ = get_filesystem(files[0], folder.storage)
        counts[attempt] = sum(pq.ParquetFile(get_filesystem(f, folder.storage)[1], filesystem=fs).metadata.num_rows
                              for f in files)
    return counts


def multi_row(job: JobConfig, columns: list[str]) -> bool:
    """Whether a sample may produce several output rows (so it may be half written)."""
    return job.task != "score" and (len(job.questions or []) > 1 or "questions" in columns)



def committed_shards(job: JobConfig, folder: OutputFolder) -> Committed | None:
    """Incremental: the shards earlier successful runs committed, when the output's index holds (run/committed.py)."""
    if not job.incremental:
        return None
    criteria = job.score_criteria() if job.task == "score" else []
    names = totals_names(score_columns_of(criteria), job.has_filter)
    return read_committed(folder, folder.shards(detail=True), names)
