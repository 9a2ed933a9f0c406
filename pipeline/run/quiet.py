"""What a run prints on stderr: what the user needs, not the libraries' chatter (unless --verbose).

- transformers' and huggingface_hub's progress bars (weights loading, shards written, files fetched): off;
- Ray Data's INFO lines on the console (execution plan, start and end) and its "progress bars disabled" notice:
  kept in its session log file (ray-data.log), not printed;
- Ray's notice that a new local cluster has token authentication on (its default; it says so every time unless
  RAY_AUTH_MODE is set, which must happen before Ray is imported): that logger shows errors only;
- one ERROR line of Ray's core worker, "... has constructor arguments in the object store and max_restarts > 0":
  Ray Data itself creates every actor-pool worker with its DataContext and map transformer as object-store
  arguments, whatever the stage's own constructor arguments (a bare ActorPoolStrategy map with no arguments prints
  it too), and those objects are owned and kept by this driver for the whole run, so the warned-of loss cannot
  happen here. It is written by C++ straight to file descriptor 2, so that one line is filtered out there, by a
  small process reading that descriptor's pipe (a process: if this one crashes, its last lines still get out).
"""

from __future__ import annotations

import logging
import os
import re
import select
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_LINGERING: list[subprocess.Popen] = []  # filters still copying for processes that outlived the run
_state = {"quiet": False}  # set by quiet_run for this process: execute applies quiet_ray_data once Ray Data is loaded

RAY_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"  # the logger of that notice
# Lines dropped from the process's stderr (a whole line matching one of these).
DROPPED_LINES = (re.compile(rb"core_worker\.cc:\d+: Actor .* has constructor arguments in the object store and "
                            rb"max_restarts > 0"),)


def quiet_libraries() -> None:
    """Progress bars off (also for processes started from here, e.g. a local Ray); Ray's token-auth notice off."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub (and so transformers) at import
    logging.getLogger(RAY_AUTH_NOTICE).setLevel(logging.ERROR)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def quiet_ray_data() -> None:
    """Where quiet_run is on: Ray Data's console handler shows warnings and errors only (its log file keeps
    everything), and its notice that progress bars are off (they are, off a terminal) is dropped. Call after
    ray.data is imported."""
    if not _state["quiet"]:
        return
    import ray.data  # noqa: F401 - its logging is configured on import

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: not record.name.startswith("ray.data._internal.progress"))


# The filter process (stdlib only, started with -S: ~20 ms): argv = END marker (hex), the fd to acknowledge END on,
# then the dropped patterns. It copies its stdin (this process's stderr) to its stdout (the real stderr) line by line.
_FILTER_CODE = r"""
import os, re, sys
end, ack = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
dropped = [re.compile(p.encode("latin-1")) for p in sys.argv[3:]]
alive = True  # whether the real stderr still takes writes (a closed one must not stop the pipe being drained)

def write(data):
    global alive
    while data and alive:
        try:
            data = data[os.write(1, data):]
        except OSError:
            alive = False

def copy(data, final=False):
    *lines, rest = data.split(b"\n")
    for line in lines:
        if not any(p.search(line) for p in dropped):
            write(line + b"\n")
    if final:
        write(rest)
        return b""
    return rest

pending = b""
while chunk := os.read(0, 65536):
    pending += chunk
    if end in pending:
        before, pending = pending.split(end, 1)
        copy(before, final=True)
        os.write(ack, b"k")
    pending = copy(pending)
copy(pending, final=True)
"""


class _LineFilter:
    """File descriptor 2 through a pipe into a filter process that copies every line to the real stderr except the
    dropped ones. A process, not a thread of this one: when this process dies (a segfault, an abort), the filter
    still reads the pipe to its end, so the last lines (the fatal error's trace) reach the real stderr."""

    END = b"\x00internvl-batch-stderr-end\x00"
    ACK_TIMEOUT_S = 5.0
    EXIT_WAIT_S = 0.5

    def __init__(self, dropped: Sequence[re.Pattern[bytes]]) -> None:
        self.dropped = dropped

    def __enter__(self) -> _LineFilter:
        sys.stderr.flush()
        self.real = os.dup(2)
        read, self.write = os.pipe()
        self.ack, ack_write = os.pipe()
        patterns = [p.pattern.decode("latin-1") for p in self.dropped]
        try:
            # A session of its own: a terminal's Ctrl-C goes to the run, not to the filter that must copy its last words.
            self.proc = subprocess.Popen([sys.executable, "-S", "-c", _FILTER_CODE, self.END.hex(), str(ack_write), *patterns],
                                         stdin=read, stdout=self.real, stderr=subprocess.DEVNULL,
                                         pass_fds=(ack_write,), start_new_session=True)
        finally:
            os.close(read)
            os.close(ack_write)
        os.dup2(self.write, 2)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.write(self.write, self.END)  # everything written before this point is copied out first
        if select.select([self.ack], [], [], self.ACK_TIMEOUT_S)[0]:
            os.read(self.ack, 1)
        os.close(self.ack)
        os.dup2(self.real, 2)
        os.close(self.real)
        os.close(self.write)
        try:
            self.proc.wait(self.EXIT_WAIT_S)
        except subprocess.TimeoutExpired:  # processes started meanwhile hold the pipe: it copies for them until they end
            _LINGERING.append(self.proc)


@contextmanager
def quiet_run(verbose: bool = False) -> Iterator[None]:
    """Around a run from the command line: the libraries quiet and the known noise line dropped, unless verbose.
    The line filter needs this process's own stderr (not one a test harness swapped in)."""
    if verbose:
        yield
        return
    quiet_libraries()
    _state["quiet"] = True
    try:
        real_stderr = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real_stderr = False
    if not real_stderr:
        yield
        return
    with _LineFilter(DROPPED_LINES):
        yield
