"""`submit`: local validation before Ray, deterministic submission ids, what travels to the cluster (code, job file,
never credentials), following a job to its exit code; and, marked integration, a real `ray start --head` cluster."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_job
from pipeline.errors import SecretError
from pipeline.run import submit as submit_mod
from pipeline.run.submit import (
    EXCLUDES,
    assert_no_secrets,
    build_entrypoint,
    build_runtime_env,
    project_root,
    submission_id,
    submit_job,
)
from tests.conftest import REPO
from tests.helpers import output_rows

JOB = {"task": "caption", "input": "s3://bucket/images/", "output": "s3://bucket/captions/", "model": "org/model-hf"}


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder like this repository: pyproject.toml and a job under jobs/."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "caption.yaml").write_text(yaml.safe_dump(JOB))
    return tmp_path


@dataclass
class Info:
    status: str
    message: str = ""
    runtime_env: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


class FakeClient:
    """A JobSubmissionClient stand-in: jobs finish with `outcome` as soon as they are followed."""

    def __init__(self, existing: dict[str, str] | None = None, outcome: str = "SUCCEEDED", tail_breaks: bool = False):
        self.jobs = {k: Info(v) for k, v in (existing or {}).items()}
        self.outcome = outcome
        self.tail_breaks = tail_breaks
        self.submitted: list[dict] = []

    def get_job_info(self, job_id):
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return self.jobs[job_id]

    def get_job_status(self, job_id):
        return self.get_job_info(job_id).status

    def submit_job(self, *, entrypoint, submission_id=None, runtime_env=None, metadata=None):
        if submission_id in self.jobs:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
        self.submitted.append({"entrypoint": entrypoint, "submission_id": submission_id, "runtime_env": runtime_env,
                               "metadata": metadata})
        self.jobs[submission_id] = Info("PENDING", runtime_env=runtime_env, metadata=metadata)
        return submission_id

    async def tail_job_logs(self, job_id):
        yield "line one\n"
        if self.tail_breaks:
            raise RuntimeError("WebSocket connection closed unexpectedly")
        yield "line two\n"
        self.jobs[job_id].status = self.outcome
        self.jobs[job_id].message = "" if self.outcome == "SUCCEEDED" else "Job entrypoint command failed"

    def get_job_logs(self, job_id):
        self.jobs[job_id].status = self.outcome
        return "line one\nline two\n"


def no_ray(address):
    raise AssertionError("Ray must not be contacted")


def run(project: Path, client=None, overrides=(), **kwargs) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = submit_job(project / "jobs" / "caption.yaml", address="http://127.0.0.1:8265", overrides=list(overrides),
                      echo=lines.append, client=client, poll_s=0.01, **kwargs)
    return code, lines


# ----------------------------------------------------------------------------------------------- ids and payload


def test_submission_id_is_deterministic(project):
    path = project / "jobs" / "caption.yaml"
    job = load_job(path)
    first = submission_id(job, path, ["compute.replicas=2"])
    assert first == submission_id(load_job(path), path, ["compute.replicas=2"])
    assert first.startswith(f"internvl-batch-{job.fingerprint()}-") and len(first.rsplit("-", 1)[1]) == 8
    assert first != submission_id(job, path, [])
    assert first != submission_id(job, path, ["compute.replicas=3"])
    assert submission_id(job, path, ["a=1", "a=2"]) != submission_id(job, path, ["a=2", "a=1"])  # last one wins
    path.write_text(path.read_text() + "# a comment changes the file, so the id\n")
    assert first != submission_id(job, path, ["compute.replicas=2"])


def test_entrypoint_names_the_job_file_inside_the_working_dir(project):
    path = project / "jobs" / "caption.yaml"
    assert project_root(path) == project
    assert build_entrypoint(path, project, []) == "internvl-batch run jobs/caption.yaml"
    assert build_entrypoint(path, project, ["prompt=Say what you see.", "compute.replicas=2"]) == (
        "internvl-batch run jobs/caption.yaml --set 'prompt=Say what you see.' --set compute.replicas=2")
    assert build_entrypoint(path, project, ["output=s3://b/$(date)/"]) == (
        "internvl-batch run jobs/caption.yaml --set 'output=s3://b/$(date)/'")  # no shell expansion on the cluster
    assert build_entrypoint(path, project, ["compute.replicas=2"], ["--retry-errors"]) == (
        "internvl-batch run jobs/caption.yaml --set compute.replicas=2 --retry-errors")
    job = load_job(path)  # a retry of a finished job is another submission than the job itself
    assert submission_id(job, path, [], ["--retry-errors"]) != submission_id(job, path, [])


def test_project_root_without_pyproject_is_the_job_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    job = tmp_path / "a" / "b" / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    assert not any((p / "pyproject.toml").exists() for p in job.parents)
    assert project_root(job) == job.parent


def test_runtime_env_ships_the_project_and_nothing_secret(project):
    env = build_runtime_env(project)
    assert env == {"working_dir": str(project), "excludes": EXCLUDES}
    for excluded in (".git", ".venv", "__pycache__", "/tests/data/"):
        assert excluded in env["excludes"]
    assert "env_vars" not in env
    assert_no_secrets(env)


def test_repository_root_is_the_project_root():
    repo = REPO
    assert project_root(repo / "jobs" / "caption_images.yaml") == repo


# ----------------------------------------------------------------------------------------------- the secret guard


@pytest.mark.parametrize("runtime_env,fragment", [
    ({"env_vars": {"AWS_SECRET_ACCESS_KEY": "abc"}}, "AWS_SECRET_ACCESS_KEY"),
    ({"env_vars": {"AWS_ACCESS_KEY_ID": "x"}}, "AWS_ACCESS_KEY_ID"),
    ({"env_vars": {"AWS_SESSION_TOKEN": ""}}, "AWS_SESSION_TOKEN"),
    ({"env_vars": {"AWS_PROFILE_SOMETHING": "x"}}, "AWS_PROFILE_SOMETHING"),
    ({"env_vars": {"HF_TOKEN": "hf_x"}}, "HF_TOKEN"),
    ({"env_vars": {"DB_PASSWORD": "x"}}, "DB_PASSWORD"),
    ({"env_vars": {"NOTE": "AKIAIOSFODNN7EXAMPLE"}}, "AWS access key id"),
    ({"env_vars": {"NOTE": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}}, "AWS secret access key"),
    ({"pip": ["git+https://user:pass@example.com/repo.git"]}, "URL with a password"),
])
def test_secret_guard_refuses_credentials(runtime_env, fragment):
    with pytest.raises(SecretError, match=fragment):
        assert_no_secrets(runtime_env)


def test_secret_guard_refuses_this_environments_secret_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "an-unguessable-local-secret")
    with pytest.raises(SecretError, match="value of a credential in this environment"):
        assert_no_secrets({"env_vars": {"HARMLESS_NAME": "prefix-an-unguessable-local-secret"}})
    with pytest.raises(SecretError):
        assert_no_secrets("internvl-batch run j.yaml --set x=an-unguessable-local-secret", where="entrypoint")


def test_secret_guard_lets_settings_through():
    assert_no_secrets({"working_dir": "/home/me/proj", "excludes": [".git"],
                       "env_vars": {"AWS_REGION": "us-west-2", "AWS_ENDPOINT_URL": "http://127.0.0.1:8333",
                                    "RAY_DATA_VERBOSE_PROGRESS": "1"}})


# ----------------------------------------------------------------------------------------------- fails fast, locally


def test_bad_job_file_exits_2_without_contacting_ray(project, monkeypatch):
    monkeypatch.setattr(submit_mod, "connect", no_ray)
    (project / "jobs" / "caption.yaml").write_text(yaml.safe_dump({**JOB, "tilling": {}}))
    code, lines = run(project)
    assert code == 2 and "tilling: unknown key" in "\n".join(lines)


def test_bad_override_and_missing_file_exit_2(project, monkeypatch):
    monkeypatch.setattr(submit_mod, "connect", no_ray)
    code, lines = run(project, overrides=["compute.replicas=0"])
    assert code == 2 and "compute.replicas" in "\n".join(lines)
    lines = []
    assert submit_job(project / "nope.yaml", address="http://x", overrides=[], echo=lines.append) == 2
    assert "no such job file" in lines[0]


def test_credential_in_an_override_exits_2_without_contacting_ray(project, monkeypatch):
    monkeypatch.setattr(submit_mod, "connect", no_ray)
    code, lines = run(project, overrides=["storage.endpoint_url=http://ak:sk@127.0.0.1:8333"])
    assert code == 2 and "refusing to send credentials" in lines[0]


def test_job_file_in_an_excluded_folder_is_refused(project, monkeypatch):
    monkeypatch.setattr(submit_mod, "connect", no_ray)
    (project / "tests" / "data").mkdir(parents=True)
    job = project / "tests" / "data" / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    lines = []
    assert submit_job(job, address="http://x", overrides=[], echo=lines.append) == 2
    assert "/tests/data/" in lines[0]


# ----------------------------------------------------------------------------------------------- against a fake cluster


def test_submits_once_follows_and_succeeds(project):
    client = FakeClient()
    code, lines = run(project, client, overrides=["compute.replicas=2"])
    assert code == 0
    [sent] = client.submitted
    assert sent["entrypoint"] == "internvl-batch run jobs/caption.yaml --set compute.replicas=2"
    assert sent["runtime_env"] == {"working_dir": str(project), "excludes": EXCLUDES}
    job = load_job(project / "jobs" / "caption.yaml", ["compute.replicas=2"])
    assert sent["submission_id"] == submission_id(job, project / "jobs" / "caption.yaml", ["compute.replicas=2"])
    assert sent["metadata"] == {"job_name": "internvl-batch", "job_file": "jobs/caption.yaml", "task": "caption",
                                "fingerprint": job.fingerprint(), "output": JOB["output"]}
    assert lines[0].startswith(f"submitted {sent['submission_id']}")
    assert lines[1:] == ["line one", "line two", f"{sent['submission_id']} SUCCEEDED"]


def test_failed_job_exits_1_with_its_message(project):
    code, lines = run(project, FakeClient(outcome="FAILED"))
    assert code == 1 and lines[-1].endswith("FAILED: Job entrypoint command failed")
    assert run(project, FakeClient(outcome="STOPPED"))[0] == 1


def test_running_job_is_followed_not_resubmitted(project):
    job_id = submission_id(load_job(project / "jobs" / "caption.yaml"), project / "jobs" / "caption.yaml", [])
    client = FakeClient(existing={job_id: "RUNNING"})
    code, lines = run(project, client)
    assert code == 0 and client.submitted == []
    assert "already RUNNING" in lines[0] and "following it" in lines[0]


def test_succeeded_job_is_not_run_again(project):
    job_id = submission_id(load_job(project / "jobs" / "caption.yaml"), project / "jobs" / "caption.yaml", [])
    client = FakeClient(existing={job_id: "SUCCEEDED"})
    code, lines = run(project, client)
    assert code == 0 and client.submitted == [] and "already SUCCEEDED" in lines[0]


def test_failed_job_gets_a_new_attempt_id(project):
    job_id = submission_id(load_job(project / "jobs" / "caption.yaml"), project / "jobs" / "caption.yaml", [])
    client = FakeClient(existing={job_id: "FAILED", f"{job_id}-2": "STOPPED"})
    code, lines = run(project, client)
    assert code == 0 and [s["submission_id"] for s in client.submitted] == [f"{job_id}-3"]
    assert "FAILED earlier" in lines[0] and "STOPPED earlier" in lines[1]


def test_no_follow_returns_after_submitting(project):
    client = FakeClient()
    code, lines = run(project, client, follow=False)
    assert code == 0 and len(client.submitted) == 1 and "ray job logs" in lines[-1]
    assert client.jobs[client.submitted[0]["submission_id"]].status == "PENDING"


def test_dropped_log_stream_falls_back_to_polling(project):
    code, lines = run(project, FakeClient(tail_breaks=True))
    assert code == 0 and any("log stream interrupted" in line for line in lines)
    assert lines[-1].endswith("SUCCEEDED")


def test_unreachable_cluster_exits_1(project, monkeypatch):
    def refuse(address):
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.")

    monkeypatch.setattr(submit_mod, "connect", refuse)
    code, lines = run(project)
    assert code == 1 and "Failed to connect" in lines[0]


class AuthenticationError(Exception):
    """Stands in for ray.exceptions.AuthenticationError (matched by name)."""


def _token_cluster(token: str, calls: list):
    """connect() of a cluster that demands `token`: a client without it raises AuthenticationError."""
    def connect(address, token_sent=None, **kwargs):
        token_sent = kwargs.get("token", token_sent)
        calls.append(token_sent)
        if token_sent != token:
            raise AuthenticationError("Authentication required: Unauthorized: Missing authentication token")
        return FakeClient()
    return connect


@pytest.fixture()
def no_token_anywhere(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_token_authentication_without_a_token_gets_a_hint(project, monkeypatch, no_token_anywhere):
    calls: list = []
    monkeypatch.setattr(submit_mod, "connect", _token_cluster("s3cr3t-token", calls))
    code, lines = run(project)
    assert code == 1 and "RAY_AUTH_TOKEN" in lines[-1] and "~/.ray/auth_token" in lines[-1]
    assert calls == [None]


@pytest.mark.parametrize("where", ["env", "file", "path"])
def test_token_authentication_uses_the_token_it_finds(project, monkeypatch, no_token_anywhere, where):
    """Ray 2.60 turns token auth on for a cluster once ~/.ray/auth_token exists; the client then needs the token
    without the user exporting RAY_AUTH_MODE=token."""
    token = "s3cr3t-token"
    if where == "env":
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    elif where == "file":
        (no_token_anywhere / ".ray").mkdir(parents=True)
        (no_token_anywhere / ".ray" / "auth_token").write_text(token + "\n")
    else:
        (no_token_anywhere / "tok").parent.mkdir(parents=True)
        (no_token_anywhere / "tok").write_text(token)
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_token_anywhere / "tok"))
    calls: list = []
    monkeypatch.setattr(submit_mod, "connect", _token_cluster(token, calls))
    code, lines = run(project)
    assert code == 0 and calls == [None, token], lines
    assert any(line.startswith("submitted internvl-batch-") for line in lines)
    assert not any(token in line for line in lines)  # the token is never printed


def test_a_refused_token_says_where_it_came_from(project, monkeypatch, no_token_anywhere):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "stale-token")
    monkeypatch.setattr(submit_mod, "connect", _token_cluster("the-real-one", []))
    code, lines = run(project)
    assert code == 1 and "refused the token from RAY_AUTH_TOKEN" in lines[-1] and "stale-token" not in lines[-1]


def test_relative_local_paths_are_warned_about(project):
    (project / "jobs" / "caption.yaml").write_text(yaml.safe_dump({**JOB, "output": "./out/"}))
    code, lines = run(project, FakeClient())
    assert code == 0 and any(line.startswith("warning: output './out/'") for line in lines)


def test_environment_credentials_never_reach_the_cluster(project, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    client = FakeClient()
    assert run(project, client)[0] == 0
    sent = json.dumps(client.submitted)
    assert "AKIAIOSFODNN7EXAMPLE" not in sent and "wJalrXUtnFEMI" not in sent and "AWS_" not in sent


# ----------------------------------------------------------------------------------------------- a real cluster

DASHBOARD_DEPS = ("aiohttp_cors", "opencensus", "prometheus_client", "grpc", "smart_open")


def _installed(module: str) -> bool:
    return module in sys.modules or importlib.util.find_spec(module) is not None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if pytest dies, so `ray start --block` stops its cluster."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _cluster_env() -> dict[str, str]:
    """The environment of the cluster and of its clients: this venv first on PATH (the job's entrypoint runs
    `internvl-batch` from it), and Ray 2.60 token auth with the token in ~/.ray/auth_token."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # SIGTERM stops the head at once (no 30 s drain for Serve)
    env.pop("RAY_ADDRESS", None)
    return env


def _python(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a client in a fresh process, as the CLI runs: Ray reads its auth mode once per process, so a client in
    this test process (where earlier tests may have imported Ray) could not switch to token auth."""
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A private Ray head (`ray start --head --block`) on free ports with its own temp dir, stopped by its pid.

    Not `ray stop`: that stops every Ray process of this user on the machine, other test sessions' included. The
    blocking `ray start` stops the processes it started when it gets SIGTERM; it gets one at teardown, or from the
    kernel if this process dies first; the process group it leads is killed if anything is left. Its own temp dir
    keeps it out of /tmp/ray, so a plain ray.init() elsewhere on the machine does not join it. The cluster gets the
    SeaweedFS credentials from its environment (as nodes get an instance role), never from a job.
    """
    missing = [m for m in DASHBOARD_DEPS if not _installed(m)]
    if missing:
        pytest.skip(f"the job API needs ray[default] (missing {', '.join(missing)})")
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = _cluster_env()
    gcs, dashboard, client_port, agent_listen, agent_grpc = _free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="ivb-ray-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL, check=True)
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
             f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_listen}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited {proc.returncode}:\n{log_path.read_text()}")
            probe = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True,
                                   text=True, timeout=60)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"Ray's job API did not come up at {address}:\n{probe.stderr[-2000:]}")
            time.sleep(2)
        yield address, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the session this fixture started
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(job_file: Path, address: str, env: dict[str, str], overrides: list[str] = ()) -> tuple[int, str]:
    script = ("import sys; from pathlib import Path; from pipeline.run.submit import submit_job; "
              f"sys.exit(submit_job(Path({str(job_file)!r}), address={address!r}, overrides={list(overrides)!r}, "
              "poll_s=0.5))")
    result = _python(script, env, timeout=480)
    return result.returncode, result.stdout + result.stderr


def _job_info(job_id: str, address: str, env: dict[str, str]) -> dict:
    script = ("import json; from ray.job_submission import JobSubmissionClient; "
              f"c = JobSubmissionClient({address!r}); i = c.get_job_info({job_id!r}); "
              "print(json.dumps({'status': str(i.status.value), 'entrypoint': i.entrypoint, "
              "'runtime_env': i.runtime_env, 'metadata': i.metadata, 'jobs': len(c.list_jobs())}))")
    result = _python(script, env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_submit_to_a_real_cluster(ray_head, tiny_model, tmp_path):
    import io

    import s3fs

    from tests.conftest import pattern_image

    address, env = ray_head
    fs = s3fs.S3FileSystem()
    for i, size in enumerate([(64, 48), (500, 300), (900, 450)]):
        buf = io.BytesIO()
        pattern_image(*size).save(buf, "PNG")
        fs.pipe(f"bucket/submit/images/img{i}.png", buf.getvalue())
    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'submitted'\n")
    job_file = project / "jobs" / "caption.yaml"
    job_file.write_text(yaml.safe_dump({
        "task": "caption", "input": "s3://bucket/submit/images/", "output": "s3://bucket/submit/out/",
        "model": str(tiny_model),
        "generation": {"max_new_tokens": 4}, "tiling": {"max_tiles": 2}, "compute": {"batch_size": 2}}))
    # Credentials in the submitting shell must not travel with the job.
    client_env = {**env, "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
                  "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}

    code, log = _submit(job_file, address, client_env)
    assert code == 0, log
    assert "submitted internvl-batch-" in log and "SUCCEEDED" in log
    fs.invalidate_cache()
    assert json.loads(fs.cat("bucket/submit/out/_SUCCESS.json"))["rows_out"] == 3  # read back from SeaweedFS
    rows = output_rows("bucket/submit/out", fs)
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in rows) == ["img0.png", "img1.png", "img2.png"]
    assert all(r["status"] == "ok" and r["response"] for r in rows)
    job_id = submission_id(load_job(job_file), job_file, [])
    info = _job_info(job_id, address, env)
    assert info["status"] == "SUCCEEDED" and info["entrypoint"] == "internvl-batch run jobs/caption.yaml"
    assert info["runtime_env"]["working_dir"].startswith("gcs://")  # the project folder was uploaded
    sent = json.dumps({"runtime_env": info["runtime_env"], "metadata": info["metadata"]})
    assert "wJalrXUtnFEMI" not in sent and "AKIAIOSFODNN7EXAMPLE" not in sent
    assert env["AWS_SECRET_ACCESS_KEY"] not in sent and env["AWS_ACCESS_KEY_ID"] not in sent  # the cluster's own
    assert not any(k.startswith("AWS_") for k in (info["runtime_env"].get("env_vars") or {}))

    # The same job again: reported, not run twice. This client has no RAY_AUTH_MODE: it finds the token in
    # ~/.ray/auth_token by itself once the cluster demands one.
    code, log = _submit(job_file, address, {k: v for k, v in client_env.items() if k != "RAY_AUTH_MODE"})
    assert code == 0 and "already SUCCEEDED" in log, log
    assert _job_info(job_id, address, env)["jobs"] == info["jobs"]

    # A job that fails on the cluster (its checkpoint does not exist there) exits 1.
    code, log = _submit(job_file, address, client_env,
                        [f"model={tmp_path / 'no-such-model'}", "output=s3://bucket/submit/out2/"])
    assert code == 1, log
    assert "FAILED: Job entrypoint command failed with exit code 2" in log, log
    assert "no-such-model" in log, log  # the run's own error, streamed from the cluster
