"""Where a checkpoint lives: local folders, remote (s3://, any fsspec) prefixes copied once per node, hub ids.

No torch here, so the driver can check a job's model before any replica starts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.storage import get_filesystem, is_local

DEFAULT_CACHE = Path(os.environ.get("INTERNVL_BATCH_CACHE", Path.home() / ".cache" / "internvl-batch")) / "models"


class ModelLoadError(RuntimeError):
    """The checkpoint cannot be found or loaded; the job should fail fast with this cause."""


def is_remote(model: str) -> bool:
    return "://" in model and not is_local(model)


def check_checkpoint(model: str, options: Mapping[str, Any] | None = None) -> None:
    """Fail in seconds, before any replica starts, when a local or remote checkpoint has no config.json."""
    if is_remote(model):
        fs, path = get_filesystem(model, options)
        if not fs.exists(f"{path.rstrip('/')}/config.json"):
            raise ModelLoadError(f"model {model!r}: no config.json under that prefix")
        return
    resolve_checkpoint(model)


def cache_checkpoint(url: str, *, cache_dir: str | Path | None = None, options: Mapping[str, Any] | None = None) -> Path:
    """Copy a remote checkpoint prefix into the node-local cache once (atomically); later callers reuse it."""
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    dest = cache / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    if (dest / "config.json").exists():
        return dest
    fs, path = get_filesystem(url, options)
    if not fs.exists(f"{path.rstrip('/')}/config.json"):
        raise ModelLoadError(f"model {url!r}: no config.json under that prefix")
    _publish(dest, lambda tmp: fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True))
    return dest


def _publish(dest: Path, build: Callable[[Path], object]) -> None:
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


def resolve_checkpoint(model: str, *, cache_dir: str | Path | None = None, options: Mapping[str, Any] | None = None) -> str:
    """A path or hub id that from_pretrained can open: local folders as they are, remote prefixes via the cache."""
    if "://" in model and not is_local(model):
        return str(cache_checkpoint(model, cache_dir=cache_dir, options=options))
    local = Path(model.removeprefix("file://")).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelLoadError(f"model {model!r}: folder has no config.json")
        return str(local)
    if model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {model!r}: no such folder")
    return model  # a hub id




def native_checkpoint(path: str, *, cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> str:
    """A native checkpoint for a local folder: itself, or for an original-format (remote-code) checkpoint its
    conversion, made once into the cache (atomically) without running any code from the checkpoint, except its
    tokenizer's when the job sets trust_remote_code (with a pinned revision)."""
    import json

    config = Path(path) / "config.json"
    if not config.exists():
        return path  # a hub id: loaded by transformers as it is
    from pipeline.convert import convert_checkpoint, is_original_format

    if not is_original_format(json.loads(config.read_text())):
        return path
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE
    stamp = f"{Path(path).resolve()}:{config.stat().st_mtime_ns}"
    dest = cache / f"converted-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"
    if (dest / "config.json").exists():
        return str(dest)
    _publish(dest, lambda tmp: convert_checkpoint(path, str(tmp), trust_remote_code=trust_remote_code))
    return str(dest)
