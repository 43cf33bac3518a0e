"""Linears that keep their bias -> the weight layout cuBLAS is faster with, chosen by measurement (CUDA, with CUDA
graphs).

Before (ViT-B's q/k/v projection: its output goes to a reshape and a permute, so its bias stays in the GEMM)::

    linear = torch._C._nn.linear(norm, qkv_weight, qkv_bias)          # weight [N, K]: cuBLAS's "NT" GEMM

After::

    reshape = norm.reshape(-1, 768)
    addmm = torch.addmm(qkv_bias, reshape, gemm_layout_weight)         # the weight stored [K, N]: "NN"
    view = addmm.view(1, 197, 2304)

NOTE [Weight layouts for biased GEMMs]: ``F.linear(x, W, b)`` reads ``W`` transposed; cuBLAS picks its kernel by the
layout too, and for some shapes the other layout's kernel is much faster. H100, torch 2.11, float32 at batch 1:
ViT-B's q/k/v projection (197 x 768 -> 2304) 40.5 µs as ``F.linear`` against 33.2 as ``addmm`` on the weight stored
[K, N]; BERT-sized (128 x 768 -> 2304) 30.0 against 25.0; but ViT-B's attention projection (768 -> 768) 20.5
against 25.5 the other way, and DeiT-S's MLP-out 33.5 against 41.1 (``scratch/gemm_probe.py``,
reports/2026-12-07-h100-s11-510f03f/call1-510f03f/gemm_probe.txt). So each (rows, K, N, dtype) is timed on the device
in both layouts (NOTE [Choosing by measurement], runtime/probe.py), and a Linear (or ``addmm``, transformers'
Conv1D) whose bias stayed in the GEMM (no elementwise op reads it, NOTE [Bias in the tail]) takes the other layout
where that is at most ``MIN_GAIN`` of its own time. Same kernels' count, same precision (both accumulate in the
compute type; the order differs). The weight in the new layout is a new constant of its size (the model keeps its
own). Only with CUDA graphs: the ``reshape`` and ``view`` around ``addmm`` are two host-side ops more per call.
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
from .horizontal import as_linear

PASS_NAME = "gemm_weight_layouts"
MIN_ROWS, MAX_ROWS = 5, 8192  # fewer rows: few_row_linears' GEMV; more: both layouts run at the GPU's rate
MIN_GAIN = 0.93
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_decisions: dict[tuple, tuple[float, float]] = {}  # (device, M, K, N, dtype) -> (µs as F.linear, µs as addmm [K, N])


class GemmWeightLayouts:
    """The pass; ``graphs_only``, ``devices`` and ``timer`` as in split_k_linears (``timer``: (µs as ``F.linear``,
    µs as ``addmm`` on the [K, N] weight) for (device, M, K, N, dtype))."""

    def __init__(self, *, graphs_only: bool = True, devices: tuple[str, ...] = ("cuda",), timer=None):
        self.graphs_only = graphs_only
        self.devices = devices
        self.timer = timer or _timed

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        candidates = [c for c in (_candidate(gm, n, self.devices) for n in list(gm.graph.nodes)) if c is not None]
        if not candidates:
            return PassResult(gm, False)
        if self.graphs_only and not gm.meta.get("fxopt_cuda_graphs"):
            note(f"{PASS_NAME}: {len(candidates)} biased GEMM(s) keep their layout: without CUDA graphs the reshape "
                 f"and view around addmm cost host time (NOTE [Weight layouts for biased GEMMs])")
            return PassResult(gm, False)
        done = kept = 0
        for node, form, x, weight_kn, bias, M in candidates:  # bias: (its graph value, the tensor)
            K, N = weight_kn.shape
            shape = f"{M}x{K} @ {K}x{N} {str(weight_kn.dtype)[6:]}"
            try:
                as_linear_us, as_addmm_us = self.timer(torch.device(node.meta["device"]), M, K, N, weight_kn.dtype)
            except Exception as e:  # noqa: BLE001 -- out of memory, a capture refused: the GEMM stays
                note(f"{PASS_NAME}: {node.name} keeps its layout (timing it failed: {type(e).__name__}: {e})")
                continue
            mine, other = (as_linear_us, as_addmm_us) if form == "linear" else (as_addmm_us, as_linear_us)
            times = f"F.linear {as_linear_us:.2f} µs, addmm on [K, N] {as_addmm_us:.2f}"
            if other > MIN_GAIN * mine:
                kept += 1
                note(f"{PASS_NAME}: {node.name} keeps its layout ({shape}: {times})")
                continue
            note(f"{PASS_NAME}: {node.name} -> {'addmm on [K, N]' if form == 'linear' else 'F.linear'} ({shape}: "
                 f"{times})")
            _rewrite(gm, node, form, x, weight_kn, bias)
            done += 1
        if done:
            record(gemms=done)
            gm.graph.lint()
            gm.recompile()
        if kept:
            record(kept_layout=kept)
        return PassResult(gm, done > 0)


def _candidate(gm: fx.GraphModule, node: fx.Node, devices: tuple[str, ...]):
    """(node, "linear" | "addmm", x, weight as [K, N], the bias node or tensor, rows) for a biased Linear or ``addmm``
    on constant weights on one of ``devices``, one float dtype throughout; else None."""
    if node.op not in ("call_function", "call_module"):
        return None
    device = node.meta.get("device")
    if device is None or torch.device(device).type not in devices:
        return None
    if node.op == "call_function" and node.target in (torch.addmm, torch.ops.aten.addmm.default) \
            and len(node.args) == 3 and not node.kwargs:
        form, (bias_ref, x, w_arg) = "addmm", node.args
        weight_kn, bias = constant_tensor(gm, w_arg), constant_tensor(gm, bias_ref)
        if not isinstance(weight_kn, torch.Tensor) or not isinstance(bias, torch.Tensor):
            return None
    else:
        lin = as_linear(gm, node)
        if lin is None or lin.bias is None:
            return None
        form, x, weight_kn, bias = "linear", node.args[0], lin.weight.t(), lin.bias
        bias_ref = f"{node.target}.bias" if node.op == "call_module" else node.args[2]
    tm_x = ops.tensor_meta(x) if isinstance(x, fx.Node) else None
    if tm_x is None or not tm_x.shape or weight_kn.dim() != 2 or bias.dim() != 1 or bias_ref is None:
        return None
    K, N = weight_kn.shape
    if tm_x.dtype not in _FLOATS or {weight_kn.dtype, bias.dtype} != {tm_x.dtype} or tm_x.shape[-1] != K \
            or bias.shape[0] != N or (form == "addmm" and len(tm_x.shape) != 2):
        return None
    M = math.prod(tm_x.shape[:-1])
    if not MIN_ROWS <= M <= MAX_ROWS:
        return None
    return node, form, x, weight_kn, (bias_ref, bias), M


def _rewrite(gm: fx.GraphModule, node: fx.Node, form: str, x: fx.Node, weight_kn: torch.Tensor, bias) -> None:
    """``node`` -> the same GEMM in the other layout: the weight as a new constant, the bias as the graph read it
    (its get_attr node, or the Linear module's attribute)."""
    graph = gm.graph
    K, N = weight_kn.shape
    weight = (weight_kn if form == "linear" else weight_kn.t()).detach().contiguous()  # [K, N] or [N, K]
    w_attr = new_attr(gm, f"{node.name}_layout_weight", weight)
    bias_ref, bias_tensor = bias
    out_shape = tuple(ops.tensor_meta(node).shape)
    with graph.inserting_before(node):
        w = tag(graph.get_attr(w_attr), PASS_NAME)
        ops.set_tensor_meta(w, weight, weight.device)
        b = bias_ref
        if isinstance(bias_ref, str):  # the module's own bias, read where the module was called
            b = tag(graph.get_attr(bias_ref), PASS_NAME)
            ops.set_tensor_meta(b, bias_tensor, bias_tensor.device)
        if form == "linear":
            x2 = tag(graph.call_method("reshape", (x, -1, K)), PASS_NAME)
            out = tag(graph.call_function(torch.addmm, (b, x2, w)), PASS_NAME)
            if len(out_shape) != 2:
                out = tag(graph.call_method("view", (out, *out_shape)), PASS_NAME)
        else:
            out = tag(graph.call_function(F.linear, (x, w, b)), PASS_NAME)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def _timed(device: torch.device, M: int, K: int, N: int, dtype: torch.dtype) -> tuple[float, float]:
    """(µs as ``F.linear`` on the [N, K] weight, µs as ``addmm`` on the [K, N] weight), measured once per process."""
    key = (str(device), M, K, N, dtype)
    if key not in _decisions:
        from ..runtime.probe import graph_times_us

        with torch.no_grad(), torch.cuda.device(device):
            x = torch.randn(M, K, device=device, dtype=dtype)
            w_nk = torch.randn(N, K, device=device, dtype=dtype)
            w_kn, b = w_nk.t().contiguous(), torch.randn(N, device=device, dtype=dtype)
            _decisions[key] = tuple(graph_times_us([lambda: F.linear(x, w_nk, b), lambda: torch.addmm(b, x, w_kn)]))
    return _decisions[key]


def gemm_weight_layouts(**options) -> GemmWeightLayouts:
    """The layout pass (``graphs_only=False`` also where the module runs without CUDA graphs)."""
    return GemmWeightLayouts(**options)
