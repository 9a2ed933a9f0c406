"""Run the plan on Ray: connect, size the replicas and CPU workers, stream the shards, report progress."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.config.fingerprint import Resolved, identity, output_fingerprint, settings, settings_id
from pipeline.errors import JobError, LeaseLostError, RunError
from pipeline.io.output import OutputFolder
from pipeline.model.checkpoints import checkpoint_id
from pipeline.model.engines import vllm_installed
from pipeline.run.dataset import build_dataset
from pipeline.run.plan import RunPlan
from pipeline.run.quiet import quiet_ray_data
from pipeline.run.replica import remove_replica_groups
from pipeline.run.resources import Resources, object_store_budget, resources_for
from pipeline.run.summary import RunTally
from pipeline.stages.write import ShardStats

# A resumed run with at most this many samples left reads them from memory (their read fuses with the CPU stage).
SMALL_TODO = 4096
# Tiles leave a CPU task in blocks of about this size (Ray Data's default, 128 MiB, would hold back the tiles of a
# whole 16-row input block of camera photos until the task ends, while the model waits for them).
TILE_BLOCK_BYTES = 32 * 1024**2


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
    quiet_ray_data()  # the plan runs Ray Data (listing, resume) before execute configures it
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()


def mark_output(job: JobConfig, folder: OutputFolder, resolved: Resolved) -> None:
    """Record which job and settings this output belongs to, and that it is being extended (no _SUCCESS.json)."""
    values = settings(job, resolved)
    try:
        folder.begin({"fingerprint": output_fingerprint(job, resolved), "job_fingerprint": job.fingerprint(),
                      "settings": values, "settings_id": settings_id(values), "identity": identity(job),
                      "task": job.task, "model": job.model, "model_revision": job.model_revision,
                      "output_passed": job.output_passed})
    except PermissionError as err:
        raise JobError(f"output {job.output!r}: access denied ({err}); check the AWS credentials") from None


def cluster_resources(job: JobConfig) -> Resources:
    """resources_for for the connected cluster."""
    import ray

    cluster = ray.cluster_resources()
    node_gpus = max((n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    return resources_for(job, cluster_cpus=cluster.get("CPU", 1), cluster_gpus=cluster.get("GPU", 0), node_gpus=node_gpus,
                          vllm_installed=vllm_installed())


def configure_data_context(budget: int) -> None:
    """Ray Data settings of a run: progress bars on terminals only, no ordering, small tile blocks, the budget."""
    import ray

    quiet_ray_data()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stdout.isatty()
    ctx.execution_options.preserve_order = False
    ctx.target_max_block_size = TILE_BLOCK_BYTES
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(object_store_memory=budget)


def find_cause(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The exception of type `kind` behind `err` (Ray wraps a worker's exception in its own), if any."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else None]
    return None


def todo_rows(plan: RunPlan) -> Any:
    """The samples left to do: a dataset, or an Arrow table when they are few (SMALL_TODO)."""
    import ray

    if plan.samples_todo > SMALL_TODO or not plan.inputs.gather:
        return plan.todo
    tables = [t for t in ray.get(plan.todo.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else plan.todo


def resolve(job: JobConfig) -> Resolved:
    """What this run resolves that the job file leaves open: engine and dtype on the connected cluster, and the
    checkpoint's content."""
    resources = cluster_resources(job)
    dtype = job.compute.dtype if job.compute.dtype != "auto" else ("bfloat16" if resources.on_gpu else "float32")
    return Resolved(engine=resources.engine, dtype=dtype,
                    checkpoint=checkpoint_id(job.model, job.model_revision, job.storage))


def execute(job: JobConfig, folder: OutputFolder, plan: RunPlan, echo: Callable[[str], None], *, started: float,
            resolved: Resolved, attempt: int = 1, tally: RunTally | None = None, staged: bool = False) -> RunTally:
    """Run the Ray Data plan over the samples left to do; the written shards' stats, summed as they arrive.
    `attempt` > 1: a retry pass, `job` with its rung applied (the output was marked by the first pass). `staged`:
    an update, whose rows wait in `_update/` until run/update.py places them."""
    import ray

    if attempt == 1:
        mark_output(job, folder, resolved)
    values = settings(job, resolved)
    folder.record_settings(settings_id(values), values)
    resources = cluster_resources(job)
    budget = object_store_budget(job, resources, ray.cluster_resources().get("object_store_memory"))
    configure_data_context(budget)
    low, high = resources.replicas
    echo(f"{low if low == high else f'{low}-{high}'} {resources.engine} replica(s)"
         + (f" of tp={resources.tp}" if resources.tp > 1 else "")
         + f", {resources.cpu_workers} CPU worker(s), {resources.gpus_per_replica:g} GPU(s) per replica, "
         f"{budget / 1024**2:.0f} MiB object store for queued tiles")
    if resources.note:
        echo(resources.note)
    tally = tally if tally is not None else RunTally()
    written = 0
    try:
        dataset = build_dataset(job, folder, todo_rows(plan), resources, input_columns=plan.input_columns,
                                attempt=attempt, settings_id=settings_id(values), staged=staged)
        for row in dataset.iter_rows():  # one row per shard
            shard = ShardStats.from_row(row)
            tally.add(shard.rows, shard.tiles, shard.generated_tokens, shard.batches, shard=bool(shard.file),
                      deferred=shard.deferred)
            written += shard.rows
            if shard.file or shard.deferred:
                aside = f", {shard.deferred} set aside to retry" if shard.deferred else ""
                echo(f"[{written}/{plan.rows_todo}] {shard.file or '(retry only)'}: {shard.rows} rows, "
                     f"{shard.rows - shard.ok} errors{aside} ({written / (time.perf_counter() - started):.2f} rows/s)")
    except Exception as err:  # noqa: BLE001 - Ray wraps the cause; report it, keep what was written
        from ray.exceptions import RayActorError

        kept = f"The {written} rows written so far are kept"
        lost = find_cause(err, LeaseLostError)
        if lost is not None:
            raise RunError(f"{lost} {kept}; the run that took the output over finishes it.") from err
        died = find_cause(err, RayActorError)
        if died is not None and died.actor_init_failed:  # a model stage actor's constructor: the replica's load
            # Ray keeps only the text of an actor's creation error: its last line names the exception raised there.
            cause = (died.error_msg or "").strip().splitlines()[-1:] or [str(died)]
            raise RunError(f"the run stopped: a model replica could not start: {cause[0]}. {kept}; fix the model "
                           "and re-run.") from err
        text = str(err).strip()
        cause = text.splitlines()[-1] if text else ""
        raise RunError(f"the run stopped: {type(err).__name__}: {cause}. {kept}; re-run the same job to resume.") from err
    finally:
        if resources.tp > 1 and resources.engine == "transformers":
            remove_replica_groups()
    return tally
