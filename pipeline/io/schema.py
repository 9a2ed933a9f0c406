"""The output's columns, typed once: what the CPU stage adds, what every output row holds, what a score job adds.

Every shard has the same schema whatever its rows (all-error shards included). Input columns of a manifest may not
reuse these names (`RESERVED_COLUMNS`, derived from the schemas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# What the CPU stage learns about a sample's media; the CPU stage adds these, and the output keeps them.
MEDIA_FIELDS = [
    ("media_type", pa.string()),  # image | images | video
    ("num_tiles", pa.int32()),
    ("tiles_per_image", pa.list_(pa.int32())),  # per image of a sample, or per frame of a video
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("num_frames", pa.int32()),
    ("frame_indices", pa.list_(pa.int32())),
    ("fps", pa.float64()),
    ("duration_s", pa.float64()),
]
STATUS_FIELDS = [("status", pa.string()), ("error_type", pa.string()), ("error_message", pa.string())]

# Our columns, typed once so every shard has the same schema whatever its rows (all-error shards included).
OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("uri", pa.string()),
    ("task", pa.string()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    *STATUS_FIELDS,
    ("sample_id", pa.string()),
    ("question", pa.string()),
    ("question_index", pa.int32()),
    *MEDIA_FIELDS,
    ("num_input_tokens", pa.int32()),
    ("num_generated_tokens", pa.int32()),
    ("mean_logprob", pa.float64()),
    ("model", pa.string()),
    ("generation", pa.string()),
    ("preprocess_ms", pa.float64()),
    ("infer_ms", pa.float64()),
])

# What the write stage adds to every row: which try wrote it (1 = the first), the retry rung's overrides (JSON), and
# the id of the settings that made it (config/fingerprint.settings_id; the full settings: _settings/<id>.json).
WRITE_FIELDS = [pa.field("attempt", pa.int32()), pa.field("degraded", pa.string()), pa.field("settings", pa.string())]

# What the CPU stage adds to each input row.
PREPROCESS_SCHEMA = pa.schema([
    ("pixels", pa.large_binary()),  # uint8 tiles (num_tiles, 448, 448, 3), C order; vllm-native: whole pictures
    ("picture_sizes", pa.list_(pa.list_(pa.int32()))),  # vllm-native only: [height, width] of each picture
    *MEDIA_FIELDS,
    *STATUS_FIELDS,
    ("preprocess_ms", pa.float64()),
])


def to_table(columns: Mapping[str, Any], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """Columns in `schema` typed as it says (so all-null batches keep their types), then the rest as Arrow infers.

    Columns of the schema come first, in its order; other (passthrough) columns follow in their own order.
    """
    names = [f.name for f in schema] + [n for n in columns if n not in schema.names]
    arrays = []
    for name in names:
        values = columns[name]
        if not (isinstance(values, np.ndarray) and values.dtype != object):
            values = [_plain(v) for v in values]
        # from_pandas: NaN (how numpy batches carry nulls of numeric columns) becomes null
        arrays.append(pa.array(values, type=schema.field(name).type if name in schema.names else None, from_pandas=True))
    return pa.Table.from_arrays(arrays, names=names)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (as numpy batches carry list cells) to Python values Arrow converts by type."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


# An input row's column on a resumed run: the ids of the sample's output rows still to write (null: all of them).
# It travels with the sample through the stages; the write stage keeps only those rows and drops the column.
TODO_COLUMN = "__todo"

# `dedup: exact`: the id of the sample whose rows a duplicate's rows copy (null on rows the model computed). Only
# outputs of such jobs have it.
DUPLICATE_OF = "duplicate_of"

# Columns a manifest row brings and the output keeps under the same name.
INPUT_COLUMNS = frozenset({"id", "uri", "uris", "question", "questions"})
# Columns every job writes; a score job also writes its score columns (see `reserved_columns`).
RESERVED_COLUMNS = (frozenset(OUTPUT_SCHEMA.names) | frozenset(PREPROCESS_SCHEMA.names)
                    | frozenset(f.name for f in WRITE_FIELDS)) - INPUT_COLUMNS


def column(base: str, criterion: Any) -> str:
    """`score` for a job's single question, `score_<name>` for a named criterion."""
    return f"{base}_{criterion.name}" if criterion.name else base


def score_fields(criteria: Sequence[Any], *, with_passed: bool) -> list[pa.Field]:
    """The typed output columns a score job adds, per criterion (a config.Criterion)."""
    fields = []
    for c in criteria:
        fields += [pa.field(column("score", c), pa.float64()), pa.field(column("label", c), pa.string()),
                   pa.field(column("label_probs", c), pa.map_(pa.string(), pa.float64()))]
        if c.scale is not None:
            fields.append(pa.field(column("rating", c), pa.float64()))
    if with_passed:
        fields.append(pa.field("passed", pa.bool_()))
    return fields


def output_schema(job: Any) -> pa.Schema:
    """Our typed columns for this job (a config.JobConfig): the common ones, plus a score job's score columns, or a
    job with a `schema` its typed `answer` column (one struct merging the fields of per-question schemas)."""
    if job.task == "score":
        return pa.schema([*OUTPUT_SCHEMA, *score_fields(job.score_criteria(), with_passed=job.has_filter)])
    if job.answer_schemas():
        from pipeline.structured.answers import answer_type

        return pa.schema([*OUTPUT_SCHEMA, pa.field("answer", answer_type(job.answer_schemas()))])
    return OUTPUT_SCHEMA


def reserved_columns(job: Any) -> frozenset[str]:
    """Column names this job writes itself, which a manifest may not pass through."""
    dedup = frozenset({DUPLICATE_OF}) if getattr(job, "dedup", "none") != "none" else frozenset()
    return RESERVED_COLUMNS | dedup | (frozenset(output_schema(job).names) - INPUT_COLUMNS)


def error_counts(table: pa.Table) -> dict[str, int]:
    """Rows of `table` that are not ok, by error_type: the one count progress lines and the summary use."""
    errors = table.filter(pc.not_equal(table.column("status"), "ok")) if table.num_rows else table
    if errors.num_rows == 0:
        return {}
    kinds = pc.fill_null(errors.column("error_type"), "unknown")
    counts = pc.value_counts(kinds).to_pylist()
    return {c["values"]: int(c["counts"]) for c in sorted(counts, key=lambda c: c["values"])}


@dataclass
class Totals:
    """Counts over a set of output rows (a shard, or a whole output): the one place rows and errors are counted."""

    rows: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error_type -> rows
    tiles: int = 0
    input_tokens: int = 0
    generated_tokens: int = 0

    @classmethod
    def count(cls, table: pa.Table, **extra: Any) -> Any:
        """The totals of the rows in `table` (`extra`: a subclass's own fields)."""
        total = lambda col: int(pc.sum(table.column(col)).as_py() or 0) if table.num_rows else 0  # noqa: E731
        errors = error_counts(table)
        return cls(rows=table.num_rows, ok=table.num_rows - sum(errors.values()), errors=errors, tiles=total("num_tiles"),
                   input_tokens=total("num_input_tokens"), generated_tokens=total("num_generated_tokens"), **extra)
