"""The state a model's forward can change, snapshotted before fxopt runs the model and restored after each run.

NOTE [Model state]: ``fxopt.optimize`` runs the model several times before the user's first call: eager for the
reference outputs, torch.export (which runs the Python code on fake tensors and writes some results back to the
real ones), the captured graph, and the graph again after every pass. A stateful model changes state on each of
these runs: a transformers ``StaticCache`` writes keys and values with ``index_copy_`` and bumps a length counter,
and allocates its tensors on the first run (``lazy_initialization``, which under torch.export stores *fake*
tensors on the cache: the next eager run then computed with them and its fake outputs reached ``verify.compare``).
Two rules follow, and :class:`ModelState` keeps both:

1. every run fxopt makes starts from the state the user's model had, and the user's model is left exactly as it
   was (bit for bit, tensor versions included): nothing the user can see changes until they call the module;
2. a run's *effects* on that state are part of its result: a captured or rewritten graph must write the same
   tensors with the same values as eager does, and a model whose forward assigns Python attributes (the lazily
   allocated cache) cannot be captured faithfully at all (a graph replays tensor operations, not assignments).

What is snapshotted, walking the module tree and every plain Python object reachable from a module's attributes
(dicts, lists, tuples, objects with a ``__dict__``, to ``MAX_DEPTH`` levels): a shallow copy of each object's
attributes (each module's parameter, buffer and submodule dicts included), and a copy of every tensor that is not
a parameter (buffers, tensor attributes, tensors held by plain objects such as a cache). Parameters are not
copied, so the weights are never held twice; their version counters are recorded, and a run that writes one is
reported (``Effects.parameters_written``) since it cannot be undone. The copies cost the size of the buffers and
caches (:attr:`ModelState.nbytes`) while ``optimize`` specializes, and are dropped when it is done (``release``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

log = logging.getLogger(__name__)

MAX_DEPTH = 8  # levels of plain Python objects followed below a module attribute
MAX_OBJECTS = 50_000  # objects visited at most; beyond it the walk stops, with a log line

# Values that hold no mutable state worth following.
_ATOMIC = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size, torch.layout,
           torch.memory_format, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.ModuleType, functools.partial, weakref.ref, fx.Graph, fx.Node, threading.Thread, logging.Logger,
           range, slice)

# nn.Module's own bookkeeping (hooks, flags), beside the parameter/buffer/submodule dicts walked below.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"_parameters", "_buffers", "_modules"}

_set_version = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)


@dataclass
class _TensorRecord:
    path: str
    tensor: torch.Tensor
    version: int | None  # None for inference tensors, which keep no version counter
    copy: torch.Tensor | None  # None for parameters


@dataclass
class Effects:
    """What one run changed in the model's state (before it was restored).

    ``written``: path -> value after the run, for each tensor whose contents changed. ``assigned``: Python
    attributes assigned, added or removed (``"cache.layers[0].keys"``). ``parameters_written``: parameters written
    in place (not restorable).
    """

    written: dict[str, torch.Tensor] = field(default_factory=dict)
    assigned: list[str] = field(default_factory=list)
    parameters_written: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.written or self.assigned or self.parameters_written)

    def describe(self, limit: int = 4) -> str:
        parts = [f"{what} {_some(names, limit)}" for what, names in (
            ("writes", list(self.written)), ("assigns", self.assigned), ("writes parameters", self.parameters_written))
            if names]
        return "; ".join(parts) or "no state changes"


def _same_value(a: Any, b: Any) -> bool:
    """Whether an attribute reassigned to ``b`` still holds what ``a`` held (``self.shape = tuple(x.shape)``)."""
    if a is b:
        return True
    simple = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)
    if isinstance(a, simple) and type(a) is type(b):
        return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
    if isinstance(a, tuple) and type(a) is type(b) and len(a) == len(b):
        return all(_same_value(x, y) for x, y in zip(a, b))
    return False


class ModelState:
    """A snapshot of the state reachable from ``root`` (NOTE [Model state]); ``restore`` puts it back.

    Typical use, around every run fxopt makes of the model or of a graph sharing its tensors::

        state = ModelState(model)
        with state.run() as effects:    # restored on exit, also when the run raises
            out = model(*inputs)
        effects.written                 # what the run wrote
        state.release()                 # drop the copies
    """

    def __init__(self, root: nn.Module, name: str | None = None):
        self.name = name or type(root).__qualname__
        self._objects: list[tuple[str, Any, Any]] = []  # (path, object, shallow copy of its attributes / items)
        self._tensors: list[_TensorRecord] = []
        self._seen: set[int] = set()
        self._visited = 0
        self._truncated = False
        self._walk(root, "", 0)
        del self._seen
        if self._truncated:
            log.info("state snapshot of %s stopped after %d objects; state beyond them is not restored",
                     self.name, MAX_OBJECTS)

    # -- snapshot ------------------------------------------------------------------------------------------------
    def _walk(self, obj: Any, path: str, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self._seen:
                self._seen.add(id(obj))
                self._record_tensor(obj, path)
            return
        if isinstance(obj, _ATOMIC) or id(obj) in self._seen or depth > MAX_DEPTH:
            return
        if self._visited >= MAX_OBJECTS:
            self._truncated = True
            return
        self._seen.add(id(obj))
        self._visited += 1
        if isinstance(obj, nn.Module):
            attrs = vars(obj)
            self._objects.append((path or "<root>", obj, dict(attrs)))
            prefix = f"{path}." if path else ""
            for key in ("_parameters", "_buffers", "_modules"):
                table = attrs.get(key)
                if isinstance(table, dict):
                    self._seen.add(id(table))
                    self._objects.append((f"{prefix}{key}", table, dict(table)))
                    for k, v in table.items():
                        if v is not None:
                            self._walk(v, f"{prefix}{k}", depth if key == "_modules" else depth + 1)
            for k, v in attrs.items():
                if k not in _MODULE_INTERNALS and k not in ("_parameters", "_buffers", "_modules"):
                    self._walk(v, f"{prefix}{k}", depth + 1)
        elif isinstance(obj, dict):
            self._objects.append((path, obj, dict(obj)))
            for k, v in obj.items():
                self._walk(v, f"{path}[{k!r}]", depth + 1)
        elif isinstance(obj, list):
            self._objects.append((path, obj, list(obj)))
            for i, v in enumerate(obj):
                self._walk(v, f"{path}[{i}]", depth + 1)
        elif isinstance(obj, tuple):
            for i, v in enumerate(obj):
                self._walk(v, f"{path}[{i}]", depth + 1)
        elif isinstance(getattr(obj, "__dict__", None), dict):
            attrs = vars(obj)
            self._objects.append((path, obj, dict(attrs)))
            for k, v in attrs.items():
                self._walk(v, f"{path}.{k}", depth + 1)

    def _record_tensor(self, t: torch.Tensor, path: str) -> None:
        inference = t.is_inference()
        version = None if inference else t._version
        if isinstance(t, nn.Parameter):
            self._tensors.append(_TensorRecord(path, t, version, None))
            return
        if t.layout != torch.strided or type(t) is not torch.Tensor:
            # sparse tensors, tensor subclasses (a FakeTensor left over from elsewhere): kept by identity only
            self._tensors.append(_TensorRecord(path, t, version, None))
            return
        with torch.no_grad(), (torch.inference_mode() if inference else contextlib.nullcontext()):
            copy = t.detach().clone(memory_format=torch.preserve_format)
        self._tensors.append(_TensorRecord(path, t, version, copy))

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensor copies."""
        return sum(r.copy.untyped_storage().nbytes() for r in self._tensors if r.copy is not None)

    # -- what changed ----------------------------------------------------------------------------------------------
    def _changed_tensors(self) -> list[_TensorRecord]:
        changed = []
        for r in self._tensors:
            if r.version is not None:
                if r.tensor._version != r.version:
                    changed.append(r)
            elif r.copy is not None and not torch.equal(r.tensor, r.copy):  # inference tensor: compare contents
                changed.append(r)
        return changed

    def effects(self) -> Effects:
        """What changed since the snapshot (or the last restore), without restoring it."""
        fx_effects = Effects()
        for r in self._changed_tensors():
            if r.copy is None:
                if isinstance(r.tensor, nn.Parameter):
                    fx_effects.parameters_written.append(r.path)
                continue
            if r.tensor.shape != r.copy.shape or not torch.equal(r.tensor, r.copy):  # a write of the same values
                with torch.no_grad():
                    fx_effects.written[r.path] = r.tensor.detach().clone()
        assigned: list[tuple[bool, str]] = []  # (not a tensor now, path): tensors named first in messages
        for path, obj, saved in self._objects:
            if isinstance(saved, dict):
                now = obj if isinstance(obj, dict) else vars(obj)
                for k in saved.keys() | now.keys():
                    if k not in now or k not in saved or not _same_value(saved[k], now[k]):
                        assigned.append((not isinstance(now.get(k), torch.Tensor), _attr_path(path, obj, k)))
            elif len(saved) != len(obj) or any(a is not b for a, b in zip(saved, obj)):
                assigned.append((True, path))
        fx_effects.assigned = [p for _, p in sorted(assigned)]
        return fx_effects

    # -- restore ---------------------------------------------------------------------------------------------------
    def restore(self) -> None:
        """Put every recorded attribute and tensor back as it was at the snapshot, tensor versions included."""
        for _, obj, saved in self._objects:
            if isinstance(saved, dict):
                now = obj if isinstance(obj, dict) else vars(obj)
                if now.keys() != saved.keys() or any(now[k] is not v for k, v in saved.items()):
                    now.clear()  # raw dict writes: no Module.__setattr__ or property in between
                    now.update(saved)
            elif len(saved) != len(obj) or any(a is not b for a, b in zip(saved, obj)):
                obj[:] = saved
        changed = self._changed_tensors()
        for r in changed:
            if r.copy is None:
                continue  # a parameter: reported by effects(), not restorable
            with torch.no_grad(), (torch.inference_mode() if r.version is None else contextlib.nullcontext()):
                if r.tensor.shape != r.copy.shape or r.tensor.stride() != r.copy.stride():
                    r.tensor.set_(r.copy.clone(memory_format=torch.preserve_format))  # resize_ or set_ in forward
                else:
                    r.tensor.copy_(r.copy)
        restorable = [r for r in changed if r.version is not None and r.copy is not None]
        if restorable:
            _restore_versions(restorable)

    @contextlib.contextmanager
    def run(self) -> Iterator[Effects]:
        """Around one run: yields an :class:`Effects` filled in when the block ends, then restores the snapshot."""
        result = Effects()
        try:
            yield result
        finally:
            found = self.effects()
            result.written, result.assigned = found.written, found.assigned
            result.parameters_written = found.parameters_written
            self.restore()

    def release(self) -> None:
        """Drop the copies (after the last restore)."""
        self._tensors.clear()
        self._objects.clear()


@contextlib.contextmanager
def preserved(root: nn.Module) -> Iterator[Effects]:
    """Runs inside the block leave ``root``'s state as it was (a snapshot, restored on exit, then dropped)."""
    state = ModelState(root)
    try:
        with state.run() as effects:
            yield effects
    finally:
        state.release()


def _restore_versions(records: list[_TensorRecord]) -> None:
    """Set the tensors' version counters back to the snapshot's, so that nothing watching versions (autograd's
    saved-tensor checks, NOTE [Frozen weights]) sees fxopt's runs. torch 2.13 takes tuples, older releases one
    tensor; without the setter the new versions become the baseline."""
    if _set_version is None:
        for r in records:
            r.version = r.tensor._version
        return
    try:
        _set_version(tuple(r.tensor for r in records), tuple(r.version for r in records))
    except TypeError:  # the one-tensor form of older torch
        for r in records:
            _set_version(r.tensor, r.version)


def _attr_path(path: str, obj: Any, key: Any) -> str:
    if isinstance(obj, dict) and path.endswith(("._parameters", "._buffers", "._modules")):
        return f"{path.rsplit('.', 1)[0]}.{key}"
    if path in ("_parameters", "_buffers", "_modules"):
        return str(key)
    if isinstance(obj, dict):
        return f"{path}[{key!r}]"
    return f"{path}.{key}" if path != "<root>" else str(key)


def _some(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


def compare_effects(actual: Effects, expected: Effects) -> str | None:
    """Why a graph's run did not change the model's state as eager's did (None when it did): the same Python
    attributes assigned, the same tensors written, with values within the tolerance of their dtype."""
    from .verify import compare

    if sorted(actual.assigned) != sorted(expected.assigned):
        if expected.assigned and not actual.assigned:
            return (f"the model's forward assigns Python attributes ({_some(expected.assigned)}), which a captured "
                    "graph does not do: it replays tensor operations only. State allocated on the first call can "
                    "be created before optimizing (call the model once, or for a transformers StaticCache call "
                    "early_initialization); a cache that grows on every call (torch.cat, transformers' "
                    "DynamicCache) cannot be replayed: use a fixed-size cache written in place (StaticCache, or "
                    "index_copy_ into a preallocated buffer), or optimize a submodule that keeps no such state")
        return f"eager assigns {_some(expected.assigned) or 'no attributes'}, the graph {_some(actual.assigned)}"
    if actual.written.keys() != expected.written.keys():
        missing = [p for p in expected.written if p not in actual.written]
        extra = [p for p in actual.written if p not in expected.written]
        return (f"the tensors written differ from eager's: not written {_some(missing)}; written only by the "
                f"graph {_some(extra)}")
    for path in expected.written:
        mismatch = compare(actual.written[path], expected.written[path])
        if mismatch is not None:
            return f"{path} after the run: {mismatch.reason}"
    return None


def eval_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The model in eval mode without touching the caller's: a copy of its module objects that shares everything
    they hold. Sharing keeps fxopt's memory to what the passes create (folded weights): a deep copy held a second
    set of every weight (ResNet-18: +45 MiB, bench_memory.py). Safe because nothing fxopt runs writes a weight:
    eval mode updates no running statistics, and passes create new tensors (passes/README.md).

    NOTE [Shared state]: only the modules are copied (their training flag, their attribute tables, their hooks);
    parameters, buffers, tensor attributes and plain Python objects a module holds (a transformers StaticCache,
    a config) are the model's own. A copied cache would be the one the optimized module writes while the model's
    stays as it was: a decode loop that reads ``model.cache``, or resets it between prompts, would go silently
    wrong. Shared, calling the optimized module changes the model's state exactly as calling the model does, and
    the runs fxopt makes while optimizing undo what they change (NOTE [Model state] in fxopt/state.py)."""
    if not any(m.training for m in model.modules()):
        # Already in eval mode: the model itself. Calling fxopt's fallback then assigns what the model's forward
        # assigns on the caller's modules (a cache grown with torch.cat), as calling the model does.
        return model
    internals = set(vars(torch.nn.Module()))
    memo: dict[int, Any] = {}
    for m in model.modules():
        for v in (*m._parameters.values(), *m._buffers.values()):
            memo[id(v)] = v
        for k, v in vars(m).items():
            if k not in internals and not isinstance(v, torch.nn.Module):
                memo[id(v)] = v
    return copy.deepcopy(model, memo).eval()
