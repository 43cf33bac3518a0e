#!/usr/bin/env python
"""Every GPU kernel of one call, per system: name, count and time, so a system whose GPU busy time is higher than
another's shows which kernels make the difference.

    python benchmarks/kernel_table.py mlp_block [--systems eager,fxopt,hand_graph,fxopt_graphs,compile] [--calls 20]
    python benchmarks/kernel_table.py timm/convnext_tiny --systems eager,compile,fxopt   (sweep_models.py's models)
    python benchmarks/kernel_table.py decode/plain/gpt2_small_size/bfloat16 --systems eager,compile,fxopt
        (one decode step of fxopt.models.decoder's MODEL/PRESET/DTYPE at position 0)

Each system runs ``--calls`` times under torch.profiler after warm-up; the table gives, per kernel name (first 70
characters), the calls per forward and the median GPU µs per forward, with the per-system totals (the busy time
bench_cudagraphs.py reports). Memory copies and memsets are listed too, marked as such.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys

import torch
from tabulate import tabulate

import fxopt
from fxopt import models


def profile(fn, inputs, calls: int) -> dict[str, tuple[float, float]]:
    """{kernel name: (launches per call, GPU µs per call)}."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad():
        for _ in range(5):
            fn(*inputs)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn(*inputs)
            torch.cuda.synchronize()
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name[:70]].append(e.time_range.end - e.time_range.start)
    return {name: (len(times) / calls, statistics.median(times) * len(times) / calls)
            for name, times in per_name.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--systems", default="eager,fxopt,hand_graph,fxopt_graphs")
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_cudagraphs import hand_captured

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as the sweeps
    from sweep_models import MODELS

    if args.model.startswith("decode/"):
        from fxopt.models.decoder import build_step

        _, kind, preset, dtype = args.model.split("/")
        model = build_step(kind, preset, getattr(torch, dtype), "cuda")
        inputs = (torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda"))
    elif args.model in MODELS:
        torch.manual_seed(0)
        model, inputs = MODELS[args.model].build(1, torch.device("cuda"))
        model = model.eval()
    else:
        model, inputs = models.build_any(args.model, "cuda")
    systems = {"eager": lambda: model, "fxopt": lambda: fxopt.optimize(model, inputs),
               "compile": lambda: torch.compile(model),
               "hand_graph": lambda: hand_captured(model, inputs)[0],
               "fxopt_graphs": lambda: fxopt.optimize(model, inputs, cuda_graphs=True)}
    names = args.systems.split(",")
    tables = {name: profile(systems[name](), inputs, args.calls) for name in names}
    kernels = sorted({k for t in tables.values() for k in t}, key=lambda k: -max(t.get(k, (0, 0))[1]
                                                                               for t in tables.values()))
    rows = [[k] + [f"{tables[s][k][0]:.0f} x {tables[s][k][1]:.1f}" if k in tables[s] else "" for s in names]
            for k in kernels]
    rows.append(["total GPU µs per call"] + [f"{sum(v[1] for v in tables[s].values()):.1f}" for s in names])
    print(f"{args.model}, {torch.cuda.get_device_name()}, torch {torch.__version__}: launches x GPU µs per call")
    rows.append(["kernels per call"] + [f"{sum(v[0] for v in tables[s].values()):.0f}" for s in names])
    print(tabulate(rows, headers=["kernel"] + names, tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
