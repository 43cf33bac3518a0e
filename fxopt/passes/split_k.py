"""Linears on few rows with a long reduction -> K split over a batched GEMM, the partial products added by the
elementwise tail after it (CUDA, with CUDA graphs).

Before (DeiT-S's MLP-out after NOTE [Bias in the tail]: 197 rows, K = 1536)::

    linear = torch._C._nn.linear(gelu, fc2_weight)
    add = linear + fc2_bias
    add_1 = add + residual

After (s = 3)::

    view = gelu.view(197, 3, 512);  transpose = view.transpose(0, 1)
    bmm = torch.bmm(transpose, split_k_weight)             # [3, 197, 384]: three partial products
    unbind = bmm.view(3, 1, 197, 384).unbind(0)
    add_2 = unbind[0] + unbind[1] + unbind[2]              # fuse_elementwise: one kernel with the bias and residual
    add = add_2 + fc2_bias
    ...

NOTE [Split-K linears]: at batch 1 a transformer's GEMMs have a few hundred rows, so cuBLAS's float32 kernels cover
few output tiles and walk a long K in each: H100, torch 2.11, DeiT-S's MLP-out (197 x 1536 -> 384) 15.7 µs as one
``mm``, 14.4 as three batched slices of K; its attention projection (197 x 384 -> 384) 8.9 against 6.1 (two to four
slices, ``scratch/gemm_probe.py``, reports/2026-12-07-h100-s11-510f03f/call1-510f03f/gemm_probe.txt). The slices'
sum costs nothing where an elementwise op reads the GEMM's output anyway (the bias moved there, a GELU, a residual
add): the adds join that op's generated kernel, which reads s partial products instead of one. Whether the batched
GEMM plus reading s partials beats one GEMM depends on the shape and the GPU, so each (rows, K, N, dtype) is timed on
the device (NOTE [Choosing by measurement], runtime/probe.py): ``mm`` then a reduction of its output over a unit dim
against, for each s, ``bmm`` then the reduction of the s partials (the same ATen kernel reading s times the
data, standing in for the tail's reads), and the fastest taken where it is at most ``MIN_GAIN`` of ``mm``'s time.
Float32 only: 16-bit partial products would each be rounded before their sum.
Only with CUDA graphs: the split costs four host-side ops where the Linear was one, and at the batch sizes where it
wins, a model without graphs is bound by host time, not GPU time (the note says so). The summed
order differs from cuBLAS's; fxopt's verification checks the result like any pass's. The batched weight is a new
constant of the Linear's size (the Linear's own weight stays with the model).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from .base import new_attr, note, record, tag
from .fold import constant_tensor
from .horizontal import as_linear

PASS_NAME = "split_k_linears"
SPLITS = (2, 3, 4)
MAX_ROWS = 1024  # more rows cover the GPU with output tiles: no candidate is timed
MIN_K = 256
MIN_GAIN = 0.93  # a split's time at most this fraction of one mm's
# float32 only: cuBLAS's float32 kernels are the ones that cover few tiles; 16-bit partial products would each be
# rounded to 16 bits before their sum, where one GEMM rounds once
_FLOATS = (torch.float32,)
_ALIGN_BYTES = 16  # each slice's first element aligned as cuBLAS's vector loads want it
_decisions: dict[tuple, tuple[float, ...]] = {}  # (device, M, K, N, dtype) -> µs of mm, then of each split


class SplitKLinears:
    """The pass; ``graphs_only`` (the default) leaves graphs alone unless the module runs as a CUDA graph
    (``gm.meta["fxopt_cuda_graphs"]``, set by :func:`fxopt.optimize`). ``devices`` and ``timer`` (µs of one GEMM,
    then of each of ``_splits(K, dtype)``, for (device, M, K, N, dtype)) are for tests on the CPU."""

    def __init__(self, *, graphs_only: bool = True, devices: tuple[str, ...] = ("cuda",), timer=None):
        self.graphs_only = graphs_only
        self.devices = devices
        self.timer = timer or _timed

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        candidates = [c for c in (_candidate(gm, n, self.devices) for n in list(gm.graph.nodes)) if c is not None]
        if not candidates:
            return PassResult(gm, False)
        if self.graphs_only and not gm.meta.get("fxopt_cuda_graphs"):
            note(f"{PASS_NAME}: {len(candidates)} bias-free Linear(s) before an elementwise tail left whole: without "
                 f"CUDA graphs the split's host-side views cost more than its GPU time saves (NOTE [Split-K linears])")
            return PassResult(gm, False)
        done = kept = 0
        for node in [c[0] for c in candidates]:
            candidate = _candidate(gm, node, self.devices)  # again: the graph changed around it
            if candidate is None:
                continue
            node, x, weight_kn, M, K, N, last = candidate
            device = node.meta["device"]
            shape = f"{M}x{K} @ {K}x{N} {str(weight_kn.dtype)[6:]}"
            try:
                times = self.timer(torch.device(device), M, K, N, weight_kn.dtype)
            except Exception as e:  # noqa: BLE001 -- out of memory, a capture refused: the GEMM stays
                note(f"{PASS_NAME}: {node.name} stays one GEMM (timing it failed: {type(e).__name__}: {e})")
                continue
            base, splits = times[0], dict(zip(_splits(K, weight_kn.dtype), times[1:]))
            timing = ", ".join(f"{s} slices {us:.2f}" for s, us in splits.items())
            best = min(splits, key=splits.__getitem__) if splits else None
            if best is None or splits[best] > MIN_GAIN * base:
                kept += 1
                note(f"{PASS_NAME}: {node.name} stays one GEMM ({shape}: {base:.2f} µs with a tail read; {timing})")
                continue
            note(f"{PASS_NAME}: {node.name} -> K in {best} slices ({shape}: {splits[best]:.2f} µs with the tail's "
                 f"reads, one GEMM {base:.2f})")
            _rewrite(gm, node, x, weight_kn, M, K, best, last)
            done += 1
        if done:
            record(linears=done)
            gm.graph.lint()
            gm.recompile()
        if kept:
            record(kept_one_gemm=kept)
        return PassResult(gm, done > 0)


def _splits(K: int, dtype: torch.dtype) -> list[int]:
    """The slice counts that divide K into aligned slices."""
    item = torch.empty((), dtype=dtype).element_size()
    return [s for s in SPLITS if K % s == 0 and (K // s * item) % _ALIGN_BYTES == 0]


def _candidate(gm: fx.GraphModule, node: fx.Node, devices: tuple[str, ...]):
    """(node, x, weight as [K, N], M, K, N, the node whose readers take the sum) for a bias-free Linear or ``mm`` on a
    constant weight, on one of ``devices``, whose output (through single-reader reshapes) only elementwise ops read; else None."""
    if node.op not in ("call_function", "call_module"):
        return None
    device = node.meta.get("device")
    if device is None or torch.device(device).type not in devices:
        return None
    if node.op == "call_function" and node.target in ops.MM_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
        weight = constant_tensor(gm, node.args[1])
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        weight_kn = weight  # [K, N]
    else:
        lin = as_linear(gm, node)
        if lin is None or lin.bias is not None or lin.weight.dim() != 2:
            return None
        weight_kn = lin.weight.t()  # [K, N]
    x = node.args[0] if node.args else None
    tm_x, tm = (ops.tensor_meta(x) if isinstance(x, fx.Node) else None), ops.tensor_meta(node)
    if tm_x is None or tm is None or not tm_x.shape or tm_x.dtype not in _FLOATS or weight_kn.dtype != tm_x.dtype:
        return None
    K, N = weight_kn.shape
    M = math.prod(tm_x.shape[:-1])
    if tm_x.shape[-1] != K or not 1 <= M <= MAX_ROWS or K < MIN_K or not _splits(K, tm_x.dtype) \
            or getattr(tm_x, "memory_format", None) is not torch.contiguous_format:
        return None
    last = elementwise_tail(gm, node)
    if last is None:
        return None
    return node, x, weight_kn, M, K, N, last


def elementwise_tail(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The last of ``node``'s single-reader row-major reshapes (or ``node``) when its value is contiguous and only
    elementwise ops read it: where a sum of partial products can be built (in that node's shape) for the readers'
    generated kernel to add; else None."""
    last = node
    while len(last.users) == 1:
        user = next(iter(last.users))
        if not ops.is_call_to(user, ops.ROW_MAJOR_RESHAPE_METHODS | ops.ROW_MAJOR_RESHAPE_FUNCTIONS):
            break
        last = user
    tm_last = ops.tensor_meta(last)
    readers = [u for u in last.users if not ops.is_shape_query(u)]
    if tm_last is None or getattr(tm_last, "memory_format", None) is not torch.contiguous_format or not readers \
            or any(isinstance(ops.match_elementwise(u, gm), str) for u in readers):
        return None
    return last


def _rewrite(gm: fx.GraphModule, node: fx.Node, x: fx.Node, weight_kn: torch.Tensor, M: int, K: int, s: int,
             last: fx.Node) -> None:
    """``node`` (and the reshapes to ``last``) -> the batched GEMM over ``s`` slices of K and the sum of its partial
    products in ``last``'s shape, which ``last``'s readers read."""
    graph = gm.graph
    N = weight_kn.shape[1]
    sliced = weight_kn.detach().reshape(s, K // s, N).contiguous()
    attr = new_attr(gm, f"{node.name}_split_k_weight", sliced)
    out_shape = tuple(ops.tensor_meta(last).shape)
    with graph.inserting_before(node):
        w = tag(graph.get_attr(attr), PASS_NAME)
        ops.set_tensor_meta(w, sliced, sliced.device)
        xs = tag(graph.call_method("view", (x, M, s, K // s)), PASS_NAME)
        xs = tag(graph.call_method("transpose", (xs, 0, 1)), PASS_NAME)
        partial = tag(graph.call_function(torch.bmm, (xs, w)), PASS_NAME)
        total = sum_of_parts(graph, partial, s, out_shape, PASS_NAME)
    replace_tail(gm, node, last, total)


def sum_of_parts(graph: fx.Graph, partial: fx.Node, s: int, shape: tuple[int, ...], pass_name: str) -> fx.Node:
    """The sum of a batched GEMM's ``s`` products (``partial`` [s, rows, N]) in ``shape``, as adds of its ``unbind``:
    elementwise ops that join their readers' generated kernel (inserted at the graph's insertion point)."""
    parts = tag(graph.call_method("unbind", (tag(graph.call_method("view", (partial, s, *shape)), pass_name), 0)),
                pass_name)
    total = tag(graph.call_function(operator.getitem, (parts, 0)), pass_name)
    for i in range(1, s):
        part = tag(graph.call_function(operator.getitem, (parts, i)), pass_name)
        total = tag(graph.call_function(operator.add, (total, part)), pass_name)
    return total


def replace_tail(gm: fx.GraphModule, node: fx.Node, last: fx.Node, total: fx.Node) -> None:
    """``last``'s readers read ``total`` (its value, built from partial products); ``node`` and the reshapes from
    it to ``last`` (elementwise_tail's), now unread, go."""
    total.meta.update({k: last.meta[k] for k in ("tensor_meta", "device", "has_tensor") if k in last.meta})
    last.replace_all_uses_with(total)
    while True:
        before = last.args[0] if last is not node else None
        gm.graph.erase_node(last)
        if before is None:
            break
        last = before


def _timed(device: torch.device, M: int, K: int, N: int, dtype: torch.dtype) -> tuple[float, ...]:
    """µs of one ``mm`` and of each split's ``bmm``, each followed by a reduction over its leading dim (the tail's
    reads), measured once per process (NOTE [Choosing by measurement])."""
    key = (str(device), M, K, N, dtype)
    if key not in _decisions:
        from ..runtime.probe import graph_times_us

        with torch.no_grad(), torch.cuda.device(device):
            x = torch.randn(M, K, device=device, dtype=dtype)
            w = torch.randn(K, N, device=device, dtype=dtype)
            fns = [lambda: torch.mm(x, w).unsqueeze(0).sum(0)]
            for s in _splits(K, dtype):
                xs, ws = x.view(M, s, K // s).transpose(0, 1), w.view(s, K // s, N)
                fns.append(lambda xs=xs, ws=ws: torch.bmm(xs, ws).sum(0))
            _decisions[key] = tuple(graph_times_us(fns))
    return _decisions[key]


def split_k_linears(**options) -> SplitKLinears:
    """The split-K pass (``graphs_only=False`` also splits where the module runs without CUDA graphs)."""
    return SplitKLinears(**options)
