"""The op table (``fxopt/ops/``) is the one place an op is described (DESIGN.md, "Layers"; issue 17).

A pass or runtime module that wants to know "is this node a convolution / a reshape / a dropout" asks the table
(``ops.is_heavy(node, gm)``, ``ops.is_reshape(node, gm)``, ...) instead of keeping its own set of spellings, so that a
spelling added to the table (a new ATen overload, a new ``nn`` module) reaches every pass at once.

This test scans every module of the package outside ``fxopt/ops/`` (its AST: the module is not imported) for a literal
collection of two or more elements -- a set, tuple, list or dict literal (its keys), or a ``set(...)`` /
``frozenset(...)`` call on one -- that holds op spellings:

* an attribute of ``torch`` that is an op: a function of ``torch``, ``torch.nn.functional`` (``F``),
  ``torch.special``, ``torch.linalg``, ``torch.fft`` or a ``torch.Tensor`` method; an ATen/prims overload or packet
  (``aten.relu.default``, ``torch.ops.aten.add``); a ``torch.nn`` module class (``nn.ReLU``). dtypes, memory formats,
  devices, ``torch.cuda``/``torch.backends`` helpers and non-module classes are not ops;
* a string that names an op of the table (``ops.known_op_names()``: a canonical elementwise or row-reduction op, or
  a method spelling the table knows: ``"relu"``, ``"view"``, ``"reshape"``), except the cast methods named like a
  dtype (``"float"``, ``"int"``, ``"bool"``, ...), which are as often C or torch type names.

A literal with one non-string op spelling, or two op-name strings, is flagged. A dict counts by its keys (a dict
keyed by ops is an op table; one whose values are ops, such as an ``exec`` namespace, is not). A tuple that is only
a ``return a, b`` or the right side of an unpacking ``a, b = x, y`` is no collection. Names are resolved through the
module's own imports and module-level aliases (``aten = torch.ops.aten``).
"""

from __future__ import annotations

import ast
import importlib
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import fxopt
from fxopt import ops

PACKAGE_DIR = Path(fxopt.__file__).resolve().parent
OPS_DIR = PACKAGE_DIR / "ops"

# Literals that hold op spellings but are not an op vocabulary. Keyed by (path relative to fxopt/, line text
# stripped); each entry says why. Keep it short: anything that classifies nodes belongs in the table.
ALLOWLIST: dict[tuple[str, str], str] = {}

# Namespaces whose callables are ops (attribute chains are resolved to objects, then checked here).
_OP_NAMESPACES = ("torch", "torch.nn.functional", "torch.special", "torch.linalg", "torch.fft")
_DEFAULT_ALIASES = {"torch": "torch", "F": "torch.nn.functional", "nn": "torch.nn", "aten": "torch.ops.aten",
                    "prims": "torch.ops.prims"}


def op_names() -> frozenset[str]:
    """The strings that name an op of the table: canonical ops and every method spelling it knows, less the names
    of dtypes."""
    return frozenset(n for n in ops.known_op_names() if not isinstance(getattr(torch, n, None), torch.dtype))


@dataclass(frozen=True)
class Hit:
    path: str  # relative to the package's parent (fxopt/...)
    line: int
    text: str  # the source line, stripped
    spellings: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}   [{', '.join(self.spellings)}]"


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted path, from the module's imports and module-level ``x = a.b.c`` assignments."""
    names = dict(_DEFAULT_ALIASES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    names[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            dotted = _dotted(node.value, names)
            if dotted is not None:
                names[node.targets[0].id] = dotted
    return names


def _dotted(expr: ast.expr, names: dict[str, str]) -> str | None:
    """``F.relu`` -> ``torch.nn.functional.relu`` (through ``names``); None if not a Name/Attribute chain."""
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name) or expr.id not in names:
        return None
    return ".".join([names[expr.id], *reversed(parts)])


def _resolve(dotted: str):
    """The object a dotted path names (importing the top package only), or None."""
    head, *rest = dotted.split(".")
    if head != "torch":
        return None
    obj = torch
    for i, part in enumerate(rest):
        try:
            obj = getattr(obj, part)
        except Exception:
            try:
                obj = importlib.import_module(".".join(["torch", *rest[: i + 1]]))
            except Exception:
                return None
    return obj


def _is_op_object(dotted: str) -> bool:
    obj = _resolve(dotted)
    if obj is None:
        return False
    if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    if isinstance(obj, type):
        return issubclass(obj, nn.Module) and obj is not nn.Module and dotted.startswith("torch.nn.")
    if not callable(obj):
        return False
    namespace = dotted.rpartition(".")[0]
    return namespace in _OP_NAMESPACES or namespace == "torch.Tensor"


def _elements(node: ast.expr) -> list[ast.expr] | None:
    """The elements of a collection literal (dict: keys and values), or None if ``node`` is not one."""
    if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
        return list(node.elts)
    if isinstance(node, ast.Dict):
        return [k for k in node.keys if k is not None]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("set", "frozenset")
            and len(node.args) == 1 and isinstance(node.args[0], (ast.Set, ast.Tuple, ast.List))):
        return list(node.args[0].elts)
    return None


def scan_source(source: str, path: str = "<snippet>", names: frozenset[str] | None = None) -> list[Hit]:
    """Every op-spelling collection literal of one module's source."""
    names = op_names() if names is None else names
    tree = ast.parse(source)
    aliases = _aliases(tree)
    lines = source.splitlines()
    not_collections = set()  # return a, b / a, b = x, y / the literal inside frozenset({...})
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
            not_collections.add(id(node.value))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple) and any(
                isinstance(t, (ast.Tuple, ast.List)) for t in node.targets):
            not_collections.add(id(node.value))
        elif isinstance(node, ast.Call) and _elements(node) is not None:
            not_collections.add(id(node.args[0]))
    hits = []
    for node in ast.walk(tree):
        elements = _elements(node)
        if elements is None or len(elements) < 2 or id(node) in not_collections:
            continue
        objects, strings = [], []
        for e in elements:
            if isinstance(e, ast.Constant) and isinstance(e.value, str):
                if e.value in names:
                    strings.append(repr(e.value))
                continue
            dotted = _dotted(e, aliases)
            if dotted is not None and _is_op_object(dotted):
                objects.append(dotted)
        if objects or len(strings) >= 2:
            hits.append(Hit(path, node.lineno, lines[node.lineno - 1].strip(), tuple(objects + strings)))
    return hits


def scan_package() -> list[Hit]:
    """Every op-spelling collection literal in fxopt outside the op table, minus the allowlist."""
    names = op_names()
    hits = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if OPS_DIR in path.parents:
            continue
        rel = str(path.relative_to(PACKAGE_DIR.parent))
        for hit in scan_source(path.read_text(), rel, names):
            if (rel, hit.text) not in ALLOWLIST:
                hits.append(hit)
    return hits


def test_no_op_spellings_outside_the_op_table():
    assert OPS_DIR.is_dir(), "the op table is the package fxopt/ops/"
    hits = scan_package()
    assert not hits, ("op spellings kept outside the op table (fxopt/ops/): describe the op there and ask the "
                      "table (ops.is_...), or allowlist it in this test with the reason it is no op vocabulary:\n"
                      + "\n".join(map(str, hits)))


def test_allowlist_entries_still_exist():
    """An allowlist entry whose line is gone is stale: remove it."""
    for (rel, text), why in ALLOWLIST.items():
        assert why, f"allowlist entry {rel}: {text!r} gives no reason"
        source = (PACKAGE_DIR.parent / rel).read_text()
        assert any(line.strip() == text for line in source.splitlines()), f"stale allowlist entry {rel}: {text!r}"


def test_scanner_flags_op_spelling_sets():
    """The scanner is not trivially passing: each spelling kind in a collection is flagged."""
    snippet = textwrap.dedent('''
        import operator
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
        from torch import nn as torch_nn
        aten = torch.ops.aten

        _A = {torch.relu, torch.sigmoid}
        _B = frozenset({F.conv2d, aten.convolution.default})
        _C = (nn.Dropout, nn.Identity)
        _D = {"view", "reshape", "flatten"}
        _E = {F.linear: 1, "x": 2}
        _F = set([torch.ops.aten.mm.default, operator.matmul])
        _G = [torch_nn.Linear, 3]
        def f(node):
            return node.target in (torch.Tensor.contiguous, None)
    ''')
    hits = scan_source(snippet)
    flagged = {h.line for h in hits}
    lines = snippet.splitlines()
    for name in ("_A", "_B", "_C", "_D", "_E", "_F", "_G", "return"):
        line = next(i for i, text in enumerate(lines, 1) if text.strip().startswith(name))
        assert line in flagged, f"not flagged: {lines[line - 1]!r}"


def test_scanner_ignores_what_is_no_op_vocabulary():
    snippet = textwrap.dedent('''
        import torch
        _DTYPES = (torch.float16, torch.bfloat16, torch.float32)
        _KINDS = ("placeholder", "get_attr", "output")
        _ONE = ("none", "tanh")
        _FORMATS = {torch.channels_last, torch.contiguous_format}
        _SINGLE = frozenset({"relu"})
        _MIXED = (torch.Tensor, torch.Size)
    ''')
    assert scan_source(snippet) == []


def test_the_table_answers_what_the_passes_ask():
    """The queries that replaced the passes' own sets (spot checks; each pass's tests check behaviour)."""
    assert {"relu", "view", "reshape", "softmax", "contiguous"} <= op_names()
    assert ops.is_dropout_module(nn.Dropout(0.1)) and not ops.is_dropout_module(nn.ReLU())
