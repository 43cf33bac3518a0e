#!/usr/bin/env python
"""CUDAGraphRunner output modes: what a safe output costs per call (copy vs rotating buffers), against the floor.

For each model (zoo, batch 1 by default) and each way of running it, in one process:

  eager      the model under no_grad
  manual     a hand-written torch.cuda.graph: static_x.copy_(x); g.replay(); return static_y (the floor of a Python
             replay path; same unsafe semantics)
  unsafe     CUDAGraphRunner(output_mode="unsafe"): the graph's own output buffer
  copy       CUDAGraphRunner(output_mode="copy"): a fresh clone per output (the current default)
  rotate2/3  CUDAGraphRunner(output_mode="rotate", rotate_depth=2/3): k graphs per signature, no copy

Columns (µs per call):
  latency    call + torch.cuda.synchronize(), median (p10-p90) over --iters calls on fresh inputs
  host       the Python call alone (no sync), median, in a back-to-back loop
  pipelined  N back-to-back calls, one sync at the end, divided by N
  gpu        GPU time per call: N calls queued behind a GPU spin (torch.cuda._sleep), timed by CUDA events, so the
             host never starves the GPU: the busy time of the kernels (eager) or of the replay + copies (graphs)

The safe default should be whichever of copy/rotate2 has the lower latency and host time; the difference to
"unsafe" is what the safety costs. rotate_k also holds k times the output memory and k graphs per signature.

    python benchmarks/bench_cudagraph_outputs.py                         # zoo models at batch 1
    python benchmarks/bench_cudagraph_outputs.py --models simple_cnn --batch 8 --iters 3000
    python benchmarks/bench_cudagraph_outputs.py --fxopt                 # wrap fxopt.optimize()'s graph module
JSON goes to --out, else $OUT/bench_cudagraph_outputs.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MODES = ("eager", "manual", "unsafe", "copy", "rotate2", "rotate3")
DEFAULT_MODELS = ("relu_sigmoid", "simple_cnn", "mlp_block", "transformer_encoder")
SPIN_CYCLES = 20_000_000  # ~10 ms of GPU spin: the host queues a whole batch of calls before the GPU starts


def _manual_graph(model: Callable[..., Any], x: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        static_y = model(static_x)

    def run(inp: torch.Tensor) -> Any:
        static_x.copy_(inp)
        g.replay()
        return static_y

    return run


def make_callable(mode: str, model: Callable[..., Any], x: torch.Tensor) -> tuple[Callable[..., Any], Any]:
    from fxopt.runtime.cudagraph import CUDAGraphRunner

    if mode == "eager":
        def eager(inp):
            with torch.no_grad():
                return model(inp)
        return eager, None
    if mode == "manual":
        return _manual_graph(model, x), None
    if mode.startswith("rotate"):
        runner = CUDAGraphRunner(model, output_mode="rotate", rotate_depth=int(mode[len("rotate"):]))
    else:
        runner = CUDAGraphRunner(model, output_mode=mode)
    return runner, runner


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]


def measure(fn: Callable[..., Any], inputs: list[torch.Tensor], iters: int, warmup: int) -> dict[str, float]:
    """Per-call microseconds: latency (synced), host (unsynced call), pipelined, gpu (events behind a spin)."""
    n_in = len(inputs)
    with torch.no_grad():
        for i in range(warmup):
            fn(inputs[i % n_in])
        torch.cuda.synchronize()
        lat = []
        for i in range(iters):
            x = inputs[i % n_in]
            t0 = time.perf_counter_ns()
            fn(x)
            torch.cuda.synchronize()
            lat.append((time.perf_counter_ns() - t0) / 1e3)
        host = []
        torch.cuda.synchronize()
        t_all = time.perf_counter_ns()
        for i in range(iters):
            x = inputs[i % n_in]
            t0 = time.perf_counter_ns()
            fn(x)
            host.append((time.perf_counter_ns() - t0) / 1e3)
        torch.cuda.synchronize()
        pipelined = (time.perf_counter_ns() - t_all) / 1e3 / iters
        batch = 50
        gpu = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(SPIN_CYCLES)
            start.record()
            for i in range(batch):
                fn(inputs[i % n_in])
            end.record()
            torch.cuda.synchronize()
            gpu.append(start.elapsed_time(end) * 1e3 / batch)
    return {"latency_us": statistics.median(lat), "latency_p10_us": _percentile(lat, 0.1),
            "latency_p90_us": _percentile(lat, 0.9), "host_us": statistics.median(host),
            "pipelined_us": pipelined, "gpu_us": min(gpu)}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import fxopt
    from fxopt import models

    model, (x,) = models.get(name).build(device="cuda", batch_size=args.batch)
    target: Callable[..., Any] = model
    if args.fxopt:
        with torch.no_grad():
            target = fxopt.optimize(model, (x,)).graph_module
    inputs = [torch.randn_like(x) for _ in range(8)]
    with torch.no_grad():
        want = [model(inp) for inp in inputs]
    result: dict[str, Any] = {"model": name, "input": list(x.shape), "modes": {}}
    for mode in args.modes:
        try:
            fn, runner = make_callable(mode, target, x)
            with torch.no_grad():
                got = fn(inputs[0])
                torch.testing.assert_close(got, want[0], rtol=1e-3, atol=1e-3)
            row = measure(fn, inputs, args.iters, args.warmup)
            if runner is not None:
                (entry,) = runner.entries()
                row.update(captured=entry.captured, reason=entry.reason, num_nodes=entry.num_nodes,
                           pool_bytes=entry.pool_bytes, output_bytes=entry.output_bytes,
                           pool_reserved_bytes=runner.pool_reserved_bytes())
                runner.release()
            result["modes"][mode] = row
        except Exception as e:  # a failed mode is recorded, the run goes on
            result["modes"][mode] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        finally:
            fn = runner = None
            gc.collect()
            torch.cuda.synchronize()
    modes = result["modes"]
    ok = {m: r for m, r in modes.items() if "latency_us" in r}
    if "unsafe" in ok:
        base = ok["unsafe"]
        result["safety_cost_us"] = {m: {"latency": ok[m]["latency_us"] - base["latency_us"],
                                        "host": ok[m]["host_us"] - base["host_us"]}
                                    for m in ok if m in ("copy", "rotate2", "rotate3")}
    safe = [m for m in ("copy", "rotate2") if m in ok]
    if safe:
        result["cheaper_safe_mode"] = min(safe, key=lambda m: (ok[m]["latency_us"], ok[m]["host_us"]))
    return result


def render(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        lines.append(f"\n{res['model']} {res['input']}")
        lines.append(f"  {'mode':<9}{'latency':>10}{'p10-p90':>16}{'host':>9}{'pipelined':>11}{'gpu':>9}  notes")
        for mode, r in res["modes"].items():
            if "error" in r:
                lines.append(f"  {mode:<9}  ERROR {r['error'][:150]}")
                continue
            notes = []
            if "num_nodes" in r:
                notes.append(f"nodes={r['num_nodes']} pool={r['pool_reserved_bytes'] / 2**20:.1f}MiB")
                if not r["captured"]:
                    notes.append(f"NOT CAPTURED: {r['reason']}")
            lines.append(f"  {mode:<9}{r['latency_us']:>10.1f}{r['latency_p10_us']:>8.1f}-{r['latency_p90_us']:<7.1f}"
                         f"{r['host_us']:>9.1f}{r['pipelined_us']:>11.1f}{r['gpu_us']:>9.1f}  {' '.join(notes)}")
        if "safety_cost_us" in res:
            cost = ", ".join(f"{m} +{c['latency']:.1f} µs latency / +{c['host']:.1f} µs host"
                             for m, c in res["safety_cost_us"].items())
            lines.append(f"  safe outputs cost over unsafe: {cost}")
        if "cheaper_safe_mode" in res:
            lines.append(f"  cheaper safe mode: {res['cheaper_safe_mode']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--fxopt", action="store_true", help="wrap fxopt.optimize(model)'s rewritten graph module")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    results = []
    for name in args.models:
        try:
            results.append(run_model(name, args))
        except Exception as e:
            results.append({"model": name, "input": [], "modes": {"setup": {"error": f"{type(e).__name__}: {e}"}}})
        print(render(results[-1:]), flush=True)
    meta = {"schema": "fxopt-bench-cudagraph-outputs/1", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
            "python": platform.python_version(), "args": vars(args)}
    out = args.out or (os.path.join(os.environ["OUT"], "bench_cudagraph_outputs.json") if os.environ.get("OUT")
                       else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
