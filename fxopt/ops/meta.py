"""What every part of the op table reads off a node: its recorded tensor metadata, the dtypes fxopt's kernels
support, torch's type promotion over recorded operands, and a call's arguments bound to parameter names."""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

Operand = Union[fx.Node, int, float, bool]


def bind_args(node: fx.Node, params: tuple[str, ...]) -> dict[str, Any] | str:
    """Map a node's args/kwargs onto parameter names; a reason string if they do not fit."""
    if len(node.args) > len(params):
        return f"{len(node.args)} positional arguments, expected at most {len(params)}"
    bound = dict(zip(params, node.args))
    for k, v in node.kwargs.items():
        if k not in params:
            return f"unsupported keyword argument {k}={v!r}"
        if k in bound:
            return f"argument {k} given twice"
        bound[k] = v
    return bound


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
SUPPORTED_DTYPES = FLOAT_DTYPES + INT_DTYPES + (torch.bool,)


def tensor_meta(node: Any):
    """The recorded TensorMetadata of a node's result, or None (not a node, not annotated, not a tensor)."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    return tm if hasattr(tm, "dtype") else None


def meta_tensor(node: Any) -> torch.Tensor | None:
    """A meta-device tensor with the node's recorded shape, strides and dtype (to ask what a view or an op would
    do to it without data), or None where nothing was recorded."""
    tm = tensor_meta(node)
    if tm is None or not hasattr(tm, "stride"):
        return None
    return torch.empty_strided(tuple(tm.shape), tuple(tm.stride), dtype=tm.dtype, device="meta")


def set_tensor_meta(node: fx.Node, t: torch.Tensor, device: torch.device | None) -> None:
    """Record on a node a pass wrote what capture records on every node: ``t``'s shape, strides and dtype (a meta
    tensor says them without data) and the device it runs on."""
    node.meta.update(tensor_meta=_extract_tensor_metadata(t), device=device, has_tensor=True)


def set_strided_meta(node: fx.Node, like: fx.Node, stride, dtype: torch.dtype | None = None) -> None:
    """Record on a new node ``like``'s shape and device with ``stride`` and ``dtype`` (``like``'s by default),
    without running an op (a process's first meta op imports torch._dynamo, NOTE [Modes without Dynamo])."""
    tm = tensor_meta(like)
    t = torch.empty_strided(tuple(tm.shape), tuple(stride), dtype=dtype or tm.dtype, device="meta")
    set_tensor_meta(node, t, like.meta.get("device"))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type arithmetic happens in: float16/bfloat16 load and store in their type, compute in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def promoted_dtype(operands: list[Operand]) -> torch.dtype:
    """torch's type promotion over one or two operands (tensors or Python scalars), from recorded dtypes and ranks."""

    def probe(o):
        tm = tensor_meta(o)
        if tm is None:
            return o  # a Python scalar
        return torch.empty((0,) * len(tm.shape), dtype=tm.dtype)  # rank matters: 0-d tensors promote like scalars

    probes = [probe(o) for o in operands]
    if len(probes) == 1:
        return probes[0].dtype
    assert len(probes) == 2, "promote-typed ops are unary or binary"
    return torch.result_type(*probes) if isinstance(probes[0], torch.Tensor) else torch.result_type(probes[1], probes[0])
