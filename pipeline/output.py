"""The output's schema, shard naming, the run summary (_SUCCESS.json) and its table."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.storage import get_filesystem, is_local

SUCCESS_FILE = "_SUCCESS.json"
JOB_FILE = "_JOB.json"  # written before the first shard: which configuration (fingerprint) this output belongs to

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

# What the CPU stage adds to each input row.
PREPROCESS_SCHEMA = pa.schema([
    ("pixels", pa.large_binary()),  # uint8 tiles (num_tiles, 448, 448, 3), C order
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


def shard_name(ids: list[str]) -> str:
    """A shard's file name, derived from the ids it holds: the same rows always get the same name."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_shard(table: pa.Table, output: str, options: Mapping[str, Any] | None = None) -> str:
    """Write one Parquet shard under `output` so that readers never see it half written; returns its name.

    Object stores publish an object only when its upload completes; on local disks we write a hidden temporary
    file and rename it into place.
    """
    name = shard_name(table.column("id").to_pylist())
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


# Columns the model stage adds for the run summary only (which replica, when its batch ran); never written.
TIMING_FIELDS = ("__replica", "__ready", "__start", "__end")


def batch_timings(table: pa.Table) -> list[dict[str, Any]]:
    """The distinct model batches whose rows are in `table`: replica, when it was ready, batch start and end."""
    if "__replica" not in table.column_names:
        return []
    seen = {tuple(r.values()) for r in table.select(list(TIMING_FIELDS)).to_pylist() if r["__replica"] is not None}
    return [dict(zip(("replica", "ready", "start", "end"), t)) for t in sorted(seen)]


def replica_usage(batches: list[dict[str, Any]]) -> tuple[float | None, dict[str, dict[str, float]]]:
    """Per replica: batches, seconds busy, seconds from ready to its last batch's end; and the busy fraction of
    all replicas together (None without batches). Each replica's times come from its own clock."""
    per: dict[str, dict[str, float]] = {}
    for b in {(b["replica"], b["start"]): b for b in batches}.values():
        r = per.setdefault(b["replica"], {"batches": 0, "busy_s": 0.0, "ready": b["ready"], "end": b["end"]})
        r["batches"] += 1
        r["busy_s"] += b["end"] - b["start"]
        r["ready"], r["end"] = min(r["ready"], b["ready"]), max(r["end"], b["end"])
    usage = {k: {"batches": int(v["batches"]), "busy_s": round(v["busy_s"], 3), "span_s": round(v["end"] - v["ready"], 3)}
             for k, v in sorted(per.items())}
    span = sum(u["span_s"] for u in usage.values())
    return (round(sum(u["busy_s"] for u in usage.values()) / span, 4) if span > 0 else None), usage


def shard_stats(table: pa.Table, name: str) -> dict[str, Any]:
    """Counts of one written shard, for progress output."""
    errors: dict[str, int] = {}
    for s, t in zip(table.column("status").to_pylist(), table.column("error_type").to_pylist()):
        if s != "ok":
            errors[t or "unknown"] = errors.get(t or "unknown", 0) + 1
    total = lambda col: int(pc.sum(table.column(col)).as_py() or 0)  # noqa: E731
    return dict(file=name, rows=table.num_rows, ok=table.num_rows - sum(errors.values()), errors=json.dumps(errors),
                tiles=total("num_tiles"), input_tokens=total("num_input_tokens"),
                generated_tokens=total("num_generated_tokens"), batches=json.dumps(batch_timings(table)))


def existing_results(output: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Result files (shards and markers) already under `output`."""
    fs, path = get_filesystem(output, options)
    if not fs.exists(path):
        return []
    own = lambda p: p.endswith((".parquet", SUCCESS_FILE, JOB_FILE, "_INCREMENTAL.json")) or "/_runs/" in p  # noqa: E731
    return sorted(p for p in fs.find(path) if own(p))


def shard_files(output: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Paths of the Parquet shards under `output` (hidden temporary files excluded)."""
    return [p for p in existing_results(output, options)
            if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_"))]


def clear_results(output: str, options: Mapping[str, Any] | None = None) -> int:
    """Delete earlier shards and markers (for overwrite); returns how many files were removed."""
    fs, _ = get_filesystem(output, options)
    files = existing_results(output, options)
    for p in files:
        fs.rm(p)
    return len(files)


def read_marker(output: str, name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """A JSON marker under `output`, or None."""
    fs, path = get_filesystem(output, options)
    try:
        with fs.open(f"{path.rstrip('/')}/{name}", "r") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def write_marker(output: str, name: str, data: dict[str, Any], options: Mapping[str, Any] | None = None) -> None:
    fs, path = get_filesystem(output, options)
    target = f"{path.rstrip('/')}/{name}"
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(target, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))


def remove_marker(output: str, name: str, options: Mapping[str, Any] | None = None) -> None:
    fs, path = get_filesystem(output, options)
    target = f"{path.rstrip('/')}/{name}"
    if fs.exists(target):
        fs.rm(target)


def existing_ids(output: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """The `id` of every row already written under `output` (duplicates kept, so callers can count them)."""
    files = shard_files(output, options)
    if not files:
        return []
    fs, _ = get_filesystem(output, options)
    return [i for f in files for i in pq.read_table(f, columns=["id"], filesystem=fs).column("id").to_pylist()]


@dataclass
class RunSummary:
    """What a run did: counts, errors by type, throughput, and the fingerprint of its config."""

    rows_in: int
    rows_out: int
    rows_ok: int
    rows_error: int
    errors_by_type: dict[str, int]
    tiles: int
    input_tokens: int
    generated_tokens: int
    wall_s: float
    fingerprint: str
    task: str
    model: str
    output: str
    files: int
    skipped_inputs: dict[str, int] = field(default_factory=dict)
    rows_this_run: int = 0  # rows processed by this run (the rest were already in the output: resumed)
    tiles_this_run: int = 0
    tokens_this_run: int = 0
    score_histograms: dict[str, list[int]] = field(default_factory=dict)  # per criterion, 10 bins over [0, 1]
    rows_passed: int | None = None
    objects_taken: int | None = None  # incremental runs: new or changed objects this run took
    # Fraction of the model replicas' time (from loaded to their last batch) spent running batches, not waiting
    # for input: near 1 means the CPU stage keeps up; per replica: batches, busy_s, span_s.
    model_busy_fraction: float | None = None
    replicas: dict[str, dict[str, float]] = field(default_factory=dict)
    finished_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def samples_per_s(self) -> float:
        """Rows processed by this run per second of its wall time."""
        return self.rows_this_run / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> str:
        data = asdict(self)
        data.update(
            samples_per_s=round(self.samples_per_s, 3),
            tokens_per_s=round(self.tokens_this_run / self.wall_s, 3) if self.wall_s > 0 else 0.0,
            tiles_per_s=round(self.tiles_this_run / self.wall_s, 3) if self.wall_s > 0 else 0.0,
        )
        return json.dumps(data, indent=2, sort_keys=True)


def summarize_output(output: str, options: Mapping[str, Any] | None = None, *, criteria: list | None = None,
                     with_passed: bool = False) -> dict[str, Any]:
    """Counts read back from every shard under `output` (so the summary reports what is really there)."""
    from pipeline.scoring import column, histogram

    fs, _ = get_filesystem(output, options)
    files = shard_files(output, options)
    score_cols = [column("score", c) for c in criteria or []]
    cols = ["id", "status", "error_type", "num_tiles", "num_input_tokens", "num_generated_tokens", *score_cols]
    cols += ["passed"] if with_passed else []
    tables = [pq.read_table(f, columns=cols, filesystem=fs) for f in files]
    table = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.int32()) for c in cols})
    status = table.column("status").to_pylist()
    by_type: dict[str, int] = {}
    for s, t in zip(status, table.column("error_type").to_pylist()):
        if s != "ok":
            by_type[t or "unknown"] = by_type.get(t or "unknown", 0) + 1
    total = lambda col: int(pc.sum(table.column(col)).as_py() or 0) if table.num_rows else 0  # noqa: E731
    return dict(
        rows_out=table.num_rows,
        unique_ids=len(set(table.column("id").to_pylist())),
        rows_ok=table.num_rows - sum(by_type.values()),
        rows_error=sum(by_type.values()),
        errors_by_type=by_type,
        tiles=total("num_tiles"),
        input_tokens=total("num_input_tokens"),
        generated_tokens=total("num_generated_tokens"),
        files=len(files),
        histograms={(c.name or "score"): histogram(table.column(column("score", c)).to_pylist()) for c in criteria or []},
        rows_passed=int(pc.sum(pc.fill_null(table.column("passed"), False).cast(pa.int64())).as_py() or 0) if with_passed else None,
    )


def write_success(output: str, summary: RunSummary, options: Mapping[str, Any] | None = None) -> None:
    """Write _SUCCESS.json last: its presence means every shard is in place."""
    fs, path = get_filesystem(output, options)
    with fs.open(f"{path.rstrip('/')}/{SUCCESS_FILE}", "w") as f:
        f.write(summary.to_json())
