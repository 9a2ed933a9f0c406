"""Run a decoder in a persistent child process, so a segfault or a hang costs one error row, never the worker.

`Sandbox(fn, timeout_s=..., attempts=...)` starts one child process on its first call and reuses it for every
later call. `fn` must be a function defined at the top level of an importable module (not `__main__`). Its
arguments go to the child as pickles (protocol 5; the caller is trusted). What comes back never is: a decoder
exploited by a hostile file may control the child, so a reply is a JSON header plus raw array buffers
(`media/replies.py`) that the caller checks and copies, and a reply outside that format is refused
(`MediaError("decode_error", ...)`, the child killed). `fn` may return None, bools, numbers, strings, bytes,
numeric numpy arrays (out of band: they land in fresh, writable memory) and lists, tuples and str-keyed dicts of
those.

- A call that does not finish within `timeout_s` kills the child and raises `MediaError("timeout", ...)`;
  the next call starts a fresh child. A timed-out call is not retried.
- A child that dies during a call (segfault, abort, `os._exit`, OOM kill) is restarted and the call retried,
  `attempts` tries in all; then `MediaError("crashed", ...)` names the signal or exit code.
- An exception raised by `fn` is re-raised in the caller (the child's traceback as its `__cause__`): a
  `MediaError` keeps its `error_type` and message, a builtin exception (ValueError, OSError...) its type and args;
  any other becomes `MediaError("decode_error", "Type: message")`.

How the child starts: `sys.executable -c "...import pipeline.media.sandbox..."` through `subprocess` (fork + exec in
C, safe in a process with threads such as a Ray worker), given the caller's `sys.path`. Not multiprocessing:
its "spawn" and "forkserver" children both re-run the caller's `__main__` script (in a Ray worker that is Ray's
default_worker.py, i.e. all of `ray`, about a second and a few hundred modules per child), and on Python < 3.13
the forkserver never preloads `__main__` (CPython gh-126631), so it saves nothing.

The child dies with the caller: PR_SET_PDEATHSIG (SIGKILL) on Linux, and it exits when its socket to the
caller reaches end of file. The caller reaps every child it kills.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from pipeline.errors import MediaError
from pipeline.media.replies import MAX_PARTS, BadReply, check_frame, decode_reply, encode_reply, remote_exception

_STARTUP_TIMEOUT_S = 120.0  # a child not ready by then is broken (an import that hangs), not slow
_STOP_GRACE_S = 1.0  # close(): time the child gets to exit on end of file before it is killed
_DEATH_GRACE_S = 5.0  # a child whose socket hit end of file is dying: time allowed to learn its exit status
_PR_SET_PDEATHSIG = 1
_COUNT = struct.Struct("<I")

Parts = list[memoryview | bytes]


class _RemoteTraceback(Exception):
    """The child's traceback, attached as `__cause__` of an exception re-raised in the caller."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


# --- framing: a part count, the part sizes, then the parts (a pickle or a reply's JSON header, then buffers) ---


def _dumps(obj: Any) -> Parts:
    """Pickle `obj` (protocol 5) into parts: the pickle, then its out-of-band buffers, not copied."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [head, *(b.raw() for b in buffers)]


def _send(sock: socket.socket, parts: Parts) -> None:
    sizes = [memoryview(p).nbytes for p in parts]
    sock.sendall(_COUNT.pack(len(parts)) + struct.pack(f"<{len(parts)}Q", *sizes))
    for part in parts:
        sock.sendall(part)


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view, pos = memoryview(buf), 0
    while pos < size:
        n = sock.recv_into(view[pos:])
        if n == 0:
            raise EOFError("the other end closed the connection")
        pos += n
    return buf


def _recv_parts(sock: socket.socket, *, checked: bool = False) -> list[bytearray]:
    """Read one message's parts; `checked`: its announced count and sizes are within the limits of a reply before
    any memory is taken for them."""
    (count,) = _COUNT.unpack(_recv_exact(sock, _COUNT.size))
    if checked and count > MAX_PARTS:
        raise BadReply(f"{count} parts announced (at most {MAX_PARTS})")
    sizes = struct.unpack(f"<{count}Q", _recv_exact(sock, 8 * count))
    if checked:
        check_frame(sizes)
    return [_recv_exact(sock, size) for size in sizes]


def _recv_request(sock: socket.socket) -> Any:
    """The child: read and unpickle what the caller sent (the function, then each call's arguments)."""
    parts = _recv_parts(sock)
    return pickle.loads(parts[0], buffers=parts[1:])


def _recv_reply(sock: socket.socket) -> dict[str, Any]:
    """The caller: read one reply of the child and check it (BadReply if it breaks the format); nothing unpickled."""
    return decode_reply(_recv_parts(sock, checked=True))


# --- the child ---


def _harden_child(caller_pid: int) -> None:
    """Die with the caller, leave Ctrl-C to it, and write no core files (a decoder crash is expected here)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != caller_pid:  # the caller died before prctl took effect
        os._exit(1)


def _error_reply(err: Exception) -> list[bytes | memoryview]:
    """An exception of fn as a reply: a MediaError by type and message, a builtin exception by name and args (the
    caller makes it again), any other as a decode_error naming its type."""
    tb = "".join(traceback.format_exception(err))
    if type(err).__module__ == "builtins":
        try:
            return encode_reply({"reply": "error", "type": type(err).__name__, "args": list(err.args), "traceback": tb})
        except TypeError:  # args the format cannot carry: the message alone
            return encode_reply({"reply": "error", "type": type(err).__name__, "args": [str(err)], "traceback": tb})
    error_type, message = ((str(err.error_type), str(err)) if isinstance(err, MediaError)
                           else ("decode_error", f"{type(err).__name__}: {err}"))
    return encode_reply({"reply": "media_error", "error_type": error_type, "message": message, "traceback": tb})


def _child_main(fd: int, caller_pid: int) -> None:
    """The child's entry point: receive fn, then serve calls until the caller closes the socket."""
    _harden_child(caller_pid)
    sock = socket.socket(fileno=fd)
    try:
        fn = _recv_request(sock)  # imports fn's module; a failure here is reported by the caller as a failed start
        _send(sock, encode_reply({"reply": "ready", "pid": os.getpid()}))
        while True:
            try:
                args, kwargs = _recv_request(sock)
            except EOFError:
                return  # the caller closed the sandbox, or died
            try:
                reply = encode_reply({"reply": "ok", "value": fn(*args, **kwargs)})
            except Exception as err:  # noqa: BLE001 - every exception of fn (or of encoding its value) goes back
                try:
                    reply = _error_reply(err)
                except Exception as inner:  # noqa: BLE001 - e.g. a message that is not text
                    reply = encode_reply({"reply": "media_error", "error_type": "decode_error",
                                          "message": f"{type(err).__name__}", "traceback": repr(inner)})
            _send(sock, reply)
    except (BrokenPipeError, ConnectionResetError):
        return


# --- the caller ---


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exited with code {code}"


class _ChildDied(Exception):
    pass


class Sandbox:
    """Runs fn(*args) in a persistent child process; a crash or hang becomes a MediaError, never kills the caller.

    Not thread-safe: use one Sandbox per calling thread. Use it as a context manager or call `close()`.
    """

    def __init__(self, fn: Callable[..., Any], *, timeout_s: float, attempts: int = 2) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        if getattr(fn, "__module__", None) == "__main__":
            raise TypeError(f"Sandbox needs a function from an importable module, not __main__: {fn!r}")
        try:
            self._fn_pickle = _dumps(fn)
        except Exception as err:
            raise TypeError(f"Sandbox needs a module-level (picklable) function, got {fn!r}") from err
        self._name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
        self._timeout_s = float(timeout_s)
        self._attempts = attempts
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._pidfd: int | None = None  # readable once the child has exited (Linux); None elsewhere

    @property
    def pid(self) -> int | None:
        """The child's process id, or None while no child runs (before the first call, after a kill or close)."""
        return self._proc.pid if self._proc is not None else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Return fn(*args, **kwargs) computed in the child.

        Raises what fn raised, MediaError('timeout') after `timeout_s`, or MediaError('crashed') once the child
        has died `attempts` times on this call; RuntimeError if a child cannot even start (e.g. an import error).
        """
        request = _dumps((args, kwargs))  # pickled once, sent again on a retry
        deaths: list[str] = []
        for _ in range(self._attempts):
            try:
                reply = self._call_once(request)
            except _ChildDied as died:
                deaths.append(str(died))
                continue
            return self._unpack(reply)
        how = ", then ".join(dict.fromkeys(deaths))
        tries = f"{self._attempts} attempt" + ("s" if self._attempts > 1 else "")
        raise MediaError("crashed", f"the decoder process {how} ({tries})")

    def close(self) -> None:
        """Stop the child: it exits on end of file, or is killed after a second. Safe to call more than once."""
        self._stop(grace=_STOP_GRACE_S, kill_first=False)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop(grace=0.0, kill_first=True)
        except Exception:  # noqa: BLE001 - best effort, possibly during interpreter shutdown
            pass

    # --- internals ---

    def _call_once(self, request: Parts) -> dict[str, Any]:
        """Send one request and read its reply; raise _ChildDied, or MediaError('timeout' or 'decode_error': a reply
        outside the format, whose child is killed)."""
        if self._proc is not None and self._proc.poll() is not None:
            self._stop()  # died between calls (e.g. killed from outside): not this call's fault
        if self._proc is None:
            self._start()
        sock = self._sock
        assert sock is not None
        deadline = time.monotonic() + self._timeout_s
        try:
            try:
                _send(sock, request)
            except OSError:
                raise self._died() from None
            ready = wait(self._waitables(), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._stop(kill_first=True)
                raise MediaError("timeout", f"decoding took longer than {self._timeout_s:g} s")
            if sock not in ready:  # exited, yet its socket is open (a copy leaked into another process)
                raise self._died()
            try:
                return _recv_reply(sock)
            except (EOFError, OSError):
                raise self._died() from None
            except BadReply as err:  # the child is not the program we started any more: end it, use nothing it sent
                self._stop(kill_first=True)
                raise MediaError("decode_error", f"the decoder process sent a reply that was refused: {err}") from None
        except (MediaError, _ChildDied):
            raise
        except BaseException:  # e.g. KeyboardInterrupt mid-call: the child's state is unknown, so drop it
            self._stop(kill_first=True)
            raise

    @staticmethod
    def _unpack(reply: dict[str, Any]) -> Any:
        if reply["reply"] == "ok":
            return reply["value"]
        cause = _RemoteTraceback(reply["traceback"])
        if reply["reply"] == "error":
            err = remote_exception(reply["type"], reply["args"])
            if err is not None:
                raise err from cause
            raise MediaError("decode_error", f"{reply['type']}: {reply['args']}") from cause
        try:
            error_type = MediaError(reply["error_type"], reply["message"])
        except ValueError:  # not an error type of ours
            raise MediaError("decode_error", f"{reply['error_type']}: {reply['message']}") from cause
        raise error_type from cause

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        path = [os.fsdecode(p) for p in sys.path if isinstance(p, (str, bytes, os.PathLike))]
        code = f"import sys; sys.path[:] = {path!r}; import pipeline.media.sandbox as s; s._child_main({fd}, {os.getpid()})"
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[fd], stdin=subprocess.DEVNULL)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        self._sock = parent_sock
        try:
            self._pidfd = os.pidfd_open(self._proc.pid) if hasattr(os, "pidfd_open") else None
        except OSError:
            self._pidfd = None
        reply: Any = None
        timed_out = False
        try:
            _send(parent_sock, self._fn_pickle)
            ready = wait(self._waitables(), timeout=_STARTUP_TIMEOUT_S)
            timed_out = not ready
            if parent_sock in ready:
                reply = _recv_reply(parent_sock)
        except (EOFError, OSError, BadReply):
            pass
        except BaseException:
            self._stop(kill_first=True)
            raise
        if not (isinstance(reply, dict) and reply["reply"] == "ready"):
            exit_code = self._stop(grace=0.0 if timed_out else _DEATH_GRACE_S, kill_first=timed_out)
            how = f"{_describe_exit(exit_code)} before it was ready"
            if timed_out:
                how = f"was not ready within {_STARTUP_TIMEOUT_S:g} s"
            raise RuntimeError(f"the sandbox process for {self._name} {how} (see its stderr)")

    def _waitables(self) -> list[Any]:
        return [self._sock] + ([self._pidfd] if self._pidfd is not None else [])

    def _died(self) -> _ChildDied:
        """Reap a child that died during a call; the exception describes how it died."""
        return _ChildDied(_describe_exit(self._stop(grace=_DEATH_GRACE_S, kill_first=False)))

    def _stop(self, *, grace: float = 0.0, kill_first: bool = True) -> int | None:
        """Close the socket and reap the child, killing it at once or after `grace` seconds; return its exit code.

        The exit code is negative for the signal that ended the child; None if there was no child.
        """
        proc, sock, pidfd = self._proc, self._sock, self._pidfd
        self._proc = self._sock = self._pidfd = None
        if sock is not None:
            sock.close()
        if pidfd is not None:
            os.close(pidfd)
        if proc is None:
            return None
        if not kill_first:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.kill()
        return proc.wait()


_SANDBOXES: dict[tuple, Sandbox] = {}  # per worker process: one decoder child per function, reused across tasks


def isolated(fn: Callable[..., Any], *, timeout_s: float, attempts: int) -> Sandbox:
    """fn, run in this process's decoder child for it (created on first use): a crash or hang costs one error row."""
    key = (fn.__module__, fn.__qualname__, timeout_s, attempts)
    if key not in _SANDBOXES:
        _SANDBOXES[key] = Sandbox(fn, timeout_s=timeout_s, attempts=attempts)
    return _SANDBOXES[key]
