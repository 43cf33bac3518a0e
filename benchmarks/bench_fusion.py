#!/usr/bin/env python
"""Elementwise-fusion benchmarks for fxopt: kernels per forward, latency, bandwidth, host cost, optimize time.

One process measures, in one run (sections run in the order given by --sections, default 1,2,3,5,4):

  1. relu->sigmoid and the 16-op chain at 1x1024 and 1000x1000: GPU kernels per forward and per-call latency
     (p10/median/p90) of eager, TorchScript, torch.compile (default, reduce-overhead) and fxopt.
  2. Bandwidth of one fused kernel on 1<<26 float32 elements (CUDA events, rotating input buffers) against a
     device-to-device copy in the same run; also eager and torch.compile forwards at that size.
  3. Host cost per call of one fused launch (no CUDA graphs) vs one eager op: N back-to-back calls, one sync.
  4. Cold and cached fxopt.optimize time per zoo model (fresh on-disk caches; cached = fresh subprocess, warm disk),
     against torch.compile's first call in a fresh subprocess with fresh Inductor/Triton caches.
  5. GPU kernels (and dispatched ATen ops) per forward of every zoo model: eager, torch.compile, fxopt.

Every measurement is guarded: a failure is recorded (error string + traceback tail) and the run goes on. A time
budget (--budget-s) skips what is left once spent, noting it; a hard stop at budget + grace ends the run cleanly.
JSON goes to --out, else $OUT, else reports/ (bench_fusion.json); it is rewritten after every section.

    python benchmarks/bench_fusion.py                       # on the GPU machine
    python benchmarks/bench_fusion.py --device cpu --quick --budget-s 120   # CPU smoke test
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # fxopt from this checkout, installed or not

import torch  # noqa: E402  (fxopt itself is imported in main(), after FXOPT_CACHE_DIR is set)

SCHEMA = "fxopt-bench-fusion/1"
SECTION_KEYS = {1: "1_latency", 2: "2_bandwidth", 3: "3_host_cost", 4: "4_optimize_time", 5: "5_zoo_kernels"}
SHAPES = [(1, 1024), (1000, 1000)]
SLEEP_CYCLES = 100_000  # ~50 µs of GPU spin before each timed kernel, so its start event never waits on the host
RESULT_MARK = "BENCH_RESULT "


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: budget, logging, errors, context


class HardStop(BaseException):
    """Raised by the SIGALRM watchdog at budget + grace; BaseException so ordinary guards do not swallow it."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def exceeded(self) -> bool:
        return self.left() <= 0


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def error_info(e: BaseException) -> dict[str, str]:
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}


@dataclass
class Ctx:
    args: argparse.Namespace
    device: torch.device
    backend: str
    budget: Budget
    tmp_root: Path
    results: dict[str, Any]
    out_path: Path
    iters: int
    warmup: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def error(self, where: str, e: BaseException) -> dict[str, str]:
        info = error_info(e)
        self.results["errors"].append({"where": where, **info})
        log(f"ERROR in {where}: {info['error']}")
        return {"error": info["error"]}

    def skip(self, what: str, why: str) -> dict[str, str]:
        self.results["skipped"].append({"what": what, "why": why})
        log(f"SKIP {what}: {why}")
        return {"skipped": why}

    def over_budget(self, what: str) -> bool:
        if self.budget.exceeded():
            self.skip(what, f"time budget of {self.budget.seconds:.0f} s spent")
            return True
        return False

    def attempt(self, where: str, fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 -- every measurement is guarded; the error goes in the JSON
            return self.error(where, e)


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


def fresh_input(shape: tuple[int, ...], ctx: Ctx, seed: int = 0) -> torch.Tensor:
    """Random normal input made on the device (never zeros)."""
    g = torch.Generator(device=ctx.device).manual_seed(1234 + seed)
    return torch.randn(shape, generator=g, device=ctx.device)


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)

    def q(p: float) -> float:
        if len(s) == 1:
            return s[0]
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"p10_us": q(0.10), "median_us": statistics.median(s), "p90_us": q(0.90), "min_us": s[0],
            "max_us": s[-1], "mean_us": statistics.fmean(s), "calls": len(s)}


def time_calls(fn: Callable[..., Any], args: tuple, ctx: Ctx, *, iters: int | None = None,
               warmup: int | None = None, max_s: float | None = None) -> dict[str, Any]:
    """Host wall time of each call with a device sync after it (includes launch overhead), in µs."""
    iters = iters or ctx.iters
    warmup = ctx.warmup if warmup is None else warmup
    max_s = ctx.args.max_s_per_system if max_s is None else max_s
    min_calls = min(iters, 50)
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        sync(ctx)
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < iters:
            t0 = time.perf_counter()
            fn(*args)
            sync(ctx)
            samples.append((time.perf_counter() - t0) * 1e6)
            if len(samples) >= min_calls and time.perf_counter() - start > max_s:
                break
    return {**percentiles(samples), "warmup": warmup, "synchronized_per_call": True}


def device_times_us(fn: Callable[[int], Any], ctx: Ctx, *, iters: int, warmup: int) -> dict[str, Any]:
    """GPU time of ``fn(i)`` per call from CUDA events around it; a GPU spin before each start event keeps the
    host's launch latency out. On CPU: host wall time per call (the C++ kernels are synchronous)."""
    with torch.no_grad():
        for i in range(warmup):
            fn(i)
        sync(ctx)
        samples: list[float] = []
        if ctx.cuda:
            sleep = getattr(torch.cuda, "_sleep", None)
            pairs = []
            for i in range(iters):
                if sleep is not None:
                    sleep(SLEEP_CYCLES)
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn(i)
                e.record()
                pairs.append((s, e))
            torch.cuda.synchronize(ctx.device)
            samples = [s.elapsed_time(e) * 1e3 for s, e in pairs]
            method = "cuda events" + (" after a GPU spin" if sleep is not None else "")
        else:
            for i in range(iters):
                t0 = time.perf_counter()
                fn(i)
                samples.append((time.perf_counter() - t0) * 1e6)
            method = "host wall time (cpu)"
    return {**percentiles(samples), "warmup": warmup, "method": method}


def max_abs_err(out: Any, ref: Any) -> float | None:
    a = out[0] if isinstance(out, (list, tuple)) else out
    b = ref[0] if isinstance(ref, (list, tuple)) else ref
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    return (a.detach().double() - b.detach().double()).abs().max().item()


def launch_counts(fn: Callable[..., Any], inputs: tuple, ctx: Ctx, *, dispatch: bool) -> dict[str, Any]:
    """Kernels per forward. dispatch=True: fxopt.count_launches (dispatched ATen ops + CUDA profile). Compiled
    callables get the CUDA profile only: Dynamo runs frames eagerly under a TorchDispatchMode, so a dispatch count
    of a torch.compile'd module would count eager's ops."""
    from fxopt.launches import count_launches, cuda_profile

    if dispatch:
        d = count_launches(fn, inputs).as_dict()
    elif ctx.cuda:
        d = {"static": None, "dispatched": None, **cuda_profile(fn, inputs)}
    else:
        return {"note": "cpu: no CUDA kernels to count; dispatch count not meaningful for compiled callables"}
    if d.get("cuda_kernels_by_name") and len(d["cuda_kernels_by_name"]) > 40:
        d["cuda_kernels_by_name"] = dict(sorted(d["cuda_kernels_by_name"].items(), key=lambda kv: -kv[1])[:40])
    return d


def free_memory(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()


def dynamo_stats() -> dict[str, Any]:
    """Graphs compiled and graph breaks since the last reset: a torch.compile that fell back to eager shows here."""
    try:
        from torch._dynamo.utils import counters

        return {"dynamo_unique_graphs": counters["stats"]["unique_graphs"],
                "dynamo_graph_breaks": sum(counters["graph_break"].values()),
                "graph_break_reasons": list(counters["graph_break"])[:5]}
    except Exception as e:  # noqa: BLE001 -- informational only
        return {"dynamo_stats_error": f"{type(e).__name__}: {e}"}


def dynamo_reset() -> None:
    """Forget compiled code (and Dynamo's counters, which reset() keeps), so each compile starts clean."""
    try:
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
    except Exception:  # noqa: BLE001 -- best effort
        pass


def kernel_info(kernels: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"node": node, "name": getattr(k, "name", None), "ops": list(getattr(k, "op_names", []) or []),
             "backend": getattr(k, "backend", None), "vec": getattr(k, "vec", None)} for node, k in kernels.items()]


# ----------------------------------------------------------------------------------------------------------------
# Systems of section 1: each builder returns (callable, info dict)


def build_eager(model, x, ctx):
    return model, {}


def build_torchscript(model, x, ctx):
    info: dict[str, Any] = {}
    try:
        m = torch.jit.freeze(torch.jit.script(copy.deepcopy(model).eval()))
        info["method"] = "torch.jit.freeze(torch.jit.script(m.eval()))"
    except Exception as e:  # noqa: BLE001 -- fall back to tracing; the script error is kept
        info["script_error"] = f"{type(e).__name__}: {e}"[:1000]
        with torch.no_grad():
            traced = torch.jit.trace(copy.deepcopy(model).eval(), (x,))
            m = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        info["method"] = "torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, x)))"
    try:
        info["texpr_fuser_enabled"] = bool(torch._C._jit_texpr_fuser_enabled())
        info["can_fuse_on_gpu"] = bool(torch._C._jit_can_fuse_on_gpu())
    except Exception:  # noqa: BLE001 -- informational only
        pass
    return m, info


def _build_compile(mode: str | None):
    def build(model, x, ctx):
        # not a reset: the systems of a config are timed together, and a reset drops the other compiled system's
        # code (NOTE [One Dynamo cache for every system], fxopt/report/compiled.py); section_latency resets per config
        try:
            from torch._dynamo.utils import counters

            counters.clear()
        except Exception:  # noqa: BLE001 -- only the graph-break counts of this system are at stake
            pass
        kwargs = {"dynamic": False}
        if mode is not None:
            kwargs["mode"] = mode
        return torch.compile(copy.deepcopy(model), **kwargs), {"mode": mode or "default"}

    return build


def build_fxopt(model, x, ctx):
    import fxopt

    t0 = time.perf_counter()
    opt = fxopt.optimize(model, (x,), backend=ctx.backend)
    wall = time.perf_counter() - t0
    spec = opt.specializations[-1]
    return opt, {"backend": spec.backend, "optimize_s": spec.seconds, "optimize_wall_s": wall,
                 "kernels": kernel_info(spec.kernels)}


SYSTEMS: list[tuple[str, Callable, bool]] = [
    # name, builder, count dispatched ops too
    ("eager", build_eager, True),
    ("torchscript", build_torchscript, False),
    ("compile_default", _build_compile(None), False),
    ("compile_reduce_overhead", _build_compile("reduce-overhead"), False),
    ("fxopt", build_fxopt, True),
]


def sys_name_is_compiled(where: str) -> bool:
    return "compile_" in where


def prepare_system(ctx: Ctx, where: str, build: Callable, model, x, ref,
                   dispatch: bool) -> tuple[dict[str, Any], Callable | None]:
    """Build a system, time its first call, compare with eager, count its launches; its latency is taken later,
    interleaved with the other systems of the config (section_latency). Returns the entry and the callable (None
    when it failed)."""
    entry: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        fn, info = build(model, x, ctx)
    except Exception as e:  # noqa: BLE001
        return {**ctx.error(f"{where}: build", e)}, None
    entry["build_s"] = time.perf_counter() - t0
    entry.update(info)
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fn(x)
            sync(ctx)
            entry["first_call_s"] = time.perf_counter() - t0
        entry["max_abs_err_vs_eager"] = max_abs_err(out, ref)
        if sys_name_is_compiled(where):
            entry.update(dynamo_stats())
        del out
    except Exception as e:  # noqa: BLE001
        entry.update(ctx.error(f"{where}: first call", e))
        return entry, None
    entry["launches"] = ctx.attempt(f"{where}: launches", launch_counts, fn, (x,), ctx, dispatch=dispatch)
    return entry, fn


def time_interleaved(ctx: Ctx, where: str, built: dict[str, Callable], x, entries: dict[str, dict[str, Any]]) -> None:
    """Time the built systems of one config together, in rounds (NOTE [Interleaved timing] in
    fxopt/report/measure.py), and store each one's latency in its entry (or the error it raised)."""
    from fxopt.report.measure import measure_interleaved

    failures: dict[str, BaseException] = {}
    try:
        stats = measure_interleaved(built, (x,), ctx.device, warmup=ctx.warmup, iters=ctx.iters,
                                    rounds=ctx.args.rounds, max_seconds=ctx.args.max_s_per_system * len(built),
                                    failures=failures)
    except Exception as e:  # noqa: BLE001 -- every measurement is guarded; the error goes in the JSON
        err = ctx.error(f"{where}: interleaved latency", e)
        for name in built:
            entries[name]["latency"] = err
        return
    for name in built:
        if name in failures:
            try:
                raise failures[name]
            except Exception as e:  # noqa: BLE001 -- recorded with its traceback
                entries[name]["latency"] = ctx.error(f"{where} {name}: latency", e)
            continue
        entries[name]["latency"] = {**stats[name], "warmup": ctx.warmup, "synchronized_per_call": True,
                                    "interleaved_with": [n for n in built if n != name]}


def section_latency(ctx: Ctx, out: dict[str, Any]) -> dict[str, Any]:
    from fxopt.models import ElementwiseChain, ReluSigmoid

    out.update({"configs": [], "iters": ctx.iters, "warmup": ctx.warmup, "rounds": ctx.args.rounds,
                "max_s_per_system": ctx.args.max_s_per_system,
                "timing": "interleaved per config (fxopt.report.measure.measure_interleaved): latency = median of "
                          "the per-round medians"})
    for model_name, cls in [("relu_sigmoid", ReluSigmoid), ("elementwise_chain", ElementwiseChain)]:
        for shape in SHAPES:
            label = f"{model_name} {'x'.join(map(str, shape))}"
            if ctx.over_budget(f"section 1: {label}"):
                out["configs"].append({"model": model_name, "shape": list(shape), "skipped": "budget"})
                continue
            log(f"section 1: {label}")
            config: dict[str, Any] = {"model": model_name, "shape": list(shape), "systems": {}}
            out["configs"].append(config)
            try:
                model = cls().eval().to(ctx.device)
                x = fresh_input(shape, ctx, seed=len(out["configs"]))
                with torch.no_grad():
                    ref = model(x)
            except Exception as e:  # noqa: BLE001
                config.update(ctx.error(f"section 1 {label}: setup", e))
                continue
            dynamo_reset()  # once per config: its compiled systems are timed together, so none resets another
            built: dict[str, Callable] = {}
            for sys_name, build, dispatch in SYSTEMS:
                if ctx.over_budget(f"section 1: {label} {sys_name}"):
                    config["systems"][sys_name] = {"skipped": "budget"}
                    continue
                if sys_name == "compile_reduce_overhead" and not ctx.cuda:
                    config["systems"][sys_name] = ctx.skip(f"section 1: {label} {sys_name}",
                                                           "CUDA graphs need a GPU")
                    continue
                log(f"  {sys_name}")
                entry, fn = prepare_system(ctx, f"section 1 {label} {sys_name}", build, model, x, ref, dispatch)
                config["systems"][sys_name] = entry
                if fn is not None:
                    built[sys_name] = fn
            if built:
                log(f"  latency: {', '.join(built)} interleaved, {ctx.args.rounds} rounds")
                time_interleaved(ctx, f"section 1 {label}", built, x, config["systems"])
            built.clear()
            dynamo_reset()
            del model, x, ref
            free_memory(ctx)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Section 2: bandwidth of one fused kernel vs a device-to-device copy


def _bw(stats: dict[str, Any], nbytes: int) -> dict[str, Any]:
    med_s = stats["median_us"] * 1e-6
    return {**stats, "bytes": nbytes, "tbps": nbytes / med_s / 1e12 if med_s > 0 else None,
            "tbps_best": nbytes / (stats["min_us"] * 1e-6) / 1e12 if stats["min_us"] > 0 else None}


def measure_copy_bw(ctx: Ctx, numel: int, nbufs: int) -> dict[str, Any]:
    srcs = [fresh_input((numel,), ctx, seed=100 + i) for i in range(nbufs)]
    dsts = [torch.empty_like(s) for s in srcs]
    stats = device_times_us(lambda i: dsts[i % nbufs].copy_(srcs[i % nbufs]), ctx, iters=ctx.args.bw_iters,
                            warmup=10)
    return {"what": "dst.copy_(src)", **_bw(stats, 2 * numel * srcs[0].element_size())}


def measure_fused_bw(ctx: Ctx, model_name: str, cls, numel: int, nbufs: int, copy_tbps: float | None
                     ) -> dict[str, Any]:
    import fxopt

    model = cls().eval().to(ctx.device)
    bufs = [fresh_input((numel,), ctx, seed=200 + i) for i in range(nbufs)]
    entry: dict[str, Any] = {"model": model_name}
    t0 = time.perf_counter()
    opt = fxopt.optimize(model, (bufs[0],), backend=ctx.backend)
    entry["optimize_wall_s"] = time.perf_counter() - t0
    spec = opt.specializations[-1]
    entry["graph_kernels"] = kernel_info(spec.kernels)
    if not spec.kernels:
        raise RuntimeError(f"fxopt produced no fused kernel for {model_name} (passes: "
                           f"{[(r.name, r.status, r.error) for r in spec.records]})")
    kernel = max(spec.kernels.values(), key=lambda k: len(k.op_names))
    entry.update(kernel_name=kernel.name, kernel_ops=list(kernel.op_names), n_ops=len(kernel.op_names),
                 n_inputs=len(kernel.input_dtypes), n_outputs=len(kernel.output_dtypes))
    if len(kernel.input_dtypes) != 1:
        raise RuntimeError(f"{kernel.name} takes {len(kernel.input_dtypes)} inputs; expected 1")
    with torch.no_grad():
        outs = kernel([bufs[0]])
        ref = model(bufs[0])
    entry["max_abs_err_vs_eager"] = max_abs_err(outs, ref)
    nbytes = bufs[0].numel() * bufs[0].element_size() + sum(o.numel() * o.element_size() for o in outs)
    del outs, ref
    try:
        plan = next(iter(kernel._plans.values()))
        entry["plan"] = {"path": plan.path, "grid": plan.grid, "numel": plan.numel, "vec": kernel.vec}
    except Exception:  # noqa: BLE001 -- private detail, informational only
        pass
    stats = device_times_us(lambda i: kernel([bufs[i % nbufs]]), ctx, iters=ctx.args.bw_iters, warmup=10)
    entry["fused_kernel"] = _bw(stats, nbytes)
    tb = entry["fused_kernel"]["tbps"]
    entry["fused_kernel"]["ratio_vs_copy"] = tb / copy_tbps if tb and copy_tbps else None
    # Whole forwards at the same size, for context ("useful bytes" = the fused kernel's bytes).
    eager = ctx.attempt(f"section 2 {model_name}: eager forward", device_times_us,
                        lambda i: model(bufs[i % nbufs]), ctx, iters=ctx.args.bw_iters, warmup=5)
    if "median_us" in eager:
        eager = _bw(eager, nbytes)
        eager["note"] = "tbps counts only the fused kernel's bytes (useful bytes); eager moves ~n_ops times more"
    entry["eager_forward"] = eager
    if ctx.cuda and not ctx.over_budget(f"section 2 {model_name}: torch.compile forward"):
        def compiled_forward():
            dynamo_reset()
            compiled = torch.compile(copy.deepcopy(model), dynamic=False)
            with torch.no_grad():
                compiled(bufs[0])
            r = _bw(device_times_us(lambda i: compiled(bufs[i % nbufs]), ctx, iters=ctx.args.bw_iters, warmup=5),
                    nbytes)
            r["ratio_vs_copy"] = r["tbps"] / copy_tbps if r["tbps"] and copy_tbps else None
            return r

        entry["compile_default_forward"] = ctx.attempt(f"section 2 {model_name}: torch.compile forward",
                                                       compiled_forward)
        dynamo_reset()
    opt = kernel = bufs = model = None  # drop the references (the closures above hold them too) before freeing
    free_memory(ctx)
    return entry


def section_bandwidth(ctx: Ctx, out: dict[str, Any]) -> dict[str, Any]:
    from fxopt.models import ElementwiseChain, ReluSigmoid

    numel = ctx.args.bw_numel or ((1 << 26) if ctx.cuda else (1 << 20))
    nbufs = 3
    out.update({"numel": numel, "dtype": "float32", "buffers_rotated": nbufs, "iters": ctx.args.bw_iters,
                "bytes_rule": "read + written (one input, one output, 4 B each)"})
    if not ctx.cuda:
        out["note"] = "cpu: host wall time per call, smaller size; GPU bandwidth needs --device cuda"
    log(f"section 2: copy of {numel} floats")
    out["copy"] = ctx.attempt("section 2: copy", measure_copy_bw, ctx, numel, nbufs)
    free_memory(ctx)
    copy_tbps = out["copy"].get("tbps")
    out["kernels"] = {}
    for model_name, cls in [("elementwise_chain", ElementwiseChain), ("relu_sigmoid", ReluSigmoid)]:
        if ctx.over_budget(f"section 2: {model_name}"):
            out["kernels"][model_name] = {"skipped": "budget"}
            continue
        log(f"section 2: fused kernel of {model_name} on {numel} floats")
        out["kernels"][model_name] = ctx.attempt(f"section 2: {model_name}", measure_fused_bw, ctx, model_name, cls,
                                                 numel, nbufs, copy_tbps)
        free_memory(ctx)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Section 3: host cost per call without CUDA graphs


def section_host_cost(ctx: Ctx, out: dict[str, Any]) -> dict[str, Any]:
    import fxopt
    from fxopt.models import ReluSigmoid

    n, repeats = ctx.args.host_n, ctx.args.host_repeats
    model = ReluSigmoid().eval().to(ctx.device)
    x = fresh_input((1, 1024), ctx, seed=300)
    opt = fxopt.optimize(model, (x,), backend=ctx.backend)
    spec = opt.specializations[-1]
    if len(spec.kernels) != 1:
        raise RuntimeError(f"expected one fused kernel for relu->sigmoid, got {kernel_info(spec.kernels)}")
    kernel = next(iter(spec.kernels.values()))
    name = kernel.name
    op = torch.ops.fxopt.fused.default
    cases: dict[str, Callable[[], Any]] = {
        "a_eager_relu": lambda: torch.relu(x),
        "b_fused_kernel_direct": lambda: kernel([x]),
        "c_custom_op": lambda: op(name, [x]),
        "d_optimized_module": lambda: opt(x),
        "e_eager_relu_sigmoid_2ops": lambda: torch.sigmoid(torch.relu(x)),
        "f_eager_module": lambda: model(x),
    }
    descriptions = {
        "a_eager_relu": "torch.relu(x)", "b_fused_kernel_direct": "FusedKernel([x]) (relu->sigmoid)",
        "c_custom_op": "torch.ops.fxopt.fused.default(name, [x])", "d_optimized_module": "opt(x)",
        "e_eager_relu_sigmoid_2ops": "torch.sigmoid(torch.relu(x))", "f_eager_module": "ReluSigmoid()(x) eager",
    }
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    with torch.no_grad():
        ref = model(x)
        errs = {k: max_abs_err(f(), ref) for k, f in cases.items() if k != "a_eager_relu"}
        for _ in range(repeats):  # round-robin over the cases, so drift hits them all alike
            for key, f in cases.items():
                for _ in range(100):
                    f()
                sync(ctx)
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                t_issue = time.perf_counter()
                sync(ctx)
                t1 = time.perf_counter()
                samples[key].append(((t1 - t0) / n * 1e6, (t_issue - t0) / n * 1e6))
    out.update({"n_calls": n, "repeats": repeats, "shape": [1, 1024], "kernel": name,
                "method": "N back-to-back calls, sync only at the end; µs/call = wall / N "
                          "(median over repeats)", "cases": {}})
    for key, s in samples.items():
        walls, issues = [w for w, _ in s], [i for _, i in s]
        out["cases"][key] = {"what": descriptions[key], "us_per_call": statistics.median(walls),
                             "us_per_call_min": min(walls), "issue_us_per_call": statistics.median(issues),
                             "all_us_per_call": walls, "max_abs_err_vs_eager": errs.get(key)}
    base = out["cases"]["a_eager_relu"]["us_per_call"]
    for c in out["cases"].values():
        c["vs_one_eager_op"] = c["us_per_call"] / base if base else None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Section 4: optimize time, cold and cached, vs torch.compile's first call (fresh subprocesses)

# Both children import torch._dynamo before their timers start and report it apart (dynamo_import_s): torch imports
# it inside torch.compile(model), before the first call, and on the first TorchDispatchMode, which fxopt's
# per-pass dispatched-op count enters during optimize. Timed inside only one of the two, it biased the comparison.
FXOPT_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import fxopt
from fxopt import models
import_s = time.perf_counter() - t0
t0 = time.perf_counter()
import torch._dynamo
dynamo_import_s = time.perf_counter() - t0
name, device, backend = sys.argv[1], sys.argv[2], sys.argv[3]
dev = torch.device(device)
model, inputs = models.get(name).build(device=dev)
if dev.type == "cuda":
    torch.cuda.synchronize()
t1 = time.perf_counter()
opt = fxopt.optimize(model, inputs, backend=backend)
if dev.type == "cuda":
    torch.cuda.synchronize()
wall = time.perf_counter() - t1
spec = opt.specializations[-1]
print("BENCH_RESULT " + json.dumps({"optimize_wall_s": wall, "optimize_s": spec.seconds, "import_s": import_s,
                                    "dynamo_import_s": dynamo_import_s, "kernels": len(spec.kernels),
                                    "backend": spec.backend}), flush=True)
"""

COMPILE_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from fxopt import models
import_s = time.perf_counter() - t0
t0 = time.perf_counter()
import torch._dynamo
dynamo_import_s = time.perf_counter() - t0
name, device = sys.argv[1], sys.argv[2]
dev = torch.device(device)
model, inputs = models.get(name).build(device=dev)
if dev.type == "cuda":
    torch.cuda.synchronize()
t0 = time.perf_counter()
compiled = torch.compile(model)
wrap_s = time.perf_counter() - t0
with torch.no_grad():
    t1 = time.perf_counter()
    compiled(*inputs)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t1
    t2 = time.perf_counter()
    compiled(*inputs)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    second = time.perf_counter() - t2
result = {"first_call_s": first, "second_call_s": second, "import_s": import_s, "dynamo_import_s": dynamo_import_s,
          "compile_wrap_s": wrap_s}
try:
    from torch._dynamo.utils import counters
    result["dynamo_unique_graphs"] = counters["stats"]["unique_graphs"]
    result["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
except Exception:
    pass
print("BENCH_RESULT " + json.dumps(result), flush=True)
"""


def run_child(ctx: Ctx, code: str, argv: list[str], env_extra: dict[str, str], what: str) -> dict[str, Any]:
    timeout = max(5.0, min(ctx.args.child_timeout_s, ctx.budget.left() + 30))
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=str(REPO), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ctx.error(what, TimeoutError(f"subprocess exceeded {timeout:.0f} s"))
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return {**json.loads(line[len(RESULT_MARK):]), "process_wall_s": wall}
    tail = (proc.stderr or proc.stdout or "")[-1500:]
    return ctx.error(what, RuntimeError(f"subprocess rc={proc.returncode}, no result; output tail: {tail}"))


def _count_files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def optimize_cold_inprocess(ctx: Ctx, name: str, cache: Path) -> dict[str, Any]:
    """First fxopt.optimize with an empty on-disk cache and the in-memory caches cleared (process already warm)."""
    import fxopt
    from fxopt import models
    from fxopt.runtime import cc, kernel as kernel_mod, nvrtc

    os.environ["FXOPT_CACHE_DIR"] = str(cache)
    nvrtc.clear_memory_cache()
    cc.clear_memory_cache()
    kernel_mod.KERNELS.clear()
    model, inputs = models.get(name).build(device=ctx.device)
    sync(ctx)
    t0 = time.perf_counter()
    opt = fxopt.optimize(model, inputs, backend=ctx.backend)
    sync(ctx)
    wall = time.perf_counter() - t0
    spec = opt.specializations[-1]
    return {"optimize_wall_s": wall, "optimize_s": spec.seconds, "kernels": len(spec.kernels),
            "backend": spec.backend, "cache_files_written": _count_files(cache)}


def section_optimize_time(ctx: Ctx, out: dict[str, Any]) -> dict[str, Any]:
    from fxopt import models

    run_cache = os.environ["FXOPT_CACHE_DIR"]
    out.update({
        "method": {
            "cold_inprocess": "first fxopt.optimize in this (warm) process: fresh FXOPT_CACHE_DIR, nvrtc/cc memory "
                              "caches and KERNELS cleared (loaded CUDA modules stay)",
            "cold_subprocess": "fxopt.optimize in a fresh `python -c` with a fresh, empty FXOPT_CACHE_DIR",
            "cached_subprocess": "fxopt.optimize in a fresh `python -c` reusing cold_inprocess's cache dir "
                                 "(memory caches empty, disk warm)",
            "torch_compile_subprocess": "first compiled(x) incl. sync in a fresh `python -c`, "
                                        "TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR fresh, "
                                        "TORCHINDUCTOR_FX_GRAPH_CACHE=0, TORCHINDUCTOR_AUTOGRAD_CACHE=0",
            "times": "optimize_s = Specialization.seconds; optimize_wall_s = wall around fxopt.optimize incl. sync; "
                     "children also report import_s and process_wall_s",
        },
        "models": {},
    })
    dev = str(ctx.device)
    names = models.names()
    try:
        for name in names:
            if ctx.over_budget(f"section 4: fxopt {name}"):
                out["models"][name] = {"skipped": "budget"}
                continue
            log(f"section 4: fxopt optimize time, {name}")
            entry: dict[str, Any] = {}
            out["models"][name] = entry
            cache_a = ctx.tmp_root / f"fxopt_cache_{name}_a"
            entry["cold_inprocess"] = ctx.attempt(f"section 4 {name}: cold in-process", optimize_cold_inprocess,
                                                  ctx, name, cache_a)
            free_memory(ctx)
            before = _count_files(cache_a)
            entry["cached_subprocess"] = run_child(ctx, FXOPT_CHILD, [name, dev, ctx.backend],
                                                   {"FXOPT_CACHE_DIR": str(cache_a)},
                                                   f"section 4 {name}: cached subprocess")
            # > 0 means the cached run missed the disk cache and compiled something
            entry["cached_subprocess"]["cache_files_added"] = _count_files(cache_a) - before
    finally:
        os.environ["FXOPT_CACHE_DIR"] = run_cache
    # Lower priority, so a tight budget cuts these first: torch.compile first calls, then fxopt cold subprocesses.
    if ctx.args.quick:
        out["torch_compile"] = ctx.skip("section 4: torch.compile first-call times", "--quick")
    else:
        for name in names:
            entry = out["models"].setdefault(name, {})
            if ctx.over_budget(f"section 4: torch.compile {name}"):
                entry["torch_compile_subprocess"] = {"skipped": "budget"}
                continue
            log(f"section 4: torch.compile first call, {name}")
            ind = ctx.tmp_root / f"inductor_{name}"
            entry["torch_compile_subprocess"] = run_child(
                ctx, COMPILE_CHILD, [name, dev],
                {"TORCHINDUCTOR_CACHE_DIR": str(ind), "TRITON_CACHE_DIR": str(ind / "triton"),
                 "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"},
                f"section 4 {name}: torch.compile subprocess")
    for name in names:
        entry = out["models"].setdefault(name, {})
        if ctx.args.quick:
            entry["cold_subprocess"] = {"skipped": "--quick"}
            continue
        if ctx.over_budget(f"section 4: fxopt {name} cold subprocess"):
            entry["cold_subprocess"] = {"skipped": "budget"}
            continue
        log(f"section 4: fxopt cold subprocess, {name}")
        entry["cold_subprocess"] = run_child(ctx, FXOPT_CHILD, [name, dev, ctx.backend],
                                             {"FXOPT_CACHE_DIR": str(ctx.tmp_root / f"fxopt_cache_{name}_b")},
                                             f"section 4 {name}: cold subprocess")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Section 5: kernels per forward for every zoo model


def zoo_model_counts(ctx: Ctx, name: str) -> dict[str, Any]:
    import fxopt
    from fxopt import models

    model, inputs = models.get(name).build(device=ctx.device)
    entry: dict[str, Any] = {"input_shapes": [list(t.shape) for t in inputs]}
    with torch.no_grad():
        ref = model(*inputs)
    entry["eager"] = ctx.attempt(f"section 5 {name}: eager", launch_counts, model, inputs, ctx, dispatch=True)

    def compiled_counts():
        dynamo_reset()
        compiled = torch.compile(copy.deepcopy(model), dynamic=False)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = compiled(*inputs)
            sync(ctx)
            first = time.perf_counter() - t0
        r = {"first_call_s": first, "max_abs_err_vs_eager": max_abs_err(out, ref), **dynamo_stats()}
        r.update(launch_counts(compiled, inputs, ctx, dispatch=False))
        return r

    if ctx.over_budget(f"section 5 {name}: torch.compile"):
        entry["compile_default"] = {"skipped": "budget"}
    else:
        entry["compile_default"] = ctx.attempt(f"section 5 {name}: torch.compile", compiled_counts)
        dynamo_reset()

    def fxopt_counts():
        from fxopt.verify import max_relative_error

        opt = fxopt.optimize(model, inputs, backend=ctx.backend)
        spec = opt.specializations[-1]
        with torch.no_grad():
            out = opt(*inputs)
        r = {"optimize_s": spec.seconds, "kernels": kernel_info(spec.kernels),
             "passes": [(rec.name, rec.status, rec.error) for rec in spec.records],
             "max_abs_err_vs_eager": max_abs_err(out, ref), "max_rel_err_vs_eager": max_relative_error(out, ref)}
        r.update(launch_counts(opt, inputs, ctx, dispatch=True))
        return r

    entry["fxopt"] = ctx.attempt(f"section 5 {name}: fxopt", fxopt_counts)
    return entry


def section_zoo_kernels(ctx: Ctx, out: dict[str, Any]) -> dict[str, Any]:
    from fxopt import models

    out.update({"models": {}})
    if not ctx.cuda:
        out["note"] = "cpu: cuda_kernels are None; dispatched ATen ops are still counted for eager and fxopt"
    for name in models.names():
        if ctx.over_budget(f"section 5: {name}"):
            out["models"][name] = {"skipped": "budget"}
            continue
        log(f"section 5: kernels per forward, {name}")
        out["models"][name] = ctx.attempt(f"section 5: {name}", zoo_model_counts, ctx, name)
        free_memory(ctx)
    return out


SECTIONS: dict[int, Callable[[Ctx], dict[str, Any]]] = {
    1: section_latency, 2: section_bandwidth, 3: section_host_cost, 4: section_optimize_time, 5: section_zoo_kernels,
}


# ----------------------------------------------------------------------------------------------------------------
# Environment, output, summary


def _git_commit() -> str | None:
    """``git describe --always --dirty`` of the checkout, from the one place every report and benchmark takes it."""
    try:
        from fxopt.report.measure import git_describe

        return git_describe()
    except Exception:  # noqa: BLE001 -- informational only
        return None


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return None


def gather_environment(ctx: Ctx) -> dict[str, Any]:
    import fxopt

    env: dict[str, Any] = {}
    try:
        from fxopt.report.measure import environment

        env.update(environment(ctx.device))
    except Exception as e:  # noqa: BLE001
        env["environment_error"] = ctx.error("environment()", e)["error"]
        env.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   torch=torch.__version__, python=platform.python_version(), device=str(ctx.device))
    env.update(cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), fxopt=fxopt.__version__,
               triton=_version("triton"), torchvision=_version("torchvision"), git_commit=_git_commit(),
               python_executable=sys.executable, backend=ctx.backend, argv=sys.argv,
               fxopt_cache_dir=os.environ.get("FXOPT_CACHE_DIR"))
    if ctx.cuda:
        try:
            from fxopt.runtime import nvrtc

            env["nvrtc_version"] = ".".join(map(str, nvrtc.nvrtc_version()))
            env["nvrtc_library"] = nvrtc.nvrtc_library_path()
        except Exception as e:  # noqa: BLE001
            env["nvrtc_error"] = f"{type(e).__name__}: {e}"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:300]
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = f"{type(e).__name__}: {e}"
        try:
            free, total = torch.cuda.mem_get_info(ctx.device)
            env["gpu_mem_total_gib"] = round(total / 2**30, 1)
        except Exception:  # noqa: BLE001
            pass
    return env


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf as strings, unknown objects via str()."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_json(ctx: Ctx) -> None:
    ctx.results["elapsed_s"] = ctx.budget.elapsed()
    try:
        ctx.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ctx.out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(ctx.results), indent=1))
        os.replace(tmp, ctx.out_path)
    except Exception as e:  # noqa: BLE001
        log(f"ERROR writing {ctx.out_path}: {type(e).__name__}: {e}")


def _table(rows: list[list[Any]], head: list[str]) -> str:
    try:
        from tabulate import tabulate

        return tabulate(rows, head)
    except ImportError:
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])] +
                         [fmt.format(*map(str, r)) for r in rows])


def _f(v: Any, spec: str = ".1f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _why(d: Any) -> str:
    if not isinstance(d, dict):
        return "-"
    if "error" in d:
        return "ERR"
    if "skipped" in d:
        return "skip"
    return "-"


def _kern(d: Any) -> str:
    if not isinstance(d, dict):
        return "-"
    if d.get("cuda_kernels") is not None:
        return str(d["cuda_kernels"])
    return _why(d)


def summary(results: dict[str, Any]) -> str:
    parts: list[str] = []
    env = results.get("environment", {})
    parts.append(f"fxopt bench_fusion  {env.get('date')}  {env.get('device_name')} ({env.get('device')})  "
                 f"torch {env.get('torch')}  CUDA {env.get('cuda')}  backend {env.get('backend')}")
    secs = results.get("sections", {})

    s = secs.get("1_latency")
    if isinstance(s, dict) and "configs" in s:
        rows = []
        for c in s["configs"]:
            label = f"{c['model']} {'x'.join(map(str, c['shape']))}"
            for sys_name, e in (c.get("systems") or {}).items():
                lat = e.get("latency") if isinstance(e, dict) else None
                lat = lat if isinstance(lat, dict) and "median_us" in lat else {}
                ln = e.get("launches") if isinstance(e, dict) else None
                rows.append([label, sys_name, _kern(ln),
                             ln.get("cuda_launch_calls") if isinstance(ln, dict) and
                             ln.get("cuda_launch_calls") is not None else "-",
                             ln.get("dispatched") if isinstance(ln, dict) and ln.get("dispatched") is not None
                             else "-",
                             _f((lat.get("spread") or {}).get("q1")), _f(lat.get("median_us")),
                             _f((lat.get("spread") or {}).get("q3")),
                             lat.get("calls", _why(e) if not lat else "-"),
                             _f(e.get("max_abs_err_vs_eager"), ".1e") if isinstance(e, dict) else "-"])
            if not c.get("systems"):
                rows.append([label, "-", _why(c), "-", "-", "-", "-", "-", "-", "-"])
        parts.append("\n[1] kernels per forward and latency (µs, synchronized per call, systems interleaved; "
                     "median and quartiles of the per-round medians)\n" + _table(
            rows, ["config", "system", "GPU kernels", "launch calls", "dispatched", "round q1", "median", "round q3",
                   "calls", "max abs err"]))
    elif s is not None:
        parts.append(f"\n[1] {s}")

    s = secs.get("2_bandwidth")
    if isinstance(s, dict) and "numel" in s:
        rows = []
        cp = s.get("copy", {})
        rows.append(["copy_ dst<-src", "-", _f(cp.get("median_us")), _f(cp.get("bytes", 0) / 1e6, ".0f"),
                     _f(cp.get("tbps"), ".3f"), "1.00" if cp.get("tbps") else _why(cp)])
        for name, k in (s.get("kernels") or {}).items():
            if not isinstance(k, dict) or "fused_kernel" not in k:
                rows.append([f"{name} fused", "-", "-", "-", "-", _why(k)])
                continue
            fk = k["fused_kernel"]
            rows.append([f"{name} fused kernel", k.get("n_ops"), _f(fk.get("median_us")),
                         _f(fk.get("bytes", 0) / 1e6, ".0f"), _f(fk.get("tbps"), ".3f"),
                         _f(fk.get("ratio_vs_copy"), ".2f")])
            for label, key in (("eager fwd", "eager_forward"), ("compile fwd", "compile_default_forward")):
                e = k.get(key)
                if isinstance(e, dict) and "median_us" in e:
                    ratio = e["tbps"] / cp["tbps"] if e.get("tbps") and cp.get("tbps") else None
                    rows.append([f"{name} {label}", "-", _f(e.get("median_us")), _f(e.get("bytes", 0) / 1e6, ".0f"),
                                 _f(e.get("tbps"), ".3f"), _f(ratio, ".2f")])
                elif e is not None:
                    rows.append([f"{name} {label}", "-", "-", "-", "-", _why(e)])
        parts.append(f"\n[2] bandwidth on {s['numel']} float32 (median µs; useful bytes = read + written)\n" +
                     _table(rows, ["what", "ops", "median µs", "MB moved", "TB/s", "vs copy"]))

    s = secs.get("3_host_cost")
    if isinstance(s, dict) and "cases" in s:
        rows = [[k, c["what"], _f(c["us_per_call"], ".2f"), _f(c["issue_us_per_call"], ".2f"),
                 _f(c["vs_one_eager_op"], ".2f")] for k, c in s["cases"].items()]
        parts.append(f"\n[3] host cost, {s['n_calls']} back-to-back calls, sync at the end (median of "
                     f"{s['repeats']})\n" + _table(rows, ["case", "call", "µs/call", "issue µs/call", "vs relu"]))
    elif s is not None:
        parts.append(f"\n[3] {s}")

    s = secs.get("4_optimize_time")
    if isinstance(s, dict) and "models" in s:
        rows = []
        for name, e in s["models"].items():
            def g(key, field):
                d = e.get(key) if isinstance(e, dict) else None
                return _f(d.get(field), ".2f") if isinstance(d, dict) and field in d else _why(d)
            rows.append([name, g("cold_inprocess", "optimize_s"), g("cold_subprocess", "optimize_s"),
                         g("cached_subprocess", "optimize_s"), g("torch_compile_subprocess", "first_call_s")])
        parts.append("\n[4] time to optimize (s): fxopt.optimize vs torch.compile first call\n" + _table(
            rows, ["model", "fxopt cold (in-proc)", "fxopt cold (subproc)", "fxopt cached (subproc)",
                   "torch.compile 1st call"]))

    s = secs.get("5_zoo_kernels")
    if isinstance(s, dict) and "models" in s:
        rows = []
        for name, e in s["models"].items():
            if not isinstance(e, dict) or "eager" not in e:
                rows.append([name, _why(e), "-", "-", "-", "-"])
                continue
            ea, co, fx = e.get("eager", {}), e.get("compile_default", {}), e.get("fxopt", {})
            rows.append([name, _kern(ea), _kern(co), _kern(fx),
                         ea.get("dispatched", _why(ea)) if isinstance(ea, dict) else "-",
                         fx.get("dispatched", _why(fx)) if isinstance(fx, dict) else "-"])
        parts.append("\n[5] per forward: GPU kernels (eager / torch.compile / fxopt) and dispatched ATen ops\n" +
                     _table(rows, ["model", "eager kernels", "compile kernels", "fxopt kernels", "eager dispatched",
                                   "fxopt dispatched"]))

    for key, what in (("skipped", "skipped"), ("errors", "errors")):
        items = results.get(key) or []
        if items:
            parts.append(f"\n{what} ({len(items)}):")
            for it in items:
                parts.append(f"  - {it.get('what') or it.get('where')}: {it.get('why') or it.get('error')}"[:300])
    parts.append(f"\nelapsed {results.get('elapsed_s', 0):.0f} s")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backend", default=None, help="fxopt backend (default: cuda on GPU, cpp on CPU)")
    p.add_argument("--quick", action="store_true",
                   help="fewer calls; skip torch.compile timing and the cold-subprocess fxopt timing in section 4")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what is left after this many seconds")
    p.add_argument("--grace-s", type=float, default=60.0, help="hard stop (partial JSON kept) at budget + grace")
    p.add_argument("--out", default=None, help="output directory (default: $OUT, else reports/)")
    p.add_argument("--sections", default="1,2,3,5,4", help="sections to run, in this order (default 1,2,3,5,4)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per system in section 1 (default 1000, "
                                                            "quick 200)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 50, quick 10)")
    p.add_argument("--max-s-per-system", type=float, default=None,
                   help="section 1: no new round of interleaved timing after this long per system, once 3 rounds "
                        "ran (default 2, quick 0.5)")
    p.add_argument("--rounds", type=int, default=10,
                   help="section 1: rounds of interleaved timing (each system one block per round; default 10)")
    p.add_argument("--bw-numel", type=int, default=None, help="section 2 size (default 1<<26 on GPU, 1<<20 on CPU)")
    p.add_argument("--bw-iters", type=int, default=None, help="timed kernel calls in section 2 (default 50, CPU 10)")
    p.add_argument("--host-n", type=int, default=2000, help="back-to-back calls per series in section 3")
    p.add_argument("--host-repeats", type=int, default=5, help="series per case in section 3")
    p.add_argument("--child-timeout-s", type=float, default=180.0, help="limit per subprocess in section 4")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary cache directories")
    args = p.parse_args(argv)
    try:
        args.section_list = [int(s) for s in args.sections.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sections takes comma-separated numbers 1-5, got {args.sections!r}")
    bad = [s for s in args.section_list if s not in SECTIONS]
    if bad:
        p.error(f"unknown sections {bad}; known: 1-5")
    if args.iters is None:
        args.iters = 200 if args.quick else 1000
    if args.warmup is None:
        args.warmup = 10 if args.quick else 50
    if args.max_s_per_system is None:
        args.max_s_per_system = 0.5 if args.quick else 2.0
    if args.quick:
        args.host_repeats = min(args.host_repeats, 3)
    return args


def finish_args(args: argparse.Namespace, device: torch.device) -> None:
    if args.bw_iters is None:
        args.bw_iters = 50 if device.type == "cuda" else 10


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                         f"cuda {torch.version.cuda}); use --device cpu")
    return dev


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    finish_args(args, device)
    backend = args.backend or ("cuda" if device.type == "cuda" else "cpp")
    tmp_root = Path(tempfile.mkdtemp(prefix="bench_fusion_"))
    # A fresh kernel cache for the whole run, set before fxopt compiles anything (cache_dir() reads it per call).
    os.environ["FXOPT_CACHE_DIR"] = str(tmp_root / "fxopt_cache_run")
    out_dir = Path(args.out or os.environ.get("OUT") or (REPO / "reports"))
    results: dict[str, Any] = {"schema": SCHEMA, "environment": {}, "args": {k: v for k, v in vars(args).items()},
                               "sections": {}, "skipped": [], "errors": []}
    ctx = Ctx(args, device, backend, budget, tmp_root, results, out_dir / "bench_fusion.json", args.iters,
              args.warmup)
    log(f"bench_fusion: device {device}, backend {backend}, sections {args.section_list}, budget {args.budget_s:.0f} s,"
        f" out {ctx.out_path}")

    def on_alarm(signum, frame):
        raise HardStop(f"hard stop at budget + grace ({args.budget_s + args.grace_s:.0f} s)")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(max(1, int(args.budget_s + args.grace_s)))
    try:
        try:
            import fxopt  # noqa: F401  (after FXOPT_CACHE_DIR is set)

            results["environment"] = gather_environment(ctx)
        except Exception as e:  # noqa: BLE001
            ctx.error("import fxopt / environment", e)
        env = results["environment"]
        log(f"environment: {env.get('device_name')} torch {env.get('torch')} cuda {env.get('cuda')} "
            f"triton {env.get('triton')}")
        write_json(ctx)
        for n in args.section_list:
            key = SECTION_KEYS[n]
            if ctx.over_budget(f"section {n} ({key})"):
                results["sections"][key] = {"skipped": "budget"}
                continue
            log(f"=== section {n}: {key}")
            t0 = time.perf_counter()
            # The section fills this dict as it goes, so a hard stop keeps what it measured so far.
            section_out: dict[str, Any] = {"interrupted": True}
            results["sections"][key] = section_out
            got = ctx.attempt(f"section {n}", SECTIONS[n], ctx, section_out)
            if isinstance(got, dict) and "error" in got:
                section_out["error"] = got["error"]
            section_out.pop("interrupted", None)
            section_out["section_s"] = time.perf_counter() - t0
            log(f"=== section {n} done in {time.perf_counter() - t0:.1f} s")
            write_json(ctx)
    except HardStop as e:
        ctx.error("run", e)
        results["hard_stopped"] = True
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
    results["elapsed_s"] = budget.elapsed()
    text = summary(_clean(results))
    results["summary_text"] = text
    write_json(ctx)
    if not args.keep_tmp:
        shutil.rmtree(tmp_root, ignore_errors=True)
    print("\n" + text, flush=True)
    print(f"\nwrote {ctx.out_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
