"""Every torchvision classification model through fxopt: numerics, kernels and latency (GPU machine).

    python benchmarks/sweep_torchvision.py [--models a,b] [--budget-s 500] [--out DIR] [--no-graphs] [--resume JSON]

Random weights, batch 1, float32. For each model: fxopt's max relative error against eager (must be < 1e-4),
whether any pass rolled back, GPU kernels per forward (eager / fxopt), median latency eager / fxopt / fxopt with
CUDA graphs, the three timed together in interleaved rounds (NOTE [Interleaved timing] in fxopt/report/measure.py:
latency = median of the per-round medians; speedups = median of the per-round ratios, with their interquartile
range). A model that fails is a row with its error. Writes DIR/sweep_torchvision.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
from tabulate import tabulate

import fxopt
from fxopt.launches import count_launches
from fxopt.models import _randomize_batchnorm
from fxopt.report.measure import environment, measure_interleaved, round_ratios
from fxopt.verify import max_relative_error

# Inputs larger than 224 where the architecture needs them.
_SIZES = {"inception_v3": 299}


def classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def run_one(name: str, device: torch.device, graphs: bool) -> dict:
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    with torch.device(device):  # parameters created and initialized on the GPU: seconds less for the 600M-parameter models
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    _randomize_batchnorm(model, torch.Generator().manual_seed(0))
    size = _SIZES.get(name, 224)
    x = torch.randn(1, 3, size, size, device=device)
    row: dict = {"model": name}
    with torch.no_grad():
        ref = model(x)
    t0 = time.perf_counter()
    opt = fxopt.optimize(model, [x])
    row["optimize_s"] = time.perf_counter() - t0
    row["capture"] = opt.capture_info.method if opt.capture_info else None
    row["unoptimized"] = opt.unoptimized_reason
    with torch.no_grad():
        row["max_rel_error"] = max_relative_error(opt(x), ref)
    if opt.unoptimized_reason is None:
        row["rolled_back"] = [f"{r.name}: {r.error}" for r in opt.records if r.status == "rolled back"]
        row["notes"] = [n for r in opt.records for n in r.notes][:20]
    row["kernels_eager"] = count_launches(model, [x]).cuda_kernels
    row["kernels_fxopt"] = count_launches(opt, [x]).cuda_kernels
    systems = {"eager": model, "fxopt": opt}
    if graphs:
        try:
            g = fxopt.optimize(model, [x], cuda_graphs=True)
            with torch.no_grad():
                row["graphs_max_rel_error"] = max_relative_error(g(x), ref)
            systems["graphs"] = g
        except Exception as e:  # reported per model
            row["graphs_error"] = f"{type(e).__name__}: {e}"
    row.update(time_interleaved(systems, [x], device))
    return row


def time_interleaved(systems: dict, inputs: list, device: torch.device, *, warmup: int = 5, iters: int = 50,
                     rounds: int = 5) -> dict:
    """The row's latency columns: ``systems`` (eager first) timed together in ``rounds`` interleaved rounds;
    latency_<name>_us is the median of the per-round medians, <name>_x_eager the median of the per-round speedups
    over eager with its interquartile range (<name>_x_eager_iqr). A system that raises gets <name>_latency_error."""
    failures: dict = {}
    stats = measure_interleaved(systems, inputs, device, warmup=warmup, iters=iters, rounds=rounds, failures=failures)
    out: dict = {"timing": f"interleaved, {rounds} rounds"}
    for name, e in failures.items():
        out[f"{name}_latency_error"] = f"{type(e).__name__}: {e}"
    for name, st in stats.items():
        out[f"latency_{name}_us"] = st["median_us"]
        out[f"latency_{name}_rel_iqr"] = st["spread"]["rel_iqr"]
        if name != "eager" and "eager" in stats:
            sp = round_ratios(stats["eager"], st)
            if sp is not None:
                out[f"{name}_x_eager"] = sp["median"]
                out[f"{name}_x_eager_iqr"] = [sp["q1"], sp["q3"]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=None)
    parser.add_argument("--budget-s", type=float, default=500)
    parser.add_argument("--out", default=os.environ.get("OUT", "reports"))
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resume", default=None,
                        help="a previous sweep_torchvision.json: its rows are kept and its models not run again")
    args = parser.parse_args()
    device = torch.device(args.device)
    # true float32 everywhere (NOTE [TF32] in fxopt/verify.py): the criterion is relative error under 1e-4
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    names = args.models.split(",") if args.models else classification_models()
    start = time.perf_counter()
    rows, skipped = [], []
    if args.resume:
        with open(args.resume) as f:
            rows = [r for r in json.load(f)["rows"] if r["model"] in names]
        done = {r["model"] for r in rows}
        names = [n for n in names if n not in done]
    for i, name in enumerate(names):
        if time.perf_counter() - start > args.budget_s:
            skipped = names[i:]
            break
        print(f"[{time.perf_counter() - start:6.0f}s] {name}", flush=True)
        try:
            rows.append(run_one(name, device, graphs=not args.no_graphs))
        except Exception as e:  # one model's failure is a row, not the end of the sweep
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        torch.cuda.empty_cache() if device.type == "cuda" else None
    os.makedirs(args.out, exist_ok=True)
    result = {"environment": environment(device), "rows": rows, "skipped_for_time": skipped}
    with open(os.path.join(args.out, "sweep_torchvision.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)

    def fmt(v, spec=".1f"):
        return "" if v is None else format(v, spec)

    table = [[r["model"], fmt(r.get("max_rel_error"), ".1e"), "ok" if r.get("max_rel_error", 1) < 1e-4 else "FAIL",
              len(r.get("rolled_back", [])), r.get("kernels_eager"), r.get("kernels_fxopt"),
              fmt(r.get("latency_eager_us")), fmt(r.get("latency_fxopt_us")), fmt(r.get("latency_graphs_us")),
              fmt(r.get("fxopt_x_eager"), ".2f"), fmt(r.get("graphs_x_eager"), ".2f"),
              (r.get("error") or r.get("unoptimized") or r.get("graphs_error") or "")[:70]] for r in rows]
    head = ["model", "rel err", "<1e-4", "rollbacks", "kernels eager", "fxopt", "µs eager", "fxopt", "fxopt+graphs",
            "fxopt x eager", "graphs x eager", "error"]
    text = tabulate(table, head, tablefmt="github")
    env = result["environment"]
    with open(os.path.join(args.out, "sweep_torchvision.md"), "w") as f:
        f.write(f"# torchvision classification sweep\n\n{env['date']} · {env['device_name']} · torch {env['torch']}"
                f" · fxopt {env.get('git_describe')} · batch 1, float32 (TF32 off), random weights; latency and "
                f"speedups from 5 interleaved rounds (medians over the rounds)\n\n{text}\n")
        if skipped:
            f.write(f"\nNot run (time budget): {', '.join(skipped)}\n")
    print(text)
    ok = sum(1 for r in rows if r.get("max_rel_error", 1) < 1e-4)
    print(f"{ok}/{len(rows)} models within 1e-4; skipped for time: {len(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
