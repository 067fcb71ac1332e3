"""The package's layering, checked on the source (AST, nothing imported).

Layers, lowest first: io -> grid -> model -> diffusion -> observations -> assimilation ->
campaign -> verification -> demo -> cli. A module may import its own layer and lower ones;
``jaxguide/__init__.py`` and ``jaxguide/compat.py`` sit above all (they name every layer),
and every module may import them (``__version__``).

- imports flow downward, counting imports inside functions; only ``jaxguide/cli/`` may
  import jaxguide modules inside functions (lazily, for start-up speed);
- no import cycles between modules (strongly connected components of the import graph,
  function-level imports included);
- no module uses another module's ``_private`` name, neither imported (``from m import _x``)
  nor as an attribute of an imported jaxguide module (``m._x``).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxguide"
LAYERS = ("io", "grid", "model", "diffusion", "observations", "assimilation", "campaign", "verification", "demo",
          "earth2studio", "cli")
TOP = frozenset({"jaxguide", "jaxguide.compat"})  # above every layer, importable by all
LAZY_ALLOWED = "cli"  # the only layer that may import jaxguide modules inside functions


@dataclass(frozen=True)
class Import:
    """One imported jaxguide module (and the names taken from it) at a line of a module."""

    source: str  # the importing module
    target: str  # the imported module (dotted)
    names: tuple[str, ...]  # ``from target import names`` (empty for ``import target``)
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package: dotted name -> (path, syntax tree)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return out


def _is_package(name: str) -> bool:
    return modules()[name][0].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _walk_with_scope(tree: ast.AST):
    """(node, inside a function) for every node of ``tree``."""
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


@functools.cache
def imports() -> tuple[Import, ...]:
    """Every import of a jaxguide module by a jaxguide module. ``from pkg import sub``
    with ``sub`` a module counts as an import of ``pkg.sub``."""
    known = modules()
    out = []
    for name, (_, tree) in known.items():
        for node, in_function in _walk_with_scope(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "jaxguide":
                        out.append(Import(name, alias.name, (), node.lineno, in_function))
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, node)
                if base.split(".")[0] != "jaxguide":
                    continue
                plain = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:
                        out.append(Import(name, sub, (), node.lineno, in_function))
                    else:
                        plain.append(alias.name)
                if plain:
                    out.append(Import(name, base, tuple(plain), node.lineno, in_function))
    return tuple(out)


def layer(module: str) -> int | None:
    """Index of ``module``'s layer in :data:`LAYERS`; None for the top-level modules."""
    if module in TOP:
        return None
    return LAYERS.index(module.split(".")[1])


def test_every_module_has_a_layer():
    unknown = [m for m in modules() if m not in TOP and m.split(".")[1] not in LAYERS]
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_imports_flow_downward():
    bad = []
    for imp in imports():
        if imp.source in TOP or imp.target in TOP:
            continue
        if layer(imp.target) > layer(imp.source):
            bad.append(f"{imp.where()} imports {imp.target} (layer {LAYERS[layer(imp.target)]} is above "
                       f"{LAYERS[layer(imp.source)]})")
        if imp.in_function and imp.source.split(".")[1] != LAZY_ALLOWED:
            bad.append(f"{imp.where()} imports {imp.target} inside a function (only jaxguide/{LAZY_ALLOWED}/ "
                       "imports lazily)")
    assert not bad, "layering violations:\n" + "\n".join(sorted(bad))


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
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
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for imp in imports():
        if imp.target in graph and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def test_no_private_names_across_modules():
    known = modules()
    bad = []
    for imp in imports():
        bad += [f"{imp.where()} imports {imp.target}.{n}" for n in imp.names if _private(n)]
    for name, (_, tree) in known.items():
        # local names bound to jaxguide modules: `import jaxguide.x [as y]`, `from jaxguide.x import sub [as y]`
        bound: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "jaxguide":
                        if alias.asname:
                            bound[alias.asname] = alias.name
                        else:
                            bound["jaxguide"] = "jaxguide"
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(name, node)
                for alias in node.names:
                    if f"{base}.{alias.name}" in known:
                        bound[alias.asname or alias.name] = f"{base}.{alias.name}"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            dotted = _dotted(node.value)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            if head not in bound:
                continue
            target = bound[head] + (f".{rest}" if rest else "")
            if target in known and target != name:
                bad.append(f"{name}:{node.lineno} uses {target}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(bad))
