"""CUDA graphs at batch 1: fxopt with graphs against torch.compile(reduce-overhead) and the eager model captured in
one CUDA graph by hand, with the overhead above the GPU's own busy time broken down.

    python benchmarks/bench_cudagraphs.py [--models simple_cnn,resnet18] [--iters 300] [--rounds 10] [--no-compile]
                                          [--sequential] [--out DIR]

Per model (same inputs, synchronized calls after warm-up): every system is built first, torch.compile's included,
then all are timed together in rounds, one block each per round in rotated order (NOTE [Interleaved timing] in
fxopt/report/measure.py; latency = median of the per-round medians, with their spread); ``--sequential`` times one
system after the other, reduce-overhead last, as every run before 2026-12-06 did. torch.compile's CUDA-graph skips
(count and reasons, NOTE [CUDA-graph skip reasons] in fxopt/report/compiled.py) go into the JSON:
  latency of eager, torch.compile(mode="reduce-overhead"), hand-captured eager graph, fxopt without graphs, fxopt with
  graphs; GPU busy time (sum of kernel time, profiler) of fxopt's graph replay; the overhead = latency - busy, split
  into input copy (host time of the static-buffer copy), replay launch (host time of graph.replay()), gaps between
  kernels (graph span on the GPU minus busy), synchronization (host time of a synchronize on an idle stream); memory
  held by fxopt's graph pool against eager's peak; the floor: a graph of as many one-element kernels as fxopt's,
  replayed and measured with the others ("floor overhead": its latency minus its kernels' busy time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
from tabulate import tabulate

import fxopt
from fxopt import models
from fxopt.report.compiled import dynamo_reset, dynamo_stats, record_cudagraph_skips
from fxopt.report.measure import environment, measure_interleaved, measure_latency, round_ratios


build = models.build_any  # zoo names and torchvision models


def hand_captured(model, inputs):
    """The eager model in one CUDA graph, by hand: static inputs, warm-up on a side stream, capture, replay."""
    static = [x.clone() for x in inputs]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            model(*static)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(*static)

    def run(*args):
        for dst, src in zip(static, args):
            dst.copy_(src)
        graph.replay()
        return out

    return run, graph, static


def host_us(fn, n=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def kernel_profile(fn, inputs) -> dict:
    """GPU busy (union of kernel intervals) and span (first kernel start to last kernel end) of one call."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn(*inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(*inputs)
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
                   and "memset" not in e.name.lower())
    if not spans:
        return {"kernels": 0, "busy_us": 0.0, "span_us": 0.0}
    from fxopt.launches import _union_length

    return {"kernels": len(spans), "busy_us": _union_length(spans), "span_us": spans[-1][1] - spans[0][0]}


def build_reduce_overhead(model, inputs, r: dict):
    """torch.compile(mode="reduce-overhead") of ``model``, compiled and its CUDA graphs recorded by three calls; the
    skips Inductor reported (NOTE [CUDA-graph skip reasons]) and Dynamo's counts go into ``r``."""
    dynamo_reset()
    compiled = torch.compile(model, mode="reduce-overhead")
    t0 = time.perf_counter()
    with record_cudagraph_skips() as skips, torch.no_grad():
        for _ in range(3):
            compiled(*inputs)
        torch.cuda.synchronize()
    r["compile_reduce_overhead_first_calls_s"] = time.perf_counter() - t0
    r["compile_reduce_overhead_cudagraphs"] = skips.as_dict()
    r["compile_reduce_overhead_dynamo"] = dynamo_stats()
    return compiled


def bench(name: str, iters: int, with_compile: bool, sequential: bool = False, rounds: int = 10) -> dict:
    device = torch.device("cuda")
    model, inputs = build(name, "cuda")
    r: dict = {"model": name}
    systems: dict = {}  # every latency below is measured interleaved with the others (measure_interleaved)
    compiled = None

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(*inputs)
    r["eager_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    systems["eager"] = model
    manual, _, static = hand_captured(model, inputs)
    systems["hand_graph"] = manual
    r["hand_graph_profile"] = kernel_profile(manual, inputs)
    opt = fxopt.optimize(model, inputs)
    systems["fxopt"] = opt
    before = torch.cuda.memory_reserved()
    g = fxopt.optimize(model, inputs, cuda_graphs=True)
    with torch.no_grad():
        g(*inputs)
        g(*inputs)
        r["fxopt_graphs_rel_err"] = fxopt.verify.max_relative_error(g(*inputs), model(*inputs))
    systems["fxopt_graphs"] = g
    r["reserved_growth_bytes"] = torch.cuda.memory_reserved() - before  # fxopt with graphs, before the variants
    r["fxopt_graphs_profile"] = kernel_profile(g, inputs)
    r["fxopt_graphs_call_host_us"] = host_us(lambda: g(*inputs))  # one call's host time, no synchronize
    # the same with the input and output copies launched from Python around the replay (graph_io=False)
    g_out = fxopt.optimize(model, inputs, cuda_graphs=True, graph_options={"graph_io": False})
    systems["fxopt_graphs_copies_outside"] = g_out
    r["fxopt_graphs_copies_outside_call_host_us"] = host_us(lambda: g_out(*inputs))
    # the same replayed by the Python closure instead of the native graph call (the default, NOTE [Native graph call])
    systems["fxopt_graphs_python_replay"] = fxopt.optimize(model, inputs, cuda_graphs=True,
                                                           graph_options={"native_replay": False})
    # the hand-captured graph returns its own output buffer; fxopt's opt-in mode that does the same
    systems["fxopt_graphs_unsafe_outputs"] = fxopt.optimize(model, inputs, cuda_graphs=True,
                                                            graph_options={"output_mode": "unsafe"})
    # torch.nn composites traced through (keep_fast_paths=False), against fxopt's default that keeps eager's fused
    # op for them (NOTE [Fast paths])
    from fxopt.capture import COMPOSITE_NN_MODULES as _COMPOSITE_NN_MODULES

    if any(isinstance(m, _COMPOSITE_NN_MODULES) for m in model.modules()):
        systems["fxopt_traced_through"] = fxopt.optimize(model, inputs, keep_fast_paths=False)
        systems["fxopt_graphs_traced_through"] = fxopt.optimize(model, inputs, keep_fast_paths=False,
                                                                cuda_graphs=True)
        # the layer kept whole as eager's fused op (before decompose_encoder_layers, fxopt/passes/attention.py)
        systems["fxopt_whole_layer"] = fxopt.optimize(model, inputs, disable=["decompose_encoder_layers"])
        systems["fxopt_graphs_whole_layer"] = fxopt.optimize(model, inputs, disable=["decompose_encoder_layers"],
                                                             cuda_graphs=True)
    # The floor beside them: a CUDA graph of as many one-element kernels as fxopt's graph has, replayed by torch (no
    # input or output), measured with the others. Its overhead (latency minus its kernels' busy time) is what a
    # graph of that many nodes costs on this machine before any work (benchmarks/launch_floor.py has the sweep).
    floor_graph, floor_nodes = _floor_graph(r["fxopt_graphs_profile"]["kernels"])
    systems["floor_graph"] = lambda *args: floor_graph.replay()
    r["floor_graph_nodes"] = floor_nodes
    r["floor_graph_profile"] = kernel_profile(systems["floor_graph"], inputs)
    if with_compile and not sequential:
        # built last, after every fxopt graph is captured, then timed with the others (the runs before 2026-12-06
        # timed it alone, after them; NOTES: "An illegal address when reduce-overhead is profiled ..."). Its profile
        # is taken at the very end, after every other replay of this model.
        try:
            compiled = build_reduce_overhead(model, inputs, r)
            systems["compile_reduce_overhead"] = compiled
        except Exception as e:  # reported, not raised
            r["compile_error"] = f"{type(e).__name__}: {e}"
    if sequential:  # one system after the other, as in every run before 2026-12-01 18:09 (NOTES: the interleaved runs)
        for key, fn in systems.items():
            r[key] = measure_latency(fn, inputs, device, warmup=20, iters=iters)
    else:
        failures: dict = {}
        r.update(measure_interleaved(systems, inputs, device, warmup=20, iters=iters, rounds=rounds,
                                     failures=failures))
        for key, e in failures.items():
            r[f"{key}_error"] = f"{type(e).__name__}: {e}"
        if "compile_reduce_overhead" in r and "fxopt_graphs" in r:  # paired per round: drift cancels
            r["fxopt_graphs_over_reduce_overhead_rounds"] = round_ratios(r["fxopt_graphs"],
                                                                         r["compile_reduce_overhead"])
    r["measured"] = ("one system after the other; torch.compile reduce-overhead last" if sequential else
                     f"interleaved: {len(systems)} systems (torch.compile reduce-overhead among them), {rounds} rounds "
                     f"in rotated order; latency = median of the per-round medians")
    entries = g.graph_entries
    r["graph_entries"] = [{k: getattr(e, k, None) for k in ("captured", "reason", "num_nodes", "pool_bytes",
                                                            "replays", "status")} for e in entries]
    r["graph_pool_reserved_bytes"] = g._graphs.pool_reserved_bytes() if g._graphs is not None else None
    # the overhead breakdown, each piece timed on its own
    x = inputs[0]
    buf = torch.empty_like(x)
    r["breakdown_us"] = {
        "input_copy_host": host_us(lambda: buf.copy_(x)),
        "replay_launch_host": None,
        "synchronize_idle": statistics.median(
            [(lambda t0: (torch.cuda.synchronize(), (time.perf_counter() - t0) * 1e6)[1])(time.perf_counter())
             for _ in range(200)]),
    }
    runner = g._graphs
    io_entry = next((e for e in runner._entries.values() if e.io_inputs), None) if runner is not None else None
    r["graph_io"] = io_entry is not None
    if io_entry is not None:  # what replaces the input copy: pointing the graph's copy node at the caller's tensor
        node = io_entry.io_inputs[0][1]
        r["breakdown_us"]["input_pointer_set_host"] = host_us(lambda: node.point(x.data_ptr(), node.dst, node.nbytes))
    if runner is not None and entries and entries[0].captured:
        graph = _first_graph(runner)
        if graph is not None:
            # the graph's output copy points at the last call's output: keep that alive while replaying bare
            last_output = g(*inputs)
            r["breakdown_us"]["replay_launch_host"] = host_us(graph.replay, n=1000)
            del last_output
    prof = r["fxopt_graphs_profile"]
    r["breakdown_us"]["gaps_between_kernels"] = max(0.0, prof["span_us"] - prof["busy_us"])
    r["overhead_us"] = r["fxopt_graphs"]["median_us"] - prof["busy_us"]
    hp = r["hand_graph_profile"]
    r["hand_graph_overhead_us"] = r["hand_graph"]["median_us"] - hp["busy_us"]
    r["floor_overhead_us"] = r["floor_graph"]["median_us"] - r["floor_graph_profile"]["busy_us"]
    if with_compile and sequential:
        # Last, after everything else of this model, as in every run before 2026-12-01 18:09: the runs that
        # replayed graphs captured earlier after profiling reduce-overhead hit an illegal address (benchmarks/NOTES.md)
        try:
            compiled = build_reduce_overhead(model, inputs, r)
            r["compile_reduce_overhead"] = measure_latency(compiled, inputs, device, warmup=20, iters=iters)
        except Exception as e:  # reported, not raised
            r["compile_error"] = f"{type(e).__name__}: {e}"
    if compiled is not None and "compile_error" not in r:
        try:  # profiled last: no replay of another graph of this model follows it
            r["compile_reduce_overhead_profile"] = kernel_profile(compiled, inputs)
        except Exception as e:  # reported, not raised
            r["compile_profile_error"] = f"{type(e).__name__}: {e}"
    return r


def _floor_graph(nodes: int):
    """A captured CUDA graph of ``nodes`` kernels that each add 1 to one float: the cheapest graph with that many
    nodes."""
    y = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y.add_(1.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(max(1, nodes)):
            y.add_(1.0)
    graph.y = y  # keep the buffer the graph writes alive with it
    return graph, max(1, nodes)


def _first_graph(runner):
    for entry in runner._entries.values() if hasattr(runner, "_entries") else []:
        graphs = getattr(entry, "graphs", None) or getattr(entry, "_graphs", None)
        if graphs:
            g = graphs[0]
            return getattr(g, "graph", g) if not hasattr(g, "replay") else g
    return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(models.names() + ["resnet18"]))
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of interleaved timing (default 10)")
    parser.add_argument("--sequential", action="store_true",
                        help="time one system after the other, reduce-overhead last (the method before 2026-12-06)")
    parser.add_argument("--interleaved", action="store_true", help="the default now; kept so old command lines run")
    parser.add_argument("--out", default=os.environ.get("OUT", "reports"))
    args = parser.parse_args()
    from fxopt.runtime import native

    native.wait(timeout=300)  # the compiled call paths, built or loaded in the background: measured once ready
    print(f"native call path: {native.status()}", flush=True)
    results = {"environment": environment(torch.device("cuda")), "models": [], "native": native.status()}
    rows = []
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out, f"bench_cudagraphs-{stamp}.json")

    def write() -> str:
        """The JSON and the table so far (after every model: a run cut short keeps what it measured)."""
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        table = tabulate(rows, ["model", "eager", "compile r-o", "r-o graph skips", "hand graph", "fxopt",
                                "fxopt+graphs", "python replay", "copies outside", "unsafe outputs", "busy", "vs r-o",
                                "vs hand",
                                "fxopt/eager", "overhead", "hand overhead", "floor overhead", "error"],
                       tablefmt="github")
        with open(path.replace(".json", ".md"), "w") as f:
            env = results["environment"]
            how = "one system after the other" if args.sequential else f"{args.rounds} interleaved rounds"
            f.write(f"{env.get('date')} · {env.get('device_name')} · torch {env.get('torch')} · "
                    f"fxopt {env.get('git_describe')} · batch 1, median µs ({how}; vs r-o: median of the per-round "
                    f"ratios)\n\n{table}\n")
        return table

    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        try:
            r = bench(name, args.iters, not args.no_compile, sequential=args.sequential, rounds=args.rounds)
        except Exception as e:
            import traceback

            r = {"model": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(r["traceback"], flush=True)
        results["models"].append(r)

        def m(key):
            v = r.get(key, {})
            return round(v["median_us"], 1) if isinstance(v, dict) and "median_us" in v else None

        ro = m("compile_reduce_overhead")
        fg = m("fxopt_graphs")
        hg = m("hand_graph")
        busy = r.get("fxopt_graphs_profile", {}).get("busy_us")
        skips = r.get("compile_reduce_overhead_cudagraphs", {}).get("cudagraph_skips")
        paired = r.get("fxopt_graphs_over_reduce_overhead_rounds")
        rows.append([name, m("eager"), ro, skips, hg, m("fxopt"), fg, m("fxopt_graphs_python_replay"),
                     m("fxopt_graphs_copies_outside"),
                     m("fxopt_graphs_unsafe_outputs"),
                     None if busy is None else round(busy, 1),
                     round(paired["median"], 2) if paired else None if fg is None or ro is None else round(fg / ro, 2),
                     None if fg is None or hg is None else round(fg / hg, 2),
                     None if m("fxopt") is None or m("eager") is None else round(m("fxopt") / m("eager"), 2),
                     None if "overhead_us" not in r else round(r["overhead_us"], 1),
                     None if "hand_graph_overhead_us" not in r else round(r["hand_graph_overhead_us"], 1),
                     None if "floor_overhead_us" not in r else round(r["floor_overhead_us"], 1),
                     r.get("error", "")[:50]])
        write()
    table = write()
    print(table)
    for r in results["models"]:
        if "fxopt_traced_through" in r:
            print(r["model"], "composites traced through (keep_fast_paths=False): fxopt",
                  round(r["fxopt_traced_through"]["median_us"], 1), "fxopt+graphs",
                  round(r["fxopt_graphs_traced_through"]["median_us"], 1),
                  "| kept whole (decompose_encoder_layers off): fxopt", round(r["fxopt_whole_layer"]["median_us"], 1),
                  "fxopt+graphs", round(r["fxopt_graphs_whole_layer"]["median_us"], 1), "| eager",
                  round(r["eager"]["median_us"], 1))
        if "breakdown_us" in r:
            print(r["model"], {k: (None if v is None else round(v, 2)) for k, v in r["breakdown_us"].items()})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
