"""Layout: run convolution-heavy CUDA graphs in channels_last (NHWC); float32 convolutions without tensor cores
in NCHW.

cuDNN's fast float32 (TF32) and float16 convolutions work in NHWC; given NCHW tensors it transposes every input
and output (``nchwToNhwcKernel``): measured on the H100, 32 of ResNet-18's 102 eager kernels per forward. Converting
the graph's 4-D inputs once and the convolution weights at optimize time removes them.

Before::

    conv = torch.cudnn_convolution_relu(x, w, b, ...)    # cuDNN: transpose x, convolve, transpose back

After::

    x_cl = x.contiguous(memory_format=torch.channels_last)
    conv = torch.cudnn_convolution_relu(x_cl, w_cl, b, ...)

Strides stay eager's where anyone can see them: graph outputs are made contiguous (free when they already are), and
a ``view`` that the channels-last tensor does not allow gets its input made contiguous first. A reshape or flatten
takes the channels-last tensor as it is (NOTE [Reshapes of channels-last values]).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..runtime.strides import channels_last_strides, contiguous_strides, is_channels_last_ish
from .base import new_attr, note, record, tag
from .fold import constant_tensor

PASS_NAME = "to_channels_last"
PASS_NAME_NCHW = "convs_in_nchw"
MIN_CONVS = 4  # below this, the conversions can cost more than the transposes they save


def _is_4d_float_cuda(node: fx.Node) -> bool:
    tm = ops.tensor_meta(node)
    device = node.meta.get("device")
    return (tm is not None and len(tm.shape) == 4 and tm.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and device is not None and device.type == "cuda")


def _eager_contiguous_cuda(node: fx.Node) -> bool:
    """A float CUDA value of rank 2 or more that eager gives contiguous."""
    tm = ops.tensor_meta(node)
    device = node.meta.get("device")
    return (tm is not None and len(tm.shape) >= 2 and tm.dtype.is_floating_point and device is not None
            and device.type == "cuda" and tuple(tm.stride) == contiguous_strides(tuple(tm.shape)))


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


def _conv_parts(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, torch.Tensor | None] | None:
    """The input node and the weight tensor (None where it is computed) of a 2-D convolution, any spelling."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module":
        return node.args[0], gm.get_submodule(node.target).weight
    return node.args[0], constant_tensor(gm, node.args[1]) if len(node.args) > 1 else None


def _replace_weight(gm: fx.GraphModule, conv: fx.Node, weight: torch.Tensor, suffix: str, pass_name: str) -> None:
    """``conv`` reads ``weight`` instead of its own: a shallow twin of its module, or a new attribute for a
    functional spelling; the user's module and parameters stay as they are."""
    if conv.op == "call_module":
        m = gm.get_submodule(conv.target)
        twin = copy.copy(m)
        twin._parameters = dict(m._parameters)
        twin.weight = nn.Parameter(weight, requires_grad=False)
        conv.target = new_attr(gm, f"{conv.target}_{suffix}", twin)
        return
    with gm.graph.inserting_before(conv):
        w = tag(gm.graph.get_attr(new_attr(gm, f"{conv.name}_weight_{suffix}", weight)), pass_name)
    conv.replace_input_with(conv.args[1], w)


# NOTE [Reshapes of channels-last values]: a reshape of a 4-D value reads its layout: on a channels-last tensor it is
# a view with other strides than eager's, or a copy. This pass used to put a ``contiguous()`` (an NCHW copy) before
# every one, so what follows saw eager's strides: ten copies in a diffusion UNet block at float16, 37 of its 144 µs
# of GPU time (H100; reports/2026-12-06-h100-s9-b02a0d4/call4-959656a/kt_diffusion_block_float16.txt): its q, k
# and v projections' ``flatten(2)`` and GroupNorm's ``reshape(N, G, C // G, -1)`` (NOTE in passes/group_norm.py)
# are views of the channels-last tensor. So a reshape or flatten now takes the channels-last tensor: a view where
# its layout allows one (what follows reads it strided: generated kernels, GEMMs and row kernels take strides), and
# otherwise the same copy ``contiguous()`` would make (GroupNorm's ``reshape(N, G, -1)``), by reshape itself. A
# ``view`` keeps the copy before it unless the channels-last tensor allows it; so does a reshape whose result reaches
# a ``view`` through data movement or elementwise ops (which keep their input's strides), where the view could fail
# on the new strides. The graph's outputs are made contiguous where eager's are, so callers see eager's strides.
def _copying_reshape(node: fx.Node, gm: fx.GraphModule) -> bool:
    """reshape / flatten (any spelling): a view where the layout allows, else a copy; never an error."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    return ops.may_copy_reshape(node)


def _view_allowed(node: fx.Node, src: fx.Node) -> bool:
    """Whether ``node``'s result shape is a view of ``src`` laid out channels-last."""
    tm, out = ops.tensor_meta(src), ops.tensor_meta(node)
    return (tm is not None and out is not None
            and ops.view_possible(tm.shape, channels_last_strides(tuple(tm.shape)), out.shape))


def _reaches_a_view(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether a strict view (``view``, ``unflatten``, ...) reads ``node``'s result through data movement or
    elementwise ops, which keep their input's strides (NOTE [Reshapes of channels-last values])."""
    seen, stack = set(), list(node.users)
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if ops.reads_layout(user, gm) and not _copying_reshape(user, gm):
            return True
        if ops.moves_data(user) or not isinstance(ops.match_elementwise(user, gm), str):
            stack.extend(user.users)
    return False


def _keeps_channels_last(node: fx.Node, src: fx.Node, gm: fx.GraphModule) -> bool:
    """NOTE [Reshapes of channels-last values]: whether ``node`` (which reads its input's layout) may take ``src``
    channels-last rather than a contiguous copy of it."""
    if _copying_reshape(node, gm):
        return not (_view_allowed(node, src) and _reaches_a_view(node, gm))
    # a strict view: only of a convolution's output, whose channels-last strides _view_allowed knows
    return ops.is_conv2d(src, gm) and _view_allowed(node, src) and not _reaches_a_view(node, gm)


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
        parts = _conv_parts(conv, gm)
        if parts is not None and parts[1] is not None and parts[1].dim() == 4:
            _replace_weight(gm, conv, _channels_last(parts[1]), "channels_last", PASS_NAME)
            changed += 1
    # 2. 4-D inputs: converted once, at the top
    for ph in [n for n in graph.nodes if n.op == "placeholder" and _is_4d_float_cuda(n)]:
        with graph.inserting_after(ph):
            cl = tag(graph.call_method("contiguous", (ph,), {"memory_format": torch.channels_last}), PASS_NAME)
        ph.replace_all_uses_with(cl, delete_user_cb=lambda u: u is not cl)
        changed += 1
    # 3. back to eager's layout where the layout is visible: views the channels-last tensor does not allow, and
    #    the outputs (NOTE [Reshapes of channels-last values])
    kept = 0
    for node in list(graph.nodes):
        if ops.reads_layout(node, gm) and isinstance(node.args[0], fx.Node) and _is_4d_float_cuda(node.args[0]):
            src = node.args[0]
            if _keeps_channels_last(node, src, gm):
                kept += 1
                continue
            with graph.inserting_before(node):
                c = tag(graph.call_method("contiguous", (src,)), PASS_NAME)
            node.replace_input_with(src, c)
            changed += 1
    output = next(n for n in graph.nodes if n.op == "output")
    for value in list(output.all_input_nodes):
        if _is_4d_float_cuda(value) or (kept and _eager_contiguous_cuda(value)):
            with graph.inserting_before(output):
                c = tag(graph.call_method("contiguous", (value,)), PASS_NAME)
            output.replace_input_with(value, c)
            changed += 1
    gm.recompile()
    record(convolutions=len(convs), rewrites=changed, reshapes_kept_channels_last=kept)
    return PassResult(gm, changed > 0)


# NOTE [Float32 convolutions in NCHW]: cuDNN has no NHWC kernel for a float32 convolution without TF32 (a grouped
# or depthwise one aside). Handed a channels-last input, PyTorch still asks for channels-last (it follows the input
# or the weight), so each call copies the weight to channels-last, and cuDNN transposes the input, the weight and
# the output around its NCHW kernel: five kernels for one. ConvNeXt's downsampling convolutions get such an input
# (LayerNorm2d's permute back is a channels-last view): 3 x 4 extra kernels, about 40 µs of torchvision
# ConvNeXt-T's 1002 (H100, torch 2.11, TF32 off; reports/2026-12-06-h100-s6-de87d03 kt_tv_convnext_byop.txt).
# Fed an NCHW input and weight, cuDNN runs the same NCHW kernel alone; the output goes back to the layout eager
# gives it, so what reads it sees eager's strides. Three kernels for five: the input's copy (which the row kernel
# before it can store directly, NOTE [Movement maps]), the convolution, the output's copy.
def convs_in_nchw(gm: fx.GraphModule) -> PassResult:
    """NOTE [Float32 convolutions in NCHW]: a CUDA float32 convolution (groups 1) without TF32 whose input or weight
    is channels-last gets both in NCHW, and its output back in eager's layout."""
    graph = gm.graph
    done = 0
    for conv in [n for n in graph.nodes if ops.is_conv2d(n, gm)]:
        parts = _conv_parts(conv, gm)
        if parts is None or not _is_4d_float_cuda(conv) or _tensor_core_conv(conv):
            continue
        x, weight = parts
        x_tm, out_tm = ops.tensor_meta(x), ops.tensor_meta(conv)
        if x_tm is None or len(x_tm.shape) != 4 or weight is None or weight.dim() != 4:
            continue
        if weight.shape[1] != x_tm.shape[1]:
            continue  # grouped or depthwise: cuDNN has NHWC kernels for those
        x_cl = is_channels_last_ish(tuple(x_tm.shape), tuple(x_tm.stride)) and x_tm.shape[1] > 1
        w_cl = is_channels_last_ish(tuple(weight.shape), weight.stride()) and weight.shape[1] > 1
        if not (x_cl or w_cl):
            continue
        eager_stride = tuple(out_tm.stride)
        nchw_stride = contiguous_strides(tuple(out_tm.shape))
        if eager_stride != nchw_stride and not is_channels_last_ish(tuple(out_tm.shape), eager_stride):
            continue  # an output layout a copy to channels-last would not give back
        if w_cl:
            _replace_weight(gm, conv, weight.detach().contiguous(), "nchw", PASS_NAME_NCHW)
        if x_cl:
            with graph.inserting_before(conv):
                x_nchw = tag(graph.call_method("contiguous", (x,)), PASS_NAME_NCHW)
            ops.set_strided_meta(x_nchw, x, contiguous_strides(tuple(x_tm.shape)))
            conv.replace_input_with(x, x_nchw)
        ops.set_strided_meta(conv, conv, nchw_stride)
        if eager_stride != nchw_stride:
            with graph.inserting_after(conv):
                back = tag(graph.call_method("contiguous", (conv,), {"memory_format": torch.channels_last}),
                           PASS_NAME_NCHW)
            ops.set_strided_meta(back, conv, channels_last_strides(tuple(out_tm.shape)))
            conv.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
        record(convolutions=done)
    return PassResult(gm, done > 0)

