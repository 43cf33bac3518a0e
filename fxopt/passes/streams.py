"""Independent branches on side CUDA streams (opt-in: ``fxopt.optimize(..., enable=["parallel_branches"])``).

A *region* is a value ``x`` (the fork) read by k >= 2 branches with no path between them, up to the first node that
reads two of them (the join: the ``torch.cat`` of an inception block, the output tuple of parallel heads). Branches
that launch enough GPU work (a convolution or GEMM, or ``MIN_LAUNCHES`` kernels) are worth a stream: the heaviest
of them stays on the caller's stream, the others go to side streams (at most ``MAX_SIDE_STREAMS``); light branches
stay on the caller's stream. Each side branch's nodes become contiguous, between the runtime calls of
``fxopt/runtime/streams.py`` (which say how events and the caching allocator are handled).

Before (an inception block, after the default pipeline)::

    conv_a = torch.cudnn_convolution_relu(x, w_a, ...)
    conv_b = torch.cudnn_convolution_relu(x, w_b1, ...);  conv_b2 = torch.cudnn_convolution_relu(conv_b, w_b2, ...)
    pool = F.max_pool2d(x, 3, 1, 1);  conv_c = torch.cudnn_convolution_relu(pool, w_c, ...)
    cat = torch.cat([conv_a, conv_b2, conv_c], 1)

After (conv_b's branch is the heaviest: it stays on the caller's stream)::

    fork = fxopt_runtime_streams_fork(0)
    enter_branch = fxopt_runtime_streams_enter_branch(fork, 0)
    conv_a = torch.cudnn_convolution_relu(x, w_a, ...)
    exit_branch = fxopt_runtime_streams_exit_branch(enter_branch, conv_a)
    enter_branch_1 = fxopt_runtime_streams_enter_branch(fork, 1)
    pool = F.max_pool2d(x, 3, 1, 1);  conv_c = torch.cudnn_convolution_relu(pool, w_c, ...)
    exit_branch_1 = fxopt_runtime_streams_exit_branch(enter_branch_1, conv_c)
    conv_b = ...;  conv_b2 = ...
    join = fxopt_runtime_streams_join(fork, exit_branch, exit_branch_1, inputs=[x])
    cat = torch.cat([conv_a, conv_b2, conv_c], 1)

Only CUDA graphs are rewritten (on CPU the pass is a no-op with a note). It runs last: a pass after it could move
nodes across the stream switches (``fxopt.optimize`` refuses such a pipeline). Regions do not nest or overlap: an
inner fork inside a branch of a rewritten region stays on that branch's stream. Regions with in-place or random ops
are left alone (moving a node past them would change what it reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..runtime import streams as runtime
from .base import note, record, tag

PASS_NAME = "parallel_branches"
MIN_LAUNCHES = 3  # a branch without a convolution/GEMM needs this many kernels to be worth a stream's events
MAX_SIDE_STREAMS = 4


@dataclass
class Branch:
    """The nodes only one user of the fork leads to, before the join, in graph order."""

    seed: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)
    launches: int = 0  # kernel-launching nodes (ops.launches_kernel)
    heavy: int = 0  # convolutions and GEMMs among them
    work: float = 0.0  # a rough cost (multiply-adds for convolutions/GEMMs, elements for the rest): picks the main

    @property
    def qualifies(self) -> bool:
        return self.heavy > 0 or self.launches >= MIN_LAUNCHES


@dataclass
class Region:
    """A fork, its branches (in the order of the fork's users) and the join; ``reason`` says why it is not
    rewritten (None: it is)."""

    fork: fx.Node
    join: fx.Node
    branches: list[Branch]
    main: Branch | None = None
    side: list[Branch] = field(default_factory=list)
    device: torch.device | None = None
    reason: str | None = None

    def describe(self) -> str:
        sizes = "/".join(str(len(b.nodes)) for b in self.branches)
        return f"{self.fork.name} -> {self.join.name} ({len(self.branches)} branches of {sizes} nodes)"


def _numel(node: fx.Node) -> int:
    tm = ops.tensor_meta(node)
    return math.prod(tm.shape) if tm is not None else 0


def _work(node: fx.Node, gm: fx.GraphModule) -> float:
    """Multiply-adds of a convolution or GEMM (from the recorded shapes), the output size of anything else."""
    out = _numel(node)
    if not ops.is_heavy(node, gm):
        return float(out)
    weight_shape = None
    if node.op == "call_module":
        weight = getattr(gm.get_submodule(node.target), "weight", None)
        weight_shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    elif node.op == "call_function" and ops.is_conv_function(node.target) and len(node.args) > 1:
        tm = ops.tensor_meta(node.args[1])
        weight_shape = tuple(tm.shape) if tm is not None else None
    if weight_shape is not None and len(weight_shape) >= 2:
        per_output = math.prod(weight_shape[1:])  # conv: (Cin/groups)*k*k; linear: in_features
        return float(out * per_output)
    args = [a for a in node.args if isinstance(a, fx.Node)]
    operand = args[1] if ops.is_weight_first_gemm(node.target) and len(args) > 1 else (args[0] if args else None)
    tm = ops.tensor_meta(operand)
    return float(out * (tm.shape[-1] if tm is not None and len(tm.shape) else 1))


def _blocks_reordering(node: fx.Node, gm: fx.GraphModule) -> bool:
    """In-place and random ops (and calls to the stream runtime itself): no node may be moved past them."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.op == "call_function" and node.target in runtime.RUNTIME_FUNCTIONS:
        return True
    if ops.is_inplace(node, gm):
        return True
    return node.op != "call_method" and node.is_impure()


def _region_at(fork: fx.Node, gm: fx.GraphModule, position: dict[fx.Node, int]) -> Region | None:
    """The region forking at ``fork``, or None when its users never meet or fewer than two branches matter."""
    seeds = sorted(fork.users, key=position.__getitem__)
    if len(seeds) < 2:
        return None
    bit = {s: 1 << i for i, s in enumerate(seeds)}
    mask: dict[fx.Node, int] = {}
    join = None
    node = fork.next
    while node.op != "root":
        m = bit.get(node, 0)
        for inp in node.all_input_nodes:
            m |= mask.get(inp, 0)
        if m:
            if m & (m - 1):  # two branches meet
                join = node
                break
            mask[node] = m
        node = node.next
    if join is None:
        return None
    branches = [Branch(s) for s in seeds]
    by_bit = {1 << i: b for i, b in enumerate(branches)}
    for n, m in mask.items():  # in graph order: dicts keep insertion order
        b = by_bit[m]
        b.nodes.append(n)
        if ops.launches_kernel(n, gm):
            b.launches += 1
            b.heavy += ops.is_heavy(n, gm)
            b.work += _work(n, gm)
    region = Region(fork, join, branches)
    worth = [b for b in branches if b.qualifies]
    if len(worth) < 2:
        return None
    region.main = max(worth, key=lambda b: b.work)  # max keeps the first of equals
    side = sorted((b for b in worth if b is not region.main), key=lambda b: -b.work)[:MAX_SIDE_STREAMS]
    region.side = sorted(side, key=lambda b: position[b.seed])
    devices = {n.meta.get("device") for b in worth for n in b.nodes if ops.launches_kernel(n, gm)}
    devices.discard(None)
    if len(devices) == 1:
        region.device = next(iter(devices))
    span = range(position[fork] + 1, position[join] + 1)
    nodes = list(gm.graph.nodes)
    blocker = next((nodes[i] for i in span if _blocks_reordering(nodes[i], gm)), None)
    if len(devices) != 1:
        region.reason = f"its branches run on {sorted(map(str, devices)) or 'no device'}, not one CUDA device"
    elif region.device.type != "cuda":
        region.reason = f"it runs on {region.device}: streams are CUDA-only"
    elif blocker is not None:
        region.reason = f"{blocker.name} ({ops.describe(blocker)}) is in-place, random or a stream call: no " \
                        f"node may move past it"
    return region


_OVERLAPS = "it overlaps an earlier region (nested in one of its branches, or interleaved with it)"


def find_regions(gm: fx.GraphModule) -> list[Region]:
    """Every fork/join region of ``gm`` with at least two branches worth a stream, in graph order.

    A region is rewritten when its ``reason`` is None: on one CUDA device (from ``node.meta["device"]``), free of
    in-place and random ops, and not overlapping an earlier region (a region nested in another's branch, or one whose
    fork lies inside another's span, gets a reason saying so). Reads the graph only.
    """
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    regions: list[Region] = []
    taken_until = -1  # the join position of the last region kept for rewriting
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output") or node.meta.get("has_tensor") is False or len(node.users) < 2:
            continue  # a weight read twice is not a fork of the data flow
        region = _region_at(node, gm, position)
        if region is None:
            continue
        if region.reason is None and position[node] < taken_until:
            region.reason = _OVERLAPS
        if region.reason is None:
            taken_until = position[region.join]
        regions.append(region)
    return regions


def _created(node: fx.Node) -> fx.Node:
    node.meta.update(device=None, has_tensor=False)  # the runtime's handles: no tensor, no kernel
    return tag(node, PASS_NAME)


def _rewrite(gm: fx.GraphModule, region: Region) -> int:
    """Rewrite one region (see the module doc); returns the number of nodes moved onto side streams."""
    graph = gm.graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    members = [set(b.nodes) for b in region.side]
    external: dict[fx.Node, None] = {}  # inputs of side branches from outside their branch, in first-use order
    for b, own in zip(region.side, members):
        for n in b.nodes:
            for inp in n.all_input_nodes:
                if inp not in own:
                    external.setdefault(inp)
    weights = [e for e in external if e.op == "get_attr"]  # free to move: they read nothing
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = max([region.fork, *placeholders[-1:], *(e for e in external if e.op != "get_attr")],
                 key=position.__getitem__)
    outputs = [[n for n in b.nodes if any(u not in own for u in n.users)] for b, own in zip(region.side, members)]

    with graph.inserting_after(anchor):
        fork = _created(graph.call_function(runtime.fork, (region.device.index or 0,)))
    for w in weights:
        if position[w] > position[anchor]:
            fork.prepend(w)
    cursor, exits, moved = fork, [], 0
    for i, (b, outs) in enumerate(zip(region.side, outputs)):
        with graph.inserting_after(cursor):
            cursor = enter = _created(graph.call_function(runtime.enter_branch, (fork, i)))
        for n in b.nodes:
            if cursor.next is not n:
                cursor.append(n)
            cursor = n
            moved += 1
        with graph.inserting_after(cursor):
            cursor = _created(graph.call_function(runtime.exit_branch, (enter, *outs)))
        exits.append(cursor)
    keep_alive = [e for e in external if e.op != "get_attr" and e.meta.get("has_tensor", True)]
    with graph.inserting_before(region.join):
        _created(graph.call_function(runtime.join, (fork, *exits), {"inputs": keep_alive}))
    return moved


def parallel_branches(gm: fx.GraphModule) -> PassResult:
    """Run the independent branches of fork/join regions on side CUDA streams (see the module doc)."""
    regions = find_regions(gm)
    chosen = [r for r in regions if r.reason is None]
    if not chosen:
        devices = {n.meta.get("device") for n in gm.graph.nodes} - {None}
        if not any(d.type == "cuda" for d in devices):
            note(f"{PASS_NAME}: the graph runs on {', '.join(sorted(map(str, devices))) or 'no device'}: CUDA "
                 f"streams only; {len(regions)} fork/join region(s) found, unchanged")
            return PassResult(gm, False)
    nested = 0
    for r in regions:
        if r.reason == _OVERLAPS:
            nested += 1
        elif r.reason is not None:
            note(f"{PASS_NAME}: region {r.describe()} kept on one stream: {r.reason}")
    if nested:
        note(f"{PASS_NAME}: {nested} region(s) inside rewritten ones run on their enclosing branch's stream")
    if not chosen:
        return PassResult(gm, False)
    moved = sum(_rewrite(gm, r) for r in chosen)
    gm.graph.lint()
    gm.recompile()
    record(regions=len(chosen), side_branches=sum(len(r.side) for r in chosen), nodes_moved=moved)
    return PassResult(gm, True)
