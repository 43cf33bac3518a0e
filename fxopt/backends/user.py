"""User-registered kernels: replace every match of a pattern by the user's own callable, as one launch.

>>> def pattern(x, y):
...     return torch.relu(x + y)
>>> fxopt.register_kernel(pattern, my_extension.add_relu)      # e.g. a CUDA kernel from the user's extension

The pattern is a function written with torch ops; it is matched on the traced graph by torch.fx's subgraph
rewriter, literally (``torch.relu`` in the pattern matches ``torch.relu`` calls, not ``nn.ReLU`` modules: write one
pattern per spelling the model uses). Each match becomes one ``fxopt::fused`` node calling the user's callable,
which receives the matched inputs as tensors and returns a tensor or a tuple of tensors. The pipeline checks the
result against eager like any other pass.

This module is the registry; the pass that applies it is ``apply_user_kernels`` (``fxopt/passes/user_kernels.py``).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ..runtime.kernel import KERNELS

_lock = threading.Lock()


@dataclass(eq=False)  # identity semantics: graphs hold the kernel object itself
class UserKernel:
    """A registered (pattern, callable) pair; callable through ``fxopt::fused`` like generated kernels."""

    name: str
    pattern: Callable
    fn: Callable
    num_outputs: int
    backend: str = "user"

    @property
    def op_names(self) -> list[str]:
        return [getattr(self.fn, "__name__", repr(self.fn))]

    @property
    def source(self) -> str:
        try:
            return inspect.getsource(self.fn)
        except (OSError, TypeError):
            return repr(self.fn)

    def fake(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Output metadata for tracing with fake tensors: what the pattern returns."""
        out = self.pattern(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.fn(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]


USER_KERNELS: list[UserKernel] = []


def register_kernel(pattern: Callable, kernel: Callable, *, name: str | None = None,
                    num_outputs: int = 1) -> UserKernel:
    """Replace every match of ``pattern`` (a function of tensors written with torch ops) by ``kernel``.

    Registered kernels apply to every later :func:`fxopt.optimize` call (pass ``apply_user_kernels``).
    """
    if not callable(pattern) or not callable(kernel):
        raise TypeError("register_kernel(pattern, kernel) takes two callables")
    name = name or f"user_{getattr(kernel, '__name__', 'kernel')}_{len(USER_KERNELS)}"
    entry = UserKernel(name, pattern, kernel, num_outputs)
    with _lock:
        if name in KERNELS:
            raise ValueError(f"a kernel named {name!r} is already registered")
        KERNELS[name] = entry
        USER_KERNELS.append(entry)
    return entry


def unregister_kernel(entry: UserKernel) -> None:
    with _lock:
        USER_KERNELS.remove(entry)
        KERNELS.pop(entry.name, None)
