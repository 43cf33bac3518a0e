"""The layer rule of DESIGN.md ("Layers"): no import cycle between fxopt's units, counting imports inside functions,
and no private name imported from another fxopt module.

A unit is a top-level module (``fxopt.api``, ``fxopt.capture``, ...) or a subpackage (``fxopt.runtime``,
``fxopt.codegen``, ``fxopt.passes``, ``fxopt.backends``, ``fxopt.ops``, ...). Every ``import`` / ``from ... import``
statement anywhere in a module (module level, inside functions, under ``if TYPE_CHECKING``) counts.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

import fxopt

PACKAGE_DIR = Path(fxopt.__file__).resolve().parent

# Imports the cycle test does not count, as (importing file, imported unit), each with the reason and when it goes.
ALLOWED_EDGES: set[tuple[str, str]] = set()  # (importing file, imported unit) pairs exempt from the layer rule


@dataclass(frozen=True)
class Import:
    """One imported module (``module``) and, for ``from M import name``, the name; where the statement is."""

    importer: str  # dotted name of the importing module
    module: str  # dotted name of the imported module (absolute)
    name: str | None  # the name after ``import`` in ``from module import name``; None for ``import module``
    path: Path
    line: int


def module_name(path: Path, root: Path) -> str:
    """``root/sub/mod.py`` -> ``<root name>.sub.mod``; ``__init__.py`` names its package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan_imports(root: Path) -> list[Import]:
    """Every import statement of every module under ``root`` (a package directory), made absolute. A module that
    imports the package itself (``import fxopt``) and reads ``fxopt.optimize`` imports ``optimize`` from it (as if
    ``from fxopt import optimize``), so the package's re-exports hide no edge."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = set()  # local names bound to the package itself
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [Import(name, a.name, None, path, node.lineno) for a in node.names]
                aliases |= {a.asname or root.name for a in node.names
                            if a.name == root.name or (a.asname is None and a.name.startswith(root.name + "."))}
            elif isinstance(node, ast.ImportFrom):
                module = _absolute(node, package)
                found += [Import(name, module, a.name, path, node.lineno) for a in node.names]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                found.append(Import(name, root.name, node.attr, path, node.lineno))
    return found


def root_exports(root: Path) -> dict[str, str]:
    """Names the package's ``__init__.py`` imports at module level (``from .api import optimize``) -> the module
    they come from."""
    tree = ast.parse((root / "__init__.py").read_text())
    exports = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node, root.name)
            exports.update({a.asname or a.name: module for a in node.names})
    return exports


def is_module(dotted: str, root: Path) -> bool:
    """Whether ``dotted`` (``<root name>.a.b``) is a module or package file under ``root``."""
    rel = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def unit_of(dotted: str, root: Path) -> str | None:
    """The unit a module belongs to: ``<root>.x`` for a top-level module ``x.py`` or a subpackage ``x/``; None for
    the package itself and for modules outside it. ``fxopt/ops.py`` and a package ``fxopt/ops/`` are both
    ``fxopt.ops``."""
    parts = dotted.split(".")
    if parts[0] != root.name or len(parts) < 2:
        return None
    return f"{parts[0]}.{parts[1]}"


def imported_modules(imp: Import, root: Path) -> list[str]:
    """The fxopt modules an import statement loads: for ``from pkg import sub`` where ``sub`` is a submodule, the
    submodule (``from fxopt import api`` imports unit ``fxopt.api``, not the package ``fxopt``)."""
    if imp.name is not None and imp.name != "*":
        sub = f"{imp.module}.{imp.name}"
        if is_module(sub, root):
            return [sub]
        if imp.module == root.name:  # a name the package re-exports, or defines itself (``__version__``: no unit)
            source = root_exports(root).get(imp.name)
            return [source] if source is not None else []
    return [imp.module]


def unit_graph(root: Path, allowed: set[tuple[str, str]] = frozenset()) -> nx.DiGraph:
    """Units as nodes, an edge ``a -> b`` when a module of ``a`` imports one of ``b``; each edge keeps the list of
    ``file:line`` places that make it (``sites``). ``allowed``: (file, unit) imports left out."""
    graph = nx.DiGraph()
    for imp in scan_imports(root):
        src = unit_of(imp.importer, root)
        where = imp.path.relative_to(root.parent).as_posix()
        for target in imported_modules(imp, root):
            dst = unit_of(target, root)
            if src is None or dst is None or src == dst or (where, dst) in allowed:
                continue
            if not graph.has_edge(src, dst):
                graph.add_edge(src, dst, sites=[])
            site = f"{where}:{imp.line}"
            if site not in graph.edges[src, dst]["sites"]:
                graph.edges[src, dst]["sites"].append(site)
    return graph


def describe_cycles(graph: nx.DiGraph, limit: int = 20) -> list[str]:
    """Each simple cycle (at most ``limit``) as ``a -> b -> a`` with the import sites of every edge."""
    lines = []
    for k, cycle in enumerate(nx.simple_cycles(graph)):
        if k == limit:
            lines.append("...")
            break
        edges = list(zip(cycle, cycle[1:] + cycle[:1]))
        lines.append(" -> ".join(cycle + cycle[:1]))
        lines += [f"    {a} -> {b}: {', '.join(graph.edges[a, b]['sites'])}" for a, b in edges]
    return lines


def private_crossings(root: Path) -> list[str]:
    """``from M import _name`` where ``M`` is another module of the package than the importer and ``_name`` is
    private (one leading underscore, not a dunder) and not itself a submodule."""
    bad = []
    for imp in scan_imports(root):
        name = imp.name
        if name is None or not name.startswith("_") or name.startswith("__") or unit_of(imp.module, root) is None:
            continue
        if imp.module == imp.importer or is_module(f"{imp.module}.{name}", root):
            continue
        bad.append(f"{imp.path.relative_to(root.parent)}:{imp.line}: from {imp.module} import {name}")
    return bad


def test_no_cycle_between_units():
    graph = unit_graph(PACKAGE_DIR, ALLOWED_EDGES)
    assert graph.number_of_edges() > 10  # the scan found fxopt's imports
    cycles = describe_cycles(graph)
    assert not cycles, "import cycles between fxopt units:\n" + "\n".join(cycles)


def test_no_private_name_crosses_modules():
    bad = private_crossings(PACKAGE_DIR)
    assert not bad, "private names imported from another fxopt module:\n" + "\n".join(bad)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_a_cycle_and_private_import(tmp_path):
    # A package where sub/ imports top at module level and top imports sub inside a function (the lazy import a
    # cycle hides behind), plus a relative private import and an absolute one.
    pkg = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "top.py": "def f():\n    from .sub import mod\n    return mod\n",
        "sub/__init__.py": "",
        "sub/mod.py": "from ..top import f\nfrom pkg.low import _hidden\n",
        "low.py": "_hidden = 1\nfrom . import top\n",
        "leaf.py": "from .low import _hidden  # noqa\n",
    })
    graph = unit_graph(pkg)
    assert graph.has_edge("pkg.top", "pkg.sub") and graph.has_edge("pkg.sub", "pkg.top")
    assert graph.edges["pkg.top", "pkg.sub"]["sites"] == ["pkg/top.py:2"]
    cycles = describe_cycles(graph)
    assert any(c.startswith("pkg.top -> pkg.sub -> pkg.top") or c.startswith("pkg.sub -> pkg.top -> pkg.sub")
               for c in cycles), cycles
    # sub -> low -> top -> sub: a cycle through three units.
    assert any(len(c) == 3 for c in nx.simple_cycles(graph))
    assert sorted(private_crossings(pkg)) == ["pkg/leaf.py:1: from pkg.low import _hidden",
                                              "pkg/sub/mod.py:2: from pkg.low import _hidden"]
    # A re-export read through the package: low -> top, as if low imported top itself.
    (pkg / "__init__.py").write_text("from .top import f\n")
    (pkg / "low.py").write_text("import pkg\n\ndef g():\n    return pkg.f()\n")
    assert unit_graph(pkg).edges["pkg.low", "pkg.top"]["sites"] == ["pkg/low.py:4"]
    # Without the lazy import no cycle is left (sub -> top, sub -> low, low -> top); an allowed edge is not counted.
    (pkg / "top.py").write_text("def f():\n    return 1\n")
    assert not describe_cycles(unit_graph(pkg))
    (pkg / "top.py").write_text("from .sub import mod\n")
    assert describe_cycles(unit_graph(pkg))
    assert not describe_cycles(unit_graph(pkg, {("pkg/top.py", "pkg.sub")}))
