"""One small object that only conditional writes change: the lease's storage (`lease.py` says what it holds).

Every operation is judged by the store itself, never by comparing two hosts' clocks:
- `create` succeeds only where the object is absent (S3 `If-None-Match: *`, `O_EXCL` on disks);
- `replace` and `delete` succeed only on the version read before (S3 `If-Match` on the ETag; on disks under an
  exclusive `flock`, the file's inode and content compared, then an atomic rename);
- `read` returns the object with the store's time of its last write and the store's time now (S3: `Last-Modified`
  and the response's `Date`; disks: the file's mtime and the mtime of a probe file made for the purpose), so the
  age of a lease is a difference of two times from one clock.

Other fsspec stores get the same interface without atomic replace (`atomic` is False): a run says so when it
takes its lease.
"""

from __future__ import annotations

import email.utils
import fcntl
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.io.storage import get_filesystem, is_local, protocol_of


@dataclass(frozen=True)
class Snapshot:
    """The lock object as read: its content, its version (for a conditional write), and its age on the store's clock."""

    content: dict[str, Any]
    version: str
    modified: float  # store clock, seconds
    now: float  # store clock, seconds, at the read

    @property
    def age_s(self) -> float:
        return max(0.0, self.now - self.modified)


def _encode(content: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(content), sort_keys=True).encode()


def _decode(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": True}
    return value if isinstance(value, dict) else {"unreadable": True}


def _precondition_failed(err: BaseException) -> bool:
    text = str(err).lower().replace("-", "")
    return "precondition" in text or "412" in text


class LocalLockStore:
    """The lock as a file on a local (or network) disk."""

    atomic = True

    def __init__(self, path: str) -> None:
        self.path = path

    def _now(self) -> float:
        """The disk's clock: the mtime of a file created for the purpose (a network disk's server sets it)."""
        probe = f"{self.path}.{uuid.uuid4().hex[:8]}.clock"
        with open(probe, "w"):
            pass
        try:
            return os.stat(probe).st_mtime
        finally:
            os.unlink(probe)

    def create(self, content: Mapping[str, Any]) -> str | None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        data = _encode(content)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return hashlib.sha256(data).hexdigest()

    def read(self) -> Snapshot | None:
        try:
            with open(self.path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_SH)
                data, modified = f.read(), os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Snapshot(_decode(data), hashlib.sha256(data).hexdigest(), modified, self._now())

    def _locked_current(self, f: Any, version: str) -> bool:
        """Under the exclusive lock: the file is still the one at `path` and holds the version read before."""
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.stat(self.path).st_ino != os.fstat(f.fileno()).st_ino:
                return False
        except FileNotFoundError:
            return False
        return hashlib.sha256(f.read()).hexdigest() == version

    def replace(self, content: Mapping[str, Any], version: str) -> str | None:
        data = _encode(content)
        try:
            with open(self.path, "rb") as f:
                if not self._locked_current(f, version):
                    return None
                tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
                with open(tmp, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)  # atomic: readers see the old content or the new
        except FileNotFoundError:
            return None
        return hashlib.sha256(data).hexdigest()

    def delete(self, version: str) -> bool:
        try:
            with open(self.path, "rb") as f:
                if not self._locked_current(f, version):
                    return False
                os.unlink(self.path)
        except FileNotFoundError:
            return False
        return True


class S3LockStore:
    """The lock as an S3 object, written only with preconditions (S3 conditional writes, SeaweedFS, MinIO, R2)."""

    atomic = True

    def __init__(self, url: str, options: Mapping[str, Any] | None) -> None:
        self.fs, path = get_filesystem(url, options)
        self.bucket, _, self.key = path.partition("/")

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        from fsspec.asyn import sync

        async def call() -> dict[str, Any]:
            response = await self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
            if "Body" in response:
                response["Data"] = await response["Body"].read()
            return response

        return sync(self.fs.loop, call)

    @staticmethod
    def _store_time(response: Mapping[str, Any]) -> float:
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        return email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()

    def _put(self, content: Mapping[str, Any], **condition: str) -> str | None:
        try:
            response = self._call("put_object", Body=_encode(content), **condition)
        except OSError as err:
            if _precondition_failed(err):
                return None
            raise
        return str(response["ETag"])

    def create(self, content: Mapping[str, Any]) -> str | None:
        return self._put(content, IfNoneMatch="*")

    def read(self) -> Snapshot | None:
        try:
            response = self._call("get_object")
        except FileNotFoundError:
            return None
        return Snapshot(_decode(response["Data"]), str(response["ETag"]), response["LastModified"].timestamp(),
                        self._store_time(response))

    def replace(self, content: Mapping[str, Any], version: str) -> str | None:
        return self._put(content, IfMatch=version)

    def delete(self, version: str) -> bool:
        try:
            self._call("delete_object", IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as err:
            if _precondition_failed(err):
                return False
            raise
        return True


class PlainLockStore:
    """Any other fsspec store: create-if-absent where the store supports it, then plain writes (not atomic)."""

    atomic = False

    def __init__(self, url: str, options: Mapping[str, Any] | None) -> None:
        self.fs, self.path = get_filesystem(url, options)

    def _modified(self, path: str) -> float:
        info = self.fs.info(path)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
        if hasattr(stamp, "timestamp"):
            return stamp.timestamp()
        return float(stamp) if stamp is not None else time.time()

    def create(self, content: Mapping[str, Any]) -> str | None:
        if self.fs.exists(self.path):
            return None
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(_encode(content))
        except FileExistsError:
            return None
        except (NotImplementedError, ValueError):  # no exclusive create on this store: best effort
            self.fs.pipe_file(self.path, _encode(content))
        return hashlib.sha256(_encode(content)).hexdigest()

    def read(self) -> Snapshot | None:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
            modified = self._modified(self.path)
        except FileNotFoundError:
            return None
        probe = f"{self.path}.{uuid.uuid4().hex[:8]}.clock"  # the store's clock: a file written for the purpose
        self.fs.pipe_file(probe, b"")
        try:
            now = self._modified(probe)
        finally:
            self.fs.rm(probe)
        return Snapshot(_decode(data), hashlib.sha256(data).hexdigest(), modified, now)

    def replace(self, content: Mapping[str, Any], version: str) -> str | None:
        current = self.read()
        if current is None or current.version != version:
            return None
        self.fs.pipe_file(self.path, _encode(content))
        return hashlib.sha256(_encode(content)).hexdigest()

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current.version != version:
            return False
        self.fs.rm(self.path)
        return True


def lock_store(url: str, options: Mapping[str, Any] | None = None) -> LocalLockStore | S3LockStore | PlainLockStore:
    """The store for the lock object at `url`: S3 and local disks are atomic, anything else best effort."""
    if is_local(url):
        return LocalLockStore(get_filesystem(url, options)[1])
    if protocol_of(url) in ("s3", "s3a"):
        return S3LockStore(url, options)
    return PlainLockStore(url, options)
