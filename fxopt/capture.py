"""Model -> annotated torch.fx GraphModule.

The capture chain, each attempt recorded in ``gm.meta["fxopt_capture"]``:

1. ``torch.fx.symbolic_trace`` (Python-level graph: call_module / call_function / call_method nodes);
2. ``torch.export.export(strict=False)`` when example inputs are given (ATen-level graph);
3. otherwise :class:`~fxopt.errors.CaptureError`, naming the model, the failing source line and what to try.

Capture never copies or changes the model: the returned GraphModule shares the model's submodules and
parameters, and whatever the model's forward changes while it is traced or exported (a cache it writes, attributes
it assigns, fake tensors torch.export leaves behind) is restored after each attempt (NOTE [Model state] in
fxopt/state.py). :func:`fxopt.optimize` copies the model's module tree first, and passes never mutate shared
tensors in place (see fxopt/passes/README.md).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from . import ops
from .errors import CaptureError
from .state import ModelState

log = logging.getLogger(__name__)

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXOPT_DIR = os.path.dirname(__file__)
_ZOO_DIR = os.path.join(_FXOPT_DIR, "models")


@dataclass
class CaptureAttempt:
    method: str  # "symbolic_trace" | "export"
    ok: bool
    error: str | None = None
    where: str | None = None  # "file.py:LINE: source" of the failing user line


@dataclass
class CaptureInfo:
    """How a model was captured: the method that worked and every attempt before it, and the torch.nn composites
    kept whole because eager runs them as one fused op (``fast_paths``: qualified name -> that op)."""

    method: str
    attempts: list[CaptureAttempt] = field(default_factory=list)
    fast_paths: dict[str, str] = field(default_factory=dict)


# torch.nn modules are leaves for symbolic_trace, which is right for Conv2d or LayerNorm but hides whole blocks
# of ops inside these composites (Transformer layers, MultiheadAttention: ops.COMPOSITE_MODULES); fxopt traces
# through them (torch.export takes them when symbolic_trace cannot).
COMPOSITE_NN_MODULES = ops.COMPOSITE_MODULES


# NOTE [Fast paths]: in eval mode without grad, eager runs nn.TransformerEncoderLayer and nn.MultiheadAttention as one
# fused ATen op each (their "fast path"). Traced through, the same layer becomes two dozen ops and views: on the H200
# at batch 1, a TransformerEncoderLayer took 336-364 µs decomposed and fused by fxopt against 245-252 µs as the one
# op, and 81 against 78 µs inside a CUDA graph (benchmarks/NOTES.md). So a composite that ran its fused op on the
# example inputs stays one opaque call; ``keep_fast_paths=False`` traces through it anyway. On CUDA the first pass,
# decompose_encoder_layers (passes/attention.py), then writes a TransformerEncoderLayer kept whole as the few ops an
# inference layer needs (GEMMs, SDPA, add + LayerNorm), which beat the fused op there (fifth session's NOTES).
_FAST_PATH_OPS = ops.FAST_PATH_OPS


def fast_path_modules(model: torch.nn.Module, example_inputs: Sequence[Any]) -> dict[str, str]:
    """{qualified name: ATen op} for each torch.nn composite in ``model`` that ran eager's fused op on one no-grad
    call with (copies of) ``example_inputs``; the innermost composite running when the op was dispatched."""
    from .launches import InspectionMode
    from .verify import layout_copy

    composites = [(name, m) for name, m in model.named_modules() if name and isinstance(m, COMPOSITE_NN_MODULES)]
    if not composites:
        return {}
    names = {id(m): name for name, m in composites}
    found: dict[str, str] = {}

    class Watch(InspectionMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket.__name__
            if op in _FAST_PATH_OPS:
                # The innermost composite whose forward is on the stack. Not forward hooks: a module with hooks
                # skips its fast path.
                frame = sys._getframe(1)
                while frame is not None:
                    owner = frame.f_locals.get("self") if frame.f_code.co_name == "forward" else None
                    if owner is not None and id(owner) in names:
                        found.setdefault(names[id(owner)], f"aten.{op}")
                        break
                    frame = frame.f_back
            return func(*args, **(kwargs or {}))

    inputs = [layout_copy(a) if isinstance(a, torch.Tensor) else a for a in example_inputs]
    try:
        with torch.no_grad(), Watch():
            model(*inputs)
    except Exception as e:  # the capture that follows reports what is wrong with the model
        log.info("looking for eager fast paths in %s failed: %s", _model_name(model), e)
        return {}
    return found


class _LeafTracer(fx.Tracer):
    """symbolic_trace's tracer: extra module types kept as opaque calls, torch.nn composites traced through."""

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()):
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        if isinstance(m, COMPOSITE_NN_MODULES):
            return False
        return super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch and fxopt: the model line that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        in_fxopt = path.startswith(_FXOPT_DIR) and not path.startswith(_ZOO_DIR)
        if not path.startswith(_TORCH_DIR) and not in_fxopt:
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return None


def _model_name(model: torch.nn.Module) -> str:
    return type(model).__qualname__


def _failing_submodule(model: torch.nn.Module, exc: BaseException, fast_paths: dict[str, str]) -> str | None:
    """The qualified name of the innermost submodule whose code raised, if it may become an opaque call. A torch.nn
    composite may not (torch.export traces it; an opaque call would hide every op inside), unless modules inside it
    run eager's fused op (``fast_paths``: an nn.TransformerEncoder whose layers take their fast path), which it then
    runs as eager does (NOTE [Fast paths])."""
    names = {id(m): name for name, m in model.named_modules() if name}
    for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            name = names[id(owner)]
            if isinstance(owner, COMPOSITE_NN_MODULES):
                return name if any(k.startswith(name + ".") for k in fast_paths) else None
            return name
    return None


def _symbolic_trace(model, leaf_modules, concrete_args, leaf_names=()) -> fx.GraphModule:
    tracer = _LeafTracer(tuple(leaf_modules), frozenset(leaf_names))
    graph = tracer.trace(model, concrete_args=concrete_args)
    name = model.__class__.__name__ if isinstance(model, torch.nn.Module) else model.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    # a forward that assigns an attribute it then reads (self.keys = torch.cat([self.keys, k])) leaves the Proxy
    # on the GraphModule, which copies get_attr targets: such a graph returns Proxies, never tensors
    leaked = [f"{path}.{k}" if path else k for path, m in gm.named_modules() for k, v in vars(m).items()
              if isinstance(v, fx.Proxy)]
    if leaked:
        raise fx.proxy.TraceError(f"the forward assigns Python attributes it reads back ({', '.join(leaked)}): a "
                                  "graph replays tensor operations only, not attribute assignments (a cache that "
                                  "grows on every call cannot be replayed: use a fixed-size cache written in place)")
    return gm


def _export(model, example_inputs) -> fx.GraphModule:
    exported = torch.export.export(model, tuple(example_inputs), strict=False)
    return exported.module()


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict[str, Any] | None = None,
    allow_export: bool = True,
    max_auto_leaves: int = 4,
    methods: Sequence[str] = ("symbolic_trace", "export"),
    keep_fast_paths: bool = True,
    state: ModelState | None = None,
) -> fx.GraphModule:
    """Capture ``model`` as a GraphModule; with ``example_inputs``, annotate every node with shape, dtype and device.

    Before: ``nn.Sequential(nn.Linear(4, 4), nn.ReLU())``. After::

        def forward(self, input):
            _0 = getattr(self, "0")(input);  input = None      # meta["tensor_meta"]: shape (1, 4), float32
            _1 = getattr(self, "1")(_0);  _0 = None
            return _1

    The chain, each attempt recorded in ``gm.meta["fxopt_capture"]``: symbolic_trace; then symbolic_trace with
    the submodule that failed kept as one opaque call (up to ``max_auto_leaves`` of them; not for the torch.nn
    composites that torch.export traces through); then torch.export (with ``example_inputs``). Raises
    :class:`CaptureError` when no method works. With ``example_inputs`` and ``keep_fast_paths``, the torch.nn
    composites that eager runs as one fused op stay opaque calls (NOTE [Fast paths]).

    Every attempt starts from the model's state and leaves it as it was (``state``: the caller's snapshot of the
    model, NOTE [Model state]; one is taken here without it). A graph that captures but cannot run on
    ``example_inputs`` counts as a failed attempt.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"fxopt.capture expects a torch.nn.Module, got {type(model).__name__}. "
            "Wrap a function in an nn.Module whose forward calls it."
        )
    own_state = state is None
    if state is None:
        state = ModelState(model)
    try:
        return _capture(model, example_inputs, leaf_modules, concrete_args, allow_export, max_auto_leaves, methods,
                        keep_fast_paths, state)
    finally:
        state.restore()
        if own_state:
            state.release()


def _capture(model, example_inputs, leaf_modules, concrete_args, allow_export, max_auto_leaves, methods,
             keep_fast_paths, state: ModelState) -> fx.GraphModule:
    attempts: list[CaptureAttempt] = []
    gm: fx.GraphModule | None = None
    leaf_names: list[str] = []
    fast_paths: dict[str, str] = {}
    if keep_fast_paths and example_inputs is not None:
        with state.run():
            fast_paths = fast_path_modules(model, example_inputs)
    for _ in range(1 + max_auto_leaves if "symbolic_trace" in methods else 0):
        method = "symbolic_trace" if not leaf_names else f"symbolic_trace (opaque: {', '.join(leaf_names)})"
        try:
            with state.run():  # a forward may assign attributes, even to Proxies, while it is traced
                gm = _symbolic_trace(model, leaf_modules, concrete_args, [*fast_paths, *leaf_names])
            _annotate_attempt(gm, example_inputs, state)
            attempts.append(CaptureAttempt(method, True))
            break
        except Exception as e:  # symbolic_trace raises many types (TraceError, TypeError, RuntimeError, ...)
            gm = None
            attempts.append(CaptureAttempt(method, False, f"{type(e).__name__}: {e}", _user_frame(e)))
            log.info("%s failed on %s: %s", method, _model_name(model), e)
            culprit = _failing_submodule(model, e, fast_paths)
            if culprit is None or culprit in leaf_names:
                break
            leaf_names.append(culprit)  # keep it as one opaque call, optimize the rest

    # NOTE [Mostly opaque]: a trace whose opaque submodules hold a tenth of the model's weights or more (a
    # transformers model whose embeddings or mask code symbolic_trace cannot take leaves the whole model one call;
    # BERT-base keeps its embeddings and every self-attention opaque, 41% of its weights) runs that much as eager
    # does; torch.export, which traces through them, is tried too and wins when it works.
    # Weights inside fast-path modules (NOTE [Fast paths]) do not count: eager's fused op is what they run anyway.
    mostly_opaque = gm is not None and _opaque_weight_share(model, leaf_names, fast_paths) >= 0.1
    if (gm is None or mostly_opaque) and allow_export and "export" in methods and example_inputs is not None:
        partial = gm
        try:
            with state.run():  # NOTE [Model state]: export runs the forward on fake tensors and writes some back
                gm = _export(model, example_inputs)
            _annotate_attempt(gm, example_inputs, state)
            attempts.append(CaptureAttempt("export", True))
        except Exception as e:  # export's failure modes are as varied; the message is kept for the error below
            gm = partial
            attempts.append(CaptureAttempt("export", False, f"{type(e).__name__}: {e}", _user_frame(e)))
            if partial is not None:  # the partial trace stays: the last successful attempt is what was used
                attempts.append(attempts.pop(-2))

    if gm is None:
        raise CaptureError(_capture_failure_message(model, attempts, example_inputs is not None, allow_export))

    if attempts[-1].method == "export":
        fast_paths = {}  # torch.export traced through every module
    gm.meta["fxopt_capture"] = CaptureInfo(method=attempts[-1].method, attempts=attempts, fast_paths=fast_paths)
    return gm


def _opaque_weight_share(model: Any, opaque: Sequence[str], fast_paths: dict[str, str]) -> float:
    """The share of the model's parameter and buffer elements held by the ``opaque`` submodules outside the
    ``fast_paths`` modules (0 without any)."""
    if not opaque or not isinstance(model, torch.nn.Module):
        return 0.0

    def tensors(names):
        return {id(t): t.numel() for name in names for m in [model.get_submodule(name)]
                for t in itertools.chain(m.parameters(), m.buffers())}

    total = sum(tensors([""]).values())
    fused = tensors(fast_paths)
    held = sum(n for i, n in tensors(opaque).items() if i not in fused)
    return held / total if total else 1.0


def _annotate_attempt(gm: fx.GraphModule, example_inputs: Sequence[Any] | None, state: ModelState) -> None:
    """Annotate a captured graph on copies of the example inputs, the model's state restored after the run."""
    if example_inputs is None:
        return
    from .verify import layout_copy

    with state.run():
        annotate(gm, [layout_copy(a) if isinstance(a, torch.Tensor) else a for a in example_inputs])


def _capture_failure_message(model, attempts: list[CaptureAttempt], had_inputs: bool, allow_export: bool) -> str:
    lines = [f"could not capture {_model_name(model)} into a torch.fx graph."]
    for a in attempts:
        lines.append(f"  {a.method}: {a.error.splitlines()[0] if a.error else 'failed'}")
        if a.where:
            lines.append(f"    at {a.where}")
    lines.append("How to fix it:")
    lines.append(
        "  - data-dependent Python control flow (if/for on tensor values or shapes) cannot be traced symbolically: "
        "pass concrete_args={...} for the arguments that decide it, or"
    )
    lines.append("  - keep the offending submodule as one opaque call: leaf_modules=[TheSubmoduleClass], or")
    if not had_inputs and allow_export:
        lines.append("  - pass example_inputs so fxopt can fall back to torch.export.export(strict=False).")
    else:
        lines.append("  - fix the error torch.export reported above, or optimize a submodule that does trace.")
    return "\n".join(lines)


def annotate(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """Run ``gm`` on ``example_inputs``, store shape/dtype/stride in every node's ``meta["tensor_meta"]``.

    Returns the outputs of that run. Also stores ``meta["device"]`` (a torch.device, or None for non-tensors).
    """
    with torch.no_grad():
        out = _ShapeAndDeviceProp(gm).propagate(*example_inputs)
    return out


class _ShapeAndDeviceProp(ShapeProp):
    """ShapeProp that also records each result's device (ShapeProp's TensorMetadata has none) and whether the
    result holds any tensor at all (``meta["has_tensor"]``: False for sizes and other Python values)."""

    def run_node(self, n: fx.Node) -> Any:
        # ShapeProp.run_node prints a traceback to stderr before re-raising any error; here an error is often
        # expected and handled (an exported graph's guard rejecting a new batch size: the caller exports again), so
        # run the node ourselves and keep ShapeProp's metadata (no fake mode is used here).
        result = fx.Interpreter.run_node(self, n)
        found_tensor = False

        def extract(obj: Any) -> Any:
            nonlocal found_tensor
            if isinstance(obj, torch.Tensor):
                found_tensor = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found_tensor:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        n.meta["device"] = result.device if isinstance(result, torch.Tensor) else None
        n.meta["has_tensor"] = any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(result))
        if n.op == "placeholder" and (result is None or isinstance(result, bool)):
            n.meta["input_value"] = result  # fixed for the specialization (NOTE [Flag inputs])
        else:
            n.meta.pop("input_value", None)  # a graph annotated again for other inputs
        return result
