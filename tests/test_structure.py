"""The package's shape: every module imports alone, no import loops, no file over 500 lines.

Import loops are found from the source (every ``import`` statement, including those inside
functions, which is how a loop usually hides), so a loop fails here even when Python happens to
resolve it at run time.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fluxflow_jax"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t in known and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            # a package's __init__ importing its own submodules is how packages export names,
            # not a loop; a submodule importing the package back would be.
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _without_package_exports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges from a package to its own submodules (``pkg/__init__`` re-exports)."""
    return {n: {w for w in ws if not w.startswith(n + ".")} for n, ws in graph.items()}


def test_no_import_cycles():
    cycles = _cycles(_without_package_exports(_graph()))
    assert cycles == [], "import loops (each group imports itself back): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_loop_closed_inside_a_function(tmp_path):
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert _cycles(graph) == [["a", "b"]]
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from fluxflow_jax import train\n")
    assert _imports("fluxflow_jax.m", mod, {"fluxflow_jax.train"}) == {"fluxflow_jax.train"}


def test_no_file_over_500_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _import_alone(module: str) -> tuple[str, int, str]:
    p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                       text=True, cwd=PKG.parent, timeout=300)
    return module, p.returncode, p.stderr[-2000:]


@pytest.mark.xdist_group("structure")
def test_every_module_imports_alone_in_a_fresh_interpreter():
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(_import_alone, sorted(_modules())))
    failed = {m: err for m, rc, err in results if rc != 0}
    assert failed == {}
    assert len(results) > 40  # the walk found the package's modules
