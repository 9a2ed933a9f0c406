"""JSON markers beside the shards: `_JOB.json` (which configuration this output belongs to, written before the
first shard) and `_SUCCESS.json` (the run summary, written last: its presence means every shard is in place)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipeline.io.storage import get_filesystem

SUCCESS_FILE = "_SUCCESS.json"
JOB_FILE = "_JOB.json"


def read_marker(output: str, name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """A JSON marker under `output`, or None."""
    fs, path = get_filesystem(output, options)
    try:
        with fs.open(f"{path.rstrip('/')}/{name}", "r") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def write_marker(output: str, name: str, data: dict[str, Any], options: Mapping[str, Any] | None = None) -> None:
    """Write a JSON marker under `output` (creating the folder on disks)."""
    fs, path = get_filesystem(output, options)
    target = f"{path.rstrip('/')}/{name}"
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(target, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))


def remove_marker(output: str, name: str, options: Mapping[str, Any] | None = None) -> None:
    """Remove a marker if present."""
    fs, path = get_filesystem(output, options)
    target = f"{path.rstrip('/')}/{name}"
    if fs.exists(target):
        fs.rm(target)
