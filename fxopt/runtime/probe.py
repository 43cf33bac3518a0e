"""GPU time of small kernels, for passes that choose between candidates (a generated kernel and the library's, two
layouts) by measuring; random inputs in a node's recorded layout to time them on.

NOTE [Choosing by measurement]: a kernel of a few microseconds cannot be timed by the host clock around its launch
(the launch costs as much); here ``calls`` calls are captured in one CUDA graph and replayed, and the replay's
device time (CUDA events) over ``calls`` is one sample: launch gaps inside a graph are the same for both candidates.
Candidates are timed in alternating order, median of ``reps`` replays each. Results are cached per key by the
caller (a decoder's layers share their shapes).
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch
import torch.fx as fx


def graph_times_us(fns: Sequence[Callable[[], object]], calls: int = 20, reps: int = 7) -> list[float]:
    """Median µs per call of each of ``fns`` (zero-argument callables launching CUDA work on the current device)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graphs = []
    with torch.cuda.stream(stream):
        for fn in fns:
            for _ in range(2):  # compile, load, warm caches; allocations before capture
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for fn in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        graphs.append(g)
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(reps):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs[i].replay()
            end.record()
            end.synchronize()
            samples[i].append(start.elapsed_time(end) * 1000.0 / calls)
    del graphs
    return [statistics.median(s) for s in samples]


def random_like(node: fx.Node) -> torch.Tensor:
    """A tensor of the node's recorded shape, dtype, strides and device, with random values (timing only)."""
    tm = node.meta["tensor_meta"]
    device = node.meta.get("device") or torch.device("cpu")
    extent = 1 + sum((n - 1) * s for n, s in zip(tm.shape, tm.stride)) if all(tm.shape) else 0
    if tm.dtype.is_floating_point:
        storage = torch.randn(extent, device=device).to(tm.dtype)
    elif tm.dtype == torch.bool:
        storage = torch.rand(extent, device=device) < 0.5
    else:
        storage = torch.randint(1, 4, (extent,), device=device).to(tm.dtype)
    return storage.as_strided(tuple(tm.shape), tuple(tm.stride))
