"""Parquet shards under an output: deterministic names, atomic writes, listing, the ids already written."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.markers import JOB_FILE, SUCCESS_FILE
from pipeline.io.storage import full_url, get_filesystem, is_local


def shard_name(ids: list[str]) -> str:
    """A shard's file name, derived from the ids it holds: the same rows always get the same name."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_shard(table: pa.Table, output: str, options: Mapping[str, Any] | None = None, *, name: str | None = None) -> str:
    """Write one Parquet shard under `output` so that readers never see it half written; returns its name (by
    default shard_name of its ids).

    Object stores publish an object only when its upload completes; on local disks we write a hidden temporary
    file and rename it into place.
    """
    name = name or shard_name(table.column("id").to_pylist())
    fs, path = get_filesystem(output, options)
    final = f"{path.rstrip('/')}/{name}"
    fs.makedirs(path, exist_ok=True)
    if is_local(output):
        tmp = f"{path.rstrip('/')}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, final)
    else:
        with fs.open(final, "wb") as f:
            pq.write_table(table, f)
    return name


def existing_results(output: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Result files (shards and markers) already under `output`."""
    fs, path = get_filesystem(output, options)
    if not fs.exists(path):
        return []
    own = lambda p: p.endswith((".parquet", SUCCESS_FILE, JOB_FILE, "_INCREMENTAL.json")) or "/_runs/" in p or "/_state/" in p or "/_retry/" in p  # noqa: E731
    return sorted(p for p in fs.find(path) if own(p))


def shard_files(output: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Paths of the Parquet shards under `output` (hidden temporary files and `_state/`-like folders excluded)."""
    root = get_filesystem(output, options)[1].rstrip("/")
    return [p for p in existing_results(output, options)
            if p.endswith(".parquet") and not any(part.startswith((".", "_")) for part in p[len(root) + 1:].split("/"))]


def shard_urls(output: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """The shards under `output` as full URLs (for readers that are handed no filesystem)."""
    fs, _ = get_filesystem(output, options)
    return [full_url(fs, p) for p in shard_files(output, options)]


def clear_results(output: str, options: Mapping[str, Any] | None = None) -> int:
    """Delete earlier shards and markers (for overwrite); returns how many files were removed."""
    fs, _ = get_filesystem(output, options)
    files = existing_results(output, options)
    for p in files:
        fs.rm(p)
    return len(files)
