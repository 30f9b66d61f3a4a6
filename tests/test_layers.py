"""The package's import graph, read from the source with ``ast`` (every import statement, those
inside functions too): no import circles, imports only point down the layers, and the torch-free
runtime reaches nothing of the compiler, the reference, the emulation or the command line, nor
torch, onnx or TVM's compiler.

Layers, bottom to top (docs/design.md): a module may import its own layer and the layers below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ffcompile"

LAYERS = ["core", "data", "lowering", "contract", "loop", "runtime", "reference", "emulation", "compiler", "cli"]
ROOT_MODULES = {"ffcompile": "core", "ffcompile.__main__": "cli"}  # the version string; ``python -m ffcompile``

# What the runtime (and everything it imports) must never import: it goes onto devices.
RUNTIME_FORBIDDEN_LAYERS = {"reference", "emulation", "compiler", "cli"}
RUNTIME_FORBIDDEN_EXTERNAL = ("torch", "onnx", "tvm.relax", "tvm.tir", "tvm.s_tir", "tvm.meta_schedule", "tvm.dlight",
                              "tvm.tirx", "tvm.target", "tvm.ir", "tvm.topi", "tvm.te", "matplotlib")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_imports(path: Path, modules: set[str]) -> set[str]:
    """Absolute names of everything ``path`` imports: package modules (``from .x import name``
    counts as x.name where that is a module), and external modules."""
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.JoinedStr):
            found.add("".join(v.value for v in node.args[0].values if isinstance(v, ast.Constant)).rstrip("."))
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(package module -> package modules it imports, package module -> external modules it imports)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    inner, outer = {}, {}
    for name, path in paths.items():
        imported = read_imports(path, set(paths))
        inner[name] = {m for m in imported if m in paths and m != name}
        outer[name] = {m for m in imported if m.split(".")[0] != "ffcompile"}
    return inner, outer


def layer_of(module: str) -> str:
    if module in ROOT_MODULES:
        return ROOT_MODULES[module]
    layer = module.split(".")[1]
    assert layer in LAYERS, f"{module}: in no layer (add its folder to LAYERS in this test and to docs/design.md)"
    return layer


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(start), list(start)
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


GRAPH, EXTERNAL = import_graph()


def test_the_reader_sees_imports_inside_functions():
    assert "ffcompile.runtime.bundle" in GRAPH["ffcompile.cli.bundle"]  # imported inside a command
    assert "torch" in EXTERNAL["ffcompile.reference.interpreter"]


def test_no_import_circles():
    assert circles(GRAPH) == []


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down_the_layers():
    upward = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
              if LAYERS.index(layer_of(b)) > LAYERS.index(layer_of(a))]
    assert upward == []


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_is_a_folder(layer):
    assert (PACKAGE / layer / "__init__.py").is_file()


def test_the_runtime_reaches_no_compiler_reference_emulation_or_torch():
    runtime = {m for m in GRAPH if m.startswith("ffcompile.runtime")}
    reached = reachable(GRAPH, runtime)
    bad = sorted(m for m in reached if layer_of(m) in RUNTIME_FORBIDDEN_LAYERS)
    assert bad == []
    external = sorted({f"{m} imports {x}" for m in reached for x in EXTERNAL[m]
                       if any(x == f or x.startswith(f + ".") for f in RUNTIME_FORBIDDEN_EXTERNAL)})
    assert external == []


def test_no_test_loads_a_tool_or_benchmark_script():
    """tools/ and bench/ are scripts for users and for measurements, not library code."""
    tests = Path(__file__).resolve().parent
    loading = [str(p.relative_to(tests)) for p in tests.rglob("*.py") if p.name != "test_layers.py"
               and any(word in p.read_text() for word in ("spec_from_file_location", "import tools", "import bench",
                                                           "from tools", "from bench"))]
    assert loading == []
