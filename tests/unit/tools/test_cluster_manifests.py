"""The cluster manifests, checked strictly: KubeRay kinds against the KubeRay CRDs with unknown fields rejected, plain
Kubernetes objects against small strict schemas, the AWS launcher YAML against Ray's own schema, and the rules no
schema states. For every kind, a misspelled field must fail, naming it."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import parse_job
from pipeline.credentials import find_credentials
from tests.conftest import REPO
from tools import check_manifests as manifests
from tools.check_manifests import (
    check_rules,
    cron_errors,
    iter_documents,
    strict_schema,
    validate_document,
    validate_file,
    validate_kuberay,
    validate_launcher,
)

CLUSTER = REPO / "cluster"
KUBERAY_FILES = ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob-fallback.yaml"]


@pytest.fixture(scope="module")
def crds() -> Path:
    """The KubeRay CRDs: $KUBERAY_CRDS, else ../shared/kuberay-crds beside the repository (never copied into it)."""
    path = Path(os.environ.get("KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay-crds")
    if not (path.is_dir() and any(path.glob("*.yaml"))):
        pytest.skip(f"KubeRay CRDs not found at {path} (set KUBERAY_CRDS to a folder with ray.io_*.yaml)")
    return path


def docs_of(name: str) -> list[dict]:
    path = CLUSTER / name if name == "aws.yaml" else CLUSTER / "kuberay" / name
    return list(iter_documents(path))


def only(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def validate_docs(docs: list[dict], crds: Path, tmp_path: Path) -> list[str]:
    """Validate documents exactly as a file of them would be."""
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return validate_file(path, crds)


# ----------------------------------------------------------------------------------------------- the files are valid


def test_the_cluster_folder_holds_the_expected_files():
    assert sorted(p.name for p in (CLUSTER / "kuberay").glob("*.yaml")) == sorted(KUBERAY_FILES)
    assert (CLUSTER / "aws.yaml").is_file() and (CLUSTER / "local.md").is_file() and (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("name", KUBERAY_FILES + ["aws.yaml"])
def test_every_manifest_validates(name, crds):
    path = CLUSTER / name if name == "aws.yaml" else CLUSTER / "kuberay" / name
    assert validate_file(path, crds) == []


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_documents_pass_the_crd_schema_alone(name, crds):
    for doc in docs_of(name):
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["apiVersion"] == "ray.io/v1"
            assert validate_kuberay(doc, crds) == []


def test_launcher_passes_rays_schema():
    assert validate_launcher(docs_of("aws.yaml")[0]) == []


def test_launcher_passes_rays_own_config_check():
    """A second opinion: the launcher's own validation (private API, so skipped if it moves)."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    if not (hasattr(util, "prepare_config") and hasattr(util, "validate_config")):
        pytest.skip("ray.autoscaler._private.util.prepare_config/validate_config are gone in this Ray")
    prepared = util.prepare_config(copy.deepcopy(docs_of("aws.yaml")[0]))  # fills the AWS defaults, as `ray up` does
    util.validate_config(prepared)
    assert prepared["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_ray_schema_is_the_installed_rays():
    import ray

    assert manifests.ray_schema_path() == Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert manifests.ray_schema_path().is_file()


def test_crd_folder_comes_from_the_environment_or_beside_the_repository(monkeypatch, tmp_path, crds):
    monkeypatch.setenv("KUBERAY_CRDS", str(crds))
    assert manifests.find_crd_dir() == crds
    monkeypatch.setenv("KUBERAY_CRDS", str(tmp_path))  # an empty folder is no CRD folder
    assert manifests.find_crd_dir() is None
    monkeypatch.delenv("KUBERAY_CRDS")
    beside = REPO.parent / "shared" / "kuberay-crds"
    assert manifests.find_crd_dir(REPO) == (beside if beside.is_dir() else None)


# ----------------------------------------------------------------------------------------------- strict schemas


def test_strict_schema_closes_objects_with_properties():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"c": {}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"d": {"type": "integer"}}}},
        "any": {"anyOf": [{"type": "object", "properties": {"e": {}}}]},
        "qty": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "port": {"x-kubernetes-int-or-string": True},
        "maybe": {"type": "string", "nullable": True},
    }}
    strict = strict_schema(schema)
    assert strict["additionalProperties"] is False
    props = strict["properties"]
    assert props["a"]["additionalProperties"] is False
    assert "additionalProperties" not in props["open"]
    assert props["map"]["additionalProperties"] == {"type": "string"}
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["any"]["anyOf"][0]["additionalProperties"] is False
    assert props["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}] and "type" not in props["port"]
    assert props["maybe"]["type"] == ["string", "null"]
    assert "additionalProperties" not in schema and "additionalProperties" not in schema["properties"]["a"]  # a copy
    ok = {"a": {"b": "x"}, "open": {"anything": 1}, "map": {"k": "v"}, "list": [{"d": 1}], "any": {"e": 1},
          "qty": "2Gi", "port": 8080, "maybe": None}
    assert manifests.schema_errors(ok, strict) == []
    assert manifests.schema_errors({"port": 8080.5}, strict)
    errors = manifests.schema_errors({"a": {"bb": "x"}, "list": [{"dd": 1}]}, strict)
    assert errors == ["a: unknown field 'bb'; valid fields here: b",
                      "list[0]: unknown field 'dd'; valid fields here: d"]


def test_the_crds_alone_would_let_a_typo_through(crds):
    """Why strictness is needed: Kubernetes-style schemas accept (and the API server prunes) unknown fields."""
    crd = next(iter_documents(crds / "ray.io_rayjobs.yaml"))
    raw = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    doc = copy.deepcopy(only(docs_of("rayjob.yaml"), "RayJob"))
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    assert manifests.schema_errors(doc, raw) == []
    assert any("'shutdownAfterJobFinish'" in e for e in validate_kuberay(doc, crds))


def test_int32_fields_are_range_checked(crds):
    doc = copy.deepcopy(only(docs_of("rayjob.yaml"), "RayJob"))
    doc["spec"]["ttlSecondsAfterFinished"] = 2**31
    assert any("ttlSecondsAfterFinished" in e for e in validate_kuberay(doc, crds))


def test_unknown_kind_and_version_are_named(crds):
    assert validate_kuberay({"apiVersion": "ray.io/v1", "kind": "RayThing"}, crds) == [
        "kind: no CRD for kind 'RayThing' in " + str(crds)]
    assert "v2" in validate_kuberay({"apiVersion": "ray.io/v2", "kind": "RayJob"}, crds)[0]
    assert validate_document({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}, crds)[0].endswith(
        "Secrets are never written in manifests; create them with kubectl create secret")


# ----------------------------------------------------------------------------------------------- typos fail, named


def _set(path: str, value=None, *, rename: str | None = None, delete: bool = False):
    """A mutation of one document: follow a dotted path (with [i]) and set, rename or delete its last key."""
    def mutate(doc: dict) -> None:
        parts = [int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split(".")]
        node = doc
        for part in parts[:-1]:
            node = node[part]
        last = parts[-1]
        if rename is not None:
            node[rename] = node.pop(last)
        elif delete:
            del node[last]
        else:
            node[last] = value

    return mutate


TYPOS = [
    # (file, kind, mutation, the misspelled name the error must carry)
    ("raycluster.yaml", "RayCluster", _set("spec.headGroupSpec.rayStartParams", rename="rayStartParam"),
     "rayStartParam"),
    ("raycluster.yaml", "RayCluster", _set("spec.workerGroupSpecs[1].template.spec.containers[0].resources.limits",
                                           rename="limit"), "limit"),
    ("raycluster.yaml", "RayCluster", _set("spec.workerGroupSpecs[0].groupName", rename="groupname"), "groupname"),
    ("raycluster.yaml", "RayCluster", _set("metadata.labels", rename="lables"), "lables"),
    ("raycluster.yaml", "RayCluster", _set("spec.headGroupSpec.rayStartParams.num-cpus", rename="num-cpu"), "num-cpu"),
    ("raycluster.yaml", "RayCluster", _set("spec.enableInTreeAutoscaling", rename="enableInTreeAutoscaler"),
     "enableInTreeAutoscaler"),
    ("rayjob.yaml", "RayJob", _set("spec.shutdownAfterJobFinishes", rename="shutdownAfterJobFinish"),
     "shutdownAfterJobFinish"),
    ("rayjob.yaml", "RayJob", _set("spec.ttlSecondsAfterFinished", rename="ttlSecondsAfterFinish"),
     "ttlSecondsAfterFinish"),
    ("rayjob.yaml", "RayJob", _set("spec.rayClusterSpec", rename="rayClusterSpecs"), "rayClusterSpecs"),
    ("rayjob.yaml", "RayJob", _set("spec.rayClusterSpec.headGroupSpec.template.spec.volumes[0].configMap",
                                   rename="configmap"), "configmap"),
    ("raycronjob.yaml", "RayCronJob", _set("spec.jobTemplate", rename="jobTemplates"), "jobTemplates"),
    ("raycronjob.yaml", "RayCronJob", _set("spec.jobTemplate.entrypoint", rename="entryPoint"), "entryPoint"),
    ("raycronjob.yaml", "RayCronJob", _set("spec.timeZone", rename="timezone"), "timezone"),
    # RayCronJob (CRD v1.7.0) has no concurrencyPolicy: writing one is an error, not a silent no-op.
    ("raycronjob.yaml", "RayCronJob", _set("spec.concurrencyPolicy", "Forbid"), "concurrencyPolicy"),
    ("cronjob-fallback.yaml", "CronJob", _set("spec.concurrencyPolicy", rename="concurrencypolicy"),
     "concurrencypolicy"),
    ("cronjob-fallback.yaml", "CronJob", _set("spec.jobTemplate.spec.template.spec.containers[0].command",
                                              rename="comand"), "comand"),
    ("cronjob-fallback.yaml", "CronJob", _set("spec.jobTemplate.spec.backoffLimit", rename="backofLimit"),
     "backofLimit"),
    ("cronjob-fallback.yaml", "Role", _set("rules[0].verbs", rename="verb"), "verb"),
    ("cronjob-fallback.yaml", "RoleBinding", _set("roleRef.name", rename="nme"), "nme"),
    ("cronjob-fallback.yaml", "ServiceAccount", _set("metadata.labels", rename="label"), "label"),
    ("raycluster.yaml", "ServiceAccount", _set("metadata.annotations", rename="anotations"), "anotations"),
]


@pytest.mark.parametrize("name,kind,mutate,typo", TYPOS, ids=[f"{t[1]}-{t[3]}" for t in TYPOS])
def test_a_misspelled_field_fails_naming_it(name, kind, mutate, typo, crds, tmp_path):
    docs = copy.deepcopy(docs_of(name))
    mutate(next(d for d in docs if d.get("kind") == kind))
    errors = validate_docs(docs, crds, tmp_path)
    assert any(f"'{typo}'" in e or f".{typo}:" in e for e in errors), errors


def test_a_typo_inside_the_embedded_rayjob_fails(crds, tmp_path):
    docs = copy.deepcopy(docs_of("cronjob-fallback.yaml"))
    holder = next(d for d in docs if d["kind"] == "ConfigMap" and "rayjob.yaml" in d["data"])
    holder["data"]["rayjob.yaml"] = holder["data"]["rayjob.yaml"].replace(
        "shutdownAfterJobFinishes:", "shutdownAfterJobFinish:")
    errors = validate_docs(docs, crds, tmp_path)
    assert any("data.rayjob.yaml" in e and "'shutdownAfterJobFinish'" in e for e in errors), errors


def test_a_typo_in_the_embedded_job_file_fails(crds, tmp_path):
    docs = copy.deepcopy(docs_of("rayjob.yaml"))
    holder = only(docs, "ConfigMap")
    holder["data"]["caption_images.yaml"] = holder["data"]["caption_images.yaml"].replace("max_tiles", "max_tile")
    errors = validate_docs(docs, crds, tmp_path)
    assert any("tiling.max_tile: unknown key" in e for e in errors), errors


LAUNCHER_TYPOS = [
    (_set("head_node_type", rename="head_node_typ"), "head_node_typ"),
    (_set("available_node_types.gpu_worker_g5.min_workers", rename="min_worker"), "min_worker"),
    (_set("available_node_types.gpu_worker_g5.node_config.InstanceMarketOptions", rename="InstanceMarketOption"),
     "InstanceMarketOption"),
    (_set("available_node_types.gpu_worker_g5.node_config.InstanceMarketOptions.SpotOptions.SpotInstanceType",
          rename="SpotInstanceTyp"), "SpotInstanceTyp"),
    (_set("provider.region", rename="regoin"), "regoin"),
    (_set("docker.container_name", rename="containername"), "containername"),
    (_set("setup_commands", rename="setup_command"), "setup_command"),
]


@pytest.mark.parametrize("mutate,typo", LAUNCHER_TYPOS, ids=[t[1] for t in LAUNCHER_TYPOS])
def test_a_misspelled_launcher_field_fails_naming_it(mutate, typo, crds, tmp_path):
    docs = copy.deepcopy(docs_of("aws.yaml"))
    mutate(docs[0])
    errors = validate_docs(docs, crds, tmp_path)
    assert any(typo in e for e in errors), errors


# ----------------------------------------------------------------------------------------------- rules beyond schemas


def _rule_errors(name: str, kind: str, mutate) -> list[str]:
    doc = copy.deepcopy(next(d for d in docs_of(name) if d.get("kind") == kind))
    mutate(doc)
    return check_rules(doc)


def _has(errors: list[str], *fragments: str) -> bool:
    return any(all(f in e for f in fragments) for e in errors)


def test_ttl_requires_shutdown_after_job_finishes():
    errors = _rule_errors("rayjob.yaml", "RayJob", _set("spec.shutdownAfterJobFinishes", False))
    assert _has(errors, "spec.ttlSecondsAfterFinished", "shutdownAfterJobFinishes: true")


def test_rayjob_mode_and_cluster_rules():
    assert _has(_rule_errors("rayjob.yaml", "RayJob", _set("spec.submissionMode", "K8sMode")),
                "spec.submissionMode", "'K8sMode'")
    assert _has(_rule_errors("rayjob.yaml", "RayJob", _set("spec.rayClusterSpec", delete=True)),
                "one of rayClusterSpec or clusterSelector")
    assert _has(_rule_errors("rayjob.yaml", "RayJob", _set("spec.entrypoint", "")), "spec.entrypoint")
    assert _has(_rule_errors("rayjob.yaml", "RayJob", _set("spec.activeDeadlineSeconds", 0)),
                "activeDeadlineSeconds")
    assert _has(_rule_errors("rayjob.yaml", "RayJob", _set("spec.runtimeEnvYAML", "pip: [a]\nenv_var: {}")),
                "runtimeEnvYAML.env_var", "not a runtime_env field")
    assert _has(_rule_errors("rayjob.yaml", "RayJob", _set("spec.runtimeEnvYAML", "working_dir: ./src")),
                "remote URI")


def test_the_job_file_must_be_mounted_where_the_driver_runs():
    errors = _rule_errors("rayjob.yaml", "RayJob", _set("spec.entrypoint", "internvl-batch run /home/ray/other/x.yaml"))
    assert _has(errors, "/home/ray/other/x.yaml", "volumeMount of the head")


def test_the_head_takes_no_work():
    errors = _rule_errors("raycluster.yaml", "RayCluster", _set("spec.headGroupSpec.rayStartParams.num-cpus", "1"))
    assert _has(errors, "headGroupSpec.rayStartParams.num-cpus", '"0"')
    errors = _rule_errors("rayjob.yaml", "RayJob", _set("spec.rayClusterSpec.headGroupSpec.rayStartParams", {}))
    assert _has(errors, "rayClusterSpec.headGroupSpec.rayStartParams.num-cpus")


def test_ray_start_params_are_ray_start_options():
    errors = _rule_errors("raycluster.yaml", "RayCluster", _set("spec.workerGroupSpecs[0].rayStartParams.num-gpu", "1"))
    assert _has(errors, "rayStartParams.num-gpu", "not a `ray start` option")


def test_gpu_group_needs_gpu_limits_and_a_toleration():
    doc = copy.deepcopy(only(docs_of("raycluster.yaml"), "RayCluster"))
    gpu = doc["spec"]["workerGroupSpecs"][1]["template"]["spec"]
    del gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert _has(check_rules(doc), "workerGroupSpecs[1].template.spec.containers[0].resources", "nvidia.com/gpu")
    gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"
    gpu["tolerations"] = []
    assert _has(check_rules(doc), "workerGroupSpecs[1].template.spec.tolerations", "nvidia.com/gpu")


def test_worker_counts_and_names():
    assert _has(_rule_errors("raycluster.yaml", "RayCluster", _set("spec.workerGroupSpecs[0].replicas", 99)),
                "minReplicas <= replicas <= maxReplicas")
    assert _has(_rule_errors("raycluster.yaml", "RayCluster", _set("spec.workerGroupSpecs[1].groupName",
                                                                   "cpu-preprocess")), "used twice")
    assert _has(_rule_errors("rayjob.yaml", "RayJob", _set("metadata.name", "x" * 48)), "at most 47")
    assert _has(_rule_errors("rayjob.yaml", "RayJob", _set("metadata.name", "9lives")), "metadata.name")
    assert _has(_rule_errors("raycluster.yaml", "RayCluster",
                             _set("spec.headGroupSpec.template.spec.containers[0].image", "rayproject/ray:2.9.0")),
                "does not match rayVersion")


def test_raycronjob_rules():
    assert _has(_rule_errors("raycronjob.yaml", "RayCronJob", _set("spec.schedule", "0 2 * *")),
                "spec.schedule", "expected 5 fields")
    assert _has(_rule_errors("raycronjob.yaml", "RayCronJob", _set("spec.timeZone", "Mars/Olympus")), "timeZone")
    assert _has(_rule_errors("raycronjob.yaml", "RayCronJob", _set("spec.jobTemplate.shutdownAfterJobFinishes", False)),
                "leaves a cluster behind")


def test_cronjob_rules():
    assert _has(_rule_errors("cronjob-fallback.yaml", "CronJob", _set("spec.schedule", "61 2 * * *")),
                "minute", "'61'")
    assert _has(_rule_errors("cronjob-fallback.yaml", "CronJob",
                             _set("spec.jobTemplate.spec.template.spec.restartPolicy", "Always")), "restartPolicy")


def test_references_between_documents(crds, tmp_path):
    docs = copy.deepcopy(docs_of("cronjob-fallback.yaml"))
    only(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] = "nobody"
    only(docs, "RoleBinding")["roleRef"]["name"] = "no-role"
    errors = validate_docs(docs, crds, tmp_path)
    assert _has(errors, "ServiceAccount 'nobody' is not defined")
    assert _has(errors, "Role 'no-role' is not defined")


def test_literal_credentials_are_refused_anywhere():
    def head_env(env):
        return _set("spec.headGroupSpec.template.spec.containers[0].env", env)

    literal = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "not-really-but-literal"}]
    assert _has(_rule_errors("raycluster.yaml", "RayCluster", head_env(literal)), "AWS_SECRET_ACCESS_KEY",
                "literal value")
    from_secret = [{"name": "AWS_SECRET_ACCESS_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "internvl-batch-s3", "key": "AWS_SECRET_ACCESS_KEY"}}}]
    assert _rule_errors("raycluster.yaml", "RayCluster", head_env(from_secret)) == []
    assert _has(_rule_errors("raycluster.yaml", "RayCluster",
                             _set("metadata.annotations", {"k": "AKIAIOSFODNN7EXAMPLE"})), "AWS access key id")
    assert _has(_rule_errors("rayjob.yaml", "RayJob", _set("spec.runtimeEnvYAML",
                                                           "env_vars: {AWS_SESSION_TOKEN: abc}")), "credential")
    launcher = copy.deepcopy(docs_of("aws.yaml")[0])
    launcher["setup_commands"].append("export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIexampleKEY")
    assert _has(check_rules(launcher), "setup_commands[2]", "credential assignment")
    launcher["setup_commands"][-1] = 'aws configure set aws_secret_access_key "$FROM_A_VAULT"'
    assert not _has(check_rules(launcher), "setup_commands[2]")


def test_credential_detection_has_no_false_alarms_on_references():
    doc = {"volumes": [{"secret": {"secretName": "internvl-batch-s3"}}],
           "envFrom": [{"secretRef": {"name": "internvl-batch-s3"}}],
           "sha": "3aca44d0ea4589f8e1c2efcac7e6a2639fee2618",
           "automountServiceAccountToken": False, "url": "http://127.0.0.1:8265",
           "script": 'echo "$AWS_SECRET_ACCESS_KEY" | wc -c'}
    assert find_credentials(doc) == []
    assert find_credentials({"x": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"})  # an AWS secret's shape
    assert find_credentials({"redis-password": "hunter2"})
    assert find_credentials({"u": "s3://ak:sk@host/bucket"})


def test_launcher_rules():
    def launcher_errors(mutate) -> list[str]:
        doc = copy.deepcopy(docs_of("aws.yaml")[0])
        mutate(doc)
        return check_rules(doc)

    assert _has(launcher_errors(_set("available_node_types.head.resources", {"CPU": 2})), "CPU: 0")
    assert _has(launcher_errors(_set("available_node_types.head.node_config.InstanceMarketOptions",
                                     {"MarketType": "spot"})), "on-demand")
    assert _has(launcher_errors(_set("available_node_types.gpu_worker_p4d.resources.GPU", 4)), "has 8 GPU")
    assert _has(launcher_errors(_set("available_node_types.cpu_worker.node_config.InstanceTyp", "c6i.4xlarge")),
                "InstanceTyp", "not an EC2 RunInstances parameter")
    assert _has(launcher_errors(_set("head_node_type", "boss")), "head_node_type", "'boss'")
    assert _has(launcher_errors(_set("max_workers", 1)), "below the sum of min_workers")


def test_cron_expressions():
    for ok in ("0 2 * * *", "*/15 * * * MON-FRI", "0 0 1 JAN,JUL ?", "5 4 * * sun", "@daily", "0-30/10 1,13 * * *"):
        assert cron_errors(ok) == [], ok
    for bad, fragment in (("0 2 * *", "5 fields"), ("60 * * * *", "minute"), ("0 24 * * *", "hour"),
                          ("0 0 0 * *", "day of month"), ("0 0 * 13 *", "month"), ("0 0 * * 8", "day of week"),
                          ("*/0 * * * *", "step"), ("CRON_TZ=UTC 0 2 * * *", "timeZone"), ("@nightly", "descriptor"),
                          ("5-1 * * * *", "minute"), ("", "non-empty")):
        assert any(fragment in e for e in cron_errors(bad)), bad


# ----------------------------------------------------------------------------------------------- what the files say


def test_raycluster_shape():
    docs = docs_of("raycluster.yaml")
    spec = only(docs, "RayCluster")["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    cpu, gpu = groups["cpu-preprocess"], groups["gpu-infer"]
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    account = only(docs, "ServiceAccount")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]  # IRSA
    for group in [spec["headGroupSpec"], cpu, gpu]:
        container = group["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "internvl-batch-s3", "optional": True}}]
        assert group["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def _job_file_in(docs: list[dict], key: str = "caption_images.yaml"):
    holder = next(d for d in docs if d["kind"] == "ConfigMap" and key in d.get("data", {}))
    return parse_job(yaml.safe_load(holder["data"][key]), source=key)


def _cluster_gpus(cluster: dict) -> float:
    return sum(g.get("minReplicas", 0) * float(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                               .get("nvidia.com/gpu", 0)) for g in cluster["workerGroupSpecs"])


@pytest.mark.parametrize("name,kind", [("rayjob.yaml", "RayJob"), ("raycronjob.yaml", "RayCronJob")])
def test_scheduled_and_one_off_jobs_clean_up_and_fit_their_job(name, kind):
    docs = docs_of(name)
    doc = only(docs, kind)
    spec = doc["spec"] if kind == "RayJob" else doc["spec"]["jobTemplate"]
    assert spec["entrypoint"].startswith("internvl-batch run /home/ray/jobs/caption_images.yaml")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode" and spec["backoffLimit"] == 0
    job = _job_file_in(docs)
    # The runner plans one replica per GPU present at start: the fixed GPU group must hold the job's replicas.
    assert _cluster_gpus(spec["rayClusterSpec"]) >= job.compute.replicas * job.compute.gpus_per_replica


def test_raycronjob_is_nightly_and_says_it_is_alpha():
    text = (CLUSTER / "kuberay" / "raycronjob.yaml").read_text()
    assert "ALPHA" in text and "feature gate" in text and "1.6" in text
    spec = only(docs_of("raycronjob.yaml"), "RayCronJob")["spec"]
    assert spec["schedule"] == "0 2 * * *" and spec["timeZone"] == "Etc/UTC"
    assert spec["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600  # no overlap without a concurrencyPolicy


def test_fallback_cronjob_creates_the_rayjob_with_least_privilege(crds):
    docs = docs_of("cronjob-fallback.yaml")
    cron = only(docs, "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    role = only(docs, "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list", "delete"]}]
    binding = only(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"]} in binding["subjects"]
    mounted = {v["name"]: v["configMap"]["name"] for v in pod["volumes"]}
    mount = pod["containers"][0]["volumeMounts"][0]
    holder = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == mounted[mount["name"]])
    assert f"kubectl create -f {mount['mountPath']}/rayjob.yaml" in pod["containers"][0]["args"][0]
    rayjob = yaml.safe_load(holder["data"]["rayjob.yaml"])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["generateName"].endswith("-")
    assert validate_document(rayjob, crds) == []
    assert _cluster_gpus(rayjob["spec"]["rayClusterSpec"]) >= _job_file_in(docs).compute.replicas


def _run_fallback_script(tmp_path: Path, listing: str) -> list[str]:
    """Run the CronJob's script with a stub kubectl that prints `listing` for the jsonpath query."""
    script = only(docs_of("cronjob-fallback.yaml"), "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"][0]["args"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls"
    (tmp_path / "listing").write_text(listing)
    stub = bin_dir / "kubectl"
    stub.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
case "$*" in
  *jsonpath*) cat {tmp_path / 'listing'} ;;
  *sort-by*) for i in 1 2 3 4 5 6 7 8 9; do echo rayjob.ray.io/n$i; done ;;
esac
""")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return calls.read_text().splitlines()


def test_fallback_script_starts_a_run_only_when_none_is_active(tmp_path):
    calls = _run_fallback_script(tmp_path / "a", "")
    assert "create -f /manifests/rayjob.yaml" in calls
    assert calls[-1] == "delete rayjob.ray.io/n1 rayjob.ray.io/n2"  # keeps the 7 newest
    calls = _run_fallback_script(tmp_path / "b", "n-1=Complete\nn-2=Failed\n")
    assert "create -f /manifests/rayjob.yaml" in calls
    for active in ("n-3=Running\n", "n-1=Complete\nn-4=\n", "n-5=Initializing\n"):
        calls = _run_fallback_script(tmp_path / active.split("=")[0].strip(), active)
        assert not any(c.startswith("create") for c in calls), active


def test_aws_launcher_shape():
    doc = docs_of("aws.yaml")[0]
    types = doc["available_node_types"]
    head = types[doc["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "InstanceMarketOptions" not in head["node_config"]
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in gpu_types.values()} == {"g5", "p4d"}
    for node in gpu_types.values():
        assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert any(not t["resources"].get("GPU") and t["resources"].get("CPU") for n, t in types.items() if t is not head)
    assert any("internvl-batch" in c for c in doc["setup_commands"])


def test_no_credentials_in_any_cluster_file():
    for path in [*(CLUSTER / "kuberay").glob("*.yaml"), CLUSTER / "aws.yaml"]:
        for doc in iter_documents(path):
            assert find_credentials(doc) == [], path
        assert "AKIA" not in path.read_text() and "aws_secret_access_key:" not in path.read_text().lower()
