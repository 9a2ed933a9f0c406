"""Turn a job's `input` (prefix, glob or manifest) into a table of rows with stable ids.

Rows carry `id`, `uri` (or `uris`, a list: one sample of several images), optional `question` / `questions`
and any passthrough columns of a manifest. Ids are given by the
manifest or derived from the URI (and question), so they stay the same across runs: later resume work keys on them.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.io.schema import RESERVED_COLUMNS
from pipeline.io.storage import IMAGE_EXTENSIONS, MANIFEST_EXTENSIONS, extension, get_filesystem, list_files
from pipeline.media.video import VIDEO_EXTENSIONS

MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS



@dataclass(frozen=True)
class InputListing:
    """The rows to process, and what was left out of a listing and why."""

    table: pa.Table
    skipped: dict[str, int]  # extension -> count of listed files that are not media


def derive_id(uri: str, question: str | None = None) -> str:
    """A stable id from the URI (and question, so one image may carry several questions)."""
    key = uri if question is None else f"{uri}\n{question}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def is_manifest(url: str) -> bool:
    return extension(url) in MANIFEST_EXTENSIONS


def read_manifest(url: str, options: Mapping[str, Any] | None = None) -> pa.Table:
    """Read a .parquet / .jsonl / .csv manifest into an Arrow table."""
    fs, path = get_filesystem(url, options)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"manifest {url!r} does not exist") from None
    ext = extension(url)
    try:
        if ext == ".parquet":
            return pq.read_table(io.BytesIO(data))
        if ext == ".jsonl":
            return pajson.read_json(io.BytesIO(data))
        return pacsv.read_csv(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"manifest {url!r} could not be parsed as {ext}: {err}") from None


def _resolve(uri: str, base: str) -> str:
    """Manifest URIs may be relative to the manifest's folder."""
    return uri if "://" in uri or uri.startswith("/") else f"{base}/{uri}"


def _manifest_rows(url: str, options: Mapping[str, Any] | None) -> pa.Table:
    table = read_manifest(url, options)
    names = table.column_names
    if "uri" not in names and "uris" not in names:
        raise InputError(f"manifest {url!r} has no 'uri' (or 'uris') column (columns: {', '.join(names)})")
    clash = sorted(RESERVED_COLUMNS & set(names))
    if clash:
        raise InputError(f"manifest {url!r} has columns the output uses: {', '.join(clash)}; rename them")
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    keys: list[str] = []
    if "uris" in names:  # a sample of several images
        lists = table.column("uris").to_pylist()
        for i, uris in enumerate(lists):
            if not uris or not all(isinstance(u, str) and u for u in uris):
                raise InputError(f"manifest {url!r}: 'uris' in row {i} must be a non-empty list of URIs")
        lists = [[_resolve(u, base) for u in uris] for uris in lists]
        table = table.set_column(names.index("uris"), "uris", pa.array(lists, pa.list_(pa.string())))
        if "uri" not in names:
            table = table.append_column("uri", pa.array([uris[0] for uris in lists], pa.string()))
        keys = ["\n".join(uris) for uris in lists]
    else:
        uris = table.column("uri").cast(pa.string()).to_pylist()
        if any(not u for u in uris):
            raise InputError(f"manifest {url!r}: 'uri' is empty in row {next(i for i, u in enumerate(uris) if not u)}")
        uris = [_resolve(u, base) for u in uris]
        table = table.set_column(names.index("uri"), "uri", pa.array(uris, pa.string()))
        keys = uris
    if "questions" in table.column_names:
        for i, qs in enumerate(table.column("questions").to_pylist()):
            if qs is not None and (not isinstance(qs, list) or not all(isinstance(q, str) and q.strip() for q in qs)):
                raise InputError(f"manifest {url!r}: 'questions' in row {i} must be a list of non-empty strings")
    questions = (
        table.column("question").cast(pa.string()).to_pylist() if "question" in table.column_names else [None] * len(keys)
    )
    if "id" in table.column_names:
        ids = [None if v is None else str(v) for v in table.column("id").to_pylist()]
        ids = [i if i else derive_id(k, q) for i, k, q in zip(ids, keys, questions)]
        table = table.drop_columns(["id"])
    else:
        ids = [derive_id(k, q) for k, q in zip(keys, questions)]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise InputError(f"manifest {url!r}: id {i!r} appears more than once; ids must be unique")
        seen.add(i)
    table = table.add_column(0, "id", pa.array(ids, pa.string()))
    order = ["id", "uri"] + [c for c in table.column_names if c not in ("id", "uri")]
    return table.select(order)


def list_inputs(url: str, options: Mapping[str, Any] | None = None) -> InputListing:
    """Rows for a prefix, glob or manifest, sorted by URI for listings and in manifest order otherwise.

    A listing takes files with a media extension and files without any extension (recognised by content when
    decoded, as manifest URIs are: a video by its container, else an image; neither: a decode_error row); other
    extensions are counted in `skipped`; names starting with '.' or '_' are left out."""
    if is_manifest(url):
        return InputListing(table=_manifest_rows(url, options), skipped={})
    try:
        files = list_files(url, options)
    except FileNotFoundError as err:
        raise InputError(str(err)) from None
    media, skipped = [], {}
    for f in files:
        ext, name = extension(f), f.rsplit("/", 1)[-1]
        if name.startswith((".", "_")):
            continue  # hidden files and markers (_SUCCESS, _JOB.json of an earlier run), neither media nor counted
        if ext in MEDIA_EXTENSIONS or not ext:  # no extension: decoded by content (a video by its container)
            media.append(f)
        else:
            skipped[ext] = skipped.get(ext, 0) + 1
    table = pa.table({"id": [derive_id(u) for u in media], "uri": media}, schema=pa.schema([("id", pa.string()), ("uri", pa.string())]))
    return InputListing(table=table, skipped=skipped)
