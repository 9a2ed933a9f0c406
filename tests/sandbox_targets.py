"""Module-level functions that tests run inside a Sandbox child (the child imports them by name)."""

from __future__ import annotations

import os
import signal
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
