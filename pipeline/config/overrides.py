"""`--set key.path=value` overrides applied to a job mapping before it is validated."""

from __future__ import annotations

import json
from typing import Any

from pipeline.config.jobfile import load_yaml
from pipeline.errors import JobError


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML) to a nested dict, returning a new dict."""
    result = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise JobError(f"--set {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise JobError(f"--set {item!r}: empty key")
        node = result
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise JobError(f"--set {item!r}: '{k}' is not a group")
        node[keys[-1]] = load_yaml(raw, labels=keys[-1] == "labels") if raw.strip() else ""
    return result
