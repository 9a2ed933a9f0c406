"""Incremental runs: process only objects that are new or changed since the last successful run, one run at a time.

State lives next to the results: `_INCREMENTAL.json` maps every object taken to its version (S3 ETag, else
size and modification time: io/storage.object_version), `_runs/<time>.json` records what each run took, and
`_LOCK` (created only if absent: an S3 conditional PUT with If-None-Match, O_EXCL on disks) keeps two scheduled
runs from overlapping.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pipeline.errors import LockedError
from pipeline.io.markers import read_marker, remove_marker, write_marker
from pipeline.io.storage import get_filesystem

STATE_FILE = "_INCREMENTAL.json"
LOCK_FILE = "_LOCK"
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


@contextmanager
def run_lock(output: str, options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Hold the output's lock for the duration of a run; a second run finds it and is refused."""
    fs, path = get_filesystem(output, options)
    fs.makedirs(path, exist_ok=True)
    target = f"{path.rstrip('/')}/{LOCK_FILE}"
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        with fs.open(target, "xb") as f:  # If-None-Match: * on S3, O_EXCL locally
            f.write(json.dumps(holder).encode())
    except OSError as err:  # FileExistsError locally; S3 answers 412 PreconditionFailed ("pre-conditions ... did not hold")
        if not isinstance(err, FileExistsError) and "precondition" not in str(err).lower().replace("-", ""):
            raise
        other = read_marker(output, LOCK_FILE, options) or {}
        raise LockedError(
            f"another run holds {output.rstrip('/')}/{LOCK_FILE} (host {other.get('host')}, pid {other.get('pid')}, "
            f"since {other.get('since')}); this run exits. If that run died, delete the lock file and run again."
        ) from None
    try:
        yield
    finally:
        remove_marker(output, LOCK_FILE, options)
