"""The package's modules import each other without a cycle, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_meta

PACKAGE = Path(lightning_meta.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ["lightning_meta", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The package module ``name`` refers to (a module, or the package that holds ``name``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> set[str]:
    """Every package module ``path`` imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] or [node.module]
        for name in names:
            target = resolve(name) if name.startswith("lightning_meta") else None
            if target is None:
                continue
            found.add(target)
            # Importing a.b.c runs the __init__ of every package above it; the root
            # package is the public facade and is imported by nothing inside.
            parent = target.rpartition(".")[0]
            while parent and parent != "lightning_meta":
                found.add(parent)
                parent = parent.rpartition(".")[0]
    return found


def graph() -> dict[str, set[str]]:
    return {name: imports_of(path) - {name} for name, path in MODULES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_lazy_import_cycle() -> None:
    # The check itself must be able to fail: a two-module circle closed by an
    # import inside a function, as the deferred block and the load hooks once had.
    edges = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert find_cycle(edges) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lazy_imports_are_edges(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lightning_meta._deferred._handles import forget\n")
    assert imports_of(module) == {"lightning_meta._deferred._handles", "lightning_meta._deferred"}


def test_the_torch_only_core_does_not_import_lightning() -> None:
    # MetaGuard and the lifecycle check need Lightning; nothing else may pull it in.
    lightning_users = {
        name
        for name, path in MODULES.items()
        if any(
            isinstance(node, (ast.Import, ast.ImportFrom))
            and any(
                n.startswith("lightning.") or n == "lightning"
                for n in (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
            )
            for node in ast.walk(ast.parse(path.read_text()))
        )
    }
    assert lightning_users <= {"lightning_meta._guard._callback", "lightning_meta._guard._check"}
