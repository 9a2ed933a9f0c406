"""A prefix's top level listed in bounded parts, so that one flat prefix of any size spreads over many tasks.

S3 (`ranges`): ListObjectsV2 starts after any key (StartAfter), so the level's key space is cut into ranges. A task
lists at most `cap` entries of its range; when more remain, it cuts the rest of its range at the keys' leading
characters, found by skip-scan probes (one request per part: the first key after `p + KEY_MAX`, which sorts after
every key starting with `p`). A hash-named level is cut 16 ways at each step; sequential names are cut at the first
character where they differ. Every key lies in exactly one range, whatever the cuts (the ranges meet end to end).
Local folders (`scan`): a directory cannot be read by range (entries come in the file system's own order, and each
reader would read all of them), so one task streams `os.scandir` names in blocks of at most `cap`, and other tasks
look the blocks' entries up in parallel. Any other store (`whole`) is listed as before, by one task
(`listing.list_level`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.io.listing import is_glob, level_parts, level_root
from pipeline.io.storage import get_filesystem

KEY_MAX = "\U0010ffff"  # the last Unicode character: `p + KEY_MAX` sorts after every key that starts with `p`
PAGE = 1000  # keys per ListObjectsV2 request (S3's most)
MAX_PARTS = 64  # ranges one split makes at most (probes cost a request each); the last one holds the rest


@dataclass(frozen=True)
class KeyRange:
    """The entries of a level whose names (relative to its prefix) sort after `after` and not after `until`."""

    after: str = ""
    until: str | None = None  # None: to the end of the level

    def holds(self, name: str) -> bool:
        return name > self.after and (self.until is None or name <= self.until)


def level_mode(url: str, options: Mapping[str, Any] | None = None) -> str:
    """How a prefix's top level is listed: 'ranges' (S3), 'scan' (a local folder) or 'whole' (one task)."""
    fs, _ = get_filesystem(url, options)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"file", "local"}:
        return "scan"
    if "s3" in protocols and hasattr(fs, "call_s3") and not getattr(fs, "version_aware", False):
        return "ranges"
    return "whole"


def split_rest(first_after: Callable[[str], str | None], last: str, until: str | None) -> list[KeyRange] | None:
    """The entries after `last` (up to `until`) as ranges that start at distinct leading characters: empty when
    none is left, None when the store ignores StartAfter (a probe answered a key not after the one asked for).

    The cut is made at the shallowest depth where the entries differ: one probe per part found, plus one per
    depth tried where all of them share the same leading characters.
    """
    first = first_after(last)
    if first is None or (until is not None and first > until):
        return []
    if first <= last:
        return None
    depth = len(os.path.commonprefix([last, until])) + 1 if until is not None else 1
    while True:
        cuts, key = [], first
        while key is not None and (until is None or key <= until) and len(cuts) < MAX_PARTS:
            point = key[:depth]
            if "/" in point:  # a sub-prefix is one entry of the level: never cut inside it
                point = key[:key.index("/") + 1]
            cuts.append(max(point + KEY_MAX, key))
            key = first_after(cuts[-1])
        if len(cuts) > 1 or depth >= len(first):
            break
        depth += 1
    if key is None or (until is not None and key > until):
        cuts[-1] = until  # nothing after the last cut: the last part ends where the range does
    else:
        cuts.append(until)  # MAX_PARTS reached: the last part holds the rest
    return [KeyRange(after, upto) for after, upto in zip([last] + cuts, cuts)]


class S3Level:
    """The top level of one S3 prefix, listed with ListObjectsV2 (Delimiter '/', StartAfter), in key order."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.bucket, key, _ = fs.split_path(root)
        self.prefix = key.rstrip("/") + "/" if key else ""

    def page(self, after: str, limit: int, token: str | None = None) -> tuple[list[tuple[str, dict]], str | None]:
        """One request's entries as (name relative to the prefix, info) sorted by name (a sub-prefix's name ends
        in '/'), and the continuation token when more follow."""
        args = {"Bucket": self.bucket, "Prefix": self.prefix, "Delimiter": "/", "MaxKeys": limit}
        if token:
            args["ContinuationToken"] = token
        elif after:
            args["StartAfter"] = self.prefix + after
        out = self.fs.call_s3("list_objects_v2", **args)
        n = len(self.prefix)
        entries = [(c["Key"][n:], {**c, "type": "file", "size": c.get("Size")}) for c in out.get("Contents", [])]
        entries += [(p["Prefix"][n:], {"type": "directory"}) for p in out.get("CommonPrefixes", [])]
        return sorted((e for e in entries if e[0]), key=lambda e: e[0]), out.get("NextContinuationToken")

    def first_after(self, after: str) -> str | None:
        """The name of the level's first entry after `after` (one request), or None."""
        entries, _ = self.page(after, 1)
        return entries[0][0] if entries else None

    def path(self, name: str) -> str:
        return f"{self.bucket}/{self.prefix}{name.rstrip('/')}"


def list_range(url: str, options: Mapping[str, Any] | None, key_range: KeyRange, cap: int
               ) -> tuple[pa.Table, dict[str, Any]]:
    """Ray task body: at most `cap` entries of one key range of an S3 prefix's top level: its matching files, and
    {"dirs": its sub-prefixes (full URLs), "rest": the ranges left to list (empty when the range is done),
    "keys": entries held, "ranged": False when the store ignored StartAfter and the whole level was listed here}."""
    fs, path = get_filesystem(url, options)
    if not key_range.after and not is_glob(path) and fs.isfile(path):
        table, dirs = level_parts(fs, path, {path: fs.info(path)})
        return table, {"dirs": dirs, "rest": [], "keys": 1, "ranged": True}
    level = S3Level(fs, level_root(path))
    entries, rest = _range_entries(level, key_range, cap)
    ranged = rest is not None
    if not ranged:  # the store ignores StartAfter: the whole level in this one task (the first), as before ranges
        if key_range != KeyRange():
            raise RuntimeError(f"listing {url!r}: the store stopped honouring StartAfter after {key_range.after!r}")
        entries, _ = _range_entries(level, key_range, None)
    if not entries and not key_range.after:
        raise InputError(f"input {url!r} does not exist (no such file, prefix or glob match)")
    table, dirs = level_parts(fs, path, {level.path(name): info for name, info in entries})
    return table, {"dirs": dirs, "rest": rest or [], "keys": len(entries), "ranged": ranged}


def _range_entries(level: S3Level, key_range: KeyRange, cap: int | None) -> tuple[list[tuple[str, dict]], list | None]:
    """At most `cap` entries of a range, and the rest of it split (see `split_rest`)."""
    entries: list[tuple[str, dict]] = []
    token = None
    while True:
        limit = PAGE if cap is None else min(PAGE, cap - len(entries))
        page, token = level.page(key_range.after, limit, token)
        for name, info in page:
            if key_range.until is not None and name > key_range.until:
                return entries, []
            if key_range.holds(name):  # a sub-prefix cut by StartAfter comes back again: its range already has it
                entries.append((name, info))
        if token is None:
            return entries, []
        if cap is not None and len(entries) >= cap:
            last = entries[-1][0]  # a sub-prefix ('a/') ends after all of its keys
            last = last + KEY_MAX if last.endswith("/") else last
            return entries, split_rest(level.first_after, last, key_range.until)


def scan_names(url: str, options: Mapping[str, Any] | None, cap: int) -> Iterator[pa.Table]:
    """Ray task body (a streaming generator): a local folder's top level as blocks of at most `cap` paths, in the
    order the directory is read (os.scandir reads it in pages, never whole)."""
    fs, path = get_filesystem(url, options)
    if not is_glob(path) and fs.isfile(path):
        yield pa.table({"path": [path]})
        return
    root = level_root(path)
    names: list[str] = []
    try:
        with os.scandir(root or "/") as entries:
            for entry in entries:
                names.append(entry.path)  # the folder's path joined with the name, as fs.ls names it
                if len(names) == cap:
                    yield pa.table({"path": names})
                    names = []
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"input {url!r} does not exist (no such file, prefix or glob match)") from None
    if names:
        yield pa.table({"path": names})


def look_up_names(block: pa.Table, url: str, options: Mapping[str, Any] | None) -> tuple[pa.Table, dict[str, Any]]:
    """Ray task body: one block of a local folder's paths looked up: its matching files, and {"dirs": its
    sub-prefixes, "keys": entries held}."""
    fs, path = get_filesystem(url, options)
    entries = {}
    for p in block.column("path").to_pylist():
        try:
            entries[p] = local_info(p)
        except FileNotFoundError:  # removed since the folder was read: no longer an input
            continue
    table, dirs = level_parts(fs, path, entries)
    return table, {"dirs": dirs, "keys": block.num_rows}


def local_info(path: str) -> dict[str, Any]:
    """What `fs.ls(detail=True)` says of one entry of a local folder (fsspec's info of a scandir entry: a link is
    itself, typed 'other', sized as its target), so that object versions match every other listing's."""
    own = os.lstat(path)
    if stat.S_ISLNK(own.st_mode):
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0
        return {"type": "other", "size": size, "mtime": own.st_mtime}
    kind = "directory" if stat.S_ISDIR(own.st_mode) else "file" if stat.S_ISREG(own.st_mode) else "other"
    return {"type": kind, "size": own.st_size, "mtime": own.st_mtime}
