"""A fused kernel whose result only goes into a cache writes it there itself; copies into other caches at the
same index join it.

Before (a decoder's key, rotated, then written into the KV cache at this step's position, then its value)::

    fused = torch.ops.fxopt.fused.default('fxopt_mul_rotate_half_add_...', [k, cos, sin])
    getitem = fused[0]
    k_cache.index_copy_(2, pos, getitem)
    v_cache.index_copy_(2, pos, v)

After (one kernel instead of three, and no temporary)::

    torch.ops.fxopt.fused_into.default('fxopt_mul_rotate_half_add_..._into', [k, cos, sin, v], [k_cache, v_cache],
                                       pos)

NOTE [Writes into a cache]: the kernel computes the region's outputs per element and stores output k at
destination k's strides, its offset along ``dim`` moved by the index, which it reads on the device (a position
tensor changes between CUDA-graph replays), as Inductor writes a cache update. The index is checked: on the CPU on
the host before the call (eager's IndexError), on CUDA by the kernel (a device fault, as eager's device-side
assert). Only where nothing else reads the computed value, the index is one int64 element, the value has size 1
along ``dim`` and the destination's shape elsewhere, and no kernel input shares memory with a destination (the
kernel would read what it writes). The write stays where the ``index_copy_`` was, so in-place order is kept.
In the default pipeline since the H100 measurement (benchmarks/NOTES.md, Decoding).

NOTE [Sibling cache writes]: a later ``index_copy_`` at the same index node and dim, of a value of the same shape
(the decoder's value, a view of its projection), joins the kernel as one more input stored as one more output: one
launch for both caches. The kernel's write then moves down to the copy's place, so nothing in between may be an
in-place op or read the first destination, and the destinations share their size along ``dim`` (one bound for the
index). A copy of a value no kernel computes starts a group of its own when a sibling follows it.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..codegen.printer import Mode
from ..codegen.region import Region, kernel_name
from ..runtime.kernel import KERNELS, FusedKernel, fused_into_op, fused_op, register
from .base import note, record, tag

PASS_NAME = "write_into_caches"


def _why_not(ic: fx.Node, gm: fx.GraphModule) -> str | None:
    """None when the ``index_copy_`` ``ic``, whose source is output 0 of a fused node, can be written by that
    node's kernel; else why not."""
    dest, dim, index, source = ic.args
    if not isinstance(dest, fx.Node) or not isinstance(index, fx.Node) or not isinstance(dim, int) or ic.kwargs:
        return "arguments not understood"
    fused = source.args[0]
    kernel = KERNELS.get(fused.args[0])
    if source.args[1] != 0 or not isinstance(kernel, FusedKernel) or len(kernel.output_dtypes) != 1:
        return "the value is not the one output of a generated elementwise kernel"
    if len(source.users) != 1 or len(fused.users) != 1:
        return "the value is also read elsewhere"
    tm_d, tm_i, tm_s = (ops.tensor_meta(n) for n in (dest, index, source))
    if tm_d is None or tm_i is None or tm_s is None:
        return "no recorded shapes"
    if tm_i.dtype != torch.int64 or tuple(tm_i.shape) not in ((1,), ()):
        return "the index is not one int64 element"
    rank = len(tm_d.shape)
    d = dim % rank if rank else 0
    if (len(tm_s.shape) != rank or tm_s.shape[d] != 1 or tm_d.dtype != tm_s.dtype
            or any(a != b for k, (a, b) in enumerate(zip(tm_s.shape, tm_d.shape)) if k != d)):
        return "the value does not fill one index of the destination"
    if any(ops.memory_key(i, gm) == ops.memory_key(dest, gm) for i in fused.args[1]):
        return "a kernel input shares memory with the destination"
    return None


def write_into_caches(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    kernels = gm.meta.setdefault("fxopt_kernels", {})
    done = 0
    for ic in list(graph.nodes):
        if not ops.is_call_to(ic, ops.INDEX_COPY_SPELLINGS):
            continue
        source = ic.args[3] if len(ic.args) == 4 else None
        if not (isinstance(source, fx.Node) and source.target is operator.getitem
                and isinstance(source.args[0], fx.Node) and source.args[0].target is fused_op):
            continue  # not written from a generated kernel's output
        why = _why_not(ic, gm)
        if why is not None:
            note(f"{PASS_NAME}: {ic.name} stays an index_copy_ ({why})")
            continue
        dest, dim, index, _ = ic.args
        fused = source.args[0]
        kernel = KERNELS[fused.args[0]]
        region = dataclasses.replace(kernel.region, scatter_dim=dim % len(ops.tensor_meta(dest).shape))
        region.name = kernel_name(region)
        try:
            into = register(FusedKernel(region, kernel.modes, kernel.backend, kernel.device).compile())
        except Exception as e:  # noqa: BLE001 -- the index_copy_ stays as it was
            note(f"{PASS_NAME}: {ic.name} stays an index_copy_ ({type(e).__name__}: {e})")
            continue
        with graph.inserting_before(ic):
            node = tag(graph.call_function(fused_into_op, (into.name, list(fused.args[1]), [dest], index)), PASS_NAME)
        node.meta["fxopt_kernel"] = into.name
        kernels[node.name] = into
        ic.replace_all_uses_with(dest)  # index_copy_ returns its destination
        graph.erase_node(ic)
        graph.erase_node(source)
        graph.erase_node(fused)
        kernels.pop(fused.name, None)
        done += 1
    if done:
        record(cache_writes=done)
    joined = _join_sibling_writes(gm, kernels)
    if joined:
        record(sibling_writes_joined=joined)
    if done or joined:
        graph.lint()
        gm.recompile()
    return PassResult(gm, bool(done or joined))


def _write_parts(node: fx.Node) -> tuple | None:
    """(dim, index, dests, kernel inputs, region or None) of a write this pass can extend: a ``fused_into`` node, or
    an ``index_copy_`` of a whole value (its region: a copy); None otherwise."""
    if node.op == "call_function" and node.target is fused_into_op:
        name, inputs, dests, index = node.args
        kernel = KERNELS.get(name)
        if not isinstance(kernel, FusedKernel):
            return None
        return kernel.region.scatter_dim, index, list(dests), list(inputs), kernel
    if ops.is_call_to(node, ops.INDEX_COPY_SPELLINGS) and len(node.args) == 4 and not node.kwargs:
        dest, dim, index, source = node.args
        if isinstance(dest, fx.Node) and isinstance(index, fx.Node) and isinstance(source, fx.Node) \
                and isinstance(dim, int):
            tm = ops.tensor_meta(dest)
            return (dim % len(tm.shape) if tm is not None and tm.shape else dim), index, [dest], [source], None
    return None


def _why_not_join(first: fx.Node, parts: tuple, later: fx.Node, gm: fx.GraphModule, order: dict) -> str | None:
    """None when the ``index_copy_`` ``later`` can join the write ``first`` (NOTE [Sibling cache writes])."""
    dim, index, dests, inputs, _ = parts
    dest, _, _, source = later.args
    tm_s, tm_d, tm_0 = ops.tensor_meta(source), ops.tensor_meta(dest), ops.tensor_meta(dests[0])
    shape = torch.broadcast_shapes(*[tuple(ops.tensor_meta(i).shape) for i in inputs])
    if tm_s is None or tm_d is None or tm_s.dtype != tm_d.dtype or tuple(tm_s.shape) != tuple(shape):
        return "another shape or dtype"
    if len(tm_d.shape) != len(tm_0.shape) or tm_d.shape[dim] != tm_0.shape[dim] or any(
            a != b for d, (a, b) in enumerate(zip(tm_s.shape, tm_d.shape)) if d != dim):
        return "a destination of another shape"
    roots = {ops.memory_key(d, gm) for d in dests}
    root = ops.memory_key(dest, gm)
    if root in roots or any(ops.memory_key(i, gm) in roots | {root} for i in inputs + [source]):
        return "a destination shares memory with another or with an input"
    for node in list(gm.graph.nodes)[order[first] + 1:order[later]]:
        if ops.is_inplace(node, gm):
            return f"{node.name} writes in place between the two"
        if any(ops.memory_key(a, gm) in roots for a in node.all_input_nodes):
            return f"{node.name} reads the first destination between the two"
    return None


def _join_sibling_writes(gm: fx.GraphModule, kernels: dict) -> int:
    """NOTE [Sibling cache writes]: each ``index_copy_`` that can join the write before it at the same index and dim
    does, as one more input and output of that write's kernel."""
    graph = gm.graph
    joined = 0
    refused: set[tuple[fx.Node, fx.Node]] = set()  # pairs already noted: a rescan after a join does not repeat them
    changed = True
    while changed:
        changed = False
        order = {n: i for i, n in enumerate(graph.nodes)}
        writes = [n for n in graph.nodes if _write_parts(n) is not None]
        for first, later in zip(writes, writes[1:]):
            parts = _write_parts(first)
            if (first, later) in refused or later.target is fused_into_op or parts[1] is not later.args[2] \
                    or parts[0] != _write_parts(later)[0]:
                continue
            why = _why_not_join(first, parts, later, gm, order)
            if why is not None:
                refused.add((first, later))
                note(f"{PASS_NAME}: {later.name} stays an index_copy_ beside {first.name} ({why})")
                continue
            if _join(gm, first, parts, later, kernels):
                joined += 1
                changed = True
                break
    return joined


def _join(gm: fx.GraphModule, first: fx.Node, parts: tuple, later: fx.Node, kernels: dict) -> bool:
    """Replace the writes ``first`` and ``later`` by one ``fused_into`` node at ``later``'s place."""
    dim, index, dests, inputs, kernel = parts
    dest, _, _, source = later.args
    dtype = ops.tensor_meta(source).dtype
    if kernel is None:  # a copy: the identity region of its source
        first_dtype = ops.tensor_meta(inputs[0]).dtype
        rank = len(ops.tensor_meta(inputs[0]).shape)
        region = Region("", [first_dtype], [], [("in0", first_dtype)], rank, ["copy"], scatter_dim=dim)
        modes, backend = [Mode.FULL], _backend_of(inputs[0])
        if backend is None:
            return False
        device = torch.device(inputs[0].meta["device"])
    else:
        region, modes, backend, device = kernel.region, kernel.modes, kernel.backend, kernel.device
    n = len(region.input_dtypes)
    region = dataclasses.replace(region, input_dtypes=[*region.input_dtypes, dtype],
                                 outputs=[*region.outputs, (f"in{n}", dtype)], scatter_dim=dim,
                                 op_names=[*region.op_names] if "copy" in region.op_names else
                                 [*region.op_names, "copy"])
    region.name = kernel_name(region)
    try:
        into = register(FusedKernel(region, [*modes, Mode.FULL], backend, device).compile())
    except Exception as e:  # noqa: BLE001 -- the writes stay as they were
        note(f"{PASS_NAME}: {later.name} stays an index_copy_ ({type(e).__name__}: {e})")
        return False
    graph = gm.graph
    with graph.inserting_before(later):
        node = tag(graph.call_function(fused_into_op, (into.name, [*inputs, source], [*dests, dest], index)),
                   PASS_NAME)
    node.meta["fxopt_kernel"] = into.name
    kernels[node.name] = into
    for old in (later, first):
        if old.target is not fused_into_op:
            old.replace_all_uses_with(old.args[0])  # index_copy_ returns its destination
        kernels.pop(old.name, None)
        graph.erase_node(old)
    return True


def _backend_of(value: fx.Node) -> str | None:
    device = value.meta.get("device")
    if device is None:
        return None
    return "cuda" if torch.device(device).type == "cuda" else "cpp"
