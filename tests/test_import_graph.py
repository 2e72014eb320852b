"""The import rules of deita_ray/ (README, "Layout"), read from the source.

The graph is built with ``ast`` from every module's imports: module-level and inside functions
(a function-level import is a dependency all the same), not those under ``if TYPE_CHECKING:``
(annotations only). A registry's ``importlib.import_module(f"deita_ray.stages.{name}")`` counts
as an import of every module of that package. The test fails on an import cycle other than
the models' backend factory (``models/backend.py`` and its two backends), and on an import
from a layer into a layer listed above it in :data:`LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import deita_ray

ROOT = Path(deita_ray.__file__).resolve().parent
PACKAGE = "deita_ray"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entry points", ("deita_ray", "pipeline", "study", "validate_scorer", "export")),
    ("checks", ("preflight",)),
    ("report", ("report",)),
    ("stages", ("stages",)),
    ("job", ("job",)),
    ("scorers", ("scorers",)),
    ("evaluation", ("evaluation",)),
    ("training", ("training",)),
    ("selection", ("selection",)),
    ("models", ("models",)),
    ("data", ("data",)),
    ("runtime", ("runtime",)),
    ("helpers", ("accounting", "progress", "scoring", "templates")),
    ("config", ("config",)),
)
"""Top to bottom: a module may import modules of its own layer and of layers below it. Names
are modules or packages directly under deita_ray/ (``deita_ray`` is the package itself)."""

ALLOWED_CYCLES: tuple[frozenset[str], ...] = (
    frozenset(
        {"deita_ray.models.backend", "deita_ray.models.hf_backend", "deita_ray.models.vllm_backend"}
    ),
)
"""The backend factory picks one of two backends that implement its protocol."""


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The deita_ray modules that module ``name`` imports (module- and function-level)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.orelse:
                    visit_stmt(stmt)
                continue
            visit_stmt(child)

    def visit_stmt(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] == PACKAGE:
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in known else resolve(base))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.JoinedStr)
            and node.args[0].values
            and isinstance(node.args[0].values[0], ast.Constant)
        ):
            prefix = str(node.args[0].values[0].value)
            if prefix.startswith(f"{PACKAGE}.") and prefix.endswith("."):
                pkg = prefix[:-1]
                found.update(m for m in known if m.rpartition(".")[0] == pkg)
        if isinstance(node, ast.If) and _type_checking(node):
            for stmt in node.orelse:
                visit_stmt(stmt)
            return
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(None)
    found.discard(name)
    return found  # type: ignore[return-value]


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"{module}: in no layer of LAYERS (add it where it belongs)")


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(frozenset(component))
    return out


def test_every_module_is_in_a_layer():
    for module in modules():
        layer_of(module)


def test_no_import_cycle_but_the_backend_factory():
    found = [sorted(c) for c in cycles(import_graph()) if c not in ALLOWED_CYCLES]
    assert found == []


def test_no_module_imports_a_layer_above_its_own():
    broken = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer_of(target) < layer_of(module)
    ]
    assert broken == []


def test_config_is_a_leaf():
    assert import_graph()["deita_ray.config"] == set()


def test_no_stage_imports_the_report_or_preflight():
    graph = import_graph()
    found = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.startswith("deita_ray.stages")
        for t in targets
        if t.startswith(("deita_ray.report", "deita_ray.preflight"))
    ]
    assert found == []


def test_the_graph_sees_function_level_and_registry_imports():
    """The reader itself: a function-level import and the stage registry's dynamic import are
    edges, an ``if TYPE_CHECKING:`` import is not."""
    graph = import_graph()
    assert "deita_ray.report" in graph["deita_ray.pipeline"]  # inside _run()
    assert "deita_ray.stages.select" in graph["deita_ray.stages"]  # importlib, f-string
    assert "deita_ray.config" not in graph["deita_ray.stages.base"]  # TYPE_CHECKING only


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
