"""The lazy Ray Data plan of one run: input rows -> tiles (CPU tasks) -> answers (actor pool) -> Parquet shards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.io.output import OutputFolder
from pipeline.run.metrics import record_metrics
from pipeline.model.engines import VLLM_ENGINES, Engine
from pipeline.run.replica import replica_loader
from pipeline.run.resources import PREPROCESS_CPUS, WRITE_CPUS, Resources
from pipeline.stages.base import check_stages
from pipeline.stages.generate import AsyncGenerate, Generate
from pipeline.stages.preprocess import Preprocess
from pipeline.stages.score import AsyncScore, Score
from pipeline.stages.write import ShardStats, WriteShards

# Input rows per block: two model batches. Small blocks keep the CPU stage's tile output per task well under
# 128 MiB, spread work over all CPU workers, and let finished rows reach the writer (and a resumed run) early:
# a map task hands on its small text blocks only when it ends.
BLOCK_BATCHES = 2
PREPROCESS_BATCH = 4
# Memory each CPU preprocessing task reserves. Besides being a fair estimate (decoded image + tiles of a small
# batch), it keeps Ray from fusing the CPU stage into the model actors, so the two stages scale independently.
PREPROCESS_MEMORY = 512 * 1024**2
CPU_TASK = {"num_cpus": PREPROCESS_CPUS, "memory": PREPROCESS_MEMORY}  # one CPU preprocessing task's reservation


def preprocess_block(block: dict, job: JobConfig) -> Iterator[pa.Table]:
    """Ray task body for the CPU stage: one block of input rows, tiled PREPROCESS_BATCH rows at a time so a task
    never holds more than a few samples' tiles."""
    stage = Preprocess(job)
    for start in range(0, len(block["id"]), PREPROCESS_BATCH):
        yield stage({name: values[start:start + PREPROCESS_BATCH] for name, values in block.items()})


def _gather(batch: pa.Table) -> pa.Table:
    """Identity: its batches of rows_per_shard rows and the remainder leave the task as one block."""
    return batch


def model_stage_class(task: str, engine: Engine) -> type:
    """The model stage for a task and engine: vLLM's is async (several batches in flight per replica)."""
    if task == "score":
        return AsyncScore if engine in VLLM_ENGINES else Score
    return AsyncGenerate if engine in VLLM_ENGINES else Generate


def write_batch(batch: pa.Table, job: JobConfig, folder: OutputFolder, input_columns: list[str], attempt: int = 1,
                settings_id: str | None = None, staged: bool = False) -> pa.Table:
    """Ray task body for the write stage; also counts what it wrote in the Prometheus metrics."""
    stats = WriteShards(job, folder, input_columns, attempt=attempt, settings_id=settings_id, staged=staged)(batch)
    record_metrics(ShardStats.from_row(stats.to_pylist()[0]))
    return stats


def input_rows(rows: pa.Table, per_block: int) -> Any:
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
            index = pa.array(range(per_block), pa.int64())
            for start in range(0, rows.num_rows, per_block):
                # A contiguous slice, then a copy of just its rows: `take` on the whole table would rebuild every
                # column split into several chunks on each call (quadratic in the rows), and pickling the slice
                # itself would carry the whole chunk it is cut from.
                part = rows.slice(start, per_block)
                part = part.take(index[:part.num_rows])
                meta = BlockMetadata(num_rows=part.num_rows, size_bytes=part.nbytes, input_files=None, exec_stats=None)
                tasks.append(ReadTask(lambda part=part: [part], meta, schema=part.schema))
            return tasks

    return InputRows()


def read_rows(rows: Any, per_block: int, cpu_workers: int, cpu_task: dict[str, Any]) -> tuple[Any, bool]:
    """The samples to process in blocks of `per_block` rows, and whether the CPU stage fuses with their reading.

    A small set of samples already in memory (an Arrow table: a resumed run's few left) is read by lazy read tasks
    that fuse with the CPU stage: exactly one block per read task (Ray Data would otherwise split a small input's
    blocks for parallelism, which prevents fusing). A dataset (a manifest read by Ray Data, a listing, a join)
    streams: its blocks are cut to `per_block` rows on the way, so the CPU work spreads over all workers.
    """
    import ray

    if isinstance(rows, pa.Table):
        return ray.data.read_datasource(input_rows(rows, per_block), override_num_blocks=-(-rows.num_rows // per_block),
                                        concurrency=cpu_workers, **cpu_task), True
    return rows.repartition(target_num_rows_per_block=per_block), False


def answer_rows(ds: Any, job: JobConfig, resources: Resources) -> Any:
    """Input rows (`id`, `uri`... in blocks of BLOCK_BATCHES model batches) -> tiles (CPU tasks) -> output rows, one
    per question (the model stage's actor pool): the part of the plan a run and annotate() share."""
    import ray

    ds = ds.map_batches(preprocess_block, fn_kwargs={"job": job}, batch_size=None, batch_format="numpy",
                        compute=ray.data.TaskPoolStrategy(size=resources.cpu_workers), **CPU_TASK)
    return ds.map_batches(
        model_stage_class(job.task, resources.engine),
        fn_constructor_kwargs={"job": job, "load": replica_loader(job, resources.engine, resources.rank_cpus)},
        batch_size=resources.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=resources.replicas[0], max_size=resources.replicas[1]),
        **resources.model_stage_args(),
    )


def build_dataset(job: JobConfig, folder: OutputFolder, rows: Any, resources: Resources, *,
                  input_columns: list[str] | None = None, attempt: int = 1, settings_id: str | None = None,
                  staged: bool = False) -> Any:
    """The lazy Ray Data plan: input rows (an Arrow table or a dataset) -> tiles -> output rows (one per question)
    -> one stats row per shard. `attempt`: which try this is (a retry pass runs `job` with its rung applied)."""
    columns = input_columns if input_columns is not None else (rows.column_names if isinstance(rows, pa.Table) else ["id", "uri"])
    model_stage = model_stage_class(job.task, resources.engine)
    check_stages(columns, [("preprocess", Preprocess.columns(job)), (job.task, model_stage.columns(job)),
                           ("write", WriteShards.columns(job))])
    import ray

    # Reading a block of rows and tiling it run as one task where the rows are in memory: same resources and
    # concurrency.
    ds, _ = read_rows(rows, BLOCK_BATCHES * resources.batch_size, resources.cpu_workers, CPU_TASK)
    ds = answer_rows(ds, job, resources)
    # Writing: one writer per replica at most (shards are light work, and every concurrent writer is a worker
    # process). Rows are first gathered into blocks of at least rows_per_shard rows (a batch_size would also cut off
    # the bundle's remainder, leaving a tiny shard beside every full one), then each block is one shard.
    writer = {"batch_format": "pyarrow", "num_cpus": WRITE_CPUS, "compute": ray.data.TaskPoolStrategy(size=resources.replicas[1])}
    ds = ds.map_batches(_gather, batch_size=job.rows_per_shard, zero_copy_batch=True, **writer)
    write = {"job": job, "folder": folder, "input_columns": columns, "attempt": attempt, "settings_id": settings_id,
             "staged": staged}
    return ds.map_batches(write_batch, fn_kwargs=write, batch_size=None, **writer)
