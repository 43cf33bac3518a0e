"""GroupNorm -> per-group statistics and one normalize + affine step, so the fusion passes take it with its neighbours.

Eager's CUDA GroupNorm is its own kernels (statistics, then normalize + affine) and the activation after it (a
diffusion UNet's ``silu(group_norm(x))``) one more, each reading and writing the whole tensor. Written as its maths,
fuse_reductions turns the statistics into one row kernel (a row is a group: ``C / G * H * W`` elements) and
fuse_elementwise puts the normalize, the affine and what follows (SiLU, a residual add) in one generated kernel:
two kernels, one read of ``x`` less. Inductor lowers it the same way. A chain of elementwise ops that read only the
norm's output and numbers (the SiLU) is applied before the reshape back, so that it joins that kernel.

Before::

    group_norm = self.norm(x);  silu = F.silu(group_norm)

After (computed in float32 as eager's kernels do; ``N, G`` the batch and the groups)::

    xg = x.reshape(N, G, C // G, -1).float();  mean = xg.mean((-2, -1), keepdim=True)
    rstd = torch.rsqrt((xg - mean).pow(2).mean((-2, -1), keepdim=True) + eps)
    y = (xg - mean) * rstd
    y = (y * weight.reshape(G, C // G, 1) + bias.reshape(G, C // G, 1)).to(x.dtype).reshape(x.shape)

Only for a contiguous float input of rank 3 or more whose channels divide into the groups, on the devices in
``DEVICES``; the verification after the pass compares against eager.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from .base import note, record, tag

PASS_NAME = "decompose_group_norm"

# Where eager's GroupNorm is several kernels and the activation after it one more (CUDA). On the CPU, ATen's one
# vectorized GroupNorm op is cheaper than two generated C++ kernels would be (not measured: kept as it is).
DEVICES = frozenset({"cuda"})


def _as_group_norm(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any] | str | None:
    """{input, num_groups, weight, bias, eps} (weight/bias: graph values or qualified names), why not, or None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not ops.is_group_norm_module(m):
            return None
        if len(node.args) != 1 or node.kwargs:
            return "unexpected module call arguments"
        affine = m.weight is not None
        return {"input": node.args[0], "num_groups": m.num_groups, "eps": m.eps,
                "weight": f"{node.target}.weight" if affine else None,
                "bias": f"{node.target}.bias" if m.bias is not None else None}
    if node.op != "call_function" or node.target not in ops.GROUP_NORM_FUNCTIONS:
        return None
    bound = ops.bind_args(node, ops.GROUP_NORM_FUNCTIONS[node.target])
    if isinstance(bound, str):
        return bound
    bound.setdefault("eps", 1e-5)
    return bound


def _unsupported(gn: dict[str, Any]) -> str | None:
    x = gn["input"]
    tm = ops.tensor_meta(x) if isinstance(x, fx.Node) else None
    if tm is None:
        return "the input is not a graph tensor"
    if tm.dtype not in ops.FLOAT_DTYPES or tm.dtype == torch.float64:
        return f"dtype {tm.dtype}"
    if len(tm.shape) < 3:
        return "an input of rank below 3"
    if getattr(tm, "memory_format", None) is not torch.contiguous_format:
        return "the input is not contiguous"
    groups = gn["num_groups"]
    if not isinstance(groups, int) or groups <= 0 or tm.shape[1] % groups:
        return f"{tm.shape[1]} channels do not divide into {groups} groups"
    if not isinstance(gn["eps"], (int, float)):
        return "eps is not a number"
    return None


def decompose_group_norm(gm: fx.GraphModule, devices: frozenset[str] = DEVICES) -> PassResult:
    """Each GroupNorm on a device in ``devices`` -> statistics and an elementwise normalize (module docstring)."""
    done = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op not in ("call_module", "call_function"):
            continue
        gn = _as_group_norm(gm, node)
        if gn is None:
            continue
        device = node.meta.get("device")
        if getattr(device, "type", device) not in devices:
            continue
        why = gn if isinstance(gn, str) else _unsupported(gn)
        if why is not None:
            note(f"{PASS_NAME}: {node.name} kept ({why})")
            continue
        tm = ops.tensor_meta(gn["input"])
        tail = _unary_tail(gm, node)
        last = tail[-1] if tail else node
        with graph.inserting_before(last):
            y = _emit(graph, gn, tuple(tm.shape), tm.dtype)
            for op in tail:  # the activation after the norm, on the grouped view: one elementwise kernel with it
                y = tag(graph.node_copy(op, lambda a, op=op: y if a is op.args[0] else a), PASS_NAME)
            out = tag(graph.call_method("reshape", (y, -1, *tm.shape[1:])), PASS_NAME)
        out.meta.update(last.meta)
        last.replace_all_uses_with(out)
        for n in reversed([node, *tail]):
            graph.erase_node(n)
        done += 1
    if done:
        gm.delete_all_unused_submodules()
        gm.recompile()
        record(group_norms_decomposed=done)
    return PassResult(gm, done > 0)


def _emit(graph: fx.Graph, gn: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype) -> fx.Node:
    def method(name, *args) -> fx.Node:
        return tag(graph.call_method(name, args), PASS_NAME)

    def fn(f, *args) -> fx.Node:
        return tag(graph.call_function(f, args), PASS_NAME)

    def value(v):
        return tag(graph.get_attr(v), PASS_NAME) if isinstance(v, str) else v

    x, groups = gn["input"], gn["num_groups"]
    # -1 for the batch: an artifact keeps that dimension dynamic
    per_group, spatial = shape[1] // groups, math.prod(shape[2:])

    def as_float(v: fx.Node) -> fx.Node:  # eager's kernels compute in float32; for float32 nothing to do
        return v if dtype == torch.float32 else method("float", v)

    # one view for the statistics and the normalize: [N, G, C // G, H * W] is a view of a channels-last x too,
    # where [N, G, -1] is not (NOTE [Rows over two dims] in codegen/rowwise.py)
    # the statistics and the normalize each convert on their own: over a channels-last x the statistics' row kernel
    # keeps only what they need, and the normalize's conversion joins its elementwise kernel
    x4 = method("reshape", x, -1, groups, per_group, spatial)
    xs = as_float(x4)
    mean = method("mean", xs, (-2, -1), True)
    centered = fn(torch.sub, xs, mean)
    var = method("mean", fn(torch.mul, centered, centered), (-2, -1), True)
    rstd = fn(torch.rsqrt, fn(torch.add, var, float(gn["eps"])))
    y = fn(torch.mul, fn(torch.sub, as_float(x4), mean), rstd)
    weight, bias = value(gn.get("weight")), value(gn.get("bias"))
    if weight is not None:
        y = fn(torch.mul, y, method("reshape", weight, groups, per_group, 1))
    if bias is not None:
        y = fn(torch.add, y, method("reshape", bias, groups, per_group, 1))
    if dtype != torch.float32:
        y = method("to", y, dtype)
    return y


def _unary_tail(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The single-user chain of elementwise ops after ``node`` that read nothing but it and numbers (SiLU, GELU,
    ``x * 0.5``): applied per element, they give the same values on the grouped view."""
    tail, cur = [], node
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        call = ops.match_elementwise(user, gm)
        if isinstance(call, str) or call.operands != [cur] or not user.args or user.args[0] is not cur:
            break
        if any(isinstance(a, fx.Node) for a in [*user.args[1:], *user.kwargs.values()]):
            break
        tail.append(user)
        cur = user
    return tail
