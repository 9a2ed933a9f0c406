"""Helpers the tests share: job dicts, reading an output back, counting vision-tower passes, a model stage's
input batch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stages.preprocess import Preprocess


def job_dict(task: str = "caption", *, input: Any = "in", output: Any = "out", model: Any = "m", **keys: Any) -> dict:
    """A job mapping as a job file holds it (paths as strings), with `keys` added."""
    return {"task": task, "input": str(input), "output": str(output), "model": str(model), **keys}


def read_output(output: str | Path, fs: fsspec.AbstractFileSystem | None = None, *, columns: list[str] | None = None) -> pa.Table:
    """Every shard under an output (a local folder, or a prefix of `fs`) as one table; fails if there is none."""
    if fs is None:
        files = sorted(str(p) for p in Path(output).glob("part-*.parquet"))
    else:
        fs.invalidate_cache()  # an overwrite may rewrite a shard under the same name
        files = sorted(fs.glob(f"{str(output).rstrip('/')}/part-*.parquet"))
    assert files, f"no shards under {output}"
    return pa.concat_tables([pq.read_table(f, filesystem=fs, columns=columns) for f in files])


def output_rows(output: str | Path, fs: fsspec.AbstractFileSystem | None = None) -> list[dict]:
    """read_output as a list of row dicts."""
    return read_output(output, fs).to_pylist()


@contextlib.contextmanager
def vision_calls(engine: Any) -> Iterator[list[int]]:
    """The tiles of every pass through the engine's vision tower while the block runs (one entry per pass)."""
    calls: list[int] = []
    hook = engine.model.model.vision_tower.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def numpy_batch(table):
    """A table as Ray Data hands it to a numpy-format UDF."""
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(table).to_batch_format("numpy")


def preprocessed(job, tmp_path, images: dict, extra: dict | None = None):
    """Run the CPU stage over images written to tmp_path; returns the numpy batch the model stage receives."""
    uris = []
    for name, image in images.items():
        if image is not None:
            image.save(tmp_path / name)
        uris.append(str(tmp_path / name))
    batch = {"id": np.array([f"s{i}" for i in range(len(uris))], dtype=object), "uri": np.array(uris, dtype=object)}
    batch.update(extra or {})
    return numpy_batch(Preprocess(job)(batch))


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
