"""What a run asks of the cluster: replicas and their devices, CPU workers, the object-store budget for queued tiles,
and how a vLLM replica's GPU is shared between our vision tower and vLLM.

Pure arithmetic over the job and the cluster's totals; the Ray calls that read those totals are in run/execute.py
(and, for the GPU's memory, run/estimate.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import JobError, RunError
from pipeline.media.tiling import TILE_SIZE
from pipeline.model.device import wants_gpu
from pipeline.model.engines import VLLM_ENGINES, Engine, choose_engine
from pipeline.model.gpu_memory import MemorySplit, describe_split, largest_sample_tiles, split_for_job
from pipeline.run.replica import RANK_CPUS

# A CPU preprocessing task; on CPU the replicas always leave room for one, or the run could not move.
PREPROCESS_CPUS = 1.0
WRITE_CPUS = 0.25  # writing a shard of text rows is light work (it runs between preprocessing tasks)

# Model batches of tiles per replica that may wait in Ray's object store: enough to keep a replica fed (Ray Data
# shares the budget out among the stages; with 4, a replica on 13-tile photos waited a third of its time), few
# enough that memory stays flat however far the CPU stage runs ahead (bench/memory_scaling.py).
QUEUED_BATCHES = 8
TILE_BYTES = TILE_SIZE * TILE_SIZE * 3
MIN_OBJECT_STORE = 256 * 1024**2
# Restarts of a vLLM replica whose engine died (Ray Data's default is unbounded: an input that kills vLLM's engine
# every time would loop forever); past them the run stops with the cause.
VLLM_RESTARTS = 3


@dataclass(frozen=True)
class Resources:
    """What the plan asks of the cluster."""

    replicas: tuple[int, int]  # (min, max); equal for a fixed count
    cpus_per_replica: float
    gpus_per_replica: float
    cpu_workers: int
    tp: int = 1
    on_gpu: bool = False
    engine: Engine = "transformers"
    concurrent_batches: int = 1  # model batches in flight per replica (vLLM: compute.vllm.max_concurrent_batches)
    batch_size: int = 8  # samples per model batch (compute.batch_size, else the engine's default)
    note: str | None = None  # one line for the run's log when the plan bends a rule (CPUs shared on a small machine)

    @property
    def rank_cpus(self) -> float:
        """CPUs one tensor-parallel rank reserves (its placement-group bundle); below 1 where ranks share CPUs."""
        return self.cpus_per_replica / self.tp

    def model_stage_args(self) -> dict[str, Any]:
        """map_batches resource arguments of the model stage. transformers: the actor holds the device itself
        (tp = 1), or holds nothing and reserves a placement group of tp bundles for its rank actors (tp > 1,
        run/replica.py). vLLM (either vLLM engine): the actor holds all tp GPUs of its replica (Ray puts them on one node) and vLLM's
        own workers use them; its async __call__ runs `concurrent_batches` batches at once (max_concurrency); a
        replica whose vLLM engine died ends its process (stages/model_stage.AsyncStage), and Ray starts it again
        (up to VLLM_RESTARTS times) and re-runs its batches in flight (max_task_retries)."""
        if self.engine in VLLM_ENGINES:
            return {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica or None,
                    "max_concurrency": self.concurrent_batches, "max_restarts": VLLM_RESTARTS, "max_task_retries": -1}
        if self.tp > 1:
            return {"num_cpus": 0, "num_gpus": 0}
        return {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica or None}


def resources_for(job: JobConfig, *, cluster_cpus: float, cluster_gpus: float, node_gpus: float | None = None,
                   vllm_installed: bool = False) -> Resources:
    """Replicas on GPUs when the job (or auto) says so, with the engine compute.engine picks for them
    (model/engines.py: vLLM needs `vllm_installed`); CPU workers fill the CPUs the replicas leave.

    `node_gpus` is the most GPUs one node has: a tensor-parallel replica needs tp of them on one node; too few GPUs
    is refused. On GPU the replicas' host CPUs mostly wait on the device. On CPU the replicas' CPUs are taken from
    the preprocessing workers, and where they would leave less than one preprocessing task, the
    replicas (and a replica's tp ranks) share what is left: slower, but tp and several replicas run on a laptop,
    which is what tp on CPU is for (trying it before a GPU cluster).
    """
    compute = job.compute
    tp = compute.tp
    on_gpu = wants_gpu(compute.device, gpus_available=cluster_gpus)
    engine = choose_engine(compute.engine, on_gpu=on_gpu, vllm_installed=vllm_installed)
    gpus_per_replica = float(tp) if tp > 1 else compute.gpus_per_replica
    if on_gpu and cluster_gpus < gpus_per_replica:
        raise RunError(f"compute.device needs GPUs ({gpus_per_replica:g} per replica) but the cluster has {cluster_gpus:g}")
    if on_gpu and tp > 1 and node_gpus is not None and node_gpus < tp:
        raise RunError(f"compute.tp={tp} needs {tp} GPUs on one node; the largest node has {node_gpus:g}")
    # a transformers tp > 1 replica reserves host CPUs per rank; a vLLM replica is one actor (its workers are
    # vLLM's processes)
    cpus_per_replica = RANK_CPUS * tp if engine == "transformers" else RANK_CPUS
    low, high = compute.replica_range
    note = None
    if not on_gpu:
        room = cluster_cpus - PREPROCESS_CPUS  # what the replicas may take and the run still moves
        if room <= 0:
            raise RunError(f"the cluster's {cluster_cpus:g} CPU(s) leave none for {low} replica(s) on CPU next to "
                           f"a preprocessing task ({PREPROCESS_CPUS:g}); use a larger cluster")
        if cpus_per_replica * low > room:
            cpus_per_replica = room / low
            what = f"{low} replica(s) of tp={tp}" if tp > 1 else f"{low} replica(s)"
            note = (f"CPUs shared: {what} take {room:g} of the cluster's {cluster_cpus:g} CPUs together "
                    f"({cpus_per_replica / tp:.2g} per {'rank' if tp > 1 else 'replica'}), so they run slower than "
                    "on their own cores; fine for trying tp or replicas, not for throughput")
    left = cluster_cpus - (0 if on_gpu else cpus_per_replica * low)
    return Resources(
        replicas=(low, high),
        cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica if on_gpu else 0.0,
        cpu_workers=compute.cpu_workers or int(max(left, 1)),
        tp=tp,
        on_gpu=on_gpu,
        engine=engine,
        concurrent_batches=compute.vllm.max_concurrent_batches if engine in VLLM_ENGINES else 1,
        batch_size=compute.batch_size_for(engine),
        note=note,
    )


def object_store_budget(job: JobConfig, resources: Resources, cluster_store: float | None = None) -> int:
    """Bytes of object store the plan may use: compute.object_store_mb, else QUEUED_BATCHES batches of the largest
    samples the job allows per replica, at least MIN_OBJECT_STORE and at most half of `cluster_store` (Ray Data's
    own default). Ray Data holds back the CPU stage at this budget, so a run of 10 million inputs queues no more
    tiles than a run of ten thousand."""
    if job.compute.object_store_mb:
        return job.compute.object_store_mb * 1024**2
    largest = largest_sample_tiles(job)
    queued = max(MIN_OBJECT_STORE, QUEUED_BATCHES * resources.batch_size * largest * TILE_BYTES * resources.replicas[1])
    return queued if cluster_store is None else min(queued, int(cluster_store / 2))


def replica_memory(job: JobConfig, resources: Resources, *, config: Mapping[str, Any] | None,
                   gpu_gib: float | None) -> MemorySplit | None:
    """How one vLLM replica's GPU is shared between our vision tower and vLLM (model/gpu_memory.py), for a GPU of
    gpu_gib and the checkpoint's config; None where there is no such split (the transformers engine, replicas on
    CPU, an unknown GPU or config). A model that cannot fit is refused here, before anything runs, with its numbers."""
    if resources.engine != "vllm" or not resources.on_gpu or config is None or gpu_gib is None:
        return None
    split = split_for_job(job, config, gpu_gib)
    if not split.fits:
        raise JobError(f"model {job.model!r} does not fit a {gpu_gib:g} GiB GPU at compute.tp={job.compute.tp}: "
                       f"{split.reason}. The split: {describe_split(split)}. Use a larger compute.tp, GPUs with more "
                       "memory, or a shorter compute.vllm.max_model_len")
    return split
