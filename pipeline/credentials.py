"""What counts as a credential: the one rule the job file (`storage`), `submit` (runtime env, entrypoint) and the
cluster-manifest checks (tools/check_manifests.py) apply. Credentials come only from the AWS chain or a Secret."""

from __future__ import annotations

import re
from typing import Any

# s3fs / botocore option names that carry a credential (s3fs calls the access key id `key`).
CREDENTIAL_OPTIONS = frozenset({"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                                "password", "access_key", "secret_key", "session_token"})


def is_credential_key(name: str) -> bool:
    """Whether an option or variable name names a credential (`secret`, `AWS_SECRET_ACCESS_KEY`, `HF_TOKEN`, `key`)."""
    return name.lower() in CREDENTIAL_OPTIONS or bool(CREDENTIAL_NAME.search(name))


# A key that names a credential: AWS_SECRET_ACCESS_KEY, HF_TOKEN, DB_PASSWORD, password, ... (not secretName).
CREDENTIAL_NAME = re.compile(
    r"(^|[_-])(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|ACCESS[_-]KEY|SECRET[_-]KEY|API[_-]KEY)([_-]|$)",
    re.IGNORECASE)
CREDENTIAL_VALUES = (
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"), "a URL with a password"),
    (re.compile(r"\b[A-Z0-9_]*(SECRET|TOKEN|PASSWORD)[A-Z0-9_]*=(?![\s'\"]*\$)['\"]?[^\s'\"]", re.IGNORECASE),
     "a credential assignment"),
    (re.compile(r"--(aws-)?(secret|password|token)[-_a-z]*[= ](?!\$)\S", re.IGNORECASE), "a credential option"),
)
# The shape of an AWS secret access key: 40 base64 characters mixing cases and digits (a git sha has no capitals).
SECRET_SHAPE = re.compile(r"(?=.*[A-Z])(?=.*[a-z])(?=.*[0-9])[A-Za-z0-9/+]{40}")


def credential_in(value: str, known: tuple[str, ...] = ()) -> str | None:
    """What credential a string seems to hold, or None."""
    for secret in known:
        if len(secret) >= 8 and secret in value:
            return "the value of a credential in this environment"
    if SECRET_SHAPE.fullmatch(value):
        return "a string shaped like an AWS secret access key"
    for pattern, what in CREDENTIAL_VALUES:
        if pattern.search(value):
            return what
    return None


def find_credentials(obj: Any, where: str = "", known: tuple[str, ...] = ()) -> list[str]:
    """Literal credentials anywhere in a parsed document: keys naming one with a value, Kubernetes env entries
    (`name: AWS_SECRET_ACCESS_KEY, value: ...`; `valueFrom` a Secret is fine) and values shaped like one."""
    found: list[str] = []
    if isinstance(obj, dict):
        name = obj.get("name")
        literal = obj.get("value")
        if isinstance(name, str) and CREDENTIAL_NAME.search(name) and isinstance(literal, str) and literal:
            found.append(f"{where}: env {name} has a literal value; take it from a Secret (valueFrom/envFrom) "
                         "or a role")
        for key, value in obj.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and CREDENTIAL_NAME.search(key) and isinstance(value, (str, int)) and value != "":
                found.append(f"{path}: {key} holds a literal value; credentials come from a Secret or a role")
            found += find_credentials(value, path, known)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            found += find_credentials(value, f"{where}[{i}]", known)
    elif isinstance(obj, str):
        what = credential_in(obj, known)
        if what:
            found.append(f"{where or '(value)'}: looks like {what}; credentials never go in manifests or runtime envs")
    return found


def is_missing_credentials(err: BaseException) -> bool:
    """botocore's NoCredentialsError (by name: no botocore import here), directly or as the cause of `err`."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return True
        err = err.__cause__ or err.__context__
    return False


def missing_credentials_message(env: dict[str, str] | None = None) -> str:
    """Where the AWS chain looked (in its order) when it found no credentials, for the error a run exits with."""
    import os

    env = dict(os.environ if env is None else env)
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    places = [
        "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, with AWS_SESSION_TOKEN for temporary keys: "
        + ("set, but incomplete" if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SECRET_ACCESS_KEY") else "not set")
        + ")",
        f"profile {profile!r} in {env.get('AWS_SHARED_CREDENTIALS_FILE', '~/.aws/credentials')} and "
        f"{env.get('AWS_CONFIG_FILE', '~/.aws/config')} (AWS_PROFILE picks another), including SSO, web identity "
        "(AWS_WEB_IDENTITY_TOKEN_FILE, e.g. EKS IRSA) and credential_process",
        "a container role (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI / _FULL_URI, e.g. ECS)",
        "the instance role (EC2 instance metadata" + (", switched off by AWS_EC2_METADATA_DISABLED)"
                                                      if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
                                                      else ")"),
    ]
    return ("no AWS credentials found: the AWS chain looked in " + "; ".join(f"({i}) {p}" for i, p in
                                                                      enumerate(places, 1))
            + ". Provide them in one of those places (never in the job file)")
