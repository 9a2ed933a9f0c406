"""Tensor-parallel model replicas on Ray: one replica = tp rank actors, one device each, one torch.distributed group.

The Ray Data actor that feeds a replica holds only the tokenizer (`TensorParallelEngine`). It reserves a placement
group of tp bundles packed on one node (STRICT_PACK), named after the actor so that a restarted actor finds it
again instead of reserving a second one, starts the tp `Rank` actors inside the group, sends every batch to all of them (each computes with its shard of the language
model's weights; NCCL on GPU, gloo on CPU) and returns rank 0's result. If a rank dies, the whole group is
replaced in the same placement group and the batch runs again, so no row is lost or written twice.

With tp = 1 none of this is used: the Ray Data actor holds the model itself (see run/dataset.py).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import functools
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from pipeline.config import JobConfig
from pipeline.model import engines
from pipeline.model.device import wants_gpu
from pipeline.model.engines import Engine

log = logging.getLogger("internvl_batch")

RANK_CPUS = 1.0  # host threads feeding one device (or, on CPU, doing the rank's share of the compute)
GROUP_TIMEOUT = timedelta(minutes=10)  # a collective that waits longer than this means a peer is gone
GROUP_PREFIX = "internvl-batch-replica-"
PLACEMENT_TIMEOUT_S = 1800  # an autoscaling cluster may need a while to add a node with tp free GPUs


def replica_bundles(tp: int, *, on_gpu: bool, rank_cpus: float = RANK_CPUS) -> list[dict[str, float]]:
    """The placement-group bundles of one replica: one per rank, each with one GPU (on GPU) and its host CPU
    (`rank_cpus`: less than one where the run plan lets ranks share the CPUs of a small machine)."""
    return [{"CPU": rank_cpus, "GPU": 1.0} if on_gpu else {"CPU": rank_cpus} for _ in range(tp)]


def replica_resources(tp: int, *, on_gpu: bool, rank_cpus: float = RANK_CPUS) -> dict[str, float]:
    """What one replica reserves in all (the sum of its bundles)."""
    totals: dict[str, float] = {}
    for bundle in replica_bundles(tp, on_gpu=on_gpu, rank_cpus=rank_cpus):
        for key, value in bundle.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


def device_layout(gpu_ids: Sequence[Sequence[str | int]]) -> tuple[str | None, list[int]]:
    """CUDA_VISIBLE_DEVICES shared by all ranks of a replica, and each rank's local device index in it.

    Ray shows each rank only its own GPU; NCCL's peer-to-peer paths between the ranks need them to see each
    other's, so every rank gets the replica's GPUs and picks its own by index. None on CPU (no GPU ids).
    """
    if not any(gpu_ids):
        return None, list(range(len(gpu_ids)))
    if any(len(ids) != 1 for ids in gpu_ids):
        raise ValueError(f"every rank needs exactly one GPU, got {list(map(list, gpu_ids))}")
    visible = sorted({str(ids[0]) for ids in gpu_ids}, key=lambda g: (len(g), g))
    return ",".join(visible), [visible.index(str(ids[0])) for ids in gpu_ids]


class Rank:
    """One process of a tensor-parallel replica: joins the group, loads its shard, runs what the feeder asks."""

    def __init__(self, job: JobConfig, checkpoint: str) -> None:
        self.job = job
        self.checkpoint = checkpoint  # a local folder: the feeder has already copied an s3:// model to this node
        self.engine: Any = None

    def describe(self) -> dict[str, Any]:
        """Node address, GPU ids Ray gave this rank, a free port (used by rank 0 for the group's rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return {"ip": ray.util.get_node_ip_address(), "gpus": list(ray.get_gpu_ids()), "port": port, "pid": os.getpid()}

    def setup(self, rank: int, world: int, master: str, port: int, visible: str | None, local_rank: int) -> None:
        """Join the replica's process group (NCCL on GPU, gloo on CPU), then load this rank's weight shards."""
        import torch
        import torch.distributed as dist

        from pipeline.model.transformers_engine import InternVLEngine

        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible  # before CUDA initialises in this process
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                          MASTER_ADDR=master, MASTER_PORT=str(port))
        on_gpu = visible is not None
        if on_gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://{master}:{port}", rank=rank,
                                world_size=world, timeout=GROUP_TIMEOUT)
        compute = self.job.compute
        self.engine = InternVLEngine.load(self.checkpoint, device="cuda" if on_gpu else "cpu", dtype=compute.dtype,
                                          revision=self.job.model_revision, tp=world)

    def call(self, method: str, keep: bool, *args: Any, **kwargs: Any) -> Any:
        """engine.method(*args, **kwargs); only the rank that keeps its result sends it back."""
        result = getattr(self.engine, method)(*args, **kwargs)
        return result if keep else None

    def local_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of this rank's local part of every parameter (a shard for tensor-parallel weights)."""
        shapes = {}
        for name, param in self.engine.model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            shapes[name] = tuple(local.shape)
        return shapes


class TensorParallelEngine:
    """Looks like an InternVLEngine to the model stages; computes on tp rank actors.

    Prompts are built here (tokenizer only); `generate` and `score` run on all ranks with the same inputs.
    A rank that dies takes the group down: it is rebuilt (up to `restarts` times per batch) and the batch re-runs.
    """

    def __init__(self, job: JobConfig, *, restarts: int = 3, rank_cpus: float = RANK_CPUS) -> None:
        import ray

        from pipeline.model.checkpoints import prepare_checkpoint
        from pipeline.model.transformers_engine import Prompter

        self.job = job
        self.tp = job.compute.tp
        self.restarts = restarts
        self.rank_cpus = rank_cpus
        # Copy an s3:// checkpoint into this node's cache once, here, before the ranks (on this node) read it.
        self.checkpoint = prepare_checkpoint(job.model, cache_dir=job.model_cache, options=job.storage,
                                             trust_remote_code=job.trust_remote_code, revision=job.model_revision)
        self.prompter = Prompter.load(self.checkpoint, revision=job.model_revision)
        self.tokenizer = self.prompter.tokenizer
        self.max_context = self.prompter.max_context
        self.on_gpu = wants_gpu(job.compute.device, gpus_available=ray.cluster_resources().get("GPU", 0))
        self._group_handle = None
        self.ranks: list[Any] = []
        self.pids: list[int] = []
        self._start()

    def prompt_ids(self, text: str, tiles_per_image: Sequence[int], *, video: bool = False) -> list[int]:
        return self.prompter.prompt_ids(text, tiles_per_image, video=video)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self._on_all("generate", args, kwargs)

    def score(self, *args: Any, **kwargs: Any) -> Any:
        return self._on_all("score", args, kwargs)

    def local_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Every rank's local parameter shapes."""
        import ray

        return ray.get([r.local_shapes.remote() for r in self.ranks])

    def _group(self) -> Any:
        """The placement group this replica's ranks run in: the one named after this actor (found again after a
        restart), or, outside an actor, an unnamed one; close() removes it."""
        import ray

        if self._group_handle is not None:
            return self._group_handle
        actor_id = ray.get_runtime_context().get_actor_id()
        name = f"{GROUP_PREFIX}{actor_id}" if actor_id else ""
        group = None
        if name:
            try:
                group = ray.util.get_placement_group(name)
            except ValueError:
                group = None
        if group is None:
            group = ray.util.placement_group(replica_bundles(self.tp, on_gpu=self.on_gpu, rank_cpus=self.rank_cpus),
                                             strategy="STRICT_PACK", name=name)
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"no node could host a tp={self.tp} replica within {PLACEMENT_TIMEOUT_S} s: it needs "
                               f"{replica_resources(self.tp, on_gpu=self.on_gpu, rank_cpus=self.rank_cpus)} on one node") from None
        self._group_handle = group
        return group

    def _start(self) -> None:
        """Start the tp ranks in the replica's placement group, one per bundle, and form their process group."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = self._group()
        actor = ray.remote(Rank)
        self.ranks = [
            actor.options(
                num_cpus=self.rank_cpus, num_gpus=1 if self.on_gpu else 0, max_restarts=0, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote(self.job, self.checkpoint)
            for i in range(self.tp)
        ]
        info = ray.get([r.describe.remote() for r in self.ranks])
        visible, local = device_layout([i["gpus"] for i in info])
        self.pids = [i["pid"] for i in info]
        self._wait_all([r.setup.remote(k, self.tp, info[0]["ip"], info[0]["port"], visible, local[k])
                        for k, r in enumerate(self.ranks)])
        log.info("tensor-parallel replica ready: %d ranks, pids %s", self.tp, self.pids)

    def _stop(self) -> None:
        import ray

        for r in self.ranks:
            ray.kill(r, no_restart=True)
        self.ranks = []

    def _wait_all(self, refs: list[Any]) -> list[Any]:
        """Results of all ranks; the first failure raises at once (its peers may be stuck in a collective)."""
        import ray

        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
        return ray.get(refs)

    def _on_all(self, method: str, args: tuple, kwargs: dict) -> Any:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        args = tuple(ray.put(a) for a in args)  # stored once, read by every rank
        for attempt in range(self.restarts + 1):
            try:
                refs = [r.call.remote(method, k == 0, *args, **kwargs) for k, r in enumerate(self.ranks)]
                return self._wait_all(refs)[0]
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                if attempt == self.restarts:
                    raise RuntimeError(f"tensor-parallel replica lost a rank {attempt + 1} times in one batch: {err}") from err
                log.warning("a rank of this replica died (%s); restarting its %d ranks and re-running the batch",
                            type(err).__name__, self.tp)
                self._stop()
                time.sleep(1.0)
                self._start()
        raise AssertionError("unreachable")

    def close(self) -> None:
        import ray

        self._stop()
        if self._group_handle is not None:
            ray.util.remove_placement_group(self._group_handle)
            self._group_handle = None


def remove_replica_groups() -> int:
    """Remove the placement groups this job's replicas reserved (their feeders may have ended without closing,
    e.g. killed); returns how many. A placement group's id ends with the id of the job that created it."""
    import ray
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for group_id, info in ray.util.placement_group_table().items():
        if info.get("name", "").startswith(GROUP_PREFIX) and info["state"] != "REMOVED" and group_id.endswith(job):
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
            removed += 1
    return removed


def load_replica(job: JobConfig, kind: Engine = "transformers", rank_cpus: float | None = None) -> Any:
    """The job's model replica with the engine the plan chose (model/engines.py), loaded in the model stage's actor
    (torch, transformers and vLLM load on the worker, never on the driver). A transformers replica with
    compute.tp > 1 is a group of rank actors driven from that actor (`TensorParallelEngine`), each reserving
    `rank_cpus` (the run plan's share; default one CPU); a vLLM replica runs its tensor-parallel workers itself."""
    if kind == "transformers" and job.compute.tp > 1:
        return TensorParallelEngine(job) if rank_cpus is None else TensorParallelEngine(job, rank_cpus=rank_cpus)
    return engines.load(kind, job)


def replica_loader(job: JobConfig, kind: Engine, rank_cpus: float | None = None) -> Callable[[], Any]:
    """What a model stage calls in its actor to load its replica (picklable, for Ray Data's constructor)."""
    return functools.partial(load_replica, job, kind, rank_cpus)
