"""A fused kernel whose result only goes into a cache writes it there itself (opt-in).

Before (a decoder's key, rotated, then written into the KV cache at this step's position)::

    fused = torch.ops.fxopt.fused.default('fxopt_mul_rotate_half_add_...', [k, cos, sin])
    getitem = fused[0]
    k_cache.index_copy_(2, pos, getitem)

After (one kernel instead of two, and no temporary)::

    torch.ops.fxopt.fused_into.default('fxopt_mul_rotate_half_add_..._into', [k, cos, sin], k_cache, pos)

NOTE [Writes into a cache]: the kernel computes the region's one output per element and stores it at the
destination's strides, its offset along ``dim`` moved by the index, which it reads on the device (a position
tensor changes between CUDA-graph replays), as Inductor writes a cache update. The index is checked: on the CPU on
the host before the call (eager's IndexError), on CUDA by the kernel (a device fault, as eager's device-side
assert). Only where nothing else reads the computed value, the index is one int64 element, the value has size 1
along ``dim`` and the destination's shape elsewhere, and no kernel input shares memory with the destination (the
kernel would read what it writes). The write stays where the ``index_copy_`` was, so in-place order is kept.
Opt-in (``enable=["write_into_caches"]``) until a GPU measurement: the 12-layer decoder's key copies are 12 of the
24 ``index_copy_`` kernels of a step (43 µs of its 510 on the H100).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..codegen.region import kernel_name
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
    if any(ops.alias_root(i, gm) is ops.alias_root(dest, gm) for i in fused.args[1]):
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
            node = tag(graph.call_function(fused_into_op, (into.name, list(fused.args[1]), dest, index)), PASS_NAME)
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
        graph.lint()
        gm.recompile()
    return PassResult(gm, done > 0)
