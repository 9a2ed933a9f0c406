"""Pictures inside a Parquet manifest (job key `image_column`): the bytes stream with the rows (Ray Data's Parquet
reader) and the CPU stage decodes them in place of reading a URI; the plan's id pass reads what ids need only.

The column holds, per row, one picture as `binary`, or as a struct with `bytes` and optionally `path` (how Hugging
Face datasets store an Image feature), or a list of either (several images: one multi-image sample, as `uris`).

Ids: the manifest's `id`; else derived (with the row's question, as for URIs) from each picture's `path`, else from
the sha256 of its bytes. So the id pass reads the `path` leaf alone (Parquet column pruning) and the bytes only in
row groups where a row has neither `id` nor paths (`read_key_rows`). A row's `uri` is the manifest's own where it has
one (never read), else its first picture's path, else `sha256:<hex>` of the bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import ErrorType, InputError, MediaError
from pipeline.io.inputs import with_ids
from pipeline.io.schema import RESERVED_COLUMNS
from pipeline.io.storage import get_filesystem

KEY_COLUMNS = ("id", "question", "questions")  # besides the pictures, what the plan's id pass reads
# The id pass reads a file through fsspec in blocks of this size: the footer and the small key and path column
# chunks, not the bytes chunks between them (pyarrow asks for each column chunk by its own range).
KEY_READ_BLOCK = 1024**2


def _picture_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _picture_type(t.field("bytes").type)


def check_image_column(url: str, schema: pa.Schema, column: str) -> None:
    """The manifest holds `column` of a picture type, and no column the output writes itself."""
    if column not in schema.names:
        raise InputError(f"manifest {url!r} has no column {column!r} (image_column; columns: {', '.join(schema.names)})")
    t = schema.field(column).type
    inner = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else t
    if not _picture_type(inner):
        raise InputError(f"manifest {url!r}: image_column {column!r} is {t}; it must hold binary, a struct with "
                         "`bytes` (and `path`), or a list of either")
    clash = sorted(RESERVED_COLUMNS & set(schema.names))
    if clash:
        raise InputError(f"manifest {url!r} has columns the output uses: {', '.join(clash)}; rename them")


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[list[int], pa.Array]:
    """Pictures per row, and all pictures in row order (a null cell: none)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        return pc.fill_null(pc.list_value_length(arr), 0).to_pylist(), pc.list_flatten(arr)
    return [int(v) for v in arr.is_valid().to_pylist()], arr.filter(arr.is_valid())


def _field(flat: pa.Array, name: str) -> pa.Array | None:
    if pa.types.is_struct(flat.type):
        return pc.struct_field(flat, name) if flat.type.get_field_index(name) >= 0 else None
    return flat if name == "bytes" else None  # a plain binary column: bytes, no path


def picture_keys(column: pa.ChunkedArray | pa.Array) -> list[list[str | None]]:
    """Per row, what identifies each picture: its path, else `sha256:<hex>` of its bytes (None: neither is there,
    e.g. the bytes pruned from the read)."""
    counts, flat = _flat(column)
    paths = _field(flat, "path")
    data = _field(flat, "bytes")
    path_list = paths.to_pylist() if paths is not None else [None] * len(flat)
    keys: list[str | None] = []
    for i, path in enumerate(path_list):
        if path:
            keys.append(str(path))
        elif data is not None and data[i].is_valid:
            keys.append("sha256:" + hashlib.sha256(data[i].as_buffer()).hexdigest())  # the buffer, not a copy
        else:
            keys.append(None)
    out, start = [], 0
    for n in counts:
        out.append(keys[start:start + n])
        start += n
    return out


def _given_ids(table: pa.Table) -> list[bool]:
    if "id" not in table.column_names:
        return [False] * table.num_rows
    return [v is not None and str(v) != "" for v in table.column("id").to_pylist()]


def image_rows(table: pa.Table, url: str, column: str, *, checked: bool = False) -> pa.Table:
    """One batch of an image-column manifest as input rows: ids given or derived (module docstring), a `uri`, the
    picture column kept for the CPU stage. A row with no picture to derive an id from, and no id, is refused.
    `checked`: the column's type was checked already (the id pass reads it pruned to its paths)."""
    if not checked:
        check_image_column(url, table.schema, column)
    parts = picture_keys(table.column(column)) if column in table.column_names else [[]] * table.num_rows
    keys = []
    for p, has_id in zip(parts, _given_ids(table)):
        if p and None not in p:
            keys.append("\n".join(p))  # type: ignore[arg-type]
        elif has_id:
            keys.append("")
        else:
            raise InputError(f"manifest {url!r}: a row of image_column {column!r} has no picture (or one with neither "
                             "bytes nor path) and no id; give the manifest an `id` column or drop such rows")
    if "uri" not in table.column_names:
        table = table.append_column("uri", pa.array([p[0] if p and p[0] else "" for p in parts], pa.string()))
    return with_ids(table, url, keys)


def _path_leaves(pf: pq.ParquetFile, column: str) -> list[str]:
    """The Parquet leaves of `column`'s paths (`image.path`, `images.list.element.path`): all the id pass reads of it."""
    names = [pf.schema.column(i).path for i in range(len(pf.schema))]
    return [n for n in names if n.split(".", 1)[0] == column and n.rsplit(".", 1)[-1] == "path"]


def _ids_known(part: pa.Table, column: str) -> bool:
    """Whether every row of a row group read without the bytes has an id, or a path for each of its pictures."""
    given = _given_ids(part)
    if column not in part.column_names:
        return all(given)
    return all(has_id or (p and None not in p) for has_id, p in zip(given, picture_keys(part.column(column))))


def read_key_rows(url: str, column: str, options: Mapping[str, Any] | None = None) -> pa.Table:
    """The id pass over one Parquet manifest file: `id` and the question columns, the pictures' `path` leaf alone
    (column pruning), the bytes only in row groups where a row has neither an id nor paths. Row groups one at a
    time, so a large file never sits in memory whole."""
    fs, path = get_filesystem(url, options)
    tables = []
    with fs.open(path, "rb", block_size=KEY_READ_BLOCK) as f:
        pf = pq.ParquetFile(f)
        check_image_column(url, pf.schema_arrow, column)
        keys = [c for c in KEY_COLUMNS if c in pf.schema_arrow.names]
        leaves = _path_leaves(pf, column)
        for rg in range(pf.num_row_groups):
            part = pf.read_row_group(rg, columns=keys + leaves) if keys or leaves else None
            if part is None or not _ids_known(part, column):
                part = pf.read_row_group(rg, columns=keys + [column])
            rows = image_rows(part, url, column, checked=True)
            tables.append(rows.select(["id", *[c for c in ("question", "questions") if c in rows.column_names]]))
    return pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})


def _pictures(cell: Any) -> list[Any]:
    """A cell as a numpy batch or a row hands it over: a list (or array) of pictures, one picture, or None."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple, np.ndarray)):
        return list(cell)
    return [cell]


def cell_media(cell: Any, column: str) -> list[tuple[str, bytes]]:
    """A row's pictures (name, bytes) for the CPU stage, from its image_column cell; the name (the path, if any)
    tells a video by its extension, as a URI does."""
    out = []
    for k, picture in enumerate(_pictures(cell)):
        if isinstance(picture, dict):
            data, name = picture.get("bytes"), picture.get("path") or ""
        else:
            data, name = picture, ""
        if data is None or len(data) == 0:
            raise MediaError(ErrorType.BAD_INPUT, f"image_column {column!r}: picture {k} of the row has no bytes"
                                                  + (f" (path {name!r})" if name else ""))
        out.append((str(name), bytes(data)))
    if not out:
        raise MediaError(ErrorType.BAD_INPUT, f"image_column {column!r}: the row holds no picture")
    return out
