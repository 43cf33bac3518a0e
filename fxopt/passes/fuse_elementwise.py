"""Fuse chains and DAGs of elementwise ops into one generated kernel each.

Before::

    relu = torch.relu(x);  sigmoid = torch.sigmoid(relu);  mul = sigmoid * 2

After (one launch instead of three)::

    fused = torch.ops.fxopt.fused.default('fxopt_relu_sigmoid_mul_3f1c2a9e', [x])
    getitem = fused[0]

Groups are maximal and cycle-free, grown along producer -> consumer edges between fusible nodes of the same shape
and device (independent chains are never merged: each group is one iteration space); a short chain of a smaller
shape that only feeds a group, broadcast into it, joins it and is recomputed per element (NOTE [Broadcast
producers]). A value also used outside its group becomes an extra output of the kernel. In-place ops, and values
an in-place op touches, are never fused. A group that fails to lower or compile stays as plain PyTorch ops, with
the reason in the pass's notes.
"""

from __future__ import annotations

import heapq
import operator
from collections import defaultdict
from typing import TYPE_CHECKING, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..codegen.printer import Mode
from ..codegen.region import lower_region
from ..runtime.kernel import FusedKernel, fused_op, register
from .base import note, record, tag
from .keep_faster import remember_region
from .rotary import rewrite_rotate_half

if TYPE_CHECKING:
    import networkx as nx

PASS_NAME = "fuse_elementwise"
BACKENDS = ("cuda", "cpp", "inductor")

# NOTE [Broadcast producers]: a group is one iteration space, the shape of its outputs. An elementwise producer
# of a smaller shape that broadcasts into it (an SE gate's sigmoid on [N, C, 1, 1], a [C] bias, a [1] scale) joins
# the group of its consumer and is recomputed for every element of the group, its inputs read broadcast (a kernel
# input of a smaller shape is read with stride 0 in its broadcast dimensions already: FusedKernel._plan). That
# trades a launch (microseconds of host time, plus a round trip of the small tensor through memory) for a few
# arithmetic ops per element of a memory-bound kernel, which pays while the recomputed chain is short: at most
# MAX_RECOMPUTED_OPS elementwise ops per group, counted over everything the group recomputes. Row reductions never
# join (they are not elementwise: their result is a kernel input). A producer whose value is also used outside the
# group stays out (it would be an output of another shape, and it is computed once anyway), as does one that would
# close a cycle. In-place ops and the values they write are not candidates at all (mutated_values).
MAX_RECOMPUTED_OPS = 8
USED_OUTSIDE = "its value is also used outside the kernel"
TOO_LONG = f"more than {MAX_RECOMPUTED_OPS} ops to recompute per element"


def mutated_values(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose tensor an in-place op writes, directly or through a view (conservative: the whole view family)."""
    family: dict[fx.Node, set[fx.Node]] = {}
    for n in gm.graph.nodes:
        family.setdefault(ops.alias_root(n, gm), set()).add(n)
    mutated: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if ops.is_inplace(n, gm) and n.args and isinstance(n.args[0], fx.Node):
            mutated |= family.get(ops.alias_root(n.args[0], gm), {n.args[0]})
            mutated.add(n)
    return mutated


class FuseElementwise:
    """The pass, configured with a backend: ``"cuda"`` (NVRTC), ``"cpp"`` (the system C++ compiler) or
    ``"inductor"`` (TorchInductor, either device)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.device_type = {"cuda": "cuda", "cpp": "cpu"}.get(backend)  # None: any device

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        if self.backend not in BACKENDS:
            note(f"{PASS_NAME}: backend {self.backend!r} generates no kernels here; elementwise ops stay eager")
            return PassResult(gm, False)
        unavailable = self._unavailable()
        if unavailable:
            note(f"{PASS_NAME}: {unavailable}; elementwise ops stay eager")
            return PassResult(gm, False)
        rotated = self.backend != "inductor" and rewrite_rotate_half(gm, self.device_type) > 0  # Inductor fuses the cat itself
        groups = self._groups(gm)
        kernels = gm.meta.setdefault("fxopt_kernels", {})
        fused_any = rotated
        for nodes in groups:
            if self._fuse(gm, nodes, kernels):
                fused_any = True
        if fused_any:
            stable_topological_sort(gm)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, fused_any)

    def _unavailable(self) -> str | None:
        if self.backend == "inductor":
            from ..backends.inductor import inductor_available

            return inductor_available()
        if self.backend == "cpp":
            from ..runtime.cc import compiler_info

            return None if compiler_info() is not None else "no C++ compiler found (set CXX)"
        from ..runtime.nvrtc import nvrtc_available

        ok, why = nvrtc_available()
        return None if ok else f"NVRTC is not available ({why}); pip install 'fxopt[cuda]'"

    # -- grouping ---------------------------------------------------------------------------------------------
    def _candidates(self, gm: fx.GraphModule) -> dict[fx.Node, ops.ElementwiseCall]:
        mutated = mutated_values(gm)
        found = {}
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            call = ops.match_elementwise(node, gm)
            if isinstance(call, str):
                continue  # not elementwise: nothing to say (the report lists what stays eager)
            device = node.meta.get("device")
            if device is None or (self.device_type is not None and device.type != self.device_type):
                continue
            if node in mutated or any(o in mutated for o in call.operands if isinstance(o, fx.Node)):
                note(f"{PASS_NAME}: {node.name} ({call.op.name}) not fused: an in-place op writes its tensor")
                continue
            found[node] = call
        return found

    def _groups(self, gm: fx.GraphModule) -> list[list[fx.Node]]:
        """Maximal cycle-free groups of fusible nodes with one iteration space, in graph order."""
        candidates = self._candidates(gm)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        group_of: dict[fx.Node, int] = {n: order[n] for n in gm.graph.nodes}
        members: dict[int, list[fx.Node]] = {order[n]: [n] for n in gm.graph.nodes}
        import networkx as nx  # here, not at the top: it takes ~0.2 s to import, which `import fxopt` must not pay
        dag = nx.DiGraph()
        dag.add_nodes_from(members)
        for n in gm.graph.nodes:
            for user in n.users:
                dag.add_edge(order[n], order[user])

        def key(n: fx.Node):
            return tuple(ops.tensor_meta(n).shape), n.meta.get("device")

        for node in gm.graph.nodes:
            if node not in candidates:
                continue
            for producer in candidates[node].operands:
                if producer not in candidates or key(producer) != key(node):
                    continue
                a, b = group_of[producer], group_of[node]
                if a == b or _creates_cycle(dag, a, b) or _gathers_inside(members[a] + members[b], candidates):
                    continue
                nx.contracted_nodes(dag, a, b, self_loops=False, copy=False)
                for n in members[b]:
                    group_of[n] = a
                members[a].extend(members.pop(b))
        self._absorb_broadcast_producers(candidates, order, group_of, members, dag)
        groups = [sorted(ns, key=order.__getitem__) for ns in members.values() if len(ns) > 1]
        return sorted(groups, key=lambda ns: order[ns[0]])

    def _absorb_broadcast_producers(self, candidates, order, group_of, members, dag) -> None:
        """Merge cheap producers of a smaller, broadcast shape into the group they feed (NOTE [Broadcast
        producers]). Consumers are visited from the bottom of the graph up, each until nothing more joins it."""
        import networkx as nx  # lazily, as in _groups

        declined: dict[int, str] = {}  # producer group -> why it stays out of the last group that it feeds

        def next_producer(gid: int, full: tuple[int, ...], device, recomputed: int) -> int | None:
            for member in members[gid]:
                for producer in candidates[member].operands:
                    if not isinstance(producer, fx.Node) or producer not in candidates or group_of[producer] == gid:
                        continue
                    a = group_of[producer]
                    why = self._why_not_absorbed(members[a], members[gid], full, device, candidates, recomputed)
                    if why is None and not _creates_cycle(dag, a, gid) and not _gathers_inside(
                            members[a] + members[gid], candidates):
                        return a
                    if why in (USED_OUTSIDE, TOO_LONG):
                        declined[a] = why
            return None

        for gid in sorted(members, key=lambda g: -max(order[n] for n in members[g])):
            if gid not in members or members[gid][0] not in candidates:
                continue  # already absorbed, or not elementwise
            full = tuple(ops.tensor_meta(members[gid][0]).shape)  # every member has it: none has joined yet
            device = members[gid][0].meta.get("device")
            recomputed = 0  # ops this group recomputes per element
            while (a := next_producer(gid, full, device, recomputed)) is not None:
                nx.contracted_nodes(dag, gid, a, self_loops=False, copy=False)
                for n in members[a]:
                    group_of[n] = gid
                recomputed += len(members[a])
                members[gid].extend(members.pop(a))
        for a, why in declined.items():
            if a in members:
                names = ", ".join(n.name for n in members[a])
                note(f"{PASS_NAME}: [{names}] not recomputed in the broadcast kernel it feeds: {why}")

    @staticmethod
    def _why_not_absorbed(producers: list[fx.Node], group: list[fx.Node], full: tuple[int, ...], device,
                          candidates, recomputed: int) -> str | None:
        """Why the producer group may not be recomputed per element inside ``group`` (None: it may)."""
        if any(p not in candidates for p in producers):
            return "not elementwise"
        inside = set(producers) | set(group)
        for p in producers:
            s = tuple(ops.tensor_meta(p).shape)
            if s == full or p.meta.get("device") != device:
                return "same shape or another device"
            try:
                if tuple(torch.broadcast_shapes(s, full)) != full:
                    return "does not broadcast into the group"
            except RuntimeError:
                return "does not broadcast into the group"
            if any(u not in inside for u in p.users):
                return USED_OUTSIDE
        if recomputed + len(producers) > MAX_RECOMPUTED_OPS:
            return TOO_LONG
        return None

    # -- rewriting --------------------------------------------------------------------------------------------
    def _fuse(self, gm: fx.GraphModule, nodes: Sequence[fx.Node], kernels: dict) -> bool:
        inside = set(nodes)
        inputs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        names = " -> ".join(ops.describe(n) for n in nodes)
        try:
            kernel = register(self._kernel(gm, nodes, inputs, outputs))
        except Exception as e:  # a region that cannot be lowered or compiled stays eager; the reason is kept
            note(f"{PASS_NAME}: group [{names}] kept as PyTorch ops: {type(e).__name__}: {e}")
            return False
        graph = gm.graph
        last_input = max(inputs, key=lambda n: _position(graph, n))
        with graph.inserting_before(insertion_point(last_input, inside, outputs)):
            fused = graph.create_node("call_function", fused_op, (kernel.name, inputs), name="fused")
        tag(fused, PASS_NAME)
        fused.meta["fxopt_kernel"] = kernel.name
        kernels[fused.name] = kernel
        remember_region(gm, fused, nodes, outputs, inputs)  # for keep_faster_regions (opt-in)
        with graph.inserting_after(fused):
            for k, out in enumerate(outputs):
                item = graph.call_function(operator.getitem, (fused, k))
                tag(item, PASS_NAME)
                item.meta.update({m: out.meta[m] for m in ("tensor_meta", "device", "has_tensor") if m in out.meta})
                out.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
        for n in reversed(nodes):
            graph.erase_node(n)
        record(groups=1, nodes_fused=len(nodes))
        return True

    def _kernel(self, gm, nodes, inputs, outputs):
        """Compile one group with this pass's backend (raises on failure; the caller keeps the group eager)."""
        if self.backend == "inductor":
            from ..backends.inductor import InductorKernel

            return InductorKernel(gm, nodes, inputs, outputs)
        region = lower_region(gm, nodes, inputs, outputs)
        out_numel = _numel(nodes[-1])
        modes = [Mode.SCALAR if _numel(i) == 1 and out_numel != 1 else Mode.FULL for i in inputs]
        return FusedKernel(region, modes, self.backend, nodes[-1].meta["device"],
                           layout=layout_program(gm, nodes, inputs, outputs)).compile()


def layout_program(gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Sequence[fx.Node],
                   outputs: Sequence[fx.Node]):
    """The group as eager computes it, op by op, for the strides of its outputs (runtime/strides.py, NOTE [Output
    layout] in runtime/kernel.py): each step is an op name and its operands in the op table's order."""
    where = {n: ("in", i) for i, n in enumerate(inputs)}
    steps = []
    for k, n in enumerate(nodes):
        call = ops.normalize(n, gm)
        refs = tuple(where[o] if isinstance(o, fx.Node) else ("scalar",) for o in call.operands)
        steps.append((call.op.name, refs))
        where[n] = ("step", k)
    return tuple(steps), tuple(where[o] for o in outputs)


def _gathers_inside(nodes: list[fx.Node], candidates: dict) -> bool:
    """Whether one of ``nodes`` reads another at other indices (NOTE [Gathering reads] in fxopt/ops/elementwise.py):
    such an operand must come from memory, so the two cannot share a kernel."""
    inside = set(nodes)
    return any(candidates[n].op.gathers and candidates[n].operands[0] in inside for n in nodes if n in candidates)


def _numel(n: fx.Node) -> int:
    shape = ops.tensor_meta(n).shape
    out = 1
    for s in shape:
        out *= s
    return out


def insertion_point(last_input: fx.Node, members: set[fx.Node], outputs: Sequence[fx.Node]) -> fx.Node:
    """The node before which a fused node goes: the first node after its last input that is a member of the group
    or uses one of its outputs.

    NOTE [Fused node placement]: right after the last input is the earliest valid place, and can be far above the
    members (inputs ready at the top of the graph, members at the bottom): the kernel's outputs then live through
    everything in between, which eager never held at once (fxopt/memory.py measured a 4 -> 5 MiB activation peak).
    The first member after the last input is where eager starts computing the group; stopping earlier at a user of
    an output means no node has to move for the fused node (users above the last input still do, as before).
    """
    wanted = set(members)
    for out in outputs:
        wanted.update(u for u in out.users if u not in members)
    node = last_input.next
    while node.op != "output" and node not in wanted:
        node = node.next
    return node


def _position(graph: fx.Graph, node: fx.Node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    raise AssertionError(f"{node} is not in the graph")


def _creates_cycle(dag: nx.DiGraph, a: int, b: int) -> bool:
    """Merging groups a and b (a feeds b) closes a cycle iff b is reachable from a through some other group."""
    import networkx as nx  # lazily, as in _groups
    for succ in dag.successors(a):
        if succ != b and nx.has_path(dag, succ, b):
            return True
    for succ in dag.successors(b):
        if succ != a and nx.has_path(dag, succ, a):
            return True
    return False


def stable_topological_sort(gm: fx.GraphModule) -> None:
    """Reorder nodes so every node follows its inputs, moving as few as possible (original order breaks ties).

    In-place ops keep their place relative to every other use of the tensor they write: those uses are added
    as ordering constraints, since the data edges alone do not say "read before it is overwritten".
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    deps: dict[fx.Node, set[fx.Node]] = {n: set(n.all_input_nodes) for n in nodes}
    for m in nodes:
        if ops.is_inplace(m, gm) and m.args and isinstance(m.args[0], fx.Node):
            written = m.args[0]
            for u in written.users:
                if u is m:
                    continue
                if index[u] < index[m]:
                    deps[m].add(u)
                else:
                    deps[u].add(m)
    if all(index[d] < index[n] for n in nodes for d in deps[n]):
        return
    users: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    pending = {n: len(deps[n]) for n in nodes}
    for n in nodes:
        for d in deps[n]:
            users[d].append(n)
    ready = [(index[n], n.name, n) for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    ordered: list[fx.Node] = []
    while ready:
        _, _, n = heapq.heappop(ready)
        ordered.append(n)
        for u in users[n]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, (index[u], u.name, u))
    assert len(ordered) == len(nodes), "fusion produced a cycle: the grouping should have prevented it"
    # Reinsert in the new order: moving a node to the end of the graph, one by one, keeps it valid throughout.
    output = next(n for n in nodes if n.op == "output")
    for n in ordered:
        if n is not output:
            output.prepend(n)


def fuse_elementwise(backend: str) -> FuseElementwise:
    """The elementwise fusion pass for ``backend`` (``"cuda"`` or ``"cpp"``)."""
    return FuseElementwise(backend)
