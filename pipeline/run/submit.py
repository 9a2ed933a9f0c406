"""Submit a job file to a Ray cluster as a Ray job: validated here first, idempotent by content, logs followed.

The project folder (code and job file) travels as the job's runtime_env working_dir; credentials never do: the
cluster reads S3 credentials from its own environment (a Kubernetes Secret, IRSA, an instance role).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import JobConfig, load_job
from pipeline.credentials import CREDENTIAL_NAME, find_credentials
from pipeline.errors import JobError, SecretError

ACTIVE = frozenset({"PENDING", "RUNNING"})
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Attempts of one job after failures: <id>, <id>-2, <id>-3, ...
MAX_ATTEMPTS = 50
# Left out of the working_dir upload (on top of .gitignore, which Ray honours): environments, VCS, caches, tests.
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "/tests/data/",
            "/build/", "/dist/", "/internvl-batch-demo/"]
# Variables whose values must never appear in anything sent to the cluster.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN", "HF_TOKEN")
# AWS_* variables that are settings, not credentials; any other AWS_* is kept out of a runtime_env.
AWS_SETTINGS = {"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"}


class JobClient(Protocol):
    """The part of ray.job_submission.JobSubmissionClient this module uses (tests pass a fake)."""

    def submit_job(self, *, entrypoint: str, submission_id: str | None = None, runtime_env: dict | None = None,
                   metadata: dict | None = None) -> str: ...

    def get_job_info(self, job_id: str) -> Any: ...

    def get_job_status(self, job_id: str) -> Any: ...

    def get_job_logs(self, job_id: str) -> str: ...

    def tail_job_logs(self, job_id: str) -> Any: ...


def project_root(job_file: Path) -> Path:
    """The folder that travels as working_dir: the nearest ancestor of the job file with a pyproject.toml, else
    the job file's own folder (then the cluster's image must provide the code)."""
    job_file = Path(job_file).resolve()
    for folder in job_file.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return job_file.parent


def submission_id(job: JobConfig, job_file: Path, overrides: list[str], flags: list[str] | None = None) -> str:
    """A deterministic id: the config fingerprint plus a digest of the job file's bytes, the overrides, in order,
    and the run's flags (`--retry-errors`)."""
    digest = hashlib.sha256(Path(job_file).read_bytes())
    for item in [*overrides, *(flags or [])]:
        digest.update(b"\0" + item.encode())
    return f"internvl-batch-{job.fingerprint()}-{digest.hexdigest()[:8]}"


def relative_job_file(job_file: Path, root: Path) -> str:
    """The job file's path inside the working_dir, as the entrypoint names it on the cluster."""
    return Path(job_file).resolve().relative_to(root.resolve()).as_posix()


def build_entrypoint(job_file: Path, root: Path, overrides: list[str], flags: list[str] | None = None) -> str:
    """`internvl-batch run <job file relative to working_dir> [--set k=v ...] [flags]`, shell-quoted."""
    parts = ["internvl-batch", "run", relative_job_file(job_file, root)]
    for item in overrides:
        parts += ["--set", item]
    return shlex.join(parts + list(flags or []))


def build_runtime_env(root: Path) -> dict[str, Any]:
    """The job's runtime_env: the project folder as working_dir, minus environments, VCS and tests; no env vars."""
    return {"working_dir": str(root), "excludes": list(EXCLUDES)}


def assert_no_secrets(payload: Any, *, where: str = "runtime_env") -> None:
    """Raise SecretError if a value looks like a credential (or equals one in this environment), or a key names one.

    Credentials stay with the cluster (Secret, IRSA, instance role); a runtime_env, job metadata or entrypoint is
    stored by Ray in the clear and shown on the dashboard.
    """
    known = tuple(os.environ[name] for name in SECRET_ENV if os.environ.get(name))
    problems = find_credentials(payload, where, known)
    env_vars = payload.get("env_vars") if isinstance(payload, dict) else None
    for key in env_vars if isinstance(env_vars, dict) else ():
        name = str(key).upper()
        flagged = any(p.startswith(f"{where}.env_vars.{key}:") for p in problems)
        if not flagged and (CREDENTIAL_NAME.search(name) or (name.startswith("AWS_") and name not in AWS_SETTINGS)):
            problems.append(f"{where}.env_vars.{key}: credentials are never copied into a runtime_env")
    if problems:
        raise SecretError("refusing to send credentials to the cluster: " + "; ".join(problems))


def job_status(client: JobClient, job_id: str) -> str | None:
    """The job's status name, or None if the cluster has no job with that id."""
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            return None
        raise
    return _status_name(info.status)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def connect(address: str, token: str | None = None) -> JobClient:
    """A JobSubmissionClient for the cluster's dashboard address (http://host:8265), sending `token` as a bearer
    token when given (Ray's own client sends one only where this process has RAY_AUTH_MODE=token)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)


def find_ray_token() -> tuple[str, str] | None:
    """(token, where it came from) from the places Ray reads it: RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token; None where there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        try:
            token = Path(path).read_text().strip() if path else ""
        except OSError:
            continue
        if token:
            return token, path
    return None


def _is_auth_error(err: BaseException) -> bool:
    return type(err).__name__ == "AuthenticationError"  # ray.exceptions.AuthenticationError, without importing Ray


def _relative_path_warnings(job: JobConfig) -> list[str]:
    return [f"warning: {key} {value!r} is a relative local path: on the cluster it resolves inside the job's "
            "copy of the working_dir; use an absolute path or an s3:// URL"
            for key, value in (("input", job.input), ("output", job.output))
            if "://" not in value and not Path(value).is_absolute()]


def submit_job(job_file: Path, *, address: str, overrides: list[str], follow: bool = True,
               echo: Callable[[str], Any] = print, client: JobClient | None = None, poll_s: float = 2.0,
               retry_errors: bool = False) -> int:
    """Validate a job file here, submit it to the cluster at `address` once, and follow it.

    Returns the exit code: 0 when the job succeeded (now or before), or was submitted without following;
    1 when it failed or was stopped, or the cluster could not be reached; 2 for a bad job file or a credential
    about to be sent (nothing is sent then); 130 when following is interrupted (the job goes on).
    """
    job_file = Path(job_file)
    try:
        job = load_job(job_file, overrides)
    except JobError as err:
        echo(f"error: {err}")
        return 2
    root = project_root(job_file)
    relative = relative_job_file(job_file, root)
    excluded = [e for e in EXCLUDES if e.startswith("/") and f"/{relative}".startswith(e)]
    if excluded:
        echo(f"error: {job_file}: the job file lies in {excluded[0]}, which is not uploaded; move it elsewhere")
        return 2
    flags = ["--retry-errors"] if retry_errors else []
    entrypoint = build_entrypoint(job_file, root, overrides, flags)
    runtime_env = build_runtime_env(root)
    base_id = submission_id(job, job_file, overrides, flags)
    metadata = {"job_name": "internvl-batch", "job_file": relative, "task": job.task,
                "fingerprint": job.fingerprint(), "output": job.output}
    try:
        assert_no_secrets(runtime_env)
        assert_no_secrets(metadata, where="metadata")
        assert_no_secrets(entrypoint, where="entrypoint")
    except SecretError as err:
        echo(f"error: {err}")
        return 2
    for warning in _relative_path_warnings(job):
        echo(warning)

    token = None
    while True:
        try:
            client = client or (connect(address) if token is None else connect(address, token=token[0]))
            job_id = _submit_once(client, base_id, entrypoint, runtime_env, metadata, echo)
            break
        except (OSError, RuntimeError) as err:  # unreachable cluster (ConnectionError is an OSError), HTTP errors
            echo(f"error: {address}: {err}")
            return 1
        except Exception as err:  # noqa: BLE001 -- ray.exceptions.AuthenticationError without importing Ray here
            if not _is_auth_error(err):
                raise
            if token is not None:
                echo(f"error: {address}: the cluster refused the token from {token[1]}; put the cluster's own token "
                     "there (ray get-auth-token on the head node)")
                return 1
            token = find_ray_token()
            if token is None:
                echo(f"error: {address}: the cluster uses token authentication and no token was found: put the "
                     "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (or export RAY_AUTH_MODE=token with "
                     "it there)")
                return 1
            client = None  # again, with the token
    if job_id is None:
        return 0
    if not follow:
        echo(f"not following; logs: ray job logs --address {address} -f {job_id}")
        return 0
    try:
        return follow_job(client, job_id, echo=echo, poll_s=poll_s)
    except (OSError, RuntimeError) as err:
        echo(f"error: lost track of {job_id} at {address}: {err}; it may still be running")
        return 1
    except KeyboardInterrupt:
        echo(f"stopped following {job_id}; the job goes on (ray job logs --address {address} -f {job_id}, "
             f"ray job stop --address {address} {job_id})")
        return 130


def _submit_once(client: JobClient, base_id: str, entrypoint: str, runtime_env: dict, metadata: dict,
                 echo: Callable[[str], Any]) -> str | None:
    """Submit under the first free attempt id, or return the id of the same job already pending or running;
    None when the same job already succeeded on this cluster."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        job_id = base_id if attempt == 1 else f"{base_id}-{attempt}"
        status = job_status(client, job_id)
        if status is None:
            try:
                client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                                  metadata=metadata)
            except RuntimeError as err:
                if "already exists" not in str(err):
                    raise
                echo(f"{job_id} was submitted meanwhile by someone else; following it")
                return job_id
            echo(f"submitted {job_id}: {entrypoint}")
            return job_id
        if status in ACTIVE:
            echo(f"{job_id} is already {status} on this cluster; following it instead of submitting again")
            return job_id
        if status == "SUCCEEDED":
            echo(f"{job_id} already SUCCEEDED on this cluster; nothing to do (change the job file or --set to run "
                 "again)")
            return None
        echo(f"{job_id} {status} earlier; submitting a new attempt")
    raise RuntimeError(f"{MAX_ATTEMPTS} attempts of {base_id} already ran; stop and investigate")


async def _tail(client: JobClient, job_id: str, echo: Callable[[str], Any]) -> int:
    printed = 0
    async for chunk in client.tail_job_logs(job_id):
        echo(chunk.rstrip("\n"))
        printed += len(chunk)
    return printed


def follow_job(client: JobClient, job_id: str, *, echo: Callable[[str], Any] = print, poll_s: float = 2.0) -> int:
    """Stream the job's logs until it ends (polling if the stream drops); 0 if it SUCCEEDED, else 1."""
    try:
        asyncio.run(_tail(client, job_id, echo))
    except (RuntimeError, OSError) as err:
        echo(f"(log stream interrupted: {err}; polling every {poll_s:g} s)")
        _poll_logs(client, job_id, echo, poll_s)
    status = _status_name(client.get_job_status(job_id))
    while status not in TERMINAL:
        time.sleep(poll_s)
        status = _status_name(client.get_job_status(job_id))
    if status == "SUCCEEDED":
        echo(f"{job_id} SUCCEEDED")
        return 0
    # Ray's failure message repeats the log tail, already printed above: keep its first clause.
    message = getattr(client.get_job_info(job_id), "message", "") or ""
    message = message.split("\n")[0].split(", last available logs")[0]
    echo(f"{job_id} {status}" + (f": {message}" if message else ""))
    return 1


def _poll_logs(client: JobClient, job_id: str, echo: Callable[[str], Any], poll_s: float) -> None:
    """Print the log as it grows until the job ends (after a dropped stream the log is printed from the start)."""
    seen = 0
    while True:
        status = _status_name(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            echo(logs[seen:].rstrip("\n"))
            seen = len(logs)
        if status in TERMINAL:
            return
        time.sleep(poll_s)
