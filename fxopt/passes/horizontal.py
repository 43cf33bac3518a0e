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
dtype and device, called on the same node. The concatenated copy is memory fxopt holds beyond the model's (like
folded BatchNorm weights); the verification after the pass compares against eager, and a consumer that needs a
contiguous tensor (``view`` on the slice) makes the pass roll back rather than compute anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from .base import new_attr, record, tag
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
    """Linears reading the same input -> one GEMM and a view per original output (module docstring)."""
    merged = 0
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for group in _groups(gm):
        group.sort(key=lambda lin: order[lin.node])
        x = group[0].node.args[0]
        with torch.no_grad():
            weight = torch.cat([lin.weight.detach() for lin in group], 0)
            bias = None if group[0].bias is None else torch.cat([lin.bias.detach() for lin in group], 0)
        with graph.inserting_before(group[0].node):
            w = tag(graph.get_attr(new_attr(gm, "merged_linear_weight", weight)), PASS_NAME)
            b = None if bias is None else tag(graph.get_attr(new_attr(gm, "merged_linear_bias", bias)), PASS_NAME)
            out = tag(graph.call_function(F.linear, (x, w, b)), PASS_NAME)
            offset = 0
            views = []
            for lin in group:
                n = lin.weight.shape[0]
                views.append(tag(graph.call_method("narrow", (out, -1, offset, n)), PASS_NAME))
                offset += n
        for lin, view in zip(group, views):
            view.meta.update(lin.node.meta)
            lin.node.replace_all_uses_with(view)
            graph.erase_node(lin.node)
        merged += len(group)
    if merged:
        gm.delete_all_unused_submodules()
        gm.recompile()
        record(linears_merged=merged)
    return PassResult(gm, merged > 0)
