"""Horizontal fusion: Linear layers that read the same input -> one GEMM on their concatenated weights.

Attention's q, k and v projections and a gated MLP's gate and up projections read one tensor each. As separate
GEMMs they cost a launch each and, at batch-1 decode (a matrix-vector product each), leave most of the GPU idle;
gpt-fast and llama.cpp store them fused (``wqkv``, ``w13``) for that reason. Here the weights are concatenated once,
at optimize time, and each original output becomes a view (``narrow`` on the last dim) of the one GEMM's output.

Before (transformers' LlamaAttention)::

    q = self.q_proj(x);  k = self.k_proj(x);  v = self.v_proj(x)

After::

    qkv = torch._C._nn.linear(x, merged_linear_weight, merged_linear_bias)
    q = qkv.narrow(-1, 0, 256);  k = qkv.narrow(-1, 256, 128);  v = qkv.narrow(-1, 384, 128)

Only Linear layers whose weights (and biases) are constants of the model, all with or all without a bias, of one
dtype and device, called on the same node.

Convolutions likewise (NOTE [Sibling convolutions]): one convolution on the concatenated output channels, each
original output a ``narrow`` of dim 1; only where no sibling's output feeds an elementwise op, whose kernel would
otherwise take the convolution's bias or whose ReLU cuDNN would fuse. The concatenated copy is memory fxopt holds beyond the model's (like
folded BatchNorm weights); the verification after the pass compares against eager, and a consumer that needs a
contiguous tensor (``view`` on the slice) makes the pass roll back rather than compute anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from .base import new_attr, record, tag
from .epilogue import as_gemm
from .fold import constant_tensor

PASS_NAME = "merge_sibling_linears"


@dataclass
class _Linear:
    node: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None


def as_linear(gm: fx.GraphModule, node: fx.Node) -> _Linear | None:
    """A Linear on constant weights, in module or functional spelling, else None (also few_row_linears' matcher)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if ops.is_linear_module(m) and len(node.args) == 1 and not node.kwargs:
            return _Linear(node, m.weight, m.bias)
        return None
    if node.op != "call_function" or not ops.is_linear_function(node.target) or node.kwargs:
        return None
    if len(node.args) not in (2, 3):
        return None
    weight = constant_tensor(gm, node.args[1])
    bias_arg = node.args[2] if len(node.args) == 3 else None
    bias = constant_tensor(gm, bias_arg)
    if not isinstance(weight, torch.Tensor) or (bias_arg is not None and not isinstance(bias, torch.Tensor)):
        return None
    return _Linear(node, weight, bias)


def linear_param_node(gm: fx.GraphModule, node: fx.Node, lin: _Linear, name: str, pass_name: str) -> fx.Node:
    """The graph node reading the Linear's weight or bias (``name``): its functional argument, or a get_attr of the
    module's (made at the graph's insertion point, tagged with ``pass_name``)."""
    if node.op == "call_module":
        attr = tag(gm.graph.get_attr(f"{node.target}.{name}"), pass_name)
        t = getattr(lin, name)
        ops.set_tensor_meta(attr, t, t.device)
        return attr
    return node.args[1 if name == "weight" else 2]


# NOTE [Sibling convolutions]: a diffusion UNet's attention projects q, k and v with three 1x1 convolutions of one
# GroupNorm output, each read through ``flatten(2)`` by a batched matmul: three convolutions and, since ATen adds a
# cuDNN convolution's bias with a kernel of its own and no elementwise op reads the outputs (so the bias cannot move
# into one: NOTE [Conv bias in the tail]), three bias adds (fp16, H100: about 3.2 µs a convolution and 2.7 an add,
# reports/2026-12-06-h100-s9-b02a0d4/call4-959656a/kt_diffusion_block_float16.txt). One convolution of 3C outputs and
# one bias add do the same. Where a sibling's output feeds an elementwise op, merging would cost that op's fused bias
# or cuDNN's fused ReLU (NOTE [Grouped convolutions keep their ReLU apart] in epilogue.py has what such choices
# cost), so those groups stay apart.
@dataclass
class _Conv:
    node: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    geometry: tuple  # stride, padding, dilation (pairs)


def _as_conv(gm: fx.GraphModule, node: fx.Node) -> _Conv | None:
    """A 2-D convolution of groups 1 on constant weights, any spelling (epilogue.as_gemm), else None."""
    gemm = as_gemm(gm, node)
    if gemm is None or gemm.kind != "conv2d" or gemm.groups != 1:
        return None
    weight = constant_tensor(gm, gemm.weight)
    bias = constant_tensor(gm, gemm.bias) if gemm.bias is not None else None
    if not isinstance(weight, torch.Tensor) or (gemm.bias is not None and not isinstance(bias, torch.Tensor)):
        return None
    return _Conv(node, weight, bias, (gemm.stride, gemm.padding, gemm.dilation))


def _feeds_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    return any(not isinstance(ops.match_elementwise(user, gm), str) for user in node.users)


def _conv_groups(gm: fx.GraphModule) -> list[list[_Conv]]:
    """Sibling convolutions (NOTE [Sibling convolutions]), grouped by what lets their weights concatenate."""
    found = []
    for node in gm.graph.nodes:
        by_kind: dict[tuple, list[_Conv]] = {}
        for user in node.users:
            conv = _as_conv(gm, user)
            if conv is None or user.args[0] is not node or conv.weight.dim() != 4 or _feeds_elementwise(gm, user):
                continue
            key = (tuple(conv.weight.shape[1:]), conv.weight.dtype, conv.weight.device, conv.bias is None,
                   conv.geometry)
            by_kind.setdefault(key, []).append(conv)
        found.extend(group for group in by_kind.values() if len(group) > 1)
    return found


def _merge(gm: fx.GraphModule, group: list, kind: str, dim: int, call: Any) -> None:
    """One ``call(graph, x, weight, bias)`` on the group's concatenated weights (attributes ``merged_{kind}_...``);
    each member's output a ``narrow`` of ``dim``."""
    graph = gm.graph
    x = group[0].node.args[0]
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in group], 0)
        bias = None if group[0].bias is None else torch.cat([m.bias.detach() for m in group], 0)
    with graph.inserting_before(group[0].node):
        w = tag(graph.get_attr(new_attr(gm, f"merged_{kind}_weight", weight)), PASS_NAME)
        b = None if bias is None else tag(graph.get_attr(new_attr(gm, f"merged_{kind}_bias", bias)), PASS_NAME)
        out = tag(call(graph, x, w, b), PASS_NAME)
        offset = 0
        views = []
        for member in group:
            n = member.weight.shape[0]
            views.append(tag(graph.call_method("narrow", (out, dim, offset, n)), PASS_NAME))
            offset += n
    for member, view in zip(group, views):
        view.meta.update(member.node.meta)
        member.node.replace_all_uses_with(view)
        graph.erase_node(member.node)


def _groups(gm: fx.GraphModule) -> list[list[_Linear]]:
    """Linears called on one input, grouped by what lets their weights concatenate."""
    found = []
    for node in gm.graph.nodes:
        by_kind: dict[tuple, list[_Linear]] = {}
        for user in node.users:
            lin = as_linear(gm, user)
            if lin is None or user.args[0] is not node or lin.weight.dim() != 2:
                continue
            key = (lin.weight.shape[1], lin.weight.dtype, lin.weight.device, lin.bias is None)
            by_kind.setdefault(key, []).append(lin)
        found.extend(group for group in by_kind.values() if len(group) > 1)
    return found


def merge_sibling_linears(gm: fx.GraphModule) -> PassResult:
    """Linears (and convolutions: NOTE [Sibling convolutions]) reading the same input -> one GEMM (convolution) and
    a view per original output (module docstring)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    merged = {"linears_merged": 0, "convs_merged": 0}
    for group in _groups(gm):
        group.sort(key=lambda lin: order[lin.node])
        _merge(gm, group, "linear", -1, lambda graph, x, w, b: graph.call_function(F.linear, (x, w, b)))
        merged["linears_merged"] += len(group)
    for group in _conv_groups(gm):
        group.sort(key=lambda conv: order[conv.node])
        stride, padding, dilation = group[0].geometry
        _merge(gm, group, "conv", 1, lambda graph, x, w, b: graph.call_function(
            F.conv2d, (x, w, b, stride, padding, dilation, 1)))
        merged["convs_merged"] += len(group)
    if any(merged.values()):
        gm.delete_all_unused_submodules()
        gm.recompile()
        record(**{k: v for k, v in merged.items() if v})
    return PassResult(gm, any(merged.values()))
