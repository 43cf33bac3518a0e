"""One model's report: measure every system, then what fxopt did (passes, kernels, floor), as plain data.

The data (``Report.data``) is what MODEL-DEVICE.json holds; its top-level keys are listed in :data:`TOP_LEVEL_KEYS`
and its version in :data:`SCHEMA`. ``Report`` also keeps the objects the files need (the graphs before and after
the passes, the optimized module for the Chrome trace).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..launches import static_count
from . import compiled as compiled_mod
from . import floor as floor_mod
from .measure import UNSTABLE_SPREAD, environment, host_load, measure_interleaved, round_ratios, sync
from .progress import NullProgress, Progress
from .render import NOT_REQUESTED, requested, unstable_note, verdict
from .systems import SYSTEMS, Context, finish_system, prepare_system, release, skipped, unavailable
from .targets import Target, describe_inputs

log = logging.getLogger(__name__)

SCHEMA = "fxopt.report/3"
TOP_LEVEL_KEYS = ("schema", "model", "model_spec", "model_source", "description", "inputs", "environment", "settings",
                  "capture", "backend", "optimize_seconds", "captured_launches", "passes", "kernels", "floor",
                  "systems", "verdicts", "notes", "files", "code")


@dataclass
class Report:
    data: dict[str, Any]
    target: Target
    device: torch.device
    opt: Any = None  # fxopt's OptimizedModule, when optimize() worked
    before: fx.GraphModule | None = None  # the captured graph, before any pass
    after: fx.GraphModule | None = None  # the rewritten graph
    notes: list[str] = field(default_factory=list)


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _warm_device(device: torch.device) -> None:
    """Create cuBLAS/cuDNN handles and workspaces before anything is timed, so eager's first call does not pay for
    every system."""
    if device.type != "cuda":
        return
    a = torch.randn(64, 64, device=device)
    (a @ a).relu_()
    torch.nn.functional.conv2d(a.view(1, 1, 64, 64), torch.randn(1, 1, 3, 3, device=device))
    sync(device)


def _float_dtype(inputs: Sequence[Any], model: torch.nn.Module) -> torch.dtype:
    for x in list(inputs) + list(model.parameters()):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.dtype
    return torch.float32


def steps_for(systems: Sequence[str]) -> int:
    """How many progress steps :func:`run_report` takes for these systems (2 per system, 2 for the native call path
    and the timing, 4 for the analysis)."""
    return 2 * len(systems) + 6


ROUNDS = 15  # rounds of interleaved timing (NOTE [Interleaved timing]); each system runs one block per round
BLOCK_S = 0.03  # the least time a system's block of calls lasts in each round
TIMING_BUDGET_S = 30.0  # no new round after this long (after MIN_ROUNDS): a loaded host must not take minutes


def run_report(target: Target, device: torch.device, *, iters: int = 100, warmup: int = 10, backend: str = "auto",
               enable: Sequence[str] = (), systems: Sequence[str] | None = None, recalibrate: bool = False, progress: Progress | None = None,
               rounds: int = ROUNDS, block_s: float = BLOCK_S, budget_s: float | None = TIMING_BUDGET_S,
               threads: int | None = None, choose_layout: bool = False) -> Report:
    """Measure ``target`` with each of ``systems`` (default all; eager always) and analyse fxopt's result.

    Every system is built and called once first; then fxopt's native call path is finished and Inductor's compile
    workers stopped, and only then are the systems timed, together, in ``rounds`` interleaved rounds (NOTE
    [Interleaved timing] in measure.py): at least ``iters`` calls each and at least ``block_s`` seconds per round,
    no new round after ``budget_s``. ``threads`` sets torch's (and ONNX Runtime's) CPU threads for the run;
    ``enable`` names opt-in passes for fxopt's systems; ``choose_layout`` is optimize's (NOTE [Layout by
    measurement])."""
    progress = progress or NullProgress()
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_report(target, device, iters=iters, warmup=warmup, backend=backend, enable=tuple(enable),
                           choose_layout=choose_layout, systems=systems,
                           recalibrate=recalibrate, progress=progress, rounds=rounds, block_s=block_s,
                           budget_s=budget_s)
    finally:
        torch.set_num_threads(saved_threads)


def _run_report(target: Target, device: torch.device, *, iters: int, warmup: int, backend: str, enable: tuple,
                choose_layout: bool, systems: Sequence[str] | None, recalibrate: bool, progress: Progress, rounds: int, block_s: float,
                budget_s: float | None) -> Report:
    wanted = ["eager"] + [n for n in (systems if systems is not None else list(SYSTEMS)) if n != "eager"]
    model, inputs = target.model, target.inputs
    data: dict[str, Any] = {
        "schema": SCHEMA, "model": target.name, "model_spec": target.spec or target.name,
        "model_source": target.source or None, "description": target.description,
        "inputs": describe_inputs(inputs), "environment": environment(device),
        "settings": {"iters": iters, "warmup": warmup, "rounds": rounds, "block_s": block_s, "budget_s": budget_s,
                     "backend": backend, "enable": list(enable), "choose_layout": choose_layout, "systems": wanted, "recalibrate": recalibrate,
                     "cpu_threads": torch.get_num_threads(), "timing": _TIMING, "unstable_spread": UNSTABLE_SPREAD},
        "capture": None, "backend": None, "optimize_seconds": None, "captured_launches": None, "passes": [],
        "kernels": {}, "floor": None, "systems": {}, "verdicts": [], "notes": [], "files": {}, "code": None,
    }
    report = Report(data, target, device, notes=data["notes"])
    _warm_device(device)
    progress.step("fxopt: native call path")
    # built on a background thread the first time fxopt makes a kernel: finished here, before anything is timed or
    # optimized, so no compiler competes with the timing and fxopt's kernels are timed on the call path they keep
    data["settings"]["native_call"] = compiled_mod.finish_native_build(announce=progress.line)

    ctx = Context(model, inputs, device, backend, enable, choose_layout)
    if any(SYSTEMS[n].dynamo for n in wanted if unavailable(SYSTEMS[n], device) is None):
        compiled_mod.dynamo_reset()  # once, before the first compile (NOTE [One Dynamo cache for every system])
    prepared = []
    for name, system in SYSTEMS.items():
        if name not in wanted:  # a system that could not run here anyway says why, not that it was left out
            data["systems"][name] = skipped(system, unavailable(system, device) or
                                            f"{NOT_REQUESTED} (--systems / --skip)")
            continue
        start = progress.done
        p = prepare_system(system, ctx, step=progress.step, progress=progress)
        data["systems"][name] = p.entry
        prepared.append(p)
        progress.done = min(progress.total, start + 2)  # prepare_system takes up to 2 steps: count 2 in any case
    try:
        _time_interleaved(report, ctx, prepared, iters=iters, warmup=warmup, rounds=rounds, block_s=block_s,
                          budget_s=budget_s, progress=progress)
    finally:
        release(prepared, device)

    progress.step("fxopt: passes and kernels")
    _analyse_fxopt(report, ctx)
    progress.step("floor")
    _floor(report, ctx)
    progress.step("kernel GPU times")
    _kernel_times(report)
    progress.step("verdicts")
    _derive(report)
    return report


_TIMING = ("interleaved: every system built and called once, then timed in rounds, one block of calls per system "
           "per round in rotated order; latency = median of the per-round medians, speedup over eager = median of "
           "the per-round ratios; spread = their interquartile range over the rounds")


def _time_interleaved(report: Report, ctx: Context, prepared: list, *, iters: int, warmup: int, rounds: int,
                      block_s: float, budget_s: float | None, progress: Progress) -> None:
    """Time every prepared system together (NOTE [Interleaved timing]) and finish their rows."""
    stopped = compiled_mod.shutdown_compile_workers()
    report.data["settings"]["compile_workers_stopped"] = stopped
    # a kernel made after the first wait (a system built later) may have started the build: finish it too
    report.data["settings"]["native_call"] = compiled_mod.finish_native_build(announce=progress.line)
    ready = {p.system.name: p.fn for p in prepared if p.fn is not None}
    progress.step(f"latency: {len(ready)} systems interleaved, {rounds} rounds")
    failures: dict[str, BaseException] = {}
    load_before = host_load()
    t0 = time.perf_counter()
    with progress.slow(f"timing {len(ready)} systems interleaved ({rounds} rounds)") if len(ready) > 1 \
            else contextlib.nullcontext():
        latencies = measure_interleaved(ready, ctx.inputs, ctx.device, warmup=warmup, iters=iters, rounds=rounds,
                                        min_block_s=block_s, max_seconds=budget_s, failures=failures) if ready else {}
    settings = report.data["settings"]
    settings["timing_seconds"] = time.perf_counter() - t0
    settings["load_average"] = {"before": load_before, "after": host_load()}
    ran = next(iter(latencies.values()), {}).get("rounds", rounds)
    settings["rounds_run"] = ran
    if ran < rounds:
        report.notes.append(f"timing stopped after {ran} of {rounds} rounds: the rounds had taken over "
                            f"{budget_s:.0f} s (calls far slower than their warm-up; see the load average)")
    for p in prepared:
        finish_system(p, ctx, latencies.get(p.system.name), failures.get(p.system.name))
    busy = _busy_host(settings, ctx.device)
    if busy:
        report.notes.append(busy)
    native = settings["native_call"]
    if not native.startswith(("ready", "off")):
        report.notes.append(f"fxopt's native call path is {native}: fxopt's kernels were timed on "
                            f"the Python call path (runtime/native.py)")


def _busy_host(settings: dict[str, Any], device: torch.device) -> str | None:
    """A note when other processes kept the CPU busy while torch ran several threads per op.

    NOTE [Threads on a busy host]: on the 2-core dev machine at load 12, eager SimpleCNN took 166 ms per call with
    torch's 2 threads against 0.46 ms with 1 (a parallel op waits at its barrier for a thread the OS has
    descheduled); ONNX Runtime's spinning threads did not stall. Such figures measure the host, not the systems."""
    load = [v for v in ((settings.get("load_average") or {}).get(k) for k in ("before", "after")) if v]
    cores = os.cpu_count() or 1
    threads = settings.get("cpu_threads") or 1
    if device.type != "cpu" or not load or threads < 2 or max(v[0] for v in load) < cores:
        return None
    return (f"the host was busy while timing (load average {max(v[0] for v in load):.1f} on {cores} cores) and "
            f"torch ran {threads} threads per op: an op waits for a thread the OS has descheduled, so calls stall "
            f"at random; rerun on an idle machine, or with --threads 1 (what these figures mean then: one core "
            f"each)")


def _analyse_fxopt(report: Report, ctx: Context) -> None:
    data = report.data
    opt = ctx.shared.get("fxopt")
    if opt is None:
        from ..api import optimize

        try:  # the fxopt row was not requested or failed before optimize() returned: the analysis needs one
            opt = optimize(ctx.model, ctx.inputs, backend=ctx.backend, enable=ctx.enable,
                           choose_layout=ctx.choose_layout)
        except Exception as e:  # noqa: BLE001 -- reported: the pass and kernel sections say optimize() failed
            report.notes.append(f"fxopt.optimize failed, so there is no pass or kernel analysis: {_error(e)}")
            data["optimize_error"] = {"error": _error(e), "traceback": traceback.format_exc(limit=8)}
            return
    report.opt = opt
    capture = opt.capture_info
    if capture is not None:
        data["capture"] = {"method": capture.method, "attempts": [dict(a.__dict__) for a in capture.attempts]}
    reason = getattr(opt, "unoptimized_reason", None)
    if reason or not opt.specializations:
        report.notes.append(f"fxopt runs this model unoptimized: {reason}")
        return
    spec = opt.specializations[-1]
    data["backend"] = spec.backend
    data["optimize_seconds"] = spec.seconds
    data["passes"] = [r.as_dict() for r in spec.records]
    if spec.records:
        first = spec.records[0]
        data["captured_launches"] = {"static": first.static_before, "dispatched": first.dispatched_before}
    data["code"] = spec.graph_module.code
    report.after = spec.graph_module
    report.before = _annotated_capture(opt, ctx.inputs)
    for node, k in spec.kernels.items():
        region = getattr(k, "region", None)
        data["kernels"][node] = {
            "name": getattr(k, "name", node), "type": type(k).__name__, "backend": getattr(k, "backend", None),
            # the generated entry points are named after the region (<symbol>_flat/_vec/_strided), not the registry
            "symbol": getattr(region, "name", None) or getattr(k, "name", node),
            "ops": list(getattr(k, "op_names", []) or []),
            "input_dtypes": [str(d).replace("torch.", "") for d in getattr(region, "input_dtypes", [])],
            "bytes": None, "flops": None, "floor_us": None, "gpu_us": None, "launches_per_forward": None,
            "achieved_gbps": None, "fraction_of_peak_bandwidth": None,
            "source": getattr(k, "source", None),
        }


def _annotated_capture(opt, inputs: Sequence[Any]) -> fx.GraphModule | None:
    """The graph as captured, before any pass, with shapes (for the picture of the graph before the passes)."""
    captured = getattr(opt, "_captured", None)
    if captured is None:
        return None
    from ..capture import annotate
    from ..passes import snapshot

    try:
        gm = snapshot(captured)
        with torch.no_grad():
            annotate(gm, inputs)
        return gm
    except Exception as e:  # noqa: BLE001 -- only the shapes in a picture are lost
        log.info("annotating the captured graph failed: %s", e)
        return captured


def _floor(report: Report, ctx: Context) -> None:
    data = report.data
    if report.after is None:
        data["floor"] = {"available": False, "reason": "no optimized graph", "nodes": []}
        return
    try:
        costs = floor_mod.node_costs(report.after, ctx.inputs)
    except Exception as e:  # noqa: BLE001 -- reported in the floor section
        data["floor"] = {"available": False, "reason": f"counting bytes and flops failed: {_error(e)}", "nodes": []}
        return
    limits = None
    if ctx.device.type == "cuda":
        try:
            limits = floor_mod.device_limits(ctx.device, _float_dtype(ctx.inputs, ctx.model),
                                             refresh=data["settings"]["recalibrate"])
        except Exception as e:  # noqa: BLE001 -- reported: the floor says why it is missing
            report.notes.append(f"measuring the device's bandwidth and peak rate failed: {_error(e)}")
    fx_entry = data["systems"].get("fxopt", {})
    kernels = (fx_entry.get("launches") or {}).get("cuda_kernels")
    if kernels is None:
        kernels = static_count(report.after)
    floor = floor_mod.compute_floor(costs, limits, kernels)
    if limits is None and ctx.device.type == "cuda":
        floor["reason"] = "the device's limits could not be measured (see the notes)"
    data["floor"] = floor
    by_node = {n["node"]: n for n in floor["nodes"]}
    for node, k in data["kernels"].items():
        cost = by_node.get(node)
        if cost is not None:
            k.update(bytes=cost["bytes"], flops=cost["flops"], floor_us=cost.get("floor_us"))


KERNEL_PROFILE_REPEATS = 10


def _kernel_times(report: Report) -> None:
    data, opt = report.data, report.opt
    if report.device.type != "cuda" or opt is None or not data["kernels"] or report.after is None:
        return
    names = sorted({k["symbol"] for k in data["kernels"].values()})
    try:
        times = floor_mod.kernel_gpu_times(opt, report.target.inputs, names, repeats=KERNEL_PROFILE_REPEATS)
    except Exception as e:  # noqa: BLE001 -- reported; the kernel table keeps its other columns
        report.notes.append(f"profiling fxopt's kernels failed: {_error(e)}")
        return
    limits = (data.get("floor") or {}).get("limits")
    callers: dict[str, list[str]] = {}  # kernel name -> its nodes, in graph order (one kernel may serve several)
    for n in report.after.graph.nodes:
        if n.name in data["kernels"]:
            callers.setdefault(data["kernels"][n.name]["symbol"], []).append(n.name)
    unmatched, uneven = [], []
    for name, nodes in callers.items():
        split = floor_mod.split_launches(times.get(name, []), len(nodes), KERNEL_PROFILE_REPEATS)
        if split is None:
            (uneven if times.get(name) else unmatched).extend(nodes)
            continue
        for node, durations in zip(nodes, split):
            k = data["kernels"][node]
            k["gpu_us"] = sum(durations) / KERNEL_PROFILE_REPEATS
            k["launches_per_forward"] = len(durations) / KERNEL_PROFILE_REPEATS
            if k.get("bytes") and k["gpu_us"] > 0:
                k["achieved_gbps"] = k["bytes"] / (k["gpu_us"] * 1e3)
                if limits:
                    k["fraction_of_peak_bandwidth"] = k["achieved_gbps"] / limits["bandwidth_gbps"]
    if unmatched:
        report.notes.append(f"no GPU kernel event matched the kernel name of {', '.join(unmatched)} (Inductor/Triton "
                            f"and user kernels are named differently): no GPU time shown for them")
    if uneven:
        report.notes.append(f"the launches of {', '.join(uneven)} could not be told apart (nodes sharing a kernel "
                            f"launched it unevenly): no GPU time shown for them")


def _derive(report: Report) -> None:
    data = report.data
    systems = data["systems"]
    eager = systems.get("eager")
    eager_lat = (eager.get("latency") or {}) if eager else {}
    eager_med = eager_lat.get("median_us")
    floor_total = (data.get("floor") or {}).get("total_us")
    for s in systems.values():
        lat = s.get("latency") or {}
        med = lat.get("median_us")
        s["x_floor"] = med / floor_total if med and floor_total else None
        # NOTE [Interleaved timing]: a speedup is the median of the per-round ratios, its spread theirs; eager's
        # spread is that of its own rounds
        s["x_eager_spread"] = round_ratios(eager_lat, lat) if s is not eager and med and eager_med else None
        s["x_eager"] = (s["x_eager_spread"]["median"] if s["x_eager_spread"] else
                        eager_med / med if med and eager_med else None)
        own = s["x_eager_spread"] if s is not eager else lat.get("spread")
        s["unstable"] = bool(own and own["rel_iqr"] > UNSTABLE_SPREAD) if med else None
        err = s.get("max_rel_error")
        if isinstance(err, float) and not math.isfinite(err):
            s["max_rel_error"] = str(err)
    note = unstable_note(data)
    if note:
        report.notes.append(note)
    data["verdicts"] = []
    for s in systems.values():
        s["verdict"] = verdict(s, eager if eager and eager["status"] == "ok" else None)
        if requested(s):
            data["verdicts"].append(s["verdict"])
