"""Listings of media objects and of manifest files, as Arrow tables of (uri, version), one prefix at a time.

A prefix or glob is listed in two steps so that the work spreads over workers (`pipeline/run/sources.py`):
`list_level` lists the top level (its files, and its sub-prefixes), then `list_tree` lists each sub-prefix.
An S3 Inventory report (`manifest.json`, CSV.gz or Parquet data files) is the listing a bucket's owner already has;
`inventory_spec` reads its manifest and `inventory_listing` turns a batch of its rows into the same table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.utils import glob_translate

from pipeline.errors import InputError
from pipeline.io.inputs import LISTING_SCHEMA, MANIFEST_EXTENSIONS
from pipeline.io.storage import extension, full_url, get_filesystem, object_version

GLOB_CHARS = "*?["


def is_glob(path: str) -> bool:
    return any(ch in path for ch in GLOB_CHARS)


def glob_root(path: str) -> str:
    """The folder a glob's matches all lie under (the part before its first wildcard, to the last '/')."""
    static = re.split(r"[*?\[]", path, maxsplit=1)[0]
    return static.rsplit("/", 1)[0] if "/" in static else ""


def matcher(path: str) -> Callable[[str], bool]:
    """Whether a listed path matches the input (always, for a prefix; fsspec's glob rules for a glob)."""
    if not is_glob(path):
        return lambda p: True
    pattern = re.compile(glob_translate(path))
    return lambda p: pattern.match(p) is not None


def _table(fs: Any, entries: Mapping[str, Mapping[str, Any]], keep: Callable[[str], bool]) -> pa.Table:
    files = [(p, info) for p, info in entries.items() if info.get("type") != "directory" and keep(p)]
    return pa.table({"uri": [full_url(fs, p) for p, _ in files], "version": [object_version(i) for _, i in files]},
                    schema=LISTING_SCHEMA)


def list_level(url: str, options: Mapping[str, Any] | None = None) -> tuple[pa.Table, list[str]]:
    """The top level of a prefix or glob in one listing: its matching files, and the sub-prefixes to list further
    (full URLs). A store without ranged listing is listed this way (`io/ranges.py` splits the level otherwise)."""
    fs, path = get_filesystem(url, options)
    if not is_glob(path) and fs.isfile(path):
        return level_parts(fs, path, {path: fs.info(path)})
    try:
        entries = {e["name"]: e for e in fs.ls(level_root(path), detail=True)}
    except FileNotFoundError:
        raise InputError(f"input {url!r} does not exist (no such file, prefix or glob match)") from None
    return level_parts(fs, path, entries)


def level_root(path: str) -> str:
    """The folder whose top level a prefix or glob lists."""
    return glob_root(path) if is_glob(path) else path.rstrip("/")


def level_parts(fs: Any, path: str, entries: Mapping[str, Mapping[str, Any]]) -> tuple[pa.Table, list[str]]:
    """Some or all entries of the top level of a prefix or glob `path` ({path: info}, as fsspec lists them): the
    matching files as a listing, and the sub-prefixes that can hold a match (full URLs, sorted)."""
    root = level_root(path)
    dirs = [full_url(fs, p) for p, e in entries.items() if e.get("type") == "directory" and p.rstrip("/") != root]
    if is_glob(path):
        depth = path.count("/") - root.count("/")
        dirs = [d for d in dirs if depth > 1 or "**" in path]  # a one-level glob matches no file in a sub-prefix
    return _table(fs, entries, matcher(path)), sorted(dirs)


def list_tree(url: str, options: Mapping[str, Any] | None = None, pattern: str | None = None) -> pa.Table:
    """Every file under one prefix (matching `pattern`, the input's glob, if given), with its version."""
    fs, path = get_filesystem(url, options)
    if pattern is None and is_glob(path):
        pattern, path = path, glob_root(path)
    keep = matcher(get_filesystem(pattern, options)[1]) if pattern else (lambda p: True)
    if fs.isfile(path):
        return _table(fs, {path: fs.info(path)}, keep)
    if not fs.isdir(path):
        raise InputError(f"input {url!r} does not exist (no such file, prefix or glob match)")
    return _table(fs, fs.find(path, detail=True), keep)


def manifest_files(url: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """The manifest files of one manifest, a folder of them or a glob: full URLs, sorted; every one of one format."""
    return sorted(manifest_sizes(url, options))


def manifest_sizes(url: str, options: Mapping[str, Any] | None = None) -> dict[str, int | None]:
    """`manifest_files` with each file's size in bytes as its listing says it (None where it does not)."""
    fs, path = get_filesystem(url, options)
    if is_glob(path):
        entries = {p: e for p, e in fs.glob(path, detail=True).items() if e.get("type") != "directory"}
    elif fs.isfile(path):
        entries = {path: fs.info(path)}
    elif fs.isdir(path):
        entries = {p: e for p, e in fs.find(path, detail=True).items()
                   if not p.rsplit("/", 1)[-1].startswith((".", "_"))}
    else:
        raise InputError(f"manifest {url!r} does not exist")
    files = {full_url(fs, p): e.get("size") for p, e in entries.items()}
    kinds = {extension(f) for f in files}
    if not files:
        raise InputError(f"manifest {url!r}: no .parquet, .jsonl or .csv files found")
    if not kinds <= MANIFEST_EXTENSIONS or len(kinds) > 1:
        raise InputError(f"manifest {url!r}: every file must be one of .parquet, .jsonl or .csv, all alike "
                         f"(found {', '.join(sorted(k or '(none)' for k in kinds))})")
    return files


FOOTER_FILES = 256  # Parquet files whose footers the driver reads to count a manifest's rows (more: not counted)


def parquet_rows(files: list[str], options: Mapping[str, Any] | None = None) -> int | None:
    """Rows in these Parquet files, from their footers (a small ranged read each, 16 at a time); None for more than
    FOOTER_FILES files."""
    import pyarrow.parquet as pq

    if len(files) > FOOTER_FILES:
        return None

    def rows(url: str) -> int:
        fs, path = get_filesystem(url, options)
        with fs.open(path, "rb", block_size=64 * 1024) as f:
            return pq.ParquetFile(f).metadata.num_rows

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(rows, files))


@dataclass(frozen=True)
class InventorySpec:
    """What an S3 Inventory manifest.json says: the data files' format and columns, and where they are."""

    file_format: str  # CSV | Parquet
    columns: list[str]  # fileSchema, in order (CSV files have no header)
    files: list[str]  # full URLs of the data files


def inventory_spec(url: str, options: Mapping[str, Any] | None = None) -> InventorySpec:
    """Read an S3 Inventory manifest.json (the report's data files live in its destination bucket)."""
    fs, path = get_filesystem(url, options)
    try:
        with fs.open(path, "r") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise InputError(f"inventory manifest {url!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise InputError(f"inventory manifest {url!r} is not JSON: {err}") from None
    file_format = manifest.get("fileFormat", "")
    if file_format not in ("CSV", "Parquet"):
        raise InputError(f"inventory manifest {url!r}: fileFormat {file_format!r} is not supported (CSV or Parquet)")
    columns = [c.strip() for c in manifest.get("fileSchema", "").split(",") if c.strip()]
    if file_format == "CSV" and not {"Bucket", "Key"} <= set(columns):
        raise InputError(f"inventory manifest {url!r}: fileSchema must name Bucket and Key (found {columns})")
    bucket = str(manifest.get("destinationBucket", "")).rsplit(":", 1)[-1] or path.split("/", 1)[0]
    protocol = url.split("://", 1)[0] if "://" in url else "s3"
    files = [f"{protocol}://{bucket}/{entry['key']}" for entry in manifest.get("files", [])]
    if not files:
        raise InputError(f"inventory manifest {url!r} lists no data files")
    return InventorySpec(file_format=file_format, columns=columns, files=files)


def inventory_listing(batch: pa.Table, *, protocol: str = "s3", url_encoded: bool = True) -> pa.Table:
    """One batch of inventory rows as a listing: current objects only (no delete markers, no older versions);
    the version is the ETag. CSV reports URL-encode keys; Parquet reports do not."""
    names = {n.lower(): n for n in batch.column_names}
    for flag, keep_if in (("isdeletemarker", False), ("islatest", True)):
        if flag in names:
            values = pc.equal(pc.utf8_lower(batch.column(names[flag]).cast(pa.string())), "true")
            batch = batch.filter(values if keep_if else pc.invert(values))
    buckets = batch.column(names["bucket"]).cast(pa.string()).to_pylist()
    keys = batch.column(names["key"]).cast(pa.string()).to_pylist()
    keys = [unquote_plus(k) if url_encoded else k for k in keys]
    uris = [f"{protocol}://{b}/{k}" for b, k in zip(buckets, keys)]
    if "etag" in names:
        versions = batch.column(names["etag"]).cast(pa.string()).to_pylist()
    else:
        sizes = batch.column(names["size"]).cast(pa.string()).to_pylist() if "size" in names else [None] * len(uris)
        stamps = (batch.column(names["lastmodifieddate"]).cast(pa.string()).to_pylist() if "lastmodifieddate" in names
                  else [""] * len(uris))
        versions = [f"{s}-{t}" for s, t in zip(sizes, stamps)]
    keep = [i for i, k in enumerate(keys) if k and not k.endswith("/")]
    return pa.table({"uri": [uris[i] for i in keep], "version": [versions[i] for i in keep]}, schema=LISTING_SCHEMA)
