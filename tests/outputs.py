"""Output rows as a finished run leaves them, made without a model: for resume and accounting tests and benches."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.io.output import OutputFolder
from pipeline.io.schema import OUTPUT_SCHEMA


def done_rows(ids: Sequence[str], uris: Sequence[str], *, sample_ids: Sequence[str] | None = None,
              task: str = "caption") -> pa.Table:
    """`ok` output rows in the output schema (other columns null)."""
    n = len(ids)
    given = {"id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string()),
             "sample_id": pa.array(sample_ids if sample_ids is not None else ids, pa.string()),
             "task": pa.array([task] * n, pa.string()), "status": pa.array(["ok"] * n, pa.string()),
             "response": pa.array(["a caption"] * n, pa.string()), "num_tiles": pa.array([1] * n, pa.int32())}
    return pa.Table.from_arrays([given.get(f.name, pa.nulls(n, f.type)) for f in OUTPUT_SCHEMA], schema=OUTPUT_SCHEMA)


def write_done(job: JobConfig, rows: pa.Table, *, rows_per_shard: int = 100_000) -> list[str]:
    """Write rows under the job's output with the project's writer, after its _JOB.json (as a run would)."""
    folder = OutputFolder(job.output, job.storage)
    folder.write_json("_JOB.json", {"fingerprint": job.fingerprint(), "task": job.task, "model": job.model})
    return [folder.write_shard(rows.slice(s, rows_per_shard)) for s in range(0, rows.num_rows, rows_per_shard)]
