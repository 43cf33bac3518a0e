#!/usr/bin/env python
"""The floor under every batch-1 latency on this machine: what a call + synchronize costs when the GPU has (almost)
nothing to do.

Each figure is the median of many ``fn(); synchronize()`` calls timed on the host, as measure_latency times every
system in bench_cudagraphs.py, so the figures are directly comparable with its latencies and overheads:

  sync_idle            torch.cuda.synchronize() with nothing queued
  stream_sync_idle     torch.cuda.current_stream().synchronize() with nothing queued
  kernel               one 1-element kernel (y.zero_()) launched by torch, then synchronize
  graph_nodes_N        a CUDA graph of N such kernels, replayed, then synchronize (N = 1, 2, 4, ... 64)
  graph_nodes_N_host   the replay alone (no synchronize), back to back
  kernel_busy_us       GPU time of one such kernel (profiler), so graph_nodes_N - N * busy is the graph's own cost

``--sync-modes`` reruns the kernel and 1-node graph rows in subprocesses under each CUDA scheduling flag (spin,
yield, blocking sync), set through cuda-bindings before torch creates the context: whether the synchronize floor is
the driver's wake-up or the machine.

    python benchmarks/launch_floor.py [--iters 3000] [--sync-modes] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _set_schedule_flag(mode: str) -> None:
    """Set the device scheduling flag before torch creates the primary context."""
    from cuda.bindings import runtime as cudart  # cuda-bindings

    flag = {"spin": cudart.cudaDeviceScheduleSpin, "yield": cudart.cudaDeviceScheduleYield,
            "blocking": cudart.cudaDeviceScheduleBlockingSync, "auto": cudart.cudaDeviceScheduleAuto}[mode]
    (err,) = cudart.cudaSetDeviceFlags(flag)
    if int(err) != 0:
        raise RuntimeError(f"cudaSetDeviceFlags({mode}) failed: {err}")


def median_us(fn, sync, iters: int) -> float:
    for _ in range(50):
        fn()
        sync()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def kernel_busy_us(fn) -> float:
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    times = [e.time_range.end - e.time_range.start for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    return statistics.median(times) if times else float("nan")


def measure(iters: int, quick: bool = False) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_cudagraphs import host_us  # after the scheduling flag is set: it imports torch

    y = torch.zeros(1, device="cuda")
    noop = lambda: None  # noqa: E731
    r: dict = {}
    r["sync_idle"] = median_us(noop, torch.cuda.synchronize, iters)
    stream = torch.cuda.current_stream()
    r["stream_sync_idle"] = median_us(noop, stream.synchronize, iters)
    r["kernel"] = median_us(y.zero_, torch.cuda.synchronize, iters)
    r["kernel_stream_sync"] = median_us(y.zero_, stream.synchronize, iters)
    r["kernel_host"] = host_us(y.zero_)
    r["kernel_busy_us"] = kernel_busy_us(y.zero_)
    for n in ([1] if quick else [1, 2, 4, 8, 16, 32, 64]):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(n):
                y.zero_()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                y.zero_()
        graph.replay()
        r[f"graph_nodes_{n}"] = median_us(graph.replay, torch.cuda.synchronize, iters)
        r[f"graph_nodes_{n}_host"] = host_us(graph.replay)
    return r


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--sync-modes", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    if args.child:  # one scheduling flag, in its own process
        _set_schedule_flag(args.child)
        print(json.dumps(measure(args.iters, quick=True)))
        return 0
    import torch

    from fxopt.report.measure import environment

    result = {"environment": environment(torch.device("cuda")), "default": measure(args.iters)}
    if args.sync_modes:
        for mode in ("spin", "yield", "blocking"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--iters", str(args.iters)],
                                  capture_output=True, text=True, timeout=300)
            result[mode] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                "error": proc.stderr.strip()[-500:]}
    for section, rows in result.items():
        if section == "environment":
            continue
        print(f"== {section}")
        for key, value in rows.items():
            print(f"  {key:28s} {value:8.2f}" if isinstance(value, float) else f"  {key:28s} {value}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "launch_floor.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
