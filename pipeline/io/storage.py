"""fsspec URLs: filesystems with the job's storage options, reading, writing, object versions (listing inputs:
`io/listing.py`). Knows nothing of models.

Credentials are never passed here: s3fs/botocore find them through the standard AWS chain (environment,
profiles, instance roles), and AWS_ENDPOINT_URL is honoured by botocore itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import url_to_fs

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = frozenset({".parquet", ".jsonl", ".csv"})


# Object stores throttle (503 SlowDown) and fail transiently; botocore retries those with backoff and jitter.
# Ten attempts in "standard" mode ride out long bursts; a job's storage.config_kwargs.retries replaces this.
S3_RETRIES = {"max_attempts": 10, "mode": "standard"}


def with_defaults(url: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job's storage options plus our defaults for the URL's protocol (retries for S3)."""
    merged = dict(options or {})
    if protocol_of(url) in ("s3", "s3a"):
        config = dict(merged.get("config_kwargs") or {})
        config.setdefault("retries", S3_RETRIES)
        merged["config_kwargs"] = config
    return merged


def get_filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for a URL (local paths included) and the path within it."""
    return url_to_fs(url, **with_defaults(url, options))


def protocol_of(url: str) -> str:
    """'s3', 'gs', 'file', ... for a URL or local path."""
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def is_remote(url: str) -> bool:
    """An fsspec URL of a non-local filesystem (s3://, gs://, memory://, ...)."""
    return "://" in url and not is_local(url)


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL of a path returned by a filesystem's listing (which drops the protocol)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def extension(url: str) -> str:
    """Lower-case extension of a URL's last path element, query strings aside."""
    return os.path.splitext(url.split("?", 1)[0])[1].lower()


def read_bytes(url: str, options: Mapping[str, Any] | None = None) -> bytes:
    """The whole content of one object."""
    fs, path = get_filesystem(url, options)
    with fs.open(path, "rb") as f:
        return f.read()


def object_version(info: Mapping[str, Any]) -> str:
    """An object's version from its listing entry: the ETag where the store has one, else size and mtime."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"{info.get('size')}-{mtime}"


def list_versions(url: str, options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """{full URL: version} of every file under a prefix (or matching a glob)."""
    fs, path = get_filesystem(url, options)
    if any(ch in path for ch in "*?["):
        entries = {p: fs.info(p) for p in fs.glob(path)}
    else:
        entries = fs.find(path, detail=True)
    return {full_url(fs, p): object_version(info) for p, info in entries.items() if info.get("type") != "directory"}


def prefix_version(url: str, options: Mapping[str, Any] | None = None) -> str:
    """One version for everything under a prefix: a digest of each object's path (relative to the prefix) and
    version. It changes when any object is re-uploaded, added or removed (a re-uploaded checkpoint)."""
    fs, path = get_filesystem(url, options)
    fs.invalidate_cache(path)  # a listing cached in this process would hide a re-upload by someone else
    root = full_url(fs, path.rstrip("/"))
    versions = {u.removeprefix(root): v for u, v in list_versions(url, options).items()}
    return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]
