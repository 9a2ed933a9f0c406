"""The passed subset (`output_passed`) kept in step with the output, with no loss window.

Each output shard `part-<h>.parquet` that has passing rows gets its passed shard `part-<h>.passed.parquet` (same
`h`), written first. A run that dies between the two writes leaves a passed shard with no output shard: its rows
are not in the output, so a resumed run processes them again and writes both shards anew; the orphan is removed
before it does (`remove_orphans`). Passed shards of other names (written by earlier versions) are never touched.
At the end of a run, `check_passed` counts the subset against the output's passed rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow.parquet as pq

from pipeline.io.shards import shard_files
from pipeline.io.storage import get_filesystem

SUFFIX = ".passed.parquet"


def passed_name(shard: str) -> str:
    """The passed shard's name for an output shard's name."""
    return shard.removesuffix(".parquet") + SUFFIX


def _names(files: list[str]) -> set[str]:
    return {f.rsplit("/", 1)[-1] for f in files}


def orphans(output: str, output_passed: str, options: Mapping[str, Any] | None = None) -> list[str]:
    """Passed shards whose output shard is missing (a run died between the two writes)."""
    shards = _names(shard_files(output, options))
    fs, path = get_filesystem(output_passed, options)
    fs.invalidate_cache(path)  # shards written since this process last listed the folder
    return [f for f in shard_files(output_passed, options)
            if f.endswith(SUFFIX) and f.rsplit("/", 1)[-1].removesuffix(SUFFIX) + ".parquet" not in shards]


def remove_orphans(output: str, output_passed: str, options: Mapping[str, Any] | None = None) -> int:
    """Delete the orphan passed shards before a resumed run writes their rows again; how many."""
    found = orphans(output, output_passed, options)
    fs, _ = get_filesystem(output_passed, options)
    for f in found:
        fs.rm(f)
    return len(found)


def passed_rows(output_passed: str, options: Mapping[str, Any] | None = None) -> int:
    """Rows in the passed subset, from the shards' footers."""
    fs, path = get_filesystem(output_passed, options)
    fs.invalidate_cache(path)  # shards written since this process last listed the folder
    return sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in shard_files(output_passed, options))


def check_passed(output: str, output_passed: str, expected: int, options: Mapping[str, Any] | None = None) -> str | None:
    """What is wrong with the passed subset, if anything: an orphan shard, or a row count other than `expected`
    (the output's passed rows)."""
    stray = orphans(output, output_passed, options)
    if stray:
        return f"{len(stray)} passed shard(s) with no output shard (e.g. {stray[0].rsplit('/', 1)[-1]})"
    found = passed_rows(output_passed, options)
    if found != expected:
        return f"{found} rows in {output_passed}, but {expected} passed rows in the output"
    return None
