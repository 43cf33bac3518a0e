"""A constant scale on a matmul operand -> the same scale on its product, where the product's readers are fused.

Before (attention kept as written: Swin's shifted-window blocks, whose mask rewrite_attention does not take)::

    mul = q * 0.1767;  matmul = mul @ transpose;  add = matmul + bias;  ...;  softmax = add.softmax(-1)

After::

    matmul = q @ transpose;  mul = matmul * 0.1767;  add = mul + bias;  ...

NOTE [Scales after matmuls]: ``(x * s) @ y == (x @ y) * s`` for a number ``s``. Before the matmul the scale is a
kernel of its own (its only reader is the matmul, which no generated kernel joins); after it, the scale is one more
elementwise op in the kernel that already reads the product: the softmax's row kernel with the bias and mask adds, or
an elementwise group. Taken where the scaled operand's only reader is the matmul and every reader of the product is an
elementwise op or a row reduction of the op table (so the moved scale joins a kernel, not one of its own), for
floating tensors. The rounding moves from the operand to the product (one multiplication by ``s`` either way; exact
for a power of two); the runner compares the outputs with eager's. rewrite_attention, before this pass, takes the
scale into SDPA's own where it rewrites the attention (the same helper reads it: ``scaled_by_constant``).
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..ops.families import batched_matmul_operands
from .base import record, tag
from .sdpa import reads_shape_only, scaled_by_constant

PASS_NAME = "move_scales_past_matmuls"


def move_scales_past_matmuls(gm: fx.GraphModule) -> PassResult:
    """NOTE [Scales after matmuls]: ``(x * s) @ y`` -> ``(x @ y) * s`` where the product's readers are fused."""
    moved = 0
    for node in list(gm.graph.nodes):
        ab = batched_matmul_operands(node) if node.op in ("call_function", "call_method") else None
        if ab is None or not _readers_fuse(gm, node):
            continue
        for side, operand in enumerate(ab):
            if not isinstance(operand, fx.Node) or operand.op not in ("call_function", "call_method"):
                continue
            scaled = scaled_by_constant(operand, gm)
            if scaled is None or len(operand.users) != 1 or not _floating(operand) or not _floating(scaled[0]):
                continue
            x, s = scaled
            if ops.tensor_meta(x) is None or tuple(ops.tensor_meta(x).shape) != tuple(ops.tensor_meta(operand).shape):
                continue  # the scale broadcast x: the product's shape would change
            node.update_arg(side, x)
            with gm.graph.inserting_after(node):
                product = tag(gm.graph.call_function(operator.mul, (node, s)), PASS_NAME)
            # readers of the shape alone stay on the matmul: the scaled product is then read by computing ops only,
            # which fusion can join it to
            node.replace_all_uses_with(product, delete_user_cb=lambda user: user is not product
                                       and not reads_shape_only(user, node))
            gm.graph.erase_node(operand)
            moved += 1
            break
    if moved:
        gm.graph.lint()
        gm.recompile()
        record(scales_moved=moved)
    return PassResult(gm, moved > 0)


def _floating(node: fx.Node) -> bool:
    tm = ops.tensor_meta(node)
    return tm is not None and tm.dtype.is_floating_point


def _readers_fuse(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether every reader of the product is an elementwise op or a row reduction (the moved scale joins its kernel),
    or reads only its shape, and one at least computes with it."""
    computing = [u for u in node.users if not reads_shape_only(u, node)]
    if not computing:
        return False
    for user in computing:
        if user.op not in ("call_function", "call_method", "call_module"):
            return False
        if ops.is_inplace(user, gm):
            return False
        if not isinstance(ops.match_elementwise(user, gm), str):
            continue
        rows = ops.normalize_row_reduction(user, gm)
        if rows is None or isinstance(rows, str):
            return False
    return True
