"""What an output holds, counted with Ray Data: one row of totals per shard (rows, ok, errors by type, tiles,
tokens, rows by attempt, score histograms, passed), summed into `OutputCounts`. The per-shard rows are also the
shard index an incremental run keeps (run/committed.py), so a nightly run counts only the shards it adds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ErrorType
from pipeline.io.output import OutputFolder
from pipeline.io.output.pending import attempts_of
from pipeline.io.schema import Totals, column
from pipeline.model.scoring import HISTOGRAM_BINS, histogram
from pipeline.run.sources import SHARD_COLUMN, SIZE_COLUMN, read_shards
from pipeline.run.shuffles import column_sums

ERROR_KINDS = [e.value for e in ErrorType] + ["unknown"]
MAX_COUNTED_ATTEMPT = 10  # the summary counts rows by attempt up to here (a ladder has at most 8 rungs)
INDEX_KEYS = ("shard", "size")  # the shard index's columns besides the totals


@dataclass
class OutputCounts(Totals):
    """What is really in an output, summed over every shard."""

    files: int = 0  # shards
    score_histograms: dict[str, list[int]] = field(default_factory=dict)
    rows_passed: int | None = None
    by_attempt: dict[str, int] = field(default_factory=dict)

    def summary_fields(self) -> dict[str, Any]:
        """The RunSummary fields these counts fill."""
        return dict(rows_out=self.rows, rows_ok=self.ok, rows_error=self.rows - self.ok, errors_by_type=self.errors,
                    tiles=self.tiles, input_tokens=self.input_tokens, generated_tokens=self.generated_tokens,
                    files=self.files, score_histograms=self.score_histograms, rows_passed=self.rows_passed,
                    rows_by_attempt=self.by_attempt)

    @classmethod
    def from_sums(cls, sums: Mapping[str, int], files: int, score_names: Sequence[str], with_passed: bool) -> OutputCounts:
        """Counts from summed totals columns (totals_names)."""
        return cls(
            rows=sums.get("rows", 0), ok=sums.get("ok", 0), tiles=sums.get("tiles", 0),
            input_tokens=sums.get("input_tokens", 0), generated_tokens=sums.get("generated_tokens", 0), files=files,
            errors={k: sums[f"error:{k}"] for k in ERROR_KINDS if sums.get(f"error:{k}")},
            score_histograms={n: [sums.get(f"hist:{n}:{k}", 0) for k in range(HISTOGRAM_BINS)] for n in score_names},
            rows_passed=sums.get("passed", 0) if with_passed else None,
            by_attempt={str(a): sums[f"attempt:{a}"] for a in range(1, MAX_COUNTED_ATTEMPT + 1) if sums.get(f"attempt:{a}")})


def _totals_row(batch: pa.Table, score_columns: Sequence[tuple[str, str]], with_passed: bool) -> dict[str, int]:
    total = Totals.count(batch)
    row: dict[str, int] = {"rows": total.rows, "ok": total.ok, "tiles": total.tiles, "input_tokens": total.input_tokens,
                           "generated_tokens": total.generated_tokens}
    for kind in ERROR_KINDS:
        row[f"error:{kind}"] = total.errors.get(kind, 0)
    attempts = attempts_of(batch)
    for a in range(1, MAX_COUNTED_ATTEMPT + 1):
        row[f"attempt:{a}"] = int(pc.sum(pc.equal(attempts, a).cast(pa.int64())).as_py() or 0)
    for name, col in score_columns:
        for k, n in enumerate(histogram(batch.column(col).to_pylist())):
            row[f"hist:{name}:{k}"] = n
    if with_passed:
        row["passed"] = int(pc.sum(pc.fill_null(batch.column("passed"), False).cast(pa.int64())).as_py() or 0)
    return row


def shard_totals(batch: pa.Table, score_columns: Sequence[tuple[str, str]], with_passed: bool) -> pa.Table:
    """One row of totals per shard in a block of output rows (read with their shard and its size)."""
    rows = []
    for name in pc.unique(batch.column(SHARD_COLUMN)).to_pylist():
        part = batch.filter(pc.equal(batch.column(SHARD_COLUMN), name))
        rows.append({"shard": name, "size": int(part.column(SIZE_COLUMN)[0].as_py()),
                     **_totals_row(part, score_columns, with_passed)})
    return pa.Table.from_pylist(rows, schema=index_schema(score_columns, with_passed))


def totals_names(score_columns: Sequence[tuple[str, str]], with_passed: bool) -> list[str]:
    """The totals columns, in order."""
    names = ["rows", "ok", "tiles", "input_tokens", "generated_tokens", *[f"error:{k}" for k in ERROR_KINDS],
             *[f"attempt:{a}" for a in range(1, MAX_COUNTED_ATTEMPT + 1)]]
    names += [f"hist:{name}:{k}" for name, _ in score_columns for k in range(HISTOGRAM_BINS)]
    return names + (["passed"] if with_passed else [])


def index_schema(score_columns: Sequence[tuple[str, str]], with_passed: bool) -> pa.Schema:
    """The shard index's schema: shard name, its size in bytes, its totals."""
    return pa.schema([("shard", pa.string()), ("size", pa.int64()),
                      *[(n, pa.int64()) for n in totals_names(score_columns, with_passed)]])


def score_columns_of(criteria: Sequence[Any]) -> list[tuple[str, str]]:
    """(histogram name, column) per criterion of a score job."""
    return [((c.name or "score"), column("score", c)) for c in criteria]


def per_shard_totals(folder: OutputFolder, files: list[str], *, criteria: Sequence[Any] = (),
                     with_passed: bool = False) -> Any:
    """One row of totals per shard of `files`, as a materialized dataset (the shard index's rows)."""
    score_columns = score_columns_of(criteria)
    cols = ["id", "status", "error_type", "attempt", "num_tiles", "num_input_tokens", "num_generated_tokens",
            *[col for _, col in score_columns], *(["passed"] if with_passed else [])]
    return read_shards(files, folder.storage, cols, source=True, sizes=True).map_batches(
        shard_totals, fn_kwargs={"score_columns": score_columns, "with_passed": with_passed},
        batch_format="pyarrow", batch_size=None).materialize()


def sum_totals(per_shard: Any, names: Sequence[str]) -> dict[str, int]:
    """The totals columns of per-shard rows, summed."""
    return column_sums(per_shard, names)


def summarize_output(folder: OutputFolder, *, criteria: Sequence[Any] = (), with_passed: bool = False) -> OutputCounts:
    """Counts over every shard of the output (so the summary reports what is really there)."""
    return count_shards(folder, criteria=criteria, with_passed=with_passed)[0]


def count_shards(folder: OutputFolder, *, criteria: Sequence[Any] = (), with_passed: bool = False,
                 files: list[str] | None = None) -> tuple[OutputCounts, Any]:
    """Counts over the output's shards (or `files`), and the per-shard rows they were summed from (None: no
    shard)."""
    files = folder.shards() if files is None else files
    if not files:
        return OutputCounts(rows_passed=0 if with_passed else None), None
    score_columns = score_columns_of(criteria)
    per_shard = per_shard_totals(folder, files, criteria=criteria, with_passed=with_passed)
    sums = sum_totals(per_shard, totals_names(score_columns, with_passed))
    return OutputCounts.from_sums(sums, len(files), [n for n, _ in score_columns], with_passed), per_shard
