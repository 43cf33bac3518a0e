"""Where the host time of one fused launch goes, piece by piece (no synchronization between calls).

    python benchmarks/host_overhead.py [--device cuda]

Prints µs per call of each layer of the call path for the relu->sigmoid kernel at 1x1024, next to one eager op.
"""

from __future__ import annotations

import argparse
import time

import torch

import fxopt
from fxopt.inputs import input_signature
from fxopt.runtime import native
from fxopt.runtime.kernel import _raw_stream
from fxopt.runtime.watch import WeightWatch


def per_call_us(fn, n: int = 5000, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        for _ in range(200):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return best


def graph_rows(model, x) -> list:
    """One call of the module replayed as a CUDA graph (NOTE [Native graph call]): fxopt's native replay, its Python
    closure, unsafe outputs, and the eager model captured by hand (input copy + torch's replay())."""
    g = fxopt.optimize(model, [x], cuda_graphs=True)
    g_py = fxopt.optimize(model, [x], cuda_graphs=True, graph_options={"native_replay": False})
    g_unsafe = fxopt.optimize(model, [x], cuda_graphs=True, graph_options={"output_mode": "unsafe"})
    for m in (g, g_py, g_unsafe):
        for _ in range(3):
            m(x)
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(static)

    def hand(x=x):
        static.copy_(x)
        graph.replay()

    native_on = hasattr(g._graphs._fast[next(iter(g._graphs._fast))], "native")
    return [
        (f"graph call, native replay (the default){'' if native_on else ' (NOT attached)'}", lambda: g(x)),
        ("graph call, Python replay", lambda: g_py(x)),
        ("graph call, unsafe outputs", lambda: g_unsafe(x)),
        ("hand graph: static.copy_(x) + replay()", hand),
        ("torch CUDAGraph.replay() alone", graph.replay),
    ]


def weight_check_rows(dev: torch.device) -> list:
    """NOTE [Frozen weights]: the per-call check that the model's weights did not change since optimizing, for 4
    tensors (a 2-layer MLP), 161 (ResNet-18's parameters and buffers) and 320 (ResNet-50's), native and Python."""
    rows = []
    for n in (4, 161, 320):
        watch = WeightWatch([], [torch.randn(8, device=dev) for _ in range(n)])
        if watch._native_fp is not None:
            rows.append((f"weight check, native, {n} tensors", watch.changed))
        python = WeightWatch([], list(watch._tensors))
        python._native_fp = None
        rows.append((f"weight check, Python fallback, {n} tensors", python.changed))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.set_grad_enabled(False)
    model, x = fxopt.models.ReluSigmoid(), torch.randn(1, 1024, device=dev)
    t0 = time.perf_counter()
    native.wait(timeout=300)  # the compiled call path (NOTE [Native call path]): built or loaded in the background
    print(f"native call path: {native.status()} (waited {time.perf_counter() - t0:.1f} s)")
    opt = fxopt.optimize(model, [x])
    kernel = next(iter(opt.kernels.values()))
    slow = kernel.call.__globals__["slow"]  # the Python call path
    inputs = (x,)
    key = (x.shape, x.stride(), x.dtype, x.get_device())  # the generated call's flat key (NOTE [Fused call path])
    plan = kernel._plans[key]
    out = torch.empty_strided(plan.out_shape, plan.out_stride, dtype=torch.float32, device=dev)
    stream = _raw_stream(dev.index or 0) if dev.type == "cuda" else 0
    xp, op = x.data_ptr(), out.data_ptr()
    gm = opt.specializations[0].runner if hasattr(opt, "specializations") else None
    rows = [
        ("eager torch.relu(x)", lambda: torch.relu(x)),
        ("eager relu -> sigmoid (2 ops)", lambda: model(x)),
        ("plan key (shape, stride, dtype, device)", lambda: (x.shape, x.stride(), x.dtype, x.get_device())),
        ("output allocation (empty_strided)", lambda: torch.empty_strided(plan.out_shape, plan.out_stride,
                                                                          dtype=torch.float32, device=dev)),
        ("launch only (bound launcher, fixed pointers)", lambda: plan.launch(stream, xp, op, *plan.args)),
        ("fused call, Python path (key, plan, allocate, launch)", lambda: slow(inputs)),
        ("fused call, native path", (lambda: kernel.call.native()(inputs)) if kernel.call.native() else None),
        ("fused call (what the graph calls)", lambda: kernel.call(inputs)),
        ("lowered GraphModule.forward", (lambda: gm.forward(x)) if gm is not None else None),
        ("input_signature (the specialization key)", lambda: input_signature((x,))),
        ("OptimizedModule._run_optimized", lambda: opt._run_optimized(x)),
        ("OptimizedModule call", lambda: opt(x)),
    ]
    rows += weight_check_rows(dev)
    if dev.type == "cuda":
        rows.insert(4, ("current raw stream", lambda: _raw_stream(dev.index or 0)))
        rows += graph_rows(model, x)
    rows = [(n, f) for n, f in rows if f is not None]
    print(f"host µs per call, {dev}, torch {torch.__version__}")
    for name, fn in rows:
        print(f"{name:48s} {per_call_us(fn):8.2f}")
    # The criterion, robust to the host's drift: eager op and fused call measured alternately, 9 rounds.
    ratios = []
    for _ in range(9):
        eager_us = per_call_us(lambda: torch.relu(x), n=2000, repeats=3)
        fused_us = per_call_us(lambda: kernel.call(inputs), n=2000, repeats=3)
        ratios.append(fused_us / eager_us)
    ratios.sort()
    print(f"fused call / eager torch.relu, 9 interleaved rounds: median {ratios[4]:.2f} "
          f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f})")
    ratios = []
    for _ in range(9):
        eager_us = per_call_us(lambda: torch.relu(x), n=2000, repeats=3)
        fused_us = per_call_us(lambda: slow(inputs), n=2000, repeats=3)
        ratios.append(fused_us / eager_us)
    ratios.sort()
    print(f"Python path / eager torch.relu, 9 interleaved rounds: median {ratios[4]:.2f} "
          f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
