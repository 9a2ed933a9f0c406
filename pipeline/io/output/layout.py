"""The names of everything under an output folder (folder.py's docstring draws the tree): the only place they are
spelled."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

JOB_FILE = "_JOB.json"
SUCCESS_FILE = "_SUCCESS.json"
LOCK_FILE = "_LOCK"
RETRY_DIR = "_retry"
STATE_DIR = "_state"
RUNS_DIR = "_runs"
INDEX_DIR = "_index"
SETTINGS_DIR = "_settings"
UPDATE_DIR = "_update"
LEGACY_STATE_FILE = "_INCREMENTAL.json"  # the incremental state as early versions kept it
PASSED_SUFFIX = ".passed.parquet"
OWN_FILES = (JOB_FILE, SUCCESS_FILE, LEGACY_STATE_FILE, LOCK_FILE)
OWN_DIRS = (RETRY_DIR, STATE_DIR, RUNS_DIR, INDEX_DIR, SETTINGS_DIR, UPDATE_DIR, f"{LOCK_FILE}.takeover")


def shard_name(ids: Iterable[str]) -> str:
    """A shard's file name, derived from the ids it holds: the same rows always get the same name."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def passed_name(shard: str) -> str:
    """The passed shard's name for an output shard's name."""
    return shard.removesuffix(".parquet") + PASSED_SUFFIX


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


FROM = "from-"  # a pending file copied out of this output shard, which is then rewritten without its rows
ATTEMPT = re.compile(r"/attempt-(\d+)/[^/]+\.parquet$")


def attempt_dir(attempt: int) -> str:
    """The folder (under `_retry/`) of rows waiting for attempt `attempt`."""
    return f"{RETRY_DIR}/attempt-{attempt}"


def source_shard(pending_file: str) -> str | None:
    """The output shard a `from-` pending file was copied out of (its name), else None."""
    name = basename(pending_file)
    return name[len(FROM):] if name.startswith(FROM) else None


def state_delta(stamp: str) -> str:
    """The folder of one successful incremental run's (uri, version) rows."""
    return f"{STATE_DIR}/{stamp}"


def run_record(stamp: str) -> str:
    """What one successful incremental run took and wrote (`_runs/<stamp>.json`), for people and for the index."""
    return f"{RUNS_DIR}/{stamp}.json"


def index_dir(stamp: str) -> str:
    """One successful incremental run's shard index: the shards it committed, with their sizes and totals."""
    return f"{INDEX_DIR}/{stamp}"


def settings_file(settings_id: str) -> str:
    """The full settings behind a row's `settings` id."""
    return f"{SETTINGS_DIR}/{settings_id}.json"
