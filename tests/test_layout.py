"""The house's layering, read from the source with ``ast`` (nothing imported, ~0.1 s): no import
cycle inside ``mmssl``/``data_pipelines`` (imports inside functions count), only ``mmssl/engine.py``
imports deepspeed, ``data_pipelines`` never imports ``mmssl``, and ``benchmarks`` are imported by
neither."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmssl", "data_pipelines", "benchmarks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` names ``a.b.c`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@functools.cache
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: imported(path) for name, path in files.items()}


def internal(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph restricted to the house's own modules (a package's own __init__ left out of its
    submodules' edges: Python runs it first either way, and it only re-exports)."""
    return {
        m: {t for t in targets if t in g and t != m and not m.startswith(t + ".")} for m, targets in g.items()
    }


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    g = internal(graph())
    assert "mmssl.eval.run" in g and "mmssl.eval.embeddings" in g["mmssl.eval.run"]  # the graph is read
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers():
    g = graph()
    deepspeed = sorted(
        m for m, t in g.items() if any(x == "deepspeed" or x.startswith("deepspeed.") for x in t)
    )
    assert deepspeed == ["mmssl.engine"]
    for m, targets in g.items():
        if m.startswith("data_pipelines"):
            assert not any(t == "mmssl" or t.startswith("mmssl.") for t in targets), m
        if not m.startswith("benchmarks"):
            assert not any(t == "benchmarks" or t.startswith("benchmarks.") for t in targets), m
