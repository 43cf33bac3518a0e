"""Layout: run convolution-heavy CUDA graphs in channels_last (NHWC).

cuDNN's fast float32 (TF32) and float16 convolutions work in NHWC; given NCHW tensors it transposes every input
and output (``nchwToNhwcKernel``): measured on the H100, 32 of ResNet-18's 102 eager kernels per forward. Converting
the graph's 4-D inputs once and the convolution weights at optimize time removes them.

Before::

    conv = torch.cudnn_convolution_relu(x, w, b, ...)    # cuDNN: transpose x, convolve, transpose back

After::

    x_cl = x.contiguous(memory_format=torch.channels_last)
    conv = torch.cudnn_convolution_relu(x_cl, w_cl, b, ...)

Strides stay eager's where anyone can see them: a 4-D graph output, and the input of a view/reshape/flatten (whose
meaning depends on the layout), are made contiguous first (free when they already are, as after global pooling).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from .base import new_attr, note, record, tag
from .fold import get_attr as _get_attr

PASS_NAME = "to_channels_last"
MIN_CONVS = 4  # below this, the conversions can cost more than the transposes they save


def _is_4d_float_cuda(node: fx.Node) -> bool:
    tm = ops.tensor_meta(node)
    device = node.meta.get("device")
    return (tm is not None and len(tm.shape) == 4 and tm.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and device is not None and device.type == "cuda")


def _tensor_core_conv(node: fx.Node) -> bool:
    """cuDNN's NHWC kernels are its tensor-core ones: float16/bfloat16, or float32 when TF32 is allowed. Measured on
    the H100 (2026-11-23 sweep, TF32 off): fp32 convolutions without TF32 run in NCHW without transposes, and the
    conversions this pass adds then cost kernels (densenet121: 426 -> 660)."""
    dtype = ops.tensor_meta(node).dtype
    return dtype in (torch.float16, torch.bfloat16) or torch.backends.cudnn.allow_tf32


def _convs(gm: fx.GraphModule) -> list[fx.Node]:
    found = [n for n in gm.graph.nodes if ops.is_conv2d(n, gm)]
    return [n for n in found if _is_4d_float_cuda(n) and _tensor_core_conv(n)]


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous(memory_format=torch.channels_last)


def to_channels_last(gm: fx.GraphModule) -> PassResult:
    """Convert 4-D CUDA inputs and conv weights of a convolution-heavy graph to channels_last (see module doc)."""
    convs = _convs(gm)
    if len(convs) < MIN_CONVS:
        if convs:
            note(f"{PASS_NAME}: {len(convs)} convolution(s): below {MIN_CONVS}, kept in NCHW")
        return PassResult(gm, False)
    graph = gm.graph
    changed = 0
    # 1. weights: new channels_last copies, never the shared originals
    for conv in convs:
        if conv.op == "call_module":
            m = gm.get_submodule(conv.target)
            twin = copy.copy(m)
            twin._parameters = dict(m._parameters)
            twin.weight = nn.Parameter(_channels_last(m.weight), requires_grad=False)
            conv.target = new_attr(gm, f"{conv.target}_channels_last", twin)
            changed += 1
            continue
        w = conv.args[1]
        if isinstance(w, fx.Node) and w.op == "get_attr":
            value = _get_attr(gm, w.target)
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                with graph.inserting_before(conv):
                    w_cl = tag(graph.get_attr(new_attr(gm, f"{conv.name}_weight_channels_last",
                                                       _channels_last(value))), PASS_NAME)
                conv.replace_input_with(w, w_cl)
                changed += 1
    # 2. 4-D inputs: converted once, at the top
    for ph in [n for n in graph.nodes if n.op == "placeholder" and _is_4d_float_cuda(n)]:
        with graph.inserting_after(ph):
            cl = tag(graph.call_method("contiguous", (ph,), {"memory_format": torch.channels_last}), PASS_NAME)
        ph.replace_all_uses_with(cl, delete_user_cb=lambda u: u is not cl)
        changed += 1
    # 3. back to eager's layout where the layout is visible: views of 4-D values and 4-D outputs
    for node in list(graph.nodes):
        if ops.reads_layout(node, gm) and isinstance(node.args[0], fx.Node) and _is_4d_float_cuda(node.args[0]):
            src = node.args[0]
            with graph.inserting_before(node):
                c = tag(graph.call_method("contiguous", (src,)), PASS_NAME)
            node.replace_input_with(src, c)
            changed += 1
    output = next(n for n in graph.nodes if n.op == "output")
    for value in list(output.all_input_nodes):
        if _is_4d_float_cuda(value):
            with graph.inserting_before(output):
                c = tag(graph.call_method("contiguous", (value,)), PASS_NAME)
            output.replace_input_with(value, c)
            changed += 1
    gm.recompile()
    record(convolutions=len(convs), rewrites=changed)
    return PassResult(gm, changed > 0)
