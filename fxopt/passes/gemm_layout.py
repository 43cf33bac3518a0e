"""Linears (with or without their bias) -> the weight layout cuBLAS is faster with, chosen by measurement (CUDA,
with CUDA graphs).

Before (ViT-B's q/k/v projection: its output goes to a reshape and a permute, so its bias stays in the GEMM)::

    linear = torch._C._nn.linear(norm, qkv_weight, qkv_bias)          # weight [N, K]: cuBLAS's "NT" GEMM

After::

    reshape = norm.reshape(-1, 768)
    addmm = torch.addmm(qkv_bias, reshape, gemm_layout_weight)         # the weight stored [K, N]: "NN"
    view = addmm.view(1, 197, 2304)

NOTE [GEMM weight layouts]: ``F.linear(x, W[, b])`` reads ``W`` transposed; cuBLAS picks its kernel by the layout too,
and for some shapes the other layout's kernel is much faster. H100, torch 2.11, float32 at batch 1: ViT-B's q/k/v
projection (197 x 768 -> 2304) 40.5 µs as ``F.linear`` against 33.2 as ``addmm`` on the weight stored [K, N]; BERT-
sized (128 x 768 -> 2304) 30.0 against 25.0; bias-free (the bias moved into the tail, NOTE [Bias in the tail]), ViT-B's
MLP-in 38.2 against 35.2 as ``mm`` and DeiT-S's 16.1 against 14.5; but ViT-B's attention projection with its bias
20.5 against 25.5 the other way (``scratch/gemm_probe.py``, reports/2026-12-07-h100-s11-510f03f/call1-510f03f/
gemm_probe.txt). So each (rows, K, N, dtype, bias) is timed on the device in both layouts (NOTE [Choosing by
measurement], runtime/probe.py), and a Linear, ``addmm`` (transformers' Conv1D) or ``mm`` on a constant weight takes
the other layout where that is at most ``MIN_GAIN`` of its own time. Same kernels' count, same precision (both
accumulate in the compute type; the order differs). The weight in the new layout is a new constant of its size (the
model keeps its own). Only with CUDA graphs: the ``reshape`` and ``view`` around ``addmm``/``mm`` are two host-side
ops more per call.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from .base import new_attr, note, record, tag
from .fold import constant_tensor
from .horizontal import as_linear, linear_param_node

PASS_NAME = "gemm_weight_layouts"
MIN_ROWS, MAX_ROWS = 5, 8192  # fewer rows: few_row_linears' GEMV; more: both layouts run at the GPU's rate
MIN_GAIN = 0.93
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_decisions: dict[tuple, tuple[float, float]] = {}  # (device, M, K, N, dtype, bias) -> (µs on [N, K], µs on [K, N])


class GemmWeightLayouts:
    """The pass; ``graphs_only``, ``devices`` and ``timer`` as in split_k_linears (``timer``: (µs as ``F.linear`` on
    the [N, K] weight, µs as ``addmm``/``mm`` on the [K, N] weight) for (device, M, K, N, dtype, bias))."""

    def __init__(self, *, graphs_only: bool = True, devices: tuple[str, ...] = ("cuda",), timer=None):
        self.graphs_only = graphs_only
        self.devices = devices
        self.timer = timer or _timed

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        candidates = [c for c in (constant_weight_gemm(gm, n, self.devices) for n in list(gm.graph.nodes)) if c is not None]
        if not candidates:
            return PassResult(gm, False)
        if self.graphs_only and not gm.meta.get("fxopt_cuda_graphs"):
            note(f"{PASS_NAME}: {len(candidates)} GEMM(s) keep their layout: without CUDA graphs the reshape and view "
                 f"around addmm or mm cost host time (NOTE [GEMM weight layouts])")
            return PassResult(gm, False)
        done = kept = 0
        for node in [c.node for c in candidates]:
            gemm = constant_weight_gemm(gm, node, self.devices)  # again: its input may be a GEMM rewritten just before
            if gemm is None:
                continue
            K, N = gemm.weight_kn.shape
            biased = gemm.bias is not None
            kn_name = "addmm on [K, N]" if biased else "mm on [K, N]"
            shape = f"{gemm.rows}x{K} @ {K}x{N} {str(gemm.weight_kn.dtype)[6:]}{' + bias' if biased else ''}"
            try:
                nk_us, kn_us = self.timer(torch.device(gemm.node.meta["device"]), gemm.rows, K, N,
                                          gemm.weight_kn.dtype, biased)
            except Exception as e:  # noqa: BLE001 -- out of memory, a capture refused: the GEMM stays
                note(f"{PASS_NAME}: {gemm.node.name} keeps its layout (timing it failed: {type(e).__name__}: {e})")
                continue
            mine, other = (nk_us, kn_us) if gemm.layout == "nk" else (kn_us, nk_us)
            times = f"F.linear {nk_us:.2f} µs, {kn_name} {kn_us:.2f}"
            if other > MIN_GAIN * mine:
                kept += 1
                note(f"{PASS_NAME}: {gemm.node.name} keeps its layout ({shape}: {times})")
                continue
            note(f"{PASS_NAME}: {gemm.node.name} -> {kn_name if gemm.layout == 'nk' else 'F.linear'} ({shape}: "
                 f"{times})")
            _rewrite(gm, gemm)
            done += 1
        if done:
            record(gemms=done)
            gm.graph.lint()
            gm.recompile()
        if kept:
            record(kept_layout=kept)
        return PassResult(gm, done > 0)


class _Gemm:
    """A GEMM on a constant weight: its node, the weight's layout now ("nk": ``F.linear``; "kn": ``addmm``/``mm``),
    its input, the weight as [K, N], its bias (an ``addmm``'s bias node, the Linear (horizontal._Linear) whose bias
    it is, or None) and its rows."""

    def __init__(self, node, layout, x, weight_kn, bias, rows):
        self.node, self.layout, self.x, self.weight_kn, self.bias, self.rows = node, layout, x, weight_kn, bias, rows

    def bias_node(self, gm: fx.GraphModule, pass_name: str) -> fx.Node | None:
        """The bias as a graph node (a Linear's: its functional argument or the module's parameter), or None."""
        if self.bias is None or isinstance(self.bias, fx.Node):
            return self.bias
        return linear_param_node(gm, self.node, self.bias, "bias", pass_name)


def constant_weight_gemm(gm: fx.GraphModule, node: fx.Node, devices: tuple[str, ...]) -> _Gemm | None:
    """A Linear, ``addmm`` or ``mm`` on a constant weight on one of ``devices``, one float dtype throughout, else
    None."""
    if node.op not in ("call_function", "call_module"):
        return None
    device = node.meta.get("device")
    if device is None or torch.device(device).type not in devices:
        return None
    bias_source = bias = None
    if node.op == "call_function" and node.target in ops.ADDMM_FUNCTIONS and len(node.args) == 3 and not node.kwargs:
        layout, (bias_source, x, w_arg) = "kn", node.args
        weight_kn, bias = constant_tensor(gm, w_arg), constant_tensor(gm, bias_source)
        if not isinstance(bias, torch.Tensor):
            return None
    elif node.op == "call_function" and node.target in ops.MM_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
        layout, (x, w_arg) = "kn", node.args
        weight_kn = constant_tensor(gm, w_arg)
    else:
        lin = as_linear(gm, node)
        if lin is None:
            return None
        layout, x, weight_kn, bias = "nk", node.args[0], lin.weight.t(), lin.bias
        bias_source = lin if bias is not None else None
    tm_x = ops.tensor_meta(x) if isinstance(x, fx.Node) else None
    if tm_x is None or not tm_x.shape or not isinstance(weight_kn, torch.Tensor) or weight_kn.dim() != 2:
        return None
    K, N = weight_kn.shape
    dtypes = {weight_kn.dtype} | ({bias.dtype} if bias is not None else set())
    if tm_x.dtype not in _FLOATS or dtypes != {tm_x.dtype} or tm_x.shape[-1] != K \
            or (bias is not None and bias.shape != (N,)) \
            or (layout == "kn" and len(tm_x.shape) != 2):
        return None
    M = math.prod(tm_x.shape[:-1])
    if not MIN_ROWS <= M <= MAX_ROWS:
        return None
    return _Gemm(node, layout, x, weight_kn, bias_source, M)


def _rewrite(gm: fx.GraphModule, gemm: _Gemm) -> None:
    """The GEMM -> the same GEMM in the other layout: the weight as a new constant, the bias as the graph read it."""
    graph, node = gm.graph, gemm.node
    K, N = gemm.weight_kn.shape
    weight = (gemm.weight_kn if gemm.layout == "nk" else gemm.weight_kn.t()).detach().contiguous()  # the other
    w_attr = new_attr(gm, f"{node.name}_layout_weight", weight)
    out_shape = tuple(ops.tensor_meta(node).shape)
    with graph.inserting_before(node):
        w = tag(graph.get_attr(w_attr), PASS_NAME)
        ops.set_tensor_meta(w, weight, weight.device)
        b = gemm.bias_node(gm, PASS_NAME)
        if gemm.layout == "nk":
            x2 = tag(graph.call_method("reshape", (gemm.x, -1, K)), PASS_NAME)
            out = tag(graph.call_function(torch.mm, (x2, w)) if b is None
                      else graph.call_function(torch.addmm, (b, x2, w)), PASS_NAME)
            if len(out_shape) != 2:
                out = tag(graph.call_method("view", (out, *out_shape)), PASS_NAME)
        else:
            out = tag(graph.call_function(F.linear, (gemm.x, w) if b is None else (gemm.x, w, b)), PASS_NAME)
    out.meta.update({k: node.meta[k] for k in ("tensor_meta", "device", "has_tensor") if k in node.meta})
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _timed(device: torch.device, M: int, K: int, N: int, dtype: torch.dtype, bias: bool) -> tuple[float, float]:
    """(µs as ``F.linear`` on the [N, K] weight, µs as ``addmm``/``mm`` on the [K, N] weight), measured once per
    process."""
    key = (str(device), M, K, N, dtype, bias)
    if key not in _decisions:
        from ..runtime.probe import graph_times_us

        with torch.no_grad(), torch.cuda.device(device):
            x = torch.randn(M, K, device=device, dtype=dtype)
            w_nk = torch.randn(N, K, device=device, dtype=dtype)
            w_kn, b = w_nk.t().contiguous(), torch.randn(N, device=device, dtype=dtype) if bias else None
            kn = (lambda: torch.addmm(b, x, w_kn)) if bias else (lambda: torch.mm(x, w_kn))
            _decisions[key] = tuple(graph_times_us([lambda: F.linear(x, w_nk, b), kn]))
    return _decisions[key]


def gemm_weight_layouts(**options) -> GemmWeightLayouts:
    """The layout pass (``graphs_only=False`` also where the module runs without CUDA graphs)."""
    return GemmWeightLayouts(**options)
