"""The systems a report compares, each built from the same model and measured on the same inputs.

A system is a builder ``(ctx) -> (callable, info)``. :func:`prepare_system` builds it, times the first call (capture
+ compile + run), compares its outputs with eager's and counts its launches; the report then times every prepared
system together, interleaved (NOTE [Interleaved timing] in measure.py), and :func:`finish_system` reads its peak
memory and what it reports about itself. :func:`run_system` does all of it for one system alone. A system that
cannot run here (needs CUDA, not installed) is *skipped* with the reason; one that raises is *failed* with the error
and the stage it failed in. Neither stops the report.
"""

from __future__ import annotations

import contextlib
import copy
import io
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
from . import compiled as compiled_mod
from .measure import allocated_bytes, forward_peak_bytes, free_memory, measure_latency, quiet_profiler, sync
from .progress import NullProgress, Progress

log = logging.getLogger(__name__)


class Skip(Exception):
    """The system cannot run here (not installed, needs CUDA): its row says why instead of measuring."""


@dataclass
class Context:
    """What every builder gets: the model (never changed), its inputs, the device, fxopt's backend option, the
    opt-in passes its systems enable and whether they choose the layout by measurement."""

    model: torch.nn.Module
    inputs: tuple
    device: torch.device
    backend: str = "auto"
    enable: tuple = ()
    choose_layout: bool = False  # optimize(..., choose_layout=...): NOTE [Layout by measurement]
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
    dynamo: bool = False  # compiles through torch._dynamo: its counters and cache (NOTE [One Dynamo cache ...])
    first_call: str = "build + first call"  # what the progress line says while it is built and first called


# -- builders ----------------------------------------------------------------------------------------------------
def build_eager(ctx: Context):
    return ctx.model, {}


def build_torchscript(ctx: Context):
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(ctx.model).eval(), ctx.inputs)
        frozen = torch.jit.freeze(traced.eval())
        module = torch.jit.optimize_for_inference(frozen)
    return module, {"method": "torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, inputs)))"}


def _dynamo_stats(fn: Any = None) -> dict[str, Any]:
    return compiled_mod.dynamo_stats()


def _build_compile(mode: str | None):
    def build(ctx: Context):
        compiled_mod.dynamo_counters_clear()  # not a reset: that would drop the other compiled system's code
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
        kwargs.setdefault("enable", ctx.enable)
        kwargs.setdefault("choose_layout", ctx.choose_layout)
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


# NOTE [ONNX export]: the ONNX Runtime system exports with torch.onnx.export(..., dynamo=False), the TorchScript
# exporter. Checked on torch 2.13 (CPU) with every zoo model: both exporters work and give the same error against
# eager (1e-7 to 1e-6), but dynamo=True needs the onnxscript package, takes 1.4-7 s per zoo model against 0.07-2 s,
# and prints its steps on stdout (which ``--format json`` owns). The TorchScript exporter is deprecated ("will be
# removed") but present in torch 2.11 and 2.13; where it is gone or cannot trace the model, the export falls back to
# dynamo=True when onnxscript is installed, and the row says which exporter ran.
def export_onnx(model: torch.nn.Module, inputs: tuple) -> tuple[bytes, str]:
    """The model (a copy, in eval mode) as ONNX bytes for ``inputs``' shapes, and which exporter made them."""
    model = copy.deepcopy(model).eval()
    errors = []
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=r".*The feature will be removed.*")
            torch.onnx.export(model, tuple(inputs), buf, dynamo=False)
        return buf.getvalue(), "torch.onnx.export(dynamo=False)"
    except Exception as e:  # noqa: BLE001 -- the other exporter is tried; both errors are raised if it fails too
        errors.append(f"dynamo=False: {_first_line(e)}")
    try:
        import onnxscript  # noqa: F401 -- dynamo=True needs it
    except ImportError:
        raise RuntimeError(f"ONNX export failed ({errors[0]}); the other exporter (dynamo=True) needs onnxscript "
                           f"(pip install onnxscript)") from None
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # it prints its steps
            program = torch.onnx.export(model, tuple(inputs), dynamo=True, verbose=False)
        return program.model_proto.SerializeToString(), "torch.onnx.export(dynamo=True)"
    except Exception as e:
        errors.append(f"dynamo=True: {_first_line(e)}")
        raise RuntimeError(f"ONNX export failed with both exporters: {'; '.join(errors)}") from e


_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
               "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
               "tensor(bool)": torch.bool, "tensor(uint8)": torch.uint8, "tensor(int8)": torch.int8}


def build_onnxruntime(ctx: Context):
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install onnxruntime; on CUDA: onnxruntime-gpu)") from None
    device, inputs = ctx.device, ctx.inputs
    if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                   f"{', '.join(ort.get_available_providers())}): pip install onnxruntime-gpu")
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise Skip("the model takes non-tensor inputs, which an ONNX graph cannot take as inputs")
    onnx_bytes, exporter = export_onnx(ctx.model, inputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would land in the terminal on every run
    if device.type == "cpu":
        # as many threads as torch uses here, so both libraries get the same cores (ORT's default: all of them)
        options.intra_op_num_threads = torch.get_num_threads()
        providers: list[Any] = ["CPUExecutionProvider"]
    else:
        # ORT runs on torch's current stream: the inputs torch wrote are ready and the outputs are ready for torch
        stream = torch.cuda.current_stream(device).cuda_stream
        providers = [("CUDAExecutionProvider", {"device_id": str(device.index or 0),
                                                "user_compute_stream": str(stream)})]
    session = ort.InferenceSession(onnx_bytes, options, providers=providers)
    wanted = "CPUExecutionProvider" if device.type == "cpu" else "CUDAExecutionProvider"
    if session.get_providers()[0] != wanted:  # ORT falls back to the CPU when the CUDA provider does not load
        raise RuntimeError(f"onnxruntime did not load its {wanted} (session providers: {session.get_providers()}); "
                           f"check that onnxruntime-gpu matches this CUDA (torch.version.cuda={torch.version.cuda})")
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise RuntimeError(f"the exported ONNX graph takes {len(names)} inputs, the model {len(inputs)} (an input the "
                           f"model does not use is dropped by the export)")
    outs = session.get_outputs()
    info = {"exporter": exporter, "onnxruntime": ort.__version__, "providers": session.get_providers(),
            "onnx_bytes": len(onnx_bytes)}
    if device.type == "cpu":
        info["intra_op_threads"] = options.intra_op_num_threads
        out_names = [o.name for o in outs]

        def run_cpu(*args: torch.Tensor):
            # numpy() shares the tensor's memory; the outputs come back as fresh arrays that torch wraps without a copy
            results = session.run(out_names, {n: a.detach().numpy() for n, a in zip(names, args)})
            tensors = tuple(torch.from_numpy(r) for r in results)
            return tensors[0] if len(tensors) == 1 else tensors

        return run_cpu, info

    import numpy as np

    binding = session.io_binding()
    index = device.index or 0
    shapes = []
    for o in outs:
        if o.type not in _ORT_DTYPES or not all(isinstance(d, int) for d in o.shape):
            raise RuntimeError(f"output {o.name} of the ONNX graph is {o.type} {o.shape}: IOBinding here needs a "
                               f"fixed shape and one of {', '.join(_ORT_DTYPES)}")
        shapes.append((o.name, tuple(o.shape), _ORT_DTYPES[o.type]))
    info["io_binding"] = True

    def np_dtype(dtype: torch.dtype):
        if dtype == torch.bfloat16:  # numpy has no bfloat16 to name the buffer's element type with
            raise RuntimeError("IOBinding of bfloat16 tensors is not supported here (numpy has no bfloat16)")
        return np.dtype(str(dtype).removeprefix("torch."))

    def run_cuda(*args: torch.Tensor):
        # every call binds the caller's tensors and fresh outputs (as eager allocates its outputs): no copies
        for n, a in zip(names, args):
            a = a.contiguous()
            binding.bind_input(n, "cuda", index, np_dtype(a.dtype), tuple(a.shape), a.data_ptr())
        results = []
        for n, shape, dtype in shapes:
            out = torch.empty(shape, dtype=dtype, device=device)
            binding.bind_output(n, "cuda", index, np_dtype(dtype), shape, out.data_ptr())
            results.append(out)
        session.run_with_iobinding(binding)
        return results[0] if len(results) == 1 else tuple(results)

    return run_cuda, info


SYSTEMS: dict[str, System] = {s.name: s for s in [
    System("eager", "eager", "the model as written (the reference for errors and speedups)", build_eager),
    System("torchscript", "TorchScript", "torch.jit.trace + freeze + optimize_for_inference", build_torchscript),
    System("compile", "torch.compile", 'torch.compile(model), mode="default" (Inductor)', _build_compile(None),
           slow=True, compiled=True, dynamo=True, first_call="compiling (first call)"),
    System("compile_reduce_overhead", "torch.compile reduce-overhead",
           'torch.compile(model, mode="reduce-overhead"): Inductor + CUDA graphs', _build_compile("reduce-overhead"),
           needs_cuda=True, slow=True, compiled=True, dynamo=True, first_call="compiling (first call)"),
    System("fxopt", "fxopt", "fxopt.optimize(model, inputs)", _build_fxopt()),
    System("fxopt_cudagraphs", "fxopt + CUDA graphs", "fxopt.optimize(model, inputs, cuda_graphs=True)",
           _build_fxopt(cuda_graphs=True), needs_cuda=True, describe=_cuda_graph_info),
    System("fxopt_inductor", "fxopt (inductor)", 'fxopt.optimize(model, inputs, backend="inductor")',
           _build_fxopt(backend="inductor"), slow=True, first_call="optimizing with Inductor kernels"),
    System("onnxruntime", "ONNX Runtime",
           "torch.onnx.export, then an onnxruntime InferenceSession (CPU; CUDA provider with IOBinding on GPU)",
           build_onnxruntime, compiled=True, first_call="exporting to ONNX and loading the session"),
    System("tensorrt", "TensorRT", 'torch_tensorrt.compile(model, ir="dynamo")', build_tensorrt, needs_cuda=True,
           slow=True, compiled=True, dynamo=True, first_call="compiling (first call)"),
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


@dataclass
class Prepared:
    """A built system waiting to be timed: its row so far and the callable (None when it was skipped or failed)."""

    system: System
    entry: dict[str, Any]
    fn: Callable[..., Any] | None = None
    stage: str = "latency"


def prepare_system(system: System, ctx: Context, *, step: Callable[[str], None] = lambda msg: None,
                   progress: Progress | None = None) -> Prepared:
    """Build ``system``, time its first call, compare its outputs with eager's and count its launches; never raises
    for the system's own failures (the entry says what failed). Slow first calls print a start and an end line
    (``progress.slow``)."""
    progress = progress or NullProgress()
    entry = empty_entry(system)
    why = unavailable(system, ctx.device)
    if why is not None:
        entry.update(status="skipped", reason=why)
        return Prepared(system, entry)
    device, inputs = ctx.device, ctx.inputs
    free_memory(device)
    before = allocated_bytes(device)
    stage = "build"
    fn = None
    try:
        step(f"{system.name}: {system.first_call}")
        skips = compiled_mod.record_cudagraph_skips() if system.name == "compile_reduce_overhead" else None
        with warnings.catch_warnings(record=True) as caught, \
                (progress.slow(f"{system.label}: {system.first_call}") if system.slow else contextlib.nullcontext()), \
                (skips if skips is not None else contextlib.nullcontext()) as seen:
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
        if system.dynamo:  # now, before another compile adds to the same counters
            entry["info"].update(compiled_mod.dynamo_stats())
        if seen is not None:
            entry["info"].update(seen.as_dict())
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
    except Skip as e:
        entry.update(status="skipped", reason=str(e))
        fn = None
    except Exception as e:  # noqa: BLE001 -- the system failed: its row carries the error; the report goes on
        entry.update(status="failed", stage=stage, error=_first_line(e), traceback=traceback.format_exc(limit=8))
        fn = None
    return Prepared(system, entry, fn)


def finish_system(prepared: Prepared, ctx: Context, latency: dict[str, Any] | None,
                  error: BaseException | None = None) -> dict[str, Any]:
    """Record the timing of a prepared system (or the error it raised while timed), then its peak memory and what it
    says about itself; returns its entry."""
    entry, system, fn = prepared.entry, prepared.system, prepared.fn
    if fn is None:
        return entry
    stage = "latency"
    try:
        if error is not None:
            raise error
        entry["latency"] = latency
        stage = "memory"
        entry["peak_memory_bytes"] = forward_peak_bytes(fn, ctx.inputs, ctx.device)
        if system.describe is not None:
            try:
                entry["info"].update(system.describe(fn))
            except Exception as e:  # noqa: BLE001 -- the measurements stand; only the extra facts are missing
                entry["info"]["describe_error"] = _first_line(e)
    except Exception as e:  # noqa: BLE001 -- the system failed: its row carries the error; the report goes on
        entry.update(status="failed", stage=stage, error=_first_line(e),
                     traceback="".join(traceback.format_exception(type(e), e, e.__traceback__, limit=8)))
    prepared.fn = None
    return entry


def run_system(system: System, ctx: Context, *, iters: int, warmup: int,
               step: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Build and measure one system on its own (a report times its systems interleaved instead); never raises for
    the system's own failures (the entry says what failed)."""
    prepared = prepare_system(system, ctx, step=step)
    latency = error = None
    try:
        if prepared.fn is not None:
            step(f"{system.name}: latency")
            latency = measure_latency(prepared.fn, ctx.inputs, ctx.device, warmup=warmup, iters=iters)
    except Exception as e:  # noqa: BLE001 -- recorded in the entry by finish_system
        error = e
    try:
        return finish_system(prepared, ctx, latency, error)
    finally:
        release([prepared], ctx.device)


def release(prepared: list[Prepared], device: torch.device) -> None:
    """Drop the built systems, and Dynamo's compiled code if one of them compiled through it."""
    dynamo = any(p.system.dynamo and p.entry["status"] != "skipped" for p in prepared)
    for p in prepared:
        p.fn = None
    if dynamo:
        try:
            compiled_mod.dynamo_reset()  # frees compiled graphs (and reduce-overhead's CUDA-graph pool)
        except Exception as e:  # noqa: BLE001 -- cleanup only; the entries already say what happened
            log.info("torch._dynamo.reset() failed: %s", e)
    free_memory(device)


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
