"""Float32 GEMMs on a constant weight -> three TF32 products on tensor cores (3xTF32), where that measures faster
(CUDA, with CUDA graphs).

Before (ViT-B's q/k/v projection, 197 x 768 -> 2304)::

    linear = torch._C._nn.linear(norm, qkv_weight, qkv_bias)

After::

    reshape = norm.reshape(197, 1, 768)
    tf32_hi = torch.ops.fxopt.tf32_hi.default(reshape);  tf32_lo = torch.ops.fxopt.tf32_lo.default(reshape)
    where = torch.where(tf32x3_middle_part, tf32_lo, tf32_hi)        # [197, 3, 768]: x_hi, x_lo, x_hi
    view = where.view(197, 2304)                                      # fuse_elementwise: one generated kernel
    mm_tf32 = torch.ops.fxopt.mm_tf32.default(view, tf32x3_weight, qkv_bias)   # weight [2304, 2304]
    view_1 = mm_tf32.view(1, 197, 2304)

NOTE [3xTF32 GEMMs]: cuBLAS runs float32 GEMMs on the SIMT cores (TF32 tensor cores only when the process allows
TF32, at about 1e-3 relative error). Split each operand into a TF32 part and a remainder, ``x = x_hi + x_lo`` and
``W = W_hi + W_lo`` (``x_hi`` the nearest TF32 value, ``x_lo`` exact in float32 and of either sign: a truncated
``x_hi`` leaves remainders of ``x``'s sign; rounding is CUTLASS's choice, measured the same on the H100 at model
level: ResNet-50 with 3xTF32 convolutions 1.0e-04 truncated, 9.8e-05 rounded), and ``x W ~ x_hi W_hi + x_lo W_hi + x_hi
W_lo``: the dropped ``x_lo W_lo`` is about 2^-22 of the product, so three TF32 products give float32's accuracy to
within about ten times its error (CUTLASS's "3xTF32"; H100, torch 2.11: 1.5e-06 to 8.9e-06 of the output's largest
value against float64, float32's own 1.4e-07 to 9.2e-07). The three go into one GEMM of depth 3K:
``[x_hi | x_lo | x_hi] @ [W_hi; W_hi; W_lo]``, the weight's stack built once at optimize time, ``x``'s split as
elementwise ops of the op table (``fxopt::tf32_hi``, ``fxopt::tf32_lo``, a ``where`` that lays the parts out), which
fuse_elementwise generates as one kernel (with ``x``'s own elementwise producer where it can). Where the GEMM is wide
(many output tiles) the tensor cores' rate wins: ViT-B's q/k/v projection 39.2 µs against 22.1 with the split, its
MLP-in 38.8 against 23.7; where K is long it does not (MLP-out 36.5 against 34.2, under the bar; H100, torch 2.11,
reports/2026-12-07-h100-s12-f4f5b2f/). So each (rows, K, N, bias) is timed on the device (NOTE [Choosing by
measurement]): the GEMM as the graph has it against the split (timed as one ``where`` kernel of its reads and writes)
plus the TF32 GEMM, taken where at most ``MIN_GAIN`` of it. Where only elementwise ops read the GEMM (the bias moved
into the tail, a GELU, a residual add) a second form is timed too: the three parts stacked ``[3, rows, K]``, one
batched GEMM of depth K over ``[W_hi, W_hi, W_lo]`` (three times the output tiles, which narrow or long-K GEMMs lack
at a few hundred rows), and the sum of its three products joining the readers' kernel as split_k_linears' partial
sums do (NOTE [Split-K linears]); each timed with a reduction standing in for the tail's reads, and the form with the
larger gain taken. ``fxopt::mm_tf32`` allows TF32 for its one call only (runtime/tf32.py). fxopt's verification
checks the result against eager at float32's tolerance, like any pass's: the error is about ten times float32's
(ViT-B 1.3e-05 against 1.8e-06). On by default with CUDA graphs (NOTE [3xTF32 under graphs] in api.py;
``disable=["tf32x3_linears"]`` keeps float32 GEMMs); without them a no-op with a note: the split is a launch more and
``mm_tf32`` a Python op.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..ops.elementwise import tf32_hi, tf32_lo
from ..runtime.tf32 import conv_tf32_op, graph_conv, mm_tf32_op, reference_conv, tf32_allowed
from .base import new_attr, note, record, tag
from .epilogue import as_gemm
from .fold import constant_tensor
from .gemm_layout import constant_weight_gemm
from .split_k import elementwise_tail, replace_tail, sum_of_parts

PASS_NAME = "tf32x3_linears"
MAX_ROWS = 8192  # more rows: the GEMM is large enough for cuBLAS's float32 kernels to fill the GPU (fewer than
# gemm_layout.MIN_ROWS: few_row_linears' GEMV)
MIN_GAIN = 0.93
# (device, M, K, N, bias, layout, stacked) -> µs as now, as 3xTF32 side by side; then with the tail's reads (each
# followed by a reduction over a unit dim or over the three products): as now, as 3xTF32 stacked
_decisions: dict[tuple, tuple[float, ...]] = {}


def stacked_weight(weight_kn: torch.Tensor) -> torch.Tensor:
    """``[W_hi; W_hi; W_lo]`` ([3K, N]) for a [K, N] weight: what ``[x_hi | x_lo | x_hi]`` multiplies."""
    w = weight_kn.detach().float()
    hi = tf32_hi(w)
    return torch.cat([hi, hi, tf32_lo(w)], 0).contiguous()


class Tf32x3Linears:
    """The pass; ``graphs_only``, ``devices`` and ``timer`` as in split_k_linears (``timer``: :func:`_timed`'s
    times for (device, M, K, N, bias, layout, stacked))."""

    def __init__(self, *, graphs_only: bool = True, devices: tuple[str, ...] = ("cuda",), timer=None):
        self.graphs_only = graphs_only
        self.devices = devices
        self.timer = timer or _timed

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        candidates = [c for c in (_candidate(gm, n, self.devices) for n in list(gm.graph.nodes)) if c is not None]
        if not candidates or _stays_float32(gm, [c.node for c in candidates], self.graphs_only, PASS_NAME,
                                             "GEMM", "cublas", "torch.backends.cuda.matmul.allow_tf32"):
            return PassResult(gm, False)
        done = kept = stacked_done = 0
        for node in [c.node for c in candidates]:
            gemm = _candidate(gm, node, self.devices)  # again: its input may be a GEMM rewritten just before
            if gemm is None:
                continue
            device = torch.device(gemm.node.meta["device"])
            K, N = gemm.weight_kn.shape
            biased = gemm.bias is not None
            # the stacked form needs readers that add its three products, and x dense in row-major order (its parts
            # are laid out as x is: [3, rows, K] only then)
            x_dense = getattr(ops.tensor_meta(gemm.x), "memory_format", None) is torch.contiguous_format
            last = elementwise_tail(gm, gemm.node) if x_dense else None
            if biased and last is not gemm.node:  # the bias is added in the sum's shape: the GEMM's own, not a reshape's
                last = None
            shape = f"{gemm.rows}x{K} @ {K}x{N}{' + bias' if biased else ''}"
            try:
                times = self.timer(device, gemm.rows, K, N, biased, gemm.layout, last is not None)
            except Exception as e:  # noqa: BLE001 -- a kernel that did not build, out of memory: the GEMM stays
                note(f"{PASS_NAME}: {gemm.node.name} stays float32 ({type(e).__name__}: {e})")
                continue
            now_us, side_us = times[0], times[1]
            ratios = {"side by side": side_us / now_us}
            timing = f"float32 {now_us:.2f} µs, 3xTF32 side by side {side_us:.2f}"
            if last is not None:
                ratios["stacked"] = times[3] / times[2]
                timing += f"; with the tail's reads float32 {times[2]:.2f}, 3xTF32 stacked {times[3]:.2f}"
            form = min(ratios, key=ratios.__getitem__)
            if ratios[form] > MIN_GAIN:
                kept += 1
                note(f"{PASS_NAME}: {gemm.node.name} stays float32 ({shape}: {timing})")
                continue
            note(f"{PASS_NAME}: {gemm.node.name} -> 3xTF32 {form} ({shape}: {timing})")
            if form == "stacked":
                _rewrite_stacked(gm, gemm, last)
                stacked_done += 1
            else:
                _rewrite(gm, gemm)
            done += 1
        if done:
            record(gemms=done, **({"stacked": stacked_done} if stacked_done else {}))
            gm.graph.lint()
            gm.recompile()
        if kept:
            record(kept_float32=kept)
        return PassResult(gm, done > 0)


def _stays_float32(gm: fx.GraphModule, nodes: list[fx.Node], graphs_only: bool, pass_name: str, what: str,
                   library: str, switch: str) -> bool:
    """Whether a 3xTF32 pass leaves all its candidates, with a note why: without CUDA graphs (the split's launch
    and the TF32 switch cost host time), or where the process already lets ``library`` run them in TF32."""
    if graphs_only and not gm.meta.get("fxopt_cuda_graphs"):
        note(f"{pass_name}: {len(nodes)} float32 {what}(s) stay float32: without CUDA graphs the split's launch and "
             f"the TF32 switch cost host time (NOTE [3xTF32 GEMMs])")
        return True
    if any(torch.device(n.meta["device"]).type == "cuda" for n in nodes) and tf32_allowed(library):
        note(f"{pass_name}: the process allows TF32 for {library} ({switch}): the {len(nodes)} float32 {what}(s) "
             f"already run on tensor cores")
        return True
    return False


def _candidate(gm: fx.GraphModule, node: fx.Node, devices: tuple[str, ...]):
    """A float32 GEMM on a constant weight (gemm_layout's Linear, ``addmm`` or ``mm``), else None."""
    gemm = constant_weight_gemm(gm, node, devices)
    if gemm is None or gemm.weight_kn.dtype != torch.float32 or gemm.rows > MAX_ROWS:
        return None
    return gemm


def _split(gm: fx.GraphModule, gemm, stacked: bool) -> fx.Node:
    """``x``'s parts as elementwise ops (inserted before the GEMM): ``where(sel, tf32_lo(x), tf32_hi(x))``, ``sel`` a
    constant that picks the remainder for the middle part. Stacked: ``x`` as it is and ``sel`` of shape [3, 1, ...],
    so the parts broadcast to [3, *x.shape] with no view between ``x``'s producer and them (fuse_elementwise puts
    them in that producer's kernel where it is elementwise), then viewed [3, rows, K]. Side by side: on ``x`` viewed
    [rows, 1, K], ``sel`` [3, 1], then viewed [rows, 3K] (the view keeps them a kernel of their own)."""
    M, K = gemm.rows, gemm.weight_kn.shape[0]
    x_shape = tuple(ops.tensor_meta(gemm.x).shape)
    if stacked:
        return _parts(gm, gemm.x, None, (3,) + (1,) * len(x_shape), (3, *x_shape), (3, M, K))
    return _parts(gm, gemm.x, (M, 1, K), (3, 1), (M, 3, K), (M, 3 * K))


def _parts(gm: fx.GraphModule, x: fx.Node, view: tuple | None, select_shape: tuple, parts_shape: tuple,
           out_shape: tuple, pass_name: str = PASS_NAME) -> fx.Node:
    """``where(sel, tf32_lo(xv), tf32_hi(xv)).reshape(out_shape)`` before the node being rewritten (the graph's
    insertion point): ``xv`` is ``x`` reshaped to ``view`` (``x`` itself for None), ``sel`` a constant of
    ``select_shape``, True for the middle of three parts, so the parts broadcast to ``parts_shape``."""
    graph = gm.graph
    device = torch.device(x.meta["device"])
    select = torch.tensor([False, True, False], device=device).view(select_shape)
    select_attr = new_attr(gm, "tf32x3_middle_part", select)

    def meta(n: fx.Node, shape) -> fx.Node:
        ops.set_tensor_meta(n, torch.empty(shape, device="meta"), device)
        return tag(n, pass_name)

    part_shape = tuple(ops.tensor_meta(x).shape) if view is None else view
    xr = x if view is None else meta(graph.call_method("reshape", (x, *view)), view)
    hi = meta(graph.call_function(torch.ops.fxopt.tf32_hi.default, (xr,)), part_shape)
    lo = meta(graph.call_function(torch.ops.fxopt.tf32_lo.default, (xr,)), part_shape)
    sel = tag(graph.get_attr(select_attr), pass_name)
    ops.set_tensor_meta(sel, select, device)
    parts = meta(graph.call_function(torch.where, (sel, lo, hi)), parts_shape)
    return meta(graph.call_method("reshape", (parts, *out_shape)), out_shape)


def _rewrite(gm: fx.GraphModule, gemm) -> None:
    """The GEMM -> ``x``'s parts side by side and ``fxopt::mm_tf32`` on the stacked weight, in its shape."""
    graph, node = gm.graph, gemm.node
    stacked = stacked_weight(gemm.weight_kn)
    w_attr = new_attr(gm, f"{node.name}_tf32x3_weight", stacked)
    out_shape = tuple(ops.tensor_meta(node).shape)
    with graph.inserting_before(node):
        split = _split(gm, gemm, stacked=False)
        w = tag(graph.get_attr(w_attr), PASS_NAME)
        ops.set_tensor_meta(w, stacked, stacked.device)
        b = gemm.bias_node(gm, PASS_NAME)
        out = tag(graph.call_function(mm_tf32_op, (split, w) if b is None else (split, w, b)), PASS_NAME)
        if len(out_shape) != 2:
            ops.set_tensor_meta(out, torch.empty((gemm.rows, stacked.shape[1]), device="meta"),
                                torch.device(node.meta["device"]))
            out = tag(graph.call_method("view", (out, *out_shape)), PASS_NAME)
    out.meta.update({k: node.meta[k] for k in ("tensor_meta", "device", "has_tensor") if k in node.meta})
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _rewrite_stacked(gm: fx.GraphModule, gemm, last: fx.Node) -> None:
    """The GEMM (and its reshapes to ``last``) -> ``x``'s parts stacked, ``fxopt::mm_tf32`` batched over them, and
    the sum of the three products (and the bias) in ``last``'s shape, which ``last``'s elementwise readers add in
    their kernel."""
    graph, node = gm.graph, gemm.node
    K, N = gemm.weight_kn.shape
    stacked = stacked_weight(gemm.weight_kn).view(3, K, N)
    w_attr = new_attr(gm, f"{node.name}_tf32x3_weight", stacked)
    out_shape = tuple(ops.tensor_meta(last).shape)
    device = torch.device(node.meta["device"])
    with graph.inserting_before(node):
        split = _split(gm, gemm, stacked=True)
        w = tag(graph.get_attr(w_attr), PASS_NAME)
        ops.set_tensor_meta(w, stacked, stacked.device)
        partial = tag(graph.call_function(mm_tf32_op, (split, w)), PASS_NAME)
        ops.set_tensor_meta(partial, torch.empty((3, gemm.rows, N), device="meta"), device)
        total = sum_of_parts(graph, partial, 3, out_shape, PASS_NAME)
        b = gemm.bias_node(gm, PASS_NAME)
        if b is not None:
            total = tag(graph.call_function(operator.add, (total, b)), PASS_NAME)
    replace_tail(gm, node, last, total)


def _timed(device: torch.device, M: int, K: int, N: int, bias: bool, layout: str,
           stacked: bool) -> tuple[float, ...]:
    """µs of the GEMM as the graph has it and of the side-by-side split and 3xTF32 GEMM; with ``stacked``, also of
    the GEMM followed by a reduction over a unit dim and of the stacked split, the batched 3xTF32 GEMM and the sum
    of its three products (standing in for the tail's reads), measured once per process (NOTE [Choosing by
    measurement]). The split is timed as one ``where`` kernel of its reads and writes: what it costs as a kernel of
    its own (less where it joins x's producer's)."""
    key = (str(device), M, K, N, bias, layout, stacked)
    if key not in _decisions:
        import torch.nn.functional as F

        from ..runtime.probe import graph_times_us

        with torch.no_grad(), torch.cuda.device(device):
            x = torch.randn(M, K, device=device)
            w_kn = torch.randn(K, N, device=device) / K ** 0.5
            w_nk = w_kn.t().contiguous()
            b = torch.randn(N, device=device) if bias else None
            weights = stacked_weight(w_kn)
            sel = torch.tensor([False, True, False], device=device)
            if layout == "nk":
                now = lambda: F.linear(x, w_nk, b)  # noqa: E731
            else:
                now = (lambda: torch.addmm(b, x, w_kn)) if bias else (lambda: torch.mm(x, w_kn))  # noqa: E731
            xr = x.view(M, 1, K)
            fns = [now, lambda: mm_tf32_op(torch.where(sel.view(3, 1), xr, xr).view(M, 3 * K), weights, b)]
            if stacked:
                weights3, xs = weights.view(3, K, N), x.view(1, M, K)
                fns += [lambda: now().unsqueeze(0).sum(0),
                        lambda: mm_tf32_op(torch.where(sel.view(3, 1, 1), xs, xs), weights3).sum(0)]
            _decisions[key] = tuple(graph_times_us(fns))
    return _decisions[key]


def tf32x3_linears(**options) -> Tf32x3Linears:
    """The 3xTF32 pass (``graphs_only=False`` also where the module runs without CUDA graphs)."""
    return Tf32x3Linears(**options)


# NOTE [3xTF32 convolutions]: cuDNN runs float32 convolutions on the SIMT cores unless the process allows TF32 for
# it (torch's default does; a process that turned it off, as fxopt's benchmarks do, asks for float32's accuracy).
# A convolution sums ``x * W`` over input channels and the kernel window, as a GEMM sums over K, so the split of NOTE
# [3xTF32 GEMMs] carries over: ``conv(x, W) ~ conv(x_hi, W_hi) + conv(x_lo, W_hi) + conv(x_hi, W_lo)``, one
# convolution over three times the input channels, ``[x_hi | x_lo | x_hi]`` against ``[W_hi | W_hi | W_lo]``, laid
# out per group for a grouped convolution (``x`` viewed [N, groups, 1, C / groups, H, W], the parts [N, groups, 3,
# C / groups, H, W]: each output channel reads its own group's three parts). Zero padding splits into zeros, cuDNN's
# fused bias, residual and ReLU apply to the sum (``fxopt::conv_tf32`` keeps the graph's call: F.conv2d,
# ``cudnn_convolution_relu`` or ``cudnn_convolution_add_relu``). Each shape is timed on the device, the convolution
# as the graph has it against the split (one ``where`` kernel) plus the TF32 convolution, and taken where at most
# ``MIN_GAIN`` of it. Its accuracy is measured with it: the 3xTF32 result on random data against a float64
# convolution, beside float32's, and the convolution stays float32 where 3xTF32's error is more than
# ``CONV_MAX_ERROR_RATIO`` times float32's: a cuDNN algorithm that transforms its operands before the product
# (Winograd, FFT) and rounds the transform to TF32 would lose what the split kept. Not seen on the H100 (torch 2.11):
# every shape of ResNet-50, EfficientNet-B0, MobileNetV3-L and a diffusion block at 2 to 20 times float32's error,
# also on ResNet-50's real activations; the model-level errors are 2e-07 to 6.6e-06 of the output's scale, but
# ResNet-50's logits 9.8e-05 against float32's 5.4e-07 (reports/2026-12-07-h100-s13-1717605/): the convolutions'
# errors grow through its fifty layers more than float32's do, for a reason not yet known; fxopt's verification
# (1e-04) is what bounds it. Convolutions with few channels per group (depthwise: no tensor-core work to gain) are
# not tried. Where the process allows TF32 for cuDNN at optimize time (torch's default) the convolutions already
# run on tensor cores: the pass leaves them. Measured with CUDA graphs, batch 1 (same reports): ResNet-50 2088 ->
# 1337 µs (its 3x3 convolutions of layers 3 and 4, 109 -> 72 µs each at 512 channels, and its 1x1 convolutions
# over 1024 and 2048 channels), EfficientNet-B0 1066 -> 674, MobileNetV3-L 642 -> 463, a diffusion block 379 ->
# 325; narrow convolutions over large images stay float32 (ResNet-50's 64-channel 1x1 convolutions at 56x56: 9.1
# against 25.3 µs).
CONV_MIN_GROUP_CHANNELS = 8  # input channels per group below this: depthwise-like, not tried
CONV_MAX_ERROR_RATIO = 32.0  # 3xTF32's error against float64 over float32's: about 10 where the split holds
CONV_PASS_NAME = "tf32x3_convolutions"
# (device, shapes, geometry, epilogue) -> ({"float32": µs, form: µs}, {"float32": error, form: error})
_conv_decisions: dict[tuple, tuple[dict[str, float], dict[str, float]]] = {}


class _Conv:
    """A float32 2-D convolution on a constant weight, any spelling, with what ``fxopt::conv_tf32`` needs."""

    def __init__(self, node, x, weight, bias, geometry, residual=None, alpha=1.0, relu=False):
        self.node, self.x, self.weight, self.bias = node, x, weight, bias  # bias: a graph value or an attribute path
        self.stride, self.padding, self.dilation, self.groups = geometry
        self.residual, self.alpha, self.relu = residual, alpha, relu

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(ops.tensor_meta(self.x).shape)

    @property
    def x_channels_last(self) -> bool:
        """Whether ``x`` is dense in NHWC order (else in NCHW): then only the channels-last form, with no copy of
        ``x`` before it and none of the output after it (eager's output is channels-last too)."""
        return getattr(ops.tensor_meta(self.x), "memory_format", None) is torch.channels_last

    @property
    def forms(self) -> tuple[str, ...]:
        return tuple(f for f in FORMS if f == "channels-last" or not self.x_channels_last)

    def key(self, device: torch.device) -> tuple:
        return (str(device), self.x_shape, self.x_channels_last, tuple(self.weight.shape),
                self.weight.is_contiguous(), self.stride, self.padding, self.dilation, self.groups,
                self.bias is not None, self.residual is not None, self.relu)

    def describe(self) -> str:
        N, C, H, W = self.x_shape
        O, _, kh, kw = self.weight.shape
        extra = "".join(s for s, on in ((" + bias", self.bias is not None), (" + residual", self.residual is not None),
                                        (" -> relu", self.relu)) if on)
        groups = f", groups {self.groups}" if self.groups != 1 else ""
        return f"{N}x{C}x{H}x{W} * {O}x{C // self.groups}x{kh}x{kw}, stride {self.stride[0]}{groups}{extra}"


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _as_conv(gm: fx.GraphModule, node: fx.Node, devices: tuple[str, ...]) -> _Conv | None:
    """A float32 2-D convolution on a constant weight on one of ``devices``, its input dense in NCHW or NHWC order,
    with enough channels per group; else None."""
    device = node.meta.get("device")
    if device is None or torch.device(device).type not in devices or node.kwargs:
        return None
    conv = None
    if node.op == "call_function" and node.target is torch.cudnn_convolution_relu and len(node.args) == 7:
        x, w, b, stride, padding, dilation, groups = node.args
        conv = _Conv(node, x, constant_tensor(gm, w), b, (_pair(stride), _pair(padding), _pair(dilation), groups),
                     relu=True)
    elif node.op == "call_function" and node.target is torch.cudnn_convolution_add_relu and len(node.args) == 9:
        x, w, z, alpha, b, stride, padding, dilation, groups = node.args
        conv = _Conv(node, x, constant_tensor(gm, w), b, (_pair(stride), _pair(padding), _pair(dilation), groups),
                     residual=z, alpha=alpha, relu=True)
    else:
        gemm = as_gemm(gm, node)
        if gemm is not None and gemm.kind == "conv2d":
            w = constant_tensor(gm, gemm.weight)
            conv = _Conv(node, gemm.input, w, gemm.bias,
                         (_pair(gemm.stride), _pair(gemm.padding), _pair(gemm.dilation), gemm.groups))
    if conv is None or not isinstance(conv.x, fx.Node) or not isinstance(conv.weight, torch.Tensor):
        return None
    tm = ops.tensor_meta(conv.x)
    if tm is None or tm.dtype != torch.float32 or len(tm.shape) != 4 or conv.weight.dtype != torch.float32 \
            or conv.weight.dim() != 4 \
            or getattr(tm, "memory_format", None) not in (torch.contiguous_format, torch.channels_last):
        return None
    if not isinstance(conv.groups, int) or tm.shape[1] % conv.groups or tm.shape[1] // conv.groups < CONV_MIN_GROUP_CHANNELS:
        return None
    if conv.residual is not None:
        rm = ops.tensor_meta(conv.residual) if isinstance(conv.residual, fx.Node) else None
        if rm is None or rm.dtype != torch.float32 or not isinstance(conv.alpha, (int, float)):
            return None
    if isinstance(conv.bias, fx.Node):
        bm = ops.tensor_meta(conv.bias)
        if bm is None or bm.dtype != torch.float32:
            return None
    return conv


def stacked_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[W_hi | W_hi | W_lo]`` along the input channels ([O, 3 C/groups, kh, kw]): what each group's ``[x_hi |
    x_lo | x_hi]`` meets."""
    w = weight.detach().float()
    hi = tf32_hi(w)
    return torch.cat([hi, hi, tf32_lo(w)], 1).contiguous()


FORMS = ("NCHW", "channels-last")  # the 3xTF32 convolution's layouts (NOTE [3xTF32 convolutions in channels-last])


# NOTE [3xTF32 convolutions in channels-last]: cuDNN's TF32 kernels run in NHWC; handed NCHW tensors it transposes
# them, or picks slower kernels: ResNet-50's 512-channel 3x3 convolution at 7x7, 3xTF32 71.6 µs in NCHW against 32.7
# with the parts written channels-last and the output copied back to NCHW (float32 108.8; H100, torch 2.11,
# reports/2026-12-07-h100-s13-1717605/call4-1717605/conv_probe.txt), while its 1x1 convolutions over 1024 and 2048
# channels are faster in NCHW (14.1 against 22.4 µs). So a second form is timed: ``x`` copied to channels-last (the
# split's kernel writes its parts in the order it reads ``x``: eager's rule, NOTE [Output layout]), read through a
# permute as [N, H, W, C], the parts written [N, H, W, groups, 3, C / groups] and viewed as a channels-last [N, 3C,
# H, W]; the stacked weight is stored channels-last; the output is copied back to NCHW, the layout the rest of the
# graph was built for. Both copies are in its time. The faster accurate form is taken. Where ``x`` is already dense
# in NHWC (a channels-last model, ConvNeXt's LayerNorm2d through permutes) only this form is a candidate and it needs
# neither copy: the parts come from ``x`` as it is and the output stays channels-last, as eager's does for such an
# input. Not yet measured in a model (the probe timed the split from a permuted view, without the first copy: at
# 7x7 x 512 channels that copy moves 100 KB).
class Tf32x3Convolutions:
    """The pass; ``graphs_only``, ``devices`` and ``timer`` as in :class:`Tf32x3Linears` (``timer``:
    :func:`_timed_conv`'s times and errors for a :class:`_Conv` on a device: ``({"float32": µs, form: µs, ...},
    {"float32": error, form: error, ...})`` over :data:`FORMS`)."""

    def __init__(self, *, graphs_only: bool = True, devices: tuple[str, ...] = ("cuda",), timer=None):
        self.graphs_only = graphs_only
        self.devices = devices
        self.timer = timer or _timed_conv

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        convs = [c for c in (_as_conv(gm, n, self.devices) for n in list(gm.graph.nodes)) if c is not None]
        if not convs or _stays_float32(gm, [c.node for c in convs], self.graphs_only, CONV_PASS_NAME,
                                        "convolution", "cudnn", "torch.backends.cudnn.allow_tf32"):
            return PassResult(gm, False)
        done = kept = 0
        taken = dict.fromkeys(FORMS, 0)
        for node in [c.node for c in convs]:
            conv = _as_conv(gm, node, self.devices)  # again: its input may be a convolution rewritten just before
            if conv is None:
                continue
            device = torch.device(node.meta["device"])
            try:
                times, errors = self.timer(device, conv)
            except Exception as e:  # noqa: BLE001 -- no cuDNN algorithm, out of memory: the convolution stays
                note(f"{CONV_PASS_NAME}: {conv.node.name} stays float32 ({type(e).__name__}: {e})")
                continue
            timing = (f"{conv.describe()}: " + ", ".join(f"{k} {v:.2f} µs" for k, v in times.items())
                      + "; error against float64 " + ", ".join(f"{v:.1e}" for v in errors.values()))
            bound = CONV_MAX_ERROR_RATIO * max(errors["float32"], 1e-9)
            accurate = [f for f in FORMS if f in conv.forms and f in times and errors[f] <= bound]
            if not accurate:
                kept += 1
                note(f"{CONV_PASS_NAME}: {conv.node.name} stays float32, 3xTF32 inaccurate here ({timing})")
                continue
            form = min(accurate, key=times.__getitem__)
            if times[form] > MIN_GAIN * times["float32"]:
                kept += 1
                note(f"{CONV_PASS_NAME}: {conv.node.name} stays float32 ({timing})")
                continue
            note(f"{CONV_PASS_NAME}: {conv.node.name} -> 3xTF32 {form} ({timing})")
            _rewrite_conv(gm, conv, channels_last=form == "channels-last")
            taken[form] += 1
            done += 1
        if done:
            record(convolutions=done, **({"channels_last": taken["channels-last"]} if taken["channels-last"] else {}))
            gm.graph.lint()
            gm.recompile()
        if kept:
            record(kept_float32=kept)
        return PassResult(gm, done > 0)


def _conv_split(gm: fx.GraphModule, conv: _Conv, channels_last: bool) -> fx.Node:
    """``x``'s parts per group: ``[N, groups, 3, C / groups, H, W]`` viewed [N, 3C, H, W]; channels-last, ``[N, H, W,
    groups, 3, C / groups]`` viewed [N, H, W, 3C] and permuted to a channels-last [N, 3C, H, W]."""
    N, C, H, W = conv.x_shape
    g = conv.groups
    if not channels_last:
        return _parts(gm, conv.x, (N, g, 1, C // g, H, W), (3, 1, 1, 1), (N, g, 3, C // g, H, W), (N, 3 * C, H, W),
                      CONV_PASS_NAME)
    graph, device = gm.graph, conv.x.meta.get("device")
    # x copied to channels-last first: the split's kernel writes its parts in its inputs' order (eager's rule, NOTE
    # [Output layout]), so it must read x dense in NHWC order for its parts to be [N, H, W, ...] in memory
    x_cl = conv.x
    if not conv.x_channels_last:
        x_cl = tag(graph.call_method("contiguous", (conv.x,), {"memory_format": torch.channels_last}), CONV_PASS_NAME)
        ops.set_tensor_meta(x_cl, torch.empty(N, C, H, W, device="meta").contiguous(memory_format=torch.channels_last),
                            device)
    nhwc = tag(graph.call_method("permute", (x_cl, 0, 2, 3, 1)), CONV_PASS_NAME)
    ops.set_tensor_meta(nhwc, torch.empty(N, H, W, C, device="meta"), device)
    parts = _parts(gm, nhwc, (N, H, W, g, 1, C // g), (3, 1), (N, H, W, g, 3, C // g), (N, H, W, 3 * C),
                   CONV_PASS_NAME)
    out = tag(graph.call_method("permute", (parts, 0, 3, 1, 2)), CONV_PASS_NAME)
    ops.set_tensor_meta(out, torch.empty(N, H, W, 3 * C, device="meta").permute(0, 3, 1, 2), device)
    return out


def _rewrite_conv(gm: fx.GraphModule, conv: _Conv, channels_last: bool = False) -> None:
    """The convolution -> ``x``'s parts and ``fxopt::conv_tf32`` on the stacked weight, with its bias, residual and
    ReLU; channels-last, its output copied back to NCHW where ``x`` was NCHW."""
    graph, node = gm.graph, conv.node
    weight = stacked_conv_weight(conv.weight)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    w_attr = new_attr(gm, f"{node.name}_tf32x3_weight", weight)
    with graph.inserting_before(node):
        split = _conv_split(gm, conv, channels_last)
        w = tag(graph.get_attr(w_attr), CONV_PASS_NAME)
        ops.set_tensor_meta(w, weight, weight.device)
        b = tag(graph.get_attr(conv.bias), CONV_PASS_NAME) if isinstance(conv.bias, str) else conv.bias
        args = (split, w, b, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        if conv.residual is not None or conv.relu:
            args += (conv.residual, float(conv.alpha), conv.relu)
        out = tag(graph.call_function(conv_tf32_op, args), CONV_PASS_NAME)
        if channels_last and not conv.x_channels_last:
            out.meta.update(device=node.meta.get("device"), has_tensor=True)
            out = tag(graph.call_method("contiguous", (out,)), CONV_PASS_NAME)
    out.meta.update({k: node.meta[k] for k in ("tensor_meta", "device", "has_tensor") if k in node.meta})
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _timed_conv(device: torch.device, conv: _Conv) -> tuple[dict[str, float], dict[str, float]]:
    """µs of the convolution as the graph has it and of each form's split (one ``where`` kernel of its reads and
    writes) plus the 3xTF32 convolution (and the copy back to NCHW); then the error of each against a float64
    convolution on random data (largest difference over the largest value). Measured once per shape and process
    (NOTE [Choosing by measurement])."""
    key = conv.key(device)
    if key not in _conv_decisions:
        from ..runtime.probe import graph_times_us

        N, C, H, W = conv.x_shape
        g = conv.groups
        geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), g)
        nhwc_x = conv.x_channels_last
        layout = torch.channels_last if nhwc_x else torch.contiguous_format
        with torch.no_grad(), torch.cuda.device(device):
            x = torch.randn(conv.x_shape, device=device).contiguous(memory_format=layout)
            w = torch.randn(conv.weight.shape, device=device) / (C // g * conv.weight[0, 0].numel()) ** 0.5
            if not conv.weight.is_contiguous():  # the weight as the graph stores it (channels-last)
                w = w.contiguous(memory_format=torch.channels_last)
            w3 = stacked_conv_weight(w)
            w3_cl = w3.contiguous(memory_format=torch.channels_last)
            b = torch.randn(conv.weight.shape[0], device=device) if conv.bias is not None else None
            out_shape = _conv_tf32_shape(x, w, geometry)
            z = torch.randn(out_shape, device=device) if conv.residual is not None else None
            sel = torch.tensor([False, True, False], device=device)
            xr = x.view(N, g, 1, C // g, H, W)
            x_cl = x if nhwc_x else torch.empty_like(x, memory_format=torch.channels_last)
            xp = x_cl.permute(0, 2, 3, 1).view(N, H, W, g, 1, C // g)
            epilogue = (z, float(conv.alpha), conv.relu)

            def nchw(hi, lo):
                return conv_tf32_op(torch.where(sel.view(3, 1, 1, 1), lo, hi).view(N, 3 * C, H, W), w3, b,
                                    *geometry, *epilogue)

            parts_nhwc = torch.empty(N, H, W, g, 3, C // g, device=device)  # written in order, as the kernel does

            def nhwc(hi, lo):
                if not nhwc_x:
                    x_cl.copy_(x)  # the copy to channels-last before the split
                torch.where(sel.view(3, 1), lo, hi, out=parts_nhwc)
                parts = parts_nhwc.view(N, H, W, 3 * C).permute(0, 3, 1, 2)
                y = conv_tf32_op(parts, w3_cl, b, *geometry, *epilogue)
                return y if nhwc_x else y.contiguous()

            forms = {"NCHW": lambda: nchw(xr, xr), "channels-last": lambda: nhwc(xp, xp)}
            fns = [lambda: graph_conv(x, w, b, *geometry, *epilogue), *(forms[f] for f in conv.forms)]
            times = dict(zip(("float32", *conv.forms), graph_times_us(fns)))
            want = reference_conv(*(None if t is None else t.double() for t in (x, w, b)), *geometry,
                                  None if z is None else z.double(), float(conv.alpha), conv.relu)
            scale = want.abs().max().clamp_min(1e-30)
            split = {"NCHW": lambda: nchw(tf32_hi(xr), tf32_lo(xr)), "channels-last": lambda: nhwc(tf32_hi(xp), tf32_lo(xp))}
            results = (fns[0](), *(split[f]() for f in conv.forms))
            errors = {k: ((got.double() - want).abs().max() / scale).item()
                      for k, got in zip(("float32", *conv.forms), results)}
            _conv_decisions[key] = (times, errors)
    return _conv_decisions[key]


def _conv_tf32_shape(x: torch.Tensor, w: torch.Tensor, geometry) -> tuple[int, ...]:
    return tuple(F.conv2d(x.to("meta"), w.to("meta"), None, *geometry).shape)


def tf32x3_convolutions(**options) -> Tf32x3Convolutions:
    """The 3xTF32 convolution pass (``graphs_only=False`` also where the module runs without CUDA graphs)."""
    return Tf32x3Convolutions(**options)
