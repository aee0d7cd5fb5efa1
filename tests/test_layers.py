"""The package's layers, enforced: which subpackage may import which, and no import cycles.

    core/       the request's path (context, contract runner, deadlines, fast writes, loop):
                imports nothing else of txgateway
    transport/  upstream/  filters/  terminals/  ops/  config/: features and their config
    service/    the process and its wiring: imported by nothing but service/ (and the
                test kit, txgateway/testing.py)

Filters see requests only through the context: they import no transport. Imports inside
functions are the deliberate lazy ones (optional libraries load only when a config uses
them) and are left out of the cycle check, not out of the direction check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "txgateway"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(every txgateway module `path` imports, those imported at module level, TYPE_CHECKING included)."""
    tree = ast.parse(path.read_text())
    everywhere: set[str] = set()
    top: set[str] = set()

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            names = [n for n in names if n.startswith("txgateway.") and _exists(n)]
            everywhere.update(names)
            if at_top:
                top.update(names)
            visit(child, at_top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, True)
    return everywhere, top


def _exists(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "(top)"


FORBIDDEN = {
    "core": {"transport", "upstream", "filters", "terminals", "config", "ops", "service"},
    "filters": {"transport", "service"},
    "terminals": {"transport", "service"},
    "transport": {"service"}, "upstream": {"service"}, "ops": {"service"}, "config": {"service"},
}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) in FORBIDDEN))
def test_imports_go_down_the_layers(name: str) -> None:
    wrong = sorted(m for m in GRAPH[name][0] if layer(m) in FORBIDDEN[layer(name)])
    assert not wrong, f"{name} ({layer(name)}/) must not import {wrong}"


def test_no_import_cycles() -> None:
    """Module-level imports (TYPE_CHECKING blocks included) form no cycle."""
    edges = {name: {m for m in top if m in MODULES and m != name} for name, (_, top) in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(edges):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, " -> ".join(cycle)
