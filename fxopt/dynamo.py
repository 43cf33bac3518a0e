"""``torch.compile(model, backend="fxopt")``: Dynamo captures the graphs (around graph breaks) and each captured
graph goes through fxopt's passes and kernels.

Registered through the ``torch_dynamo_backends`` entry point in pyproject.toml, so no import is needed. It sits
beside the api it calls (DESIGN.md, "Layers"): fxopt.backends holds region code generators, below the passes. Dynamo
hands the backend fake example inputs, so the graph is optimized lazily: at its first call with real tensors
(and again for each new input signature, which Dynamo's own guards also see).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx


def fxopt_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **options: Any) -> Callable[..., Any]:
    from .api import optimize

    optimized = optimize(gm, **options)

    def run(*args: Any) -> Any:
        # The autograd rule of every entry point (NOTE [Inference only] in fxopt/grad.py): Dynamo passes the
        # parameters as inputs, so under grad mode with trainable parameters the captured graph runs eagerly,
        # with correct gradients; under no_grad / inference_mode, fxopt's optimized graph.
        return optimized(*args)

    run.fxopt_module = optimized  # for inspection: the OptimizedModule behind this compiled graph
    return run
