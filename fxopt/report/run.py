"""One model's report: measure every system, then what fxopt did (passes, kernels, floor), as plain data.

The data (``Report.data``) is what MODEL-DEVICE.json holds; its top-level keys are listed in :data:`TOP_LEVEL_KEYS`
and its version in :data:`SCHEMA`. ``Report`` also keeps the objects the files need (the graphs before and after
the passes, the optimized module for the Chrome trace).
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..launches import static_count
from . import floor as floor_mod
from .measure import environment, sync
from .progress import NullProgress, Progress
from .render import NOT_REQUESTED, requested, verdict
from .systems import SYSTEMS, Context, run_system, skipped, unavailable
from .targets import Target, describe_inputs

log = logging.getLogger(__name__)

SCHEMA = "fxopt.report/2"
TOP_LEVEL_KEYS = ("schema", "model", "model_spec", "description", "inputs", "environment", "settings", "capture",
                  "backend", "optimize_seconds", "captured_launches", "passes", "kernels", "floor", "systems",
                  "verdicts", "notes", "files", "code")


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
    """How many progress steps :func:`run_report` takes for these systems (3 per system, 4 for the analysis)."""
    return 3 * len(systems) + 4


def run_report(target: Target, device: torch.device, *, iters: int = 100, warmup: int = 10, backend: str = "auto",
               systems: Sequence[str] | None = None, recalibrate: bool = False,
               progress: Progress | None = None) -> Report:
    """Measure ``target`` with each of ``systems`` (default all; eager always) and analyse fxopt's result."""
    progress = progress or NullProgress()
    wanted = ["eager"] + [n for n in (systems if systems is not None else list(SYSTEMS)) if n != "eager"]
    model, inputs = target.model, target.inputs
    data: dict[str, Any] = {
        "schema": SCHEMA, "model": target.name, "model_spec": target.spec or target.name,
        "description": target.description, "inputs": describe_inputs(inputs), "environment": environment(device),
        "settings": {"iters": iters, "warmup": warmup, "backend": backend, "systems": wanted,
                     "recalibrate": recalibrate},
        "capture": None, "backend": None, "optimize_seconds": None, "captured_launches": None, "passes": [],
        "kernels": {}, "floor": None, "systems": {}, "verdicts": [], "notes": [], "files": {}, "code": None,
    }
    report = Report(data, target, device, notes=data["notes"])
    _warm_device(device)

    ctx = Context(model, inputs, device, backend)
    for name, system in SYSTEMS.items():
        if name not in wanted:  # a system that could not run here anyway says why, not that it was left out
            data["systems"][name] = skipped(system, unavailable(system, device) or
                                            f"{NOT_REQUESTED} (--systems / --skip)")
            continue
        start = progress.done
        data["systems"][name] = run_system(system, ctx, iters=iters, warmup=warmup, step=progress.step)
        progress.done = min(progress.total, start + 3)  # run_system takes up to 3 steps: count 3 in any case

    progress.step("fxopt: passes and kernels")
    _analyse_fxopt(report, ctx)
    progress.step("floor")
    _floor(report, ctx)
    progress.step("kernel GPU times")
    _kernel_times(report)
    progress.step("verdicts")
    _derive(report)
    return report


def _analyse_fxopt(report: Report, ctx: Context) -> None:
    data = report.data
    opt = ctx.shared.get("fxopt")
    if opt is None:
        from ..api import optimize

        try:  # the fxopt row was not requested or failed before optimize() returned: the analysis needs one
            opt = optimize(ctx.model, ctx.inputs, backend=ctx.backend)
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
    eager_med = (eager.get("latency") or {}).get("median_us") if eager else None
    floor_total = (data.get("floor") or {}).get("total_us")
    for s in systems.values():
        med = (s.get("latency") or {}).get("median_us")
        s["x_eager"] = eager_med / med if med and eager_med else None
        s["x_floor"] = med / floor_total if med and floor_total else None
        err = s.get("max_rel_error")
        if isinstance(err, float) and not math.isfinite(err):
            s["max_rel_error"] = str(err)
    data["verdicts"] = []
    for s in systems.values():
        s["verdict"] = verdict(s, eager if eager and eager["status"] == "ok" else None)
        if requested(s):
            data["verdicts"].append(s["verdict"])
