"""The package's shape, checked: no module over 400 lines, no import cycle (imports inside functions counted; only
`if TYPE_CHECKING:` blocks left out), and each room importing only rooms below it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "pipeline"
MAX_LINES = 400
# A room may import the rooms listed for it (and itself); `pipeline.errors` / `pipeline.credentials` are below all.
ROOMS = {
    "config": {"config", "model"},  # the `schema` key is checked by the model room's schema code
    "io": {"io"},
    "media": {"media"},
    "model": {"model", "config", "io", "media"},
    "stages": {"stages", "model", "config", "io", "media"},
    "run": {"run", "stages", "model", "config", "io", "media"},
    "embedded": {"embedded", "model", "config", "io", "media", "run", "stages"},
}
SHARED = {"errors", "credentials", "__init__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports anywhere (functions included), TYPE_CHECKING blocks aside."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline") and node.level == 0:
            for alias in node.names:  # `from pipeline.io import output` imports the module pipeline.io.output
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if module_path(candidate) else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def module_path(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_each_room_imports_only_rooms_below_it():
    wrong = []
    for module, targets in graph().items():
        parts = module.split(".")
        room = parts[1] if len(parts) > 2 else None
        if room not in ROOMS:
            continue
        for target in targets:
            other = target.split(".")[1] if target.count(".") >= 1 else "__init__"
            if other not in ROOMS[room] and other not in SHARED:
                wrong.append(f"{module} imports {target}")
    assert wrong == []
