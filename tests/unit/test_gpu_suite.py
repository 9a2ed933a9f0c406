"""The GPU tests (tests/gpu/, marked gpu) cannot run here, but they must not rot unseen: they are collected and
imported on every CPU run, and every call they make into the pipeline is bound against the real signature."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys

import pytest

from pipeline.model.transformers_engine import InternVLEngine
from pipeline.run.replica import TensorParallelEngine
from tests.conftest import REPO

GPU_TESTS = sorted((REPO / "tests" / "gpu").glob("test_*.py"))
# Calls whose result is an engine, and the class whose methods a call on that result must fit. A tensor-parallel
# engine forwards generate and score to every rank's InternVLEngine, so those are checked against InternVLEngine.
ENGINE_FACTORIES = {"InternVLEngine.load": InternVLEngine, "TensorParallelEngine": TensorParallelEngine}
FORWARDED = {"generate", "score"}


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def resolve(name: str, namespace: dict) -> object | None:
    """The object a dotted name refers to in a module's namespace, if it is the pipeline's own."""
    head, *rest = name.split(".")
    obj = namespace.get(head)
    for part in rest:
        obj = getattr(obj, part, None)
    module = getattr(obj, "__module__", None) or ""
    return obj if callable(obj) and module.startswith("pipeline") else None


def call_problems(path, namespace: dict | None = None) -> list[str]:
    """Every call into the pipeline (functions, classes, methods of engines made in the same test) that would raise
    TypeError for its arguments, as `file:line: call: error`. The module is imported (that it imports is part of
    the check) unless its namespace is given."""
    if namespace is None:
        namespace = vars(importlib.import_module(f"tests.gpu.{path.stem}"))
    problems = []
    for func in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)):
        engines: dict[str, type] = {}
        for node in ast.walk(func):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and isinstance(node.value, ast.Call) and dotted(node.value.func) in ENGINE_FACTORIES:
                engines[node.targets[0].id] = ENGINE_FACTORIES[dotted(node.value.func)]
        for node in ast.walk(func):
            if not isinstance(node, ast.Call):
                continue
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                continue  # *args / **kwargs: not checkable from the source
            name = dotted(node.func)
            args = [None] * len(node.args)
            if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id in engines:
                cls = engines[node.func.value.id]
                target = getattr(InternVLEngine if node.func.attr in FORWARDED else cls, node.func.attr, None)
                if target is None:
                    problems.append(f"{path.name}:{node.lineno}: {name}: no such method")
                    continue
                args = [None, *args]  # self
            else:
                target = resolve(name, namespace) if name else None
                if target is None:
                    continue
            try:
                inspect.signature(target).bind(*args, **{k.arg: None for k in node.keywords})
            except TypeError as err:
                problems.append(f"{path.name}:{node.lineno}: {name}(...): {err}")
    return problems


def test_gpu_tests_are_collected_and_imported():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests/gpu"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = [line for line in proc.stdout.splitlines() if line.startswith("tests/gpu/")]
    assert len(collected) >= 5 and all("::test_" in line for line in collected), proc.stdout


@pytest.mark.parametrize("path", GPU_TESTS, ids=lambda p: p.name)
def test_gpu_tests_call_the_pipeline_with_its_real_signatures(path):
    assert call_problems(path) == []


def test_the_signature_check_catches_a_stale_call(tmp_path):
    """The check itself: the call that once rotted in test_cuda.py (generate without the samples) is caught."""
    stale = tmp_path / "test_stale.py"
    stale.write_text("from pipeline.model.transformers_engine import InternVLEngine\n\n"
                     "def test_x():\n    engine = InternVLEngine.load('m', device='cuda')\n"
                     "    engine.generate([[1, 2]], max_new_tokens=6)\n    engine.prompt_ids('q', [1])\n")
    problems = call_problems(stale, {"InternVLEngine": InternVLEngine})
    assert len(problems) == 1 and "engine.generate" in problems[0] and "samples" in problems[0]
