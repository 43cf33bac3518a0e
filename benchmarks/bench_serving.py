"""Serving throughput and latency: many concurrent clients sending batch-1 requests, with and without dynamic batching.

    python benchmarks/bench_serving.py [--models small_resnet,resnet18] [--clients 64] [--requests 200]
        [--max-batch-size 32] [--max-wait-ms 1.5] [--budget-s 480] [--out DIR]
    python benchmarks/bench_serving.py --device cpu --clients 8 --requests 5 --models small_resnet   # smoke test

Each client thread holds its request samples on the host (as a server does after decoding them) and sends them back
to back, one at a time, timing each call until it holds the result ON THE HOST (``.cpu()``: the GPU work is done).
Modes, per model (random weights, eval mode):

* ``eager_serial``, ``fxopt_serial``, ``fxopt_graphs_serial``: a global lock around the model, one request at a time
  (``model(x[None].to(device)).cpu()``): the naive server.
* ``fxopt_bs1``: the DynamicBatcher with ``max_batch_size=1``: its hand-off cost, without batching.
* ``eager_batched``, ``fxopt_batched``, ``fxopt_graphs_batched``: the DynamicBatcher (``max_batch_size``,
  ``max_wait_ms``), batch moved to the GPU once, outputs moved back once per batch.

fxopt without CUDA graphs is optimized for the batch sizes 1, 2, 4, ... max (one specialization each) and the batcher
pads batches to them; with CUDA graphs (``cuda_graphs=True``, ``graph_options={"batch_buckets": max}``) fxopt's graph
runner pads by itself. Building and warming each (every bucket size called once) is outside the timed part.

Throughput is requests / wall time of the timed phase; latency percentiles are over every request of every client.
Each mode stops early at ``--seconds-per-mode``; modes not started before ``--budget-s`` are listed as skipped. JSON to
``$OUT/bench_serving.json`` (or ``--out``), a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxopt  # noqa: E402
from fxopt import models  # noqa: E402
from fxopt.serve import DynamicBatcher, bucket_sizes, optimize_for_batch_sizes  # noqa: E402

MODES = ["eager_serial", "eager_batched", "fxopt_serial", "fxopt_bs1", "fxopt_batched", "fxopt_graphs_serial",
         "fxopt_graphs_batched"]


def build(name: str, device: str):
    """(model, per-sample input shape) for a zoo name or a torchvision model name."""
    if name in models.ZOO:
        entry = models.get(name)
        model, _ = entry.build(device=device)
        return model, entry.input_shape
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval().to(device)
    models._randomize_batchnorm(model, torch.Generator().manual_seed(0))
    return model, (3, 224, 224)


def percentiles_ms(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    s = sorted(samples)

    def at(q):
        return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s))) - 1))] * 1e3

    return {"p50": at(50), "p90": at(90), "p99": at(99), "mean": sum(s) / len(s) * 1e3}


def run_clients(call, samples: torch.Tensor, clients: int, requests: int, seconds: float) -> dict:
    """``clients`` threads, each calling ``call(x)`` on its own samples back to back; client-side latencies."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(c: int) -> None:
        lat = latencies[c]
        mine = samples[c % len(samples)]
        try:
            barrier.wait()
            for j in range(requests):
                t0 = time.perf_counter()
                if t0 > stop_at[0]:
                    break
                call(mine[j % len(mine)])
                lat.append(time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = [x for lat in latencies for x in lat]
    return {"requests": len(flat), "wall_s": wall, "throughput_rps": len(flat) / wall if wall > 0 else None,
            "latency_ms": percentiles_ms(flat), "errors": errors[:5], "complete": len(flat) == clients * requests}


def make_mode(mode: str, model, shape, device: str, args, cache: dict):
    """(call, batcher or None, notes) for a mode; cache keeps the optimized modules between modes."""
    dev = torch.device(device)
    sizes = bucket_sizes(args.max_batch_size)
    notes: dict = {}

    def example(b):
        return (torch.randn(b, *shape, device=dev),)

    def warm(module, batch_sizes):
        with torch.no_grad():
            for b in batch_sizes:
                for _ in range(2):
                    module(*example(b))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if mode.startswith("eager"):
        module = model
        warm(module, sizes if mode.endswith("batched") else [1])
    elif mode.startswith("fxopt_graphs"):
        if "graphs" not in cache:
            t0 = time.perf_counter()
            opt = fxopt.optimize(model, example(1), cuda_graphs=True,
                                 graph_options={"batch_buckets": args.max_batch_size})
            warm(opt, sizes)
            cache["graphs"] = opt
            cache["graphs_build_s"] = time.perf_counter() - t0
            if getattr(opt, "graph_note", None):
                notes["graph_note"] = opt.graph_note
            try:
                notes["graph_report"] = opt.graph_report()
            except Exception as e:  # noqa: BLE001
                notes["graph_report"] = f"unavailable: {e}"
        module = cache["graphs"]
        notes["build_s"] = cache["graphs_build_s"]
    else:
        if "opt" not in cache:
            t0 = time.perf_counter()
            opt = optimize_for_batch_sizes(model, example(1), sizes)
            warm(opt, sizes)
            cache["opt"] = opt
            cache["opt_build_s"] = time.perf_counter() - t0
        module = cache["opt"]
        notes["build_s"] = cache["opt_build_s"]

    if mode.endswith("serial"):
        lock = threading.Lock()

        def call(x):
            with lock, torch.no_grad():
                return module(x[None].to(dev, non_blocking=True)).cpu()

        return call, None, notes

    # fxopt holds specializations for the bucket sizes only (another size would be optimized and compiled on the
    # spot), so the batcher pads to them; with CUDA graphs the graph runner would pad by itself, padding here too
    # keeps a signature whose capture failed on a warmed specialization. Eager runs any size as it is.
    pad = None if mode.startswith("eager") else sizes
    bs = 1 if mode == "fxopt_bs1" else args.max_batch_size
    batcher = DynamicBatcher(module, max_batch_size=bs, max_wait_ms=0 if bs == 1 else args.max_wait_ms,
                             max_queue=max(1024, 4 * args.clients), device=dev, output_device="cpu",
                             pad_to_buckets=pad if bs > 1 else None, name=mode)
    return batcher, batcher, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small_resnet,resnet18")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=200, help="requests per client")
    ap.add_argument("--warmup-requests", type=int, default=5, help="per client, untimed, before each mode")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=1.5)
    ap.add_argument("--seconds-per-mode", type=float, default=20.0)
    ap.add_argument("--budget-s", type=float, default=480.0, help="no new mode starts after this (from the start)")
    ap.add_argument("--out", default=os.environ.get("OUT", "reports"))
    args = ap.parse_args()

    from fxopt.report.measure import environment

    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for a smoke test")
    torch.backends.cudnn.benchmark = False
    report = {"benchmark": "bench_serving", "environment": environment(torch.device(args.device)),
              "config": vars(args), "results": []}
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        try:
            model, shape = build(name, args.device)
        except Exception as e:  # noqa: BLE001
            report["results"].append({"model": name, "error": f"build failed: {type(e).__name__}: {e}"})
            print(f"{name}: build failed: {e}", flush=True)
            continue
        gen = torch.Generator().manual_seed(1)
        per_client = min(args.requests, 16)  # distinct samples per client, reused round robin
        samples = torch.randn(args.clients, per_client, *shape, generator=gen)
        cache: dict = {}
        for mode in [m for m in args.modes.split(",") if m]:
            entry = {"model": name, "mode": mode}
            report["results"].append(entry)
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                entry["skipped"] = f"time budget of {args.budget_s:g} s spent ({elapsed:.0f} s)"
                print(f"{name:14s} {mode:22s} skipped: budget", flush=True)
                continue
            batcher = None
            try:
                call, batcher, notes = make_mode(mode, model, shape, args.device, args, cache)
                entry.update(notes)
                if args.warmup_requests:
                    run_clients(call, samples, args.clients, args.warmup_requests, args.seconds_per_mode)
                if batcher is not None:
                    batcher.reset_metrics()
                result = run_clients(call, samples, args.clients, args.requests, args.seconds_per_mode)
                entry.update(result)
                if batcher is not None:
                    m = batcher.metrics()
                    entry["batcher"] = {k: m[k] for k in ("batch_size_histogram", "mean_batch_size", "batches",
                                                          "padded_rows", "max_queue_depth", "latency_ms",
                                                          "queue_wait_ms", "batch_ms", "failed")}
            except Exception as e:  # noqa: BLE001 - e.g. cuda_graphs not available yet: report and go on
                entry["error"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc(limit=6)
                print(f"{name:14s} {mode:22s} error: {entry['error']}", flush=True)
                continue
            finally:
                if batcher is not None:
                    batcher.close()
            lat = entry["latency_ms"]
            mean_bs = entry.get("batcher", {}).get("mean_batch_size")
            rows.append((name, mode, entry["requests"], f"{entry['throughput_rps']:.0f}", f"{lat['p50']:.2f}",
                         f"{lat['p99']:.2f}", "" if mean_bs is None else f"{mean_bs:.1f}"))
            print(f"{name:14s} {mode:22s} {entry['throughput_rps']:9.0f} req/s  p50 {lat['p50']:8.2f} ms  "
                  f"p99 {lat['p99']:8.2f} ms  mean batch {mean_bs}{'' if entry['complete'] else '  (time cap)'}"
                  f"{'  errors: ' + str(entry['errors']) if entry['errors'] else ''}", flush=True)
        for key in ("eager_serial",):  # speed-ups against the naive server
            base = next((r for r in report["results"] if r.get("model") == name and r.get("mode") == key
                         and r.get("throughput_rps")), None)
            if base is not None:
                for r in report["results"]:
                    if r.get("model") == name and r.get("throughput_rps"):
                        r["throughput_vs_eager_serial"] = r["throughput_rps"] / base["throughput_rps"]
        del cache, model
        if args.device == "cuda":
            torch.cuda.empty_cache()

    report["total_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_serving.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    try:
        from tabulate import tabulate

        print(tabulate(rows, ["model", "mode", "requests", "req/s", "p50 ms", "p99 ms", "mean batch"]))
    except ImportError:
        pass
    print(f"wrote {path} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
