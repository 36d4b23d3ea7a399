"""The package's modules import each other one way: no circle, however indirect."""

from __future__ import annotations

import ast
from pathlib import Path

import orthoopt

PACKAGE = Path(orthoopt.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """orthoopt modules that ``path`` imports, at any depth of its code (lazy imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("orthoopt"):
                continue
            # `from . import x` names submodules; `from .x import y` names module x.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("orthoopt"))
    return {m for m in found if m != name}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    # Package __init__ files only re-export; the edges that matter run between modules.
    return {
        _module_name(p): {m for m in _imports(p) if not _is_package(m)}
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py"
    }


def _is_package(module: str) -> bool:
    return (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").exists()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_the_graph_is_read():
    graph = _graph()
    assert {"orthoopt.penalty", "orthoopt.layout"} <= graph["orthoopt.optim"]
    assert "orthoopt.layout" in graph["orthoopt.penalty"]


def test_no_import_circle():
    assert _cycle(_graph()) is None, f"import circle: {' -> '.join(_cycle(_graph()))}"


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_lower_modules_do_not_reach_up():
    graph = _graph()
    for low in ("orthoopt.penalty", "orthoopt.layout", "orthoopt.options", "orthoopt.stiefel", "orthoopt.distributed"):
        assert "orthoopt.optim" not in graph[low], low
