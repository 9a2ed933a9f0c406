"""Stages declare the columns they read, add and drop; the chain is checked when the dataset is built, naming the
stage and the missing column before any worker starts."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.config import parse_job
from pipeline.errors import JobError
from pipeline.io.schema import output_schema
from pipeline.run.dataset import build_dataset, model_stage_class
from pipeline.run.resources import Resources
from pipeline.stages.base import Columns, check_stages
from pipeline.stages.preprocess import Preprocess
from pipeline.stages.write import SHARD_STATS_SCHEMA, WriteShards

JOBS = {
    "caption": {"task": "caption"},
    "vqa": {"task": "vqa", "questions": ["What is it?", "Is it red?"]},
    "score": {"task": "score", "criteria": [{"name": "photo", "prompt": "Is it a photo?", "labels": ["yes", "no"],
                                             "filter": {"min_score": 0.5}}]},
}


def job_of(kind: str, **extra):
    return parse_job({"input": "in/", "output": "out/", "model": "m", **JOBS[kind], **extra})


def chain(job, engine="transformers"):
    return [("preprocess", Preprocess.columns(job)), (job.task, model_stage_class(job.task, engine).columns(job)),
            ("write", WriteShards.columns(job))]


@pytest.mark.parametrize("kind", sorted(JOBS))
@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_every_task_and_engine_chain_holds_from_id_and_uri(kind, engine):
    job = job_of(kind)
    middle = check_stages(["id", "uri", "source"], chain(job, engine)[:2])
    assert set(output_schema(job).names) <= set(middle) and "source" in middle  # passthrough kept
    assert "pixels" not in middle  # the model stage consumed the tiles
    assert check_stages(["id", "uri"], chain(job, engine)) == SHARD_STATS_SCHEMA.names


def test_a_missing_column_names_the_stage_and_the_column():
    job = job_of("caption")
    with pytest.raises(JobError, match=r"stage preprocess reads column\(s\) uri, which the input does not give "
                                       r"\(it gives id, path\)"):
        check_stages(["id", "path"], chain(job))
    with pytest.raises(JobError, match=r"stage caption reads column\(s\) pixels, num_tiles.*which the input"):
        check_stages(["id", "uri"], chain(job)[1:])
    shrink = ("preprocess", Columns(reads=("id", "uri"), adds=("status",)))
    with pytest.raises(JobError, match=r"stage caption reads column\(s\) pixels.*which stage preprocess does not give"):
        check_stages(["id", "uri"], [shrink, chain(job)[1]])


def test_the_image_column_is_consumed_by_the_cpu_stage():
    job = job_of("caption", image_column="image")
    assert "image" not in check_stages(["id", "uri", "image"], chain(job)[:1])


def test_building_a_dataset_checks_the_chain_before_ray_starts():
    resources = Resources(replicas=(1, 1), cpus_per_replica=1, gpus_per_replica=0, cpu_workers=1)
    with pytest.raises(JobError, match=r"stage preprocess reads column\(s\) uri"):
        build_dataset(job_of("caption"), None, pa.table({"id": ["a"], "path": ["x.png"]}), resources)
