"""Which passes pay at batch 1, with and without CUDA graphs: latency with one pass disabled at a time (GPU machine).

    python benchmarks/bench_ablation.py [--models simple_cnn,resnet18] [--disable fuse_epilogues,to_channels_last]

A pass can cut GPU time and still cost host time (cuDNN's fused convolution builds its execution plan key on every
call); without CUDA graphs the host time is the latency at batch 1, with graphs only the GPU time counts. This
measures both, in one process, so the pipeline's choices rest on numbers. Also prints the host time per ATen op of
fxopt's graph without CUDA graphs (profiler, CPU self time), to show where the time goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
from tabulate import tabulate

import fxopt
from fxopt import models
from fxopt.report.measure import environment, measure_latency

DEFAULT_MODELS = "simple_cnn,mlp_block,transformer_encoder,small_resnet,resnet18"
DEFAULT_DISABLE = "fuse_epilogues,to_channels_last,fold_batchnorm,fuse_elementwise"


def host_profile(fn, inputs, top: int = 12) -> list[tuple[str, float, int]]:
    """(op, CPU self µs per call, calls per call) of the ``top`` ops by host time."""
    from torch.profiler import ProfilerActivity, profile

    calls = 20
    with torch.no_grad():
        for _ in range(5):
            fn(*inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn(*inputs)
            torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / calls, e.count // calls) for e in rows]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--disable", default=DEFAULT_DISABLE)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=os.environ.get("OUT", "reports"))
    args = ap.parse_args()
    device = torch.device("cuda")
    variants = [("all passes", [])] + [(f"without {p}", [p]) for p in args.disable.split(",") if p]
    result: dict = {"environment": environment(device), "models": {}}
    table = []
    for name in args.models.split(","):
        model, inputs = models.build_any(name, "cuda")
        eager = measure_latency(model, inputs, device, warmup=20, iters=args.iters)["median_us"]
        rows: dict = {"eager_us": eager, "variants": {}}
        for label, disabled in variants:
            opt = fxopt.optimize(model, inputs, disable=disabled)
            g = fxopt.optimize(model, inputs, disable=disabled, cuda_graphs=True)
            v = {"no_graphs_us": measure_latency(opt, inputs, device, warmup=20, iters=args.iters)["median_us"],
                 "graphs_us": measure_latency(g, inputs, device, warmup=20, iters=args.iters)["median_us"],
                 "rolled_back": [r.name for r in opt.records if r.status == "rolled back"]}
            if not disabled:
                v["host_profile"] = host_profile(opt, inputs)
            rows["variants"][label] = v
            table.append([name, label, round(eager, 1), round(v["no_graphs_us"], 1),
                          round(v["no_graphs_us"] / eager, 2), round(v["graphs_us"], 1), ",".join(v["rolled_back"])])
            print(table[-1], flush=True)
        result["models"][name] = rows
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out, f"bench_ablation-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    text = tabulate(table, ["model", "variant", "eager µs", "fxopt µs", "fxopt/eager", "fxopt+graphs µs",
                            "rolled back"], tablefmt="github")
    with open(path.replace(".json", ".md"), "w") as f:
        env = result["environment"]
        f.write(f"{env.get('date')} · {env.get('device_name')} · torch {env.get('torch')} · batch 1\n\n{text}\n")
    print(text)
    for name, rows in result["models"].items():
        print(f"\n{name}: host µs per call by op (fxopt, all passes, no graphs)")
        for op, us, n in rows["variants"]["all passes"]["host_profile"]:
            print(f"  {us:8.1f}  x{n:<3d} {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
