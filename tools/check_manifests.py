"""Cluster-manifest linter (a development tool, not part of the package): `python tools/check_manifests.py cluster/`.

Offline checks of the cluster manifests: KubeRay kinds against their CRDs made strict, plain Kubernetes objects
against small strict schemas, the Ray cluster-launcher YAML against Ray's own schema, and the rules no schema states.

Kubernetes silently prunes unknown fields of a custom resource, so a typo (`rayStartParam`) is dropped without a
word and the cluster comes up different from what was written; these checks reject it, naming the field.
Pure functions over parsed YAML: nothing here talks to a cluster.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator, FormatChecker
from jsonschema.exceptions import ValidationError

from pipeline.credentials import find_credentials

CRDS_ENV = "KUBERAY_CRDS"
RAY_GROUP = "ray.io"
RAY_API_VERSION = "ray.io/v1"
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
GPU_RESOURCE = "nvidia.com/gpu"
# KubeRay's own limits (ray-operator utils): a RayJob's cluster is named <rayjob>-<6 chars>.
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = 47
# RayCronJob children are named <raycronjob>-<suffix>; a conservative bound keeps them within MAX_RAYJOB_NAME.
MAX_RAYCRONJOB_NAME = 36
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# --------------------------------------------------------------------------------------------------- strict schemas

_SCHEMA_MAPS = ("properties", "patternProperties", "definitions", "$defs")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SCHEMA_ONE = ("additionalProperties", "items", "additionalItems", "not", "if", "then", "else", "contains",
               "propertyNames")


def strict_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 (CRD) schema as plain JSON Schema that rejects unknown fields.

    Every object schema with `properties` gets `additionalProperties: false` unless it sets its own or says
    `x-kubernetes-preserve-unknown-fields: true`; `x-kubernetes-int-or-string` becomes integer-or-string,
    `nullable` admits null, and `x-kubernetes-embedded-resource` admits apiVersion, kind and metadata.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if key in out:
            sub = out[key]
            out[key] = [strict_schema(s) for s in sub] if isinstance(sub, list) else strict_schema(sub)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-embedded-resource") and "properties" in out:
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}, **out["properties"]}
    open_by_design = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not open_by_design:
        out["additionalProperties"] = False
    return out


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
# The ObjectMeta fields a manifest author writes; a CRD's root `metadata` is only `type: object`.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": _STRINGS,
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


def _int_format(bits: int):
    def check(value: Any) -> bool:
        return not isinstance(value, int) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)

    return check


FORMATS = FormatChecker(formats=())
FORMATS.checks("int32")(_int_format(32))
FORMATS.checks("int64")(_int_format(64))


def _error_path(error: ValidationError) -> str:
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _describe(error: ValidationError) -> str:
    """One line per schema error, naming the field and, for unknown ones, the valid fields beside it."""
    where = _error_path(error)
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = set(error.schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in known and not any(
            re.search(p, k) for p in error.schema.get("patternProperties", {})))
        names = ", ".join(repr(k) for k in unknown)
        return f"{where}: unknown field {names}; valid fields here: {', '.join(sorted(known))}"
    if error.validator == "required":
        return f"{where}: {error.message.replace(' is a required property', '')} is required"
    message = error.message if len(error.message) <= 240 else error.message[:237] + "..."
    return f"{where}: {message}"


def schema_errors(doc: Any, schema: dict) -> list[str]:
    """Every way `doc` breaks `schema` (JSON Schema draft 7), one line each, sorted by field."""
    validator = Draft7Validator(schema, format_checker=FORMATS)
    return sorted(_describe(e) for e in validator.iter_errors(doc))


# --------------------------------------------------------------------------------------------------- KubeRay CRDs


def find_crd_dir(repo_root: Path | None = None) -> Path | None:
    """The KubeRay CRD folder: $KUBERAY_CRDS, else ../shared/kuberay-crds beside the repository; None if absent."""
    if os.environ.get(CRDS_ENV):
        path = Path(os.environ[CRDS_ENV])
    else:
        path = (repo_root or Path(__file__).resolve().parents[1]).parent / "shared" / "kuberay-crds"
    return path if path.is_dir() and any(path.glob("*.yaml")) else None


@functools.lru_cache(maxsize=8)
def _crds(crd_dir: str) -> dict[tuple[str, str], dict]:
    """(group, kind) -> CustomResourceDefinition, for every CRD in the folder."""
    crds = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds[(doc["spec"]["group"], doc["spec"]["names"]["kind"])] = doc
    return crds


@functools.lru_cache(maxsize=16)
def crd_schema(crd_dir: str, kind: str, version: str = "v1") -> dict:
    """The strict schema of a ray.io kind at a version, with a strict ObjectMeta as its root metadata."""
    crd = _crds(crd_dir).get((RAY_GROUP, kind))
    if crd is None:
        raise KeyError(f"no CRD for kind {kind!r} in {crd_dir}")
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version and entry.get("served", True):
            schema = strict_schema(entry["schema"]["openAPIV3Schema"])
            schema["properties"] = {**schema["properties"], "metadata": OBJECT_META}
            return schema
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served", True)]
    raise KeyError(f"CRD {kind} serves no version {version!r} (served: {', '.join(served)})")


def validate_kuberay(doc: dict, crd_dir: str | Path) -> list[str]:
    """Schema errors of a RayCluster / RayJob / RayCronJob against its CRD made strict (unknown fields rejected)."""
    kind = doc.get("kind")
    api_version = str(doc.get("apiVersion", ""))
    group, _, version = api_version.partition("/")
    if group != RAY_GROUP or not version:
        return [f"apiVersion: expected {RAY_GROUP}/<version> for kind {kind}, got {api_version!r}"]
    try:
        schema = crd_schema(str(crd_dir), str(kind), version)
    except KeyError as err:
        return [f"kind: {err.args[0]}"]
    return [f"{_label(doc)}: {e}" for e in schema_errors(doc, schema)]


def _label(doc: dict) -> str:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return f"{doc.get('kind', '?')}/{meta.get('name') or meta.get('generateName') or '?'}"


# --------------------------------------------------------------------------------------------------- plain Kubernetes


def _obj(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


_INT = {"type": "integer"}
_POLICY_RULE = _obj({"apiGroups": _STRINGS, "resources": _STRINGS, "verbs": _STRINGS, "resourceNames": _STRINGS,
                     "nonResourceURLs": _STRINGS}, ("verbs",))
_SUBJECT = _obj({"kind": {"enum": ["ServiceAccount", "User", "Group"]}, "name": {"type": "string"},
                 "namespace": {"type": "string"}, "apiGroup": {"type": "string"}}, ("kind", "name"))
_ROLE_REF = _obj({"apiGroup": {"const": "rbac.authorization.k8s.io"}, "kind": {"enum": ["Role", "ClusterRole"]},
                  "name": {"type": "string"}}, ("apiGroup", "kind", "name"))


def _job_spec(pod_template: dict) -> dict:
    return _obj({
        "template": pod_template, "parallelism": _INT, "completions": _INT, "activeDeadlineSeconds": _INT,
        "backoffLimit": _INT, "backoffLimitPerIndex": _INT, "maxFailedIndexes": _INT, "ttlSecondsAfterFinished": _INT,
        "completionMode": {"enum": ["NonIndexed", "Indexed"]}, "suspend": {"type": "boolean"},
        "podReplacementPolicy": {"enum": ["TerminatingOrFailed", "Failed"]}, "manualSelector": {"type": "boolean"},
        "selector": {"type": "object"}, "podFailurePolicy": {"type": "object"}, "successPolicy": {"type": "object"},
        "managedBy": {"type": "string"},
    }, ("template",))


def k8s_schema(kind: str, pod_template: dict | None = None) -> dict | None:
    """A strict schema for the plain Kubernetes kinds these manifests use; None for other kinds.

    `pod_template` is the PodTemplateSpec schema to embed in a CronJob (the strict one from the RayCluster CRD
    when it is at hand, so a typo inside the pod spec is caught too); without it the pod template is not checked.
    """
    pod_template = pod_template or {"type": "object"}
    head = {"apiVersion": {"type": "string"}, "kind": {"const": kind}, "metadata": OBJECT_META}
    schemas = {
        "ServiceAccount": {"automountServiceAccountToken": {"type": "boolean"},
                           "imagePullSecrets": {"type": "array", "items": _obj({"name": {"type": "string"}})},
                           "secrets": {"type": "array", "items": {"type": "object"}}},
        "ConfigMap": {"data": _STRING_MAP, "binaryData": _STRING_MAP, "immutable": {"type": "boolean"}},
        "Role": {"rules": {"type": "array", "items": _POLICY_RULE}},
        "RoleBinding": {"subjects": {"type": "array", "items": _SUBJECT}, "roleRef": _ROLE_REF},
        "CronJob": {"spec": _obj({
            "schedule": {"type": "string"}, "timeZone": {"type": "string"}, "startingDeadlineSeconds": _INT,
            "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]}, "suspend": {"type": "boolean"},
            "successfulJobsHistoryLimit": _INT, "failedJobsHistoryLimit": _INT,
            "jobTemplate": _obj({"metadata": OBJECT_META, "spec": _job_spec(pod_template)}, ("spec",)),
        }, ("schedule", "jobTemplate"))},
    }
    if kind not in schemas:
        return None
    required = ("apiVersion", "kind", "metadata") + (("roleRef",) if kind == "RoleBinding" else ()) + (
        ("spec",) if kind == "CronJob" else ())
    return _obj({**head, **schemas[kind]}, required)


K8S_API_VERSIONS = {"ServiceAccount": "v1", "ConfigMap": "v1", "Role": "rbac.authorization.k8s.io/v1",
                    "RoleBinding": "rbac.authorization.k8s.io/v1", "CronJob": "batch/v1"}


def pod_template_schema(crd_dir: str | Path | None) -> dict | None:
    """The strict PodTemplateSpec schema that the RayCluster CRD embeds (core/v1), or None without CRDs."""
    if crd_dir is None:
        return None
    return crd_schema(str(crd_dir), "RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"][
        "properties"]["template"]


def validate_k8s(doc: dict, crd_dir: str | Path | None = None) -> list[str]:
    """Schema errors of a plain Kubernetes object (ServiceAccount, ConfigMap, Role, RoleBinding, CronJob)."""
    kind = str(doc.get("kind"))
    schema = k8s_schema(kind, pod_template_schema(crd_dir))
    if schema is None:
        return [f"kind: {kind!r} is not one these checks know ({', '.join(sorted(K8S_API_VERSIONS))})"]
    errors = [f"{_label(doc)}: {e}" for e in schema_errors(doc, schema)]
    if doc.get("apiVersion") != K8S_API_VERSIONS[kind]:
        errors.append(f"{_label(doc)}: apiVersion: expected {K8S_API_VERSIONS[kind]!r} for {kind}, "
                      f"got {doc.get('apiVersion')!r}")
    return errors


# --------------------------------------------------------------------------------------------------- launcher


def ray_schema_path() -> Path:
    """ray/autoscaler/ray-schema.json of the installed Ray, found without importing Ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ray is not installed; its autoscaler/ray-schema.json is needed")
    return Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"


@functools.lru_cache(maxsize=1)
def launcher_schema() -> dict:
    """Ray's cluster-launcher schema, made strict where it leaves objects open by omission."""
    import json

    return strict_schema(json.loads(ray_schema_path().read_text()))


def validate_launcher(doc: dict) -> list[str]:
    """Schema errors of a Ray cluster-launcher YAML against the installed Ray's ray-schema.json."""
    return [f"launcher: {e}" for e in schema_errors(doc, launcher_schema())]


# --------------------------------------------------------------------------------------------------- cron

_CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
                ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
                ("day of week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")))
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def _cron_value(text: str, low: int, names: tuple[str, ...]) -> int | None:
    if text.upper() in names:
        return names.index(text.upper()) + low
    return int(text) if text.isdigit() else None


def cron_errors(expr: Any) -> list[str]:
    """Problems of a standard 5-field cron schedule (minute hour day-of-month month day-of-week) or descriptor."""
    if not isinstance(expr, str) or not expr.strip():
        return ["schedule must be a non-empty string"]
    if "TZ" in expr:
        return ["schedule must not carry TZ= or CRON_TZ=; use the timeZone field"]
    if expr.strip().startswith("@"):
        return [] if expr.strip() in CRON_DESCRIPTORS else [f"unknown descriptor {expr.strip()!r}"]
    fields = expr.split()
    if len(fields) != 5:
        return [f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}: {expr!r}"]
    errors = []
    for text, (label, low, high, names) in zip(fields, _CRON_FIELDS):
        for item in text.split(","):
            base, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                errors.append(f"{label}: bad step in {item!r}")
            if base in ("*", "?"):
                if base == "?" and label not in ("day of month", "day of week"):
                    errors.append(f"{label}: '?' is only for day of month or day of week")
                continue
            bounds = [_cron_value(part, low, names) for part in base.split("-", 1)]
            if any(b is None or not low <= b <= high for b in bounds) or (len(bounds) == 2 and bounds[0] > bounds[1]):
                errors.append(f"{label}: {item!r} is not within {low}-{high}")
    return errors


# --------------------------------------------------------------------------------------------------- rules


def _containers(template: Any) -> list[dict]:
    spec = template.get("spec", {}) if isinstance(template, dict) else {}
    return [c for c in spec.get("containers") or [] if isinstance(c, dict)]


def _gpu_limit(container: dict) -> Any:
    return ((container.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE)


@functools.lru_cache(maxsize=1)
def ray_start_options() -> frozenset[str] | None:
    """The long options of the installed `ray start` (what rayStartParams keys become), or None if unavailable."""
    try:
        from ray.scripts.scripts import start
    except Exception:  # noqa: BLE001 -- Ray's CLI needs optional extras on some installs; the check is then skipped
        return None
    return frozenset(opt[2:] for param in start.params for opt in param.opts if opt.startswith("--"))


def _group_rules(group: dict, where: str, *, head: bool) -> list[str]:
    errors = []
    params = group.get("rayStartParams") or {}
    options = ray_start_options()
    for key in params if isinstance(params, dict) else ():
        if options is not None and key not in options:
            errors.append(f"{where}.rayStartParams.{key}: not a `ray start` option")
    for key in ("address", "block", "head", "redis-username"):
        if key in params:
            errors.append(f"{where}.rayStartParams.{key}: KubeRay sets or forbids this itself")
    containers = _containers(group.get("template"))
    if not containers:
        errors.append(f"{where}.template.spec.containers: at least one container is required")
    for i, container in enumerate(containers):
        resources = container.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        if GPU_RESOURCE in requests and str(requests[GPU_RESOURCE]) != str(limits.get(GPU_RESOURCE)):
            errors.append(f"{where}.template.spec.containers[{i}].resources: {GPU_RESOURCE} requests must equal limits")
        if i == 0 and not {"cpu", "memory"} <= set(limits):
            errors.append(f"{where}.template.spec.containers[0].resources.limits: set cpu and memory so Ray sizes "
                          "the node from the pod, not from the machine")
    if head and str(params.get("num-cpus")) != "0":
        errors.append(f"{where}.rayStartParams.num-cpus: must be \"0\": the head runs the GCS, the dashboard and "
                      "the drivers, and takes no tasks")
    return errors


def _is_gpu_group(group: dict) -> bool:
    name = str(group.get("groupName", "")).lower()
    return "gpu" in name or any(_gpu_limit(c) is not None for c in _containers(group.get("template")))


def _image_tag_rules(spec: dict, where: str) -> list[str]:
    version = str(spec.get("rayVersion", ""))
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})] + [
        (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    errors = []
    for label, group in groups:
        for i, container in enumerate(_containers(group.get("template"))):
            image = str(container.get("image", ""))
            if image.startswith("rayproject/ray") and version and not image.partition(":")[2].startswith(version):
                errors.append(f"{where}.{label}.template.spec.containers[{i}].image: {image!r} does not match "
                              f"rayVersion {version!r}")
    return errors


def cluster_spec_rules(spec: Any, where: str = "spec") -> list[str]:
    """RayCluster spec rules: head takes no work, worker sizes, GPU groups with limits and a toleration."""
    if not isinstance(spec, dict):
        return [f"{where}: must be a mapping"]
    head = spec.get("headGroupSpec") or {}
    errors = _group_rules(head, f"{where}.headGroupSpec", head=True)
    if "rayVersion" not in spec:
        errors.append(f"{where}.rayVersion: set it to the Ray version of the image")
    names = set()
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        at = f"{where}.workerGroupSpecs[{i}]"
        errors += _group_rules(group, at, head=False)
        name = group.get("groupName")
        if name in names:
            errors.append(f"{at}.groupName: {name!r} is used twice")
        names.add(name)
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", low)
        if isinstance(low, int) and isinstance(high, int) and isinstance(replicas, int) and not low <= replicas <= high:
            errors.append(f"{at}: need minReplicas <= replicas <= maxReplicas, got {low} <= {replicas} <= {high}")
        if autoscaling and group.get("suspend"):
            errors.append(f"{at}.suspend: a worker group cannot be suspended with autoscaling enabled")
        if _is_gpu_group(group):
            containers = _containers(group.get("template"))
            if not containers or _gpu_limit(containers[0]) in (None, 0, "0"):
                errors.append(f"{at}.template.spec.containers[0].resources.limits: a GPU group needs {GPU_RESOURCE}")
            tolerations = (group.get("template") or {}).get("spec", {}).get("tolerations") or []
            if not any(t.get("key") == GPU_RESOURCE for t in tolerations if isinstance(t, dict)):
                errors.append(f"{at}.template.spec.tolerations: a GPU group should tolerate the {GPU_RESOURCE} taint")
    return errors + _image_tag_rules(spec, where)


RUNTIME_ENV_FIELDS = {"working_dir", "py_modules", "py_executable", "pip", "uv", "conda", "container", "image_uri",
                      "env_vars", "excludes", "config", "java_jars", "nsight", "rocprof_sys", "mpi",
                      "worker_process_setup_hook", "_ray_commit", "_inject_current_ray"}


def _mount_covers(container: dict, path: str) -> bool:
    return any(path == m.get("mountPath") or path.startswith(str(m.get("mountPath", "")).rstrip("/") + "/")
               for m in container.get("volumeMounts") or [] if isinstance(m, dict))


def job_spec_rules(spec: Any, where: str = "spec") -> list[str]:
    """RayJob spec rules (KubeRay's own validation, plus ours): TTL needs shutdown, modes, the entrypoint's files."""
    if not isinstance(spec, dict):
        return [f"{where}: must be a mapping"]
    errors = []
    mode = spec.get("submissionMode", "K8sJobMode")
    shutdown = spec.get("shutdownAfterJobFinishes") is True
    if mode not in SUBMISSION_MODES:
        errors.append(f"{where}.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if isinstance(ttl, int) and ttl < 0:
        errors.append(f"{where}.ttlSecondsAfterFinished: must not be negative")
    if isinstance(ttl, int) and ttl > 0 and not shutdown:
        errors.append(f"{where}.ttlSecondsAfterFinished: only valid with shutdownAfterJobFinishes: true")
    if spec.get("suspend") and not shutdown:
        errors.append(f"{where}.suspend: a RayJob can be suspended only with shutdownAfterJobFinishes: true")
    selector, cluster = spec.get("clusterSelector"), spec.get("rayClusterSpec")
    if not selector and cluster is None:
        errors.append(f"{where}: one of rayClusterSpec or clusterSelector must be set")
    if selector and cluster is not None:
        errors.append(f"{where}: rayClusterSpec and clusterSelector exclude each other")
    if selector and shutdown:
        errors.append(f"{where}.shutdownAfterJobFinishes: cannot shut down a cluster picked by clusterSelector")
    if mode == "InteractiveMode" and isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] > 0:
        errors.append(f"{where}.backoffLimit: incompatible with InteractiveMode")
    if mode == "SidecarMode" and ("submitterPodTemplate" in spec or "submitterConfig" in spec):
        errors.append(f"{where}: SidecarMode supports neither submitterPodTemplate nor submitterConfig")
    if mode != "InteractiveMode" and not str(spec.get("entrypoint", "")).strip():
        errors.append(f"{where}.entrypoint: required unless submissionMode is InteractiveMode")
    for key, low in (("activeDeadlineSeconds", 1), ("backoffLimit", 0)):
        if isinstance(spec.get(key), int) and spec[key] < low:
            errors.append(f"{where}.{key}: must be >= {low}")
    errors += _runtime_env_rules(spec.get("runtimeEnvYAML"), f"{where}.runtimeEnvYAML")
    if isinstance(cluster, dict):
        errors += cluster_spec_rules(cluster, f"{where}.rayClusterSpec")
        errors += _entrypoint_file_rules(spec, cluster, where)
    return errors


def _runtime_env_rules(text: Any, where: str) -> list[str]:
    if text is None:
        return []
    try:
        env = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError as err:
        return [f"{where}: not valid YAML: {err}"]
    if not isinstance(env, dict):
        return [f"{where}: must be a YAML mapping of runtime_env fields"]
    valid = ", ".join(sorted(k for k in RUNTIME_ENV_FIELDS if not k.startswith("_")))
    errors = [f"{where}.{k}: not a runtime_env field (valid: {valid})" for k in env if k not in RUNTIME_ENV_FIELDS]
    errors += [f"{where}: {e}" for e in find_credentials(env)]
    if isinstance(env.get("working_dir"), str) and "://" not in env["working_dir"]:
        errors.append(f"{where}.working_dir: on Kubernetes it must be a remote URI (s3://, gs://, https://...zip)")
    return errors


def _entrypoint_file_rules(spec: dict, cluster: dict, where: str) -> list[str]:
    """Absolute .yaml/.yml paths in the entrypoint must be mounted into the head, where the driver runs."""
    containers = _containers((cluster.get("headGroupSpec") or {}).get("template"))
    paths = re.findall(r"(?<![\w$:/.])(/[\w./-]+\.ya?ml)\b", str(spec.get("entrypoint", "")))
    return [f"{where}.entrypoint: {path} is not under any volumeMount of the head container, where the driver runs"
            for path in paths if containers and not _mount_covers(containers[0], path)]


def _name_rules(doc: dict) -> list[str]:
    kind, meta = doc.get("kind"), doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name, generate = meta.get("name"), meta.get("generateName")
    if not name and not generate:
        return [f"{_label(doc)}: metadata.name (or generateName) is required"]
    limit = {"RayCluster": MAX_RAYCLUSTER_NAME, "RayJob": MAX_RAYJOB_NAME, "RayCronJob": MAX_RAYCRONJOB_NAME,
             "CronJob": 52}.get(str(kind), 253)
    pattern = DNS1035_LABEL if kind in ("RayCluster", "RayJob", "RayCronJob") else DNS1123_SUBDOMAIN
    if name and (len(name) > limit or not pattern.match(name)):
        return [f"{_label(doc)}: metadata.name {name!r} must match {pattern.pattern} and be at most {limit} characters"]
    if generate and not name and (len(generate) + 5 > limit or not pattern.match(generate.rstrip("-"))):
        return [f"{_label(doc)}: metadata.generateName {generate!r} leaves no room for its 5-character suffix "
                f"within {limit} characters, or is not a valid name prefix"]
    return []


def launcher_rules(doc: dict) -> list[str]:
    """Ray cluster-launcher rules: an on-demand head that takes no work, spot GPU workers, sane worker counts."""
    errors = []
    types = doc.get("available_node_types") or {}
    head_type = doc.get("head_node_type")
    if head_type not in types:
        errors.append(f"launcher: head_node_type: {head_type!r} is not one of available_node_types "
                      f"({', '.join(types)})")
    else:
        head = types[head_type]
        if (head.get("resources") or {}).get("CPU") != 0:
            errors.append(f"launcher: available_node_types.{head_type}.resources: set CPU: 0 so the head takes no work")
        if "InstanceMarketOptions" in (head.get("node_config") or {}):
            errors.append(f"launcher: available_node_types.{head_type}.node_config: the head must be on-demand, "
                          "a reclaimed spot head ends the whole cluster")
    provider = doc.get("provider") or {}
    if provider.get("type") == "aws":
        known = set(launcher_schema()["properties"]["provider"]["properties"])
        errors += [f"launcher: provider.{k}: unknown provider field; valid: {', '.join(sorted(known))}"
                   for k in provider if k not in known]
    total_min = 0
    for name, node in types.items():
        at = f"launcher: available_node_types.{name}"
        low, high = node.get("min_workers", 0), node.get("max_workers", doc.get("max_workers", 2))
        total_min += low if name != head_type else 0
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append(f"{at}: min_workers {low} exceeds max_workers {high}")
        if provider.get("type") == "aws":
            errors += _aws_node_rules(node.get("node_config") or {}, node.get("resources") or {}, at)
    if isinstance(doc.get("max_workers"), int) and total_min > doc["max_workers"]:
        errors.append(f"launcher: max_workers {doc['max_workers']} is below the sum of min_workers ({total_min})")
    return errors


# The parameters of EC2 RunInstances that Ray passes through, plus Ray's own SubnetIds.
EC2_NODE_CONFIG = {
    "AdditionalInfo", "BlockDeviceMappings", "CapacityReservationSpecification", "CpuOptions", "CreditSpecification",
    "DisableApiStop", "DisableApiTermination", "EbsOptimized", "EnclaveOptions", "HibernationOptions",
    "IamInstanceProfile", "ImageId", "InstanceInitiatedShutdownBehavior", "InstanceMarketOptions", "InstanceType",
    "Ipv6AddressCount", "Ipv6Addresses", "KernelId", "KeyName", "LaunchTemplate", "LicenseSpecifications",
    "MaintenanceOptions", "MetadataOptions", "Monitoring", "NetworkInterfaces", "Placement", "PrivateDnsNameOptions",
    "PrivateIpAddress", "RamdiskId", "SecurityGroupIds", "SecurityGroups", "SubnetId", "SubnetIds",
    "TagSpecifications", "UserData",
}
SPOT_OPTIONS = {"MaxPrice", "SpotInstanceType", "BlockDurationMinutes", "ValidUntil", "InstanceInterruptionBehavior"}
# GPUs per instance for the types these recipes name, to catch a `GPU:` resource that disagrees with the hardware.
AWS_GPUS = {"g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.16xlarge": 1, "g5.12xlarge": 4,
            "g5.24xlarge": 4, "g5.48xlarge": 8, "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8}


def _aws_node_rules(config: dict, resources: dict, where: str) -> list[str]:
    errors = [f"{where}.node_config.{k}: not an EC2 RunInstances parameter" for k in config if k not in EC2_NODE_CONFIG]
    market = config.get("InstanceMarketOptions")
    if isinstance(market, dict):
        if market.get("MarketType") != "spot":
            errors.append(f"{where}.node_config.InstanceMarketOptions.MarketType: must be 'spot'")
        errors += [f"{where}.node_config.InstanceMarketOptions.SpotOptions.{k}: not a SpotOptions field"
                   for k in market.get("SpotOptions") or {} if k not in SPOT_OPTIONS]
        errors += [f"{where}.node_config.InstanceMarketOptions.{k}: unknown field"
                   for k in market if k not in ("MarketType", "SpotOptions")]
    gpus = AWS_GPUS.get(str(config.get("InstanceType")))
    if gpus is not None and resources.get("GPU") not in (None, gpus):
        errors.append(f"{where}.resources.GPU: {config['InstanceType']} has {gpus} GPU(s), not {resources['GPU']}")
    return errors


def check_rules(doc: Any) -> list[str]:
    """The rules no schema states, for any supported document: names, cross-field rules, cron, credentials."""
    if not isinstance(doc, dict):
        return ["document: must be a mapping"]
    errors = [f"{_label(doc) if 'kind' in doc else 'launcher'}: {e}" for e in find_credentials(doc)]
    kind = doc.get("kind")
    if kind is None and "provider" in doc:
        return errors + launcher_rules(doc)
    errors += _name_rules(doc)
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    if str(doc.get("apiVersion", "")).startswith(RAY_GROUP) and doc.get("apiVersion") != RAY_API_VERSION:
        errors.append(f"{_label(doc)}: apiVersion: use {RAY_API_VERSION} ({doc.get('apiVersion')} is deprecated)")
    if kind == "RayCluster":
        errors += [f"{_label(doc)}: {e}" for e in cluster_spec_rules(spec)]
    elif kind == "RayJob":
        errors += [f"{_label(doc)}: {e}" for e in job_spec_rules(spec)]
    elif kind in ("RayCronJob", "CronJob"):
        errors += [f"{_label(doc)}: spec.schedule: {e}" for e in cron_errors(spec.get("schedule"))]
        zone = spec.get("timeZone")
        if zone is not None and not _valid_zone(zone):
            errors.append(f"{_label(doc)}: spec.timeZone: {zone!r} is not an IANA time zone")
        if kind == "RayCronJob":
            template = spec.get("jobTemplate") or {}
            errors += [f"{_label(doc)}: {e}" for e in job_spec_rules(template, "spec.jobTemplate")]
            if template.get("shutdownAfterJobFinishes") is not True:
                errors.append(f"{_label(doc)}: spec.jobTemplate.shutdownAfterJobFinishes: must be true, or every "
                              "scheduled run leaves a cluster behind")
        else:
            errors += _cronjob_rules(doc, spec)
    elif kind == "RoleBinding":
        if not doc.get("subjects"):
            errors.append(f"{_label(doc)}: subjects: bind at least one subject")
    return errors


def _valid_zone(zone: Any) -> bool:
    try:
        zoneinfo.ZoneInfo(str(zone))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return bool(zone)


def _cronjob_rules(doc: dict, spec: dict) -> list[str]:
    pod = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
    errors = []
    if not _containers(pod):
        errors.append(f"{_label(doc)}: spec.jobTemplate.spec.template.spec.containers: at least one container")
    restart = (pod.get("spec") or {}).get("restartPolicy")
    if restart not in ("OnFailure", "Never"):
        errors.append(f"{_label(doc)}: spec.jobTemplate.spec.template.spec.restartPolicy: a Job's pods need "
                      f"OnFailure or Never, got {restart!r}")
    return errors


# --------------------------------------------------------------------------------------------------- files


def iter_documents(path: str | Path) -> Iterator[dict]:
    """The non-empty YAML documents of a file."""
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if doc is not None:
            yield doc


def validate_document(doc: Any, crd_dir: str | Path | None) -> list[str]:
    """Schema errors plus rule errors of one document of any supported kind (launcher, KubeRay, plain Kubernetes)."""
    if not isinstance(doc, dict):
        return ["document: must be a mapping"]
    kind = doc.get("kind")
    if kind is None and "provider" in doc:
        errors = validate_launcher(doc)
    elif str(doc.get("apiVersion", "")).startswith(RAY_GROUP + "/"):
        if crd_dir is None:
            return [f"{_label(doc)}: no KubeRay CRDs to validate against (set {CRDS_ENV})"]
        errors = validate_kuberay(doc, crd_dir)
    elif kind == "Secret":
        return [f"{_label(doc)}: Secrets are never written in manifests; create them with kubectl create secret"]
    else:
        errors = validate_k8s(doc, crd_dir)
    errors += check_rules(doc)
    if kind == "ConfigMap":
        errors += _embedded_errors(doc, crd_dir)
    return errors


def _embedded_errors(config_map: dict, crd_dir: str | Path | None) -> list[str]:
    """ConfigMap entries that are manifests or internvl-batch job files are checked like files of their own."""
    from pipeline.config import parse_job
    from pipeline.errors import JobError

    errors = []
    for key, text in (config_map.get("data") or {}).items():
        if not str(key).endswith((".yaml", ".yml")):
            continue
        where = f"{_label(config_map)}: data.{key}"
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as err:
            errors.append(f"{where}: not valid YAML: {err}")
            continue
        for doc in docs:
            if isinstance(doc, dict) and "kind" in doc:
                errors += [f"{where}: {e}" for e in validate_document(doc, crd_dir)]
            elif isinstance(doc, dict) and "task" in doc:
                try:
                    parse_job(doc, source=where)
                except JobError as err:
                    errors.append(str(err))
    return errors


def _references(doc: dict) -> Iterator[tuple[str, str, str]]:
    """(kind, name, where) of the ServiceAccounts and ConfigMaps that pod templates in a document refer to."""
    def walk(node: Any, where: str) -> Iterator[tuple[str, str, str]]:
        if isinstance(node, dict):
            if isinstance(node.get("serviceAccountName"), str):
                yield "ServiceAccount", node["serviceAccountName"], f"{where}.serviceAccountName"
            config_map = node.get("configMap")
            if isinstance(config_map, dict) and isinstance(config_map.get("name"), str) and \
                    not config_map.get("optional"):
                yield "ConfigMap", config_map["name"], f"{where}.configMap"
            for key, value in node.items():
                yield from walk(value, f"{where}.{key}" if where else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{where}[{i}]")

    yield from walk(doc, "")


def reference_errors(docs: list[dict]) -> list[str]:
    """ServiceAccounts and ConfigMaps referred to in a file must be defined in it (each file is self-contained;
    Secrets are the exception: they are created out of band and never written in a manifest)."""
    defined = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in docs if isinstance(d, dict)}
    roles = {name for kind, name in defined if kind == "Role"}
    errors = [f"{_label(doc)}: {where}: {kind} {name!r} is not defined in this file"
              for doc in docs if isinstance(doc, dict) for kind, name, where in _references(doc)
              if (kind, name) not in defined]
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "RoleBinding":
            ref = doc.get("roleRef") or {}
            if ref.get("kind") == "Role" and ref.get("name") not in roles:
                errors.append(f"{_label(doc)}: roleRef: Role {ref.get('name')!r} is not defined in this file")
            for subject in doc.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount" and ("ServiceAccount", subject.get("name")) not in defined:
                    errors.append(f"{_label(doc)}: subjects: ServiceAccount {subject.get('name')!r} is not defined "
                                  "in this file")
    return errors


def validate_file(path: str | Path, crd_dir: str | Path | None = None) -> list[str]:
    """Every problem of a manifest file: each document's schema and rules, then references between documents."""
    try:
        docs = list(iter_documents(path))
    except yaml.YAMLError as err:
        return [f"{path}: not valid YAML: {err}"]
    if not docs:
        return [f"{path}: no documents"]
    errors = [e for doc in docs for e in validate_document(doc, crd_dir)]
    if any(isinstance(d, dict) and "kind" in d for d in docs):
        errors += reference_errors(docs)
    return [f"{Path(path).name}: {e}" for e in errors]


def main(argv: list[str] | None = None) -> int:
    """`python tools/check_manifests.py [PATH ...]`: check manifest files (folders: every .yaml in them)."""
    import sys

    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or [Path(__file__).resolve().parents[1] / "cluster"]
    files = [f for p in paths for f in (sorted(p.rglob("*.yaml")) if p.is_dir() else [p])]
    crds = find_crd_dir()
    if crds is None:
        print(f"note: KubeRay CRDs not found (set ${CRDS_ENV}); custom resources are checked by the rules only")
    problems = [e for f in files for e in validate_file(f, crds)]
    for line in problems:
        print(line)
    print(f"{len(files)} file(s), {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
