#!/usr/bin/env python
"""Row-wise kernels (fuse_reductions) against ATen, per launch configuration: GPU µs of one call for each target of
elements per thread, on the row counts batch-1 models have (16-32 rows) and on ones that fill the GPU.

    python benchmarks/sweep_rows_config.py [--calls 200]

For each case (add + LayerNorm, LayerNorm, softmax, add + RMSNorm in bfloat16; rows x n) it prints the median kernel time of fxopt's kernel with
``threads`` chosen for 32, 16, 8, 4, 2 and 1 elements a thread (fxopt.runtime.rowwise's launch heuristic with the
constant overridden; NOTE [Rows that do not fill the GPU]) and the sum of ATen's kernels for the same ops.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn as nn
from tabulate import tabulate

import fxopt
from fxopt.runtime import rowwise
from fxopt.passes import base
from fxopt.passes.fuse_reductions import fuse_reductions
from fxopt.runtime.kernel import KERNELS, fused_op


class AddNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)

    def forward(self, x, r):
        return self.norm(x + r)


class Norm(AddNorm):
    def forward(self, x, r):
        return self.norm(x)


class RMSAddNorm(nn.Module):
    """A decoder's residual add + RMSNorm (fxopt.models.decoder's RMSNorm: in float32, scaled in the input's dtype),
    run in bfloat16."""

    dtype = torch.bfloat16

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x, r):
        s = x + r
        h = s.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(s.dtype), s


class Softmax(nn.Module):
    def __init__(self, n):
        super().__init__()

    def forward(self, x, r):
        return torch.softmax(x, -1)


def gpu_us(fn, calls: int) -> float:
    """Median GPU time of one call (sum of its kernels), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    per_call = len(kernels) // calls
    return statistics.median(sum(e - s for s, e in kernels[i:i + per_call])
                             for i in range(0, per_call * calls, per_call))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    cases = [(AddNorm, 16, 512), (AddNorm, 32, 256), (Norm, 16, 512), (AddNorm, 1, 1024), (Softmax, 64, 32),
             (Softmax, 4, 1024), (AddNorm, 256, 768), (AddNorm, 4096, 512), (Softmax, 16384, 128),
             (RMSAddNorm, 1, 768), (RMSAddNorm, 1, 256), (RMSAddNorm, 1, 4096)]
    targets = [32, 16, 8, 4, 2, 1]
    rows = []
    for cls, r, n in cases:
        dtype = getattr(cls, "dtype", torch.float32)
        model = cls(n).cuda().eval().to(dtype)
        x, res = (torch.randn(r, n, device="cuda", dtype=dtype) for _ in range(2))
        gm = fxopt.capture(model, [x, res])
        with base._collect("fuse_reductions"):
            gm = fuse_reductions("cuda")(gm).graph_module
        gm.recompile()
        (kernel,) = [KERNELS[nd.args[0]] for nd in gm.graph.nodes if nd.op == "call_function" and nd.target is fused_op]
        with torch.no_grad():
            want = model(x, res)
            row = [f"{cls.__name__} {r}x{n}", f"{gpu_us(lambda: model(x, res), args.calls):.2f}"]
            for t in targets:
                rowwise.ELEMENTS_PER_THREAD = rowwise.FEW_ROWS_ELEMENTS_PER_THREAD = t
                kernel._plans.clear()  # and the generated call path with its own plan cache: planned again
                kernel.__dict__.pop("call", None)
                got = gm(x, res)
                torch.testing.assert_close(got, want, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-4)
                plan = next(iter(kernel._plans.values()))
                row.append(f"{gpu_us(lambda: gm(x, res), args.calls):.2f} {plan.block[0]}x{plan.block[1]}/{plan.grid}")
        rows.append(row)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: GPU µs per call (block threads x rows / grid)")
    print(tabulate(rows, headers=["case", "ATen"] + [f"{t}/thread" for t in targets], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
