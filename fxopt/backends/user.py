"""User-registered kernels: replace every match of a pattern by the user's own callable, as one launch.

>>> def pattern(x, y):
...     return torch.relu(x + y)
>>> fxopt.register_kernel(pattern, my_extension.add_relu)      # e.g. a CUDA kernel from the user's extension

The pattern is a function written with torch ops; it is matched on the traced graph by torch.fx's subgraph
rewriter, literally (``torch.relu`` in the pattern matches ``torch.relu`` calls, not ``nn.ReLU`` modules: write one
pattern per spelling the model uses). Each match becomes one ``fxopt::fused`` node calling the user's callable,
which receives the matched inputs as tensors and returns a tensor or a tuple of tensors. The pipeline checks the
result against eager like any other pass.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..runtime.kernel import KERNELS, fused_op

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


def _replacement_for(entry: UserKernel) -> Callable:
    params = list(inspect.signature(entry.pattern).parameters)
    args = ", ".join(params)
    outs = ", ".join(f"out[{k}]" for k in range(entry.num_outputs))
    body = (f"def replacement({args}):\n"
            f"    out = fused_op({entry.name!r}, [{args}])\n"
            f"    return {outs if entry.num_outputs > 1 else 'out[0]'}\n")
    scope = {"fused_op": fused_op}
    exec(body, scope)  # a replacement with the pattern's exact parameter names, as the rewriter requires
    return scope["replacement"]


def _binds_tensors_only(match, original_graph, pattern_graph) -> bool:
    """The rewriter lets a pattern input match a Python literal (``x + 0.25``); a kernel takes tensors only."""
    return all(isinstance(n, fx.Node) and n.meta.get("has_tensor", True) for n in match.placeholder_nodes)


def apply_user_kernels(gm: fx.GraphModule) -> PassResult:
    """The pass: every registered pattern, in registration order, replaced by its kernel."""
    from ..passes.base import record, tag

    replaced = 0
    for entry in list(USER_KERNELS):
        matches = fx.subgraph_rewriter.replace_pattern_with_filters(
            gm, entry.pattern, _replacement_for(entry), match_filters=[_binds_tensors_only])
        for m in matches:
            for n in m.replacements:
                tag(n, "apply_user_kernels")
                if n.op == "call_function" and n.target is fused_op:
                    gm.meta.setdefault("fxopt_kernels", {})[n.name] = entry
        if matches:
            record(**{f"matched_{entry.name}": len(matches)})
        replaced += len(matches)
    if replaced:
        gm.recompile()
    return PassResult(gm, replaced > 0)

