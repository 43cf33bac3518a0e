"""Node classification: which nodes launch a kernel (the static launch count), which are views or may return their
input itself, which write into an input (never fused or reordered), and a node's short name for reports."""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import elementwise, rows
from .elementwise import CAST_METHODS, ELEMENTWISE_OPS
from .meta import tensor_meta
from .rows import ROW_REDUCTION_OPS

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------------------------
# Ops that launch no kernel
# ---------------------------------------------------------------------------------------------------------------
VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "expand", "expand_as", "narrow", "select", "unbind", "split", "chunk", "detach", "movedim",
    "unfold", "as_strided", "diagonal", "swapaxes", "mT", "real",
})
VIEW_FUNCTIONS = frozenset({
    torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, torch.t,
    torch.narrow, torch.select, torch.unbind, torch.split, torch.chunk, torch.detach, torch.movedim,
    torch.swapaxes, torch.diagonal, torch.as_strided,
})
SHAPE_METHODS = frozenset({"size", "dim", "numel", "stride", "ndimension", "nelement", "get_device", "is_contiguous",
                           "element_size"})
SHAPE_FUNCTIONS = frozenset({builtins.getattr, builtins.len, torch.numel, torch.is_tensor, builtins.isinstance})
# Dropout, in its module and functional spellings: in eval mode (training=False) it returns its input.
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
DROPOUT_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout})
IDENTITY_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, *DROPOUT_MODULES)
# ATen ops in exported graphs that check rather than compute
_ATEN_NO_KERNEL_PREFIXES = ("_assert", "sym_", "_guards")
IDENTITY_CAST_METHODS = frozenset(CAST_METHODS)


def _is_basic_index(idx: Any) -> bool:
    """Integer/slice/None/Ellipsis indexing is a view; indexing with tensors or lists gathers (a kernel)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


def launches_kernel(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether a node, run eagerly, launches (at least) one kernel: the static launch count counts these.

    Not counted: placeholders, attributes, outputs, views and reshapes, shape reads, getitem on tuples and basic
    indexing, identities (Dropout in eval, nn.Identity, casts to the same dtype), and nodes whose result is not
    a tensor (Python arithmetic on sizes).
    """
    if node.op in ("placeholder", "get_attr", "output"):
        return False
    if node.meta.get("has_tensor") is False:
        return False  # annotated, and the result holds no tensor (a size, a Python number)
    target = node.target
    if node.op == "call_module":
        m = gm.get_submodule(target)
        # torch.export's input-guard module checks shapes on the host
        return not isinstance(m, IDENTITY_MODULES) and type(m).__name__ != "GuardsFn"
    if node.op == "call_method":
        if target in VIEW_METHODS or target in SHAPE_METHODS:
            return False
        if target == "contiguous" or target in IDENTITY_CAST_METHODS:
            return not is_identity_copy(node)
        return True
    # call_function
    if target is operator.getitem:
        src = node.args[0]
        return tensor_meta(src) is not None and not _is_basic_index(node.args[1])
    if target in VIEW_FUNCTIONS or target in SHAPE_FUNCTIONS:
        return False
    if target in DROPOUT_FUNCTIONS:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return bool(training)  # F.dropout(training=False) returns its input
    if isinstance(target, torch._ops.OpOverload):
        if target in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default):
            return not is_identity_copy(node)  # their schema may alias, but a real cast copies
        if target.is_view or target.__name__.startswith(_ATEN_NO_KERNEL_PREFIXES):
            return False
        return True
    return True


def is_identity_copy(node: fx.Node) -> bool:
    """A .to()/.contiguous()/.float()... that returns its input unchanged (same dtype, device and layout)."""
    src = node.args[0] if node.args else None
    tm_in, tm_out = tensor_meta(src), tensor_meta(node)
    if tm_in is None or tm_out is None:
        return False
    if node.target == aten._to_copy.default:
        return False  # _to_copy always copies
    return (tm_in.dtype == tm_out.dtype and tuple(tm_in.stride) == tuple(tm_out.stride)
            and src.meta.get("device") == node.meta.get("device")
            and not node.kwargs.get("copy", False))


def is_view_like(node: fx.Node) -> bool:
    """Whether the node's result shares its first argument's memory (views, reshapes, basic indexing, detach)."""
    t = node.target
    if node.op == "call_method":
        return t in VIEW_METHODS
    if node.op != "call_function":
        return False
    if t is operator.getitem:
        return tensor_meta(node.args[0]) is not None and _is_basic_index(node.args[1])
    if t is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in _VIEW_ATTRIBUTES
    if isinstance(t, torch._ops.OpOverload):
        return t.is_view
    return t in VIEW_FUNCTIONS


# Tensor attributes that are views of the tensor (x.T.mul_(3) writes into x).
_VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


def may_alias_input(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    """Whether the node's result may be its first argument's memory: views, and ops that return their input itself
    when there is nothing to do (``.contiguous()``, ``.to()``/``.float()`` to the same dtype, ``nn.Identity``,
    dropout in eval), and in-place ops (``y = x.add_(1)``: ``y`` is ``x``). A write into the result is a write into
    the input."""
    if is_view_like(node):
        return True
    if node.op in ("call_method", "call_function") or (node.op == "call_module" and gm is not None):
        if is_inplace(node, gm):
            return True
    if node.op == "call_method":
        return node.target == "contiguous" or node.target in CAST_METHODS
    if node.op == "call_module" and gm is not None:
        return isinstance(gm.get_submodule(node.target), IDENTITY_MODULES)
    if node.op == "call_function":
        return node.target in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.contiguous.default,
                               F.dropout, aten.dropout.default, torch.Tensor.contiguous)
    return False


def alias_root(node: fx.Node, gm: fx.GraphModule | None = None) -> fx.Node:
    """The node whose memory ``node`` may be: up the chain of first arguments while :func:`may_alias_input`."""
    while may_alias_input(node, gm) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def memory_key(node: fx.Node, gm: fx.GraphModule | None = None) -> Any:
    """What identifies the memory ``node`` may be: its alias root, and for a module attribute the attribute's name
    (a graph may read one buffer through several ``get_attr`` nodes)."""
    root = alias_root(node, gm)
    return ("get_attr", root.target) if root.op == "get_attr" else root


def inplace_writers(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """The in-place ops that write ``node``'s memory, directly or through views (of views) of it."""
    stack, seen, writers = [node], set(), []
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for u in cur.users:
            if not (u.args and u.args[0] is cur):
                continue
            if is_inplace(u, gm):
                writers.append(u)
            if may_alias_input(u, gm):
                stack.append(u)
    return writers


def is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node writes into one of its inputs (``add_``, ``relu_``, ``inplace=True``, mutable ATen ops)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        if node.kwargs.get("inplace") or node.kwargs.get("out") is not None:
            return True
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable
        if node.target in _INPLACE_OPERATORS:
            return True
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return False  # operator.and_ / or_ / not_ end in "_" but compute a new value
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__") and name != "__getitem__"
    return False


# Augmented assignment on tensors (x += y) writes into x.
_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                                operator.ilshift, operator.irshift, operator.imatmul})


def describe(node: fx.Node) -> str:
    """Short human name of a node's op, for reports: ``relu``, ``conv2d``, ``add``."""
    if node.op == "call_module":
        return node.target
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))



def known_op_names() -> frozenset[str]:
    """Every name the table knows an op by: canonical elementwise and row-reduction ops, and every ``call_method``
    spelling (views, shape reads, casts, ``contiguous``). tests/test_op_table_home.py flags these strings when a
    module outside the table collects them."""
    return frozenset({*ELEMENTWISE_OPS, *ROW_REDUCTION_OPS, *elementwise.method_names(), *rows.method_names(),
                      *VIEW_METHODS, *SHAPE_METHODS, *IDENTITY_CAST_METHODS, "contiguous"})
