"""Sandbox: one decode call per sample in a persistent child; a crash or hang is an error row, not a dead worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.errors import MediaError
from pipeline.media.sandbox import Sandbox
from tests import sandbox_targets as targets
from tests.conftest import REPO


def gone(proc: psutil.Process) -> bool:
    """True when the process has exited (a zombie that nobody reaps counts as exited)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if not gone(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def zombie_children() -> list[psutil.Process]:
    """Children of this test process that exited and were never reaped."""
    zombies = []
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child)
        except psutil.NoSuchProcess:
            pass
    return zombies


def tries(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_returns_large_array_unchanged_and_reuses_child():
    expected = targets.pattern((1024, 2048, 4))  # 8 MiB
    with Sandbox(targets.pattern, timeout_s=30) as sandbox:
        assert sandbox.pid is None  # started lazily
        got = sandbox((1024, 2048, 4))
        pid = sandbox.pid
        assert pid is not None and pid != os.getpid()
        assert got.dtype == np.uint8 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        assert got.flags.writeable  # received into fresh memory, usable in place
        for _ in range(3):
            np.testing.assert_array_equal(sandbox(shape=(1024, 2048, 4)), expected)  # keywords work too
        assert sandbox.pid == pid
        with Sandbox(targets.getpid, timeout_s=30) as other:
            assert other() not in (pid, os.getpid())  # each sandbox has its own child
    assert sandbox.pid is None
    assert not psutil.pid_exists(pid) or wait_gone([psutil.Process(pid)], 5) == []  # close() stops the child
    assert zombie_children() == []


def test_media_error_keeps_type_and_message():
    with Sandbox(targets.raise_media_error, timeout_s=30) as sandbox:
        with pytest.raises(MediaError) as info:
            sandbox("too_large", "video is 9000x9000")
        assert info.value.error_type == "too_large" and str(info.value) == "video is 9000x9000"
        assert "raise_media_error" in str(info.value.__cause__)  # the child's traceback rides along
        pid = sandbox.pid
        with pytest.raises(MediaError, match="again"):
            sandbox("decode_error", "again")
        assert sandbox.pid == pid  # an exception does not cost the child


def test_other_exceptions_keep_their_type():
    """Builtin exceptions cross with their type and args; others (their classes are never loaded from a reply)
    become decode_error naming the type."""
    with Sandbox(targets.raise_value_error, timeout_s=30) as sandbox:
        with pytest.raises(ValueError, match="^bad bound$"):
            sandbox("bad bound")
    with Sandbox(targets.raise_unpicklable, timeout_s=30) as sandbox:
        with pytest.raises(MediaError, match="TwoArgError: a b") as info:
            sandbox("a", "b")
        assert info.value.error_type == "decode_error"


@pytest.mark.parametrize("kind", ["pickle", "exec", "system_exit", "object_array", "short_array", "huge"])
def test_a_crafted_reply_is_refused_and_runs_no_code(tmp_path, kind):
    """A decoder exploited by a hostile file controls the child: whatever it sends back is refused as a decode_error,
    and nothing in it runs in the caller (the pickle below creates the marker when loaded, as the old format did)."""
    proof = tmp_path / "pickles-run-code"
    import pickle
    pickle.loads(pickle.dumps(targets.RunsCode(str(proof))))
    assert proof.exists()  # the payload is live
    marker = tmp_path / "code-ran"
    with Sandbox(targets.send_crafted_reply, timeout_s=30, attempts=1) as sandbox:
        with pytest.raises(MediaError) as info:
            sandbox(kind, str(marker))
        assert info.value.error_type == "decode_error"
    assert not marker.exists()
    assert zombie_children() == []


def test_hang_times_out_without_retry_and_next_call_gets_fresh_child(tmp_path):
    counter = tmp_path / "tries"
    with Sandbox(targets.sleep_then_return, timeout_s=1, attempts=3) as sandbox:
        assert sandbox(str(counter), 0) == "woke"
        first = psutil.Process(sandbox.pid)
        start = time.monotonic()
        with pytest.raises(MediaError, match=r"^decoding took longer than 1 s$") as info:
            sandbox(str(counter), 30)
        assert time.monotonic() - start < 10
        assert info.value.error_type == "timeout"
        assert tries(counter) == 2  # not retried
        assert sandbox.pid is None and gone(first)
        assert zombie_children() == []  # killed and reaped
        assert sandbox(str(counter), 0) == "woke"
        assert sandbox.pid != first.pid


@pytest.mark.parametrize("attempts", [1, 2])
def test_segfault_becomes_crashed_after_all_attempts(tmp_path, attempts):
    counter = tmp_path / "tries"
    with Sandbox(targets.segfault, timeout_s=30, attempts=attempts) as sandbox:
        with pytest.raises(MediaError, match="SIGSEGV") as info:
            sandbox(str(counter))
        assert info.value.error_type == "crashed"
        assert f"({attempts} attempt" in str(info.value)
        assert tries(counter) == attempts
        assert sandbox.pid is None
        assert zombie_children() == []


def test_exit_code_is_named():
    with Sandbox(targets.exit_with, timeout_s=30, attempts=1) as sandbox:
        with pytest.raises(MediaError, match="exited with code 3") as info:
            sandbox(3)
        assert info.value.error_type == "crashed"


def test_flaky_crash_is_retried(tmp_path):
    counter = tmp_path / "tries"
    value = {"frames": targets.pattern((4, 8, 8, 3)), "fps": 25.0}
    with Sandbox(targets.crash_first_try, timeout_s=30, attempts=2) as sandbox:
        got = sandbox(str(counter), value)
        assert tries(counter) == 2
        assert got["fps"] == 25.0
        np.testing.assert_array_equal(got["frames"], value["frames"])


def test_child_killed_between_calls_is_replaced():
    with Sandbox(targets.getpid, timeout_s=30, attempts=1) as sandbox:
        pid = sandbox()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        # Wait until the child can be reaped (peek, do not reap): its threads may outlive the main one briefly.
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sandbox() not in (pid, None)  # a fresh child, and the call did not count as a crash


def test_rejects_functions_the_child_cannot_import():
    with pytest.raises(TypeError, match="module-level"):
        Sandbox(lambda: None, timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s"):
        Sandbox(targets.getpid, timeout_s=0)
    with pytest.raises(ValueError, match="attempts"):
        Sandbox(targets.getpid, timeout_s=1, attempts=0)


def test_child_that_cannot_start_is_a_runtime_error(monkeypatch):
    """An import failure in the child is a broken environment, not a bad sample: it must not become an error row."""
    here = {"", ".", str(REPO)}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if str(p) not in here])  # the child gets this sys.path
    sandbox = Sandbox(targets.getpid, timeout_s=30)
    with pytest.raises(RuntimeError, match=r"tests\.sandbox_targets\.getpid exited with code 1 before it was ready"):
        sandbox()
    assert sandbox.pid is None and zombie_children() == []


def test_child_dies_with_its_parent():
    script = textwrap.dedent("""
        import time
        from pipeline.media.sandbox import Sandbox
        from tests.sandbox_targets import getpid
        sandbox = Sandbox(getpid, timeout_s=30)
        print(sandbox(), flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        descendants = psutil.Process(parent.pid).children(recursive=True)
        assert [p.pid for p in descendants] == [child_pid]
        parent.kill()
        parent.wait(5)
        assert wait_gone(descendants, 5) == []
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
