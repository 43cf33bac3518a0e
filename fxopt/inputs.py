"""What a call's inputs are to an optimized module: the signature a specialization is built for, and whether
fxopt's kernels can serve them at all (fxopt/api.py's call path; NOTE [Fused call path])."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree

__all__ = ["Signature", "describe_signature", "input_signature", "nested_signature", "optimizable_inputs"]

Signature = tuple


def input_signature(args: Sequence[Any]) -> Signature:
    """What a specialization is built for: type, shape, dtype, device and strides of each tensor input; value of
    anything else. Raises TypeError for an unhashable argument (a list, a dict: ``nested_signature`` keys those)."""
    # Strides are part of it: passes decide on the example's layout (a .contiguous() that was a no-op, a view).
    # The type and the device (not get_device(), -1 for both cpu and meta) keep meta tensors, FakeTensors and
    # subclasses off a specialization built for real tensors.
    return tuple([(type(a), a.shape, a.dtype, a.device, a.stride()) if isinstance(a, torch.Tensor) else (type(a), a)
                  for a in args])


def nested_signature(args: Sequence[Any]) -> Signature | None:
    """The signature of arguments holding tensors inside lists, tuples or dicts: the structure and each leaf's key;
    None when a leaf is unhashable (such a call runs the original model)."""
    leaves, spec = pytree.tree_flatten(tuple(args))
    try:
        key = (spec, input_signature(leaves))
        hash(key)
    except TypeError:
        return None
    return key


def optimizable_inputs(args: Sequence[Any]) -> str | None:
    """None when fxopt may build and run a specialization for ``args``, else why the original model runs instead:
    fxopt's kernels read real memory of dense tensors on the CPU or a GPU."""
    for a in pytree.tree_leaves(tuple(args)):
        if not isinstance(a, torch.Tensor):
            continue
        if type(a) not in (torch.Tensor, torch.nn.Parameter):
            return f"a {type(a).__name__} input (a tensor subclass)"
        if a.device.type not in ("cpu", "cuda"):
            return f"an input on {a.device}"
        if a.layout != torch.strided:
            return f"a {a.layout} input"
        if a.is_quantized:
            return "a quantized input"
    return None


def describe_signature(sig: Signature) -> str:
    parts = []
    if len(sig) == 2 and isinstance(sig[0], pytree.TreeSpec):  # nested_signature
        return f"{describe_signature(sig[1])} in {sig[0]}"
    for s in sig:
        if len(s) == 5 and isinstance(s[1], torch.Size):
            parts.append(f"{str(s[2]).replace('torch.', '')}{list(s[1])}@{s[3]}")
        else:
            parts.append(repr(s[1]))
    return ", ".join(parts)
