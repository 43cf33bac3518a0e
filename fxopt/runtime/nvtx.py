"""NVTX ranges named for graph nodes, so that a profiler timeline shows which node each kernel came from.

Off by default. One switch turns it on: ``FXOPT_NVTX=1`` in the environment, or from Python::

    from fxopt.runtime.nvtx import nvtx

    nvtx(True)                          # on from here (nvtx(False): off again)
    with nvtx():                        # on inside the block, the previous setting after it
        opt = fxopt.optimize(model, example_inputs)

    # nsys profile -t cuda,nvtx python serve.py      (FXOPT_NVTX=1 in its environment)

The switch is read when what runs is built, never per call: when a specialization is lowered (runtime/lower.py's
``lower_for_execution``: at ``optimize`` with example inputs, at the first call of each new input signature, at
``fxopt.load``) and, with CUDA graphs, when a signature's replay is set up (its first call). What was built while it
was off has no ranges, so the simplest is ``FXOPT_NVTX=1`` for the whole profiled process, or ``nvtx(True)`` before
optimizing; ``with nvtx():`` gives ranges to what is built inside the block. NOTE [NVTX ranges] says what the ranges
are and what they cost.

NOTE [NVTX ranges]: with the switch on, each node of the optimized graph that launches a kernel (``ops.
launches_kernel``: what the static launch count counts) runs inside one range, in the lowered runner's own code::

    conv2d = nvtx_torch_conv2d('layer1.0.conv1 (Conv2d)', x, _w0, _w1, (1, 1), (1, 1), (1, 1), 1)
    fxopt_add_relu_0b4d68c5_cuda_1 = nvtx_fxopt_kernels_fxopt_add_relu_0b4d68c5_cuda(
        'fused_1 (fxopt_add_relu_0b4d68c5_cuda) [fxopt kernel]', (conv2d_2, getitem))
    linear = nvtx_torch_ops_aten_linear_default('fc (linear) @ model.py:41', flatten, _w7, _w8)   # torch.export

``nvtx_<callee>(name, *args)`` pushes the range, calls the node's own callee with its own arguments and pops the
range in a ``finally``: ranges stay balanced when a node raises. Range names (:func:`range_name`): where the node
comes from (the innermost module of ``meta["nn_module_stack"]``, else the node's name), what it runs (the module's
class, the op, or the fxopt kernel, marked ``[fxopt kernel]``), and ``@ file:line``, the innermost frame of
``meta["stack_trace"]`` outside torch, where the capture recorded one (torch.export does; symbolic_trace does not).
The names, in execution order, are in ``runner.meta["fxopt_nvtx_ranges"]``.

Where the ranges go. On a CUDA build of torch, NVTX (``torch.cuda.nvtx.range_push`` / ``range_pop``): Nsight Systems
shows them on the calling thread, and projects each onto the GPU row of the kernels launched inside it, so every
kernel sits under its node. A CPU-only build has no NVTX (``torch.cuda.nvtx`` raises there); the ranges are then
profiler ranges (``torch._C._profiler._RecordFunctionFast``, else ``torch.profiler.record_function``), which
``torch.profiler`` and its Chrome trace show around the node's ATen ops. The kind is chosen at lowering time.

CUDA graphs (``cuda_graphs=True``). The node ranges run at warm-up, at capture and in the eager check after it:
that is when the profiler records them. A CUDA graph records kernels, not NVTX calls, so a replay emits none of the
node ranges; each replay instead runs inside one range named for its signature, ``CUDA graph replay:
float32[1, 3, 224, 224]@cuda:0``, around the graph launch, and the replayed kernels show under it (one block, or one per
kernel with ``nsys profile --cuda-graph-trace=node``). To see which node a replayed kernel belongs to, profile once
with ``cuda_graphs=False``, or match it with the ranges around the capture.

Cost. Off, nothing: the runner is exactly what it is without this module (no check of the switch per call; the
decision was taken when the runner was built). On, each launching node pays one Python call and a push and a pop,
well under a microsecond of host time each: timings taken with the switch on attribute time to nodes; latency
figures are taken with it off.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any, Callable

import torch
import torch.fx as fx

from .. import ops
from .kernel import fused_op

log = logging.getLogger(__name__)

__all__ = ["ENV", "add_ranges", "enabled", "nvtx", "range_kind", "range_name", "replay_range"]

ENV = "FXOPT_NVTX"
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("", "0", "false", "off", "no")

_override: bool | None = None  # set from Python (nvtx(...)); None: the environment decides


def enabled() -> bool:
    """Whether lowering adds ranges now: the last :class:`nvtx` setting still in force, else ``FXOPT_NVTX``."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected 1 (NVTX ranges for graph nodes on) or 0 (off)")


class nvtx:  # lower case: used like a function, nvtx(True) / with nvtx(): ...
    """Turn the node ranges on or off (NOTE [NVTX ranges]): a setter now, and a context manager that restores the
    previous setting on exit. ``enabled=None`` hands the decision back to ``FXOPT_NVTX``. Process-wide, like the
    environment variable; read when a runner is built, not per call."""

    def __init__(self, enabled: bool | None = True):
        global _override
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"nvtx(enabled=...) takes True, False or None, got {type(enabled).__name__}")
        self._previous = _override
        _override = enabled

    def __enter__(self) -> "nvtx":
        return self

    def __exit__(self, *exc: object) -> None:
        global _override
        _override = self._previous


# -- range names -------------------------------------------------------------------------------------------------------
_FRAME = re.compile(r'^\s*File "(?P<path>.+)", line (?P<line>\d+), in ')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def range_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """``where (what)`` for a node of the optimized graph: ``layer1.0.conv1 (Conv2d)``, ``fused_1
    (fxopt_add_relu_0b4d68c5_cuda) [fxopt kernel]``, ``fc (linear) @ model.py:41``."""
    if node.op == "call_function" and node.target is fused_op:
        return f"{node.name} ({node.args[0]}) [fxopt kernel]"
    name = f"{_module_path(node) or node.name} ({_what(node, gm)})"
    source = _source_line(node)
    return f"{name} @ {source}" if source else name


def _module_path(node: fx.Node) -> str | None:
    """The innermost module of ``nn_module_stack`` (symbolic_trace: ``(path, class)``; torch.export: ``(path,
    type name)``, the root's path empty)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for value in reversed(list(stack.values())):
        path = value[0] if isinstance(value, tuple) else value
        if isinstance(path, str) and path:
            return path
    return None


def _what(node: fx.Node, gm: fx.GraphModule) -> str:
    target = node.target
    if node.op == "call_module":
        return type(gm.get_submodule(target)).__name__
    if node.op == "call_method":
        return target
    if isinstance(target, torch._ops.OpOverload):
        packet = target.overloadpacket.__name__
        return packet if target.namespace == "aten" else f"{target.namespace}.{packet}"
    return getattr(target, "__name__", None) or type(target).__name__


def _source_line(node: fx.Node) -> str | None:
    """``file.py:line`` of the innermost frame of ``meta["stack_trace"]`` that is not in torch itself."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    for line in reversed(trace.splitlines()):
        m = _FRAME.match(line)
        if m and not os.path.abspath(m["path"]).startswith(_TORCH_DIR):
            return f"{os.path.basename(m['path'])}:{m['line']}"
    return None


# -- the ranges --------------------------------------------------------------------------------------------------------
def range_kind() -> str:
    """``"nvtx"`` on a CUDA build of torch (``torch.cuda.nvtx`` works there), else ``"record_function"``."""
    return "nvtx" if hasattr(torch._C, "_nvtx") else "record_function"


class _Ranges:
    """Makes the callables that run a callee inside a named range, of the kind this torch build has; the range
    functions are looked up once, here (tests replace ``torch.cuda.nvtx.range_push`` / ``range_pop`` before)."""

    def __init__(self):
        self.kind = range_kind()
        self._made: dict[int, tuple[Any, Callable]] = {}  # id(callee) -> (callee, its ranged twin)
        if self.kind == "nvtx":
            self._push, self._pop = torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
        else:
            self._record = getattr(torch._C._profiler, "_RecordFunctionFast", None) or \
                torch.profiler.record_function

    def wrap(self, fn: Callable, name: str) -> Callable:
        """``ranged(range_name, *args, **kwargs)``: ``fn(*args, **kwargs)`` inside a range called ``range_name``;
        named ``name`` in generated code. One per callee."""
        made = self._made.get(id(fn))
        if made is not None:
            return made[1]
        if self.kind == "nvtx":
            push, pop = self._push, self._pop

            def ranged(range_name, /, *args, **kwargs):
                push(range_name)
                try:
                    return fn(*args, **kwargs)
                finally:
                    pop()
        else:
            record = self._record

            def ranged(range_name, /, *args, **kwargs):
                with record(range_name):
                    return fn(*args, **kwargs)

        ranged.__name__ = ranged.__qualname__ = name
        ranged.__module__ = "nvtx"  # torch.fx names it nvtx_<name> in the runner's code
        ranged.__wrapped__ = fn
        self._made[id(fn)] = (fn, ranged)
        return ranged


def _call_module(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


def _method_caller(method: str) -> Callable:
    def call_method(obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, method)(*args, **kwargs)

    return call_method


def _code_name(fn: Callable) -> str:
    """A name for ``fn``'s ranged twin: what torch.fx calls ``fn`` in generated code, as an identifier."""
    try:
        qualified = fx.node._get_qualified_name(fn)
    except (AttributeError, RuntimeError):  # a callee torch.fx cannot name (a lambda): its plain name will do
        qualified = getattr(fn, "__name__", None) or type(fn).__name__
    return re.sub(r"\W", "_", qualified)


def add_ranges(graph: fx.Graph, gm: fx.GraphModule, env: dict[fx.Node, fx.Node]) -> list[str]:
    """NOTE [NVTX ranges]: rewrite the lowered ``graph`` (built from ``gm``; ``env`` maps each node of ``gm`` to
    its node in ``graph``) so that every node of ``gm`` that launches a kernel runs inside a range named by
    :func:`range_name`. In place, keeping node names and users; returns the range names in execution order.

    Before / after, per launching node (call_module and call_method nodes become calls of their ranged twins too,
    the module read by a get_attr)::

        conv2d = torch.conv2d(x, _w0, _w1, (1, 1), (1, 1), (1, 1), 1)
        conv2d = nvtx_torch_conv2d('conv1 (Conv2d)', x, _w0, _w1, (1, 1), (1, 1), (1, 1), 1)
    """
    names = {env[n]: range_name(n, gm) for n in gm.graph.nodes if n in env and ops.launches_kernel(n, gm)}
    ranges, order, methods = _Ranges(), [], {}
    for node in list(graph.nodes):
        name = names.get(node)
        if name is None or node.op not in ("call_function", "call_method", "call_module"):
            continue  # launches nothing, or folded into a constant when lowering (a view of a weight)
        if node.op == "call_function":
            node.target = ranges.wrap(node.target, _code_name(node.target))
            node.args = (name, *node.args)
        elif node.op == "call_method":
            caller = methods.setdefault(node.target, _method_caller(node.target))
            node.op, node.target = "call_function", ranges.wrap(caller, f"method_{node.target}")
            node.args = (name, *node.args)
        else:
            with graph.inserting_before(node):
                module = graph.get_attr(node.target)
            node.op, node.target = "call_function", ranges.wrap(_call_module, "call_module")
            node.args = (name, module, *node.args)
        order.append(name)
    log.info("NVTX: %d node ranges (%s)", len(order), ranges.kind)
    return order


def replay_range(run: Callable[[tuple], Any], name: str) -> Callable[[tuple], Any]:
    """A CUDA-graph runner's per-signature call ``run(args)`` inside a range called ``name`` when the switch is on;
    ``run`` itself when it is off (NOTE [NVTX ranges]: replays emit no node ranges)."""
    if not enabled():
        return run
    ranged = _Ranges().wrap(run, "replay")

    @functools.wraps(run)  # keeps run's attributes (run_native.native)
    def replay(args: tuple) -> Any:
        return ranged(name, args)

    return replay
