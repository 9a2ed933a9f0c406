"""`annotate(ds, job)`: a job's model settings as a lazy Ray Data transform, for the caller's own Ray Data program.

The same CPU stage and model stage actor pool as a run (run/dataset.answer_rows), sized by the same plan of
resources (run/execute.cluster_resources); none of a run's output folder, lease, shards, resume or accounting: the
caller reads, filters, joins and writes. In the spirit of Ray Data LLM's `build_processor(config)(ds)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig, load_job, parse_job, with_overrides
from pipeline.io.image_column import image_rows
from pipeline.io.inputs import manifest_rows
from pipeline.run.dataset import BLOCK_BATCHES, CPU_TASK, answer_rows, read_rows
from pipeline.run.execute import cluster_resources, init_ray
from pipeline.run.resources import WRITE_CPUS
from pipeline.stages.model_stage import BATCH_COLUMN

SOURCE = "the dataset given to annotate()"  # how input errors name where the rows came from


def model_job(job: JobConfig | dict[str, Any] | str | Path, replicas: int | tuple[int, int] | None = None) -> JobConfig:
    """The job annotate() runs: a JobConfig as given, a mapping or a job file read without `input` / `output`;
    `replicas` (if given) in place of compute.replicas."""
    if isinstance(job, (str, Path)):
        job = load_job(job, model_only=True)
    elif isinstance(job, dict):
        job = parse_job(job, source="annotate() job", model_only=True)
    elif not isinstance(job, JobConfig):
        raise TypeError(f"annotate(): job must be a JobConfig, a dict or a job file path, not {type(job).__name__}")
    return job if replicas is None else with_overrides(job, {"compute.replicas": replicas}, source="annotate(replicas=...)")


def dataset_rows(batch: pa.Table, *, image_column: str | None, base: str) -> pa.Table:
    """A batch of the caller's rows as input rows, checked and given ids as a manifest's are (io/inputs.py): the
    job's `image_column` where the rows carry pictures, else `uri` / `uris` (relative paths taken from `base`)."""
    if image_column and image_column in batch.column_names:
        return image_rows(batch, SOURCE, image_column)
    return manifest_rows(batch, SOURCE, base)


def annotate(ds: Any, job: JobConfig | dict[str, Any] | str | Path, *,
             replicas: int | tuple[int, int] | None = None) -> Any:
    """The rows of `ds` with the output columns of `job`'s task (caption / vqa / score), lazily: a ray.data.Dataset.

    `ds` holds `uri` (or `uris`: one multi-image sample) and may hold `id`, `question` / `questions` and any other
    columns (passed through), or the pictures themselves in the job's `image_column`. Rows without an `id` get one
    as a manifest's do. One output row per question (`id#k` for several); a bad sample is an error row. `job`: a
    JobConfig, a mapping or a job-file path; `input` and `output` are not needed. `replicas`: compute.replicas.
    Starts (or joins, RAY_ADDRESS) Ray if it is not running, to size the plan to the cluster; runs nothing else.
    """
    import ray

    job = model_job(job, replicas)
    if not ray.is_initialized():
        init_ray()
    resources = cluster_resources(job)
    rows = ds.map_batches(dataset_rows, fn_kwargs={"image_column": job.image_column, "base": os.getcwd()},
                          batch_format="pyarrow", batch_size=None, num_cpus=WRITE_CPUS)
    rows, _ = read_rows(rows, BLOCK_BATCHES * resources.batch_size, resources.cpu_workers, CPU_TASK)
    # the model batches' timings are a run's bookkeeping (its summary's busy clock)
    return answer_rows(rows, job, resources).drop_columns([BATCH_COLUMN], num_cpus=WRITE_CPUS)
