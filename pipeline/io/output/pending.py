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
  the next run completes the rewrite before it plans anything (`rewrites_left`).

So, for a reader of a finished output, every id is there exactly once; `attempt` and `degraded` say which try and
which settings wrote it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.output.layout import ATTEMPT, FROM, RETRY_DIR, attempt_dir, basename, shard_name, source_shard
from pipeline.io.storage import get_filesystem

if TYPE_CHECKING:
    from pipeline.io.output.folder import OutputFolder


class PendingRows:
    """The `_retry/` folder of one output."""

    def __init__(self, folder: OutputFolder) -> None:
        self.folder = folder

    def url(self, attempt: int) -> str:
        """The folder of rows waiting for attempt `attempt`."""
        return self.folder.child(attempt_dir(attempt))

    def files(self) -> dict[int, list[str]]:
        """The pending files by attempt, as full URLs, lowest attempt first (empty: nothing waits)."""
        found: dict[int, list[str]] = {}
        for url in self.folder.find(self.folder.child(RETRY_DIR)):
            m = ATTEMPT.search(url)
            if m:
                found.setdefault(int(m.group(1)), []).append(url)
        return dict(sorted(found.items()))

    def write(self, rows: pa.Table, attempt: int, *, name: str | None = None) -> str:
        """Rows to try again at attempt `attempt`; the file's name (from their ids unless given)."""
        name = name or shard_name(rows.column("id").to_pylist())
        self.folder.write_table(f"{self.url(attempt)}/{name}", rows)
        return name

    def write_from(self, rows: pa.Table, attempt: int, shard: str) -> str:
        """A finished shard's rows copied aside for attempt `attempt`, named after the shard they leave."""
        return self.write(rows, attempt, name=FROM + basename(shard))

    def clear(self, attempt: int) -> None:
        """Delete attempt `attempt`'s folder once its pass is done (and `_retry/` once nothing waits)."""
        self.folder.remove(self.url(attempt), recursive=True)
        root = self.folder.child(RETRY_DIR)
        fs, path = get_filesystem(root, self.folder.storage)
        fs.invalidate_cache(path)
        if fs.exists(path) and not fs.ls(path):  # disks keep empty folders
            self.folder.remove(root, recursive=True)

    def rewrites_left(self) -> dict[str, list[str]]:
        """Output shards (names) still to be rewritten without rows copied out of them, with those pending files."""
        todo: dict[str, list[str]] = {}
        for files in self.files().values():
            for f in files:
                shard = source_shard(f)
                if shard is not None and self.folder.exists(self.folder.shard_url(shard)):
                    todo.setdefault(shard, []).append(f)
        return todo

    def supersede(self, shard: str, remove: Iterable[str]) -> str | None:
        """Rewrite the output shard `shard` (a name) without the rows of ids `remove` (crash-safe: see
        OutputFolder.replace_shard). The new shard's name (None: no row left, or nothing removed)."""
        if not self.folder.exists(self.folder.shard_url(shard)):
            return None
        table = self.folder.read_shard(shard)
        drop = pc.is_in(table.column("id"), value_set=pa.array(sorted(set(remove)), pa.string()))
        if not pc.any(drop).as_py():
            return None
        return self.folder.replace_shard(shard, table.filter(pc.invert(drop)))


def read_ids(files: Iterable[str], options: object = None) -> list[str]:
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
