"""`dedup: exact`: what makes two samples the same work (their media's bytes and their questions), which one of them
is computed, and how the others' rows are copied from it. Pure functions over rows and Arrow tables; the Ray Data
passes that use them (a hash pass, a group-by, a fill pass) are in run/dedup.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import JobConfig
from pipeline.errors import MediaError
from pipeline.io.schema import DUPLICATE_OF, TODO_COLUMN
from pipeline.stages.base import Batch, as_list, require_columns
from pipeline.stages.preprocess import Preprocess

KEY_COLUMN = "__dedup_key"
REP_COLUMN = "__rep"  # a duplicate's representative: the sample whose rows it copies
DUP_PREFIX = "__dup_"  # a duplicate's own input columns, beside its representative's output row in the fill pass
KEY_SCHEMA = pa.schema([("id", pa.string()), (KEY_COLUMN, pa.string())])


def media_key(hashes: list[str], questions: list[Any] | None = None) -> str:
    """The dedup key of one sample: the sha256 of its media's hashes in order (a multi-image sample is the list of
    its pictures) and of the questions its row asks (rows asking other questions are other work)."""
    text = json.dumps({"media": hashes, "questions": [None if q is None else str(q) for q in questions or []]})
    return hashlib.sha256(text.encode()).hexdigest()


def row_questions(row: dict[str, Any]) -> list[Any]:
    """The questions an input row itself carries (`questions`, else `question`); the job's questions are the same
    for every row, so they do not enter the key."""
    own = as_list(row.get("questions"))
    return list(own) if own else ([row["question"]] if row.get("question") is not None else [])


def choose_representatives(keys: pa.Table) -> pa.Table:
    """Rows of (`id`, KEY_COLUMN) sharing keys -> (`id`, REP_COLUMN) for each duplicate: every id but the smallest of
    its key, which is the one computed (the smallest: the same choice whatever the order rows arrive in, so a resumed
    run chooses as the first did). Rows without a key (media that could not be read) are never duplicates."""
    keys = keys.filter(pc.is_valid(keys.column(KEY_COLUMN)))
    if keys.num_rows == 0:
        return pa.table({"id": pa.array([], pa.string()), REP_COLUMN: pa.array([], pa.string())})
    grouped = keys.group_by(KEY_COLUMN).aggregate([("id", "min")])
    joined = keys.join(grouped, KEY_COLUMN)
    dups = joined.filter(pc.not_equal(joined.column("id"), joined.column("id_min")))
    return pa.table({"id": dups.column("id").cast(pa.string()), REP_COLUMN: dups.column("id_min").cast(pa.string())})


class MediaHash:
    """Reads `id`, `uri` (and `uris`, `question(s)`, carried media); gives (`id`, KEY_COLUMN) per sample, its media
    read as the CPU stage reads them (Preprocess.read / the carried bytes). A sample that cannot be read gets no key:
    it goes through the pipeline and becomes its error row there."""

    reads = ("id", "uri")

    def __init__(self, job: JobConfig) -> None:
        self.preprocess = Preprocess(job)

    def hashes(self, uri: str, uris: list[str] | None, media: Any) -> list[str]:
        """The sha256 of each picture (or the video) of one sample."""
        if media is not None:
            blobs = [data for _, data in media()]
        else:
            blobs = [self.preprocess.read(u) for u in (uris if uris and len(uris) > 1 else [uri])]
        return [hashlib.sha256(data).hexdigest() for data in blobs]

    def __call__(self, batch: Batch) -> pa.Table:
        require_columns(batch, "dedup", self.reads)
        uris = batch.get("uris")
        _, media = self.preprocess.carried(batch)
        names = list(batch)
        keys = []
        for i, uri in enumerate(batch["uri"]):
            row = {n: batch[n][i] for n in ("question", "questions") if n in names}
            try:
                hashes = self.hashes(str(uri), as_list(uris[i]) if uris is not None else None, media[i] if media else None)
            except (MediaError, OSError, ValueError):  # no key: the CPU stage makes its error row
                keys.append(None)
                continue
            keys.append(media_key(hashes, row_questions(row)))
        return pa.table([pa.array([str(i) for i in batch["id"]], pa.string()), pa.array(keys, pa.string())],
                        schema=KEY_SCHEMA)


def prefixed(batch: pa.Table) -> pa.Table:
    """A duplicate's input row with its columns renamed DUP_PREFIX + name, to sit beside its representative's row."""
    return batch.rename_columns([DUP_PREFIX + n for n in batch.column_names])


def duplicate_rows(joined: pa.Table, carried: frozenset[str] = frozenset()) -> pa.Table:
    """Representatives' output rows joined with their duplicates' prefixed input rows -> the duplicates' output rows:
    the representative's answer (or its error), with the duplicate's id (`#k` kept for a multi-question row),
    `sample_id`, input columns and `duplicate_of` naming the representative. A duplicate resumed half written
    (TODO_COLUMN) gets only its missing rows. `carried`: input columns that never reach the output."""
    own = [n for n in joined.column_names if n.startswith(DUP_PREFIX)]
    out = joined.drop_columns(own)
    rep_rows, reps = out.column("id").to_pylist(), out.column("sample_id").to_pylist()
    dups = joined.column(DUP_PREFIX + "id").to_pylist()
    ids = [d + row[len(rep):] for row, rep, d in zip(rep_rows, reps, dups)]  # "" or "#k"
    columns = {"id": pa.array(ids, pa.string()), "sample_id": pa.array(dups, pa.string()),
               DUPLICATE_OF: pa.array(reps, pa.string())}
    skip = {"id", REP_COLUMN, TODO_COLUMN} | set(carried)
    for name in own:
        plain = name[len(DUP_PREFIX):]
        if plain not in skip and plain in out.column_names:
            columns[plain] = joined.column(name).cast(out.schema.field(plain).type)
    for name, values in columns.items():
        out = out.set_column(out.column_names.index(name), name, values)
    todo_name = DUP_PREFIX + TODO_COLUMN
    if todo_name in joined.column_names:
        todo = joined.column(todo_name).to_pylist()
        keep = [t is None or i in t for i, t in zip(ids, todo)]
        out = out.filter(pa.array(keep, pa.bool_()))
    return out
