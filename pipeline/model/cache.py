"""The node-local model cache: where remote and converted checkpoints are kept, and how entries are published.

A leaf module (no torch, no conversion), so both `checkpoints` and `convert` name cache entries the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("INTERNVL_BATCH_CACHE", Path.home() / ".cache" / "internvl-batch")) / "models"


def cache_root(cache_dir: str | Path | None) -> Path:
    """The cache folder a job uses: its model_cache, else ~/.cache/internvl-batch/models."""
    return Path(cache_dir) if cache_dir else DEFAULT_CACHE


def remote_entry(url: str, cache_dir: str | Path | None, version: str) -> Path:
    """The cache entry of a remote checkpoint prefix as it is now: keyed by the URL and the version of everything
    under it (io/storage.prefix_version: ETags, else sizes and mtimes), so a re-uploaded checkpoint gets a new entry
    rather than the stale copy."""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return cache_root(cache_dir) / f"{digest}-{version}"


def converted_entry(stamp: str, cache_dir: str | Path | None) -> Path:
    """The cache entry of a converted copy of a local original-format checkpoint (`stamp`: its path and mtime)."""
    return cache_root(cache_dir) / f"converted-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"


def publish(dest: Path, build: Callable[[Path], object]) -> None:
    """Build a checkpoint folder in a temporary sibling and rename it into place: readers never see half of one,
    and of concurrent builders on one node the first rename wins while the others discard their copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        os.rename(tmp, dest)
    except OSError:
        if not (dest / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DIGESTS = DEFAULT_CACHE.parent / "digests.json"


def digest_cache() -> dict[str, str]:
    """Checkpoint files' sha256 seen on this node, by `path:size:mtime_ns` (model/checkpoints.file_digest)."""
    try:
        return json.loads(DIGESTS.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def save_digest_cache(store: dict[str, str]) -> None:
    """Write the digests whole (a temporary file renamed into place: concurrent runs never read half a file)."""
    DIGESTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = DIGESTS.with_name(f".{DIGESTS.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(store))
    os.replace(tmp, DIGESTS)
