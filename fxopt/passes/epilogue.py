"""GEMM and convolution epilogues: the activation (and residual add) after a Linear or Conv as part of it.

* Linear + bias + ReLU / GELU -> ``torch._addmm_activation`` (cuBLASLt's fused epilogue on CUDA, where the GELU
  is the tanh approximation; on CPU, where it is the exact GELU, still one dispatched op);
* Conv2d + bias + ReLU -> ``torch.cudnn_convolution_relu`` (CUDA, cuDNN);
* Conv2d + bias + residual add + ReLU -> ``torch.cudnn_convolution_add_relu`` (CUDA, cuDNN), as frozen
  TorchScript does.

Before (ResNet basic block, BatchNorm already folded)::

    conv2 = self.conv2(relu);  add = conv2 + identity;  relu_1 = torch.relu(add)

After::

    relu_1 = torch.cudnn_convolution_add_relu(relu, conv2_weight, identity, 1.0, conv2_bias, [1, 1], [1, 1], [1, 1], 1)

* Linear + bias (or ``addmm`` with a per-channel bias: transformers' Conv1D) -> views -> an elementwise op (CUDA),
  where no cuBLASLt epilogue takes the tail: the GEMM without its bias and ``+ bias`` after the views, so
  fuse_elementwise puts the bias in the tail's generated kernel (NOTE [Bias in the tail]).

Any other elementwise tail after a GEMM or conv is left to fuse_elementwise (one generated kernel). The
intermediate must have no other user: the fused op does not produce it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from .base import new_attr, note, record, tag
from .fold import constant_tensor
from .movement import evaluate_chain

aten = torch.ops.aten
PASS_NAME = "fuse_epilogues"


@dataclass
class _Gemm:
    """A Linear or Conv2d node, whatever its spelling, with graph values for its weight and bias."""

    kind: str  # "linear" | "conv2d"
    input: fx.Node
    weight: Any  # a graph value (get_attr node) or a path to create one
    bias: Any
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    groups: int = 1


def _attr(graph: fx.Graph, target: str) -> fx.Node:
    return tag(graph.get_attr(target), PASS_NAME)


def as_gemm(gm: fx.GraphModule, node: fx.Node) -> _Gemm | None:
    """The node as a Linear, addmm or Conv2d with its weight and bias (graph values or attribute paths), whatever its
    spelling; None for anything else (also merge_sibling_linears' convolution matcher)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if ops.is_linear_module(m):
            return _Gemm("linear", node.args[0], f"{node.target}.weight",
                         None if m.bias is None else f"{node.target}.bias")
        if ops.is_plain(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return _Gemm("conv2d", node.args[0], f"{node.target}.weight",
                         None if m.bias is None else f"{node.target}.bias", tuple(m.stride), tuple(m.padding),
                         tuple(m.dilation), m.groups)
        return None
    if node.op != "call_function" or node.kwargs:
        return None
    if ops.is_linear_function(node.target) and len(node.args) in (2, 3):
        return _Gemm("linear", node.args[0], node.args[1], node.args[2] if len(node.args) == 3 else None)
    if node.target in ops.ADDMM_FUNCTIONS and len(node.args) == 3:  # addmm(bias, x, w): beta = alpha = 1 (no kwargs)
        bias, x, w = node.args
        bm, xm, wm = (ops.tensor_meta(v) if isinstance(v, fx.Node) else None for v in (bias, x, w))
        if bm is None or xm is None or wm is None or len(xm.shape) != 2 or len(wm.shape) != 2:
            return None
        if len(bm.shape) != 1 or bm.shape[0] != wm.shape[1]:
            return None  # a bias of the output's shape (or a column) is not a per-channel bias
        return _Gemm("addmm", x, w, bias)
    if ops.is_functional_conv2d(node.target):
        args = list(node.args) + [None, 1, 0, 1, 1][len(node.args) - 2:]
        x, w, b, stride, padding, dilation, groups = args[:7]
        if isinstance(padding, str):
            return None

        def pair(v):
            return tuple(v) if isinstance(v, (list, tuple)) else (v, v)

        return _Gemm("conv2d", x, w, b, pair(stride), pair(padding), pair(dilation), groups)
    return None


def _value(graph: fx.Graph, v: Any) -> Any:
    return _attr(graph, v) if isinstance(v, str) else v


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


# The GELU that _addmm_activation(use_gelu=True) computes: cuBLASLt's epilogue (and ATen's CUDA fallback) use the
# tanh approximation; ATen's CPU kernel applies the exact (erf) GELU.
_ADDMM_GELU = {"cuda": "gelu_tanh", "cpu": "gelu"}


def _activation(node: fx.Node, gm: fx.GraphModule, src: fx.Node) -> str | None:
    """The canonical name of the activation ``node`` applies to ``src`` alone, or None."""
    call = ops.match_elementwise(node, gm)
    if isinstance(call, str) or call.operands != [src]:
        return None
    return call.op.name


def _residual(node: fx.Node, gm: fx.GraphModule, src: fx.Node) -> fx.Node | None:
    """The other operand if ``node`` is ``src + z`` (either order, alpha 1) with z a same-shape tensor."""
    call = ops.match_elementwise(node, gm)
    if isinstance(call, str) or call.op.name != "add" or src not in call.operands:
        return None
    other = call.operands[1] if call.operands[0] is src else call.operands[0]
    if not isinstance(other, fx.Node) or ops.tensor_meta(other) is None:
        return None
    a, b = ops.tensor_meta(other), ops.tensor_meta(src)
    return other if (a.shape, a.dtype) == (b.shape, b.dtype) else None


# NOTE [Bias in the tail]: on CUDA, ``addmm`` with a bias makes cuBLAS copy the bias into the output and run the GEMM
# with beta = 1, for which its heuristics pick split-K kernels with a memset, a scaling kernel and a reduction (timm
# ConvNeXt-T, H100, float32: 820 µs of GEMMs against 644 for Inductor's bias-free ``mm``; reports/2026-12-06-h100-
# trust-sweep-93ecaf1/kernel_tables.md). Where an elementwise tail follows anyway (GELU, layer scale, residual
# add), ``mm`` plus the bias in that tail's generated kernel costs no extra launch; Inductor does the same
# (``unfuse_bias_add_to_pointwise`` in torch/_inductor/fx_passes/post_grad.py). On CPU one addmm stays cheaper.
# The tail may read the output several times (GPT-2's tanh GELU reads it three times): every reader must be
# elementwise, and all of them read the one bias add. GPT-2's MLP-in GEMM kept its bias until that: 12 addmm of
# 37.5 µs against Inductor's 22.3 µs bias-free mm (H100, reports/2026-12-06-h100-s5-9f859ee, call 2).
BIAS_IN_TAIL_DEVICES = frozenset({"cuda"})


def fuse_epilogues(gm: fx.GraphModule, bias_devices: frozenset[str] = BIAS_IN_TAIL_DEVICES) -> PassResult:
    """Fold activations (and the residual add of a conv) into the GEMM/conv before them; on ``bias_devices``, move
    a Linear's bias into the elementwise tail after it (NOTE [Bias in the tail]), and a convolution's into the
    elementwise or row-reduction tail after it (NOTE [Conv bias in the tail])."""
    fused = {"linear_activation": 0, "conv_relu": 0, "conv_add_relu": 0, "linear_bias_to_tail": 0,
             "conv_bias_to_tail": 0, "conv_bias_to_next_conv": 0}
    replaced: set[fx.Node] = set()
    for node in list(gm.graph.nodes):  # first, so that the next convolutions' rules below see their new bias
        if node in replaced:
            continue
        gemm = as_gemm(gm, node) if node.op in ("call_module", "call_function") else None
        device, tm = node.meta.get("device"), ops.tensor_meta(node)
        if gemm is not None and gemm.kind == "conv2d" and gemm.bias is not None and device is not None \
                and device.type in bias_devices and tm is not None and len(tm.shape) == 4 \
                and tm.dtype in (torch.float32, torch.float16, torch.bfloat16):
            readers = list(node.users)
            if _conv_bias_into_next_convs(gm, node, gemm):
                fused["conv_bias_to_next_conv"] += 1
                replaced.update(readers)
    convs_elsewhere = convs_on_cpu = 0
    for node in list(gm.graph.nodes):
        gemm = as_gemm(gm, node) if node.op in ("call_module", "call_function") else None
        if gemm is None:
            continue
        user = _single_user(node)
        tm = ops.tensor_meta(node)
        device = node.meta.get("device")
        if not node.users or tm is None or device is None:
            continue
        if tm.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue
        if gemm.kind == "addmm":
            if device.type in bias_devices and _bias_to_tail(gm, node, gemm, tm):
                fused["linear_bias_to_tail"] += 1
            continue
        if gemm.kind == "linear" and user is None:  # several readers: only the bias can move (to all of them)
            if gemm.bias is not None and device.type in bias_devices and _bias_to_tail(gm, node, gemm, tm):
                fused["linear_bias_to_tail"] += 1
            continue
        if user is None:
            continue
        if gemm.kind == "linear":
            act = _activation(user, gm, node)
            if gemm.bias is None:
                continue
            if act in ("relu", _ADDMM_GELU.get(device.type)):
                _rewrite_linear(gm, node, user, gemm, act, tm)
                fused["linear_activation"] += 1
            elif device.type in bias_devices and _bias_to_tail(gm, node, gemm, tm):
                fused["linear_bias_to_tail"] += 1
            continue
        # conv2d: cuDNN's fused convolutions exist on CUDA only
        if not cudnn_fuses_conv_relu(device, tm.dtype, grouped=False) or len(tm.shape) != 4:
            if gemm.bias is not None and device.type in bias_devices and len(tm.shape) == 4 \
                    and _conv_bias_to_tail(gm, node, gemm, tm):
                fused["conv_bias_to_tail"] += 1
            elif device.type == "cpu":
                convs_on_cpu += 1
            else:
                convs_elsewhere += 1
            continue
        act = _activation(user, gm, node)
        plain = not cudnn_fuses_conv_relu(device, tm.dtype, grouped=gemm.groups > 1)
        if act == "relu" and not plain:
            _rewrite_conv(gm, node, user, gemm, None)
            fused["conv_relu"] += 1
            continue
        residual = _residual(user, gm, node) if not plain else None
        relu = _single_user(user) if residual is not None else None
        if relu is not None and _activation(relu, gm, user) == "relu":
            _rewrite_conv(gm, node, relu, gemm, residual, extra=[user])
            fused["conv_add_relu"] += 1
        elif gemm.bias is not None and device.type in bias_devices and _conv_bias_to_tail(gm, node, gemm, tm):
            fused["conv_bias_to_tail"] += 1
    total = sum(fused.values())
    if total:
        gm.delete_all_unused_submodules()
        gm.recompile()
        record(**{k: v for k, v in fused.items() if v})
    if convs_on_cpu:
        note(f"{PASS_NAME}: {convs_on_cpu} convolution(s) on CPU left as they are: the fused convolutions this pass "
             f"writes (conv + ReLU, conv + add + ReLU) are cuDNN's, CUDA only; the activation after a convolution "
             f"stays its own op unless fuse_elementwise fuses it with the elementwise ops next to it")
    if convs_elsewhere:
        note(f"{PASS_NAME}: {convs_elsewhere} convolution(s) keep their epilogue: cuDNN's fused convolutions need "
             f"CUDA and float32/float16 NCHW")
    return PassResult(gm, total > 0)


def _bias_to_tail(gm: fx.GraphModule, linear: fx.Node, gemm: _Gemm, tm) -> bool:
    """NOTE [Bias in the tail]: ``linear(x, w, b) -> views -> elementwise`` becomes ``linear(x, w) -> views -> + b'``
    (``addmm(b, x, w)``: ``mm(x, w)``)
    with ``b'`` the bias shaped to broadcast where the views put the output's last dim. Only through single-user
    view chains that keep each output row whole (a dim of stride 1 and size C, every other stride a multiple of C);
    False (nothing changed) otherwise."""
    channels = tm.shape[-1] if tm.shape else 0
    if not channels or getattr(tm, "memory_format", None) is not torch.contiguous_format:
        return False
    chain, last = _movement_after(linear)
    if chain is None:
        return False
    copies = [n for n in chain if not (ops.is_view_like(n) and n.target is not operator.getitem)]
    if copies and not _channels_stay_last(chain, linear, tuple(tm.shape)):
        return False
    readers = [u for u in last.users if not ops.is_shape_query(u)]  # a shape query reads the same shape after
    # one elementwise reader, or several that all are (GPT-2's tanh GELU reads its input three times): the bias add
    # goes before the first of them and every one reads it, so it joins their kernel
    if not readers or any(isinstance(ops.match_elementwise(u, gm), str) for u in readers):
        return False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    node = min(readers, key=order.__getitem__)
    vm = ops.tensor_meta(last)
    if copies:
        trailing = 0  # checked above: every element's channel is its index along the last dim
    else:
        rows = [d for d, (n, st) in enumerate(zip(vm.shape, vm.stride)) if n == channels and st == 1]
        if len(rows) != 1 or any(st % channels for d, (n, st) in enumerate(zip(vm.shape, vm.stride))
                                 if d != rows[0] and n != 1):
            return False
        trailing = len(vm.shape) - 1 - rows[0]
    gemm_fn = torch.mm if gemm.kind == "addmm" else torch.nn.functional.linear
    _move_bias(gm, linear, lambda g: (gemm_fn, (gemm.input, _value(g, gemm.weight))), last, node, gemm.bias,
               channels, trailing)
    return True


def _move_bias(gm: fx.GraphModule, op: fx.Node, plain_call: Callable[[fx.Graph], tuple], last: fx.Node,
               first_reader: fx.Node, bias: Any, channels: int, trailing: int) -> None:
    """Replace ``op`` by ``plain_call(graph)`` (its target and arguments without the bias) and add ``bias``, shaped to
    broadcast with ``trailing`` unit dims after the channels, to ``last`` (``op`` or the end of the movement after
    it) right before ``first_reader``; every reader of ``last`` reads the sum."""
    graph = gm.graph
    with graph.inserting_before(op):
        plain = tag(graph.call_function(*plain_call(graph)), PASS_NAME)
    plain.meta.update(op.meta)
    op.replace_all_uses_with(plain)
    graph.erase_node(op)
    last = plain if last is op else last
    with graph.inserting_before(first_reader):
        bias = _value(graph, bias)
        if trailing:
            bias = tag(graph.call_method("reshape", (bias, channels, *[1] * trailing)), PASS_NAME)
        out = tag(graph.call_function(operator.add, (last, bias)), PASS_NAME)
    out.meta.update(last.meta)
    out.meta["tensor_meta"] = ops.tensor_meta(last)
    last.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)


# NOTE [Conv bias in the tail]: ATen adds a cuDNN convolution's bias with a separate ``add_`` after it, a generic
# elementwise kernel on the NCHW output (torchvision ConvNeXt-T: 22 of them, 47.6 µs of its 1034 at batch 1, H100,
# ``kernel_table.py --by-op``, reports/2026-12-06-h100-s6-de87d03). Where the output goes, through data movement that
# keeps each element's channel along one dim (ConvNeXt's permute to channels last), to elementwise ops or to one
# row reduction (the LayerNorm after it), the convolution runs without its bias and the bias is added before those
# readers, shaped to broadcast along the channel's dim: the add joins their generated kernel as a prologue. The same
# add in the same place, so the same rounding.
def _conv_bias_to_tail(gm: fx.GraphModule, conv: fx.Node, gemm: _Gemm, tm) -> bool:
    """NOTE [Conv bias in the tail]: ``conv2d(x, w, b) -> movement -> readers`` becomes ``conv2d(x, w) ->
    movement -> + b'``; False (nothing changed) where the readers or the movement do not allow it."""
    channels = tm.shape[1]
    chain, last = _movement_after(conv)
    if chain is None:
        return False
    readers = [u for u in last.users if not ops.is_shape_query(u)]
    elementwise = readers and all(not isinstance(ops.match_elementwise(u, gm), str) for u in readers)
    row = len(readers) == 1 and not isinstance(ops.match_row_reduction(readers[0], gm), (str, type(None)))
    if not (elementwise or row):
        return False
    channel = torch.arange(channels).view(1, channels, 1, 1).expand(tuple(tm.shape))
    try:
        moved = evaluate_chain(chain, conv, channel.contiguous()) if chain else channel
    except Exception:  # noqa: BLE001 -- a chain that cannot be replayed keeps its bias where it is
        return False
    dims = [d for d in range(moved.dim()) if moved.shape[d] == channels and torch.equal(
        moved, torch.arange(channels).view([channels if k == d else 1 for k in range(moved.dim())]).expand(
            moved.shape))]
    if len(dims) != 1:
        return False
    trailing = moved.dim() - 1 - dims[0]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    def plain(graph: fx.Graph) -> tuple:
        return (torch.nn.functional.conv2d, (gemm.input, _value(graph, gemm.weight), None, list(gemm.stride),
                                             list(gemm.padding), list(gemm.dilation), gemm.groups))

    _move_bias(gm, conv, plain, last, min(readers, key=order.__getitem__), gemm.bias, channels, trailing)
    return True


# NOTE [Conv bias into the next convolution]: a convolution's bias with no elementwise reader to move into stays
# ATen's separate ``add_`` kernel: EfficientNet-B0's and MobileNetV3's projection convolutions that start a stage,
# whose output only the next block's 1x1 expansion reads (7 of them in EfficientNet-B0 at float16, 19 µs of 551,
# H100, reports/2026-12-06-h100-s7-92b51af kt_effnet_fp16.txt). Where every reader is a convolution without padding
# (groups 1), the bias goes through it: ``conv2(y + b) = conv2(y) + sum(w2 * b)`` per output channel, exactly, since
# every window lies inside the input. The first convolution runs without its bias; the next ones get
# ``b2 + sum over (c, kh, kw) of w2[:, c] * b[c]``, computed in float32 (float64 for float64) and rounded once.
def _conv_bias_into_next_convs(gm: fx.GraphModule, conv: fx.Node, gemm: _Gemm) -> int:
    """NOTE [Conv bias into the next convolution]: 1 when ``conv``'s bias went into its readers, else 0."""
    readers = [u for u in conv.users if not ops.is_shape_query(u)]
    bias = constant_tensor(gm, gemm.bias)
    if not readers or bias is None or bias.dim() != 1:
        return 0
    nexts = []
    for r in readers:
        g2 = as_gemm(gm, r) if r.op in ("call_module", "call_function") else None
        if g2 is None or g2.kind != "conv2d" or g2.input is not conv or g2.groups != 1 or any(g2.padding):
            return 0
        w2 = constant_tensor(gm, g2.weight)
        b2 = constant_tensor(gm, g2.bias) if g2.bias is not None else None
        if w2 is None or w2.dim() != 4 or w2.shape[1] != bias.shape[0] or (g2.bias is not None and b2 is None):
            return 0
        if any(a is conv for a in r.all_input_nodes[1:]):
            return 0  # the output is also a weight or a bias of the reader
        nexts.append((r, g2, w2, b2))
    hi = torch.float64 if bias.dtype == torch.float64 else torch.float32
    for r, g2, w2, b2 in nexts:
        folded = (w2.detach().to(hi) * bias.detach().to(hi).view(1, -1, 1, 1)).sum((1, 2, 3))
        if b2 is not None:
            folded = folded + b2.detach().to(hi)
        name = new_attr(gm, f"{r.name}_bias_through", folded.to(w2.dtype))
        _replace_conv(gm, r, g2, name)
    _replace_conv(gm, conv, gemm, None)
    return 1


def _replace_conv(gm: fx.GraphModule, node: fx.Node, gemm: _Gemm, bias: str | None) -> None:
    """``node`` as ``F.conv2d`` with the same geometry and weight, and ``bias`` (an attribute name) or none."""
    graph = gm.graph
    with graph.inserting_before(node):
        b = _attr(graph, bias) if bias is not None else None
        new = tag(graph.call_function(torch.nn.functional.conv2d, (
            gemm.input, _value(graph, gemm.weight), b, list(gemm.stride), list(gemm.padding), list(gemm.dilation),
            gemm.groups)), PASS_NAME)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _movement_after(op: fx.Node) -> tuple[list[fx.Node] | None, fx.Node]:
    """The single-reader chain of views and data movement after ``op`` and its last node (``op`` when empty); a
    None chain where a node of it has no recorded shape."""
    last, node = op, _data_user(op)
    chain: list[fx.Node] = []
    while node is not None and ((ops.is_view_like(node) and node.target is not operator.getitem)
                                or ops.moves_data(node)):
        if ops.tensor_meta(node) is None:
            return None, op
        chain.append(node)
        last, node = node, _data_user(node)
    return chain, last


def _data_user(node: fx.Node) -> fx.Node | None:
    """The one reader of ``node``'s values, shape queries (``x.shape``, timm's ``C = x.shape[-1]``) aside."""
    readers = [u for u in node.users if not ops.is_shape_query(u)]
    return readers[0] if len(readers) == 1 else None


def _channels_stay_last(chain: list[fx.Node], linear: fx.Node, shape: tuple[int, ...]) -> bool:
    """Whether, through ``chain`` (views and data movement: permutes, rolls, copies, slices; Swin's window reverse),
    every element still sits at its output channel along the last dim, so a per-channel bias added after the chain
    is the bias added before it. Run on the channel numbers themselves (shapes are the specialization's)."""
    channel = torch.arange(shape[-1]).expand(shape).contiguous()
    try:
        moved = evaluate_chain(chain, linear, channel)
    except Exception:  # noqa: BLE001 -- a chain that cannot be replayed keeps its bias where it is
        return False
    return moved.dim() >= 1 and moved.shape[-1] == shape[-1] and torch.equal(moved, torch.arange(
        shape[-1]).expand(moved.shape))


def _rewrite_linear(gm: fx.GraphModule, linear: fx.Node, act: fx.Node, gemm: _Gemm, kind: str, tm) -> None:
    graph = gm.graph
    rank = len(tm.shape)
    with graph.inserting_before(act):
        x = gemm.input
        w, b = _value(graph, gemm.weight), _value(graph, gemm.bias)
        if rank != 2:  # cuBLAS works on matrices: fold the leading dims into rows, free for contiguous inputs
            x = tag(graph.call_method("reshape", (x, -1, ops.tensor_meta(gemm.input).shape[-1])), PASS_NAME)
        wt = tag(graph.call_method("t", (w,)), PASS_NAME)
        out = tag(graph.call_function(torch._addmm_activation, (b, x, wt), {"use_gelu": kind != "relu"}),
                  PASS_NAME)
        if rank != 2:
            # -1 for the batch: the graph keeps serving other batch sizes (fxopt.save exports dim 0 dynamic)
            out = tag(graph.call_method("reshape", (out, -1, *tm.shape[1:])), PASS_NAME)
    out.meta.update(act.meta)
    act.replace_all_uses_with(out)
    graph.erase_node(act)
    graph.erase_node(linear)


# NOTE [Grouped convolutions keep their ReLU apart]: asked for a depthwise convolution with its ReLU fused
# (``cudnn_convolution_relu``), cuDNN runs ``conv2d_grouped_direct_kernel``: 10.4 µs a call in torchvision's
# MobileNetV3-L at batch 1, float16, against 2.8 for the depthwise kernel it picks for the convolution alone
# (``conv2d_c1_k1_nhwc``, 9 of fxopt's calls there and all 15 of Inductor's); 6 such calls, 62 of fxopt's 374 µs
# (H100, torch 2.11; reports/2026-12-06-h100-s9-b02a0d4/call4-959656a/kt_tv_mobilenet_v3_large_float16.txt). So a
# grouped float16 convolution stays plain, its bias and ReLU going to the elementwise kernel after it (NOTE [Conv bias
# in the tail]). Not measured at float32 or bfloat16 (bfloat16 never takes the fused call): kept as it was there.
def cudnn_fuses_conv_relu(device: torch.device | str | None, dtype: torch.dtype, grouped: bool) -> bool:
    """Whether fuse_epilogues writes a 2-D convolution with its bias and a ReLU (or a residual add and a ReLU) as one
    cuDNN call on ``device`` in ``dtype``: CUDA with cuDNN, not bfloat16, and not a grouped float16 convolution (NOTE
    [Grouped convolutions keep their ReLU apart]). fold_batchnorm asks it too (NOTE [16-bit folds])."""
    return (device is not None and torch.device(device).type == "cuda" and torch.backends.cudnn.is_available()
            and dtype != torch.bfloat16 and not (grouped and dtype == torch.float16))


def _rewrite_conv(gm: fx.GraphModule, conv: fx.Node, last: fx.Node, gemm: _Gemm, residual: fx.Node | None,
                  extra: list[fx.Node] = ()) -> None:
    graph = gm.graph
    with graph.inserting_before(last):
        w, b = _value(graph, gemm.weight), _value(graph, gemm.bias)
        geometry = (list(gemm.stride), list(gemm.padding), list(gemm.dilation), gemm.groups)
        if residual is None:
            out = graph.call_function(torch.cudnn_convolution_relu, (gemm.input, w, b, *geometry))
        else:
            out = graph.call_function(torch.cudnn_convolution_add_relu, (gemm.input, w, residual, 1.0, b, *geometry))
    tag(out, PASS_NAME)
    out.meta.update(last.meta)  # same value as the node it replaces; later matches in this pass read its shape
    last.replace_all_uses_with(out)
    for n in [last, *reversed(list(extra)), conv]:
        graph.erase_node(n)
