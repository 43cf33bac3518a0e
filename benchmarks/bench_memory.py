"""Peak memory of one forward: eager, fxopt, fxopt + CUDA graphs; the static estimates next to the measurements.

    python benchmarks/bench_memory.py [--models simple_cnn,resnet18] [--batches 1,32] [--budget-s 110] [--out DIR]
    python benchmarks/bench_memory.py --device cpu      # smoke mode: static and dispatch-traced columns only

Per model and batch size (zoo models and torchvision's resnet18, through ``fxopt.models.build_any``):

* **measured peak** (CUDA): ``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it
  (``fxopt.report.measure.forward_peak_bytes``), after warm-up calls (cuBLAS/cuDNN handles and the workspaces they
  keep are not part of a call): activations, the outputs, and per-call workspaces, in the allocator's 512-byte blocks;
* **fxopt + CUDA graphs**: the same for a replay (the activations live in the graph's private pool, allocated once
  at capture), and the memory the pool holds (``CUDAGraphRunner.pool_reserved_bytes``; per-signature growth in
  ``graph_entries``), the graph's live output buffers and static inputs;
* **static** (any device): ``fxopt.memory.estimate`` of the captured graph (what eager computes) and of fxopt's graph,
  exact bytes and in 512-byte blocks (comparable with the measured peak);
* **dispatch-traced** (any device): ``fxopt.memory.traced_peak_bytes``, the live bytes of the tensors ATen ops return
  during a real call (eager's Python code, or fxopt's module), which sees Python locals that outlive their last use;
* **weights**, counted apart: the model's parameters and buffers, and what fxopt's module holds besides: its eval copy
  of the model (the reference every pass is checked against) and the new tensors of its graph (BatchNorm folded into
  convolution weights, channels_last copies); the measured growth of allocated memory across ``fxopt.optimize``.

Writes ``bench_memory-DEVICE-STAMP.json`` and ``.md`` to ``--out`` (default ``$OUT``, else ``reports/``). Stops
starting new rows after ``--budget-s`` seconds (the rest are listed as skipped); about a minute on an H200.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback
import warnings

import torch
from tabulate import tabulate

import fxopt
from fxopt import memory, models
from fxopt.capture import annotate
from fxopt.passes import snapshot
from fxopt.report.measure import environment, forward_peak_bytes, free_memory

MIB = 2**20
WARMUP = 3


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    found = list(module.parameters()) + list(module.buffers())
    for m in module.modules():
        found += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return found


def _bytes(tensors, exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
    """Bytes of the distinct storages among ``tensors`` (by data pointer), leaving out ``exclude``."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values()), set(seen)


def _allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free_memory(device)
    return torch.cuda.memory_allocated(device)


def _warm(fn, inputs, device) -> None:
    with torch.no_grad():
        for _ in range(WARMUP):
            fn(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _static(opt, inputs) -> dict:
    spec = opt.specializations[-1]
    eager, fx_est = spec.activation_peaks
    captured = snapshot(opt._captured)
    annotate(captured, inputs)
    return {
        "eager_bytes": eager.peak_bytes, "eager_node": eager.peak_node,
        "fxopt_bytes": fx_est.peak_bytes, "fxopt_node": fx_est.peak_node,
        "fxopt_live_at_peak": fx_est.live_at_peak[:8],
        "eager_blocks_bytes": memory.estimate(captured, alignment=512).peak_bytes,
        "fxopt_blocks_bytes": memory.estimate(spec.graph_module, alignment=512).peak_bytes,
        "line": memory.compare_peaks(eager, fx_est),
    }


def bench(name: str, batch: int, device: torch.device) -> dict:
    r: dict = {"model": name, "batch": batch}
    model, inputs = models.build_any(name, device, batch_size=batch)
    model_ptrs = _bytes(_tensors(model))[1]
    r["weights_bytes"] = _bytes(_tensors(model))[0]
    _warm(model, inputs, device)
    r["eager_peak_bytes"] = forward_peak_bytes(model, inputs, device)
    r["eager_traced_bytes"] = memory.traced_peak_bytes(model, inputs)[0]

    before = _allocated(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rolled-back pass is reported in the record, not as a warning here
        opt = fxopt.optimize(model, inputs)
    after = _allocated(device)
    r["fxopt_resident_growth_bytes"] = None if before is None else after - before
    spec = opt.specializations[-1]
    reference_bytes, reference_ptrs = _bytes(_tensors(opt.original))
    extra, _ = _bytes(_tensors(spec.graph_module) + _tensors(spec.runner), exclude=reference_ptrs | model_ptrs)
    r["fxopt_reference_weights_bytes"] = reference_bytes  # fxopt's eval copy of the model
    r["fxopt_extra_weights_bytes"] = extra  # folded / re-laid-out copies the graph reads instead
    r["rolled_back"] = [rec.name for rec in opt.records if rec.status == "rolled back"]
    r["static"] = _static(opt, inputs)
    _warm(opt, inputs, device)
    r["fxopt_peak_bytes"] = forward_peak_bytes(opt, inputs, device)
    r["fxopt_traced_bytes"] = memory.traced_peak_bytes(spec.runner, inputs)[0]
    del opt, spec
    gc.collect()

    if device.type == "cuda":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = fxopt.optimize(model, inputs, cuda_graphs=True)
        static_inputs = sum(x.numel() * x.element_size() for x in inputs)
        _warm(g, inputs, device)  # the first call captures
        r["graphs_peak_bytes"] = forward_peak_bytes(g, inputs, device)
        entries = g.graph_entries
        r["graph_entries"] = [{k: getattr(e, k) for k in ("signature", "status", "reason", "num_nodes", "pool_bytes",
                                                            "output_bytes", "replays")} for e in entries]
        r["graph_captured"] = bool(entries) and all(e.captured for e in entries)
        r["graph_pool_reserved_bytes"] = g._graphs.pool_reserved_bytes() if g._graphs is not None else None
        r["graph_output_bytes"] = sum(e.output_bytes for e in entries)
        r["graph_static_input_bytes"] = static_inputs if r["graph_captured"] else 0
        del g
    free_memory(device)
    return r


def _mib(v) -> str:
    return "" if v is None else f"{v / MIB:.2f}"


def row(r: dict) -> list:
    if "error" in r or "skipped" in r:
        return [r["model"], r["batch"], *[""] * 11, r.get("error") or r.get("skipped")]
    s = r["static"]
    e, f = r.get("eager_peak_bytes"), r.get("fxopt_peak_bytes")
    ratio = f"{f / e:.2f}" if e and f is not None else ""
    note = []
    if s["fxopt_bytes"] > s["eager_bytes"]:
        note.append(f"static above eager at {s['fxopt_node']}")
    if r["rolled_back"]:
        note.append("rolled back: " + ", ".join(r["rolled_back"]))
    if r.get("graph_captured") is False:
        note.append("no CUDA graph: " + "; ".join(str(x["reason"]) for x in r["graph_entries"])[:60])
    return [r["model"], r["batch"], _mib(r["weights_bytes"]),
            _mib(r["fxopt_reference_weights_bytes"] + r["fxopt_extra_weights_bytes"]) +
            f" (+{_mib(r['fxopt_extra_weights_bytes'])})",
            f"{_mib(s['eager_bytes'])} / {_mib(s['fxopt_bytes'])}",
            f"{_mib(s['eager_blocks_bytes'])} / {_mib(s['fxopt_blocks_bytes'])}",
            f"{_mib(r['eager_traced_bytes'])} / {_mib(r['fxopt_traced_bytes'])}",
            _mib(e), _mib(f), ratio, _mib(r.get("graphs_peak_bytes")), _mib(r.get("graph_pool_reserved_bytes")),
            _mib(r.get("graph_output_bytes")), "; ".join(note)]


HEAD = ["model", "batch", "weights", "fxopt weights (+folded)", "static eager / fxopt", "static in blocks",
        "traced eager / fxopt", "eager peak", "fxopt peak", "fxopt / eager", "graphs peak per call", "graph pool",
        "graph outputs", "note"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(models.names() + ["resnet18"]))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=110.0, help="start no new row after this many seconds")
    parser.add_argument("--out", default=os.environ.get("OUT") or "reports")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.init()
    start = time.perf_counter()
    results = {"environment": environment(device), "settings": vars(args), "rows": []}
    for name in args.models.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                r = {"model": name, "batch": batch, "skipped": f"budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"}
            else:
                t0 = time.perf_counter()
                try:
                    r = bench(name, batch, device)
                except Exception as e:  # noqa: BLE001 -- one model's failure is a row, the others still run
                    r = {"model": name, "batch": batch, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                         "traceback": traceback.format_exc()}
                    print(r["traceback"], file=sys.stderr, flush=True)
                    free_memory(device)
                r["seconds"] = time.perf_counter() - t0
            results["rows"].append(r)
            print(f"{name} batch {batch}: {r.get('static', {}).get('line') or r.get('error') or r.get('skipped')} "
                  f"({r.get('seconds', 0):.1f} s)", flush=True)
    results["seconds"] = time.perf_counter() - start
    table = tabulate([row(r) for r in results["rows"]], HEAD, tablefmt="github", disable_numparse=True)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    base = os.path.join(args.out, f"bench_memory-{device.type}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    env = results["environment"]
    with open(base + ".md", "w") as f:
        f.write(f"# Peak memory of one forward (bench_memory.py)\n\n{env['date']} · {env['device_name']} · torch "
                f"{env['torch']} · fxopt {str(env.get('fxopt_commit'))[:10]} · {results['seconds']:.0f} s\n\n"
                "MiB. *static*: fxopt.memory.estimate of the captured graph (eager) / fxopt's graph, exact and in "
                "512-byte blocks; *traced*: live bytes of ATen results in a real call; *peak*: "
                "torch.cuda.max_memory_allocated minus allocated before the call; *graphs peak per call*: a replay "
                "(copy-out outputs); *graph pool*: memory the private pool holds; *fxopt weights*: its eval copy of "
                "the model plus (+) the graph's folded/re-laid-out tensors.\n\n" + table + "\n")
    print(table)
    print(f"wrote {base}.json and {base}.md ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
