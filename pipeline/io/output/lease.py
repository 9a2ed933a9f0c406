"""The output's lease: one run at a time writes into an output, and a run that has lost its lease writes nothing more.

`_LOCK` holds who took it (host, pid, a token), its length (`ttl_s`) and how often it was renewed. It changes only
by conditional writes on its version (`lockstore.py`): created if absent; renewed every third of its length by
the holder; taken over by another run only once the store's own clock says it was not renewed for a whole
length (its run died or stalled); released by its holder only while it still holds it. Of several runs racing for
an expired lease exactly one wins (the conditional write on the version they all read).

The fence: before each shard, marker or state file it writes, a run (in any worker) reads the lease and goes on only
if it still holds it and the lease was renewed within two thirds of its length. A run that stalled past that (a
paused VM, a long GC, a stuck mount) therefore stops writing at least a third of a length before anyone may take
over: a write that passed the check has that long to land.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from pipeline.errors import LeaseLostError, LockedError
from pipeline.io.output.lockstore import Snapshot, lock_store

DEFAULT_TTL_S = 300.0
WRITE_WINDOW = 2 / 3  # a write goes ahead only while the lease was renewed within this share of its length

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseRef:
    """What a worker needs to check the lease before a write: where it is, whose it is, how long it lasts."""

    url: str
    token: str
    ttl_s: float
    storage: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Held:
    """A lease this process holds: the reference, and the version its next renewal is conditional on."""

    ref: LeaseRef
    version: str
    content: dict[str, Any]
    took_over: str | None = None  # whose expired lease this run took over, for the run's log


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def machine() -> str:
    """This process's machine and process namespace: two holders with the same value see the same pids."""
    parts = [socket.gethostname()]
    for path, read in (("/proc/sys/kernel/random/boot_id", lambda p: open(p).read().strip()),
                       ("/proc/self/ns/pid", os.readlink)):
        try:
            parts.append(read(path))
        except OSError:
            parts.append("?")
    return "|".join(parts)


def new_content(ttl_s: float, kind: str, token: str | None = None) -> dict[str, Any]:
    """The lock's content for this process (times are the holder's, for people to read; expiry never uses them)."""
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "machine": machine(), "token": token or uuid.uuid4().hex,
            "run": kind, "since": _stamp(now), "since_s": now, "ttl_s": ttl_s, "renewals": 0}


def holder_gone(content: Mapping[str, Any]) -> bool:
    """The holder ran on this machine, in this process namespace, and its process no longer exists (a crashed run
    re-run by hand): its lease can be taken over without waiting for it to expire."""
    pid = content.get("pid")
    if content.get("machine") != machine() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def describe(where: str, snap: Snapshot) -> str:
    """Who holds the lease, since when, when it was last renewed and when it may be taken over."""
    other = snap.content
    who = f"host {other.get('host')}, pid {other.get('pid')}, since {other.get('since')}"
    ttl = other.get("ttl_s")
    if not isinstance(ttl, (int, float)):
        return (f"another run holds {where} ({who}; no lease: written by an older version); this run exits. If that "
                "run died, delete the lock file and run again.")
    if isinstance(other.get("since_s"), (int, float)):
        who += f", {time.time() - other['since_s']:.0f} s ago"
    return (f"another run holds {where} ({who}; renewed {other.get('renewals', 0)} time(s), last {snap.age_s:.0f} s "
            f"ago; its lease expires in {ttl - snap.age_s:.0f} s unless that run renews it); this run exits. A run "
            "that died is taken over once its lease expires.")


def acquire(url: str, ttl_s: float, storage: Mapping[str, Any] | None = None, *, kind: str = "run") -> Held:
    """Take the lease at `url`, or take over one that was not renewed for its whole length; LockedError naming the
    holder otherwise."""
    store = lock_store(url, storage)
    mine = new_content(ttl_s, kind)
    ref = LeaseRef(url, mine["token"], ttl_s, storage)
    if not store.atomic:
        log.warning("%s: this store has no conditional writes; the lease is best effort", url)
    for _ in range(3):
        version = store.create(mine)
        if version is not None:
            return Held(ref, version, mine)
        snap = store.read()
        if snap is None:  # released between our two calls
            continue
        ttl = snap.content.get("ttl_s")
        gone = isinstance(ttl, (int, float)) and holder_gone(snap.content)
        if not gone and (not isinstance(ttl, (int, float)) or snap.age_s <= ttl):
            raise LockedError(describe(url, snap))
        version = store.replace(mine, snap.version)
        if version is None:
            raise LockedError(f"another run is taking over the expired lease {url} (left by host "
                              f"{snap.content.get('host')}, pid {snap.content.get('pid')}); this run exits.")
        took = (f"host {snap.content.get('host')}, pid {snap.content.get('pid')}: "
                + ("its process is gone" if gone else f"not renewed for {snap.age_s:.0f} s (lease {ttl:.0f} s)"))
        log.warning("took over the lease %s from %s", url, took)
        return Held(ref, version, mine, took_over=took)
    raise LockedError(f"{url}: the lease changed hands several times while this run tried to take it; try again")


def lost_reason(snap: Snapshot | None, ref: LeaseRef) -> str | None:
    """Why a run no longer holds its lease (None: it does, and may write)."""
    if snap is None:
        return f"its lease {ref.url} was removed"
    if snap.content.get("token") != ref.token:
        return (f"its lease {ref.url} was taken over by host {snap.content.get('host')}, pid "
                f"{snap.content.get('pid')}")
    if snap.age_s > WRITE_WINDOW * ref.ttl_s:
        return (f"its lease {ref.url} was last renewed {snap.age_s:.0f} s ago (lease {ref.ttl_s:.0f} s): the run "
                "stalled, and another run may take it over")
    return None


def check(ref: LeaseRef) -> None:
    """The fence: raise LeaseLostError unless this run still holds its lease and it is fresh enough to write."""
    reason = lost_reason(lock_store(ref.url, ref.storage).read(), ref)
    if reason:
        raise LeaseLostError(f"this run stopped writing: {reason}")


def renew(held: Held) -> Held | None:
    """Renew the lease (a conditional write on its version); None if it was lost."""
    content = {**held.content, "renewals": int(held.content.get("renewals", 0)) + 1}
    version = lock_store(held.ref.url, held.ref.storage).replace(content, held.version)
    return None if version is None else replace(held, version=version, content=content)


def release(held: Held) -> bool:
    """Remove the lease if this run still holds it (a conditional delete)."""
    return lock_store(held.ref.url, held.ref.storage).delete(held.version)


class Heartbeat:
    """Renews the lease every third of its length while the run lives; records it if the lease was lost."""

    def __init__(self, held: Held, on_lost: Callable[[str], None] | None = None) -> None:
        self.held = held
        self.on_lost = on_lost
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.held.ref.ttl_s / 3):
            try:
                renewed = renew(self.held)
            except Exception as err:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                log.warning("could not renew the lease %s: %s", self.held.ref.url, err)
                continue
            if renewed is None:
                self.lost = lost_reason(lock_store(self.held.ref.url, self.held.ref.storage).read(), self.held.ref) \
                    or f"its lease {self.held.ref.url} changed while this run held it"
                log.error("this run lost its lease: %s", self.lost)
                if self.on_lost is not None:
                    self.on_lost(self.lost)
                return
            self.held = renewed

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def renewed(held: Held, on_lost: Callable[[str], None] | None = None) -> Iterator[Heartbeat]:
    """Keep `held` renewed while the block runs; then release it, if this run still holds it. `on_lost` is called
    (from the heartbeat's thread) if the lease is lost meanwhile."""
    beat = Heartbeat(held, on_lost)
    try:
        yield beat
    finally:
        beat.stop()
        if beat.lost is None:
            release(beat.held)
