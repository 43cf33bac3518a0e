"""optimize(): capture -> passes (each checked against eager) -> OptimizedModule."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.modules.module as _module_hooks  # the global hook registries nn.Module.__call__ reads
import torch.fx as fx
import torch.utils._pytree as pytree

from . import layout_choice, memory
from . import passes as passes_mod
from .capture import CaptureAttempt, CaptureInfo, annotate, capture
from .errors import CaptureError, FxoptError, PassError
from .passes import PassRecord, PassSpec, build_pipeline, run_passes
from .grad import inference_only
from .inputs import Signature, describe_signature, input_signature, nested_signature, optimizable_inputs
from .runtime import streams
from .runtime.lower import lower_for_execution
from .runtime.watch import WeightWatch
from .state import Effects, ModelState, compare_effects, eval_twin, preserved
from .verify import compare, layout_copy, tf32_in_use

log = logging.getLogger(__name__)



# Specializing (capture, passes, compilation) and the LRU bookkeeping: one thread at a time, in every module (a
# module-level lock keeps OptimizedModule deep-copyable).
_SPECIALIZE_LOCK = threading.RLock()


def _fresh(args: Sequence[Any]) -> tuple:
    """Copies of the tensor arguments: runs made while optimizing never touch the caller's tensors."""
    return tuple(layout_copy(a) if isinstance(a, torch.Tensor) else a for a in args)


@dataclass
class Specialization:
    """The optimized graph for one input signature, and how it got there."""

    @property
    def example_inputs(self) -> list[torch.Tensor]:
        """Fresh random tensors of this signature's shapes, strides, dtypes and devices."""
        return [torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()
                if dtype.is_floating_point else torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
                for shape, stride, dtype, device in self.input_specs]

    signature: Signature
    graph_module: fx.GraphModule
    records: list[PassRecord]
    backend: str
    seconds: float
    kernels: dict[str, Any] = field(default_factory=dict)
    input_specs: list[tuple] = field(default_factory=list)  # (shape, stride, dtype, device) of each tensor input
    runner: fx.GraphModule | None = None  # what runs: graph_module with its kernels called directly
    run: Callable[..., Any] | None = None  # the call path: runner.forward, or a CUDA-graph runner around it
    # static activation peaks (fxopt/memory.py) of the captured graph (what eager computes) and of graph_module
    activation_peaks: tuple[memory.MemoryEstimate, memory.MemoryEstimate] | None = None


def _signature_or_none(args: Sequence[Any]) -> Signature | None:
    """The specialization key of ``args`` (flat or nested), None where there is none."""
    try:
        return input_signature(tuple(args))
    except TypeError:
        return nested_signature(tuple(args))


def _estimate_memory(gm: fx.GraphModule) -> "memory.MemoryEstimate | None":
    """The static activation estimate for the report, or None where it fails: accounting never takes the
    optimization down (fuzz seeds 9900473, 9901000 once did)."""
    try:
        return memory.estimate(gm)
    except Exception as e:  # noqa: BLE001
        log.info("static memory estimate unavailable: %s: %s", type(e).__name__, e)
        return None


def _both(a: Any, b: Any) -> tuple | None:
    return None if a is None or b is None else (a, b)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "cuda" if device.type == "cuda" else "cpp"


def _device_of(args: Sequence[Any], model: torch.nn.Module) -> torch.device:
    for a in pytree.tree_leaves(list(args)):
        if isinstance(a, torch.Tensor):
            return a.device
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class OptimizedModule(torch.nn.Module):
    """An nn.Module that runs fxopt's rewritten graph for each input signature it has seen.

    ``graph_module`` / ``code`` show the graph of the most recent signature, ``records`` what each pass did,
    ``kernels`` the generated kernels (``opt.kernels["fused_0"].source``).
    """

    def __init__(self, model: torch.nn.Module, reference: torch.nn.Module, captured: fx.GraphModule | None,
                 capture_error: str | None, options: dict[str, Any]):
        super().__init__()
        # Plain attributes (not submodules): the user's model (never changed; the twin is rebuilt from it when its
        # weights change, NOTE [Frozen weights]) and the reference, fxopt's private eval copy of it (state.eval_twin).
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_reference", reference)
        self._captured = captured
        self._capture_error = capture_error
        self._options = options
        self._specs: OrderedDict[Signature, Specialization] = OrderedDict()
        self._last: Specialization | None = None
        self._warned_grad = False
        self._unoptimized = False  # no capture worked: every call runs the original model
        self._eager_signatures: dict[Signature, str] = {}  # signatures that run the original model, and why
        self._graphs = None  # a CUDAGraphRunner around _run_optimized, when cuda_graphs is on and inputs are on CUDA
        self.graph_note: str | None = None  # why CUDA graphs are off, when they were asked for
        # NOTE [Frozen weights]: the reference shares the model's tensors (state.eval_twin); what the passes fold is
        # copied at optimize time, CUDA graphs read weights at fixed addresses, kernels are built for their dtype
        # and device. Every call checks the weights against what they were (runtime/watch.py: one fingerprint,
        # a few ns a tensor); after a change, the module is rebuilt from the model (warned once).
        self._watch = self._new_watch()
        self._warned_weights = False
        self._forward_signature: inspect.Signature | None = None

    # -- the call path ---------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # nn.Module.__call__ costs 1-2 µs of host time on every call, to run hooks this module rarely has; with no
        # hook anywhere, no Module.compile() and no keyword arguments, go straight to forward (same result, NOTE
        # [Fused call path]).
        if (kwargs or self._compiled_call_impl is not None or self._forward_hooks or self._forward_pre_hooks
                or _module_hooks._global_forward_hooks
                or _module_hooks._global_forward_pre_hooks or _module_hooks._global_backward_hooks
                or _module_hooks._global_backward_pre_hooks or self._backward_hooks or self._backward_pre_hooks):
            return super().__call__(*args, **kwargs)
        return self.forward(*args)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            positional = self._positional(args, kwargs)
            if positional is None:  # keywords no positional parameter takes: no specialization can key them
                return self._reference(*args, **kwargs)
            args = positional
        if self._watch.changed():
            self._on_weights_changed()
        if torch.is_grad_enabled():
            return self._forward_grad_mode(args)
        if self._graphs is not None:
            return self._graphs(*args)
        return self._run_optimized(*args)

    def _forward_grad_mode(self, args: tuple) -> Any:
        """NOTE [Inference only] (fxopt/grad.py): the rule of every entry point under grad mode."""
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in pytree.tree_leaves(args)):
            return self._run_reference_for_grad(*args)
        if self._unoptimized or optimizable_inputs(args) is not None:
            return self._reference(*args)  # eager's own result, history and errors
        with torch.no_grad():
            out = self._graphs(*args) if self._graphs is not None else self._run_optimized(*args)
        return inference_only(out) if self._watch.requires_grad else out

    def _run_optimized(self, *args: Any) -> Any:
        """The optimized graph for these inputs, without CUDA graphs (what a CUDA graph captures)."""
        try:
            sig = input_signature(args)
            spec = self._specs.get(sig)
        except TypeError:  # an unhashable argument: tensors in a list or a dict
            sig = nested_signature(args)
            if sig is None:
                return self._reference(*args)
            spec = self._specs.get(sig)
        if spec is None:
            why = self._eager_signatures.get(sig) or optimizable_inputs(args)
            if why is not None:  # meta and fake tensors, subclasses, sparse: eager's result or eager's error
                log.debug("running the original model: %s", why)
                return self._reference(*args)
            with _SPECIALIZE_LOCK:  # threads meeting a new signature at once: one optimizes, the others wait
                spec = self._specs.get(sig)
                if spec is None:
                    if self._unoptimized:
                        return self._reference(*args)
                    spec = self._specialize_watched(args, sig)
                    if spec is None:
                        return self._reference(*args)
        elif spec is not self._last:
            with _SPECIALIZE_LOCK:
                if sig in self._specs:  # another thread may have evicted it meanwhile
                    self._specs.move_to_end(sig)
            self._last = spec
        return spec.run(*args)

    def _positional(self, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """``args`` and ``kwargs`` as the positional arguments of the model's forward, trailing defaults dropped (so
        ``opt(x=x)`` and ``opt(x)`` share a specialization); None when a keyword has no positional parameter.
        Arguments the forward does not take raise eager's TypeError."""
        if self._forward_signature is None:
            self._forward_signature = inspect.signature(self._reference.forward)
        try:
            bound = self._forward_signature.bind(*args, **kwargs)
        except TypeError as e:  # eager's message: "Linear.forward() got an unexpected keyword argument 'nope'"
            raise TypeError(f"{type(self._reference).__qualname__}.forward() {e}") from None
        bound.apply_defaults()
        params = self._forward_signature.parameters
        positional, rest = [], {}
        for name, value in bound.arguments.items():
            kind = params[name].kind
            if kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
                positional.append((value, params[name].default))
            elif kind == inspect.Parameter.VAR_POSITIONAL:
                positional.extend((v, inspect.Parameter.empty) for v in value)
            elif kind == inspect.Parameter.VAR_KEYWORD:
                rest.update(value)
            elif value is not params[name].default:
                rest[name] = value
        if rest:
            return None
        while positional and positional[-1][0] is positional[-1][1]:
            positional.pop()
        return tuple(v for v, _ in positional)

    def _run_reference_for_grad(self, *args: Any) -> Any:
        # NOTE [Inference only]: fused kernels have no backward. Inputs that require grad under grad mode
        # get the original model, so gradients stay correct; the warning says so once.
        if not self._warned_grad:
            warn_at_caller("fxopt: inputs require grad and grad mode is on; fxopt's kernels have no backward, so the "
                           "original model runs instead. Wrap inference in torch.no_grad() or "
                           "torch.inference_mode() to use the optimized graph.")
            self._warned_grad = True
        return self._reference(*args)

    # -- weights changed after optimize (NOTE [Frozen weights]) ---------------------------------------------------
    def _new_watch(self) -> WeightWatch:
        return WeightWatch(self._model.modules(), [*self._reference.parameters(), *self._reference.buffers()])

    def _on_weights_changed(self) -> None:
        with _SPECIALIZE_LOCK:
            if not self._watch.changed():  # another thread rebuilt the module meanwhile
                return
            if self._watch.only_requires_grad_changed():  # the graph still matches; only the autograd rule moves
                self._watch.rebaseline()
                return
            why = self._watch.describe()
            log.info("the model changed since fxopt.optimize (%s): rebuilding the optimized module", why)
            if not self._warned_weights:
                self._warned_weights = True
                warn_at_caller(f"fxopt: the model changed after fxopt.optimize: {why}. The optimized module "
                               "copied what it folded and was built for the weights' dtype, device and addresses, so "
                               "fxopt optimizes the model again for the new weights now (and after every later "
                               "change; this warning shows once). To control when that happens, call fxopt.optimize "
                               "again yourself after changing the weights.")
            object.__setattr__(self, "_reference", eval_twin(self._model))
            self._captured, self._capture_error, self._unoptimized = None, None, False
            self._eager_signatures.clear()
            self._forward_signature = None
            self._specs.clear()
            self._last = None
            if self._graphs is not None:  # graphs read the old weights' addresses: capture anew
                self._graphs = None
                self._enable_cuda_graphs(None)
            self._watch = self._new_watch()

    def _specialize_watched(self, args: Sequence[Any], sig: Signature) -> Specialization | None:
        """``_specialize``, then stop watching the tensors the model's own forward wrote while fxopt ran it: they
        are state (a cache, a counter), not weights."""
        self._eager_writes_state = False
        spec = self._specialize(args, sig)
        if spec is None or len(self._watch) == 0 or not self._eager_writes_state:
            return spec  # a graph verified against an eager run that wrote nothing writes nothing either
        # One more run of what will serve the calls, to see which tensors it writes; the model's state is put back
        # after it (NOTE [Model state]: the user sees no run fxopt makes while optimizing).
        before = self._watch.snapshot()
        with torch.no_grad(), preserved(self._reference):
            spec.run(*_fresh(args))
            written = self._watch.changed_since(before)
        if written:
            log.info("%d buffers or parameters are written by the model's forward: not watched as weights",
                     len(written))
            self._watch.forget(written)
        return spec

    # -- specialization ----------------------------------------------------------------------------------------
    def _specialize(self, args: Sequence[Any], sig: Signature) -> Specialization | None:
        """Capture (once), verify and optimize the model for ``args``; None when it runs unoptimized instead.

        NOTE [Unoptimized fallback]: a model fxopt cannot capture, or whose captured graph it cannot check against
        eager, runs unchanged: once decided, ``unoptimized_reason`` names the stage and the error and a
        RuntimeWarning says it once (``strict=True`` raises :class:`CaptureError` instead, chained to the error).
        That covers every error of fxopt's own machinery on the way (torch.export, fx, the comparison, the pass
        runner, lowering), not only the ones it expects: they are fxopt's failures, not the user's. The model's
        own errors on eager's run are the user's, and propagate as eager would raise them. Every run made here
        starts from the model's state and leaves it as it was (NOTE [Model state] in fxopt/state.py).
        """
        if self._unoptimized:
            return None
        t0 = time.perf_counter()
        opts = self._options

        def fall_back(stage: str, why: str, error: BaseException | None = None, kind: type = CaptureError) -> None:
            reason = f"{stage}: {why}"
            if opts["strict"]:
                raise kind(reason) from error
            self._give_up(sig, reason)

        state = ModelState(self._reference)
        try:
            if self._captured is None:
                try:
                    self._captured = capture(self._reference, args, leaf_modules=opts["leaf_modules"],
                                             concrete_args=opts["concrete_args"],
                                             keep_fast_paths=opts["keep_fast_paths"], state=state)
                    self._captured.meta["fxopt_captured_for"] = sig
                except CaptureError as e:
                    if opts["strict"]:
                        raise
                    return fall_back("capture", str(e))
                except Exception as e:  # noqa: BLE001 -- NOTE [Unoptimized fallback]
                    return fall_back("capture", f"fxopt failed: {type(e).__name__}: {e}", e)
            with torch.no_grad(), state.run() as eager_effects:
                reference_outputs = self._reference(*_fresh(args))  # the model may write its inputs: not the caller's
            self._eager_writes_state = bool(eager_effects)
            if eager_effects.parameters_written:
                return fall_back("eager run", f"the model writes its parameters in forward "
                                 f"({', '.join(eager_effects.parameters_written)}); fxopt treats them as frozen")
            try:
                gm = self._verified_capture(args, reference_outputs, state, eager_effects, sig)
            except FxoptError:
                raise
            except Exception as e:  # noqa: BLE001 -- NOTE [Unoptimized fallback]
                return fall_back("verifying the captured graph", f"fxopt failed: {type(e).__name__}: {e}", e)
            if gm is None:
                return None
            stage = "passes"
            try:
                backend = _resolve_backend(opts["backend"], _device_of(args, self._reference))
                pipeline = build_pipeline(opts["passes"], backend, opts["enable"])
                captured_memory = _estimate_memory(gm)  # before the passes rewrite gm
                gm.meta["fxopt_cuda_graphs"] = bool(opts["cuda_graphs"])  # passes that trade host for GPU time
                before = None  # the graph before the passes, to run them again without to_channels_last
                if opts["choose_layout"] and layout_choice.may_apply(backend, opts["passes"], opts["disable"],
                                                                     bool(eager_effects)):
                    before = passes_mod.snapshot(gm)
                    before.meta.update(gm.meta)

                def optimized(graph: fx.GraphModule, disabled: Sequence[str]) -> tuple:
                    nonlocal stage
                    stage = "passes"
                    graph, recs = run_passes(graph, args, pipeline, reference_outputs=reference_outputs,
                                             verify=opts["verify"], strict=opts["strict"], disabled=disabled,
                                             state=state, reference_effects=eager_effects)
                    stage = "lowering the optimized graph"
                    return graph, recs, lower_for_execution(graph)

                gm, records, runner = optimized(gm, opts["disable"])
                if before is not None and layout_choice.applied(records):
                    gm, records, runner = layout_choice.choose(
                        (gm, records, runner), lambda: optimized(before, (*opts["disable"], layout_choice.PASS)),
                        _fresh(args))
            except FxoptError:
                raise
            except Exception as e:  # noqa: BLE001 -- NOTE [Unoptimized fallback]; a failing pass is rolled back
                return fall_back(stage, f"fxopt failed: {type(e).__name__}: {e}", e, kind=PassError)
        finally:
            state.restore()
            state.release()
        spec = Specialization(sig, gm, records, backend, time.perf_counter() - t0,
                              kernels=dict(gm.meta.get("fxopt_kernels", {})), runner=runner,
                              activation_peaks=_both(captured_memory, _estimate_memory(gm)))
        spec.input_specs = [(a.shape, a.stride(), a.dtype, a.device) for a in args if isinstance(a, torch.Tensor)]
        spec.run = spec.runner.forward  # skips GraphModule's and nn.Module's call wrappers (about 1.5 µs)
        if any(n.op == "call_function" and n.target in streams.RUNTIME_FUNCTIONS for n in gm.graph.nodes):
            spec.run = streams.guard(spec.run)  # NOTE [Stream exceptions] in runtime/streams.py
        self._specs[sig] = spec
        self._last = spec
        while len(self._specs) > opts["max_specializations"]:
            evicted, _ = self._specs.popitem(last=False)
            log.info("evicted specialization for %s", describe_signature(evicted))
        return spec

    def _verified_capture(self, args: Sequence[Any], reference_outputs: Any, state: ModelState,
                          eager_effects: Effects, sig: Signature) -> fx.GraphModule | None:
        """A copy of the captured graph, annotated for ``args`` and checked against eager: its outputs, and what it
        changes in the model's state against what eager's run changed (``eager_effects``; NOTE [Model state]).

        NOTE [Verify the capture]: a captured graph can differ from the model before any pass runs:
        symbolic_trace drops ``with torch.autocast()`` blocks and bakes in Python-side state. A graph that does not
        reproduce eager is recaptured with torch.export; if that fails too, the model runs unoptimized.
        """
        why, error = "no captured graph", None
        for attempt in range(2):
            gm = passes_mod.snapshot(self._captured)
            gm.meta.update(self._captured.meta)
            method = self._captured.meta["fxopt_capture"].method
            try:
                with torch.no_grad(), state.run() as effects:
                    outputs = annotate(gm, _fresh(args))
            except Exception as e:  # noqa: BLE001 -- an exported graph's guards reject other shapes; else a fallback
                why, error = f"the graph captured by {method} fails on these inputs: {type(e).__name__}: {e}", e
                if method != "export" or attempt > 0:
                    break
                log.info("the exported graph rejects these inputs (%s): exporting again for them", e)
                try:
                    self._captured = capture(self._reference, args, methods=("export",), state=state)
                    self._captured.meta["fxopt_captured_for"] = sig
                except CaptureError as ce:
                    why = f"{why}; exporting again for them: {ce}"
                    break
                continue
            problem = compare(outputs, reference_outputs, tf32=tf32_in_use(gm))
            if problem is None:
                problem = compare_effects(effects, eager_effects)
                if problem is None:
                    return gm
                problem = f"the model's state after the run differs: {problem}"
            why = f"the graph captured by {method} does not reproduce the model: {problem}{_constant_hint(gm)}"
            if self._options["strict"]:
                raise CaptureError(why)
            log.info(why)
            # symbolic_trace's graph, or one exported for another signature's arguments; not an export of these
            # very arguments: exporting them again gives the same graph (seconds for a language model)
            same_export = method == "export" and self._captured.meta.get("fxopt_captured_for") == sig
            if attempt == 0 and not same_export:
                try:
                    recaptured = capture(self._reference, args, methods=("export",), state=state)
                    recaptured.meta["fxopt_capture"].attempts[:0] = self._captured.meta["fxopt_capture"].attempts
                    recaptured.meta["fxopt_capture"].attempts.insert(
                        len(self._captured.meta["fxopt_capture"].attempts),
                        CaptureAttempt(f"{method} (verified)", False, why))
                    self._captured = recaptured
                    self._captured.meta["fxopt_captured_for"] = sig
                    continue
                except CaptureError as e:
                    why = f"{why}; torch.export: {e}"
            break
        if self._options["strict"]:
            raise CaptureError(f"verifying the captured graph: {why}") from error
        self._give_up(sig, f"verifying the captured graph: {why}")
        return None

    def _give_up(self, sig: Signature, reason: str) -> None:
        """This signature runs the original model. While no other signature was optimized, that is the whole
        module's fate (nothing could be captured); after one was, only this signature's: a new argument structure
        or a keyword the graph cannot take does not undo the specializations that work."""
        if self._specs:
            self._eager_signatures[sig] = reason
            warn_at_caller(f"fxopt: inputs {describe_signature(sig)} run the original model, unoptimized: {reason}")
            return
        self._capture_error, self._unoptimized = reason, True
        _warn_unoptimized(self._reference, reason)

    # -- CUDA graphs ---------------------------------------------------------------------------------------------
    def _enable_cuda_graphs(self, example_inputs: Sequence[Any] | None) -> None:
        from .runtime.cudagraph import CUDAGraphRunner, cuda_graphs_supported

        device = _device_of(example_inputs or (), self._reference)
        if device.type != "cuda":
            self.graph_note = f"CUDA graphs need CUDA tensors; the model runs on {device}: option ignored"
            log.info(self.graph_note)
            return
        if example_inputs is not None:
            ok, why = cuda_graphs_supported(tuple(example_inputs))
            if not ok:
                self.graph_note = why
                return
        self._graphs = CUDAGraphRunner(self._run_optimized, preserve=lambda: preserved(self._reference),
                                       capturable=self._why_not_captured, **self._options["graph_options"])

    def _why_not_captured(self, args: tuple) -> str | None:
        """Inputs whose warm-ups ran the original model, not an optimized graph, are not captured as a CUDA graph
        (a graph of the unchanged model replays what it did at capture time: a cache that grows would stop
        growing); they run eagerly, as without ``cuda_graphs``."""
        if self._unoptimized:
            return f"fxopt runs the model unoptimized ({self._capture_error})"
        try:
            sig = input_signature(args)
        except TypeError:
            sig = nested_signature(args)
        if sig is not None and self._specs.get(sig) is not None:
            return None
        why = self._eager_signatures.get(sig) if sig is not None else None
        return f"these inputs run the original model ({why or 'no optimized graph for them'})"

    def graph_report(self) -> str:
        """Per input signature: captured or not (and why), graph nodes, memory held by the graph pool."""
        if self._graphs is None:
            return self.graph_note or "CUDA graphs are off (optimize(..., cuda_graphs=True) turns them on)"
        return self._graphs.report()

    @property
    def graph_entries(self) -> list:
        return [] if self._graphs is None else self._graphs.entries()

    # -- inspection --------------------------------------------------------------------------------------------
    def _require_last(self) -> Specialization:
        if self._unoptimized:
            raise RuntimeError(f"this module runs the original model unoptimized: {self._capture_error}")
        if self._last is None:
            raise RuntimeError("this OptimizedModule has not run yet: call it once, or pass example_inputs to "
                               "fxopt.optimize, to build the optimized graph")
        return self._last

    def specialization_for(self, args: Sequence[Any]) -> Specialization | None:
        """The specialization for these inputs, built now if new; None when the model runs unoptimized."""
        args = tuple(args)
        try:
            sig = input_signature(args)
            hash(sig)
        except TypeError:  # tensors in a list or a dict
            sig = nested_signature(args)
            if sig is None:
                return None
        spec = self._specs.get(sig)
        if spec is None and not self._unoptimized and optimizable_inputs(args) is None:
            with _SPECIALIZE_LOCK:
                spec = self._specs.get(sig) or self._specialize_watched(args, sig)
        return spec

    def graph_module_for(self, args: Sequence[Any]) -> fx.GraphModule | None:
        spec = self.specialization_for(args)
        return None if spec is None else spec.graph_module

    @property
    def unoptimized_reason(self) -> str | None:
        """Why this module runs the original model unchanged (no capture method worked), or None."""
        return self._capture_error if self._unoptimized else None

    @property
    def graph_module(self) -> fx.GraphModule:
        return self._require_last().graph_module

    @property
    def code(self) -> str:
        return self.graph_module.code

    @property
    def records(self) -> list[PassRecord]:
        return self._require_last().records

    @property
    def kernels(self) -> dict[str, Any]:
        return self._require_last().kernels

    @property
    def specializations(self) -> list[Specialization]:
        return list(self._specs.values())

    @property
    def capture_info(self) -> CaptureInfo | None:
        return None if self._captured is None else self._captured.meta.get("fxopt_capture")

    @property
    def original(self) -> torch.nn.Module:
        """fxopt's eval-mode copy of the model (the reference every pass is checked against)."""
        return self._reference

    def summary(self) -> str:
        """The per-pass record of the most recent specialization as a table, and the static activation peaks of the
        captured and the optimized graph (fxopt/memory.py)."""
        from tabulate import tabulate

        spec = self._require_last()
        rows = [(r.name, r.status, r.static_before, r.static_after, r.dispatched_before, r.dispatched_after,
                 f"{r.seconds * 1e3:.1f}", ", ".join(f"{k}={v}" for k, v in r.changes.items()) or (r.error or ""))
                for r in spec.records]
        head = ["pass", "status", "static before", "static after", "dispatched before", "dispatched after", "ms",
                "changes"]
        text = f"inputs: {describe_signature(spec.signature)}; backend: {spec.backend}\n"
        info = self.capture_info
        if info is not None and info.fast_paths:
            kept = ", ".join(f"{name} ({op})" for name, op in info.fast_paths.items())
            text += f"kept whole, eager runs each as one fused op (keep_fast_paths=False traces through): {kept}\n"
        text += tabulate(rows, head)
        return text + ("\n" + memory.compare_peaks(*spec.activation_peaks) if spec.activation_peaks is not None else "")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def warn_at_caller(message: str) -> None:
    """A RuntimeWarning attributed to the first frame outside fxopt and torch (nn.Module.__call__, Dynamo): the
    user's call."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _constant_hint(gm: fx.GraphModule) -> str:
    """Why a symbolically traced graph may compute something else: an expression on parameters or buffers alone
    (``self.cache.sum(1)``, no traced tensor in it) is evaluated once while tracing and kept as a constant."""
    constants = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_tensor_constant")]
    if not constants:
        return ""
    return (f" ({', '.join(constants[:3])}: symbolic_trace evaluated an expression on parameters or buffers alone "
            f"while tracing and kept its value; if the model writes those tensors in place, that value is stale. "
            f"torch.export traces such code as it runs: without strict=True fxopt tries it next)")


def _warn_unoptimized(model: torch.nn.Module, why: str) -> None:
    """The one warning of NOTE [Unoptimized fallback], attributed to the user's line (optimize, or the first call)
    however deep in fxopt and torch.nn's call wrappers the decision was made."""
    import os
    import sys

    inside = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"fxopt: {type(model).__qualname__} runs unoptimized (the original model, unchanged): {why}\n"
                  "Pass strict=True to get this as fxopt.CaptureError instead.", RuntimeWarning, stacklevel=level)


# Opt-in passes that optimize(cuda_graphs=True) runs unless disabled: each trades host time for GPU time, so it wins
# only where the module replays as a CUDA graph (benchmarks/NOTES.md has the measurements).
# NOTE [Streams under graphs]: independent branches on side streams won 1.21-1.72x inside CUDA graphs (googlenet,
# inception_v3, batch 1 and 8, H200) and lost 0.72x without them (googlenet, batch 1), where the stream switches
# cost host time.
# NOTE [3xTF32 under graphs]: float32 GEMMs as three TF32 products where each shape measures faster (NOTE [3xTF32
# GEMMs]): with graphs, ViT-B 2068 -> 1690 µs, GPT-2 1410 -> 1209, BERT 1378 -> 1228 at batch 1 (H100, torch 2.11,
# reports/2026-12-07-h100-s12-f4f5b2f/), at 0.8-1.3e-05 relative error against eager (float32's own 1.1-1.8e-06;
# the verification tolerance 1e-04). Without graphs its split's launch and the Python op cost host time. Float32
# convolutions likewise where the process keeps cuDNN off TF32 (NOTE [3xTF32 convolutions]): with graphs, ResNet-50
# 2088 -> 1337 µs, EfficientNet-B0 1066 -> 674, MobileNetV3-L 642 -> 463, a diffusion UNet block 379 -> 325 at batch
# 1 (H100, torch 2.11, reports/2026-12-07-h100-s13-1717605/), at 2e-07 to 6.6e-06 relative error against eager, and
# ResNet-50's 9.8e-05 (each convolution 2 to 20 times float32's error on its real input; why they add up to 200
# times float32's at ResNet-50's logits is not known). fxopt's verification rolls a pass back past 1e-04.
GRAPH_DEFAULT_PASSES = ("parallel_branches", "tf32x3_linears", "tf32x3_convolutions")


def optimize(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    passes: Sequence[PassSpec] | None = None,
    disable: Sequence[str] = (),
    enable: Sequence[str] = (),
    backend: str = "auto",
    verify: bool = True,
    strict: bool = False,
    max_specializations: int = 8,
    leaf_modules: Sequence[type] = (),
    keep_fast_paths: bool = True,
    concrete_args: dict[str, Any] | None = None,
    cuda_graphs: bool | str = False,
    graph_options: dict[str, Any] | None = None,
    choose_layout: bool = False,
) -> OptimizedModule:
    """Optimize ``model`` for inference; returns an :class:`OptimizedModule` callable like the model.

    The model is never changed: fxopt works on an eval-mode copy of its module tree that shares its parameters and
    buffers, and copies only what it rewrites (BatchNorm folded into convolutions, channels_last weights). Treat
    the weights as frozen from here: after changing them (training, ``load_state_dict``), optimize again; the
    module warns when it notices (NOTE [Frozen weights]). Without ``example_inputs``, the shape-dependent work
    happens at the first call for each input signature (shape, dtype, device) and is cached, up to
    ``max_specializations`` signatures (least recently used evicted).

    * ``passes``: pass names from the default pipeline, ``fxopt.passes.Pass`` objects or callables
      ``(GraphModule) -> PassResult``, in order; None for the default pipeline. ``disable``: names to skip.
      ``enable``: opt-in passes (``fxopt.passes.optional_passes()``) to append, e.g. ``["parallel_branches"]``
      (independent branches on side CUDA streams). With ``cuda_graphs``, ``GRAPH_DEFAULT_PASSES`` are on by default,
      where they measured faster: parallel_branches, tf32x3_linears and tf32x3_convolutions (float32 GEMMs and
      convolutions as 3xTF32 where timed faster: about ten times float32's error per GEMM, within its tolerance);
      ``disable=[name]`` turns one off.
    * ``backend``: ``"auto"`` (CUDA C++ via NVRTC on GPU, C++ on CPU), ``"cuda"``, ``"cpp"``, ``"inductor"``.
    * ``verify``: compare with eager after every pass, rolling back a pass that breaks numerics.
    * ``strict``: raise instead of rolling back or falling back.
    * ``leaf_modules``: module types kept as opaque calls. ``keep_fast_paths``: keep whole the torch.nn composites
      that eager runs as one fused op on the example inputs (nn.TransformerEncoderLayer, nn.MultiheadAttention in
      eval mode): measured faster than their decomposition (NOTE [Fast paths] in capture.py); False traces through.
    * ``cuda_graphs``: ``True`` or ``"auto"`` replays the optimized module as a CUDA graph per input signature
      (shape, dtype, device, strides) when its inputs are on CUDA; a signature whose capture fails runs without a
      graph, with the reason in :meth:`OptimizedModule.graph_report`. A no-op with a note on CPU.
      ``graph_options`` go to :class:`fxopt.runtime.cudagraph.CUDAGraphRunner`: ``max_graphs`` (8),
      ``batch_buckets`` (e.g. 8: capture batch sizes 1, 2, 4, 8 and pad up), ``output_mode``
      (``"copy"``, the default: every call returns fresh tensors; ``"rotate"``: two sets of output buffers used in
      turn, so an output stays valid through the next call and is overwritten by the call after it; ``"unsafe"``:
      the graph's own buffers, overwritten by the next call). Rotating measured cheaper on the H100 (0.2-2.7 µs
      over unsafe against 6-76 µs of host time for copying) but failed a test with calls on two streams (suspected
      cause removed, not yet confirmed on a GPU), so copying stays the default (benchmarks/NOTES.md). In "rotate"
      and "unsafe" modes every graph gets its own memory pool. ``native_replay`` (default True) replays from C++
      instead of Python: 5-12 µs less per call on the H200 (NOTE [Native graph call] in runtime/cudagraph/replay.py).
    * ``choose_layout``: where to_channels_last converts a convolution network on CUDA, also run the passes without
      it and keep whichever optimized module a CUDA graph replays faster; the pass's record gives both times (NOTE
      [Layout by measurement] in fxopt/layout_choice.py). Off by default until a GPU run has measured it; it costs
      a second run of the passes for such networks.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxopt.optimize expects a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        log.info("fxopt optimizes for inference: %s is in training mode; its copy runs in eval mode",
                 type(model).__name__)
    reference = eval_twin(model)
    if max_specializations < 1:
        raise ValueError("max_specializations must be at least 1")
    if cuda_graphs not in (False, True, "auto"):
        raise ValueError(f"cuda_graphs must be False, True or 'auto', got {cuda_graphs!r}")
    enable = (enable,) if isinstance(enable, str) else tuple(enable)
    if cuda_graphs and passes is None:
        enable += tuple(p for p in GRAPH_DEFAULT_PASSES if p not in (*enable, *disable))
    options = dict(passes=passes, disable=tuple(disable), enable=enable, backend=backend, verify=verify,
                   strict=strict, max_specializations=max_specializations, leaf_modules=tuple(leaf_modules),
                   keep_fast_paths=keep_fast_paths, concrete_args=concrete_args, cuda_graphs=cuda_graphs,
                   graph_options=dict(graph_options or {}), choose_layout=bool(choose_layout))
    if passes is not None or enable:  # fail fast on a bad pass name
        build_pipeline(passes, _resolve_backend(backend, torch.device("cpu")), enable)
    captured, capture_error = None, None
    try:
        captured = capture(reference, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
                           keep_fast_paths=keep_fast_paths)
        if example_inputs is not None:
            captured.meta["fxopt_captured_for"] = _signature_or_none(example_inputs)
    except CaptureError as e:
        if strict:
            raise
        capture_error = f"capture: {e}"
        if example_inputs is not None:
            _warn_unoptimized(model, capture_error)
        # without inputs, torch.export gets its chance at the first call
    except Exception as e:  # NOTE [Unoptimized fallback]: fxopt's failure, not the user's
        capture_error = f"capture: fxopt failed: {type(e).__name__}: {e}"
        if strict:
            raise CaptureError(capture_error) from e
        if example_inputs is not None:
            _warn_unoptimized(model, capture_error)
    opt = OptimizedModule(model, reference, captured, capture_error, options)
    if capture_error is not None and example_inputs is not None:
        opt._unoptimized = True
    if cuda_graphs:
        opt._enable_cuda_graphs(example_inputs)
    if example_inputs is not None:
        opt.specialization_for(tuple(example_inputs))
    return opt
