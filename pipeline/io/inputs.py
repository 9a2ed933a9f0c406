"""Turn a job's `input` (prefix, glob, manifest or S3 Inventory report) into rows with stable ids.

Rows carry `id`, `uri` (or `uris`, a list: one sample of several images), optional `question` / `questions`
and any passthrough columns of a manifest. Ids are given by the manifest or derived from the URI (and question),
so they stay the same across runs: resume keys on them.

Everything here works on one batch of rows at a time (pure functions over Arrow tables): the run reads inputs
with Ray Data and calls these in its workers (`pipeline/run/sources.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.io.schema import RESERVED_COLUMNS
from pipeline.io.storage import IMAGE_EXTENSIONS, MANIFEST_EXTENSIONS, extension
from pipeline.media.video import VIDEO_EXTENSIONS

MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
INVENTORY_MANIFEST = "manifest.json"
# A listing (of a prefix, a glob or an inventory report): one row per object, its version for incremental runs.
LISTING_SCHEMA = pa.schema([("uri", pa.string()), ("version", pa.string())])
SKIPPED_SCHEMA = pa.schema([("ext", pa.string()), ("n", pa.int64())])


def derive_id(uri: str, question: str | None = None) -> str:
    """A stable id from the URI (and question, so one image may carry several questions)."""
    key = uri if question is None else f"{uri}\n{question}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def is_manifest(url: str) -> bool:
    return extension(url) in MANIFEST_EXTENSIONS


def input_kind(url: str, input_format: str = "auto") -> str:
    """`files` (a prefix or glob of media), `manifest` (one, a folder or a glob of manifest files), `inventory` or
    `webdataset` (tar shards: a .tar file, glob or brace pattern)."""
    if input_format != "auto":
        return input_format
    if url.rstrip("/").rsplit("/", 1)[-1] == INVENTORY_MANIFEST:
        return "inventory"
    if extension(url) == ".tar":
        return "webdataset"
    return "manifest" if is_manifest(url) else "files"


def manifest_base(url: str) -> str:
    """The folder relative manifest URIs resolve against: a file's folder, a folder itself, a glob's static part."""
    if any(ch in url for ch in "*?["):
        static = url.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
        return static.rstrip("/") if static.endswith("/") else (static.rsplit("/", 1)[0] if "/" in static else ".")
    if extension(url) in MANIFEST_EXTENSIONS:
        return url.rsplit("/", 1)[0] if "/" in url else "."
    return url.rstrip("/") or "/"  # a folder, with or without its trailing '/'


# Manifest columns read as text whatever they look like (a CSV id column of digits stays an id, not a number).
MANIFEST_TEXT_TYPES = {name: pa.string() for name in ("id", "uri", "question")}


def _resolve(uri: str, base: str) -> str:
    """Manifest URIs may be relative to the manifest's folder."""
    return uri if "://" in uri or uri.startswith("/") else f"{base}/{uri}"


def check_manifest_columns(url: str, names: list[str]) -> None:
    """A manifest needs `uri` or `uris` and may not bring columns the output writes."""
    if "uri" not in names and "uris" not in names:
        raise InputError(f"manifest {url!r} has no 'uri' (or 'uris') column (columns: {', '.join(names)})")
    clash = sorted(RESERVED_COLUMNS & set(names))
    if clash:
        raise InputError(f"manifest {url!r} has columns the output uses: {', '.join(clash)}; rename them")


def manifest_rows(table: pa.Table, url: str, base: str) -> pa.Table:
    """One batch of a manifest's rows, validated, URIs resolved against `base`, ids derived: `id`, `uri` first."""
    names = table.column_names
    check_manifest_columns(url, names)
    if "uris" in names:  # a sample of several images
        lists = table.column("uris").to_pylist()
        for uris in lists:
            if not uris or not all(isinstance(u, str) and u for u in uris):
                raise InputError(f"manifest {url!r}: 'uris' must be a non-empty list of URIs in every row (found {uris!r})")
        lists = [[_resolve(u, base) for u in uris] for uris in lists]
        table = table.set_column(names.index("uris"), "uris", pa.array(lists, pa.list_(pa.string())))
        if "uri" not in names:
            table = table.append_column("uri", pa.array([uris[0] for uris in lists], pa.string()))
        else:
            table = table.set_column(names.index("uri"), "uri", table.column("uri").cast(pa.string()))
        keys = ["\n".join(uris) for uris in lists]
    else:
        uris = table.column("uri").cast(pa.string()).to_pylist()
        if any(not u for u in uris):
            raise InputError(f"manifest {url!r}: 'uri' is empty in a row (after {next((u for u in uris if u), None)!r})")
        uris = [_resolve(u, base) for u in uris]
        table = table.set_column(names.index("uri"), "uri", pa.array(uris, pa.string()))
        keys = uris
    return with_ids(table, url, keys)


def with_ids(table: pa.Table, url: str, keys: list[str]) -> pa.Table:
    """A batch of manifest rows with its questions checked and its ids given or derived from `keys` (one per row:
    what identifies its media) and the row's question: `id`, `uri` first."""
    if "questions" in table.column_names:
        for qs in table.column("questions").to_pylist():
            if qs is not None and (not isinstance(qs, list) or not all(isinstance(q, str) and q.strip() for q in qs)):
                raise InputError(f"manifest {url!r}: 'questions' must be a list of non-empty strings in every row (found {qs!r})")
    if "question" in table.column_names:
        table = table.set_column(table.column_names.index("question"), "question", table.column("question").cast(pa.string()))
        questions = table.column("question").to_pylist()
    else:
        questions = [None] * len(keys)
    if "id" in table.column_names:
        given = [None if v is None else str(v) for v in table.column("id").to_pylist()]
        ids = [i if i else derive_id(k, q) for i, k, q in zip(given, keys, questions)]
        table = table.drop_columns(["id"])
    else:
        ids = [derive_id(k, q) for k, q in zip(keys, questions)]
    table = table.add_column(0, "id", pa.array(ids, pa.string()))
    order = ["id", "uri"] + [c for c in table.column_names if c not in ("id", "uri")]
    return table.select(order)


def duplicate_id_error(url: str, dup: str) -> InputError:
    return InputError(f"manifest {url!r}: id {dup!r} appears more than once; ids must be unique")


def is_hidden(uri: str) -> bool:
    """Hidden files and markers (`_SUCCESS`, an earlier run's `_JOB.json`): neither media nor counted as skipped."""
    return uri.rsplit("/", 1)[-1].startswith((".", "_"))


def is_media(uri: str) -> bool:
    """A listed file taken as an input: a media extension, or none at all (then recognised by content when decoded,
    as manifest URIs are: a video by its container, else an image; neither: a decode_error row)."""
    ext = extension(uri)
    return not is_hidden(uri) and (ext in MEDIA_EXTENSIONS or not ext)


def media_rows(listing: pa.Table, *, versioned: bool = False) -> pa.Table:
    """The media files of one batch of a listing as input rows: `id` (from the URI, and the object's version for
    incremental runs, whose changed objects get new rows), `uri` (and `source_version`)."""
    uris = listing.column("uri").to_pylist()
    keep = [i for i, u in enumerate(uris) if is_media(u)]
    kept = [uris[i] for i in keep]
    if not versioned:
        return pa.table({"id": pa.array([derive_id(u) for u in kept], pa.string()), "uri": pa.array(kept, pa.string())})
    versions = listing.column("version").take(pa.array(keep, pa.int64())).cast(pa.string())
    ids = [derive_id(f"{u}@{v}") for u, v in zip(kept, versions.to_pylist())]
    return pa.table({"id": pa.array(ids, pa.string()), "uri": pa.array(kept, pa.string()), "source_version": versions})


def skipped_counts(listing: pa.Table, keep: Callable[[str], bool] = is_media) -> pa.Table:
    """Listed files that are not inputs (`keep`: media files, or shards), by extension (hidden files and markers are
    not counted): `ext`, `n`."""
    exts = [extension(u) for u in listing.column("uri").to_pylist() if not is_hidden(u) and not keep(u)]
    if not exts:
        return SKIPPED_SCHEMA.empty_table()
    counts = pc.value_counts(pa.array(exts, pa.string())).to_pylist()
    return pa.table({"ext": [c["values"] for c in counts], "n": [int(c["counts"]) for c in counts]}, schema=SKIPPED_SCHEMA)


def add_counts(totals: dict[str, int], table: pa.Table) -> dict[str, int]:
    """Sum (ext, n) rows into a dict, sorted by key."""
    for ext, n in zip(table.column("ext").to_pylist(), table.column("n").to_pylist()):
        totals[ext] = totals.get(ext, 0) + int(n)
    return dict(sorted(totals.items()))

