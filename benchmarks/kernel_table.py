#!/usr/bin/env python
"""Every GPU kernel of one call, per system: name, count and time, so a system whose GPU busy time is higher than
another's shows which kernels make the difference.

    python benchmarks/kernel_table.py mlp_block [--systems eager,fxopt,hand_graph,fxopt_graphs,compile] [--calls 20]
    python benchmarks/kernel_table.py timm/convnext_tiny --systems eager,compile,fxopt   (sweep_models.py's models;
        --dtype float16 and --batch 32 as its configs)
    python benchmarks/kernel_table.py decode/plain/gpt2_small_size/bfloat16 --systems eager,compile,fxopt
        (one decode step of fxopt.models.decoder's MODEL/PRESET/DTYPE at position 0)

Each system runs ``--calls`` times under torch.profiler after warm-up; the table gives, per kernel name (first 70
characters), the calls per forward and the median GPU µs per forward, with the per-system totals (the busy time
bench_cudagraphs.py reports). Memory copies and memsets are listed too, marked as such.

``--gemms`` adds a second table: every GEMM and attention op (mm, addmm, bmm, SDPA, ...) by its input shapes, with
its calls and GPU µs per forward in each system. Kernel names do not tell two calls of one cuBLAS kernel on
different shapes apart, and Inductor calls ATen's mm for its GEMMs, so this table compares like with like.
``--by-op`` adds a third: each kernel with the op that launched it and that op's two callers (which op's copy is
that ``elementwise_kernel``?).
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


# ATen ops that launch GEMM or attention kernels themselves (not linear or matmul, which call these).
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
            "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention",
            "aten::_scaled_dot_product_cudnn_attention", "aten::_efficient_attention_forward",
            "aten::_flash_attention_forward", "aten::cudnn_convolution")


def profile_gemms(fn, inputs, calls: int) -> dict[str, tuple[float, float]]:
    """{"op shapes": (calls per forward, GPU µs per forward)} for the ops of GEMM_OPS."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad():
        for _ in range(5):
            fn(*inputs)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(calls):
                fn(*inputs)
            torch.cuda.synchronize()
    out = {}
    for avg in prof.key_averages(group_by_input_shape=True):
        if avg.key in GEMM_OPS:
            shapes = [list(s) for s in avg.input_shapes if s]
            total = getattr(avg, "device_time_total", None) or getattr(avg, "cuda_time_total", 0.0)
            out[f"{avg.key[6:]} {shapes}"] = (avg.count / calls, total / calls)
    return out


def profile_by_op(fn, inputs, calls: int) -> dict[str, tuple[float, float]]:
    """{"kernel <- the op that launched it": (launches per forward, GPU µs per forward)}: torch.profiler links each
    kernel to the innermost op recorded when it was launched (``FunctionEvent.kernels``), so a copy kernel says
    whether ``aten::copy_``, ``aten::contiguous`` under a convolution, or an fxopt kernel's plan launched it."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad():
        for _ in range(5):
            fn(*inputs)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn(*inputs)
            torch.cuda.synchronize()
    per_key: dict[str, list[float]] = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU:
            parents, p = [], e.cpu_parent
            while p is not None and len(parents) < 2:  # the op and what called it: "aten::copy_ < aten::contiguous"
                parents.append(p.name)
                p = p.cpu_parent
            where = " < ".join([e.name, *parents])
            for k in e.kernels:
                per_key[f"{k.name[:50]} <- {where[:70]}"].append(k.duration)
    return {key: (len(times) / calls, sum(times) / calls) for key, times in per_key.items()}


def print_table(title: str, tables: dict[str, dict[str, tuple[float, float]]], names: list[str]) -> None:
    keys = sorted({k for t in tables.values() for k in t}, key=lambda k: -max(t.get(k, (0, 0))[1]
                                                                            for t in tables.values()))
    rows = [[k] + [f"{tables[s][k][0]:.0f} x {tables[s][k][1]:.1f}" if k in tables[s] else "" for s in names]
            for k in keys]
    rows.append(["total GPU µs per call"] + [f"{sum(v[1] for v in tables[s].values()):.1f}" for s in names])
    rows.append(["launches per call"] + [f"{sum(v[0] for v in tables[s].values()):.0f}" for s in names])
    print(title)
    print(tabulate(rows, headers=["kernel" if "kernel" in title else "op [input shapes]"] + names,
                   tablefmt="github"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--systems", default="eager,fxopt,hand_graph,fxopt_graphs")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--gemms", action="store_true", help="also a table of GEMM and attention ops by input shapes")
    ap.add_argument("--by-op", action="store_true", help="also a table of kernels by the op that launched them")
    ap.add_argument("--dtype", default="float32", help="a sweep model's dtype (float32, float16, bfloat16)")
    ap.add_argument("--batch", type=int, default=1, help="a sweep model's batch size")
    ap.add_argument("--enable", default="", help="opt-in passes for the systems fxopt_enabled and fxopt_graphs_enabled (comma-separated)")
    ap.add_argument("--disable", default="", help="default passes the systems fxopt_disabled and fxopt_graphs_disabled leave out (comma-separated)")
    args = ap.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_cudagraphs import hand_captured

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as the sweeps
    from sweep_models import MODELS, cast

    if args.model.startswith("decode/"):
        from fxopt.models.decoder import build_step

        _, kind, preset, dtype = args.model.split("/")
        model = build_step(kind, preset, getattr(torch, dtype), "cuda")
        inputs = (torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda"))
    elif args.model in MODELS:
        torch.manual_seed(0)
        model, inputs = MODELS[args.model].build(args.batch, torch.device("cuda"))
        model, inputs = cast(model.eval(), inputs, getattr(torch, args.dtype))
    else:
        model, inputs = models.build_any(args.model, "cuda")
    systems = {"eager": lambda: model, "fxopt": lambda: fxopt.optimize(model, inputs),
               "compile": lambda: torch.compile(model),
               "hand_graph": lambda: hand_captured(model, inputs)[0],
               "fxopt_graphs": lambda: fxopt.optimize(model, inputs, cuda_graphs=True),
               "fxopt_enabled": lambda: fxopt.optimize(model, inputs, enable=[p for p in args.enable.split(",") if p]),
               "fxopt_graphs_enabled": lambda: fxopt.optimize(model, inputs, cuda_graphs=True,
                                                              enable=[p for p in args.enable.split(",") if p]),
               "fxopt_disabled": lambda: fxopt.optimize(model, inputs, disable=[p for p in args.disable.split(",") if p]),
               "fxopt_graphs_disabled": lambda: fxopt.optimize(model, inputs, cuda_graphs=True,
                                                               disable=[p for p in args.disable.split(",") if p])}
    names = args.systems.split(",")
    built = {name: systems[name]() for name in names}
    where = f"{args.model}, {torch.cuda.get_device_name()}, torch {torch.__version__}"
    if args.model in MODELS:
        where += f", batch {args.batch}, {args.dtype}"
    print_table(f"{where}: kernel launches x GPU µs per call",
                {name: profile(built[name], inputs, args.calls) for name in names}, names)
    if args.gemms:
        print_table(f"\n{where}: GEMM and attention ops by input shapes, calls x GPU µs per call",
                    {name: profile_gemms(built[name], inputs, args.calls) for name in names}, names)
    if args.by_op:
        print_table(f"\n{where}: kernel <- the op that launched it (< its callers), calls x GPU µs per call",
                    {name: profile_by_op(built[name], inputs, args.calls) for name in names}, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
