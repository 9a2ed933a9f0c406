"""Incremental runs: process only objects that are new or changed since the last successful run, one run at a time.

State lives next to the results: `_INCREMENTAL.json` maps every object taken to its version (S3 ETag, else
size and modification time: io/storage.object_version), `_runs/<time>.json` records what each run took, and
`_LOCK` (a lease, io/lock.py) keeps two scheduled runs from overlapping.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pipeline.io.markers import read_marker, write_marker

STATE_FILE = "_INCREMENTAL.json"
RUNS_DIR = "_runs"


def read_state(output: str, options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """{URI: version} of everything earlier successful runs took."""
    return (read_marker(output, STATE_FILE, options) or {}).get("objects", {})


def new_or_changed(versions: Mapping[str, str], state: Mapping[str, str]) -> list[str]:
    """URIs whose version differs from (or is missing in) the state, sorted."""
    return sorted(u for u, v in versions.items() if state.get(u) != v)


def record_run(output: str, taken: Mapping[str, str], options: Mapping[str, Any] | None = None) -> str:
    """After a successful run: add what it took to the state and write its record; returns the record's name."""
    state = read_state(output, options)
    state.update(taken)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"{RUNS_DIR}/{stamp}.json"
    write_marker(output, name, {"finished_at": stamp, "objects_taken": len(taken), "objects": dict(taken)}, options)
    write_marker(output, STATE_FILE, {"updated_at": stamp, "objects": state}, options)
    return name
