"""The import graph flows one way: config <- data_pipeline <- models <- trainer <- launch, bench.

The config package imports nothing of the project; no module imports a package above its own;
below ``launch/`` no module imports project code inside a function (a function-local import is
how a cycle hides); and the module graph, function-local imports included, has no cycle.
``launch/`` may import inside a function: its commands load only what they run, so
``twotower --help`` starts without torch or FBGEMM.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"config": 0, "data_pipeline": 1, "models": 2, "trainer": 3, "launch": 4, "bench": 4}
LAZY_IMPORTS_ALLOWED = {"launch"}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {
        _module_name(path, root): path
        for package in FLOORS
        for path in (root / package).rglob("*.py")
    }


def _imports(tree: ast.Module, known: dict[str, Path]) -> Iterator[tuple[ast.stmt, str, bool]]:
    """(statement, imported project module, whether it sits inside a function or class)."""
    module_level = {
        id(node)
        for statement in tree.body
        if not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for node in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            # ``from package import submodule`` names the submodule.
            targets = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in known
                else node.module
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in FLOORS:
                yield node, target, id(node) not in module_level


def _graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[str]]:
    known = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    problems = []
    for name, path in sorted(known.items()):
        package = name.split(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, target, local in _imports(tree, known):
            where = f"{path.relative_to(root)}:{node.lineno}"
            if FLOORS[target.split(".")[0]] > FLOORS[package]:
                problems.append(f"{where}: {package} imports {target} from a floor above it")
            if local and package not in LAZY_IMPORTS_ALLOWED:
                problems.append(f"{where}: function-local import of {target}")
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                graph[name].add(target)
    return graph, problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_imports_flow_one_way() -> None:
    _, problems = _graph()
    assert not problems, "\n".join(problems)


def test_no_import_cycles() -> None:
    graph, _ = _graph()
    assert not _cycles(graph)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("from trainer.build import x\n", "floor above"),
        ("def f():\n    from data_pipeline import schema\n", "function-local"),
        ("from config import ExperimentConfig\n", None),
    ],
)
def test_the_check_catches_violations(source: str, problem: str | None, tmp_path: Path) -> None:
    """The checker on a tiny tree: an upward and a function-local import in a models/ module."""
    for module in ("trainer/build.py", "data_pipeline/schema.py", "config/__init__.py"):
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text("")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "part.py").write_text(source)
    _, problems = _graph(tmp_path)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0]
        assert problems[0].startswith("models/part.py:")


def test_cycle_finder() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_exact_search_imports_only_itself() -> None:
    """``trainer.mips`` is a self-contained library over torch: no other project module."""
    graph, _ = _graph()
    outside = {
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("trainer.mips")
        for target in targets
        if not target.startswith("trainer.mips")
    }
    assert not outside, sorted(outside)
