"""The data package's import graph: no cycles, and none hidden behind an in-function import.

Why a test: an in-function import that closes a cycle works until someone moves it to the top
of the file, then the package fails to import at all - far from the change that caused it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import fluxflow_jax.data

PKG = Path(fluxflow_jax.data.__file__).parent


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """(package modules imported at module level, package imports inside functions)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        mods = {n for n in names if n.startswith("fluxflow_jax.data.")
                and (PKG / (n.split(".")[2] + ".py")).is_file()}
        if not mods:
            continue
        if node in tree.body:
            top |= {m.split(".")[2] for m in mods}
        else:
            nested.append(f"{path.name}:{node.lineno}")
    return top, nested


def test_no_in_function_imports_of_the_data_package():
    nested = [n for p in sorted(PKG.glob("*.py")) for n in _imports(p)[1]]
    assert nested == []


def test_data_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _imports(p)[0] - {p.stem} for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert "loader" not in graph["cache"] and "cache" in graph["loader"]
    done: set[str] = set()

    def visit(m: str, stack: tuple[str, ...]) -> None:
        assert m not in stack, " -> ".join(stack + (m,))
        if m in done:
            return
        for d in graph.get(m, ()):
            visit(d, stack + (m,))
        done.add(m)

    for m in graph:
        visit(m, ())
