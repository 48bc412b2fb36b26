"""The package's shape, checked so it stays as issue 23 left it: module-level imports form no
circle and never point up the layers below; no file over MAX_LINES lines and no function
over MAX_FUNCTION_LINES (a maintainer changes one stage in one place)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "msif_lite"
# lower layers never import higher ones (module-level imports; TYPE_CHECKING ones excluded)
LAYERS = {"__init__": 0, "config": 0, "registry": 0, "engine": 1, "world": 2, "eval": 3,
          "attribution": 4, "scale": 5, "viz": 6, "bench": 7, "cli": 8}  # fmt: skip
MAX_LINES, MAX_FUNCTION_LINES = 400, 80


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the msif_lite modules it imports at module level."""
    mods, graph = _modules(), {}
    for name, path in mods.items():
        edges: set[str] = set()
        for node in ast.parse(path.read_text()).body:  # module level only (not `if` blocks)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("msif_lite"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("msif_lite")}
        graph[name] = edges
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_no_import_circle():
    graph, state, cycles = import_graph(), {}, []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = "open"
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack + [v])
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [u])
    assert not cycles, "import circles: " + "; ".join(" → ".join(c) for c in cycles)


def test_no_upward_import():
    up = sorted(f"{a} → {b}" for a, bs in import_graph().items() for b in bs
                if _layer(b) > _layer(a))  # fmt: skip
    assert not up, f"imports from a higher layer ({LAYERS}): {up}"


def test_every_package_has_a_layer():
    assert {m.split(".")[1] for m in _modules() if "." in m} <= set(LAYERS)


def _sizes():
    for p in sorted(PACKAGE.rglob("*.py")):
        src = p.read_text()
        yield p, len(src.splitlines()), [
            (n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(src))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]  # fmt: skip


def test_no_file_or_function_too_long():
    long_files = [(str(p.relative_to(PACKAGE)), n) for p, n, _ in _sizes() if n > MAX_LINES]
    long_functions = [(str(p.relative_to(PACKAGE)), f, n) for p, _, fs in _sizes()
                      for f, n in fs if n > MAX_FUNCTION_LINES]  # fmt: skip
    assert not long_files, f"files over {MAX_LINES} lines: {long_files}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


@pytest.mark.parametrize("bad", ["engine → attribution"])
def test_the_layer_check_can_fail(bad, monkeypatch):
    """A made-up upward edge is caught (the checks above are not vacuous)."""
    real = import_graph()
    fake = {**real, "msif_lite.engine.layers": real["msif_lite.engine.layers"]
            | {"msif_lite.attribution.methods"}}  # fmt: skip
    monkeypatch.setattr(__import__(__name__), "import_graph", lambda: fake)
    with pytest.raises(AssertionError, match="higher layer"):
        test_no_upward_import()
