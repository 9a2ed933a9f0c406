"""The local SeaweedFS S3 server works with s3fs/pyarrow, enforces auth and never outlives us."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.embedded import s3_server
from pipeline.embedded.s3_server import S3Server, find_weed, local_s3_server
from tests.conftest import REPO

needs_weed = pytest.mark.skipif(find_weed() is None, reason="SeaweedFS `weed` binary not installed")

BUCKET = "test-bucket"


def weed_pids(workdir: Path) -> list[int]:
    """Pids of live (non-zombie) processes whose command line mentions ``workdir``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if str(workdir) in (proc / "cmdline").read_text() and " Z " not in (proc / "stat").read_text():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def port_open(url: str) -> bool:
    """True if something accepts TCP connections at the host:port of ``url``."""
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


@needs_weed
def test_roundtrip_auth_and_cleanup(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import s3fs

    with local_s3_server(tmp_path, buckets=[BUCKET]) as server:
        assert server.secret_key not in repr(server)
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        assert weed_pids(tmp_path)
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint_url, key=server.access_key, secret=server.secret_key)

        fs.pipe(f"{BUCKET}/small.txt", b"hello")
        assert fs.cat(f"{BUCKET}/small.txt") == b"hello"
        big = os.urandom(12 * 2**20)  # 3 parts of 5 MiB -> multipart upload
        with fs.open(f"{BUCKET}/big.bin", "wb", block_size=5 * 2**20) as f:
            f.write(big)
        assert fs.cat(f"{BUCKET}/big.bin") == big

        table = pa.table({"id": list(range(1000)), "name": [f"row{i}" for i in range(1000)]})
        arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
        pq.write_table(table, f"{BUCKET}/t.parquet", filesystem=arrow_fs)
        assert pq.read_table(f"{BUCKET}/t.parquet", filesystem=arrow_fs).equals(table)

        for key, secret in [(server.access_key, "wrong-secret"), ("wrong-key", server.secret_key)]:
            bad = s3fs.S3FileSystem(endpoint_url=server.endpoint_url, key=key, secret=secret, skip_instance_cache=True)
            with pytest.raises(PermissionError):
                bad.cat(f"{BUCKET}/small.txt")

    assert weed_pids(tmp_path) == []
    assert not port_open(server.endpoint_url)


@needs_weed
def test_env_configures_botocore_and_s3fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.session
    import s3fs

    with local_s3_server(tmp_path, buckets=[BUCKET]) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        client = botocore.session.get_session().create_client("s3")
        client.put_object(Bucket=BUCKET, Key="k", Body=b"v")
        assert client.get_object(Bucket=BUCKET, Key="k")["Body"].read() == b"v"
        assert BUCKET in [b["Name"] for b in client.list_buckets()["Buckets"]]
        assert s3fs.S3FileSystem(skip_instance_cache=True).cat(f"{BUCKET}/k") == b"v"


def test_startup_failure_reports_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fatal: port is busy' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(s3_server, "find_weed", lambda: str(fake))
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*fatal: port is busy"):
        with local_s3_server(tmp_path / "work"):
            pass


@needs_weed
def test_server_dies_with_sigkilled_parent(tmp_path: Path) -> None:
    script = (
        "import sys, time; from pathlib import Path; from pipeline.embedded.s3_server import local_s3_server\n"
        "with local_s3_server(Path(sys.argv[1])) as s:\n"
        "    print(s.endpoint_url, flush=True); time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        endpoint = parent.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:") and weed_pids(tmp_path)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while weed_pids(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert weed_pids(tmp_path) == []
    # Nobody was left to clean up weed's hard-coded /tmp gRPC sockets; do it here.
    for sock in set(re.findall(r"/tmp/seaweedfs-[\w-]+\.sock", (tmp_path / "weed.log").read_text())):
        Path(sock).unlink(missing_ok=True)


def test_repr_hides_secret() -> None:
    server = S3Server("http://127.0.0.1:1", "AK", "very-secret")
    assert "very-secret" not in repr(server) and "very-secret" not in str(server)
    assert server.env()["AWS_SECRET_ACCESS_KEY"] == "very-secret"
