"""What a pass is, what it records, and the runner that checks each one against eager."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from .. import launches
from ..capture import annotate
from ..errors import PassError
from ..state import Effects, ModelState, compare_effects
from ..verify import against_reference, compare, computed_precision, is_16bit, layout_copy, tf32_in_use, upcast

log = logging.getLogger(__name__)

PassFn = Callable[[fx.GraphModule], PassResult]

# Everything the passes have done in this process, keyed "pass_name.what" (chains fused, nodes removed, ...).
stats: Counter[str] = Counter()


@dataclass
class Pass:
    """A named pass. ``fn`` takes a GraphModule and returns a PassResult whose ``modified`` is truthful."""

    name: str
    fn: PassFn
    description: str = ""
    after: str = ""  # an opt-in pass: the default pipeline's pass it runs after when enabled (else: appended)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.fn(gm)


@dataclass
class PassLog:
    """What one run of a pass did: counts (``fused_groups=3``) and notes (fallbacks with their reasons)."""

    counts: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


_current_log: contextvars.ContextVar[PassLog | None] = contextvars.ContextVar("fxopt_pass_log", default=None)


def record(**counts: int) -> None:
    """Called by a pass to count what it changed; the runner attaches it to the pass's record."""
    plog = _current_log.get()
    if plog is not None:
        plog.counts.update(counts)


def note(message: str) -> None:
    """Called by a pass to explain a decision (a fallback and its reason); shown in the report."""
    log.info(message)
    plog = _current_log.get()
    if plog is not None:
        plog.notes.append(message)


@contextlib.contextmanager
def _collect(pass_name: str) -> Iterator[PassLog]:
    plog = PassLog()
    token = _current_log.set(plog)
    try:
        yield plog
    finally:
        _current_log.reset(token)
        for k, v in plog.counts.items():
            stats[f"{pass_name}.{k}"] += v


@contextlib.contextmanager
def separate_log() -> Iterator[PassLog]:
    """For a pass that runs another pass as a tool (to build the baseline it times against): that pass's notes and
    counts go to a log of their own, out of the calling pass's record and out of ``stats``."""
    token = _current_log.set(PassLog())
    try:
        yield _current_log.get()
    finally:
        _current_log.reset(token)


def tag(node: fx.Node, pass_name: str) -> fx.Node:
    """Mark a node as created by a pass (``node.meta["fxopt_from_pass"]``), for reports and debugging."""
    node.meta["fxopt_from_pass"] = pass_name
    return node


def new_attr(gm: fx.GraphModule, base: str, value: torch.Tensor | nn.Module) -> str:
    """Register ``value`` as a new top-level attribute of ``gm`` under a fresh name; returns the name."""
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    if isinstance(value, nn.Module):
        gm.add_submodule(name, value)
    else:
        gm.register_buffer(name, value)
    return name


@dataclass
class PassRecord:
    """One pass's entry in an OptimizedModule's record."""

    name: str
    status: str  # "applied" | "unchanged" | "rolled back" | "disabled" | "measured slower" (NOTE [Layout by measurement])
    static_before: int | None = None
    static_after: int | None = None
    dispatched_before: int | None = None
    dispatched_after: int | None = None
    seconds: float = 0.0
    changes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph and module tree that shares its tensors (parameters, buffers, constants):
    cheap enough to take before every pass, and passes never mutate tensors in place (passes/README.md)."""
    memo: dict[int, Any] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        memo[id(t)] = t
    for m in gm.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):
                memo[id(v)] = v
    with warnings.catch_warnings():
        # torch 2.13 warns once per copied pytree spec of an exported graph ("isinstance(treespec, LeafSpec) is
        # deprecated"): torch's own pickling, about 25 lines per optimize, nothing the user can act on
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(gm, memo)


def _dispatched(gm: fx.GraphModule, inputs: Sequence[Any]) -> int | None:
    """ATen ops one run dispatches, or None when the counting run fails. It runs under a TorchDispatchMode, where
    a few composite ops take another path than in plain eager (CPU max_pool1d without grad returns a contiguous
    tensor; under a mode, a strided one a later ``.view`` rejects: fuzz seed 7701018): only the count is lost."""
    try:
        return sum(launches.dispatched_ops(gm, inputs).values())
    except Exception as e:  # noqa: BLE001 -- accounting must not take the optimization (or the caller) down
        log.info("dispatched-op count unavailable: %s: %s", type(e).__name__, e)
        return None


class _Float32Reference:
    """The graph as captured, run once in float32 on float32 copies of the inputs, for judging 16-bit results (NOTE
    [16-bit reference] in fxopt/verify.py). Its own copy of the graph: the user's tensors are not touched."""

    def __init__(self, gm: fx.GraphModule, fresh: Callable[[], tuple], isolated: Callable):
        self._graph = snapshot(gm)  # the graph before any pass (it shares the model's tensors)
        self._fresh, self._isolated = fresh, isolated
        self._outputs: Any = None
        self._why_not: str | None = None

    def _upcast_graph(self) -> fx.GraphModule:
        """A copy of the graph whose 16-bit parameters, buffers and tensor attributes are new float32 tensors;
        other tensors stay shared (a run is isolated: what it writes into them is undone)."""
        memo: dict[int, Any] = {}
        wide = (torch.float16, torch.bfloat16)
        for m in self._graph.modules():
            for t in list(m._parameters.values()) + list(m._buffers.values()) + list(vars(m).values()):
                if isinstance(t, torch.Tensor) and id(t) not in memo:
                    if t.dtype not in wide:
                        memo[id(t)] = t
                    elif isinstance(t, nn.Parameter):
                        memo[id(t)] = nn.Parameter(t.detach().float(), requires_grad=False)
                    else:
                        memo[id(t)] = t.detach().float()
        return copy.deepcopy(self._graph, memo)

    def outputs(self) -> Any:
        if self._outputs is None and self._why_not is None:
            try:
                graph = self._upcast_graph()
                with torch.no_grad(), self._isolated():
                    self._outputs = graph(*upcast(self._fresh()))
            except Exception as e:  # noqa: BLE001 -- then the comparison with eager decides alone
                self._why_not = f"{type(e).__name__}: {e}"
                log.info("no float32 reference run: %s", self._why_not)
        return self._outputs

    def judge(self, outputs: Any, eager: Any) -> tuple[bool, str] | None:
        """(stands, why) against the float32 run, or None without one."""
        reference = self.outputs()
        return None if reference is None else against_reference(outputs, eager, reference)


def run_passes(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    passes: Sequence[Pass],
    *,
    reference_outputs: Any,
    verify: bool = True,
    strict: bool = False,
    disabled: Sequence[str] = (),
    state: ModelState | None = None,
    reference_effects: Effects | None = None,
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run ``passes`` in order. After each: lint, re-annotate shapes, compare with eager, count launches.

    A pass that raises, breaks the graph or changes the outputs beyond tolerance is rolled back with a warning
    naming it and the reason (``strict=True`` raises :class:`PassError` instead). ``state``: the snapshot of the
    model whose tensors the graph shares; each run is undone after it (NOTE [Model state] in fxopt/state.py), and
    with ``reference_effects`` (what eager's run changed) a pass whose graph changes the model's state differently
    (a cache write dropped or moved) counts as breaking the numerics.
    """
    records: list[PassRecord] = []

    def fresh() -> tuple:  # every run gets copies: a graph that writes its inputs must not change the caller's
        return tuple(layout_copy(a) if isinstance(a, torch.Tensor) else a for a in example_inputs)

    def isolated() -> contextlib.AbstractContextManager[Effects]:  # a run whose state changes are undone after it
        return state.run() if state is not None else contextlib.nullcontext(Effects())

    def count(graph: fx.GraphModule) -> int | None:
        with isolated():
            return _dispatched(graph, fresh())

    float32_reference = _Float32Reference(gm, fresh, isolated)  # NOTE [16-bit reference], run when first needed
    tf32 = tf32_in_use(gm)  # NOTE [TF32]: the eager reference itself is only that accurate
    precision = computed_precision(gm)  # NOTE [Computed precision], of the graph as eager computes it
    static = launches.static_count(gm)
    dispatched = count(gm)
    done: list[str] = []
    for p in passes:
        if p.name in disabled:
            records.append(PassRecord(p.name, "disabled", static, static, dispatched, dispatched))
            continue
        before = snapshot(gm)
        rec = PassRecord(p.name, "applied", static_before=static, dispatched_before=dispatched)
        failure = None
        with _collect(p.name) as plog:
            t0 = time.perf_counter()
            try:
                with isolated():  # a pass may run part of the graph (constant folding evaluates subgraphs)
                    result = p.fn(gm)
                rec.seconds = time.perf_counter() - t0
                candidate = result.graph_module
                if result.modified:
                    candidate.graph.lint()
                    candidate.recompile()
                    with isolated() as effects:
                        outputs = annotate(candidate, fresh())
                    if verify:
                        mismatch = compare(outputs, reference_outputs, tf32=tf32, precision=precision)
                        if mismatch is not None and is_16bit(reference_outputs):
                            judged = float32_reference.judge(outputs, reference_outputs)
                            if judged is not None and judged[0]:
                                note(f"{p.name}: outputs differ from eager's ({mismatch}) but are as close to a "
                                     f"float32 run as eager's (NOTE [16-bit reference]; {judged[1]})")
                                mismatch = None
                            elif judged is not None:
                                mismatch = f"{mismatch}; against a float32 run, {judged[1]}"
                        if mismatch is not None:
                            failure = f"outputs differ from eager after {p.name}: {mismatch}"
                        elif reference_effects is not None:
                            problem = compare_effects(effects, reference_effects)
                            if problem is not None:
                                failure = f"the model's state differs from eager's after {p.name}: {problem}"
            except Exception as e:  # a pass failure must not take the user's program down; it is rolled back
                rec.seconds = time.perf_counter() - t0
                failure = f"{type(e).__name__}: {e}"
                if strict:
                    raise PassError(
                        f"pass {p.name!r} raised after passes {done}: {failure}") from e
        rec.changes = dict(plog.counts)
        rec.notes = list(plog.notes)
        if failure is not None:
            if strict:
                raise PassError(f"pass {p.name!r} (after {done}) was rolled back: {failure}")
            warnings.warn(f"fxopt: pass {p.name!r} rolled back: {failure}", RuntimeWarning, stacklevel=3)
            gm = before
            with isolated():
                annotate(gm, fresh())
            rec.status, rec.error = "rolled back", failure
            rec.static_after, rec.dispatched_after = static, dispatched
        elif not result.modified:
            rec.status = "unchanged"
            rec.static_after, rec.dispatched_after = static, dispatched
        else:
            gm = candidate
            static = launches.static_count(gm)
            dispatched = count(gm)
            rec.static_after, rec.dispatched_after = static, dispatched
        records.append(rec)
        done.append(p.name)
    return gm, records
