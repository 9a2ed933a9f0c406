"""Where a checkpoint lives: local folders, remote (s3://, any fsspec) prefixes copied once per node, hub ids
(a snapshot in the Hugging Face cache); original-format checkpoints converted once into the cache.

No torch at import, so the driver can check a job's model before any replica starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ModelLoadError
from pipeline.io.storage import get_filesystem, is_remote, prefix_version
from pipeline.model.cache import converted_entry, digest_cache, publish, remote_entry, save_digest_cache

# What a hub snapshot fetches: configs, weights, tokenizer and chat-template files (code only where the job trusts
# the checkpoint's tokenizer code); never other weight formats or repository extras.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def check_checkpoint(model: str, options: Mapping[str, Any] | None = None) -> None:
    """Fail in seconds, before any replica starts, when a local or remote checkpoint has no config.json."""
    if is_remote(model):
        fs, path = get_filesystem(model, options)
        if not fs.exists(f"{path.rstrip('/')}/config.json"):
            raise ModelLoadError(f"model {model!r}: no config.json under that prefix")
        return
    resolve_checkpoint(model)


def cache_checkpoint(url: str, *, cache_dir: str | Path | None = None, options: Mapping[str, Any] | None = None) -> Path:
    """Copy a remote checkpoint prefix into the node-local cache once (atomically); later callers reuse it while
    the remote objects are unchanged (same ETags, else sizes and mtimes: one listing per call), and a re-uploaded
    checkpoint is copied again into a new entry."""
    fs, path = get_filesystem(url, options)
    if not fs.exists(f"{path.rstrip('/')}/config.json"):
        raise ModelLoadError(f"model {url!r}: no config.json under that prefix")
    dest = remote_entry(url, cache_dir, prefix_version(url, options))
    if (dest / "config.json").exists():
        return dest
    publish(dest, lambda tmp: fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True))
    return dest


def resolve_checkpoint(model: str, *, cache_dir: str | Path | None = None, options: Mapping[str, Any] | None = None) -> str:
    """A path or hub id that from_pretrained can open: local folders as they are, remote prefixes via the cache."""
    if is_remote(model):
        return str(cache_checkpoint(model, cache_dir=cache_dir, options=options))
    local = Path(model.removeprefix("file://")).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelLoadError(f"model {model!r}: folder has no config.json")
        return str(local)
    if model.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {model!r}: no such folder")
    return model  # a hub id


def is_hub_id(model: str) -> bool:
    """Not a remote prefix, not an existing or path-like local folder: a Hugging Face hub id (org/name)."""
    return (not is_remote(model) and not model.startswith((".", "/", "~", "file://"))
            and not Path(model).expanduser().exists())


def hub_snapshot(model: str, revision: str | None = None, *, trust_remote_code: bool = False) -> str:
    """The local folder of a hub checkpoint: its snapshot in the Hugging Face cache (HF_HUB_CACHE; downloaded once,
    or found there offline with HF_HUB_OFFLINE=1), so that an original-format one can be converted like a folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # one bar per file from every replica would flood the job log
    try:
        return snapshot_download(model, revision=revision, allow_patterns=HUB_FILES + (["*.py"] * trust_remote_code))
    except Exception as err:  # noqa: BLE001 - not found, gated, offline without a cached copy: name the cause
        raise ModelLoadError(f"model {model!r}: no such local folder, and the hub snapshot could not be had: "
                             f"{type(err).__name__}: {err}") from err


def native_checkpoint(path: str, *, cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> str:
    """A native checkpoint for a local folder: itself, or for an original-format (remote-code) checkpoint its
    conversion, made once into the cache (atomically) without running any code from the checkpoint, except its
    tokenizer's when the job sets trust_remote_code (with a pinned revision)."""
    config = Path(path) / "config.json"
    if not config.exists():
        raise ModelLoadError(f"model folder {path!r} has no config.json")
    from pipeline.model.convert import convert_checkpoint
    from pipeline.model.convert_config import is_original_format

    if not is_original_format(json.loads(config.read_text())):
        return path
    dest = converted_entry(f"{Path(path).resolve()}:{config.stat().st_mtime_ns}", cache_dir)
    if not (dest / "config.json").exists():
        publish(dest, lambda tmp: convert_checkpoint(path, str(tmp), trust_remote_code=trust_remote_code))
    return str(dest)


def prepare_checkpoint(model: str, *, cache_dir: str | Path | None = None, options: Mapping[str, Any] | None = None,
                       trust_remote_code: bool = False, revision: str | None = None) -> str:
    """What a replica loads: the job's `model` made local (remote prefixes copied into the node cache, hub ids
    fetched as a snapshot at `revision`) and native (original-format checkpoints converted). The one resolver both
    the engine and tensor-parallel replicas use."""
    if is_hub_id(model):
        local = hub_snapshot(model, revision, trust_remote_code=trust_remote_code)
    else:
        local = resolve_checkpoint(model, cache_dir=cache_dir, options=options)
    return native_checkpoint(local, cache_dir=cache_dir, trust_remote_code=trust_remote_code)


def checkpoint_id(model: str, revision: str | None = None, options: Mapping[str, Any] | None = None) -> str:
    """What identifies the weights a run loads, so that an output records them and a resumed run notices new
    ones: a remote prefix's listing (every file's ETag, else size and mtime), a local folder's content (sha256 of
    each file a replica reads, cached per file by path, size and mtime), a hub checkpoint's commit."""
    if is_remote(model):
        return f"objects:{prefix_version(model, options)}"
    local = Path(model.removeprefix("file://")).expanduser()
    if local.exists():
        return f"sha256:{folder_digest(local)}"
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return f"hub:{revision}"
    return "hub:" + (hub_commit(model, revision) or f"{model}@{revision or 'main'}")


def hub_commit(model: str, revision: str | None) -> str | None:
    """The commit a hub id's revision points to in the local Hugging Face cache (None: not fetched here yet)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def folder_digest(folder: Path) -> str:
    """sha256 over the files of a checkpoint folder a replica reads (configs, weights, tokenizer), by relative path."""
    files = sorted(p for pattern in HUB_FILES for p in folder.rglob(pattern) if p.is_file())
    return hashlib.sha256(json.dumps([[str(p.relative_to(folder)), file_digest(p)] for p in files]).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's content, remembered per (path, size, mtime) in the node cache: a checkpoint of tens of GB
    is read once, not by every run."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    store = digest_cache()
    known = store.get(key)
    if known:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    store[key] = digest.hexdigest()
    save_digest_cache(store)
    return store[key]
