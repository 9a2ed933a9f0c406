"""WebDataset tar shards read where they lie: each shard's tar headers indexed into one input row per sample, and a
sample's media members read by byte range when the CPU stage decodes them. Nothing is extracted to storage.

A shard is a tar of members named `<key>.<ext>` (the key: the member's path up to the first dot of its base name,
as WebDataset splits it); the members of one key form one sample. A sample's media are its members whose `<ext>` is
an image or video extension (`jpg`, `png`, `mp4`, ...; several images: one multi-image sample, in tar order); its
`json` and `txt` members become the text columns `json` (the member's text, checked to be JSON) and `txt`; other
members are left out. Ids are stable: derived from `<shard URL>#<key>` (the row's `uri`), and the shard's version
for incremental runs, so a changed shard gets new ids and its samples are taken again.

Bad input becomes error rows, never a failed job: a shard that cannot be read is one error row (its `uri` the
shard's); a shard that ends early (truncated, or garbage where a header should be) keeps the samples before the cut
and makes the last sample it reached an error row (its members may be cut short or missing); a member that is not
what its extension says (a JSON that does not parse, a corrupt picture) makes its sample an error row.

Why not `ray.data.read_webdataset`: it reads every member's bytes in the read task (the plan's id pass and the resume
join would carry the pictures), fails the whole read on a truncated tar, and keeps no byte offsets to re-read one
sample; here the plan sees only headers, offsets and the small text members (`pipeline/run/webdataset_inputs.py`).
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.errors import ErrorType, InputError, MediaError
from pipeline.io.inputs import LISTING_SCHEMA, MEDIA_EXTENSIONS, derive_id
from pipeline.io.storage import extension, get_filesystem, object_version

WDS_COLUMN = "__wds"  # an input row's shard and media byte ranges: read by the CPU stage, never written out
TEXT_MEMBERS = ("json", "txt")  # member extensions kept as text columns of the same name
SHARD_EXTENSION = ".tar"
# Index reads go through fsspec's read-ahead cache in blocks of this size: small members come with the headers around
# them in one request, large ones (videos) are skipped by seeking past them.
INDEX_BLOCK_BYTES = 4 * 1024**2
MEDIA_MEMBER = pa.struct([("name", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
WDS_TYPE = pa.struct([("shard", pa.string()), ("media", pa.list_(MEDIA_MEMBER)), ("error_type", pa.string()),
                      ("error", pa.string())])
BRACES = re.compile(r"\{([^{}]*)\}")
RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's split: key up to the base name's first dot


def index_schema(versioned: bool = False) -> pa.Schema:
    """The input rows of an indexed shard: id, uri, the text members, the byte ranges (and the shard's version)."""
    fields = [("id", pa.string()), ("uri", pa.string()), *[(t, pa.string()) for t in TEXT_MEMBERS], (WDS_COLUMN, WDS_TYPE)]
    return pa.schema(fields + ([("source_version", pa.string())] if versioned else []))


def has_braces(url: str) -> bool:
    """Whether `input` names its shards by a brace pattern (`{00000..00099}`), not a glob or prefix."""
    return BRACES.search(url) is not None


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern spells, in order: `{000..099}` (zero-padded to the wider end when either end starts
    with 0, as bash and braceexpand do), `{a,b}`, several groups. Written here: a dozen lines, where the braceexpand
    package (what webdataset uses) would be a dependency for them."""
    match = BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    bounds = RANGE.fullmatch(body)
    if bounds:
        a, b = bounds.groups()
        width = max(len(a), len(b)) if a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        choices = [str(n).zfill(width) for n in range(int(a), int(b) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # `{x}` is not a pattern (bash keeps it as written)
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def is_shard(uri: str) -> bool:
    """A listed file taken as a shard (hidden files and markers left out, as for media)."""
    return extension(uri) == SHARD_EXTENSION and not uri.rsplit("/", 1)[-1].startswith((".", "_"))


def shard_listing(listing: pa.Table) -> pa.Table:
    """The shards of one batch of a listing (uri, version)."""
    keep = [i for i, u in enumerate(listing.column("uri").to_pylist()) if is_shard(u)]
    return listing.take(pa.array(keep, pa.int64())).cast(LISTING_SCHEMA)


def stat_shards(batch: pa.Table, *, options: Mapping[str, Any] | None = None) -> pa.Table:
    """Versions of named shards (a brace pattern's): a missing one gets none (its index is a not_found row)."""
    uris = batch.column("uri").to_pylist()
    versions = []
    for uri in uris:
        fs, path = get_filesystem(uri, options)
        try:
            versions.append(object_version(fs.info(path)))
        except FileNotFoundError:
            versions.append(None)
    return pa.table({"uri": uris, "version": versions}, schema=LISTING_SCHEMA)


def probe_shards(url: str, options: Mapping[str, Any] | None = None) -> None:
    """A brace pattern's first shard exists: a typo fails before any work."""
    first = expand_braces(url)[0]
    fs, path = get_filesystem(first, options)
    if not fs.exists(path):
        raise InputError(f"input {url!r}: its first shard {first!r} does not exist")


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, WebDataset's way (`a/b.seg.png` -> `a/b`, `seg.png`); None without one."""
    match = KEY.match(name.removeprefix("./"))
    return (match.group(1), match.group(2).lower()) if match else None


@dataclass
class _Sample:
    key: str
    media: list[tuple[str, int, int]] = field(default_factory=list)  # name, offset, size
    texts: dict[str, str] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    error: tuple[ErrorType, str] | None = None

    def fail(self, error_type: ErrorType, message: str) -> None:
        """Mark the sample bad (the first problem found names its error)."""
        if self.error is None:
            self.error = (error_type, message)


def _text(sample: _Sample, name: str, ext: str, data: bytes) -> None:
    """A json / txt member as text; not UTF-8, or JSON that does not parse: its sample is a bad_input row."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        sample.texts[ext] = data.decode("utf-8", errors="replace")
        sample.fail(ErrorType.BAD_INPUT, f"member {name} is not UTF-8 text: {err}")
        return
    sample.texts[ext] = text
    if ext == "json":
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            sample.fail(ErrorType.BAD_INPUT, f"member {name} is not valid JSON: {err}")


def _walk(tar: tarfile.TarFile, f: Any, size: int, samples: dict[str, _Sample]) -> str | None:
    """Group the members of an open shard into samples; returns why the shard ends early, or None."""
    try:
        for info in tar:
            if not info.isreg():
                continue
            parts = split_key(info.name)
            if parts is None:
                continue
            key, ext = parts
            sample = samples.setdefault(key, _Sample(key))
            if info.name in sample.names:
                sample.fail(ErrorType.BAD_INPUT, f"member {info.name} appears more than once")
            sample.names.add(info.name)
            if info.offset_data + info.size > size:
                return f"member {info.name} ends at byte {info.offset_data + info.size}, past the shard's end ({size} bytes)"
            if "." + ext in MEDIA_EXTENSIONS:
                sample.media.append((info.name, info.offset_data, info.size))
            elif ext in TEXT_MEMBERS:
                f.seek(info.offset_data)
                _text(sample, info.name, ext, f.read(info.size))
    except tarfile.ReadError as err:
        return f"{err} after byte {tar.offset}"
    f.seek(tar.offset)
    if f.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:  # a proper tar ends in zero blocks
        where = "truncated" if size - tar.offset < tarfile.BLOCKSIZE else "no tar header"
        return f"{where} at byte {tar.offset} of {size}"
    return None


def read_shard_index(url: str, options: Mapping[str, Any] | None = None) -> tuple[list[_Sample], str | None]:
    """The samples of one shard in tar order, and why it ends early (None: it ends properly). A shard that is missing
    or not a tar raises MediaError (its error row); a storage failure raises InputError (the plan fails: an error
    row would stand for samples that exist, under an id no later run expects)."""
    fs, path = get_filesystem(url, options)
    samples: dict[str, _Sample] = {}
    try:
        with fs.open(path, "rb", block_size=INDEX_BLOCK_BYTES, cache_type="readahead") as f:
            size = f.size if getattr(f, "size", None) is not None else fs.size(path)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                cut = _walk(tar, f, size, samples)
    except FileNotFoundError:
        raise MediaError(ErrorType.NOT_FOUND, f"no such shard: {url}") from None
    except tarfile.ReadError as err:
        raise MediaError(ErrorType.READ_ERROR, f"shard {url} is not a readable tar: {err}") from None
    except OSError as err:  # a storage failure, not a bad shard: the plan fails (as a listing would) and is rerun
        raise InputError(f"could not read shard {url}: {type(err).__name__}: {err}") from None
    return list(samples.values()), cut


def index_shard(url: str, version: str | None, options: Mapping[str, Any] | None = None, *,
                versioned: bool = False) -> pa.Table:
    """One shard as input rows (index_schema): one per sample; a shard that cannot be read is one error row."""

    def row_id(uri: str) -> str:
        """The row's id: from its uri, and the shard's version in incremental runs."""
        return derive_id(f"{uri}@{version}" if versioned else uri)

    rows = []
    try:
        samples, cut = read_shard_index(url, options)
    except MediaError as err:
        samples, cut = [], None
        rows.append({"id": row_id(url), "uri": url, WDS_COLUMN: {"shard": url, "media": [], "error_type": str(err.error_type),
                                                                  "error": str(err)}})
    if cut is not None:
        if samples:  # the last sample reached may have lost members: an error row; the ones before are whole
            samples[-1].error = (ErrorType.READ_ERROR, f"shard {url} ends early ({cut}); this sample may be cut short")
        else:
            rows.append({"id": row_id(url), "uri": url, WDS_COLUMN: {"shard": url, "media": [],
                                                                      "error_type": str(ErrorType.READ_ERROR),
                                                                      "error": f"shard {url} ends early ({cut})"}})
    for s in samples:
        if s.error is None and not s.media:
            s.fail(ErrorType.BAD_INPUT, f"sample {s.key} has no image or video member (members: "
                                        f"{', '.join(sorted(s.names))})")
        uri = f"{url}#{s.key}"
        error_type, error = s.error or (None, None)
        rows.append({"id": row_id(uri), "uri": uri, **{t: s.texts.get(t) for t in TEXT_MEMBERS},
                     WDS_COLUMN: {"shard": url, "media": [{"name": n, "offset": o, "size": z} for n, o, z in s.media],
                                  "error_type": None if error_type is None else str(error_type), "error": error}})
    schema = index_schema(versioned)
    if versioned:
        rows = [{**r, "source_version": version} for r in rows]
    return pa.Table.from_pylist(rows, schema=schema)


def index_shards(batch: pa.Table, *, options: Mapping[str, Any] | None = None, versioned: bool = False) -> pa.Table:
    """A batch of a shard listing (uri, version) as input rows: a Ray Data map function (one shard a call)."""
    tables = [index_shard(u, v, options, versioned=versioned)
              for u, v in zip(batch.column("uri").to_pylist(), batch.column("version").to_pylist())]
    return pa.concat_tables(tables) if tables else index_schema(versioned).empty_table()


def typed_text_columns(table: pa.Table) -> pa.Table:
    """The text columns typed as strings where a batch holds no value at all (numpy batches infer those as null):
    every shard of an output keeps one schema, so it reads back as one table."""
    for name in TEXT_MEMBERS:
        if name in table.column_names and pa.types.is_null(table.schema.field(name).type):
            table = table.set_column(table.column_names.index(name), name, table.column(name).cast(pa.string()))
    return table


def sample_media(cell: Mapping[str, Any] | None, options: Mapping[str, Any] | None = None) -> list[tuple[str, bytes]]:
    """A sample's media members (name, bytes), each read by its byte range: what the CPU stage decodes in place of
    reading `uri`. The index's verdict on the sample is raised here as the sample's error."""
    if not cell:
        raise MediaError(ErrorType.BAD_INPUT, "not a WebDataset sample (no shard index)")
    if cell.get("error"):
        raise MediaError(cell.get("error_type") or ErrorType.READ_ERROR, cell["error"])
    shard = str(cell["shard"])
    fs, path = get_filesystem(shard, options)
    out = []
    for member in cell["media"]:
        start, size = int(member["offset"]), int(member["size"])
        try:
            data = fs.cat_file(path, start=start, end=start + size)
        except FileNotFoundError:
            raise MediaError(ErrorType.NOT_FOUND, f"no such shard: {shard}") from None
        except (OSError, ValueError) as err:
            raise MediaError(ErrorType.READ_ERROR, f"could not read {member['name']} of {shard}: "
                                                   f"{type(err).__name__}: {err}") from None
        if len(data) != size:  # the shard changed since it was indexed
            raise MediaError(ErrorType.READ_ERROR, f"{member['name']} of {shard}: read {len(data)} of {size} bytes")
        out.append((str(member["name"]), data))
    return out
