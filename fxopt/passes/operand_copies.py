"""Slices of one tensor that batched matmuls would each copy -> one copy of the tensor, sliced after.

Before (timm's attention at batch 2, as SDPA's math path or hand-written attention runs it)::

    qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1)  ...  attn @ v

After::

    q, k, v = qkv.contiguous().unbind(0)

NOTE [One copy for matmul operands]: ``torch.matmul`` folds the batch dims of a >3-d operand into one for ``bmm``
with ``reshape``, a copy where they do not fold as a view. A slice of ``[3, B, H, N, D]`` permuted from the q/k/v
projection's ``[B, N, 3, H, D]`` has B and H strides that do not fold for B > 1, so q (through its scale, which keeps
the layout), k and v are copied by their matmuls: three copy kernels of a third each. Copying the permuted tensor
once makes every slice fold as a view (k's transpose too: bmm reads a transposed matrix in place), one kernel for the
same bytes. Where a batch of one folds already, or SDPA reads q/k/v at their strides, nothing is copied and the pass
leaves the graph alone. Taken for the slices of ``unbind(x, 0)`` or ``x[i]`` (an integer index) when at least two
of them reach a matmul operand, through elementwise ops on them and numbers or a transpose of the last two dims, each
the only reader of the value before it, and would be copied there. On an H100 at batch 32 fxopt runs DeiT-S's and
Swin-T's float32 attention as SDPA's math path (it measures faster than SDPA's kernel:
reports/2026-12-07-h100-s16-52c3c1b/call2), whose operands these are. Measured there (kernel tables with and without
the pass, reports/2026-12-07-h100-s17-bc8eb19/call2): DeiT-S 9662 -> 9399 µs of kernels a call; Swin-T 10561 -> 10775,
because cuBLAS runs Swin's 49 x 32 @ 32 x 49 score GEMM with a kernel 2.7 times slower when k^T is a transposed view
(``tn``) than when matmul's own copy had laid k^T out densely (``nn``); at 197 x 64 (DeiT-S) the two cost the same.
So on CUDA the pass chooses per shape by measurement (NOTE [Choosing by measurement]): the region from the slices to
the matmuls is timed both ways, on random inputs in the recorded layouts, and the merge is made unless the matmuls' own
copies measure faster by more than ``MARGIN`` (the merge also saves two launches a call without CUDA graphs, which a
graph replay does not see). The pass's notes give both times per region. Elsewhere (CPU) it merges. First run
(H100, reports/2026-12-07-h100-s18-eb2cb76/call2): DeiT-S's regions 124.4 µs merged against 136.5; Swin-T's seven
also faster merged (259.7 against 267.5 at stage 1), yet the kernel table without graphs still has the merge at +2%
there: why timing in a graph and the kernels of an uncaptured run disagree is open (benchmarks/NOTES.md).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..ops.families import batched_matmul_operands, last_two_dims_swapped
from ..runtime.strides import dense_in_order
from .base import note, record, tag

PASS_NAME = "merge_operand_copies"
MARGIN = 1.02  # the matmuls' own copies are kept only when they measure faster than one copy by more than this
_decisions: dict[tuple, tuple[float, float]] = {}  # (device, region, input layouts) -> (one copy µs, own copies µs)


def merge_operand_copies(gm: fx.GraphModule) -> PassResult:
    """NOTE [One copy for matmul operands]: slices of one tensor that matmuls would each copy -> one copy."""
    done = kept = 0
    for node in list(gm.graph.nodes):
        slices = _slices(node)
        if slices is None:
            continue
        source, readers = slices
        paths = [p for s in readers for p in _paths_to_copying_matmuls(gm, s)]
        if len(paths) < 2 or _aliasing_observable(gm, source, readers):
            continue
        times = _measured(source, readers, paths)
        if times is not None:
            merged_us, own_us = times
            keep = merged_us > MARGIN * own_us
            note(f"{PASS_NAME}: {source.name}: one copy {merged_us:.1f} µs a call against the matmuls' own copies "
                 f"{own_us:.1f} µs: {'kept their own' if keep else 'merged'}")
            if keep:
                kept += 1
                continue
        first = next(n for n in gm.graph.nodes if n in readers)  # before the first reader (the source may be an input)
        with gm.graph.inserting_before(first):
            whole = tag(gm.graph.call_method("contiguous", (source,)), PASS_NAME)
        for s in readers:  # the unbind, or each integer getitem, now reads the copy
            s.replace_input_with(source, whole)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
        record(copies_merged=done)
    if kept:
        record(kept_by_measurement=kept)
    return PassResult(gm, done > 0)


def _slices(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(x, the slices' values)`` where ``node`` is a non-contiguous ``x`` read only by ``unbind(x, 0)`` (the
    slices: its getitems) or by integer getitems ``x[i]``; else None."""
    tm = ops.tensor_meta(node)
    if tm is None or len(tm.shape) < 4 or not node.users:
        return None
    if dense_in_order(tm.shape, tm.stride, range(len(tm.shape) - 1, -1, -1)):
        return None  # contiguous: its slices fold already
    users = list(node.users)
    if all(u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2
           and u.args[0] is node and type(u.args[1]) is int for u in users):
        return node, users
    if len(users) != 1:
        return None
    unbind = users[0]
    if not ops.is_call_to(unbind, ops.UNBIND_SPELLINGS) or unbind.args[0] is not node or set(unbind.kwargs) - {"dim"}:
        return None
    if unbind.kwargs.get("dim", unbind.args[1] if len(unbind.args) > 1 else 0) != 0:
        return None
    items = list(unbind.users)
    if not all(u.op == "call_function" and u.target is operator.getitem for u in items):
        return None
    return node, [unbind]


def _aliasing_observable(gm: fx.GraphModule, source: fx.Node, readers: list[fx.Node]) -> bool:
    """Whether the slices turning into views of a copy could be seen: an in-place op writes the memory they shared
    with ``source`` and its base (through any view of either), or a slice is returned (it would no longer alias the
    base's other views)."""
    node = source
    while True:
        if ops.inplace_writers(node, gm):
            return True
        if not ops.is_view_like(node) or not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    values = [v for r in readers for v in (r.users if r.target is not operator.getitem else [r])]
    return any(u.op == "output" for v in values for u in v.users)


def _paths_to_copying_matmuls(gm: fx.GraphModule, start: fx.Node) -> list[list[fx.Node]]:
    """For each value read from ``start`` (a getitem, or an unbind's getitems) that reaches a matmul operand whose
    batch dims do not fold as a view (through elementwise ops and last-two-dim transposes): the value and the nodes
    from it to that matmul."""
    values = list(start.users) if start.op != "call_function" or start.target is not operator.getitem else [start]
    return [p for p in (_path_to_copying_matmul(gm, v) for v in values) if p is not None]


def _path_to_copying_matmul(gm: fx.GraphModule, value: fx.Node) -> list[fx.Node] | None:
    path = [value]
    for _ in range(4):
        if len(value.users) != 1:
            return None
        user = next(iter(value.users))
        path.append(user)
        ab = batched_matmul_operands(user)
        if ab is not None:  # a batched matmul of two >2-d operands: the batch dims fold into bmm's one
            other = ops.tensor_meta(ab[1] if ab[0] is value else ab[0])
            tm = ops.tensor_meta(value)
            copies = (tm is not None and other is not None and len(tm.shape) >= 4 and len(other.shape) >= 3
                      and not _batch_folds(tm.shape, tm.stride))
            return path if copies else None
        if last_two_dims_swapped(user) is value or _elementwise_on(gm, user, value):
            value = user
            continue
        return None
    return None


def _measured(source: fx.Node, readers: list[fx.Node], paths: list[list[fx.Node]]) -> tuple[float, float] | None:
    """(one copy µs, the matmuls' own copies µs) for the region from ``source`` to the matmuls on its CUDA device,
    measured once per region, shape and layout in a process (NOTE [Choosing by measurement]); None off CUDA or where
    the region cannot be timed (the merge is then made)."""
    device = source.meta.get("device")
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    (merged, inputs), (own, _) = (region_of(source, readers, paths, merge) for merge in (True, False))
    metas = [ops.tensor_meta(n) for n in inputs]
    if any(tm is None for tm in metas):
        return None
    key = (str(device), own.code, tuple((tuple(tm.shape), tuple(tm.stride), tm.dtype) for tm in metas))
    if key not in _decisions:
        from ..runtime.probe import graph_times_us, random_like

        try:
            with torch.no_grad(), torch.cuda.device(device):
                args = [random_like(n) for n in inputs]
                _decisions[key] = tuple(graph_times_us([lambda: merged(*args), lambda: own(*args)]))
        except Exception as e:  # noqa: BLE001 -- not timed: merged, as off CUDA
            note(f"{PASS_NAME}: {source.name}: not timed ({type(e).__name__}: {e}); merged")
            return None
    return _decisions[key]


def region_of(source: fx.Node, readers: list[fx.Node], paths: list[list[fx.Node]],
              merge: bool) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The ops from ``source`` through its slicing ``readers`` and ``paths`` to the matmuls, as a module of their
    inputs (``source`` first, then what the matmuls read from outside, such as attention's probabilities) returning
    the matmuls' products; with ``merge``, ``source`` is copied once first. Nodes are named by position, so two
    regions of one structure have the same code (the measurement's cache key)."""
    order = {n: i for i, n in enumerate(source.graph.nodes)}
    members = set(readers) | {n for p in paths for n in p}
    members |= {g for r in readers if r.target is not operator.getitem for g in r.users}  # an unbind's items
    members = sorted(members, key=order.__getitem__)
    inputs = [source] + sorted({a for n in members for a in n.all_input_nodes if a not in members and a is not source},
                               key=order.__getitem__)
    graph = fx.Graph()
    env = {a: graph.placeholder(f"in{i}") for i, a in enumerate(inputs)}
    if merge:
        env[source] = graph.call_method("contiguous", (env[source],))
    for i, n in enumerate(members):
        env[n] = graph.create_node(n.op, n.target, fx.node.map_arg(n.args, env.__getitem__),
                                   fx.node.map_arg(n.kwargs, env.__getitem__), name=f"v{i}")
    graph.output(tuple(env[matmul] for matmul in dict.fromkeys(p[-1] for p in paths)))
    return fx.GraphModule(torch.nn.Module(), graph), inputs


def _elementwise_on(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` is an elementwise op whose one tensor operand is ``value`` (the rest numbers): its output
    keeps ``value``'s layout."""
    if node.op not in ("call_function", "call_method"):
        return False
    call = ops.match_elementwise(node, gm)
    if isinstance(call, str):
        return False
    tensors = [o for o in call.operands if isinstance(o, fx.Node)]
    vt, nt = ops.tensor_meta(value), ops.tensor_meta(node)
    return (tensors == [value] and vt is not None and nt is not None and tuple(vt.shape) == tuple(nt.shape)
            and all(isinstance(o, (int, float)) for o in call.operands if not isinstance(o, fx.Node)))


def _batch_folds(shape: Any, stride: Any) -> bool:
    """Whether the dims before the last two fold into one as a view (size-1 dims ignored)."""
    dims = [(n, s) for n, s in zip(shape[:-2], stride[:-2]) if n != 1]
    return all(s_outer == n_inner * s_inner for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]))
