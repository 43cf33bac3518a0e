"""The cache key of a call (its *signature*) and the descriptions and layouts derived from it.

Signature
    Per tensor argument: shape, strides, dtype and device index; per other argument: its type and value (so it must be
    hashable). Strides are part of it: a transposed, channels_last or sliced input gets its own graph. Its static buffer
    is allocated with ``torch.empty_like`` (dense, same dimension order as the input), so a dense input of any layout
    (contiguous, channels_last, a transpose) is replayed with exactly the strides the model saw eagerly; a non-dense
    input (a slice with gaps, an expanded tensor) is copied into a dense buffer of the same dimension order.
    The key costs about 0.5 µs for one input (CPU measurement); ``x.device`` objects are not built on the call path.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..strides import contiguous_strides

_Tensor = torch.Tensor
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def signature_key(args: Sequence[Any]) -> tuple:
    """The cache key of a call: (shape, strides, dtype, device index) per tensor, (type, value) per other argument.

    Raises TypeError for unhashable arguments and RuntimeError for tensors without strides (sparse, nested).
    """
    # A subclass's type is part of its key: FakeTensors and subclasses (same shape, strides and device) never meet
    # a graph built for plain tensors (a Parameter is one).
    return tuple([((a.shape, a.stride(), a.dtype, a.get_device()) if type(a) in PLAIN_TENSORS
                   else (type(a), a.shape, a.stride(), a.dtype, a.get_device())) if isinstance(a, _Tensor)
                  else (type(a), a) for a in args])


def describe_tensor(shape: Sequence[int], dtype: torch.dtype, device: Any, stride: Sequence[int] | None = None,
                     layout: str | None = None) -> str:
    s = f"{str(dtype).replace('torch.', '')}{list(shape)}"
    if layout is not None and layout != "contiguous":
        s += f"({layout})"
    elif stride is not None and tuple(stride) != contiguous_strides(shape):
        s += f"(strides {list(stride)})"
    return s + f"@{device}"



def layout_of(x: torch.Tensor) -> str:
    """The dense layout a bucketed static buffer gets for an input like ``x``."""
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "contiguous"


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
                   "channels_last_3d": torch.channels_last_3d}
