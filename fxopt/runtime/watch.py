"""Noticing, at call time, that a model changed after fxopt optimized it (NOTE [Frozen weights] in api.py).

An optimized module is built from the weights it saw: it copied what it folded (BatchNorm into convolutions,
constant subgraphs), its CUDA graphs read the weights at fixed addresses, and its kernels were built for their dtype
and device. A :class:`WeightWatch` tells, before every call, whether any of that may have changed since:

* an in-place write into a parameter or buffer (``load_state_dict``, an optimizer step, ``p.mul_(2)`` under
  ``no_grad``): the tensor's version counter moves;
* new data behind the same tensor (``model.to(...)``, ``model.half()``, ``p.data = ...``): its data pointer, dtype or
  device moves;
* ``requires_grad_`` toggled: the autograd rule of the outputs changes (NOTE [Inference only] in fxopt/grad.py);
* a parameter, buffer or submodule replaced on the user's model (``model.fc.weight = nn.Parameter(...)``,
  ``load_state_dict(..., assign=True)``): torch's global registration hooks mark the watch stale.

The per-call check is one number: ``fingerprint`` of native_call.cpp over all watched tensors (NOTE [Weight
fingerprint]), a few nanoseconds a tensor. Until the native extension is loaded (or with ``FXOPT_NATIVE_CALL=0``) the
same facts are compared from Python, about 0.3 µs a tensor.

Tensors the model's own forward writes (a KV cache, a step counter kept as a buffer) are state, not weights: the
owner passes them to :meth:`WeightWatch.forget` and they are not watched.
"""

from __future__ import annotations

import threading
import weakref
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from . import native

__all__ = ["WeightWatch"]


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return 0


def _state(t: torch.Tensor) -> tuple:
    """What the fingerprint covers, for one tensor, from Python (dtype and device only name a change: a new dtype or
    device comes with new data)."""
    try:
        ptr = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        ptr = 0
    return _version(t), ptr, t.dtype, t.device, t.requires_grad


class WeightWatch:
    """The parameters and buffers an optimized module was built from, and whether they changed since."""

    def __init__(self, owners: Iterable[nn.Module], tensors: Sequence[torch.Tensor]):
        self._tensors: tuple[torch.Tensor, ...] = ()
        self._states: list[tuple] = []
        self._native_fp = None  # native_call.cpp's fingerprint, once the extension is loaded
        self._native_baseline: int | None = None
        self.replaced: str | None = None  # set by the registration hooks: what was replaced on the user's model
        self._watch(tensors)
        _register(self, owners)
        if native.module() is not None:
            self._use_native(native.module())
        else:
            ref = weakref.ref(self)
            native.when_ready(lambda mod: (w := ref()) is not None and w._use_native(mod))

    # -- the per-call check ------------------------------------------------------------------------------------
    def changed(self) -> bool:
        """Whether a watched tensor or the user's module tree changed since the baseline."""
        if self.replaced is not None:
            return True
        fp = self._native_fp
        if fp is not None:
            return fp(self._tensors) != self._native_baseline
        return [_state(t) for t in self._tensors] != self._states

    # -- the slow path -----------------------------------------------------------------------------------------
    def describe(self) -> str:
        """What changed since the baseline, for the warning: each kind of change, how many tensors, one example."""
        if self.replaced is not None:
            return self.replaced
        kinds: dict[str, list[str]] = {}
        for t, (version, ptr, dtype, device, grad) in zip(self._tensors, self._states):
            now = _state(t)
            if now[2:4] != (dtype, device):
                kind = (f"moved from {str(dtype).replace('torch.', '')} on {device} to "
                        f"{str(now[2]).replace('torch.', '')} on {now[3]} (.to())")
            elif now[1] != ptr:
                kind = "given new data (.data = ..., .to())"
            elif now[0] != version:
                kind = "written in place (load_state_dict, an optimizer step, an in-place op)"
            elif now[4] != grad:
                kind = f"switched to requires_grad={now[4]}"
            else:
                continue
            kinds.setdefault(kind, []).append(f"{list(t.shape)}")
        return "; ".join(f"{len(shapes)} tensor{'s' if len(shapes) > 1 else ''} (e.g. {shapes[0]}) {kind}"
                         for kind, shapes in kinds.items())

    def only_requires_grad_changed(self) -> bool:
        """Whether nothing but requires_grad flags changed: the optimized graph still matches the weights."""
        return self.replaced is None and all(_state(t)[:4] == s[:4] for t, s in zip(self._tensors, self._states))

    def rebaseline(self) -> None:
        """Take the current state as the baseline."""
        self._watch(self._tensors)

    def forget(self, tensors: Iterable[torch.Tensor]) -> None:
        """Stop watching ``tensors`` (state the model's forward writes itself) and take a new baseline."""
        drop = {id(t) for t in tensors}
        self._watch([t for t in self._tensors if id(t) not in drop])

    def changed_since(self, states: list[tuple]) -> list[torch.Tensor]:
        """The watched tensors whose state differs from ``states`` (a :meth:`snapshot`)."""
        return [t for t, s in zip(self._tensors, states) if _state(t) != s]

    def snapshot(self) -> list[tuple]:
        return [_state(t) for t in self._tensors]

    def __len__(self) -> int:
        return len(self._tensors)

    # -- internals ---------------------------------------------------------------------------------------------
    def _watch(self, tensors: Iterable[torch.Tensor]) -> None:
        self._tensors = tuple(tensors)
        self._states = [_state(t) for t in self._tensors]
        # whether any watched tensor requires grad: read on every call under grad mode, so kept, not computed
        self.requires_grad = any(s[4] for s in self._states)
        if self._native_fp is not None:
            self._native_baseline = self._native_fp(self._tensors)

    def _use_native(self, mod) -> None:
        fp = getattr(mod, "fingerprint", None)
        if fp is None:
            return
        with _LOCK:
            # The native baseline stands for the Python one only if nothing changed in between.
            if [_state(t) for t in self._tensors] == self._states:
                self._native_baseline = fp(self._tensors)
                self._native_fp = fp


# -- parameters, buffers and submodules replaced on the user's model ------------------------------------------------
_LOCK = threading.Lock()
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[WeightWatch]]" = weakref.WeakKeyDictionary()
_HOOKS_INSTALLED = False


def _register(watch: WeightWatch, owners: Iterable[nn.Module]) -> None:
    global _HOOKS_INSTALLED
    with _LOCK:
        if not _HOOKS_INSTALLED:
            from torch.nn.modules import module as module_mod

            # Global hooks: called by every module's register_parameter/register_buffer/add_module (and so by
            # attribute assignment and load_state_dict(assign=True)); a dict lookup for modules nobody watches.
            module_mod.register_module_parameter_registration_hook(_on_registration("parameter"))
            module_mod.register_module_buffer_registration_hook(_on_registration("buffer"))
            module_mod.register_module_module_registration_hook(_on_registration("submodule"))
            _HOOKS_INSTALLED = True
        for m in owners:
            _WATCHED.setdefault(m, weakref.WeakSet()).add(watch)


def _on_registration(kind: str):
    def hook(module: nn.Module, name: str, value) -> None:
        # Dynamo traces these global hooks inside any compiled forward that assigns a module attribute (the
        # transformers Llama step does), and a guard on the weak dictionary's keys then fails when a key is collected
        # before the guards are built (torch 2.11: InternalTorchDynamoError, IndexError, in a process that had
        # optimized another model). A compiled or exported trace replaces nothing on a watched model at run time.
        if torch.compiler.is_compiling():
            return None
        watches = _WATCHED.get(module)
        if watches:
            for w in list(watches):
                w.replaced = f"{kind} {name!r} of a {type(module).__name__} was replaced on the model"
        return None

    return hook
