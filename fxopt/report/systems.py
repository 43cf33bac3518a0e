"""The systems a report compares, each built from the same model and measured on the same inputs.

A system is a builder ``(ctx) -> (callable, info)``. :func:`run_system` builds it, times the first call (capture +
compile + run), compares its outputs with eager's, counts its launches, times it and reads its peak memory. A system
that cannot run here (needs CUDA, not installed) is *skipped* with the reason; one that raises is *failed* with the
error and the stage it failed in. Neither stops the report.
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from ..launches import count_launches, cuda_profile
from ..verify import max_relative_error
from .measure import allocated_bytes, forward_peak_bytes, free_memory, measure_latency, quiet_profiler, sync

log = logging.getLogger(__name__)


class Skip(Exception):
    """The system cannot run here (not installed, needs CUDA): its row says why instead of measuring."""


@dataclass
class Context:
    """What every builder gets: the model (never changed), its inputs, the device, fxopt's backend option."""

    model: torch.nn.Module
    inputs: tuple
    device: torch.device
    backend: str = "auto"
    reference: Any = None  # eager's outputs, set by the eager system (measured first)
    shared: dict[str, Any] = field(default_factory=dict)  # "fxopt": the OptimizedModule the analysis reuses


Builder = Callable[[Context], "tuple[Callable[..., Any], dict[str, Any]]"]


@dataclass(frozen=True)
class System:
    name: str
    label: str
    description: str
    build: Builder
    needs_cuda: bool = False
    slow: bool = False  # minutes of compilation on a big model: ``--skip slow`` leaves it out
    compiled: bool = False  # runs generated code outside the dispatcher: no dispatched-op count
    describe: Callable[[Any], dict[str, Any]] | None = None  # (the built callable) -> facts known after the runs


# -- builders ----------------------------------------------------------------------------------------------------
def build_eager(ctx: Context):
    return ctx.model, {}


def build_torchscript(ctx: Context):
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(ctx.model).eval(), ctx.inputs)
        frozen = torch.jit.freeze(traced.eval())
        module = torch.jit.optimize_for_inference(frozen)
    return module, {"method": "torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, inputs)))"}


def _dynamo_reset() -> None:
    """Forget compiled code and Dynamo's counters, so each compile starts clean and its graph breaks are its own."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()


def _dynamo_stats(fn: Any = None) -> dict[str, Any]:
    """Graphs compiled and graph breaks since the last reset: a torch.compile that fell back to eager shows here."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": list(counters["graph_break"])[:5]}


def _build_compile(mode: str | None):
    def build(ctx: Context):
        _dynamo_reset()
        kwargs: dict[str, Any] = {"dynamic": False}
        if mode is not None:
            kwargs["mode"] = mode
        return torch.compile(copy.deepcopy(ctx.model), **kwargs), {"mode": mode or "default"}

    return build


def _fxopt_info(opt) -> dict[str, Any]:
    info: dict[str, Any] = {}
    reason = getattr(opt, "unoptimized_reason", None)
    if reason:
        info["note"] = f"runs the original model unoptimized: {reason}"
        return info
    spec = opt.specializations[-1]
    info.update(backend=spec.backend, optimize_seconds=spec.seconds, kernels=len(spec.kernels))
    capture = opt.capture_info
    if capture is not None:
        info["capture"] = capture.method
    return info


def _build_fxopt(**options: Any):
    def build(ctx: Context):
        from ..api import optimize

        kwargs = dict(options)
        kwargs.setdefault("backend", ctx.backend)
        opt = optimize(ctx.model, ctx.inputs, **kwargs)  # an unknown keyword raises TypeError: the row says so
        if not options:
            ctx.shared["fxopt"] = opt
        return opt, _fxopt_info(opt)

    return build


def _cuda_graph_info(opt) -> dict[str, Any]:
    """Whether fxopt's CUDA graph was captured and replayed, or why not (the module then runs without it)."""
    entries = list(getattr(opt, "graph_entries", []) or [])
    info: dict[str, Any] = {"cuda_graphs": [{k: getattr(e, k, None) for k in
                                             ("signature", "status", "reason", "num_nodes", "pool_bytes", "replays",
                                              "replay")}
                                            for e in entries]}
    if not entries:
        info["note"] = getattr(opt, "graph_note", None) or "no CUDA graph was captured"
    elif not any(getattr(e, "captured", False) for e in entries):
        info["note"] = f"CUDA graph not used: {entries[0].reason}"
    return info


def build_tensorrt(ctx: Context):
    try:
        import torch_tensorrt
    except ImportError:
        raise Skip("torch_tensorrt is not installed (pip install torch-tensorrt)") from None
    dtypes = {x.dtype for x in ctx.inputs if isinstance(x, torch.Tensor) and x.is_floating_point()} or {torch.float32}
    with torch.no_grad():
        module = torch_tensorrt.compile(copy.deepcopy(ctx.model).eval(), ir="dynamo", inputs=list(ctx.inputs),
                                        enabled_precisions=dtypes, min_block_size=1)
    return module, {"torch_tensorrt": getattr(torch_tensorrt, "__version__", None), "ir": "dynamo",
                    "precisions": sorted(str(d).replace("torch.", "") for d in dtypes)}


SYSTEMS: dict[str, System] = {s.name: s for s in [
    System("eager", "eager", "the model as written (the reference for errors and speedups)", build_eager),
    System("torchscript", "TorchScript", "torch.jit.trace + freeze + optimize_for_inference", build_torchscript),
    System("compile", "torch.compile", 'torch.compile(model), mode="default" (Inductor)', _build_compile(None),
           slow=True, compiled=True, describe=_dynamo_stats),
    System("compile_reduce_overhead", "torch.compile reduce-overhead",
           'torch.compile(model, mode="reduce-overhead"): Inductor + CUDA graphs', _build_compile("reduce-overhead"),
           needs_cuda=True, slow=True, compiled=True, describe=_dynamo_stats),
    System("fxopt", "fxopt", "fxopt.optimize(model, inputs)", _build_fxopt()),
    System("fxopt_cudagraphs", "fxopt + CUDA graphs", "fxopt.optimize(model, inputs, cuda_graphs=True)",
           _build_fxopt(cuda_graphs=True), needs_cuda=True, describe=_cuda_graph_info),
    System("fxopt_inductor", "fxopt (inductor)", 'fxopt.optimize(model, inputs, backend="inductor")',
           _build_fxopt(backend="inductor"), slow=True),
    System("tensorrt", "TensorRT", 'torch_tensorrt.compile(model, ir="dynamo")', build_tensorrt, needs_cuda=True,
           slow=True, compiled=True),
]}

# Names ``--systems`` / ``--skip`` accept besides the systems' own.
GROUPS: dict[str, list[str]] = {
    "all": list(SYSTEMS),
    "slow": [s.name for s in SYSTEMS.values() if s.slow],
    "cuda": [s.name for s in SYSTEMS.values() if s.needs_cuda],
}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unavailable(system: System, device: torch.device) -> str | None:
    """Why ``system`` cannot run on ``device``, or None."""
    if system.needs_cuda and device.type != "cuda":
        why = "needs CUDA"
        if system.name == "tensorrt" and not _installed("torch_tensorrt"):
            why += " (and torch_tensorrt is not installed)"
        return why
    return None


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
    return msg if len(msg) <= limit else msg[:limit - 1] + "…"


def _detached(out: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, out)


def empty_entry(system: System) -> dict[str, Any]:
    return {"name": system.name, "label": system.label, "description": system.description, "status": "ok",
            "reason": None, "error": None, "stage": None, "traceback": None, "build_s": None, "first_call_s": None,
            "latency": None, "launches": None, "peak_memory_bytes": None, "resident_memory_bytes": None,
            "max_rel_error": None, "info": {}, "warnings": []}


def skipped(system: System, reason: str) -> dict[str, Any]:
    entry = empty_entry(system)
    entry.update(status="skipped", reason=reason)
    return entry


def run_system(system: System, ctx: Context, *, iters: int, warmup: int,
               step: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Build and measure one system; never raises for the system's own failures (the entry says what failed)."""
    entry = empty_entry(system)
    why = unavailable(system, ctx.device)
    if why is not None:
        entry.update(status="skipped", reason=why)
        return entry
    device, inputs = ctx.device, ctx.inputs
    free_memory(device)
    before = allocated_bytes(device)
    stage = "build"
    fn = out = None
    try:
        step(f"{system.name}: build + first call")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            t0 = time.perf_counter()
            fn, info = system.build(ctx)
            entry["build_s"] = time.perf_counter() - t0
            entry["info"].update(info)
            stage = "first call"
            with torch.no_grad():
                out = fn(*inputs)
                sync(device)
            entry["first_call_s"] = time.perf_counter() - t0
        entry["warnings"] = list(dict.fromkeys(str(w.message).splitlines()[0][:300] for w in caught))[:5]
        after = allocated_bytes(device)
        if before is not None and after is not None:
            entry["resident_memory_bytes"] = max(0, after - before)
        stage = "compare with eager"
        if system.name == "eager":
            ctx.reference = _detached(out)
            entry["max_rel_error"] = 0.0
        elif ctx.reference is not None:
            entry["max_rel_error"] = max_relative_error(out, ctx.reference)
        del out
        stage = "launches"
        step(f"{system.name}: launches")
        entry["launches"] = _launches(system, fn, inputs, device)
        stage = "latency"
        step(f"{system.name}: latency")
        entry["latency"] = measure_latency(fn, inputs, device, warmup=warmup, iters=iters)
        stage = "memory"
        entry["peak_memory_bytes"] = forward_peak_bytes(fn, inputs, device)
        if system.describe is not None:
            try:
                entry["info"].update(system.describe(fn))
            except Exception as e:  # noqa: BLE001 -- the measurements stand; only the extra facts are missing
                entry["info"]["describe_error"] = _first_line(e)
    except Skip as e:
        entry.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001 -- the system failed: its row carries the error; the report goes on
        entry.update(status="failed", stage=stage, error=_first_line(e), traceback=traceback.format_exc(limit=8))
    finally:
        fn = out = None
        if system.compiled:
            try:
                _dynamo_reset()  # frees compiled graphs (and reduce-overhead's CUDA-graph pool)
            except Exception as e:  # noqa: BLE001 -- cleanup only; the entry already says what happened
                log.info("torch._dynamo.reset() after %s failed: %s", system.name, e)
        free_memory(device)
    return entry


def _launches(system: System, fn, inputs: tuple, device: torch.device) -> dict[str, Any]:
    if not system.compiled:
        with quiet_profiler():
            return count_launches(fn, inputs).as_dict()
    # Compiled code calls its kernels outside the dispatcher (a TorchDispatchMode would make Dynamo run the model
    # eagerly), so only the GPU profile counts it.
    result: dict[str, Any] = {"static": None, "dispatched": None, "dispatched_by_op": {}, "cuda_launch_calls": None,
                              "cuda_kernels": None, "gpu_busy_us": None, "cuda_kernels_by_name": None}
    if device.type == "cuda":
        with quiet_profiler():
            result.update(cuda_profile(fn, inputs))
    return result
