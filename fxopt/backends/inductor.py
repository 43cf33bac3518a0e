"""backend="inductor": hand each fused group to TorchInductor instead of fxopt's own code generator.

For comparison (C++ on CPU, Triton on GPU). The group becomes one ``fxopt::fused`` node like any other, so
launch counting treats both backends alike. Inductor compiles for the shapes it was given; a call with other
shapes compiles again (one compiled function per input signature).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .. import ops


def extract_subgraph(gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Sequence[fx.Node],
                     outputs: Sequence[fx.Node]) -> fx.GraphModule:
    """The group as a GraphModule of its own: ``inputs`` become placeholders, ``outputs`` a tuple."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = graph.placeholder(f"in{i}")
        env[n].meta.update(n.meta)
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, graph, "fxopt_region")


def _example(node: fx.Node) -> torch.Tensor:
    tm = ops.tensor_meta(node)
    t = torch.empty_strided(tuple(tm.shape), tuple(tm.stride), dtype=tm.dtype, device=node.meta["device"])
    return t.normal_() if t.is_floating_point() else t.zero_()


class InductorKernel:
    """A group compiled by TorchInductor, behind the same interface as :class:`fxopt.runtime.kernel.FusedKernel`."""

    backend = "inductor"

    def __init__(self, gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Sequence[fx.Node],
                 outputs: Sequence[fx.Node]):
        self.subgraph = extract_subgraph(gm, nodes, inputs, outputs)
        self.source = self.subgraph.code
        self.op_names = [ops.describe(n) for n in nodes]
        self.output_dtypes = tuple(ops.tensor_meta(o).dtype for o in outputs)
        digest = hashlib.sha256(self.source.encode() + str([ops.tensor_meta(i) for i in inputs]).encode())
        self.name = f"inductor_{'_'.join(dict.fromkeys(self.op_names))[:40]}_{digest.hexdigest()[:8]}"
        self._compiled: dict[Any, Callable] = {}
        self._compile([_example(i) for i in inputs])

    def __deepcopy__(self, memo) -> "InductorKernel":
        return self

    @staticmethod
    def _key(inputs: Sequence[torch.Tensor]):
        return tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs)

    def _compile(self, inputs: Sequence[torch.Tensor]) -> Callable:
        from torch._inductor import compile as inductor_compile

        fn = inductor_compile(self.subgraph, list(inputs))
        self._compiled[self._key(inputs)] = fn
        return fn

    def fake(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.subgraph(*inputs))

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        fn = self._compiled.get(self._key(inputs))
        if fn is None:
            fn = self._compile(inputs)
        out = fn(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]


def inductor_available() -> str | None:
    """None if TorchInductor can be used here, else why not."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:  # import errors of optional toolchains vary
        return f"TorchInductor cannot be imported: {e}"
    return None
