"""Before the run: preflight checks (seconds, no Ray, no model) and the plan of what is left to do (resume).

Preflight reads the output's state and the model's config.json, and probes the input. The plan is Ray Data work:
the expected output rows (one per question) and the ids already in the output are grouped by id in one
distributed aggregation, which finds duplicate input ids, rows done and rows left; the samples with rows left are
found by a join. The driver keeps counts only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.credentials import is_missing_credentials, missing_credentials_message
from pipeline.errors import InputError, JobError, ModelLoadError
from pipeline.io.incremental import run_stamp
from pipeline.io.inputs import duplicate_id_error, input_kind
from pipeline.io.listing import inventory_spec, is_glob, glob_root, manifest_files
from pipeline.io.markers import JOB_FILE, read_marker
from pipeline.io.passed import remove_orphans
from pipeline.io.retry import pending_files
from pipeline.io.schema import reserved_columns
from pipeline.io.shards import clear_results, existing_results, shard_files, shard_urls
from pipeline.io.storage import get_filesystem
from pipeline.io.webdataset import has_braces, probe_shards
from pipeline.model.checkpoints import check_checkpoint
from pipeline.run import ids
from pipeline.run.sources import Inputs, read_inputs

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
    rows_duplicated: int = 0  # ids the output already holds more than once (the run then fails its accounting)
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
                "rows_waiting": self.rows_waiting,
                "skipped": self.skipped, "objects_listed": self.inputs.objects_listed, "estimate": self.estimate}


def preflight(job: JobConfig, echo: Echo, *, dry_run: bool = False) -> None:
    """Check the output's state and the model, and probe the input; every failure is a JobError naming its cause."""
    try:
        check_output_state(job, echo, dry_run=dry_run)
        check_checkpoint(job.model, job.storage)
        probe_input(job)
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


def probe_input(job: JobConfig) -> None:
    """The input exists (a manifest's files are listed, a prefix's first entry looked up), without listing it."""
    kind = input_kind(job.input, job.input_format)
    if job.incremental and kind == "manifest":
        raise JobError("incremental: needs a prefix, glob or inventory input (object versions come from the listing), "
                       "not a manifest")
    if job.image_column and kind != "manifest":
        raise InputError(f"image_column: needs a Parquet manifest as input; {job.input!r} is read as {kind}")
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


def check_output_state(job: JobConfig, echo: Echo, *, dry_run: bool = False) -> None:
    """Overwrite clears (a dry run only says so); otherwise an output may only be resumed by the configuration that
    started it."""
    targets = [job.output] + ([job.output_passed] if job.output_passed else [])
    if job.overwrite:
        for target in targets:
            if dry_run:
                found = len(existing_results(target, job.storage))
                if found:
                    echo(f"overwrite: would remove {found} earlier result files from {target}")
                continue
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


def done_ids(job: JobConfig, *, dry_run: bool = False) -> tuple[Any, Any]:
    """The ids already in the output, and those set aside for a retry pass (done for the first pass), as datasets,
    or None (none there; a dry run of an overwrite)."""
    if dry_run and job.overwrite:
        return None, None
    files = shard_urls(job.output, job.storage)
    waiting = [f for attempt in pending_files(job.output, job.storage).values() for f in attempt]
    return (ids.read_ids(files, job.storage) if files else None), (ids.read_ids(waiting, job.storage) if waiting else None)


def plan_run(job: JobConfig, echo: Echo, *, dry_run: bool = False) -> RunPlan:
    """Resume as Ray Data work: which samples still have rows to write, and which of their rows are already there."""
    partitions = ids.partitions_for(job)
    try:
        inputs = read_inputs(job, partitions)
    except InputError as err:
        raise JobError(f"input: {err}") from None
    schema = inputs.samples.schema()  # None when nothing is new (an incremental run with no new object)
    columns = schema.names if schema is not None else ["id", "uri"]
    clash = sorted(reserved_columns(job) & set(columns))
    if clash:
        raise JobError(f"input {job.input!r} has columns this {job.task} job writes itself: {', '.join(clash)}; rename them")
    expected = inputs.keys.map_batches(expected_rows, fn_kwargs={"job": job}, batch_format="pyarrow", batch_size=None)
    done, waiting = done_ids(job, dry_run=dry_run)
    counts = ids.count_ids(expected, done, partitions, keep=done is not None or waiting is not None, waiting=waiting)
    if counts.dup_expected:
        raise JobError(f"input: {duplicate_id_error(job.input, ids.first_duplicate_sample(counts.table))}")
    samples = counts.samples
    if (inputs.objects_listed == 0) if job.incremental else samples == 0:
        skipped = f" (skipped: {inputs.skipped})" if inputs.skipped else ""
        raise JobError(f"input {job.input!r}: no images or videos found{skipped}")
    rows_in = counts.rows_any if job.incremental else counts.rows_expected
    todo, samples_todo = inputs.samples, samples
    if counts.rows_done:
        todo, samples_todo = ids.todo_samples(inputs.samples, counts.table, counts.missing, partitions,
                                                multi_row=multi_row(job, columns))
    plan = RunPlan(inputs=inputs, samples=samples, rows_in=rows_in, rows_expected=counts.rows_expected,
                   rows_done=counts.rows_done, samples_todo=samples_todo, todo=todo, input_columns=columns,
                   rows_duplicated=counts.dup_done, stamp=run_stamp() if job.incremental else "")
    if job.incremental:
        echo(f"incremental: {samples} of {inputs.objects_listed} objects are new or changed since the last successful run")
    echo(f"{samples} samples ({rows_in} output rows) from {job.input}"
         + (f"; skipped non-media files {inputs.skipped}" if inputs.skipped else ""))
    plan.rows_waiting = counts.rows_waiting
    if plan.rows_done:
        echo(f"resuming: {plan.rows_done - plan.rows_waiting} of {plan.rows_expected} rows are already in {job.output}"
             + (f", {plan.rows_waiting} wait for a retry" if plan.rows_waiting else "")
             + f"; {samples_todo} samples to process")
    waiting = waiting_rows(job) if plan.rows_waiting else {}
    if waiting:
        echo("retry: " + ", ".join(f"{n} row(s) wait for attempt {a}" for a, n in waiting.items())
             + f" (in {job.output.rstrip('/')}/_retry)")
    if plan.rows_duplicated:
        echo(f"warning: {plan.rows_duplicated} ids appear more than once in {job.output}; the run's accounting will fail")
    return plan


def waiting_rows(job: JobConfig) -> dict[int, int]:
    """Rows set aside for a retry pass, by attempt (from the files' footers)."""
    import pyarrow.parquet as pq

    counts = {}
    for attempt, files in pending_files(job.output, job.storage).items():
        fs, _ = get_filesystem(files[0], job.storage)
        counts[attempt] = sum(pq.ParquetFile(get_filesystem(f, job.storage)[1], filesystem=fs).metadata.num_rows
                              for f in files)
    return counts


def multi_row(job: JobConfig, columns: list[str]) -> bool:
    """Whether a sample may produce several output rows (so it may be half written)."""
    return job.task != "score" and (len(job.questions or []) > 1 or "questions" in columns)

