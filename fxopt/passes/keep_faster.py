"""Keep eager's ops for a fused region where they are faster than the generated kernel (opt-in).

A fused kernel is not faster everywhere: one over a few long rows, or a short chain that eager runs as one vectorized
ATen kernel, can lose to eager's ops on some GPU. The fusion passes remember each region's ops as they were
(:func:`remember_region`, in ``gm.meta["fxopt_eager_regions"]``); this pass times every fused node against them,
each on random inputs of the recorded shapes, dtypes and strides, in interleaved rounds on the node's device (the
wall time of a block of calls, synchronized: host and GPU time, what a call without CUDA graphs costs), and puts
eager's ops back where they are faster by more than ``MARGIN``. The pass's notes say, per region, both times and which
was kept. Opt-in (``optimize(..., enable=["keep_faster_regions"])``) until a GPU measurement shows what it changes:
it makes the graph depend on timings, which the default pipeline's graphs do not.
"""

from __future__ import annotations

import operator
import statistics
import time
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..runtime.kernel import fused_op
from ..runtime.probe import random_like
from .base import note, record, tag

PASS_NAME = "keep_faster_regions"
REGIONS = "fxopt_eager_regions"
MARGIN = 1.05  # eager's ops are kept only when the kernel is slower by more than this factor
ROUNDS, CALLS = 7, 20  # rounds of interleaved timing, calls per system per round


def remember_region(gm: fx.GraphModule, fused: fx.Node, members: Sequence[fx.Node], outputs: Sequence[fx.Node],
                    kernel_args: Sequence[Any]) -> None:
    """Record the ops a fused node replaces (call before erasing them): a graph of them (a plain fx.Graph, made a
    module only when timed: the default pipeline pays microseconds per region), its inputs given as positions in the
    fused node's input list (which later rewrites keep up to date, while the nodes themselves may go) and its
    outputs in the fused node's order. Regions with an input the kernel does not take are not recorded."""
    inside = set(members)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    positions = []
    for n in members:
        for a in n.all_input_nodes:
            if a in inside or a in env:
                continue
            index = next((i for i, k in enumerate(kernel_args) if k is a), None)
            if index is None:
                return
            env[a] = graph.placeholder(f"in{len(positions)}")
            positions.append(index)
    for n in members:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    gm.meta.setdefault(REGIONS, {})[fused.name] = (graph, tuple(positions), len(outputs))


def keep_faster_regions(gm: fx.GraphModule) -> PassResult:
    regions = gm.meta.get(REGIONS, {})
    kept = timed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not fused_op or node.name not in regions:
            continue
        graph, positions, n_out = regions[node.name]
        name, kernel_inputs = node.args
        inputs = [kernel_inputs[p] for p in positions]
        try:
            region = fx.GraphModule(gm, graph)
            args = [random_like(n) for n in kernel_inputs]
            fused_us, eager_us = _time_pair(lambda: fused_op(name, args),
                                            lambda: region(*[args[p] for p in positions]), args)
        except Exception as e:  # noqa: BLE001 -- not timed: the kernel stays
            note(f"{PASS_NAME}: {name} not timed ({type(e).__name__}: {e})")
            continue
        timed += 1
        if fused_us <= MARGIN * eager_us:
            note(f"{PASS_NAME}: {name} kept: {fused_us:.1f} µs a call against eager's {eager_us:.1f}")
            continue
        _inline(gm, node, region, inputs, n_out)
        kept += 1
        note(f"{PASS_NAME}: eager's ops kept for {name}: {eager_us:.1f} µs a call against the kernel's {fused_us:.1f}")
    if timed:
        record(regions_timed=timed, eager_kept=kept)
    if kept:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, kept > 0)


def _time_pair(fused, eager, args) -> tuple[float, float]:
    """Median µs per call of each, timed in interleaved rounds of CALLS calls (order alternating per round)."""
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        for fn in (fused, eager, fused, eager):  # compile, load, warm caches
            fn()
        sync()
        samples: dict[int, list[float]] = {0: [], 1: []}
        for r in range(ROUNDS):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                fn = (fused, eager)[which]
                t0 = time.perf_counter()
                for _ in range(CALLS):
                    fn()
                sync()
                samples[which].append((time.perf_counter() - t0) * 1e6 / CALLS)
    return statistics.median(samples[0]), statistics.median(samples[1])


def _inline(gm: fx.GraphModule, fused: fx.Node, region: fx.GraphModule, inputs: list[fx.Node], n_out: int) -> None:
    """Replace ``fused`` (and its getitems) by a copy of ``region``'s ops on ``inputs``."""
    graph = gm.graph
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, inputs))
    outputs: tuple = ()
    with graph.inserting_before(fused):
        for n in region.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                outputs = n.args[0]
                continue
            # get_attr and call_module targets are paths in the root, whose attributes the region shares
            env[n] = tag(graph.node_copy(n, lambda a: env[a]), PASS_NAME)
    results = [env[o] for o in outputs]
    for user in list(fused.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            user.replace_all_uses_with(results[user.args[1]])
            graph.erase_node(user)
    assert not fused.users, f"{fused.name} has users other than getitem"
    assert len(results) == n_out
    graph.erase_node(fused)
