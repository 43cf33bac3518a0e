"""Programmatic edges in a captured graph: a generated kernel's launch overlaps the generated kernel before it.

NOTE [Programmatic dependent launch] (fxopt_kernel.h): every kernel fxopt generates starts with
``griddepcontrol.wait`` and then ``griddepcontrol.launch_dependents`` on Hopper and later. A graph edge between two
such kernels can therefore be *programmatic* (CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC from the upstream kernel's
programmatic port): the driver schedules the downstream kernel's blocks as soon as every block of the upstream one
has started, and the downstream kernel waits in ``griddepcontrol.wait`` until the upstream grid has completed and
its writes are visible. What it saves is the launch latency between dependent kernels, the floor of a batch-1
decode step of a few hundred small kernels. Measured (benchmarks/pdl_probe.py, H100, torch 2.11, 200 dependent
kernels of 768 elements in one graph): 1.14 µs a kernel plain, 0.86 with the wait alone, **0.68** with the wait and
the early trigger; but programmatic edges *from* kernels that do not trigger early (cuBLAS, cuDNN, ATen: each
generated kernel after such a one) made the chain 7% *slower* (1.22). So only edges generated -> generated change.

Only default (full) edges change: memory copies, memsets, events and other libraries' kernels keep their full
dependencies. Transitive reads stay safe: a kernel's upstream kernel completed only after its own wait returned, so
everything before it is complete and visible too. The rewrite runs once per capture, between capture and
instantiation (``CUDAGraph(keep_graph=True)``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# FXOPT_PDL=0 turns programmatic edges off for every runner (the runner's ``programmatic_launch`` per runner).
PROGRAMMATIC_LAUNCH_DEFAULT = os.environ.get("FXOPT_PDL", "1") != "0"
MIN_COMPUTE_CAPABILITY = (9, 0)  # griddepcontrol: sm_90


def supported(device: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(device) >= MIN_COMPUTE_CAPABILITY


def make_programmatic(raw_graph: int) -> int:
    """Turn every default edge generated kernel -> generated kernel of the (not yet instantiated) CUgraph
    ``raw_graph`` into a programmatic edge; returns how many edges changed. Raises RuntimeError when the driver
    refuses a call (the graph keeps its full edges then)."""
    from cuda.bindings import driver as cu

    from .. import driver

    def ok(res, what):
        driver.check(res[0], what)
        return res[1:] if len(res) > 2 else res[1]

    graph = cu.CUgraph(raw_graph)
    _, _, _, count = ok(cu.cuGraphGetEdges(graph, 0), "cuGraphGetEdges")
    if not count:
        return 0
    sources, targets, data, count = ok(cu.cuGraphGetEdges(graph, count), "cuGraphGetEdges")
    kernel = cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL
    kinds: dict[int, bool] = {}  # node -> is a kernel node; generated: node -> its function waits itself

    def is_kernel(node) -> bool:
        key = int(node)
        if key not in kinds:
            kinds[key] = ok(cu.cuGraphNodeGetType(node), "cuGraphNodeGetType") == kernel
        return kinds[key]

    def is_generated(node) -> bool:
        if not is_kernel(node):
            return False
        err, params = cu.cuGraphKernelNodeGetParams(node)
        return err == cu.CUresult.CUDA_SUCCESS and driver.is_programmatic(int(params.func))

    change = [(a, b) for a, b, d in zip(sources[:count], targets[:count], data[:count])
              if int(d.type) == 0 and int(d.from_port) == 0 and is_generated(b) and is_generated(a)]  # default edges
    if not change:
        return 0
    old = []
    new = []
    for _ in change:
        e = cu.CUgraphEdgeData()
        old.append(e)
        p = cu.CUgraphEdgeData()
        p.from_port = cu.CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC
        p.type = cu.CUgraphDependencyType.CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
        new.append(p)
    froms, tos = [a for a, _ in change], [b for _, b in change]
    driver.check(cu.cuGraphRemoveDependencies(graph, froms, tos, old, len(change))[0], "cuGraphRemoveDependencies")
    err = cu.cuGraphAddDependencies(graph, froms, tos, new, len(change))[0]
    if err != cu.CUresult.CUDA_SUCCESS:  # put the full edges back: the graph must keep every dependency
        driver.check(cu.cuGraphAddDependencies(graph, froms, tos, old, len(change))[0], "cuGraphAddDependencies")
        driver.check(err, "cuGraphAddDependencies (programmatic)")
    return len(change)
