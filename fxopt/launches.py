"""Launch accounting, three ways.

* static: graph nodes that launch a kernel (:func:`fxopt.ops.launches_kernel`);
* dispatched: ATen compute ops actually dispatched in one forward, seen by a TorchDispatchMode (views, ``empty*``,
  ``detach`` and size queries excluded); runs on CPU, so CI can pin it;
* CUDA: kernel-launch API calls and GPU kernels in one forward, and the GPU busy time, from torch.profiler.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from . import ops

# CUDA API calls that put work on the GPU (driver and runtime spellings).
LAUNCH_API_CALLS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel",
    "cudaGraphLaunch", "cuGraphLaunch",
})


class InspectionMode(TorchDispatchMode):
    """The base of fxopt's dispatch modes, which only watch the ops a run dispatches.

    NOTE [Modes without Dynamo]: torch wraps a mode's __torch_dispatch__ in torch._disable_dynamo, whose first call
    imports torch._dynamo: 0.9 s on the dev box, 3.6-5.7 s on the lent H200s, inside the first fxopt.optimize of a
    process (bench_fusion section 4). fxopt's modes never run under torch.compile, so they opt out of the wrapper
    through the hook torch provides for it."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


class DispatchCounter(InspectionMode):
    """Counts ATen compute ops dispatched while active. Ops called inside a custom op's body are not seen:
    a fused kernel counts once."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if ops.is_compute_overload(func):  # not a view, an allocation, a size query or an assert
            self.ops[str(func.overloadpacket.__name__) if func.namespace == "aten" else str(func)] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class LaunchCount:
    """Launches of one forward. ``cuda_*`` fields are None when not measured on a GPU."""

    static: int | None
    dispatched: int | None
    dispatched_by_op: dict[str, int] = field(default_factory=dict)
    cuda_launch_calls: int | None = None
    cuda_kernels: int | None = None
    gpu_busy_us: float | None = None
    cuda_kernels_by_name: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def static_count(gm: fx.GraphModule) -> int:
    """Graph nodes that launch a kernel."""
    return sum(ops.launches_kernel(n, gm) for n in gm.graph.nodes)


def dispatched_ops(fn, example_inputs: Sequence[Any]) -> Counter[str]:
    """ATen compute ops dispatched by one call of ``fn``, by op name."""
    counter = DispatchCounter()
    with torch.no_grad(), counter:
        fn(*example_inputs)
    return counter.ops


def _uses_cuda(example_inputs: Sequence[Any], module: Any) -> bool:
    if any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        return True
    if isinstance(module, torch.nn.Module):
        first = next(itertools.chain(module.parameters(), module.buffers()), None)
        return first is not None and first.is_cuda
    return False


def cuda_profile(fn, example_inputs: Sequence[Any], warmup: int = 3) -> dict[str, Any]:
    """Kernel launch calls, GPU kernels and GPU busy time (union of kernel intervals) for one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(warmup):
            fn(*example_inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn(*example_inputs)
            torch.cuda.synchronize()
    return summarize_profile(prof)


def summarize_profile(prof) -> dict[str, Any]:
    """Reduce a torch.profiler run to launch calls, kernels (by name) and busy time."""
    launch_calls = 0
    kernels: Counter[str] = Counter()
    intervals = []
    for evt in prof.events():
        name = evt.name
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            lowered = name.lower()
            if "memcpy" in lowered or "memset" in lowered:
                continue
            kernels[name] += 1
            intervals.append((evt.time_range.start, evt.time_range.end))
        elif name in LAUNCH_API_CALLS:
            launch_calls += 1
    return {
        "cuda_launch_calls": launch_calls,
        "cuda_kernels": sum(kernels.values()),
        "cuda_kernels_by_name": dict(kernels),
        "gpu_busy_us": _union_length(intervals),
    }


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals (concurrent kernels count once)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def count_launches(module: Any, example_inputs: Sequence[Any], *, cuda: bool | None = None,
                   dispatched: bool = True) -> LaunchCount:
    """Launch accounting for one forward of ``module`` on ``example_inputs``.

    ``module`` may be a GraphModule (static count from its graph), an :class:`~fxopt.OptimizedModule` (its
    rewritten graph for these inputs), or any callable (no static count). ``cuda=None`` profiles on the GPU when
    the inputs or the module are on CUDA. ``dispatched=False`` skips the dispatch count: a TorchDispatchMode makes
    torch.compile'd modules fall back to eager, so count those with the profiler alone.

    >>> count_launches(nn.Sequential(nn.ReLU(), nn.Sigmoid()), [torch.randn(8)]).dispatched
    2
    """
    example_inputs = tuple(example_inputs)
    static = None
    counted = module
    graph_module_for = getattr(module, "graph_module_for", None)
    if graph_module_for is not None:
        # An OptimizedModule runs its kernels without the dispatcher (NOTE [Direct kernel calls]); its graph,
        # which calls them through the fxopt::fused op, dispatches the same launches and counts each kernel once.
        counted = graph_module_for(example_inputs)
        if counted is None:  # an unoptimized module runs the original model
            counted = module
        else:
            static = static_count(counted)
    elif isinstance(module, fx.GraphModule):
        static = static_count(module)
    by_op = dispatched_ops(counted, example_inputs) if dispatched else {}
    result = LaunchCount(static=static, dispatched=sum(by_op.values()) if dispatched else None,
                         dispatched_by_op=dict(by_op))
    if cuda is None:
        cuda = torch.cuda.is_available() and _uses_cuda(example_inputs, module)
    if cuda:
        prof = cuda_profile(module, example_inputs)
        result.cuda_launch_calls = prof["cuda_launch_calls"]
        result.cuda_kernels = prof["cuda_kernels"]
        result.cuda_kernels_by_name = prof["cuda_kernels_by_name"]
        result.gpu_busy_us = prof["gpu_busy_us"]
    return result
