"""apply_user_kernels: every match of a pattern registered with :func:`fxopt.register_kernel` (the registry:
``fxopt/backends/user.py``) -> one ``fxopt::fused`` node calling the user's kernel.

Before::

    add = x + y
    relu = torch.relu(add)

After, with ``register_kernel(lambda x, y: torch.relu(x + y), add_relu)``::

    fused = torch.ops.fxopt.fused.default('user_add_relu_0', [x, y])
    getitem = fused[0]
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..backends.user import USER_KERNELS, UserKernel
from ..runtime.kernel import fused_op
from .base import record, tag


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

