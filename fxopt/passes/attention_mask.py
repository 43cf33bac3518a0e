"""Bool attention masks -> one additive float mask per (mask, query dtype), read by every SDPA call that read the mask.

``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` with a bool ``mask`` converts it to an additive float
mask inside every call (``convert_boolean_attn_mask``: a few small kernels). The layers of a decoder all read one
mask, so a 12-layer decode step converts the same mask 12 times per token. This pass converts it once, right after
the mask is computed, and hands every such call the float mask::

    le = self.positions <= pos                               le = self.positions <= pos
    mask = le.view(1, 1, 1, -1)                              where = torch.where(le, 0.0, -inf)
    a = sdpa(q0, k0, v0, attn_mask=mask)          ->         to = where.to(torch.float16)       # the query's dtype
    b = sdpa(q1, k1, v1, attn_mask=mask)                     view = to.view(1, 1, 1, -1)
                                                             a = sdpa(q0, k0, v0, attn_mask=view)
                                                             b = sdpa(q1, k1, v1, attn_mask=view)

(ATen graphs from torch.export: ``aten.where.Scalar`` and ``aten.to.dtype``.) The where and the cast are elementwise
ops with Python-number operands, which ``ops.match_elementwise`` accepts; converted before the mask's reshapes (of
contiguous tensors: the same tensor as converting after them), they join the mask's producer in one generated kernel
(here ``le``, ``where`` and the cast). Calls of one mask with queries of different dtypes get one conversion per dtype.

Left alone, with a note: a call with ``is_causal=True`` and a mask (eager raises), a non-float query, a mask on another
device than the query, a mask an in-place op writes between its definition and the last call that reads it, and,
off the CPU, a call where the probe of NOTE [Exact bool-mask conversion] finds that eager's conversion differs.
A float mask is already what SDPA uses; a constant one (a folded relative position bias) is stored aligned instead
(NOTE [Aligned attention masks]).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from .base import new_attr, note, record, tag

PASS_NAME = "hoist_attention_masks"

# NOTE [Exact bool-mask conversion]: what eager computes for SDPA with a bool mask, from
# aten/src/ATen/native/transformers/attention.cpp (``scaled_dot_product_attention``): it validates the inputs, picks
# the backend (``_fused_sdp_choice``, whose mask checks read the mask's shape and requires_grad, never its dtype:
# ``check_attn_mask_shape`` in sdp_utils), then converts the mask and calls the backend with the converted one. Every
# backend but cuDNN converts with ``convert_boolean_attn_mask`` = ``at::where(mask, 0.0, at::scalar_tensor(-inf,
# q.dtype, mask.device))``: 0 where True, -inf where False, in the query's dtype; a float mask of the query's dtype
# passes through unchanged. So handing SDPA ``where(mask, 0.0, -inf).to(q.dtype)`` runs the same backend on a mask
# with the same values (0 and -inf are exact in every float dtype): the same result, bit for bit, fully masked rows
# included. On the CPU the backends are flash (CPU) and math, both with that conversion: exact by the source.
# The cuDNN backend converts with ``convert_boolean_attn_mask_cudnn``, which filled False with -65504.0 from torch
# 2.5 (pytorch#130482) until pytorch#177868 (March 2026, after 2.10) changed the constant. A finite fill gives a
# fully masked row uniform weights (the mean of v) where -inf gives 0, and which backend eager picks on a GPU depends
# on the GPU, the cuDNN version and the ``sdpa_kernel`` settings. So off the CPU the pass hoists a call only where a
# probe on that device, with the call's recorded shapes and strides, gives the same bits with a bool mask and with
# the converted float mask, on an all-False mask (where a fill value shows) and a random one, converting with the
# first fill of FILLS that does (-inf, or cuDNN's -65504: the H100's decode step, torch 2.11); else it notes why.
# The probe runs with the backend settings of optimization time: a later ``sdpa_kernel(CUDNN_ATTENTION)`` block
# around the optimized module, on a torch whose cuDNN fill is finite, would differ from eager on fully masked rows.
_EXACT_BY_SOURCE = frozenset({"cpu"})


# NOTE [Aligned attention masks]: on CUDA, SDPA's memory-efficient kernel needs every stride of a float mask but the
# last to be a multiple of 8 elements (``preprocess_mask`` in aten/src/ATen/native/transformers/attention.cpp);
# otherwise each call pads the mask into a new tensor and slices it back: a fill and a copy kernel per call. timm's
# Swin hands its 49 x 49 windows' relative position bias ([1, heads, 49, 49], a constant once folded) to 7 SDPA calls
# a forward. A constant mask is therefore stored once as a view of a buffer whose last dim is padded to a multiple of
# 16 (the padding never read): the same values, strides SDPA takes as they are.
MASK_ALIGNMENT = 16


def _aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and all(t.stride(d) % MASK_ALIGNMENT == 0 for d in range(t.dim() - 1))


def _align_constant_masks(gm: fx.GraphModule, device_types: tuple[str, ...] = ("cuda",)) -> int:
    """NOTE [Aligned attention masks]: each constant float mask of an SDPA call on ``device_types``, stored aligned;
    the calls read a new get_attr of it (other readers of the constant keep the original)."""
    done: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        args = ops.sdpa_args(node)
        if not isinstance(args, dict):
            continue
        mask = args["attn_mask"]
        if not isinstance(mask, fx.Node) or mask.op != "get_attr" or "." in mask.target:
            continue
        t = getattr(gm, mask.target, None)
        if (not isinstance(t, torch.Tensor) or t.device.type not in device_types or not t.is_floating_point()
                or t.dim() < 2 or _aligned(t)):
            continue
        if mask.target not in done:
            last = t.shape[-1]
            padded = t.new_zeros(*t.shape[:-1], -(-last // MASK_ALIGNMENT) * MASK_ALIGNMENT)
            padded[..., :last] = t
            name = new_attr(gm, f"{mask.target}_aligned", padded[..., :last])
            with gm.graph.inserting_after(mask):
                aligned = tag(gm.graph.get_attr(name), PASS_NAME)
            aligned.meta.update({k: mask.meta[k] for k in ("device", "has_tensor") if k in mask.meta})
            done[mask.target] = aligned
        if len(node.args) > 3 and node.args[3] is mask:
            node.update_arg(3, done[mask.target])
        else:
            node.update_kwarg("attn_mask", done[mask.target])
    return len(done)


def hoist_attention_masks(gm: fx.GraphModule) -> PassResult:
    """Bool ``attn_mask`` of SDPA calls -> one shared ``where(mask, 0.0, fill).to(q dtype)`` (module docstring;
    fill: -inf, or the finite fill eager's backend uses on that device)."""
    groups: dict[tuple[fx.Node, torch.dtype], list[fx.Node]] = {}
    for node in gm.graph.nodes:
        args = ops.sdpa_args(node)
        if args is None:
            continue
        if isinstance(args, str):
            note(f"{node.name}: SDPA arguments not understood ({args})")
            continue
        mask, query = args["attn_mask"], args["query"]
        tm_mask = ops.tensor_meta(mask)
        if tm_mask is None or tm_mask.dtype != torch.bool:
            continue  # no mask, or an additive one already
        why = _why_not(args)
        if why is not None:
            note(f"{node.name}: bool mask {mask.name} kept ({why})")
            continue
        groups.setdefault((mask, ops.tensor_meta(query).dtype), []).append(node)

    rewired = conversions = 0
    probes: dict[tuple, float | str] = {}
    by_fill: dict[tuple, list[fx.Node]] = {}
    for (mask, dtype), calls in groups.items():
        for call in calls:
            fill = _fill_on_device(call, mask, probes)
            if fill is not None:
                by_fill.setdefault((mask, dtype, fill), []).append(call)
    for (mask, dtype, fill), calls in by_fill.items():
        source, views = _through_reshapes(mask, gm)
        written = _written_between(source, calls[-1], gm)
        if written is not None:
            note(f"bool mask {mask.name} kept: {written.name} writes it in place before the last SDPA reads it")
            continue
        bias = _insert_conversion(gm, source, views, dtype, calls, fill)
        for call in calls:
            if len(call.args) > 3:
                call.update_arg(3, bias)
            else:
                call.update_kwarg("attn_mask", bias)
        for view in reversed(views):  # the reshapes of the bool mask, now unread
            if not view.users:
                gm.graph.erase_node(view)
        rewired += len(calls)
        conversions += 1
    aligned = _align_constant_masks(gm)
    if aligned:
        record(masks_aligned=aligned)
    if rewired or aligned:
        gm.graph.lint()
        gm.recompile()
    if rewired:
        record(masks_hoisted=rewired, mask_conversions=conversions)
    return PassResult(gm, rewired > 0 or aligned > 0)


def _why_not(args: dict[str, Any]) -> str | None:
    """Why this SDPA call's bool mask cannot be handed over converted, or None."""
    query, mask = args["query"], args["attn_mask"]
    if args["is_causal"] is not False:
        return f"is_causal={args['is_causal']!r} with a mask: eager raises or decides at run time"
    tm_q = ops.tensor_meta(query)
    if tm_q is None or tm_q.dtype not in ops.FLOAT_DTYPES:
        return f"query of dtype {getattr(tm_q, 'dtype', None)}: the conversion is to a float dtype"
    if str(mask.meta.get("device")) != str(query.meta.get("device")):
        return f"mask on {mask.meta.get('device')}, query on {query.meta.get('device')}"
    return None


def _through_reshapes(mask: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, list[fx.Node]]:
    """``(source, views)``: the value to convert and the reshapes from it to ``mask``, in order. A mask written as
    ``(positions <= pos).view(1, 1, 1, -1)`` is converted before the view, so that the fusion pass can join the
    conversion with the comparison (a reshape ends an elementwise group); only through reshapes of contiguous
    tensors, where converting then reshaping gives the very tensor (strides included) eager's conversion gives."""
    views: list[fx.Node] = []
    node = mask
    while (ops.is_reshape(node, gm) and node.args and isinstance(node.args[0], fx.Node)
           and node.args[0].op not in ("placeholder", "get_attr")
           and _contiguous(node) and _contiguous(node.args[0])):
        views.insert(0, node)
        node = node.args[0]
    return node, views


def _contiguous(node: fx.Node) -> bool:
    t = ops.meta_tensor(node)
    return t is not None and t.is_contiguous()


def _insert_conversion(gm: fx.GraphModule, source: fx.Node, views: list[fx.Node], dtype: torch.dtype,
                       calls: list[fx.Node], fill: float) -> fx.Node:
    """``where(source, 0.0, fill).to(dtype)`` and then ``views`` replayed on it, right after ``source`` (before the
    first call for graph inputs and attributes, which stay at the top of the graph), in the graph's spelling:
    torch-level or ATen. Returns the node the calls read."""
    graph = gm.graph
    aten = isinstance(calls[0].target, torch._ops.OpOverload)
    at_top = source.op in ("placeholder", "get_attr")
    with graph.inserting_before(calls[0]) if at_top else graph.inserting_after(source):
        where = graph.call_function(torch.ops.aten.where.Scalar if aten else torch.where, (source, 0.0, fill))
    created = [where]
    with graph.inserting_after(where):
        if aten:
            created.append(graph.call_function(torch.ops.aten.to.dtype, (where, dtype)))
        else:
            created.append(graph.call_method("to", (where, dtype)))
    for view in views:  # the same reshape, of the converted tensor
        with graph.inserting_after(created[-1]):
            prev, new = view.args[0], created[-1]
            created.append(graph.node_copy(view, lambda a, prev=prev, new=new: new if a is prev else a))
        for key in ("tensor_meta", "val", "device", "has_tensor"):  # the bool view's, copied: the runner re-annotates
            created[-1].meta.pop(key, None)
    for node in created:
        tag(node, PASS_NAME)
    return created[-1]


def _written_between(source: fx.Node, last: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """An in-place op after ``source`` and before ``last`` (graph order) that writes the memory of ``source``,
    through any alias of it, or None. A mask that is (a view of) a graph input may share memory with any input."""
    base = ops.alias_root(source, gm)
    if base.op == "placeholder":
        roots = [n for n in gm.graph.nodes if n.op == "placeholder"]
    elif base.op == "get_attr":
        roots = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == base.target]
    else:
        roots = [base]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    lo, hi = order[source], order[last]
    return next((w for r in roots for w in ops.inplace_writers(r, gm) if lo < order[w] < hi), None)


def _fill_on_device(call: fx.Node, mask: fx.Node, probes: dict[tuple, float | str]) -> float | None:
    """The fill with which handing ``call`` the converted mask is exact on its device (NOTE [Exact bool-mask
    conversion]), or None with a note. ``probes`` caches probe results by everything a probe reads (the layers of a
    decoder share one)."""
    args = ops.sdpa_args(call)
    device = args["query"].meta.get("device")
    if device is None:
        note(f"{call.name}: bool mask {mask.name} kept (no device recorded)")
        return None
    if torch.device(device).type in _EXACT_BY_SOURCE:
        return FILLS[0]
    tms = [ops.tensor_meta(args[p]) for p in ("query", "key", "value", "attn_mask")]
    scalars = tuple(args[p] for p in ("dropout_p", "scale", "enable_gqa"))
    if any(tm is None for tm in tms) or any(isinstance(s, fx.Node) for s in scalars):
        note(f"{call.name}: bool mask {mask.name} kept (no recorded shapes or constant arguments to probe on "
             f"{device})")
        return None
    if args["dropout_p"]:
        note(f"{call.name}: bool mask {mask.name} kept (dropout_p={args['dropout_p']}: random results cannot show "
             f"on {device} that the conversion is eager's)")
        return None
    key = (str(device), *((tuple(tm.shape), tuple(tm.stride), tm.dtype) for tm in tms), scalars)
    if key not in probes:
        probes[key] = _probe(tms, torch.device(device), scale=args["scale"], enable_gqa=args["enable_gqa"])
    if isinstance(probes[key], str):
        note(f"{call.name}: bool mask {mask.name} kept ({probes[key]})")
        return None
    return probes[key]


# The values eager's conversion has filled masked-out positions with (NOTE [Exact bool-mask conversion]): -inf
# (every backend but cuDNN), -65504.0 (cuDNN's, torch 2.5-2.10). The probe picks the one whose results are eager's.
FILLS = (float("-inf"), -65504.0)


@torch.no_grad()
def _probe(tms: list, device: torch.device, **kwargs: Any) -> float | str:
    """The fill (of FILLS) with which SDPA on ``device`` computes the same bits from ``where(mask, 0.0, fill)`` in
    the query's dtype as from the bool mask, for q, k, v and mask of the recorded metadata ``tms``, on an all-False
    and a random mask; else how they differ."""
    gen = torch.Generator(device=device).manual_seed(0)

    def tensor(tm):  # random values in the recorded layout, expanded (stride 0) dims included
        extent = 1 + sum((n - 1) * st for n, st in zip(tm.shape, tm.stride)) if all(tm.shape) else 0
        storage = torch.randn(extent, generator=gen, dtype=tm.dtype, device=device)
        return storage.as_strided(tuple(tm.shape), tuple(tm.stride))

    q, k, v = (tensor(tm) for tm in tms[:3])
    shape = tuple(tms[3].shape)
    masks = [torch.zeros(shape, dtype=torch.bool, device=device),
             torch.rand(shape, generator=gen, device=device) < 0.5]
    wants = [torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, **kwargs) for m in masks]
    for fill in FILLS:
        for mask, want in zip(masks, wants):
            bias = torch.where(mask, 0.0, fill).to(q.dtype)
            got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, **kwargs)
            if got.shape != want.shape or not bool(((got == want) | (got.isnan() & want.isnan())).all()):
                break
        else:
            return fill
    return (f"on {device}, SDPA converts a bool mask otherwise than where(mask, 0, fill) for every fill of "
            f"{FILLS}")
