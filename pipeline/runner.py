"""Build and run the Ray Data plan for a job: list -> preprocess (CPU tasks) -> generate (actor pool) -> Parquet.

This is the one module that imports Ray. It also owns preflight checks, resources and the run summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.checkpoints import ModelLoadError, check_checkpoint
from pipeline.config import JobConfig, JobError
from pipeline.inputs import InputError, list_inputs
from pipeline.output import RunSummary, clear_results, existing_results, write_success
from pipeline.stages import Generate, Preprocess, Score, WriteShards

log = logging.getLogger("internvl_batch")

ROWS_PER_BLOCK = 16  # small input blocks: the CPU stage's tile output per block stays well under 128 MiB
PREPROCESS_BATCH = 4
# Memory each CPU preprocessing task reserves. Besides being a fair estimate (decoded image + tiles of a small
# batch), it keeps Ray from fusing the CPU stage into the model actors, so the two stages scale independently.
PREPROCESS_MEMORY = 512 * 1024**2
WRITE_CPUS = 0.25  # writing a shard of text rows is light work


class RunError(RuntimeError):
    """The run could not complete; the message says why and what to do."""


@dataclass(frozen=True)
class Resources:
    """What the plan asks of the cluster."""

    replicas: int
    cpus_per_replica: float
    gpus_per_replica: float
    cpu_workers: int


def plan_resources(job: JobConfig, *, cluster_cpus: float, cluster_gpus: float) -> Resources:
    """Replicas on GPUs when the job (or auto) says so; CPU workers fill the CPUs the replicas leave."""
    compute = job.compute
    on_gpu = compute.device == "cuda" or (compute.device == "auto" and cluster_gpus > 0)
    if on_gpu and cluster_gpus < compute.gpus_per_replica:
        raise RunError(f"compute.device needs GPUs but the cluster has {cluster_gpus:g}")
    cpus_per_replica = 1.0
    left = max(cluster_cpus - (0 if on_gpu else cpus_per_replica * compute.replicas), 1)
    return Resources(
        replicas=compute.replicas,
        cpus_per_replica=cpus_per_replica,
        gpus_per_replica=compute.gpus_per_replica if on_gpu else 0.0,
        cpu_workers=compute.cpu_workers or int(left),
    )


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


def preprocess_batch(batch: dict, job: JobConfig) -> pa.Table:
    """Ray task body for the CPU stage."""
    return Preprocess(job)(batch)


def write_batch(batch: pa.Table, job: JobConfig, input_columns: list[str]) -> pa.Table:
    """Ray task body for the write stage."""
    return WriteShards(job, input_columns)(batch)


def build_dataset(job: JobConfig, rows: pa.Table, resources: Resources):
    """The lazy Ray Data plan: input rows -> tiles -> generated text (one row out per row in)."""
    import ray

    # One small block per ROWS_PER_BLOCK input rows, so the CPU stage spreads over all workers from the start.
    blocks = [rows.slice(start, ROWS_PER_BLOCK) for start in range(0, rows.num_rows, ROWS_PER_BLOCK)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        preprocess_batch, fn_kwargs={"job": job}, batch_size=PREPROCESS_BATCH, batch_format="numpy",
        num_cpus=1, memory=PREPROCESS_MEMORY, compute=ray.data.TaskPoolStrategy(size=resources.cpu_workers),
    )
    ds = ds.map_batches(
        Score if job.task == "score" else Generate, fn_constructor_kwargs={"job": job}, batch_size=job.compute.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources.replicas), num_cpus=resources.cpus_per_replica,
        num_gpus=resources.gpus_per_replica or None,
    )
    return ds.map_batches(write_batch, fn_kwargs={"job": job, "input_columns": rows.column_names},
                          batch_size=job.rows_per_shard, batch_format="pyarrow",
                          num_cpus=WRITE_CPUS)


def run_job(job: JobConfig, *, echo: Callable[[str], None] = print) -> RunSummary:
    """Run a job end to end and return its summary; _SUCCESS.json is written last."""
    import ray

    started = time.perf_counter()
    targets = [job.output] + ([job.output_passed] if job.output_passed else [])
    existing = {t: existing_results(t, job.storage) for t in targets}
    for target, files in existing.items():
        if files and not job.overwrite:
            raise JobError(
                f"output {target!r} already holds results ({len(files)} files); "
                "choose another output or pass --set overwrite=true to replace them"
            )
    try:
        check_checkpoint(job.model, job.storage)
    except ModelLoadError as err:
        raise JobError(str(err)) from None
    try:
        listing = list_inputs(job.input, job.storage)
    except InputError as err:
        raise JobError(f"input: {err}") from None
    samples = listing.table.num_rows
    rows_in = expected_rows(job, listing.table)
    if samples == 0:
        raise JobError(f"input {job.input!r}: no images or videos found" + (f" (skipped: {listing.skipped})" if listing.skipped else ""))
    echo(f"{samples} samples ({rows_in} output rows) from {job.input}"
         + (f"; skipped non-media files {listing.skipped}" if listing.skipped else ""))
    for target, files in existing.items():
        if files:
            echo(f"overwrite: removed {clear_results(target, job.storage)} earlier result files from {target}")

    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stdout.isatty()
    ctx.execution_options.preserve_order = False
    cluster = ray.cluster_resources()
    resources = plan_resources(job, cluster_cpus=cluster.get("CPU", 1), cluster_gpus=cluster.get("GPU", 0))
    echo(f"{resources.replicas} replica(s), {resources.cpu_workers} CPU worker(s), "
         f"{resources.gpus_per_replica:g} GPU(s) per replica")

    shards: list[dict] = []
    done = 0
    for shard in build_dataset(job, listing.table, resources).iter_rows():  # one stats row per written shard
        shards.append(shard)
        done += int(shard["rows"])
        elapsed = time.perf_counter() - started
        echo(f"[{done}/{rows_in}] {shard['file']}: {shard['rows']} rows, {shard['rows'] - shard['ok']} errors "
             f"({done / elapsed:.2f} samples/s)")
    summary = summarize_shards(job, shards, rows_in=rows_in, wall_s=time.perf_counter() - started,
                               skipped=listing.skipped)
    if summary.rows_out != rows_in or len({s["file"] for s in shards}) != len(shards):
        raise RunError(
            f"accounting failed: {rows_in} rows in, {summary.rows_out} rows written in {len(shards)} shards; "
            "_SUCCESS.json not written"
        )
    write_success(job.output, summary, job.storage)
    return summary


def expected_rows(job: JobConfig, rows: pa.Table) -> int:
    """Output rows a run must write: one per (sample, question)."""
    default = len(job.questions) if job.questions else 1
    if "questions" not in rows.column_names:
        return rows.num_rows * default
    lengths = pc.list_value_length(rows.column("questions")).fill_null(0).to_pylist()
    return sum(n if n > 0 else default for n in lengths)


def summarize_shards(job: JobConfig, shards: list[dict], *, rows_in: int, wall_s: float, skipped: dict) -> RunSummary:
    """Add up the write stage's per-shard stats."""
    errors: dict[str, int] = {}
    histograms: dict[str, list[int]] = {}
    for shard in shards:
        for kind, count in json.loads(shard["errors"]).items():
            errors[kind] = errors.get(kind, 0) + count
        for name, counts in json.loads(shard["histograms"]).items():
            histograms[name] = [a + b for a, b in zip(histograms.get(name, [0] * len(counts)), counts)]
    total = lambda key: sum(int(s[key]) for s in shards)  # noqa: E731
    return RunSummary(
        rows_in=rows_in, rows_out=total("rows"), rows_ok=total("ok"), rows_error=sum(errors.values()),
        errors_by_type=errors, tiles=total("tiles"), input_tokens=total("input_tokens"),
        generated_tokens=total("generated_tokens"), wall_s=wall_s, fingerprint=job.fingerprint(), task=job.task,
        model=job.model, output=job.output, files=len(shards), skipped_inputs=skipped, score_histograms=histograms,
        rows_passed=total("passed") if job.has_filter else None,
    )
