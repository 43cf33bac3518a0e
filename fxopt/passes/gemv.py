"""Linear layers on a few rows -> fxopt's GEMV kernel where it measures faster than cuBLAS (CUDA).

Before (a decode step's merged q/k/v projection, one row)::

    linear = torch._C._nn.linear(rms, merged_linear_weight)

After::

    fused = torch.ops.fxopt.fused.default('fxopt_gemv_1a2b3c4d', [rms, merged_linear_weight])
    getitem = fused[0]

NOTE [Few-row linears]: at batch-1 decode every projection is a matrix-vector product bound by reading its weight
once; cuBLAS runs a tensor-core tile for it at about a fifth of the memory's bandwidth (codegen/gemv.py). The
generated kernel streams each weight row through one warp. Whether it wins depends on the shape and the GPU, so each
(rows, N, K, dtype, bias) is timed on the device against F.linear (NOTE [Choosing by measurement],
runtime/probe.py) and rewritten only where the kernel is at least ``MIN_GAIN`` faster; the note per shape says both
times. Taken for ``F.linear``/``nn.Linear`` on constant weights with contiguous rows, an input of at most
``MAX_ROWS`` rows whose last dim is contiguous, one float dtype throughout.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..codegen.gemv import MAX_ROWS, GemvProgram
from ..runtime.gemv import gemv_kernel
from ..runtime.kernel import fused_op
from .base import note, record, tag
from .horizontal import as_linear, linear_param_node

PASS_NAME = "few_row_linears"
MIN_GAIN = 0.9  # the kernel's time at most this fraction of cuBLAS's
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_decisions: dict[tuple, tuple[float, float]] = {}  # (device, M, N, K, dtype, bias) -> (kernel µs, cuBLAS µs)


class FewRowLinears:
    """The pass for ``backend`` (graphs on CUDA with backend ``"cuda"``); ``cpu=True`` also rewrites CPU graphs with
    the C++ twin and without timing (tests)."""

    def __init__(self, backend: str, *, cpu: bool = False):
        self.backend = backend
        self.cpu = cpu

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        kernels = gm.meta.setdefault("fxopt_kernels", {})
        done = kept = 0
        for node in list(gm.graph.nodes):
            lin = as_linear(gm, node)
            if lin is None:
                continue
            device = node.meta.get("device")
            x = node.args[0] if node.args else None
            tm_x = ops.tensor_meta(x) if isinstance(x, fx.Node) else None
            if device is None or tm_x is None:
                continue
            device = torch.device(device)
            if not ((device.type == "cuda" and self.backend == "cuda") or (device.type == "cpu" and self.cpu)):
                continue
            w, b = lin.weight, lin.bias
            M = math.prod(tm_x.shape[:-1]) if len(tm_x.shape) else 0
            if not 1 <= M <= MAX_ROWS or w.dim() != 2:
                continue
            if tm_x.dtype not in _FLOATS or w.dtype != tm_x.dtype or (b is not None and b.dtype != w.dtype) \
                    or w.stride(1) != 1 or (tm_x.stride[-1] != 1 and tm_x.shape[-1] > 1):
                note(f"{PASS_NAME}: {node.name} stays F.linear (dtypes or layouts: x {tm_x.dtype} stride "
                     f"{tuple(tm_x.stride)}, weight {w.dtype} stride {tuple(w.stride())})")
                continue
            program = GemvProgram("cuda" if device.type == "cuda" else "cpp", w.dtype, b is not None,
                                  str(device) if device.type == "cuda" else "")
            try:
                kernel = gemv_kernel(program, device)
            except Exception as e:  # noqa: BLE001 -- the linear stays
                note(f"{PASS_NAME}: {node.name} stays F.linear (the kernel did not build: {type(e).__name__}: {e})")
                continue
            if device.type == "cuda":
                try:
                    mine, library = _timed(kernel, device, M, w, b)
                except Exception as e:  # noqa: BLE001 -- out of memory, a capture refused: the linear stays
                    note(f"{PASS_NAME}: {node.name} stays F.linear (timing it failed: {type(e).__name__}: {e})")
                    continue
                shape = f"{M}x{w.shape[1]} @ {w.shape[0]}x{w.shape[1]}^T {str(w.dtype)[6:]}"
                if mine > MIN_GAIN * library:
                    kept += 1
                    note(f"{PASS_NAME}: {node.name} stays cuBLAS ({shape}: {library:.2f} µs, the kernel {mine:.2f})")
                    continue
                note(f"{PASS_NAME}: {node.name} -> GEMV ({shape}: {mine:.2f} µs, cuBLAS {library:.2f})")
            with gm.graph.inserting_before(node):
                inputs = [x] + [linear_param_node(gm, node, lin, name, PASS_NAME) for name in ("weight", "bias")
                                if (name == "weight" or b is not None)]
                fused = tag(gm.graph.create_node("call_function", fused_op, (kernel.name, inputs), name="fused_gemv"),
                            PASS_NAME)
                fused.meta["fxopt_kernel"] = kernel.name
                kernels[fused.name] = kernel
                value = tag(gm.graph.call_function(operator.getitem, (fused, 0)), PASS_NAME)
            value.meta.update({m: node.meta[m] for m in ("tensor_meta", "device", "has_tensor") if m in node.meta})
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
            done += 1
        if done:
            record(linears=done)
            gm.graph.lint()
            gm.recompile()
        if kept:
            record(kept_cublas=kept)
        return PassResult(gm, done > 0)


def _timed(kernel, device: torch.device, M: int, w: torch.Tensor, b: torch.Tensor | None) -> tuple[float, float]:
    """(kernel µs, F.linear µs) for this shape on ``device``, measured once per process (NOTE [Choosing by
    measurement])."""
    key = (str(device), M, tuple(w.shape), w.dtype, b is not None)
    if key not in _decisions:
        from ..runtime.probe import graph_times_us

        with torch.no_grad(), torch.cuda.device(device):
            # the layer's own weight (read only; no copy of a large LM head), a random input
            x = torch.randn(M, w.shape[1], device=device, dtype=w.dtype)
            inputs = [x, w] + ([b] if b is not None else [])
            _decisions[key] = tuple(graph_times_us([lambda: kernel(inputs), lambda: F.linear(x, w, b)]))
    return _decisions[key]


def few_row_linears(backend: str, **options) -> FewRowLinears:
    """The few-row linear pass for ``backend`` (it rewrites graphs on CUDA with backend ``"cuda"``)."""
    return FewRowLinears(backend, **options)
