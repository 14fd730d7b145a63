"""The package's layering, checked statically: every import of every module under ecoflap_cli/
(module-level and function-local, TYPE_CHECKING blocks included) is parsed with ``ast`` and
resolved to the ecoflap_cli module it names.

- nothing outside ecoflap_cli/bench imports ecoflap_cli.bench (benchmarks stay outside the
  library's import graph), and bench scripts use only the library's public names;
- nothing outside ecoflap_cli/cli imports ecoflap_cli.cli, except ecoflap_cli/__main__.py;
- ecoflap_cli.core imports no other subpackage;
- the subpackages core, io, engine, data, evaluation, models, stages, cli import each other
  without cycles;
- ``import ecoflap_cli.cli`` does not import torch (``ecoflap --help`` stays fast).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import ecoflap_cli

ROOT = Path(ecoflap_cli.__file__).resolve().parent
PACKAGE = "ecoflap_cli"
LAYERS = ("core", "io", "engine", "data", "evaluation", "models", "stages", "cli")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. ecoflap_cli.io.loading
    target: str  # imported ecoflap_cli module (or package), e.g. ecoflap_cli.engine.offload
    names: tuple[str, ...]  # names taken with `from target import ...` (empty for `import target`)
    line: int
    local: bool  # inside a function or class body (imported when called, not at import time)

    def __str__(self) -> str:
        where = "function-local" if self.local else "module-level"
        return f"{self.source} -> {self.target} ({path_of(self.source)}:{self.line}, {where})"


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def path_of(module: str) -> str:
    return str(MODULES[module].relative_to(ROOT.parent)) if module in MODULES else module


def is_package(module: str) -> bool:
    return module in MODULES and MODULES[module].name == "__init__.py"


def _resolve_relative(source: str, level: int, module: str | None) -> str:
    base = source.split(".") if is_package(source) else source.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([module] if module else []))


def _imports(source: str, tree: ast.AST) -> list[Edge]:
    edges: list[Edge] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        edges.append(Edge(source, alias.name, (), child.lineno, local))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve_relative(source, child.level, child.module) if child.level else child.module or ""
                if base.split(".")[0] != PACKAGE:
                    continue
                plain = tuple(a.name for a in child.names if f"{base}.{a.name}" not in MODULES)
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    if f"{base}.{alias.name}" in MODULES:
                        edges.append(Edge(source, f"{base}.{alias.name}", (), child.lineno, local))
                if plain or not child.names:
                    edges.append(Edge(source, base, plain, child.lineno, local))
            elif (
                isinstance(child, ast.Call)
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
                and child.args[0].value.startswith(PACKAGE)
                and (
                    (isinstance(child.func, ast.Attribute) and child.func.attr == "import_module")
                    or (isinstance(child.func, ast.Name) and child.func.id in ("import_module", "__import__"))
                )
            ):
                edges.append(Edge(source, child.args[0].value, (), child.lineno, local))
            visit(child, inner)

    visit(tree, False)
    return edges


EDGES: list[Edge] = [e for name, path in MODULES.items() for e in _imports(name, ast.parse(path.read_text()))]


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == PACKAGE else None


def in_subpackage(module: str, sub: str) -> bool:
    return subpackage(module) == sub


def layer_graph() -> dict[str, dict[str, list[Edge]]]:
    """Subpackage -> subpackage it imports -> the imports behind that edge (layers only)."""
    graph: dict[str, dict[str, list[Edge]]] = defaultdict(lambda: defaultdict(list))
    for edge in EDGES:
        a, b = subpackage(edge.source), subpackage(edge.target)
        if a in LAYERS and b in LAYERS and a != b:
            graph[a][b].append(edge)
    return graph


def strongly_connected(graph: dict[str, dict[str, list[Edge]]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in LAYERS:
        if node not in index:
            connect(node)
    return found


def describe_cycles() -> str:
    graph = layer_graph()
    lines = []
    for component in strongly_connected(graph):
        lines.append("cycle among " + ", ".join(component) + ":")
        for a in component:
            for b in component:
                for edge in graph.get(a, {}).get(b, []):
                    lines.append(f"  {a} -> {b}: {edge}")
    return "\n".join(lines)


def _current_cycles() -> str:
    return "; ".join(" <-> ".join(c) for c in strongly_connected(layer_graph())) or "none"


# --- the parser itself ------------------------------------------------------------------------


def test_the_parser_sees_every_kind_of_import() -> None:
    code = textwrap.dedent("""
        import ecoflap_cli.errors
        from ecoflap_cli.io import artifacts
        from ecoflap_cli.core.solvers import PRECISION
        from . import sibling
        from ..data.text import read_text
        def f():
            from ecoflap_cli.bench.smollm import smollm2_batches
            import importlib
            importlib.import_module("ecoflap_cli.cli.app")
    """)
    edges = _imports("ecoflap_cli.engine.scoring", ast.parse(code))
    got = {(e.target, e.names, e.local) for e in edges}
    assert ("ecoflap_cli.errors", (), False) in got
    assert ("ecoflap_cli.io.artifacts", (), False) in got
    assert ("ecoflap_cli.core.solvers", ("PRECISION",), False) in got
    assert ("ecoflap_cli.engine", ("sibling",), False) in got
    assert ("ecoflap_cli.data.text", ("read_text",), False) in got
    assert ("ecoflap_cli.bench.smollm", ("smollm2_batches",), True) in got
    assert ("ecoflap_cli.cli.app", (), True) in got


def test_every_subpackage_is_parsed() -> None:
    assert {subpackage(m) for m in MODULES} >= {*LAYERS, "bench"}
    assert any(e.local for e in EDGES), "function-local imports are part of the graph"


# --- the rules --------------------------------------------------------------------------------


def test_nothing_outside_bench_imports_bench() -> None:
    offenders = [str(e) for e in EDGES if in_subpackage(e.target, "bench") and not in_subpackage(e.source, "bench")]
    assert not offenders, "the library and the CLI must not import ecoflap_cli.bench:\n" + "\n".join(offenders)


def test_nothing_outside_cli_imports_cli() -> None:
    offenders = [
        str(e)
        for e in EDGES
        if in_subpackage(e.target, "cli") and not in_subpackage(e.source, "cli") and e.source != f"{PACKAGE}.__main__"
    ]
    assert not offenders, "only ecoflap_cli/cli and __main__ may import ecoflap_cli.cli:\n" + "\n".join(offenders)


def test_core_imports_no_other_layer() -> None:
    forbidden = {"io", "engine", "stages", "cli", "models", "data", "evaluation", "bench"}
    offenders = [str(e) for e in EDGES if in_subpackage(e.source, "core") and subpackage(e.target) in forbidden]
    assert not offenders, "ecoflap_cli.core must stand alone:\n" + "\n".join(offenders)


def test_bench_uses_only_public_library_names() -> None:
    offenders = [
        f"{e} imports {', '.join(n for n in e.names if n.startswith('_'))}"
        for e in EDGES
        if in_subpackage(e.source, "bench")
        and not in_subpackage(e.target, "bench")
        and (
            any(n.startswith("_") for n in e.names)
            or any(p.startswith("_") for p in e.target.split(".")[1:] if p != "__init__")
        )
    ]
    assert not offenders, "bench scripts call the library like a user would:\n" + "\n".join(offenders)


def test_no_cycles_between_layers() -> None:
    assert not strongly_connected(layer_graph()), "\n" + describe_cycles()


# --- import cost of the CLI -------------------------------------------------------------------

_TORCH_PROBE = textwrap.dedent("""
    import builtins, json, sys
    first = []
    real = builtins.__import__
    def spy(name, globals=None, locals=None, fromlist=(), level=0):
        if not first and (name == "torch" or name.startswith("torch.")) and "torch" not in sys.modules:
            first.append((globals or {}).get("__name__", "?"))
        return real(name, globals, locals, fromlist, level)
    builtins.__import__ = spy
    import ecoflap_cli.cli
    print(json.dumps({"torch": "torch" in sys.modules, "first": first[0] if first else None,
                      "ecoflap": sorted(m for m in sys.modules if m.startswith("ecoflap_cli"))}))
""")


def test_importing_the_cli_does_not_import_torch() -> None:
    import json

    proc = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not found["torch"], (
        f"`import ecoflap_cli.cli` imports torch, first from {found['first']}; "
        f"ecoflap modules it imported: {', '.join(found['ecoflap'])}"
    )


#: the layers in docs/architecture.md, lowest first: each imports only from layers before it
LAYER_ORDER = ["core", "models", "engine", "data", "io", "evaluation", "stages", "cli"]


def test_layers_import_only_lower_layers() -> None:
    rank = {name: i for i, name in enumerate(LAYER_ORDER)}
    upward = [
        (a, b) for a, targets in layer_graph().items() for b in targets if a in rank and b in rank and rank[b] > rank[a]
    ]
    assert not upward, f"imports against the documented layer order: {upward}"


# --- rooms inside a layer, the ground floor, the API ---------------------------------------------


def _module_cycles(sub: str) -> list[list[str]]:
    """Cycles among the modules of one subpackage (every import, function-local included)."""
    graph: dict[str, dict[str, list[Edge]]] = defaultdict(lambda: defaultdict(list))
    for edge in EDGES:
        inside = in_subpackage(edge.source, sub) and in_subpackage(edge.target, sub)
        if inside and edge.source != edge.target and not is_package(edge.target):
            graph[edge.source][edge.target].append(edge)
    nodes = [m for m in MODULES if in_subpackage(m, sub)]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            if component:
                found.append(sorted([node, *component]))

    for node in nodes:
        if node not in index:
            connect(node)
    return found


def test_no_cycles_inside_a_subpackage() -> None:
    cycles = {sub: _module_cycles(sub) for sub in (*LAYERS, "bench")}
    assert not any(cycles.values()), {k: v for k, v in cycles.items() if v}


def test_the_ground_floor_imports_only_the_errors() -> None:
    """``files`` (atomic writes, disk errors, file hashes) sits below every layer."""
    for module in (f"{PACKAGE}.files", f"{PACKAGE}.errors"):
        targets = {e.target for e in EDGES if e.source == module}
        assert targets <= {f"{PACKAGE}.errors"}, (module, targets)


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [
        f"{e} imports {', '.join(n for n in e.names if n.startswith('_'))}"
        for e in EDGES
        if e.source != e.target and any(n.startswith("_") and not n.startswith("__") for n in e.names)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_api_sits_on_the_stages_and_only_the_cli_may_call_it() -> None:
    api = f"{PACKAGE}.api"
    assert api in MODULES
    for edge in EDGES:
        if edge.source == api:
            assert subpackage(edge.target) not in ("cli", "bench"), str(edge)
        if edge.target == api:
            assert in_subpackage(edge.source, "cli") or in_subpackage(edge.source, "bench"), str(edge)
