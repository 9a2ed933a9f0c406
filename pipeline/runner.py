"""Build and run the Ray Data plan for a job: list -> preprocess (CPU tasks) -> generate (actor pool) -> Parquet.

This is the one module that imports Ray. It also owns preflight checks, resources and the run summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.checkpoints import ModelLoadError, check_checkpoint
from pipeline.config import JobConfig, JobError
from pipeline.incremental import LockedError, list_versions, new_or_changed, read_state, record_run, run_lock
from pipeline.inputs import InputError, InputListing, derive_id, is_manifest, list_inputs
from pipeline.output import (
    JOB_FILE,
    SUCCESS_FILE,
    RunSummary,
    clear_results,
    existing_ids,
    read_marker,
    remove_marker,
    replica_usage,
    shard_files,
    summarize_output,
    write_marker,
    write_success,
)
from pipeline.replica import remove_replica_groups, replica_remote_args, replica_resources
from pipeline.stages import Generate, Preprocess, Score, WriteShards
from pipeline.tiling import TILE_SIZE

log = logging.getLogger("internvl_batch")

# Input rows per block: two model batches. Small blocks keep the CPU stage's tile output per task well under
# 128 MiB, spread work over all CPU workers, and let finished rows reach the writer (and a resumed run) early:
# a map task hands on its small text blocks only when it ends.
BLOCK_BATCHES = 2
PREPROCESS_BATCH = 4
# Memory each CPU preprocessing task reserves. Besides being a fair estimate (decoded image + tiles of a small
# batch), it keeps Ray from fusing the CPU stage into the model actors, so the two stages scale independently.
PREPROCESS_MEMORY = 512 * 1024**2
WRITE_CPUS = 0.25  # writing a shard of text rows is light work
# Model batches of tiles per replica that may wait in Ray's object store: enough to keep a replica fed (Ray Data
# shares the budget out among the stages; with 4, a replica on 13-tile photos waited a third of its time), few
# enough that memory stays flat however far the CPU stage runs ahead (bench/memory_scaling.py).
QUEUED_BATCHES = 8
TILE_BYTES = TILE_SIZE * TILE_SIZE * 3
MIN_OBJECT_STORE = 256 * 1024**2
# Tiles leave a CPU task in blocks of about this size (Ray Data's default, 128 MiB, would hold back the tiles of a
# whole 16-row input block of camera photos until the task ends, while the model waits for them).
TILE_BLOCK_BYTES = 32 * 1024**2


class RunError(RuntimeError):
    """The run could not complete; the message says why and what to do."""


@dataclass(frozen=True)
class Resources:
    """What the plan asks of the cluster."""

    replicas: tuple[int, int]  # (min, max); equal for a fixed count
    cpus_per_replica: float
    gpus_per_replica: float
    cpu_workers: int
    tp: int = 1
    on_gpu: bool = False

    def model_stage_args(self) -> dict[str, Any]:
        """map_batches resource arguments of the model stage: the actor holds the device itself (tp = 1), or sits
        in a placement group of tp bundles whose rank actors hold the devices (tp > 1)."""
        if self.tp > 1:
            return replica_remote_args(self.tp, on_gpu=self.on_gpu)
        return {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica or None}


def plan_resources(job: JobConfig, *, cluster_cpus: float, cluster_gpus: float, node_gpus: float | None = None) -> Resources:
    """Replicas on GPUs when the job (or auto) says so; CPU workers fill the CPUs the replicas leave.

    `node_gpus` is the most GPUs one node has: a tensor-parallel replica needs tp of them on one node. On CPU the
    replicas' CPUs are taken from the preprocessing workers; on GPU their host CPUs mostly wait on the device.
    """
    compute = job.compute
    tp = compute.tp
    on_gpu = compute.device == "cuda" or (compute.device == "auto" and cluster_gpus > 0)
    gpus_per_replica = float(tp) if tp > 1 else compute.gpus_per_replica
    if on_gpu and cluster_gpus < gpus_per_replica:
        raise RunError(f"compute.device needs GPUs ({gpus_per_replica:g} per replica) but the cluster has {cluster_gpus:g}")
    if on_gpu and tp > 1 and node_gpus is not None and node_gpus < tp:
        raise RunError(f"compute.tp={tp} needs {tp} GPUs on one node; the largest node has {node_gpus:g}")
    cpus_per_replica = replica_resources(tp, on_gpu=on_gpu)["CPU"] if tp > 1 else 1.0
    low, high = compute.replica_range
    left = cluster_cpus - (0 if on_gpu else cpus_per_replica * low)
    if left < 1 and not compute.cpu_workers:
        raise RunError(f"{low} replica(s) with tp={tp} on CPU take {cpus_per_replica * low:g} of the cluster's "
                       f"{cluster_cpus:g} CPUs and leave none for preprocessing; use fewer replicas or a larger cluster")
    return Resources(
        replicas=(low, high),
        cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica if on_gpu else 0.0,
        cpu_workers=compute.cpu_workers or int(max(left, 1)),
        tp=tp,
        on_gpu=on_gpu,
    )


def object_store_budget(job: JobConfig, resources: Resources, cluster_store: float | None = None) -> int:
    """Bytes of object store the plan may use: compute.object_store_mb, else QUEUED_BATCHES batches of the largest
    samples the job allows per replica, at least MIN_OBJECT_STORE and at most half of `cluster_store` (Ray Data's
    own default). Ray Data holds back the CPU stage at this budget, so a run of 10 million inputs queues no more
    tiles than a run of ten thousand."""
    if job.compute.object_store_mb:
        return job.compute.object_store_mb * 1024**2
    per_frame = job.video.tiles_per_frame + (job.tiling.thumbnail and job.video.tiles_per_frame > 1)
    largest = max(job.tiling.max_tiles + job.tiling.thumbnail, job.video.num_frames * per_frame)
    queued = max(MIN_OBJECT_STORE, QUEUED_BATCHES * job.compute.batch_size * largest * TILE_BYTES * resources.replicas[1])
    return queued if cluster_store is None else min(queued, int(cluster_store / 2))


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one; quiet unless something goes wrong."""
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None,
        include_dashboard=False if not os.environ.get("RAY_ADDRESS") else None,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def preprocess_block(block: dict, job: JobConfig) -> Iterator[pa.Table]:
    """Ray task body for the CPU stage: one block of input rows, tiled PREPROCESS_BATCH rows at a time so a task
    never holds more than a few samples' tiles."""
    stage = Preprocess(job)
    for start in range(0, len(block["id"]), PREPROCESS_BATCH):
        yield stage({name: values[start:start + PREPROCESS_BATCH] for name, values in block.items()})


def _gather(batch: pa.Table) -> pa.Table:
    """Identity: its batches of rows_per_shard rows and the remainder leave the task as one block."""
    return batch


def write_batch(batch: pa.Table, job: JobConfig, input_columns: list[str], skip_ids: list[str]) -> pa.Table:
    """Ray task body for the write stage; also counts what it wrote in the Prometheus metrics."""
    stats = WriteShards(job, input_columns, skip_ids)(batch)
    record_metrics(stats.to_pylist()[0])
    return stats


_METRICS: dict[str, Any] = {}


def record_metrics(shard: dict[str, Any]) -> None:
    """Counters exported by Ray's metrics agent (Prometheus): rows by status and error type, tiles, tokens."""
    from ray.util.metrics import Counter

    if not _METRICS:
        _METRICS["rows"] = Counter("internvl_batch_rows", "Output rows written.", tag_keys=("status", "error_type"))
        _METRICS["tiles"] = Counter("internvl_batch_tiles", "Image tiles fed to the model.")
        _METRICS["tokens"] = Counter("internvl_batch_generated_tokens", "Tokens generated.")
    counts = {("ok", ""): int(shard["ok"])}
    counts.update({("error", kind): n for kind, n in json.loads(shard["errors"]).items()})
    for (status, kind), n in counts.items():
        if n:
            _METRICS["rows"].inc(n, tags={"status": status, "error_type": kind})
    for key, column in (("tiles", "tiles"), ("tokens", "generated_tokens")):
        if shard[column]:
            _METRICS[key].inc(int(shard[column]))


def input_rows(rows: pa.Table, per_block: int):
    """The rows to process as a Ray Data source of lazy read tasks, `per_block` rows each.

    ray.data.from_arrow over the same blocks would put one object per block in the driver's object store (~40 KB of
    driver memory each: +28 MiB at 10k inputs); a read task only carries its rows, copied out of the listing,
    since pickling an Arrow slice serialises the whole table it is cut from.
    """
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class InputRows(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return rows.nbytes

        def get_read_tasks(self, parallelism: int, **_: Any) -> list[ReadTask]:
            tasks = []
            for start in range(0, rows.num_rows, per_block):
                part = rows.take(pa.array(range(start, min(start + per_block, rows.num_rows)), pa.int64()))
                meta = BlockMetadata(num_rows=part.num_rows, size_bytes=part.nbytes, input_files=None, exec_stats=None)
                tasks.append(ReadTask(lambda part=part: [part], meta, schema=part.schema))
            return tasks

    return InputRows()


def build_dataset(job: JobConfig, rows: pa.Table, resources: Resources, *, skip_ids: list[str] | None = None):
    """The lazy Ray Data plan: input rows -> tiles -> generated text (one row out per row in)."""
    import ray

    # Reading a block of rows and tiling it run as one task: same resources and concurrency, and exactly one block
    # per read task (Ray Data would otherwise split a small input's blocks for parallelism, which prevents fusing).
    cpu_task = {"num_cpus": 1, "memory": PREPROCESS_MEMORY}
    per_block = BLOCK_BATCHES * job.compute.batch_size
    ds = ray.data.read_datasource(input_rows(rows, per_block), override_num_blocks=-(-rows.num_rows // per_block),
                                  concurrency=resources.cpu_workers, **cpu_task)
    ds = ds.map_batches(preprocess_block, fn_kwargs={"job": job}, batch_size=None, batch_format="numpy",
                        compute=ray.data.TaskPoolStrategy(size=resources.cpu_workers), **cpu_task)
    ds = ds.map_batches(
        Score if job.task == "score" else Generate, fn_constructor_kwargs={"job": job}, batch_size=job.compute.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=resources.replicas[0], max_size=resources.replicas[1]),
        **resources.model_stage_args(),
    )
    # Writing: one writer per replica at most (shards are light work, and every concurrent writer is a worker
    # process). Rows are first gathered into blocks of at least rows_per_shard rows (a batch_size would also cut off
    # the bundle's remainder, leaving a tiny shard beside every full one), then each block is one shard.
    writer = {"batch_format": "pyarrow", "num_cpus": WRITE_CPUS, "compute": ray.data.TaskPoolStrategy(size=resources.replicas[1])}
    ds = ds.map_batches(_gather, batch_size=job.rows_per_shard, zero_copy_batch=True, **writer)
    return ds.map_batches(write_batch, fn_kwargs={"job": job, "input_columns": rows.column_names, "skip_ids": skip_ids or []},
                          batch_size=None, **writer)


def _check_output_state(job: JobConfig, echo: Callable[[str], None]) -> None:
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
            "prompt, questions, tiling, video sampling and generation must match to resume; choose another output "
            "or pass --set overwrite=true to start a new run there"
        )


def expected_ids(job: JobConfig, rows: pa.Table) -> list[list[str]]:
    """Per sample, the ids of the output rows it must produce (one per question)."""
    default = len(job.questions) if job.questions else 1
    counts = ([default] * rows.num_rows if "questions" not in rows.column_names else
              [n if n > 0 else default for n in pc.list_value_length(rows.column("questions")).fill_null(0).to_pylist()])
    if job.task == "score":
        counts = [1] * rows.num_rows
    return [[sid] if n == 1 else [f"{sid}#{k}" for k in range(n)]
            for sid, n in zip(rows.column("id").to_pylist(), counts)]


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
        with run_lock(job.output, job.storage):
            return _run(job, echo)
    except LockedError as err:
        raise JobError(str(err)) from None


def _take_new_or_changed(job: JobConfig, listing: InputListing, echo: Callable[[str], None]) -> tuple[InputListing, dict[str, str]]:
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


def _run(job: JobConfig, echo: Callable[[str], None]) -> RunSummary:
    """Preflight, plan what is left to do, run the Ray Data plan over it, then account for every row."""
    import ray

    started = time.perf_counter()
    try:  # preflight: seconds, before any model loads
        _check_output_state(job, echo)
        check_checkpoint(job.model, job.storage)
        listing = list_inputs(job.input, job.storage)
    except ModelLoadError as err:
        raise JobError(str(err)) from None
    except InputError as err:
        raise JobError(f"input: {err}") from None
    except PermissionError as err:
        raise JobError(f"access denied ({err}) reading {job.input!r} or {job.output!r}; check the AWS credentials "
                       "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile or role)") from None
    if listing.table.num_rows == 0:
        raise JobError(f"input {job.input!r}: no images or videos found" + (f" (skipped: {listing.skipped})" if listing.skipped else ""))
    taken: dict[str, str] = {}
    if job.incremental:
        listing, taken = _take_new_or_changed(job, listing, echo)
    per_sample = expected_ids(job, listing.table)
    done = set(existing_ids(job.output, job.storage))
    this_run = {r for ids in per_sample for r in ids}
    rows_in = len(this_run) + (len(done - this_run) if job.incremental else 0)  # earlier runs' rows stay
    todo = [i for i, ids in enumerate(per_sample) if not all(r in done for r in ids)]
    skip_ids = sorted(r for i in todo for r in per_sample[i] if r in done)  # rows of half-written samples
    echo(f"{listing.table.num_rows} samples ({rows_in} output rows) from {job.input}"
         + (f"; skipped non-media files {listing.skipped}" if listing.skipped else ""))
    if done & this_run:
        echo(f"resuming: {len(done & this_run)} of {len(this_run)} rows are already in {job.output}; "
             f"{len(todo)} samples to process")
    if not todo:
        echo("nothing to do: every row of this job is already in the output")
        return _finish(job, listing, rows_in=rows_in, started=started, this_run=[], taken=taken)
    try:
        write_marker(job.output, JOB_FILE, {"fingerprint": job.fingerprint(), "task": job.task, "model": job.model,
                                            "model_revision": job.model_revision}, job.storage)
        remove_marker(job.output, SUCCESS_FILE, job.storage)  # the output is being extended
    except PermissionError as err:
        raise JobError(f"output {job.output!r}: access denied ({err}); check the AWS credentials") from None

    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stdout.isatty()
    ctx.execution_options.preserve_order = False
    ctx.target_max_block_size = TILE_BLOCK_BYTES
    cluster = ray.cluster_resources()
    node_gpus = max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    resources = plan_resources(job, cluster_cpus=cluster.get("CPU", 1), cluster_gpus=cluster.get("GPU", 0), node_gpus=node_gpus)
    low, high = resources.replicas
    budget = object_store_budget(job, resources, cluster.get("object_store_memory"))
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(object_store_memory=budget)
    echo(f"{low if low == high else f'{low}-{high}'} replica(s)" + (f" of tp={resources.tp}" if resources.tp > 1 else "")
         + f", {resources.cpu_workers} CPU worker(s), {resources.gpus_per_replica:g} GPU(s) per replica, "
         f"{budget / 1024**2:.0f} MiB object store for queued tiles")

    rows = listing.table.take(pa.array(todo, pa.int64())) if len(todo) < listing.table.num_rows else listing.table
    shards: list[dict] = []
    written = 0
    try:
        for shard in build_dataset(job, rows, resources, skip_ids=skip_ids).iter_rows():  # one row per shard
            shards.append(shard)
            written += int(shard["rows"])
            elapsed = time.perf_counter() - started
            if shard["file"]:
                echo(f"[{written}/{len(this_run - done)}] {shard['file']}: {shard['rows']} rows, "
                     f"{shard['rows'] - shard['ok']} errors ({written / elapsed:.2f} rows/s)")
    except Exception as err:  # noqa: BLE001 - Ray wraps the cause; report it, keep what was written
        text = str(err).strip()
        cause = next((line for line in text.splitlines() if "ModelLoadError" in line), text.splitlines()[-1] if text else "")
        hint = ("fix the model and re-run" if "ModelLoadError" in text else "re-run the same job to resume")
        raise RunError(f"the run stopped: {type(err).__name__}: {cause}. The {written} rows written so far are kept; "
                       f"{hint}.") from err
    finally:
        if resources.tp > 1:
            remove_replica_groups()
    return _finish(job, listing, rows_in=rows_in, started=started, this_run=shards, taken=taken)


def _finish(job: JobConfig, listing: InputListing, *, rows_in: int, started: float, this_run: list[dict],
            taken: dict[str, str]) -> RunSummary:
    """Read the whole output back, check every row is there exactly once, then write _SUCCESS.json."""
    criteria = job.score_criteria() if job.task == "score" else []
    counts = summarize_output(job.output, job.storage, criteria=criteria, with_passed=job.has_filter)
    summary = RunSummary(
        rows_in=rows_in, rows_out=counts["rows_out"], rows_ok=counts["rows_ok"], rows_error=counts["rows_error"],
        errors_by_type=counts["errors_by_type"], tiles=counts["tiles"], input_tokens=counts["input_tokens"],
        generated_tokens=counts["generated_tokens"], wall_s=time.perf_counter() - started,
        fingerprint=job.fingerprint(), task=job.task, model=job.model, output=job.output, files=counts["files"],
        skipped_inputs=listing.skipped, score_histograms=counts["histograms"], rows_passed=counts["rows_passed"],
        rows_this_run=sum(int(s["rows"]) for s in this_run), tiles_this_run=sum(int(s["tiles"]) for s in this_run),
        tokens_this_run=sum(int(s["generated_tokens"]) for s in this_run),
    )
    summary.model_busy_fraction, summary.replicas = replica_usage(
        [b for s in this_run for b in json.loads(s.get("batches") or "[]")])
    if counts["rows_out"] != rows_in or counts["unique_ids"] != rows_in:
        raise RunError(
            f"accounting failed: {rows_in} rows expected, {counts['rows_out']} rows in the output "
            f"({counts['unique_ids']} distinct ids); _SUCCESS.json not written"
        )
    if job.incremental:
        record_run(job.output, taken, job.storage)
        summary.objects_taken = len(taken)
    write_success(job.output, summary, job.storage)
    return summary
