"""Incremental runs' state: which objects successful runs took, so the next run takes only what is new or changed.

`_state/<run>/*.parquet` holds (uri, version) of every object a successful run took (its version: S3 ETag, else
size and modification time: io/storage.object_version), one delta folder per run, compacted into one now and then;
the run finds new or changed objects by joining the listing with it (`pipeline/run/sources.py`). `_runs/<run>.json`
records what each run took. `_index/<run>/*.parquet` lists the shards each successful run committed, with their
sizes and totals, so the next run reads only the shards added since (run/committed.py). An `_INCREMENTAL.json` left
by an early version is read as the state while no Parquet
state exists, and the first run after it writes it out as the state's first delta.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import pyarrow as pa

from pipeline.io.inputs import LISTING_SCHEMA
from pipeline.io.output.layout import INDEX_DIR, LEGACY_STATE_FILE, STATE_DIR, index_dir, run_record, state_delta

if TYPE_CHECKING:
    from pipeline.io.output.folder import OutputFolder

COMPACT_AFTER = 16  # deltas kept before the state is compacted into one
LEGACY_STAMP = "00000000T000000Z-legacy"


def run_stamp() -> str:
    """A run's name in the state and in _runs/: UTC time, then a random suffix (two runs in one second differ)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class IncrementalState:
    """The `_state/` and `_runs/` folders of one output."""

    def __init__(self, folder: OutputFolder) -> None:
        self.folder = folder

    def deltas(self) -> dict[str, list[str]]:
        """{delta folder URL: its Parquet files}, oldest first."""
        deltas: dict[str, list[str]] = {}
        for url in self.folder.find(self.folder.child(STATE_DIR)):
            if url.endswith(".parquet"):
                deltas.setdefault(url.rsplit("/", 1)[0], []).append(url)
        return deltas

    def files(self) -> list[str]:
        """Every Parquet file of the state."""
        return [f for files in self.deltas().values() for f in files]

    def delta_url(self, stamp: str) -> str:
        return self.folder.child(state_delta(stamp))

    def legacy(self) -> pa.Table | None:
        """The (uri, version) rows of an _INCREMENTAL.json written by an early version, while no Parquet state exists."""
        if self.deltas():
            return None
        objects = (self.folder.read_json(LEGACY_STATE_FILE) or {}).get("objects")
        if not objects:
            return None
        return pa.table({"uri": list(objects), "version": [str(v) for v in objects.values()]}, schema=LISTING_SCHEMA)

    def write_part(self, stamp: str, rows: pa.Table) -> str:
        """One Parquet file of a run's delta (the run writes its delta block by block, in Ray tasks)."""
        url = f"{self.delta_url(stamp)}/part-{uuid.uuid4().hex[:16]}.parquet"
        self.folder.write_table(url, rows.select(["uri", "version"]).cast(LISTING_SCHEMA))
        return url

    def keep_legacy(self) -> bool:
        """Write an early version's _INCREMENTAL.json out as the state's first delta (it is then no longer read)."""
        legacy = self.legacy()
        if legacy is None:
            return False
        self.write_part(LEGACY_STAMP, legacy)
        return True

    def record_run(self, stamp: str, objects_taken: int) -> str:
        """After a successful run (its delta written): what it took, under _runs/; the record's name."""
        name = run_record(stamp)
        self.folder.write_json(name, {"finished_at": stamp.split("-", 1)[0], "objects_taken": objects_taken,
                                      "state_delta": state_delta(stamp)})
        return name

    def remove_folders(self, folders: list[str]) -> None:
        """Delete merged state deltas or index folders (after their compacted copy is written)."""
        for folder in folders:
            self.folder.remove(folder, recursive=True)

    def index(self) -> dict[str, list[str]]:
        """{index folder URL: its Parquet files}, oldest first."""
        folders: dict[str, list[str]] = {}
        for url in self.folder.find(self.folder.child(INDEX_DIR)):
            if url.endswith(".parquet"):
                folders.setdefault(url.rsplit("/", 1)[0], []).append(url)
        return folders

    def write_index_part(self, stamp: str, rows: pa.Table) -> str:
        """One Parquet file of a run's shard index (written block by block, in Ray tasks)."""
        url = f"{self.folder.child(index_dir(stamp))}/part-{uuid.uuid4().hex[:16]}.parquet"
        self.folder.write_table(url, rows)
        return url
