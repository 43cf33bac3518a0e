"""The autograd rule of every entry point (``optimize``, ``torch.compile(backend="fxopt")``, ``fxopt.load``, CUDA
graphs).

NOTE [Inference only]: fxopt's kernels have no backward, so its outputs never carry autograd history, and a
gradient is never computed for part of a model only. Under ``torch.no_grad()`` / ``torch.inference_mode()`` the
outputs are plain tensors, as eager's are. Under grad mode:

* inputs that require grad: the original model runs instead (eager's graph, correct gradients; warned once);
* otherwise the optimized graph runs with autograd off, and where eager's outputs would require grad (a parameter
  requires grad), fxopt's do too, but their only history is a node that raises :class:`fxopt.InferenceOnlyError`
  when a backward pass reaches it, naming fxopt and what to do. Without it, ``loss.backward()`` would either fail
  with torch's generic "does not require grad" or, had the graph run with autograd on, fill gradients for the
  layers after the last fused kernel only, silently.

The outputs are then views made by a custom autograd Function: an in-place write into one under grad mode raises
torch's view + in-place error (clone it first, or run under ``torch.no_grad()``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import InferenceOnlyError

__all__ = ["MESSAGE", "inference_only"]

MESSAGE = ("fxopt: a backward pass reached an output of an fxopt-optimized module. fxopt is inference-only: its fused "
           "kernels have no backward, so these outputs carry no gradient history. Call the original model to train or "
           "take gradients (or pass inputs that require grad: fxopt then runs the original model), and run fxopt "
           "under torch.no_grad() or torch.inference_mode() for inference.")


class _FxoptInferenceOnly(torch.autograd.Function):
    """Outputs that require grad as eager's would, and whose backward raises (NOTE [Inference only])."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, *outputs: torch.Tensor):
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        raise InferenceOnlyError(MESSAGE)


_ANCHOR: torch.Tensor | None = None  # a leaf that requires grad: without one, apply() records no node


def inference_only(outputs: Any) -> Any:
    """``outputs`` (a tensor or a pytree of them, computed with autograd off), with their floating-point tensors made
    to require grad through a node whose backward raises :class:`fxopt.InferenceOnlyError`."""
    global _ANCHOR
    if _ANCHOR is None:
        _ANCHOR = torch.zeros((), requires_grad=True)
    if isinstance(outputs, torch.Tensor):
        return _FxoptInferenceOnly.apply(_ANCHOR, outputs)[0] if _differentiable(outputs) else outputs
    leaves, spec = pytree.tree_flatten(outputs)
    picked = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and _differentiable(x)]
    if not picked:
        return outputs
    wrapped = _FxoptInferenceOnly.apply(_ANCHOR, *(leaves[i] for i in picked))
    for i, w in zip(picked, wrapped):
        leaves[i] = w
    return pytree.tree_unflatten(leaves, spec)


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()
