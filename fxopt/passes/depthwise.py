"""Depthwise convolutions -> fxopt's depthwise kernel where it measures faster than cuDNN (CUDA).

Before (ConvNeXt's 7x7 depthwise convolution, its bias already moved into the LayerNorm after it)::

    conv = torch.conv2d(x, block_0_weight, None, [1, 1], [3, 3], [1, 1], 96)

After::

    fused = torch.ops.fxopt.fused.default('fxopt_depthwise_1a2b3c4d', [x, conv_depthwise_weight])
    getitem = fused[0]

NOTE [Depthwise convolutions] (codegen/depthwise.py has the kernel): cuDNN runs a depthwise convolution as a grouped
one, several times slower than reading its input and writing its output. Taken for a 2-D convolution on a constant
``[C, 1, KH, KW]`` weight with ``groups == C`` (one output channel per input channel: ConvNeXt's, EfficientNet's and
MobileNet's depthwise layers), zero padding given as numbers, kernels up to 15 x 15, one float dtype throughout, the
input dense in NCHW or NHWC and the output in the same layout (eager's for such an input). The bias, when the
convolution still has one, is added by the kernel; so are, each the only reader of the value before it, a
per-channel affine after it (fuse_epilogues' moved bias, NOTE [Conv bias in the tail]; a 16-bit BatchNorm left
unfolded, NOTE [16-bit folds], whose scale goes into the kernel's float32 weights) and then a unary op of the op
table (NOTE [Depthwise epilogues], codegen/depthwise.py): EfficientNet's SiLU, MobileNet's ReLU and hardswish. On
CUDA each shape is timed, with ``COLUMNS`` output columns a thread as the candidates, against cuDNN's
convolution as the graph runs it (NOTE [Depthwise baseline]; NOTE [Choosing by measurement], runtime/probe.py), and
rewritten only where the fastest takes at most ``MIN_GAIN`` of cuDNN's time; the note per shape says the times.

NOTE [Depthwise baseline]: cuDNN is timed on the convolution as the graph would run it: in the graph's layout, with
its own bias only. The ops the kernel absorbs are not counted: the moved bias, the affine and the activation would
otherwise have joined a fused kernel after the convolution (ConvNeXt's bias is in its LayerNorm's row kernel), so the
kernel must win without them. Until 52c3c1b cuDNN was timed with the kernel's bias, a moved one included, which ATen
adds with a kernel of its own: on an H100 the probe put ConvNeXt-T's 96x56x56 7x7 NHWC float32 convolution at 7.6 µs
against cuDNN's 12.1 with that add, and the pass took three of torchvision ConvNeXt-T's convolutions that cuDNN ran
in 5.2 µs each inside the model, for 8.5 µs each (reports/2026-12-07-h100-s16-52c3c1b/call1, kt_tv_convnext_tiny).

NOTE [Depthwise + LayerNorm] (codegen/depthwise.py has the kernel): in NHWC, where the convolution's output (after
the affine above) goes only through a permute to ``[N, H, W, C]``, optionally a per-channel add (fuse_epilogues'
moved bias), into a LayerNorm over the channels with constant parameters, each the only reader of the one before
(ConvNeXt's block in timm and torchvision), the kernel computes the LayerNorm too and its output, permuted, is the
LayerNorm's value: one kernel and one round trip of the convolution's output less. Timed against cuDNN's convolution
and then the faster of ATen's layer_norm and fxopt's row kernel for it; where it is not taken, the convolution alone
is considered as above (``depthwise_layer_norms`` is this pass taking only these: ``alone=False``).

Opt-in (``optimize(..., enable=["depthwise_convolutions"])``): on an H100 (2026-12-07) it wins per shape in float32
NCHW and loses in float16 NHWC, and in the models it measured no gain (ConvNeXt-T, EfficientNet-B0:
benchmarks/NOTES.md).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..capture import capture
from ..codegen.depthwise import MAX_KERNEL, DepthwiseProgram, epilogue_op
from ..runtime.depthwise import dense_in, depthwise_kernel, weight_for
from ..runtime.kernel import fused_op
from .base import new_attr, note, record, separate_log, tag
from .epilogue import as_gemm
from .fold import constant_tensor
from .fuse_reductions import fuse_reductions
from .movement import evaluate_chain

PASS_NAME = "depthwise_convolutions"
MIN_GAIN = 0.9  # the kernel's time at most this fraction of cuDNN's
COLUMNS = (2, 4)  # output columns a thread: the candidates timed on CUDA
# with a LayerNorm (NOTE [Depthwise + LayerNorm]): (output columns a segment, channels a lane), from ConvNeXt's
# first stage (56 x 56, 96 channels: few lanes, many segments) to its last (7 x 7, 768 channels: more warps a pixel)
NORM_SHAPES = ((4, 4), (2, 4), (2, 2), (1, 2), (1, 1))
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# (device, shape, layout, weight shape and layout, geometry, bias, dtype) -> (µs per candidate, ..., cuDNN µs)
_decisions: dict[tuple, tuple[float, ...]] = {}


class DepthwiseConvolutions:
    """The pass for ``backend`` (graphs on CUDA with backend ``"cuda"``); ``cpu=True`` also rewrites CPU graphs with
    the C++ twin and without timing (tests); ``alone=False`` takes only convolutions with their LayerNorm (NOTE
    [Depthwise + LayerNorm]) and leaves the others to cuDNN."""

    def __init__(self, backend: str, *, cpu: bool = False, alone: bool = True):
        self.backend = backend
        self.cpu = cpu
        self.alone = alone

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        gm.meta.setdefault("fxopt_kernels", {})
        done = kept = fused_ops = norms = 0
        for node in list(gm.graph.nodes):
            conv = self._conv(gm, node)
            if conv is None:
                continue
            if isinstance(conv, str):
                note(f"{PASS_NAME}: {node.name} stays F.conv2d ({conv})")
                continue
            x, weight, bias, programs, device = conv
            own_bias = bias is not None  # what cuDNN is timed with: the convolution as the graph runs it
            ep = _epilogue(gm, node, programs[0], weight.shape[0])
            bias = ep.bias_after(bias)
            norm = None
            if ep.activation is None and programs[0].layout == "nhwc":
                norm = _layer_norm_after(gm, ep.last, weight.shape[0], programs[0].dtype)
            if norm is not None:  # NOTE [Depthwise + LayerNorm]; where it is not taken, the convolution alone is
                taken = self._with_layer_norm(gm, node, x, weight, bias, programs, device, ep, norm, own_bias)
                if taken:
                    done, norms, fused_ops = done + 1, norms + 1, fused_ops + len(ep.absorbed) + len(norm.absorbed)
                    continue
            if not self.alone:
                continue
            if ep.absorbed:
                name, attrs = ep.activation or ("", ())
                programs = [dataclasses.replace(p, bias=bias is not None, activation=name, activation_attrs=attrs)
                            for p in programs]
            kernel, said, slower = _choose(programs, device, x, weight, own_bias)
            if kernel is None:
                kept += slower
                note(f"{PASS_NAME}: {node.name} stays {'cuDNN' if slower else 'F.conv2d'} ({said})")
                continue
            if said:
                note(f"{PASS_NAME}: {node.name} -> the depthwise kernel ({said})")
            constants = [("weight", weight_for(kernel.program, weight, ep.scale))]
            if kernel.program.bias:
                constants.append(("bias", bias.detach().float().contiguous()))
            _replace(gm, node, kernel, x, constants, ep.last, ep.absorbed)
            done += 1
            fused_ops += len(ep.absorbed)
        if done:
            record(convolutions=done, **({"epilogue_ops": fused_ops} if fused_ops else {}),
                   **({"layer_norms": norms} if norms else {}))
            gm.graph.lint()
            gm.recompile()
        if kept:
            record(kept_cudnn=kept)
        return PassResult(gm, done > 0)

    def _with_layer_norm(self, gm: fx.GraphModule, node: fx.Node, x: fx.Node, weight: torch.Tensor,
                         bias: torch.Tensor | None, programs: list, device: torch.device, ep: _Epilogue,
                         norm: _LayerNorm, own_bias: bool) -> bool:
        """NOTE [Depthwise + LayerNorm]: the convolution, ``ep``'s affine and ``norm`` as one kernel, where it builds
        and (CUDA) measures at most ``MIN_GAIN`` of cuDNN's convolution and the LayerNorm after it (:func:`_timed`);
        whether it was taken."""
        channels = weight.shape[0]
        b = torch.zeros(channels) if bias is None else bias.detach().float()
        if norm.shift is not None:
            b = b + norm.shift
        shapes = [(c, v) for c, v in NORM_SHAPES if channels % v == 0 and channels <= 1024 * v]
        if device.type != "cuda":  # the C++ twin: one program
            shapes = shapes[:1]
        if not shapes:
            note(f"{PASS_NAME}: {node.name} and {norm.last.name} stay apart ({channels} channels: no lane shape of the "
                 "kernel covers them, at most 1024 lanes of 1, 2 or 4 channels)")
            return False
        programs = [dataclasses.replace(programs[0], bias=True, norm_channels=channels, norm_eps=norm.eps, cols=c,
                                        lane_channels=v) for c, v in shapes]
        kernel, said, _ = _choose(programs, device, x, weight, own_bias)
        if kernel is None:
            note(f"{PASS_NAME}: {node.name} and {norm.last.name} stay apart ({said})")
            return False
        if said:
            note(f"{PASS_NAME}: {node.name} + {norm.last.name} -> the depthwise kernel with its LayerNorm ({said})")
        constants = [("weight", weight_for(kernel.program, weight, ep.scale)), ("bias", b.clone()),
                     ("ln_weight", norm.weight), ("ln_bias", norm.bias)]
        _replace(gm, node, kernel, x, constants, norm.last, ep.absorbed + norm.absorbed, nhwc_view=True)
        return True

    def _conv(self, gm: fx.GraphModule, node: fx.Node):
        """(x, weight, bias tensor or None, candidate programs, device) for a depthwise convolution this pass can
        take, a reason (str) for one it cannot, or None for any other node."""
        gemm = as_gemm(gm, node)
        if gemm is None or gemm.kind != "conv2d" or not isinstance(gemm.groups, int) or gemm.groups < 2:
            return None
        device = node.meta.get("device")
        if device is None:
            return None
        device = torch.device(device)
        if not ((device.type == "cuda" and self.backend == "cuda") or (device.type == "cpu" and self.cpu)):
            return None
        x = gemm.input
        tm, out = (ops.tensor_meta(v) if isinstance(v, fx.Node) else None for v in (x, node))
        weight = constant_tensor(gm, gemm.weight)
        if tm is None or out is None or weight is None or len(tm.shape) != 4 or weight.dim() != 4:
            return None
        C = tm.shape[1]
        if gemm.groups != C or tuple(weight.shape[:2]) != (C, 1):
            return None  # grouped, or a channel multiplier: not depthwise
        kernel = tuple(weight.shape[2:])
        if max(kernel) > MAX_KERNEL:
            return f"a {kernel} kernel: the kernel takes up to {MAX_KERNEL} x {MAX_KERNEL}"
        if tm.dtype not in _FLOATS or weight.dtype != tm.dtype or out.dtype != tm.dtype:
            return f"dtypes: input {tm.dtype}, weight {weight.dtype}"
        bias = None
        if gemm.bias is not None:  # the kernel reads a float32 copy
            bias = constant_tensor(gm, gemm.bias)
            if bias is None or bias.dtype != tm.dtype or tuple(bias.shape) != (C,):
                return "a bias that is not a constant of one value per channel of the input's dtype"
        shape = tuple(tm.shape)
        layout = next((lay for lay in ("nchw", "nhwc") if dense_in(shape, tm.stride, lay)
                       and dense_in(tuple(out.shape), out.stride, lay)), None)
        if layout is None:
            return f"input strides {tuple(tm.stride)}, output strides {tuple(out.stride)}: not both dense NCHW or NHWC"
        common = dict(backend="cuda" if device.type == "cuda" else "cpp", dtype=tm.dtype, kernel=kernel,
                      stride=tuple(gemm.stride), padding=tuple(gemm.padding), dilation=tuple(gemm.dilation),
                      bias=bias is not None, layout=layout, device=str(device) if device.type == "cuda" else "")
        try:
            programs = [DepthwiseProgram(cols=c, **common) for c in (COLUMNS if device.type == "cuda" else (4,))]
        except ValueError as e:
            return str(e)
        if programs[0].out_size(*shape[2:]) != tuple(out.shape[2:]):
            return f"output {tuple(out.shape)} is not the convolution's size"
        return x, weight, bias, programs, device


def _replace(gm: fx.GraphModule, conv: fx.Node, kernel, x: fx.Node, constants: list, last: fx.Node,
             absorbed: list, nhwc_view: bool = False) -> None:
    """``conv`` and ``absorbed`` (the nodes after it the kernel computes) -> one call of ``kernel`` on ``x`` and
    ``constants`` ((name, float32 tensor) pairs, stored as attributes), whose output replaces ``last``'s value;
    ``nhwc_view``: ``last`` is ``[N, H, W, C]`` (a LayerNorm after the permute), the output's permute."""
    with gm.graph.inserting_before(conv):
        inputs = [x] + [tag(gm.graph.get_attr(new_attr(gm, f"{conv.name}_depthwise_{name}", t)), PASS_NAME)
                        for name, t in constants]
        fused = tag(gm.graph.create_node("call_function", fused_op, (kernel.name, inputs), name="fused_depthwise"),
                    PASS_NAME)
        fused.meta["fxopt_kernel"] = kernel.name
        gm.meta["fxopt_kernels"][fused.name] = kernel
        output = value = tag(gm.graph.call_function(operator.getitem, (fused, 0)), PASS_NAME)
        if nhwc_view:
            value = tag(gm.graph.call_method("permute", (value, 0, 2, 3, 1)), PASS_NAME)
    value.meta.update({m: last.meta[m] for m in ("tensor_meta", "device", "has_tensor") if m in last.meta})
    last.replace_all_uses_with(value)
    for dead in reversed([conv] + absorbed):
        gm.graph.erase_node(dead)
    if nhwc_view:
        _nchw_output(gm, output, value)


def _nchw_output(gm: fx.GraphModule, output: fx.Node, nhwc: fx.Node) -> None:
    """The kernel's ``output`` (NCHW-shaped, NHWC in memory) under its permute ``nhwc`` to the LayerNorm's
    ``[N, H, W, C]``: recorded as such, and read directly by a permute back to NCHW after the LayerNorm (timm's
    LayerNorm2d), which goes."""
    tm = ops.tensor_meta(nhwc)
    if tm is None:
        return
    N, H, W, C = tm.shape
    ops.set_tensor_meta(output, torch.empty_strided((N, C, H, W), (H * W * C, 1, W * C, C), dtype=tm.dtype,
                                                    device="meta"), nhwc.meta.get("device"))
    nchw = torch.arange(N * C * H * W, dtype=torch.int32).view(N, C, H, W)
    for user in list(nhwc.users):
        if not ops.moves_data(user) or user.args[0] is not nhwc:
            continue
        try:
            back = evaluate_chain([user], nhwc, nchw.permute(0, 2, 3, 1))
        except Exception:  # noqa: BLE001 -- a movement that cannot be replayed stays
            continue
        if back.shape == nchw.shape and torch.equal(back, nchw):
            user.replace_all_uses_with(output)
            gm.graph.erase_node(user)
    if not nhwc.users:
        gm.graph.erase_node(nhwc)


def _per_channel_constant(gm: fx.GraphModule, v, channels: int, dtype: torch.dtype,
                          last_dim: bool = False) -> torch.Tensor | None:
    """``v`` as ``channels`` values, one per channel of an NCHW value, where it is a constant (an attribute, or a
    reshape / view of one: fuse_epilogues' moved bias, NOTE [Conv bias in the tail]) of shape [C, 1, 1] or
    [1, C, 1, 1] and ``dtype``; ``last_dim``: of an NHWC-shaped value, [C] or [1, ..., C]; else None."""
    const = constant_tensor(gm, v)
    if const is None and isinstance(v, fx.Node) and ops.is_reshape(v, gm) and v.op != "call_module" and v.args:
        base = constant_tensor(gm, v.args[0])
        if base is not None:
            try:
                const = evaluate_chain([v], v.args[0], base)
            except Exception:  # noqa: BLE001 -- a reshape that cannot be replayed: not a constant here
                return None
    shapes = ((channels,), (1, channels), (1, 1, channels), (1, 1, 1, channels)) if last_dim \
        else ((channels, 1, 1), (1, channels, 1, 1))
    if const is None or const.dtype != dtype or tuple(const.shape) not in shapes:
        return None
    return const.detach().reshape(channels)


@dataclasses.dataclass
class _Epilogue:
    """What the kernel computes after the convolution (NOTE [Depthwise epilogues]): ``acc * scale + shift`` (float32
    per-channel values, either None), then ``activation`` ((op name, attributes) or None); ``last`` is the node whose
    value the kernel's output replaces, ``absorbed`` the nodes after the convolution it computes."""

    last: fx.Node
    absorbed: list
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    activation: tuple | None = None

    def bias_after(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The kernel's bias for the convolution's own ``bias``: ``bias * scale + shift`` in float32 (or ``bias``)."""
        if self.scale is None and self.shift is None:
            return bias
        b = None if bias is None else bias.float()
        if b is not None and self.scale is not None:
            b = b * self.scale
        if self.shift is not None:
            b = self.shift if b is None else b + self.shift
        return b


def _only_reader(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    ta, tb = ops.tensor_meta(a), ops.tensor_meta(b)
    return ta is not None and tb is not None and tuple(ta.shape) == tuple(tb.shape)


def _next_op(gm: fx.GraphModule, value: fx.Node, name: str):
    """``value``'s only reader and its elementwise call, where that reader is the op table's ``name`` applied with
    ``value`` as its first operand; else None."""
    reader = _only_reader(value)
    call = ops.match_elementwise(reader, gm) if reader is not None else "no single reader"
    if isinstance(call, str) or call.op.name != name or not call.operands or call.operands[0] is not value:
        return None
    return reader, call


def _affine(gm: fx.GraphModule, conv: fx.Node, program: DepthwiseProgram, channels: int, ep: _Epilogue) -> None:
    """The per-channel affine after the convolution, into ``ep``: ``+ b`` of the output's dtype (fuse_epilogues'
    moved bias), or a BatchNorm's ``[.to(float32)] * scale + shift [.to(dtype)]`` (batchnorm_as_affine)."""
    nodes, value, scale, shift = [], conv, None, None
    step = _next_op(gm, value, "cast")
    if step is not None and _dtype(step[0]) == torch.float32 and program.dtype != torch.float32:
        nodes.append(step[0])
        value = step[0]
    step = _next_op(gm, value, "mul")
    if step is not None and len(step[1].operands) == 2:
        scale = _per_channel_constant(gm, step[1].operands[1], channels, _dtype(value))
        if scale is None or not _same_shape(step[0], value):
            return
        nodes.append(step[0])
        value = step[0]
    step = _next_op(gm, value, "add")
    if step is not None and step[1].attrs.get("alpha", 1) == 1 and len(step[1].operands) == 2:
        shift = _per_channel_constant(gm, step[1].operands[1], channels, _dtype(value))
        if shift is not None and _same_shape(step[0], value):
            nodes.append(step[0])
            value = step[0]
    if _dtype(value) != program.dtype:  # the affine in float32 ends in a cast back to the output's dtype
        step = _next_op(gm, value, "cast")
        if step is None or _dtype(step[0]) != program.dtype:
            return
        nodes.append(step[0])
        value = step[0]
    if scale is None and shift is None:
        return
    ep.last, ep.absorbed = value, nodes
    ep.scale, ep.shift = (None if t is None else t.float() for t in (scale, shift))


def _dtype(node: fx.Node) -> torch.dtype | None:
    tm = ops.tensor_meta(node)
    return None if tm is None else tm.dtype


def _epilogue(gm: fx.GraphModule, node: fx.Node, program: DepthwiseProgram, channels: int) -> _Epilogue:
    """NOTE [Depthwise epilogues]: what the kernel can compute after the convolution ``node``: a per-channel affine
    (a constant added, or a BatchNorm's scale and shift) and then an activation, each the only reader of the value
    before it."""
    ep = _Epilogue(node, [])
    _affine(gm, node, program, channels, ep)
    last = ep.last
    reader = _only_reader(last)
    if reader is not None:
        call = ops.match_elementwise(reader, gm)
        if not isinstance(call, str) and epilogue_op(call.op.name) and call.operands == [last] \
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        for v in call.attrs.values()):
            tm = ops.tensor_meta(reader)
            if tm is not None and tm.dtype == program.dtype and tuple(tm.stride) == tuple(ops.tensor_meta(last).stride):
                ep.activation = (call.op.name, tuple((k, float(call.attrs[k])) for k in call.op.attrs))
                ep.last = reader
                ep.absorbed.append(reader)
    return ep


@dataclasses.dataclass
class _LayerNorm:
    """NOTE [Depthwise + LayerNorm]: a LayerNorm over the channels after the convolution: ``last`` (the LayerNorm's
    node, whose value the kernel's output permuted replaces), ``absorbed`` (the permute, a per-channel add, the
    LayerNorm), ``shift`` (that add's ``[C]`` values or None), the LayerNorm's float32 ``weight`` and ``bias`` (ones
    and zeros where it has none) and ``eps``."""

    last: fx.Node
    absorbed: list
    shift: torch.Tensor | None
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


def _layer_norm_after(gm: fx.GraphModule, value: fx.Node, channels: int, dtype: torch.dtype) -> _LayerNorm | None:
    """``value`` (the convolution's output, NCHW-shaped, dense NHWC) -> its only reader a permute to ``[N, H, W, C]``
    -> optionally ``+ b`` with ``b`` a constant of one value per channel -> ``layer_norm`` over the channels with
    constant affine parameters (ConvNeXt's block, timm's and torchvision's; fuse_epilogues' moved bias is that add:
    NOTE [Conv bias in the tail]); each step the only reader of the one before. None where the graph is not that."""
    permute = _only_reader(value)
    tm = ops.tensor_meta(value)
    if permute is None or tm is None or not ops.moves_data(permute) or permute.args[0] is not value:
        return None
    try:
        probe = torch.arange(math.prod(tm.shape), dtype=torch.int32).view(tuple(tm.shape))
        moved = evaluate_chain([permute], value, probe)
    except Exception:  # noqa: BLE001 -- a movement that cannot be replayed: not the pattern
        return None
    if not torch.equal(moved, probe.permute(0, 2, 3, 1)):
        return None
    absorbed, node, shift = [permute], permute, None
    step = _next_op(gm, node, "add")
    if step is not None and step[1].attrs.get("alpha", 1) == 1 and len(step[1].operands) == 2:
        const = _per_channel_constant(gm, step[1].operands[1], channels, dtype, last_dim=True)
        if const is None or not _same_shape(step[0], node):
            return None
        shift = const.float()
        absorbed.append(step[0])
        node = step[0]
    norm = _only_reader(node)
    call = ops.match_row_reduction(norm, gm) if norm is not None else None
    if call is None or isinstance(call, str) or call.op.name != "layer_norm" or call.tuple_output \
            or call.input is not node or _dtype(norm) != dtype:
        return None
    params = {}
    for key, default in (("weight", 1.0), ("bias", 0.0)):
        if key in call.operands:
            t = constant_tensor(gm, call.operands[key])  # a get_attr node or a parameter's name
            if t is None or tuple(t.shape) != (channels,):
                return None
            params[key] = t.detach().float().clone()  # its own allocation: aligned for the float4 loads
        else:
            params[key] = torch.full((channels,), default)
    return _LayerNorm(norm, absorbed + [norm], shift, params["weight"], params["bias"], float(call.attrs["eps"]))


def _choose(programs: list, device: torch.device, x: fx.Node, weight: torch.Tensor, own_bias: bool):
    """``(kernel, what to say, slower)``: the candidates built and, on CUDA, timed against cuDNN (and the LayerNorm
    after it: :func:`_timed`); the fastest where it takes at most ``MIN_GAIN`` of that time (off CUDA the first, with
    nothing to say), else None with the reason (``slower``: the measurement, not a failure)."""
    try:
        built = [depthwise_kernel(p, device) for p in programs]
    except Exception as e:  # noqa: BLE001 -- what the graph runs stays
        return None, f"the kernel did not build: {type(e).__name__}: {e}", False
    if device.type != "cuda":
        return built[0], "", False
    tm = ops.tensor_meta(x)
    try:
        *mine, library = _timed(built, device, tm, weight, programs[0], own_bias)
    except Exception as e:  # noqa: BLE001 -- out of memory, a capture refused: what the graph runs stays
        return None, f"timing it failed: {type(e).__name__}: {e}", False
    best = min(range(len(built)), key=mine.__getitem__)
    times = ", ".join(f"{p.cols} columns" + (f" x {p.lane_channels} channels a lane" if p.norm_channels else
                                              " a thread") + f" {t:.2f} µs" for p, t in zip(programs, mine))
    what = _describe(tm, programs[0])
    baseline = f"cuDNN{' + the LayerNorm' if programs[0].norm_channels else ''} {library:.2f} µs"
    if mine[best] > MIN_GAIN * library:
        return None, f"{what}: {baseline}; the kernel: {times}", True
    return built[best], f"{what}: {times}; {baseline}", False


def _describe(tm, program: DepthwiseProgram) -> str:
    N, C, H, W = tm.shape
    return (f"{N}x{C}x{H}x{W} {program.layout.upper()} {str(program.dtype)[6:]}, {program.kernel[0]}x"
            f"{program.kernel[1]} stride {program.stride[0]}" + (" + bias" if program.bias else "")
            + (f" -> {program.activation}" if program.activation else "")
            + (f" -> LayerNorm over {program.norm_channels}" if program.norm_channels else ""))


def _timed(kernels: list, device: torch.device, tm, weight: torch.Tensor, program: DepthwiseProgram,
           conv_bias: bool) -> tuple[float, ...]:
    """(each candidate's µs, ..., F.conv2d's µs) for this shape on ``device``, with random inputs in the recorded
    layout and the layer's own weight as the graph stores it; measured once per process (NOTE [Choosing by
    measurement]). ``conv_bias``: whether the convolution in the graph has a bias of its own (NOTE [Depthwise
    baseline]). With a LayerNorm (NOTE [Depthwise + LayerNorm]) the baseline is F.conv2d, then the LayerNorm on its
    output permuted to NHWC: ATen's or fxopt's row kernel, whichever is faster."""
    key = (str(device), tuple(tm.shape), program.layout, tuple(weight.shape), tuple(weight.stride()), program.kernel,
           program.stride, program.padding, program.dilation, program.bias, conv_bias, tm.dtype,
           tuple((k.program.cols, k.program.lane_channels) for k in kernels), program.activation,
           program.activation_attrs, program.norm_channels, program.norm_eps)
    if key not in _decisions:
        from ..runtime.probe import graph_times_us

        with torch.no_grad(), torch.cuda.device(device):
            fmt = torch.channels_last if program.layout == "nhwc" else torch.contiguous_format
            x = torch.randn(tuple(tm.shape), device=device, dtype=tm.dtype).contiguous(memory_format=fmt)
            w = weight.to(device)
            C = weight.shape[0]
            b = torch.randn(C, device=device, dtype=tm.dtype)
            gamma, beta = torch.rand(C, device=device, dtype=tm.dtype) + 0.5, torch.randn_like(b)
            mine = [weight_for(program, w)] + ([b.float()] if program.bias else [])
            if program.norm_channels:
                mine += [gamma.float(), beta.float()]
            geometry = (program.stride, program.padding, program.dilation, C)

            def library():  # NOTE [Depthwise baseline]: the convolution alone, with its own bias only
                return F.conv2d(x, w, b if conv_bias else None, *geometry)

            candidates = [(lambda k=k: k([x] + mine)) for k in kernels]
            if not program.norm_channels:
                _decisions[key] = tuple(graph_times_us(candidates + [library]))
                return _decisions[key]
            # then the LayerNorm: ATen's, and fxopt's row kernel where it builds and captures
            norms = _layer_norms(library().permute(0, 2, 3, 1), gamma, beta, program.norm_eps, program.backend)
            baselines = [lambda norm=norm: norm(library().permute(0, 2, 3, 1)) for norm in norms]
            try:
                times = graph_times_us(candidates + baselines)
            except Exception:  # noqa: BLE001 -- the row kernel's module did not capture: ATen's LayerNorm alone
                times = graph_times_us(candidates + baselines[:1])
            _decisions[key] = tuple(times[:len(kernels)]) + (min(times[len(kernels):]),)
    return _decisions[key]


class _LastDimLayerNorm(torch.nn.Module):
    """``F.layer_norm`` over the last dim with these parameters: the module :func:`_layer_norms` captures."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = torch.nn.Parameter(weight), torch.nn.Parameter(bias), eps
        self.channels = weight.shape[0]  # a number, not a size query, when traced

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(y, (self.channels,), self.weight, self.bias, self.eps)


def _layer_norms(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str) -> list:
    """The LayerNorm over ``y``'s last dim as ATen runs it and, where it builds, as fxopt's row kernel for
    ``backend`` (fuse_reductions on that one op: what the graph would run without this pass)."""
    aten = lambda t: F.layer_norm(t, (t.shape[-1],), weight, bias, eps)  # noqa: E731
    try:
        gm = capture(_LastDimLayerNorm(weight, bias, eps).eval(), (y,))
        with separate_log():  # its notes are not this pass's
            gm = fuse_reductions(backend)(gm).graph_module
        gm.recompile()
    except Exception:  # noqa: BLE001 -- ATen's alone is still a baseline
        return [aten]
    return [aten, gm] if any(n.target is fused_op for n in gm.graph.nodes) else [aten]


def depthwise_convolutions(backend: str, **options) -> DepthwiseConvolutions:
    """The depthwise convolution pass for ``backend`` (it rewrites graphs on CUDA with backend ``"cuda"``)."""
    return DepthwiseConvolutions(backend, **options)
