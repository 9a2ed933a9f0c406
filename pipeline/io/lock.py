"""The output's run lock: a lease that a live run renews and a later run takes over once it has expired.

`_LOCK` holds who took it (host, pid, a token), since when, and until when it is valid. It is created only if
absent (an S3 conditional PUT with If-None-Match, O_EXCL on disks), so two runs can never both create it. While
the run lives a heartbeat thread moves `expires` forward every third of the lease. A run that finds a lock refuses
with the holder, its age and its expiry; a lock past its expiry (its run died) is taken over: the first run to
create `_LOCK.takeover/<lock's token>` (the same create-if-absent write) wins and writes its own lock, so of
several runs racing for one expired lock exactly one goes on. Takeover markers are never deleted (one small file
per crashed run), so a run that read an old lock long ago cannot take over a newer one with it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pipeline.errors import LockedError
from pipeline.io.markers import read_marker, remove_marker, write_marker
from pipeline.io.storage import get_filesystem

LOCK_FILE = "_LOCK"
TAKEOVER_DIR = "_LOCK.takeover"
DEFAULT_TTL_S = 300.0

log = logging.getLogger(__name__)


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def lease(ttl_s: float, *, now: float | None = None, token: str | None = None, since: float | None = None) -> dict:
    """The lock's content for this process: holder, token, when taken and until when it is valid."""
    now = time.time() if now is None else now
    since = now if since is None else since
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": token or uuid.uuid4().hex,
            "since": _stamp(since), "since_s": since, "expires_s": now + ttl_s, "expires": _stamp(now + ttl_s),
            "ttl_s": ttl_s}


def _create(fs: Any, target: str, data: Mapping[str, Any]) -> bool:
    """Create target holding data only if it does not exist; False if it does."""
    try:
        with fs.open(target, "xb") as f:  # If-None-Match: * on S3, O_EXCL locally
            f.write(json.dumps(data).encode())
        return True
    except OSError as err:  # FileExistsError locally; S3 answers 412 PreconditionFailed ("pre-conditions ... did not hold")
        if not isinstance(err, FileExistsError) and "precondition" not in str(err).lower().replace("-", ""):
            raise
        return False


def describe(output: str, other: Mapping[str, Any], now: float) -> str:
    """Who holds the lock, for how long already and until when (a lock written before leases: no expiry)."""
    where = f"{output.rstrip('/')}/{LOCK_FILE}"
    who = f"host {other.get('host')}, pid {other.get('pid')}, since {other.get('since')}"
    expires = other.get("expires_s")
    if isinstance(other.get("since_s"), (int, float)):
        who += f", {now - other['since_s']:.0f} s ago"
    if not isinstance(expires, (int, float)):
        return (f"another run holds {where} ({who}; no expiry: written by an older version); this run exits. If that "
                "run died, delete the lock file and run again.")
    return (f"another run holds {where} ({who}; its lease expires {other.get('expires')}, in {expires - now:.0f} s, "
            "unless that run renews it); this run exits. A run that died is taken over once its lease expires.")


def acquire(output: str, ttl_s: float, options: Mapping[str, Any] | None = None) -> dict:
    """Take the output's lock, or take over one whose lease has expired; LockedError naming the holder if neither."""
    fs, path = get_filesystem(output, options)
    fs.makedirs(path, exist_ok=True)
    target = f"{path.rstrip('/')}/{LOCK_FILE}"
    mine = lease(ttl_s)
    if _create(fs, target, mine):
        return mine
    other = read_marker(output, LOCK_FILE, options) or {}
    now = time.time()
    expires = other.get("expires_s")
    if not isinstance(expires, (int, float)) or expires > now:
        raise LockedError(describe(output, other, now))
    claim = f"{path.rstrip('/')}/{TAKEOVER_DIR}/{other.get('token') or other.get('since')}"
    fs.makedirs(claim.rsplit("/", 1)[0], exist_ok=True)
    if not _create(fs, claim, mine):
        raise LockedError(f"another run is taking over the expired lock {output.rstrip('/')}/{LOCK_FILE} "
                          f"(left by host {other.get('host')}, pid {other.get('pid')}); this run exits.")
    log.warning("taking over %s/%s: its lease (host %s, pid %s) expired %.0f s ago", output.rstrip("/"), LOCK_FILE,
                other.get("host"), other.get("pid"), now - expires)
    write_marker(output, LOCK_FILE, mine, options)
    return mine


class Heartbeat:
    """Renews the lease every third of its length while the run lives; notices if another run took it over."""

    def __init__(self, output: str, held: dict, options: Mapping[str, Any] | None = None) -> None:
        self.output, self.held, self.options = output, held, options
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ttl = float(self.held["ttl_s"])
        while not self._stop.wait(ttl / 3):
            try:
                current = read_marker(self.output, LOCK_FILE, self.options) or {}
                if current.get("token") != self.held["token"]:
                    self.lost = f"host {current.get('host')}, pid {current.get('pid')}"
                    log.error("the lock of %s was taken over by %s while this run held it", self.output, self.lost)
                    return
                renewed = lease(ttl, token=self.held["token"], since=self.held["since_s"])
                write_marker(self.output, LOCK_FILE, renewed, self.options)
                self.held = renewed
            except Exception as err:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                log.warning("could not renew the lock of %s: %s", self.output, err)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def run_lock(output: str, options: Mapping[str, Any] | None = None, *, ttl_s: float = DEFAULT_TTL_S) -> Iterator[dict]:
    """Hold the output's lock (a renewed lease) for the duration of a run; a second run finds it and is refused,
    a later run takes it over once the lease has expired."""
    held = acquire(output, ttl_s, options)
    beat = Heartbeat(output, held, options)
    try:
        yield held
    finally:
        beat.stop()
        current = read_marker(output, LOCK_FILE, options) or {}
        if current.get("token") == beat.held["token"]:
            remove_marker(output, LOCK_FILE, options)
    if beat.lost:
        raise LockedError(f"this run's lock on {output.rstrip('/')}/{LOCK_FILE} was taken over by {beat.lost} "
                          "(its lease expired while the run was stalled); check the output before trusting it")
