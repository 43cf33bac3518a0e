"""The module that runs: a copy of the optimized graph rewritten for host time, with the same launches.

NOTE [Direct kernel calls]: a Python-implemented torch.library op costs about 12 µs of dispatch per call on its own
(measured on CPU, torch 2.13), more than a kernel launch; an nn.Module call layer costs 1-2 µs more. The graph users
see, export and count keeps ``fxopt::fused`` nodes; the module that runs is a copy in which each of them calls its
kernel object directly, launching exactly the same kernel.

NOTE [Lean runner]: at batch 1 without CUDA graphs the host's Python is the latency, and the code torch.fx
generates spends it on things that are fixed for the life of the graph. The copy that runs therefore also
  * reads every weight from a flat attribute, also kept in the module's ``__dict__`` (``self._w3``: a dict lookup),
    instead of the nested path fx writes (``getattr(self.blocks, "0").fc1.weight``: one ``nn.Module.__getattr__``
    fallback per dot, 0.5-1 µs each on the CPU here);
  * computes view ops on weights once (``weight.t()`` in front of a GEMM, a reshape of a bias): a view shares its
    weight's storage, so this costs no memory. Computed with autograd on, the view keeps its ``grad_fn``, as the
    per-call op did;
  * calls ``nn.Linear`` and ``nn.ConvNd`` (zero padding) leaves as their functional op on those flat weights,
    ReLU, MaxPool2d, AdaptiveAvgPool2d and Flatten leaves as the ATen builtin their ``forward`` ends in, without
    the module call layer (a ``nn.TransformerEncoderLayer`` leaf was already replaced by the
    decompose_encoder_layers pass, passes/attention.py). Only leaves without hooks when the runner is built: hooks added later to the
    model's submodules are not run (the graph was optimized without them).
Same ops on the same tensors in the same order, minus the views: the launches and the results are unchanged
(tests/runtime/test_lower.py). ``gm`` itself is not changed; its readable code stays what users see.

With ``FXOPT_NVTX=1`` (or ``fxopt.runtime.nvtx.nvtx(True)``) when lowering, each launching node also runs inside
an NVTX range named for it (NOTE [NVTX ranges] in runtime/nvtx.py); otherwise the runner is exactly as above.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from . import nvtx
from .kernel import fused_op, lookup

__all__ = ["lower_for_execution"]

_CONV = ops.CONV_MODULE_FUNCTIONS  # nn.ConvNd -> F.convNd


def lower_for_execution(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` that runs with less host time: kernels called directly (NOTE [Direct kernel calls]), flat
    weights, views of weights computed once, Linear/Conv leaves as functional calls (NOTE [Lean runner])."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    flat = _FlatConstants(graph)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is fused_op:
            name, inputs = node.args
            env[node] = graph.call_function(_kernel_target(lookup(name)), (tuple(env[i] for i in inputs),))
        elif node.op == "get_attr" and isinstance(value := operator.attrgetter(node.target)(gm), torch.Tensor):
            env[node] = flat.node(value)
        elif (view := _folded_view(node, env, flat)) is not None:
            env[node] = flat.node(view)
        elif node.op == "call_module" and (call := _functional_call(gm.get_submodule(node.target), node, env,
                                                                    flat)) is not None:
            env[node] = call
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        env[node].meta.update(node.meta)
    graph._codegen = gm.graph._codegen  # keep torch.export's pytree input/output handling
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:  # weights that only folded views read
            graph.erase_node(node)
    ranges = nvtx.add_ranges(graph, gm, env) if nvtx.enabled() else None  # decided once, here: no per-call check
    owners: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in owners:
            if node.target in flat.values:
                owners[node.target] = flat.values[node.target]
            else:
                owners[node.target] = gm.get_submodule(node.target) if node.op == "call_module" else \
                    operator.attrgetter(node.target)(gm)
    lowered = fx.GraphModule(owners, graph, gm.__class__.__name__)
    for name in flat.values.keys() & owners.keys():
        # Registered as a parameter or buffer (parameters(), state_dict() and memory accounting see it) and also
        # an instance attribute, which attribute lookup finds before it falls back to nn.Module.__getattr__. The
        # runner is fxopt's own and never moved with .to(), which would update only the registered one.
        object.__setattr__(lowered, name, flat.values[name])
    lowered.meta.update(gm.meta)
    if ranges is not None:
        lowered.meta["fxopt_nvtx_ranges"] = ranges
    return lowered


class _FlatConstants:
    """Tensors the runner reads, each under one flat attribute name (one per tensor object)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.values: dict[str, torch.Tensor] = {}  # attribute name -> tensor
        self._names: dict[int, str] = {}  # id(tensor) -> attribute name
        self._nodes: dict[str, fx.Node] = {}

    def node(self, value: torch.Tensor) -> fx.Node:
        name = self._names.get(id(value))
        if name is None:
            name = self._names[id(value)] = f"_w{len(self.values)}"
            self.values[name] = value
        if name not in self._nodes:
            self._nodes[name] = self.graph.get_attr(name)
        return self._nodes[name]

    def value_of(self, node: Any) -> torch.Tensor | None:
        if isinstance(node, fx.Node) and node.op == "get_attr":
            return self.values.get(node.target)
        return None


def _folded_view(node: fx.Node, env: dict, flat: _FlatConstants) -> torch.Tensor | None:
    """The value of a view op (the op table's ``is_view_like``) whose tensor inputs are all weights, computed now;
    None if it is not one. The result must share its input's storage: an op that may copy, such as reshape, is only
    folded when it did not (folding a copy would hold new memory)."""
    if not ops.is_view_like(node):
        return None
    fn: Callable = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
    leaves = _node_leaves(node)
    if not leaves or any(flat.value_of(env[a]) is None for a in leaves):
        return None
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: flat.value_of(env[a]))
    try:
        with torch.inference_mode(False), torch.enable_grad():  # keep the grad_fn the per-call op would have
            value = fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 -- not ours to judge: the op runs per call as before
        return None
    bases = {t.untyped_storage().data_ptr() for t in (flat.value_of(env[a]) for a in leaves)}
    if not isinstance(value, torch.Tensor) or value.untyped_storage().data_ptr() not in bases:
        return None
    return value


def _node_leaves(node: fx.Node) -> list[fx.Node]:
    leaves: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), leaves.append)
    return leaves


def _functional_call(module: nn.Module, node: fx.Node, env: dict, flat: _FlatConstants) -> fx.Node | None:
    """The call that replaces a leaf without hooks (NOTE [Lean runner]), else None."""
    if len(node.args) != 1 or node.kwargs or module._forward_hooks or module._forward_pre_hooks or \
            nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    kind = type(module)
    if (stateless := _stateless_call(module)) is not None:
        fn, extra = stateless
        return flat.graph.call_function(fn, (env[node.args[0]], *extra))
    if kind is not nn.Linear and not (kind in _CONV and module.padding_mode == "zeros"):
        return None
    x, weight = env[node.args[0]], flat.node(module.weight)
    bias = None if module.bias is None else flat.node(module.bias)
    if kind is nn.Linear:
        return flat.graph.call_function(F.linear, (x, weight, bias))
    return flat.graph.call_function(_CONV[kind], (x, weight, bias, module.stride, module.padding, module.dilation,
                                                  module.groups))


def _stateless_call(module: nn.Module) -> tuple[Callable, tuple] | None:
    """The ATen builtin (and its arguments after the input) that a ReLU, MaxPool2d, AdaptiveAvgPool2d or Flatten
    leaf's ``forward`` ends in; None for anything else (the module call stays)."""
    kind = type(module)
    if kind is nn.ReLU:
        return (torch.relu_ if module.inplace else torch.relu), ()
    if kind is nn.MaxPool2d and not module.return_indices:
        return torch.max_pool2d, (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if kind is nn.AdaptiveAvgPool2d:
        size = module.output_size
        if isinstance(size, int) or None not in size:  # None means "the input's size": F's wrapper fills it in
            return torch._C._nn.adaptive_avg_pool2d, (size,)
    if kind is nn.Flatten:
        return torch.flatten, (module.start_dim, module.end_dim)
    return None


def _kernel_target(kernel: Any) -> Callable:
    generated = getattr(type(kernel), "call", None)  # generated kernels' lean call path
    if isinstance(generated, functools.cached_property):
        return kernel.call.native() or kernel.call  # the compiled call path once it is there
    return _as_graph_callable(kernel)


def _as_graph_callable(kernel: Any) -> Callable:
    """Give a kernel the function-like names torch.fx's code generator needs to call it from a graph."""
    for attr in ("__name__", "__qualname__"):
        if getattr(kernel, attr, None) != kernel.name:
            try:
                setattr(kernel, attr, kernel.name)
            except AttributeError:
                return lambda inputs, _k=kernel: _k(inputs)
    kernel.__module__ = "fxopt.kernels"
    return kernel
