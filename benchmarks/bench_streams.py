"""Multi-stream branches (the opt-in pass parallel_branches) on models with parallel branches (GPU machine).

    python benchmarks/bench_streams.py [--models googlenet,inception_v3] [--batches 1,8] [--budget-s 240]
                                       [--out DIR] [--device cuda|cpu] [--tf32]

For torchvision's googlenet and inception_v3 (299x299; ``aux_logits=False, init_weights=True``, random weights,
BatchNorm statistics randomized), batch 1 and 8, float32 (TF32 off, as in sweep_torchvision.py; ``--tf32`` keeps
PyTorch's defaults, cuDNN TF32 on): median latency of eager, fxopt (default pipeline) and
fxopt + parallel_branches, each without and with CUDA graphs (eager's graph: fxopt's CUDAGraphRunner around the
eager model), all in one process; the max relative error of each against eager; what the pass did (regions, side
branches, notes). Latency is the median of ``--rounds`` rounds, each the median of ``--iters`` synchronized calls, the
systems interleaved round by round (drift hits all of them alike). Writes DIR/bench_streams.json and .md
(DIR: ``--out``, else $OUT, else reports/). Stops starting new measurements after ``--budget-s`` seconds.

``--device cpu`` is a smoke test (tiny iteration counts; no graphs; the pass is a no-op with a note there). Without
torchvision, a small inception-like model defined here stands in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

import fxopt
from fxopt.models import _randomize_batchnorm
from fxopt.report.measure import environment, measure_latency
from fxopt.verify import max_relative_error

SIZES = {"inception_v3": 299}
SYSTEMS = [  # (key, label, fxopt options or None for eager, CUDA graphs)
    ("eager", "eager", None, False),
    ("eager_graphs", "eager + graphs", None, True),
    ("fxopt", "fxopt", {}, False),
    ("fxopt_graphs", "fxopt + graphs", {}, True),
    ("streams", "fxopt + streams", {"enable": ["parallel_branches"]}, False),
    ("streams_graphs", "fxopt + streams + graphs", {"enable": ["parallel_branches"]}, True),
]


class _Block(nn.Module):
    """googlenet's inception block with BasicConv2d (conv, BatchNorm, ReLU) branches."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()

        def conv(i, o, k):
            return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.b1 = conv(cin, c1, 1)
        self.b2 = nn.Sequential(conv(cin, c3r, 1), conv(c3r, c3, 3))
        self.b3 = nn.Sequential(conv(cin, c5r, 1), conv(c5r, c5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class TinyInception(nn.Module):
    """The stand-in when torchvision is missing: a stem and three inception blocks (googlenet's 3a, 3b, 4a widths)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                                  nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.blocks = nn.Sequential(_Block(192, 64, 96, 128, 16, 32, 32), _Block(256, 128, 128, 192, 32, 96, 64),
                                    nn.MaxPool2d(3, 2, 1), _Block(480, 192, 96, 208, 16, 48, 64))
        self.fc = nn.Linear(512, 1000)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def build(name: str, device: torch.device, batch: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "tiny_inception":
        model = TinyInception()
    else:
        import torchvision

        with torch.device(device):
            model = torchvision.models.get_model(name, weights=None, aux_logits=False, init_weights=True)
    model = model.to(device).eval()
    _randomize_batchnorm(model, torch.Generator().manual_seed(0))
    size = SIZES.get(name, 224) if name != "tiny_inception" else 112
    return model, torch.randn(batch, 3, size, size, device=device)


def make_system(key: str, options: dict | None, graphs: bool, model: nn.Module, x: torch.Tensor) -> tuple:
    """(callable, facts about it) for one system."""
    facts: dict = {}
    if options is None:
        if not graphs:
            return model, facts
        from fxopt.runtime.cudagraph import CUDAGraphRunner

        return CUDAGraphRunner(model), facts
    t0 = time.perf_counter()
    opt = fxopt.optimize(model, [x], cuda_graphs=graphs, **options)
    facts["optimize_s"] = round(time.perf_counter() - t0, 2)
    if opt.unoptimized_reason is not None:
        facts["unoptimized"] = opt.unoptimized_reason
        return opt, facts
    facts["rolled_back"] = [f"{r.name}: {r.error}" for r in opt.records if r.status == "rolled back"]
    rec = {r.name: r for r in opt.records}.get("parallel_branches")
    if rec is not None:
        facts["parallel_branches"] = {"status": rec.status, "changes": rec.changes, "notes": rec.notes[:5],
                                      "error": rec.error}
    if graphs:
        facts["graph_note"] = opt.graph_note
    return opt, facts


def run_case(name: str, batch: int, device: torch.device, args, deadline: float) -> dict:
    model, x = build(name, device, batch)
    case: dict = {"model": name, "batch": batch, "systems": {}}
    with torch.no_grad():
        ref = model(x)
    runnable = {}
    for key, label, options, graphs in SYSTEMS:
        row = case["systems"].setdefault(key, {"label": label, "graphs": graphs})
        if graphs and device.type != "cuda":
            row["skipped"] = "CUDA graphs need a GPU"
            continue
        if time.perf_counter() > deadline:
            row["skipped"] = "time budget"
            continue
        try:
            fn, facts = make_system(key, options, graphs, model, x)
            row.update(facts)
            with torch.no_grad():
                for _ in range(2):  # the first call of a graph system captures
                    out = fn(x)
                row["max_rel_error"] = max_relative_error(out, ref)
            if graphs and hasattr(fn, "graph_entries"):
                row["graph_captured"] = all(e.captured for e in fn.graph_entries) and bool(fn.graph_entries)
            runnable[key] = fn
        except Exception as e:  # noqa: BLE001 -- one system's failure is a row, not the end of the run
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
    medians: dict[str, list[float]] = {k: [] for k in runnable}
    for r in range(args.rounds):
        if time.perf_counter() > deadline and r > 0:
            case["rounds_cut"] = f"{r} of {args.rounds} rounds (time budget)"
            break
        for key, fn in runnable.items():
            lat = measure_latency(fn, [x], device, warmup=args.warmup, iters=args.iters)
            medians[key].append(lat["median_us"])
            case["systems"][key].setdefault("p99_us", []).append(lat["p99_us"])
    for key, values in medians.items():
        if values:
            case["systems"][key]["median_us"] = statistics.median(values)
            case["systems"][key]["round_medians_us"] = values
    del runnable, model
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return case


def _fmt(v, spec=".0f"):
    return "" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    env = result["environment"]
    head = ["model", "batch"] + [label for _, label, _, _ in SYSTEMS] + ["streams gain", "streams gain (graphs)"]
    rows, errs = [], []
    def med(case, key):
        return case["systems"].get(key, {}).get("median_us")

    def gain(case, base, new):
        return f"{med(case, base) / med(case, new):.2f}x" if med(case, base) and med(case, new) else ""

    for case in result["cases"]:
        s = case["systems"]
        rows.append([case["model"], case["batch"]] + [_fmt(med(case, k)) for k, *_ in SYSTEMS]
                    + [gain(case, "fxopt", "streams"), gain(case, "fxopt_graphs", "streams_graphs")])
        errs.append([case["model"], case["batch"]] + [_fmt(s.get(k, {}).get("max_rel_error"), ".1e")
                                                      for k, *_ in SYSTEMS])
    text = ["# Multi-stream branches (parallel_branches)\n",
            (f"{env['date']} · {env['device_name']} · torch {env['torch']} · float32 (cuDNN TF32 "
             f"{'on' if result['tf32']['cudnn'] else 'off'}) · median µs of {result['args']['rounds']} rounds of "
             f"{result['args']['iters']} synchronized calls\n"),
            tabulate(rows, head, tablefmt="github"),
            "\n\nstreams gain: fxopt / fxopt + streams (> 1: the streams win), without and with CUDA graphs.\n",
            "\n## Max relative error against eager\n",
            tabulate(errs, ["model", "batch"] + [label for _, label, _, _ in SYSTEMS], tablefmt="github"), "\n"]
    notes = []
    for case in result["cases"]:
        for key, row in case["systems"].items():
            pb = row.get("parallel_branches")
            if pb and key == "streams":
                notes.append(f"- {case['model']} batch {case['batch']}: parallel_branches {pb['status']} "
                             f"{pb['changes']}{'; ' + pb['error'] if pb.get('error') else ''}")
            for what in ("error", "skipped", "unoptimized"):
                if row.get(what):
                    notes.append(f"- {case['model']} batch {case['batch']} {row['label']}: {what}: "
                                 f"{str(row[what]).splitlines()[0][:200]}")
            if row.get("rolled_back"):
                notes.append(f"- {case['model']} batch {case['batch']} {row['label']}: rolled back: "
                             f"{'; '.join(row['rolled_back'])[:300]}")
            if row.get("graph_captured") is False:
                notes.append(f"- {case['model']} batch {case['batch']} {row['label']}: not captured as a graph")
    if result.get("skipped_cases"):
        notes.append(f"- not run (time budget): {', '.join(result['skipped_cases'])}")
    if notes:
        text += ["\n## Notes\n\n", "\n".join(notes), "\n"]
    return "".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="googlenet,inception_v3")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--iters", type=int, default=None, help="calls per round (default 100 on CUDA, 3 on CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--tf32", action="store_true", help="keep PyTorch's TF32 defaults (cuDNN on); default: off")
    parser.add_argument("--out", default=os.environ.get("OUT") or "reports")
    args = parser.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    args.iters = args.iters or (3 if cpu else 100)
    args.rounds = args.rounds or (1 if cpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 10)
    if not args.tf32:  # true float32 (NOTE [TF32] in fxopt/verify.py), as the torchvision sweep measures
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    start = time.perf_counter()
    deadline = start + args.budget_s
    names = args.models.split(",")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("torchvision is not installed: the stand-in tiny_inception model runs instead", flush=True)
        names = ["tiny_inception"]
    cases, skipped = [], []
    for name in names:
        for batch in [int(b) for b in args.batches.split(",")]:
            if time.perf_counter() > deadline:
                skipped.append(f"{name} batch {batch}")
                continue
            print(f"[{time.perf_counter() - start:5.0f}s] {name} batch {batch}", flush=True)
            try:
                cases.append(run_case(name, batch, device, args, deadline))
            except Exception as e:  # noqa: BLE001 -- a model that cannot be built is a row with its error
                cases.append({"model": name, "batch": batch, "systems": {},
                              "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    result = {"environment": environment(device), "args": vars(args), "seconds": time.perf_counter() - start,
              "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
              "cases": cases, "skipped_cases": skipped}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_streams.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    text = markdown(result)
    with open(os.path.join(args.out, "bench_streams.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"done in {result['seconds']:.0f}s; wrote {args.out}/bench_streams.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
