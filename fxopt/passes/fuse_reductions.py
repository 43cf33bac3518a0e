"""Fuse each reduction over the last dimension with its elementwise prologue and epilogue into one row-wise kernel.

Reductions: softmax, log_softmax, layer_norm, rms_norm, sum, mean, amax over the last dim (every spelling in
``fxopt/ops/``). Before (a transformer's residual + LayerNorm; three launches)::

    add = x + residual
    ln = self.norm(add)                     # nn.LayerNorm(hidden)
    mul = ln * scale

After (one launch; ``add`` is an extra output because it is used again later)::

    fused = torch.ops.fxopt.fused.default('fxopt_rows_add_layer_norm_mul_1a2b3c4d',
                                          [x, residual, norm_weight, norm_bias, scale])
    getitem = fused[0]                      # mul
    getitem_1 = fused[1]                    # add

A group grows from a reduction (the seed) along producer and consumer edges, over nodes of one *row shape*
``S = (..., n)`` on one device:

* elementwise ops of shape ``S`` (per element), or of the reduced shape ``S[:-1] + (1,)`` / ``S[:-1]`` (per row:
  ``rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``);
* further reductions over the last dim of a per-element group value (chained: ``log_softmax(softmax(x))``, a
  hand-written LayerNorm with two means), up to ``max_stages`` passes over the row;
* operands from outside the group become kernel inputs, broadcast by strides: full-size tensors (a residual),
  row-broadcast vectors (weights of shape ``(n,)``), per-row tensors, scalars.

Values used outside the group become extra outputs. Groups are cycle-free (no path leaves the group and comes
back).

sum, mean and amax over several trailing dims (``silu(x).mean((2, 3), keepdim=True)`` of ``[N, C, H, W]``: an SE
block's squeeze, a global average pool after an activation) reduce rows that span those dims (``H * W`` elements;
``row_dims`` of the program): the group is that reduction with its elementwise prologue and epilogue of the
logical shape ``S = (N, C, H, W)`` (per row: ``(N, C, 1, 1)`` or ``(N, C)``); operands are per-element (dense over
the row's dims, a residual) or per-row (``(C, 1, 1)``, a channel scale); another such reduction over the same dims
joins it (a GroupNorm's variance after its mean).

Stays eager, with a note: a reduction over another dim or several dims that are not the trailing ones, integer dtypes,
in-place ops and the values they write, a group that fails to compile. An input need not be contiguous along the
row (ConvNeXt's LayerNorm over the channels of a permuted NCHW tensor): the kernel reads it at its stride.
Unused and non-fusible things stay exactly as they were.

Runs before ``fuse_elementwise``, so elementwise ops next to reductions end in the row-wise kernel.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..codegen import rowwise
from ..codegen.rowwise import ELEM, REDUCED, RIGHT, ROWK, ROWN, one_strided_run, storable_order
from ..runtime.kernel import KERNELS, fused_op, register
from ..runtime.rowwise import RowwiseKernel
from .base import note, record, tag
from .fuse_elementwise import FuseElementwise, mutated_values, stable_topological_sort, insertion_point
from .keep_faster import remember_region

PASS_NAME = "fuse_reductions"
BACKENDS = ("cuda", "cpp")


# NOTE [Reshapes before a row reduction]: a group holds one row shape, so a reshape of the leading dims between an
# elementwise op and the reduction that reads it splits them into two kernels. timm's Swin does it twice a block:
#
#     x = x + attn_out                  # [B, H, W, C]
#     x = x.reshape(B, -1, C)           # [B, H * W, C]
#     y = self.norm2(x)                 # LayerNorm over C
#
# (and the MLP's residual add before the next block's norm1, the other way round). A reshape that keeps the last
# dim is a regrouping of rows, so the elementwise op can run on the reshaped shape instead: each operand is
# reshaped (a view, checked: an operand that would be copied stops the rewrite), vectors along the last dim are
# taken as they are, and the op's other readers get its result reshaped back (a view of the new result, as the
# old reshape was a view of the old one). Applied from each reduction back through the elementwise ops that feed
# it, so the whole prologue (bias add, residual add) lands on the row shape and joins the row kernel.
def _set_meta(node: fx.Node, t: torch.Tensor, like: fx.Node) -> None:
    ops.set_tensor_meta(node, t, like.meta.get("device"))


# meta keys: a reshape back to an op's old shape, and an op already moved to a reshaped shape; neither moves again,
# so two reductions that read one op through reshapes of their own do not pull it back and forth
_SUNK = "fxopt_reshape_back"
_MOVED = "fxopt_moved_to_rows"


def _row_reshape(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A torch-level reshape that keeps the last dim (it regroups the rows only), not one this rewrite wrote back."""
    if not (node.op == "call_method" and ops.is_reshape(node, gm) and isinstance(node.args[0], fx.Node)):
        return False
    if node.meta.get(_SUNK):
        return False
    a, b = ops.tensor_meta(node.args[0]), ops.tensor_meta(node)
    return a is not None and b is not None and len(a.shape) >= 1 and len(b.shape) >= 1 and a.shape[-1] == b.shape[-1]


def _sink_reshape(r: fx.Node, gm: fx.GraphModule, mutated: set[fx.Node]) -> fx.Node | None:
    """Rewrite ``op(a, b).reshape(s)`` as ``op(a.reshape(s), b.reshape(s))`` (the note); the new op, or None."""
    e = r.args[0]
    if e.op not in ("call_function", "call_method", "call_module") or e in mutated or r in mutated:
        return None
    if e.meta.get(_MOVED):
        return None
    call = ops.match_elementwise(e, gm)
    if isinstance(call, str) or call.op.gathers or ops.is_inplace(e, gm):
        return None
    shape = tuple(ops.tensor_meta(r).shape)
    old_shape = tuple(ops.tensor_meta(e).shape)
    n = shape[-1]
    new_operands: dict[fx.Node, Any] = {}  # operand -> (a meta tensor of its new form, or None: used as it is)
    for o in e.all_input_nodes:
        t = ops.meta_tensor(o)
        if t is None:
            return None
        if tuple(t.shape) == old_shape:
            try:
                new_operands[o] = t.view(shape)  # raises where the reshape would copy
            except RuntimeError:
                return None
        elif all(d == 1 for d in t.shape[:-1]) and t.dim() <= len(shape) and (t.dim() == 0 or t.shape[-1] in (1, n)):
            new_operands[o] = None  # a scalar or a vector along the last dim broadcasts the same in either shape
        else:
            return None
    graph = gm.graph
    with graph.inserting_before(e):
        replacements = {}
        for o, t in new_operands.items():
            if t is None:
                continue
            # a reshape of a reshape read here alone: one reshape of the first one's input
            source = o.args[0] if (o.op == "call_method" and ops.is_reshape(o, gm) and len(o.users) == 1
                                   and isinstance(o.args[0], fx.Node)) else o
            v = tag(graph.call_method("reshape", (source, *shape)), PASS_NAME)  # may sink further, into o
            _set_meta(v, t, o)
            replacements[o] = v
        twin = graph.node_copy(e, lambda a: replacements.get(a, a))
        tag(twin, PASS_NAME)
        twin.meta[_MOVED] = True
    metas = {o: (t if t is not None else ops.meta_tensor(o)) for o, t in new_operands.items()}
    try:
        out = _run_meta(twin, gm, metas, replacements)
    except Exception:  # noqa: BLE001 -- the op does not run on meta tensors: leave the graph as it was
        for v in [twin, *replacements.values()]:
            graph.erase_node(v)
        return None
    _set_meta(twin, out, e)
    r.replace_all_uses_with(twin)
    graph.erase_node(r)
    if e.users:  # e's other readers: the new result reshaped back, a view of it as r was of e
        with graph.inserting_after(twin):
            back = tag(graph.call_method("reshape", (twin, *old_shape)), PASS_NAME)
        back.meta[_SUNK] = True
        _set_meta(back, out.reshape(old_shape), e)
        e.replace_all_uses_with(back)
    graph.erase_node(e)
    for o in replacements:
        if not o.users and o.op == "call_method" and ops.is_reshape(o, gm):
            graph.erase_node(o)  # the inner reshape of a chain, now unread
    return twin


def _run_meta(node: fx.Node, gm: fx.GraphModule, metas: dict, replacements: dict) -> torch.Tensor:
    """The node run on meta tensors (its output's shape, strides and dtype)."""
    env = {replacements.get(o, o): t for o, t in metas.items()}
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return gm.get_submodule(node.target)(*args, **kwargs)


def sink_reshapes_into_rows(gm: fx.GraphModule, mutated: set[fx.Node]) -> int:
    """NOTE [Reshapes before a row reduction]: from each row reduction back through its elementwise producers."""
    done = 0
    for seed in list(gm.graph.nodes):
        if seed.op not in ("call_function", "call_method", "call_module"):
            continue
        call = ops.match_row_reduction(seed, gm)
        if not isinstance(call, ops.RowReductionCall):
            continue
        stack, seen = [call.input], set()
        while stack and len(seen) < 32:
            x = stack.pop()
            if x in seen or not isinstance(x, fx.Node):
                continue
            seen.add(x)
            if _row_reshape(x, gm):
                twin = _sink_reshape(x, gm, mutated)
                if twin is not None:
                    done += 1
                    stack.append(twin)
                continue
            if x.op in ("call_function", "call_method", "call_module") and not isinstance(
                    ops.match_elementwise(x, gm), str):
                stack.extend(x.all_input_nodes)
    return done


class _Group:
    """A growing group: member nodes with their level and canonical call, over one row shape."""

    def __init__(self, gm: fx.GraphModule, row_shape: tuple[int, ...], device: torch.device,
                 order: dict[fx.Node, int], mutated: set[fx.Node], row_dims: int = 1):
        self.gm = gm
        self.S = row_shape  # the logical shape: a row spans its last ``row_dims`` dims
        self.R = len(row_shape)
        self.K = row_dims
        self.N = math.prod(row_shape[-row_dims:])
        self.SK = row_shape[:-row_dims] + (1,) * row_dims
        self.SN = row_shape[:-row_dims]
        self.device = device
        self.order = order
        self.mutated = mutated
        self.levels: dict[fx.Node, str] = {}  # value nodes
        self.calls: dict[fx.Node, Any] = {}
        self.carriers: set[fx.Node] = set()  # tuple-returning reductions (their getitem 0 is the value node)
        self.stages = 0
        # NOTE [Rows over strided dims]: operands read as one strided run over the row's dims; allowed only while
        # the kernel can store every per-element output in eager's layout (NOTE [Outputs in eager's layout])
        self.allow_runs = True
        self.runs: set[fx.Node] = set()
        self.allow_two_level = True  # NOTE [Rows over two dims]: operands of any strides over two row dims

    def members(self) -> set[fx.Node]:
        return set(self.levels) | self.carriers

    def __contains__(self, node: fx.Node) -> bool:
        return node in self.levels or node in self.carriers

    def __len__(self) -> int:
        return len(self.levels) + len(self.carriers)

    # -- levels ----------------------------------------------------------------------------------------------
    def level_for(self, node: fx.Node, call: ops.ElementwiseCall) -> str | None:
        """The level an elementwise node would have in the group, or None if its shape or its mix of operands
        does not fit the row shape (``x / x.sum(-1)`` broadcasts a per-row value along the row: not row-wise)."""
        shape = tuple(ops.tensor_meta(node).shape)
        group_levels = [self.levels[o] for o in call.operands if isinstance(o, fx.Node) and o in self.levels]
        if ROWN in group_levels and self.SN:
            return ROWN if shape == self.SN and all(lv == ROWN for lv in group_levels) else None
        if shape == self.S:
            return ELEM  # row length 1: S is also the keepdim shape; per-element is right for both
        if shape == self.SK:
            return ROWK if ELEM not in group_levels else None
        if shape == self.SN:
            return ROWN if all(lv == ROWN for lv in group_levels) else None
        return None

    def _operand_ok(self, o: Any, level: str) -> str | None:
        """Why an operand from outside the group cannot be a kernel input for a consumer at ``level``."""
        if not isinstance(o, fx.Node) or o in self:
            return None
        tm = ops.tensor_meta(o)
        if tm is None:
            return f"{o.name} is not a tensor"
        if o.meta.get("device") != self.device:
            return f"{o.name} is on {o.meta.get('device')}"
        if o in self.mutated:
            return f"an in-place op writes {o.name}"
        shape = rowwise.aligned_shape(tm.shape, REDUCED if level == ROWN else RIGHT, self.R, self.K)
        if len(shape) != self.R:
            return f"{o.name} has rank {len(tm.shape)}"
        if self.K > 1:
            return self._row_operand_ok(o, shape[-self.K:], tm)
        return None  # any strides: the kernel reads a row at its stride (NOTE [Strided rows])

    def _row_operand_ok(self, o: fx.Node, trailing: tuple[int, ...], tm) -> str | None:
        """Rows over several dims: an operand has one value per row (unit there) or the whole row, dense, or (NOTE
        [Rows over strided dims]) as one run of a single stride."""
        if all(d == 1 for d in trailing):
            return None
        if trailing != self.S[-self.K:]:
            return f"{o.name} broadcasts within a row of {self.S[-self.K:]} (shape {tuple(tm.shape)})"
        run = one_strided_run(tm.shape[-self.K:], tm.stride[-self.K:])
        if run == 1:
            return None
        if run is not None and self.allow_runs:
            self.runs.add(o)
            return None
        if self.K == 2 and self.allow_two_level:  # NOTE [Rows over two dims]: the group keeps its statistics
            return None
        return f"{o.name} is not dense over the row's dims (strides {tuple(tm.stride)})"

    def operands_ok(self, operands, level: str) -> str | None:
        for o in operands:
            reason = self._operand_ok(o, level)
            if reason:
                return reason
        return None

    # -- cycles --------------------------------------------------------------------------------------------------
    def _reaches_group(self, starts) -> bool:
        """A path from one of ``starts`` (outside the group) forward into the group."""
        members = self.members()
        hi = max(self.order[m] for m in members)
        stack, seen = [s for s in starts if s not in members], set()
        while stack:
            n = stack.pop()
            if n in seen or self.order.get(n, hi + 1) > hi:
                continue
            seen.add(n)
            for u in n.users:
                if u in members:
                    return True
                stack.append(u)
        return False

    def _reached_from_group(self, starts) -> bool:
        """A path from the group forward to one of ``starts`` (outside the group)."""
        members = self.members()
        lo = min(self.order[m] for m in members)
        stack, seen = [s for s in starts if s not in members], set()
        while stack:
            n = stack.pop()
            if n in seen or self.order.get(n, -1) < lo:
                continue
            seen.add(n)
            for a in n.all_input_nodes:
                if a in members:
                    return True
                stack.append(a)
        return False

    # -- adding --------------------------------------------------------------------------------------------------
    def add_reduction(self, node: fx.Node, call: ops.RowReductionCall) -> fx.Node | str:
        """Add a reduction node; returns its value node (its getitem for tuple-returning spellings) or why not."""
        value = node
        if call.tuple_output:
            users = list(node.users)
            if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
                return "its mean/rstd outputs are used"
            value = users[0]
            self.carriers.add(node)
        if call.op.reduces_shape:
            self.levels[value] = ROWK if call.keepdim else ROWN
        else:
            self.levels[value] = ELEM
        self.calls[value] = call
        self.stages += len(call.op.stages)
        return value

    def remove(self, node: fx.Node, value: fx.Node) -> None:
        self.levels.pop(value, None)
        self.calls.pop(value, None)
        self.carriers.discard(node)


def _reduction_over_group_rows(group: _Group, node: fx.Node) -> ops.RowReductionCall | str | None:
    """``node`` as a reduction over the rows the group reduces (the last dim, or its last ``K`` dims: a GroupNorm's
    variance after its mean, over ``[N, G, C / G, H * W]``), why not, or None when it is no reduction."""
    red = ops.match_row_reduction(node, group.gm)
    if red is None or group.K == 1:
        return red
    trailing = trailing_reduction(node, group.gm) if isinstance(red, str) else None
    if trailing is None or trailing[1] != group.K:
        return "a reduction over other dims than the group's rows"
    return trailing[0]


def _input_ok(group: _Group, call: ops.RowReductionCall) -> bool:
    """A chained reduction reads a per-element group value of the group's row shape."""
    x = call.input
    if x not in group.levels or tuple(ops.tensor_meta(x).shape) != group.S:
        return False
    return group.levels[x] == ELEM or group.N == 1


def trailing_reduction(node: fx.Node, gm: fx.GraphModule) -> tuple[ops.RowReductionCall, int] | None:
    """A sum/mean/amax (a reduction to one value per row) over the last k >= 2 dims of its input, but not all of
    them: the call (``dim`` set to the last dim) and k; None for anything else."""
    call = ops.normalize_row_reduction(node, gm)
    if not isinstance(call, ops.RowReductionCall) or not call.op.reduces_shape or call.operands:
        return None
    tm_in, tm_out = ops.tensor_meta(call.input), ops.row_reduction_meta(node)
    if tm_in is None or tm_out is None or tm_in.dtype not in ops.FLOAT_DTYPES or tm_out.dtype not in ops.FLOAT_DTYPES:
        return None
    ndim, dim = len(tm_in.shape), call.dim
    if not isinstance(dim, (list, tuple)) or not all(isinstance(d, int) and -ndim <= d < ndim for d in dim):
        return None
    dims = sorted({d % ndim for d in dim})
    k = len(dims)
    if len(dim) != k or not 2 <= k < ndim or dims != list(range(ndim - k, ndim)):
        return None
    call.dim = ndim - 1
    return call, k


class FuseReductions:
    """The pass, configured with a backend: ``"cuda"`` (NVRTC) or ``"cpp"`` (the system C++ compiler).

    ``min_nodes``: the smallest group fused (1: a lone softmax or LayerNorm becomes a generated kernel too);
    ``max_nodes``, ``max_stages``: caps on a group's size and on its passes over each row."""

    def __init__(self, backend: str, *, min_nodes: int = 1, max_nodes: int = 64, max_stages: int = 8):
        self.backend = backend
        self.device_type = {"cuda": "cuda", "cpp": "cpu"}.get(backend)
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.max_stages = max_stages

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if self.backend not in BACKENDS:
            note(f"{PASS_NAME}: backend {self.backend!r} generates no row-wise kernels; reductions stay as they are")
            return PassResult(gm, False)
        unavailable = FuseElementwise(self.backend)._unavailable()
        if unavailable:
            note(f"{PASS_NAME}: {unavailable}; reductions stay eager")
            return PassResult(gm, False)
        mutated = mutated_values(gm)
        sunk = sink_reshapes_into_rows(gm, mutated)  # NOTE [Reshapes before a row reduction]
        if sunk:
            record(reshapes_sunk=sunk)
        kernels = gm.meta.setdefault("fxopt_kernels", {})
        fused_any = False
        erased: set[fx.Node] = set()  # absorbed into an earlier group
        for seed in list(gm.graph.nodes):
            if seed in erased or seed.op not in ("call_function", "call_method", "call_module"):
                continue
            call = ops.match_row_reduction(seed, gm)
            if call is None:
                continue
            where = f"{PASS_NAME}: {seed.name} ({ops.describe(seed)})"
            row_dims = 1
            if isinstance(call, str):
                trailing = trailing_reduction(seed, gm)
                if trailing is None:
                    note(f"{where} stays eager: {call}")
                    continue
                call, row_dims = trailing
            device = call.input.meta.get("device")
            if device is None or device.type != self.device_type:
                continue  # another device's op: not this backend's
            if seed in mutated or call.input in mutated:
                note(f"{where} stays eager: an in-place op writes its input or result")
                continue
            group = self._grow(gm, seed, call, mutated, row_dims)
            if not isinstance(group, str) and _reads_two_level(group):
                _keep_statistics(group)
                if _elem_outputs(group):  # a per-element value the statistics need is read outside too
                    group = self._grow(gm, seed, call, mutated, row_dims, allow_two_level=False)
            if not isinstance(group, str) and group.runs and _unstorable_outputs(group):
                group = self._grow(gm, seed, call, mutated, row_dims, allow_runs=False,  # NOTE [Rows over strided dims]
                                   allow_two_level=group.allow_two_level)
            if isinstance(group, str):
                note(f"{where} stays eager: {group}")
                continue
            if sum(ops.launches_kernel(n, gm) for n in group.members()) < self.min_nodes:
                continue
            if call.attrs.get("pooling") and len(group) == 1:
                note(f"{where} stays ATen's pooling kernel: no elementwise op to join it")
                continue
            fused = self._fuse(gm, group, kernels, where)
            if fused:
                fused_any = True
                erased |= group.members()
                if fused == "reorder":  # the next group's cycle checks walk a topologically ordered graph
                    stable_topological_sort(gm)
        if fused_any or sunk:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, fused_any or sunk > 0)

    # -- grouping ---------------------------------------------------------------------------------------------
    def _grow(self, gm: fx.GraphModule, seed: fx.Node, call: ops.RowReductionCall,
              mutated: set[fx.Node], row_dims: int = 1, allow_runs: bool = True,
              allow_two_level: bool = True) -> _Group | str:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        row_shape = tuple(ops.tensor_meta(call.input).shape)
        group = _Group(gm, row_shape, call.input.meta["device"], order, mutated, row_dims)
        group.allow_runs = allow_runs
        group.allow_two_level = allow_two_level
        value = group.add_reduction(seed, call)
        if isinstance(value, str):
            return value
        reason = group.operands_ok([call.input, *call.operands.values()], ELEM)
        if reason:
            return reason
        if group.stages > self.max_stages:
            return f"{group.stages} passes over the row (max_stages={self.max_stages})"
        changed = True
        while changed and len(group) < self.max_nodes:
            changed = False
            for m in sorted(group.levels, key=order.__getitem__):
                if len(group) >= self.max_nodes:
                    break
                m_call = group.calls[m]
                producers = [m_call.input] if isinstance(m_call, ops.RowReductionCall) else m_call.operands
                for p in producers:
                    if isinstance(p, fx.Node) and p not in group and self._try_producer(group, p):
                        changed = True
                for u in list(m.users):
                    if u not in group and self._try_consumer(group, u):
                        changed = True
        return group

    def _elementwise(self, group: _Group, node: fx.Node) -> ops.ElementwiseCall | None:
        if node.op not in ("call_function", "call_method", "call_module") or node in group.mutated:
            return None
        if node.meta.get("device") != group.device:
            return None
        call = ops.match_elementwise(node, group.gm)
        if isinstance(call, str) or any(isinstance(o, fx.Node) and o in group.mutated for o in call.operands):
            return None
        return call

    def _try_producer(self, group: _Group, p: fx.Node) -> bool:
        if p.op in ("call_function", "call_method", "call_module") and p not in group.mutated:
            red = _reduction_over_group_rows(group, p)
            if red is not None:  # a chained reduction over the group's rows
                return not isinstance(red, str) and self._try_reduction_producer(group, p, red)
        call = self._elementwise(group, p)
        if call is None:
            return False
        level = group.level_for(p, call)
        if level is None or group.operands_ok(call.operands, level):
            return False
        if group._reaches_group([u for u in p.users if u not in group]):
            return False
        group.levels[p], group.calls[p] = level, call
        if not self._consistent(group, p):
            group.remove(p, p)
            return False
        return True

    def _try_reduction_producer(self, group: _Group, p: fx.Node, red: ops.RowReductionCall) -> bool:
        """A reduction over the same rows whose value the group reads (``x - x.mean(-1, keepdim=True)``)."""
        if red.tuple_output or tuple(ops.tensor_meta(red.input).shape) != group.S:
            return False
        if group.stages + len(red.op.stages) > self.max_stages:
            return False
        if red.input in group and not _input_ok(group, red):
            return False
        if any(isinstance(o, fx.Node) and o in group for o in red.operands.values()):
            return False
        if group.operands_ok([red.input, *red.operands.values()], ELEM):
            return False
        if group._reaches_group([u for u in p.users if u not in group]):
            return False
        group.add_reduction(p, red)
        if not self._consistent(group, p):
            group.remove(p, p)
            group.stages -= len(red.op.stages)
            return False
        return True

    def _consistent(self, group: _Group, p: fx.Node) -> bool:
        """Every member that reads ``p`` still has the level it had (an operand's level may change the mix)."""
        for u in p.users:
            if u not in group.levels:
                continue
            c = group.calls[u]
            if isinstance(c, ops.RowReductionCall):
                if c.input is p and not _input_ok(group, c):
                    return False
                if any(o is p for o in c.operands.values()):
                    return False
            elif group.level_for(u, c) != group.levels[u]:
                return False
        return True

    def _try_consumer(self, group: _Group, c: fx.Node) -> bool:
        if c.op not in ("call_function", "call_method", "call_module") or c in group.mutated:
            return False
        red = _reduction_over_group_rows(group, c)
        if red is not None:
            if isinstance(red, str) or not _input_ok(group, red):
                return False
            if group.stages + len(red.op.stages) > self.max_stages:
                return False
            if any(isinstance(o, fx.Node) and o in group for o in red.operands.values()):
                return False
            if group.operands_ok(red.operands.values(), ELEM):
                return False
            if group._reached_from_group([o for o in red.operands.values() if isinstance(o, fx.Node)]):
                return False
            return not isinstance(group.add_reduction(c, red), str)
        call = self._elementwise(group, c)
        if call is None:
            return False
        level = group.level_for(c, call)
        if level is None or group.operands_ok(call.operands, level):
            return False
        external = [o for o in call.operands if isinstance(o, fx.Node) and o not in group]
        if group._reached_from_group(external):
            return False
        group.levels[c], group.calls[c] = level, call
        return True

    # -- rewriting --------------------------------------------------------------------------------------------
    def _fuse(self, gm: fx.GraphModule, group: _Group, kernels: dict, where: str) -> bool | str:
        """Rewrite the group into one fused node; "reorder" when a user of its outputs now precedes it."""
        graph = gm.graph
        order = group.order  # the graph has not changed since the group was grown
        members = sorted(group.members(), key=order.__getitem__)
        inside = set(members)
        outputs = [n for n in members if n in group.levels and any(u not in inside for u in n.users)]
        if not outputs:
            return False
        names = " -> ".join(ops.describe(n) for n in members if n in group.levels)
        try:
            program, input_keys = rowwise.build_program(gm, members, group.calls, group.levels, outputs,
                                                        group.R - group.K + 1, self.backend, group.device, group.K)
            kernel = KERNELS.get(program.name)
            if kernel is None:
                kernel = register(RowwiseKernel(program, group.device).compile())
        except Exception as e:  # a group that cannot be lowered or compiled stays eager; the reason is kept
            note(f"{where}: group [{names}] kept as PyTorch ops: {type(e).__name__}: {e}")
            return False
        node_inputs = [k for k, _ in input_keys if isinstance(k, fx.Node)]
        anchor = max(node_inputs, key=order.__getitem__)
        reorder = any(order[u] < order[anchor] for out in outputs for u in out.users if u not in inside)
        with graph.inserting_before(insertion_point(anchor, inside, outputs)):  # NOTE [Fused node placement]
            args = []
            for key, _ in input_keys:
                if isinstance(key, str):  # a module's parameter (nn.LayerNorm.weight): read it with get_attr
                    attr = tag(graph.get_attr(key), PASS_NAME)
                    t = _attr_tensor(gm, key)
                    ops.set_tensor_meta(attr, t, t.device)
                    args.append(attr)
                else:
                    args.append(key)
            fused = graph.create_node("call_function", fused_op, (kernel.name, args), name="fused_rows")
            tag(fused, PASS_NAME)
            fused.meta["fxopt_kernel"] = kernel.name
            kernels[fused.name] = kernel
            remember_region(gm, fused, members, outputs, args)  # for keep_faster_regions (opt-in)
            for k, out in enumerate(outputs):
                item = graph.call_function(operator.getitem, (fused, k))
                tag(item, PASS_NAME)
                item.meta.update({m: out.meta[m] for m in ("tensor_meta", "device", "has_tensor") if m in out.meta})
                out.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
        for n in reversed(members):
            graph.erase_node(n)
        reductions = sum(isinstance(c, ops.RowReductionCall) for c in group.calls.values())
        record(groups=1, reductions=reductions, nodes_fused=len(group.levels))
        return "reorder" if reorder else True


def _attr_tensor(gm: fx.GraphModule, key: str) -> torch.Tensor:
    try:
        return gm.get_parameter(key)
    except AttributeError:
        return gm.get_buffer(key)


def _call_inputs(call: Any) -> list:
    """What a member's call reads: a reduction's input and operands, an elementwise op's operands."""
    return [call.input, *call.operands.values()] if isinstance(call, ops.RowReductionCall) else list(call.operands)


def _reads_two_level(group: _Group) -> bool:
    """Whether a member reads an operand from outside over two row dims that are neither dense nor one strided run
    (NOTE [Rows over two dims])."""
    if group.K != 2:
        return False
    members = group.members()
    for n in group.levels:
        for o in _call_inputs(group.calls[n]):
            if not isinstance(o, fx.Node) or o in members or (tm := ops.tensor_meta(o)) is None:
                continue
            if tuple(tm.shape[-2:]) == group.S[-2:] and one_strided_run(tm.shape[-2:], tm.stride[-2:]) is None:
                return True
    return False


def _elem_outputs(group: _Group) -> list[fx.Node]:
    """The group's per-element values read outside it."""
    members = group.members()
    return [n for n, level in group.levels.items() if level == ELEM and any(u not in members for u in n.users)]


def _keep_statistics(group: _Group) -> None:
    """A group reading an operand over two row dims of any strides (NOTE [Rows over two dims]) keeps its reductions,
    its per-row values and what they are computed from; per-element values computed from them (a GroupNorm's
    normalize, over a channels-last input) leave it, for fuse_elementwise, whose kernel reads and writes any layout.
    Nothing left reads what leaves, so the group stays free of cycles."""
    keep = {n for n, level in group.levels.items()
            if level != ELEM or isinstance(group.calls[n], ops.RowReductionCall)}
    stack = list(keep)
    while stack:
        for v in _call_inputs(group.calls[stack.pop()]):
            if isinstance(v, fx.Node) and v in group.levels and v not in keep:
                keep.add(v)
                stack.append(v)
    for n in [n for n in group.levels if n not in keep]:
        group.remove(n, n)


def _unstorable_outputs(group: _Group) -> list[fx.Node]:
    """The group's per-element outputs (members read outside it at the per-element level) that the kernel cannot
    store in eager's layout (NOTE [Outputs in eager's layout] in codegen/rowwise.py): neither row-major nor a dense
    order that keeps the row one strided run."""
    members = group.members()
    out = []
    for n in group.levels:
        if group.levels[n] != ELEM or all(u in members for u in n.users):
            continue
        tm = ops.tensor_meta(n)
        row_major = one_strided_run(tm.shape, tm.stride) == 1  # dense, innermost stride 1
        if storable_order(tm.shape, tm.stride, group.K) is None and not row_major:
            out.append(n)
    return out


def fuse_reductions(backend: str, **options) -> FuseReductions:
    """The row-wise reduction fusion pass for ``backend`` (``"cuda"`` or ``"cpp"``)."""
    return FuseReductions(backend, **options)
