"""Incremental runs: process only objects that are new or changed since the last successful run, one run at a time.

State lives next to the results as a table: `_state/<run>/*.parquet` holds (uri, version) of every object a
successful run took (its version: S3 ETag, else size and modification time: io/storage.object_version), one delta
folder per run, compacted into one now and then; the run finds new or changed objects by joining the listing with it (`pipeline/run/sources.py`).
`_runs/<run>.json` records what each run took, and `_LOCK` (a lease, io/lock.py) keeps two scheduled runs from
overlapping. An `_INCREMENTAL.json` left by an
earlier version is read once and kept as the state's first delta.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.inputs import LISTING_SCHEMA
from pipeline.io.markers import read_marker, write_marker
from pipeline.io.storage import full_url, get_filesystem

STATE_FILE = "_INCREMENTAL.json"  # the state as earlier versions kept it (one JSON object): read, converted, kept
STATE_DIR = "_state"
RUNS_DIR = "_runs"
COMPACT_AFTER = 16  # deltas kept before the state is compacted into one


def new_or_changed(versions: Mapping[str, str], state: Mapping[str, str]) -> list[str]:
    """URIs whose version differs from (or is missing in) the state, sorted (the rule the run's join applies)."""
    return sorted(u for u, v in versions.items() if state.get(u) != v)


def run_stamp() -> str:
    """A run's name in the state and in _runs/: UTC time, then a random suffix (two runs in one second differ)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def state_deltas(output: str, options: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """{delta folder URL: its Parquet files} of the state under `output`, oldest first."""
    fs, path = get_filesystem(output, options)
    root = f"{path.rstrip('/')}/{STATE_DIR}"
    if not fs.exists(root):
        return {}
    deltas: dict[str, list[str]] = {}
    for p in sorted(fs.find(root)):
        if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("."):
            folder = p.rsplit("/", 1)[0]
            deltas.setdefault(full_url(fs, folder), []).append(full_url(fs, p))
    return deltas


def delta_url(output: str, stamp: str) -> str:
    return f"{output.rstrip('/')}/{STATE_DIR}/{stamp}"


def legacy_state(output: str, options: Mapping[str, Any] | None = None) -> pa.Table | None:
    """The (uri, version) rows of an _INCREMENTAL.json written by an earlier version, if the output has one and no
    Parquet state yet."""
    if state_deltas(output, options):
        return None
    objects = (read_marker(output, STATE_FILE, options) or {}).get("objects")
    if not objects:
        return None
    return pa.table({"uri": list(objects), "version": [str(v) for v in objects.values()]}, schema=LISTING_SCHEMA)


def write_legacy_delta(output: str, table: pa.Table, options: Mapping[str, Any] | None = None) -> None:
    """Keep a converted _INCREMENTAL.json as the state's first delta."""
    fs, _ = get_filesystem(output, options)
    target = get_filesystem(f"{delta_url(output, '00000000T000000Z-legacy')}/part-0.parquet", options)[1]
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(target, "wb") as f:
        pq.write_table(table, f)


def record_run(output: str, stamp: str, objects_taken: int, options: Mapping[str, Any] | None = None) -> str:
    """After a successful run (its delta written): what it took, under _runs/; returns the record's name."""
    name = f"{RUNS_DIR}/{stamp}.json"
    write_marker(output, name, {"finished_at": stamp.split("-", 1)[0], "objects_taken": objects_taken,
                                "state_delta": f"{STATE_DIR}/{stamp}"}, options)
    return name


def remove_deltas(folders: list[str], options: Mapping[str, Any] | None = None) -> None:
    """Delete merged deltas (after their compacted copy is written)."""
    for folder in folders:
        fs, path = get_filesystem(folder, options)
        fs.rm(path, recursive=True)
