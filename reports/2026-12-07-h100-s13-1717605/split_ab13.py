"""Session 13: as session 11/12 with TF32 off as the sweep has it (cudnn too) and --ro: torch.compile reduce-overhead in the same rounds.
Session 11 A/B: opt-in passes (--enable=split_k_linears,gemm_weight_layouts; default split_k_linears) on and
off, both with CUDA graphs, in one process, interleaved in rounds: GPU busy µs of one forward (torch.profiler),
latency (CUDA events around 50 replays), error against eager, and what each pass did (its notes)."""
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import fxopt
from benchmarks.sweep_models import MODELS


def busy_us(fn, args, calls=10):
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(calls):
            fn(*args)
        torch.cuda.synchronize()
    return sum(e.time_range.end - e.time_range.start for e in p.events()
               if e.device_type == torch.autograd.DeviceType.CUDA) / calls


def latency_us(fn, args, calls=50):
    with torch.no_grad():
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(calls):
            fn(*args)
        e.record()
        e.synchronize()
    return s.elapsed_time(e) * 1000 / calls


SETS = [["split_k_linears"]]
for a in list(sys.argv):
    if a.startswith("--enable="):  # several: one set each (--enable=a,b --enable=c)
        SETS = [] if SETS == [["split_k_linears"]] else SETS
        SETS.append(a.split("=", 1)[1].split(","))
        sys.argv.remove(a)
RO = "--ro" in sys.argv
if RO:
    sys.argv.remove("--ro")
NOTES = 40
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as the sweep
DRY = "--dry" in sys.argv  # on the CPU: the flow only
if DRY:
    sys.argv.remove("--dry")
    busy_us = latency_us = lambda fn, args: 0.0  # noqa: E731
else:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
for name in sys.argv[1:]:
    torch.manual_seed(0)
    model, args = MODELS[name].build(1, torch.device("cpu" if DRY else "cuda"))
    opts = {"off": fxopt.optimize(model, args, cuda_graphs=True)}
    for en in SETS:
        opts["+".join(en)] = fxopt.optimize(model, args, cuda_graphs=True, enable=en)
    if RO:
        opts["r-o"] = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        ref = model(*args)
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
        errs = {}
        for tag, opt in opts.items():
            out = opt(*args)
            out = out if isinstance(out, torch.Tensor) else out[0]
            errs[tag] = ((out - ref).abs().max() / ref.abs().max()).item()
            for _ in range(20):
                opt(*args)
    for tag, opt in opts.items():
        if tag in ("off", "r-o"):
            continue
        recs = [r for r in opt.records if r.name in tag.split("+")]
        print(name, tag, [(r.name, r.status, r.changes) for r in recs], flush=True)
        for n in sorted({n.split(" ", 2)[2] for r in recs for n in r.notes})[:NOTES]:
            print("   ", n[:200])
    b = {t: [] for t in opts}
    lat = {t: [] for t in opts}
    tags = list(opts)
    for r in range(7):
        for tag in (tags if r % 2 == 0 else tags[::-1]):
            b[tag].append(busy_us(opts[tag], args))
            lat[tag].append(latency_us(opts[tag], args))
    if RO:
        print(f"   {name} fxopt+g / r-o latency: " + ", ".join(
            f"{t} {statistics.median(lat[t]) / statistics.median(lat['r-o']):.2f}" for t in tags if t != "r-o"), flush=True)
    for tag in tags:
        print(f"   {name} {tag:45s} busy µs {statistics.median(b[tag]):8.1f}  latency µs {statistics.median(lat[tag]):8.1f} "
              f"(min {min(lat[tag]):.1f})  err {errs[tag]:.1e}", flush=True)
