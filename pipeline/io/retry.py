"""Rows waiting for a retry, kept beside the output so that the output never holds an id twice.

`<output>/_retry/attempt-<a>/*.parquet` holds error rows to be tried again at attempt `a` (a folder readers of the
output skip, like `_state/`):

- In a run, the write stage puts a retryable error row there instead of in the output while the job's ladder has a
  rung left. The pass for attempt `a` writes its results (to the output, or to `attempt-<a+1>`), then deletes the
  folder. A run that dies before that leaves rows that are already in the output or in a later folder: the next
  pass finds nothing left to do for them.
- Retrying a finished job's error rows: a shard's rows are first copied there as `from-<shard>`, then the shard is
  rewritten without them (`supersede`: the new shard, named from its ids, is written before the old one is deleted;
  its passed shard before it). A run that dies between these steps leaves a `from-` file whose shard still exists;
  the next run completes the rewrite before it plans anything (`pending_rewrites`).

So, for a reader of a finished output, every id is there exactly once; `attempt` and `degraded` say which try and
which settings wrote it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.passed import passed_name
from pipeline.io.shards import shard_name, write_shard
from pipeline.io.storage import full_url, get_filesystem

RETRY_DIR = "_retry"
FROM = "from-"  # a pending file copied out of this output shard, which is then rewritten without its rows
_ATTEMPT = re.compile(r"/attempt-(\d+)/[^/]+\.parquet$")


def pending_url(output: str, attempt: int) -> str:
    """The folder of rows waiting for attempt `attempt`."""
    return f"{output.rstrip('/')}/{RETRY_DIR}/attempt-{attempt}"


def pending_files(output: str, options: Mapping[str, Any] | None = None) -> dict[int, list[str]]:
    """The pending files by attempt, as full URLs (empty: nothing waits for a retry)."""
    fs, path = get_filesystem(f"{output.rstrip('/')}/{RETRY_DIR}", options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    found: dict[int, list[str]] = {}
    for p in sorted(fs.find(path)):
        m = _ATTEMPT.search(p)
        if m and not p.rsplit("/", 1)[-1].startswith("."):
            found.setdefault(int(m.group(1)), []).append(full_url(fs, p))
    return dict(sorted(found.items()))


def write_pending(rows: pa.Table, output: str, attempt: int, options: Mapping[str, Any] | None = None, *,
                  name: str | None = None) -> str:
    """Rows to try again at attempt `attempt`; the file's name (from their ids unless given)."""
    return write_shard(rows, pending_url(output, attempt), options, name=name)


def clear_pending(output: str, attempt: int, options: Mapping[str, Any] | None = None) -> None:
    """Delete attempt `attempt`'s folder once its pass is done."""
    fs, path = get_filesystem(pending_url(output, attempt), options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    root = path.rsplit("/", 1)[0]
    fs.invalidate_cache(root)
    if fs.exists(root) and not fs.ls(root):  # the last pass done: no empty `_retry/` left behind (disks keep folders)
        fs.rm(root, recursive=True)


def source_shard(pending_file: str) -> str | None:
    """The output shard a `from-` pending file was copied out of (its name), else None."""
    name = pending_file.rsplit("/", 1)[-1]
    return name[len(FROM):] if name.startswith(FROM) else None


def pending_rewrites(output: str, options: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """Output shards (names) still to be rewritten without rows copied out of them, with those pending files."""
    fs, path = get_filesystem(output, options)
    fs.invalidate_cache(path)
    todo: dict[str, list[str]] = {}
    for files in pending_files(output, options).values():
        for f in files:
            shard = source_shard(f)
            if shard is not None and fs.exists(f"{path.rstrip('/')}/{shard}"):
                todo.setdefault(shard, []).append(f)
    return todo


def supersede(output: str, shard: str, remove: Iterable[str], options: Mapping[str, Any] | None = None, *,
              output_passed: str | None = None) -> str | None:
    """Rewrite the output shard `shard` (a name) without the rows of ids `remove`: the rest is written as a new
    shard (its passed shard first), then the old one and its passed shard are deleted. Returns the new shard's name
    (None: no row left, or nothing removed). Safe to repeat after a crash: the new shard's name comes from its ids."""
    fs, path = get_filesystem(output, options)
    old = f"{path.rstrip('/')}/{shard}"
    if not fs.exists(old):
        return None
    table = pq.read_table(old, filesystem=fs)
    drop = pc.is_in(table.column("id"), value_set=pa.array(sorted(set(remove)), pa.string()))
    if not pc.any(drop).as_py():
        return None
    kept = table.filter(pc.invert(drop))
    name = shard_name(kept.column("id").to_pylist()) if kept.num_rows else None
    passed_fs = passed_path = None
    if output_passed:
        passed_fs, passed_path = get_filesystem(output_passed, options)
        old_passed = f"{passed_path.rstrip('/')}/{passed_name(shard)}"
        if name and passed_fs.exists(old_passed):  # superseded rows are errors, so the passing rows stay the same
            write_shard(pq.read_table(old_passed, filesystem=passed_fs), output_passed, options, name=passed_name(name))
    if name:
        write_shard(kept, output, options, name=name)
    fs.rm(old)
    if passed_fs is not None:
        old_passed = f"{passed_path.rstrip('/')}/{passed_name(shard)}"
        if passed_fs.exists(old_passed):
            passed_fs.rm(old_passed)
    return name


def read_pending_ids(files: Iterable[str], options: Mapping[str, Any] | None = None) -> list[str]:
    """The ids in some pending files (a shard's worth at most: read in one task)."""
    ids: list[str] = []
    for f in files:
        fs, path = get_filesystem(f, options)
        ids += pq.read_table(path, columns=["id"], filesystem=fs).column("id").to_pylist()
    return ids


def retryable(table: pa.Table, errors: Iterable[str]) -> pa.Array:
    """Rows that failed with one of `errors` (a boolean mask)."""
    failed = pc.not_equal(table.column("status"), "ok")
    kinds = pc.is_in(pc.fill_null(table.column("error_type"), ""), value_set=pa.array(list(errors), pa.string()))
    return pc.fill_null(pc.and_(failed, kinds), False)


def attempts_of(table: pa.Table) -> pa.Array:
    """Each row's attempt (rows written before retries existed: 1)."""
    if "attempt" not in table.column_names:
        return pa.array([1] * table.num_rows, pa.int32())
    return pc.fill_null(table.column("attempt"), 1).cast(pa.int32())
