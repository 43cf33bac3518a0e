"""The rotation of rotary position embeddings, as written by hand, -> one ``fxopt::rotate_half`` node.

Before (transformers' ``rotate_half``, in its torch-level and ATen spellings; ``chunk``, ``split``, ``narrow`` or
``x[..., :h]`` for the halves)::

    x1 = x[..., :32];  x2 = x[..., 32:];  neg = -x2;  cat = torch.cat((neg, x1), dim=-1)

After::

    rotate_half = torch.ops.fxopt.rotate_half.default(x)

which the elementwise fusion reads as a rotated load of its input (NOTE [Gathering reads] in fxopt/ops/elementwise.py):
``q * cos + rotate_half(q) * sin`` becomes one generated kernel. fuse_elementwise calls this before it groups, for
the generated backends (Inductor fuses the cat itself). The halves and the negation are removed when nothing else
reads them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import ops
from .base import record, tag

PASS_NAME = "rotate_half"
aten = torch.ops.aten
_CAT, _CHUNK, _SPLIT, _NARROW = ops.CAT_SPELLINGS, ops.CHUNK_SPELLINGS, ops.SPLIT_SPELLINGS, ops.NARROW_SPELLINGS
_is = ops.is_call_to


def _is_neg(node, gm: fx.GraphModule) -> bool:
    """A negation, in any of the elementwise table's spellings."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    call = ops.normalize(node, gm)
    return not isinstance(call, str) and call.op is ops.NEG and len(call.operands) == 1


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Positional argument ``index`` (counting ``self`` of a method call as 0) or keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_INT_OPERATORS = {operator.floordiv: operator.floordiv, operator.add: operator.add, operator.sub: operator.sub,
                  operator.mul: operator.mul}


def _int(a):
    """The value of an int argument: a literal, or arithmetic on a tensor's sizes (``x.shape[-1] // 2``) other than
    the batch dim (an artifact keeps that one dynamic, NOTE in cleanup._static_value). None when unknown."""
    if isinstance(a, bool) or a is None:
        return None
    if isinstance(a, int):
        return a
    if not isinstance(a, fx.Node) or a.kwargs:
        return None
    if a.op == "call_function" and a.target in _INT_OPERATORS and len(a.args) == 2:
        x, y = (_int(v) for v in a.args)
        return None if x is None or y is None else _INT_OPERATORS[a.target](x, y)
    src, k = None, None
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[0], fx.Node):
        shape = a.args[0]
        if shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape":
            src, k = shape.args[0], a.args[1]
        elif shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1:
            src, k = shape.args[0], a.args[1]
    elif a.op == "call_method" and a.target == "size" and len(a.args) == 2:
        src, k = a.args
    tm = ops.tensor_meta(src) if isinstance(src, fx.Node) else None
    if tm is None or not isinstance(k, int) or not -len(tm.shape) <= k < len(tm.shape) or k % len(tm.shape) == 0:
        return None
    return tm.shape[k]


def _last_dim(dim, ndim: int) -> bool:
    dim = _int(dim)
    return dim is not None and dim in (-1, ndim - 1)


def _half(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(x, 0) if ``node`` is the first half of x's last dim, (x, 1) if the second; else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        src, index = node.args
        if _is(src, _CHUNK) or _is(src, _SPLIT):  # chunk(x, 2, -1)[k] or split(x, h, -1)[k]
            x = src.args[0]
            tm = ops.tensor_meta(x) if isinstance(x, fx.Node) else None
            if tm is None or not tm.shape or tm.shape[-1] % 2 or index not in (0, 1):
                return None
            n = _int(_arg(src, 1, "chunks" if _is(src, _CHUNK) else "split_size_or_sections"))
            if n is None:
                n = _int(_arg(src, 1, "split_size"))
            dim = _arg(src, 2, "dim", 0)
            want = 2 if _is(src, _CHUNK) else tm.shape[-1] // 2
            return (x, index) if n == want and _last_dim(dim, len(tm.shape)) else None
        if isinstance(index, tuple) and isinstance(src, fx.Node):  # x[..., :h], x[..., h:], x[:, :, :h]
            tm = ops.tensor_meta(src)
            if tm is None or not tm.shape or tm.shape[-1] % 2 or not isinstance(index[-1], slice):
                return None
            lead = index[:-1]
            if not (lead == (Ellipsis,) or (len(lead) == len(tm.shape) - 1
                                            and all(s == slice(None) for s in lead))):
                return None
            start, stop = index[-1].start, index[-1].stop
            bounds = (start if start is None else _int(start), stop if stop is None else _int(stop))
            if (start is not None and bounds[0] is None) or (stop is not None and bounds[1] is None):
                return None  # a size we could not evaluate
            return _slice_half(src, *bounds, index[-1].step, tm.shape[-1])
        return None
    if node.op == "call_function" and node.target is aten.slice.Tensor:
        x = node.args[0]
        tm = ops.tensor_meta(x) if isinstance(x, fx.Node) else None
        if tm is None or not tm.shape or tm.shape[-1] % 2 or not _last_dim(_arg(node, 1, "dim", 0), len(tm.shape)):
            return None
        start, end = _arg(node, 2, "start"), _arg(node, 3, "end")
        bounds = (0 if start is None else _int(start), None if end is None else _int(end))
        if bounds[0] is None or (end is not None and bounds[1] is None):
            return None
        return _slice_half(x, *bounds, _arg(node, 4, "step", 1), tm.shape[-1])
    if _is(node, _NARROW):
        x = node.args[0]
        tm = ops.tensor_meta(x) if isinstance(x, fx.Node) else None
        if tm is None or not tm.shape or tm.shape[-1] % 2 or not _last_dim(_arg(node, 1, "dim"), len(tm.shape)):
            return None
        start, length, h = _int(_arg(node, 2, "start")), _int(_arg(node, 3, "length")), tm.shape[-1] // 2
        return (x, start // h) if length == h and start in (0, h) else None
    return None


def _slice_half(x: fx.Node, start, stop, step, size: int) -> tuple[fx.Node, int] | None:
    h = size // 2
    if step not in (None, 1):
        return None
    start = 0 if start is None else start
    stop = size if stop is None or (isinstance(stop, int) and stop >= size) else stop
    if not (isinstance(start, int) and isinstance(stop, int)):
        return None
    if (start, stop) == (0, h):
        return x, 0
    if (start, stop) == (h, size):
        return x, 1
    return None


def match_rotate_half(cat: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """x if ``cat`` is ``cat((-x2, x1), dim=-1)`` of x's halves x1, x2; else None."""
    if not _is(cat, _CAT):
        return None
    pieces, dim = _arg(cat, 0, "tensors"), _arg(cat, 1, "dim", 0)
    if not isinstance(pieces, (list, tuple)) or len(pieces) != 2:
        return None
    neg, first = pieces
    tm = ops.tensor_meta(cat)
    if tm is None or not _last_dim(dim, len(tm.shape)) or not _is_neg(neg, gm):
        return None
    second, low = _half(ops.normalize(neg, gm).operands[0]), _half(first)
    if second is None or low is None or second[0] is not low[0] or (second[1], low[1]) != (1, 0):
        return None
    x = low[0]
    return x if tuple(ops.tensor_meta(x).shape) == tuple(tm.shape) else None


def rewrite_rotate_half(gm: fx.GraphModule, device_type: str | None = None) -> int:
    """Rewrite every match (on ``device_type``, if given) in place; the caller recompiles. Returns how many."""
    graph, found = gm.graph, 0
    for cat in list(graph.nodes):
        device = cat.meta.get("device")
        if device_type is not None and getattr(device, "type", None) != device_type:
            continue
        x = match_rotate_half(cat, gm)
        if x is None:
            continue
        neg, first = _arg(cat, 0, "tensors")
        second = ops.normalize(neg, gm).operands[0]
        with graph.inserting_before(cat):
            rot = graph.call_function(torch.ops.fxopt.rotate_half.default, (x,))
        rot.meta.update({k: cat.meta[k] for k in ("tensor_meta", "device", "has_tensor", "val") if k in cat.meta})
        tag(rot, PASS_NAME)
        cat.replace_all_uses_with(rot)
        graph.erase_node(cat)
        # the halves, the negation and the chunk, where nothing else reads them (all pure)
        for n in (neg, second, first):
            if not n.users and not getattr(n, "_erased", False):
                src = n.args[0] if n.op == "call_function" and n.target is operator.getitem else None
                graph.erase_node(n)
                if isinstance(src, fx.Node) and (_is(src, _CHUNK) or _is(src, _SPLIT)) and not src.users:
                    graph.erase_node(src)
        found += 1
    if found:
        record(rotate_half=found)
    return found
