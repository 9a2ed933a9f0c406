"""Module-level functions that tests run inside a Sandbox child (the child imports them by name)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.errors import MediaError


def _count_try(counter: str) -> int:
    """Append one line to `counter` and return how many tries it now records."""
    with open(counter, "a") as f:
        f.write("try\n")
    return len(Path(counter).read_text().splitlines())


def pattern(shape: tuple[int, ...]) -> np.ndarray:
    """A deterministic uint8 array of the given shape."""
    return (np.arange(int(np.prod(shape)), dtype=np.uint64) * 7 % 251).astype(np.uint8).reshape(shape)


def getpid() -> int:
    return os.getpid()


def raise_media_error(error_type: str, message: str) -> None:
    raise MediaError(error_type, message)


def raise_value_error(message: str) -> None:
    raise ValueError(message)


class TwoArgError(Exception):
    """Pickles but does not unpickle (args holds one value, __init__ needs two)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} {b}")


def raise_unpicklable(a: str, b: str) -> None:
    raise TwoArgError(a, b)


def sleep_then_return(counter: str, seconds: float) -> str:
    _count_try(counter)
    time.sleep(seconds)
    return "woke"


def segfault(counter: str) -> None:
    _count_try(counter)
    os.kill(os.getpid(), signal.SIGSEGV)


def exit_with(code: int) -> None:
    os._exit(code)


def crash_first_try(counter: str, value: object) -> object:
    if _count_try(counter) == 1:
        os.kill(os.getpid(), signal.SIGSEGV)
    return value


class RunsCode:
    """A pickle that creates `path` when it is loaded: what an exploited decoder could send the caller."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _caller_socket() -> socket.socket:
    """The child's socket to the caller, found as code running in the child could: in the frames that called it."""
    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("sock"), socket.socket):
            return frame.f_locals["sock"]
        frame = frame.f_back
    raise RuntimeError("no socket to the caller in the stack")


def send_crafted_reply(kind: str, marker: str) -> None:
    """Write a crafted reply straight to the caller's socket (as an exploited decoder would), then hang."""
    header = None
    buffers: list[bytes] = []
    if kind == "pickle":  # the reply format before: a pickle, loaded by the caller
        header = pickle.dumps(("ok", RunsCode(marker)), protocol=5)
    elif kind == "exec":  # a well-formed error reply naming a builtin that is not an exception
        header = json.dumps({"reply": "error", "type": "exec", "args": [f"open({marker!r}, 'w')"], "traceback": ""})
    elif kind == "system_exit":  # a BaseException the caller must not raise
        header = json.dumps({"reply": "error", "type": "SystemExit", "args": [0], "traceback": ""})
    elif kind == "object_array":  # an array of Python objects (numpy would unpickle them)
        header = json.dumps({"reply": "ok", "value": {"$array": [1, "|O", [1]]}, "traceback": ""})
        buffers = [pickle.dumps(RunsCode(marker))[:8]]
    elif kind == "short_array":  # a shape larger than its buffer
        header = json.dumps({"reply": "ok", "value": {"$array": [1, "|u1", [1000, 1000]]}})
        buffers = [b"x" * 10]
    if kind == "huge":  # a size that would take all memory before anything is checked
        sock = _caller_socket()
        sock.sendall(struct.pack("<I", 1) + struct.pack("<Q", 1 << 40))
    else:
        parts = [header.encode() if isinstance(header, str) else header, *buffers]
        _caller_socket().sendall(struct.pack("<I", len(parts)) + struct.pack(f"<{len(parts)}Q", *map(len, parts))
                                 + b"".join(parts))
    time.sleep(60)  # the caller kills this child (or closes the sandbox)
