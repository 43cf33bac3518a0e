"""GPU benchmark for the graph passes: kernels per forward and GPU busy time, eager / torch.compile / fxopt.

    python benchmarks/bench_passes.py [--models simple_cnn,resnet18,...] [--no-compile] [--out DIR]

For every zoo model and torchvision's resnet18, mobilenet_v3_small and efficientnet_b0 (random weights, batch 1,
float32): GPU kernels and launch calls per forward and GPU busy time (torch.profiler), median latency, fxopt's
per-pass record, and fxopt's max relative error against eager. Everything in one process, same inputs. Writes
DIR/bench_passes-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

import torch
from tabulate import tabulate

import fxopt
from fxopt import models
from fxopt.launches import count_launches
from fxopt.report.measure import environment, measure_latency
from fxopt.verify import max_relative_error

TORCHVISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")


build = models.build_any  # zoo names and torchvision models


def system_row(fn, inputs, device, dispatched: bool = True) -> dict:
    lc = count_launches(fn, inputs, cuda=device == "cuda", dispatched=dispatched)
    lat = measure_latency(fn, inputs, torch.device(device), warmup=10, iters=200)
    return {"launches": lc.as_dict(), "latency": lat}


def bench_model(name: str, device: str, with_compile: bool) -> dict:
    model, inputs = build(name, device)
    out: dict = {"model": name}
    with torch.no_grad():
        ref = model(*inputs)
    out["eager"] = system_row(model, inputs, device)
    t0 = time.perf_counter()
    try:
        opt = fxopt.optimize(model, inputs)
        out["fxopt_optimize_s"] = time.perf_counter() - t0
        with torch.no_grad():
            out["fxopt_max_rel_error"] = max_relative_error(opt(*inputs), ref)
        out["fxopt"] = system_row(opt, inputs, device)
        out["fxopt_passes"] = [r.as_dict() for r in opt.records]
        out["fxopt_kernels"] = {k: getattr(v, "op_names", None) for k, v in opt.kernels.items()}
        out["fxopt_code"] = opt.code
    except Exception as e:  # a model fxopt cannot handle is a result, not a crash
        out["fxopt_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    # Numerics in true float32 (NOTE [TF32] in fxopt/verify.py): the "relative error under 1e-4"
    if device == "cuda":
        flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.no_grad():
                ref32 = model(*inputs)
                out["fxopt_max_rel_error_fp32"] = max_relative_error(fxopt.optimize(model, inputs)(*inputs), ref32)
        except Exception as e:
            out["fxopt_fp32_error"] = f"{type(e).__name__}: {e}"
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    if with_compile:
        try:
            torch._dynamo.reset()
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(*inputs)
            torch.cuda.synchronize()
            out["compile_first_call_s"] = time.perf_counter() - t0
            # profile only: counting dispatched ops under a TorchDispatchMode makes Dynamo run the model eagerly
            out["torch.compile"] = system_row(compiled, inputs, device, dispatched=False)
        except Exception as e:
            out["compile_error"] = f"{type(e).__name__}: {e}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(models.names() + list(TORCHVISION)))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "reports"))
    args = parser.parse_args()
    results = {"environment": environment(torch.device(args.device)), "models": []}
    rows = []
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        try:
            r = bench_model(name, args.device, not args.no_compile)
        except Exception as e:
            r = {"model": name, "error": f"{type(e).__name__}: {e}"}
            print(r["error"], flush=True)
        results["models"].append(r)

        def k(system, key="cuda_kernels"):
            return r.get(system, {}).get("launches", {}).get(key)

        def lat(system):
            v = r.get(system, {}).get("latency", {}).get("median_us")
            return None if v is None else round(v, 1)

        busy = [k(s, "gpu_busy_us") for s in ("eager", "torch.compile", "fxopt")]
        rows.append([name, k("eager"), k("torch.compile"), k("fxopt"),
                     *[None if b is None else round(b, 1) for b in busy],
                     lat("eager"), lat("torch.compile"), lat("fxopt"),
                     f"{r['fxopt_max_rel_error']:.1e}" if "fxopt_max_rel_error" in r else r.get("fxopt_error", "")[:60],
                     f"{r['fxopt_max_rel_error_fp32']:.1e}" if "fxopt_max_rel_error_fp32" in r else ""])
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out, f"bench_passes-{stamp}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(tabulate(rows, ["model", "kernels eager", "compile", "fxopt", "busy µs eager", "compile", "fxopt",
                          "median µs eager", "compile", "fxopt", "rel err (tf32 default)",
                          "rel err (fp32)"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
