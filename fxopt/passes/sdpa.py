"""Hand-written attention -> one ``F.scaled_dot_product_attention`` call.

timm and transformers write attention as a few ops::

    attn = (q @ k.transpose(-2, -1)) * scale      # or / math.sqrt(d), or (q * scale) @ k.transpose(-2, -1)
    attn = attn + mask                            # optional: an additive float mask, broadcastable
    attn = attn.softmax(dim=-1)                   # any spelling fxopt/ops/ knows
    out = attn @ v

which is eager's matmul, an elementwise scale, the mask add, a softmax and a second matmul, with the [..., L, S]
score matrix written to and read from memory between each. This pass writes it as
``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)`` (``scale=`` since torch 2.1): one op, a
fused (flash / memory-efficient) kernel where the backend has one.

Only where that computes the same thing: the softmax is over the last dim, its result and every intermediate are read
by the next step alone, the scale is a Python number or a 0-d constant, q / k / v are [..., L, E] / [..., S, E] /
[..., S, Ev] of one float dtype and device with the same batch dims, the mask (if any) has that dtype and broadcasts
to [..., L, S] without growing it. Anything else is left alone, with a note.

NOTE [Masks in several terms]: Swin's shifted-window blocks add two terms to the scores, a relative-position bias
``[1, H, N, N]`` and the window mask, which timm adds through ``attn.view(-1, nW, H, N, N) + mask``; after
collapse_views that term is ``mask.expand_as(scores.view(...)).reshape_as(scores)``, which reads the scores' shape
and none of their values. The softmax input may be ``scores + t1 + t2 ...`` (up to four terms, in any order of the
adds): each term a float tensor of q's dtype that broadcasts to the scores without growing them and is not computed
from q, k, v or the scores (a read of their shape alone does not count). The terms' sum is the mask; readers of the
scores' shape read a view of q with that shape instead (``q.narrow(-1, 0, 1).expand(..., k.size(-2))``, no kernel).
The sum costs one elementwise kernel a call where SDPA or fxopt's attention kernel takes the call; where
short_query_attention writes SDPA's math path instead, it adds the terms to the scores one by one (``mask_terms``),
into the softmax's row kernel, and the sum is never computed. On the CPU timm's Swin-T at batch 1 went from 165 to 105
dispatched ops with merge_operand_copies and move_scales_past_matmuls (all 12 blocks SDPA; 7 before).

NOTE [Per-matrix scales]: SwinV2 scales its cosine scores by a per-head constant, ``attn * logit_scale`` with
``logit_scale`` ``[H, 1, 1]`` (computed from a parameter, a constant after fold_constants), which is no number for
SDPA's ``scale``. A constant tensor of the scores' dtype whose last two dims are 1, and which broadcasts to the scores
without growing them, multiplies whole score matrices: ``(q @ k^T) * c == (q * c) @ k^T``, so it moves onto q (one
elementwise op, which fusion joins to q's producer: SwinV2's normalize) and SDPA's scale stays a number. The graph from ``torch.export`` spells
the matmuls of >3-d tensors as expand/view/bmm/view, which this pass does not match (a note says so); its
``aten.matmul`` / ``aten.bmm`` / ``aten.transpose.int`` / ``aten._softmax`` spellings are matched where they appear
directly. The runner checks the rewritten graph against eager (``fxopt/verify.py``).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..ops.families import batched_matmul_operands, last_two_dims_swapped
from .base import note, record, tag

PASS_NAME = "rewrite_attention"


def rewrite_attention(gm: fx.GraphModule) -> PassResult:
    """Each ``softmax(q @ k^T * scale [+ mask]) @ v`` -> ``F.scaled_dot_product_attention`` (module docstring)."""
    done = 0
    for node in list(gm.graph.nodes):
        call = ops.normalize_row_reduction(node, gm) if node.op in ("call_function", "call_method", "call_module") else None
        if call is None or isinstance(call, str) or call.op.name != "softmax":
            continue
        match = _match(node, gm)
        if isinstance(match, str):
            aten_form = isinstance(node.target, torch._ops.OpOverload)
            note(f"{node.name}: attention kept as written ({match})" + (
                "; torch.export graph: matmuls of >3-d tensors arrive as expand/view/bmm/view, not matched"
                if aten_form else ""))
            continue
        out, q, k, v, terms, scale, pattern, shape_readers, matrix_scales = match
        if shape_readers:  # NOTE [Masks in several terms]: what read the scores' shape reads a proxy's
            readers = {reader for reader, _ in shape_readers}
            with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n in readers)):
                proxy = _scores_shape_proxy(gm, q, k)
            for reader, scores in shape_readers:
                reader.replace_input_with(scores, proxy)
        with gm.graph.inserting_before(out):
            kwargs: dict[str, Any] = {"scale": scale}
            for c in matrix_scales:  # NOTE [Per-matrix scales]: c scales whole score matrices, so q alike
                q = tag(gm.graph.call_function(operator.mul, (q, c)), PASS_NAME)
            if terms:
                kwargs["attn_mask"] = _sum_of_terms(gm, terms)
            sdpa = tag(gm.graph.call_function(F.scaled_dot_product_attention, (q, k, v), kwargs), PASS_NAME)
        sdpa.meta.update(out.meta)
        out.replace_all_uses_with(sdpa)
        for n in reversed(pattern):  # the matched ops, now unread, from the output back
            if not n.users:
                gm.graph.erase_node(n)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
        record(attention_to_sdpa=done)
    return PassResult(gm, done > 0)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def reads_shape_only(user: fx.Node, value: fx.Node, depth: int = 3) -> bool:
    """Whether ``user`` reads only ``value``'s shape: ``t.expand_as(value)`` and the like, or a view of ``value`` whose
    readers are such (Swin's window mask, ``mask.expand_as(scores.view(-1, nW, H, N, N))`` after collapse_views)."""
    if user.op == "call_method" and user.target in ops.SHAPE_OF_OTHER_METHODS and len(user.args) == 2 and user.args[1] is value:
        return value is not user.args[0]
    return (depth > 0 and ops.is_view_like(user) and bool(user.users) and bool(user.args)
            and user.args[0] is value and all(reads_shape_only(u, user, depth - 1) for u in user.users))


def _computing_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not reads_shape_only(u, node)]


def _reaches_scores(x: Any, gm: fx.GraphModule, depth: int = 4) -> bool:
    """Whether ``x`` is the scaled ``q @ k^T`` or a sum with it on one side (the terms added on the way)."""
    if not isinstance(x, fx.Node):
        return False
    if _scores_root(x, gm) is not None:
        return True
    call = ops.normalize(x, gm) if depth > 0 and x.op in ("call_function", "call_method") else "no"
    return (not isinstance(call, str) and call.op is ops.ADD and call.attrs.get("alpha", 1) == 1
            and any(_reaches_scores(o, gm, depth - 1) for o in call.operands))


def _depends_on(term: fx.Node, nodes: set, limit: int = 256) -> bool:
    """Whether ``term``'s value is computed from any of ``nodes`` (edges that read only a shape do not count)."""
    stack, seen = [term], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in nodes:
            return True
        for i in n.all_input_nodes:
            if not reads_shape_only(n, i, depth=0):
                stack.append(i)
    return bool(stack)  # not walked to the end: assume it does


def _scores_shape_proxy(gm: fx.GraphModule, q: fx.Node, k: fx.Node) -> fx.Node:
    """A view with the scores' shape ``[..., L, S]`` and no data of its own: ``q[..., :1]`` expanded to ``k``'s length
    (a view of q: no kernel)."""
    rank = len(ops.tensor_meta(q).shape)
    length = tag(gm.graph.call_method("size", (k, -2)), PASS_NAME)
    first = tag(gm.graph.call_method("narrow", (q, -1, 0, 1)), PASS_NAME)
    return tag(gm.graph.call_method("expand", (first, *([-1] * (rank - 1)), length)), PASS_NAME)


def _sum_of_terms(gm: fx.GraphModule, terms: list[fx.Node]) -> fx.Node:
    """The additive mask: the one term, or their sum, each add marked ``fxopt_mask_sum`` (mask_terms reads them back)."""
    mask = terms[0]
    for t in terms[1:]:
        mask = tag(gm.graph.call_function(operator.add, (mask, t)), PASS_NAME)
        mask.meta["fxopt_mask_sum"] = True
    return mask


def mask_terms(mask: fx.Node) -> list[fx.Node]:
    """The terms of a mask rewrite_attention summed (NOTE [Masks in several terms]), or ``[mask]``: short_query_attention's
    math path adds them to the scores one by one, so the row kernel reads them as they are and the sum is never
    materialized."""
    if (isinstance(mask, fx.Node) and mask.meta.get("fxopt_mask_sum") and mask.target is operator.add
            and len(mask.users) == 1):
        return [*mask_terms(mask.args[0]), mask.args[1]]
    return [mask]


def _scalar(x: Any, gm: fx.GraphModule) -> float | None:
    """A Python number, or a 0-d constant tensor (a get_attr), as a float; else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "get_attr":
        t: Any = gm
        for atom in x.target.split("."):
            t = getattr(t, atom, None)
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.dtype.is_complex and t.dtype != torch.bool:
            return float(t.item())
    return None


def scaled_by_constant(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, float] | None:
    """``(x, s)`` when ``node`` computes ``x * s`` or ``x / (1/s)`` with ``s`` a constant scalar, else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    call = ops.normalize(node, gm)
    if isinstance(call, str) or len(call.operands) != 2 or not (call.op is ops.MUL or call.op is ops.DIV):
        return None
    a, b = call.operands
    if call.op is ops.DIV:
        s = _scalar(b, gm)
        return (a, 1.0 / s) if isinstance(a, fx.Node) and s not in (None, 0.0) else None
    for x, y in ((a, b), (b, a)):
        s = _scalar(y, gm)
        if isinstance(x, fx.Node) and s is not None:
            return x, s
    return None


def _match(softmax: fx.Node, gm: fx.GraphModule):
    """``(out, q, k, v, mask terms, scale, the matched nodes, readers of the scores' shape as (reader, node))`` for
    the attention around ``softmax``, or why it is not one."""
    sm = ops.match_row_reduction(softmax, gm)
    if isinstance(sm, str) or sm is None:
        return f"softmax: {sm}"
    tm_s, tm_in = ops.tensor_meta(softmax), ops.tensor_meta(sm.input)
    if tm_s is None or tm_in is None or tm_s.dtype != tm_in.dtype:
        return "softmax changes the dtype"
    out = _only_user(softmax)
    ab = batched_matmul_operands(out) if out is not None else None
    if ab is None or ab[0] is not softmax or ab[1] is softmax:
        return "the softmax result is read by something other than one `attn @ v`"
    v = ab[1]
    # NOTE [Masks in several terms]: scores + t1 + t2 ..., each add's other side a term of the additive mask
    x, terms, adds, reader = sm.input, [], [], softmax
    for _ in range(4):
        call = ops.normalize(x, gm) if x.op in ("call_function", "call_method") else "not an op"
        if isinstance(call, str) or call.op is not ops.ADD or call.attrs.get("alpha", 1) != 1:
            break
        if _computing_users(x) != [reader]:
            return "the masked scores are read elsewhere"
        a, b = call.operands
        for inner, term in ((a, b), (b, a)):
            if isinstance(term, fx.Node) and _reaches_scores(inner, gm) and not _reaches_scores(term, gm):
                break
        else:
            return "the softmax input is an add that is no `scores + mask`"
        terms.insert(0, term)
        adds.append(x)
        x, reader = inner, x
    root = _scores_root(x, gm)
    if root is None:
        return "the softmax input is no `q @ k^T` times a constant"
    qk, scale, chain, matrix_scales = root
    outward = [qk, *reversed(chain)]  # from the matmul to x, each read by the next (x by the first add or softmax)
    if any(_computing_users(n) != [nxt] for n, nxt in zip(outward, [*outward[1:], reader])):
        return "the scores are read elsewhere"
    q, kt = batched_matmul_operands(qk)
    if not isinstance(kt, fx.Node) or not isinstance(q, fx.Node):
        return "q or k^T is not a graph value"
    k = last_two_dims_swapped(kt)
    if k is None:
        return "the second matmul operand is no transpose of the last two dims of k"
    # `(q * s) @ k^T`: the scale folds into SDPA's
    pattern = [kt, qk, *reversed(chain), *reversed(adds), softmax, out]
    pre = scaled_by_constant(q, gm) if q.op in ("call_function", "call_method") else None
    if pre is not None:
        pattern.insert(0, q)
        q, s = pre
        scale *= s
    if softmax.meta.get("fxopt_from_pass") or any(ops.is_inplace(n, gm) for n in (qk, kt, softmax, out)):
        return "an in-place op in the pattern"
    if any(_depends_on(t, {q, k, v, qk, kt, *chain, *adds}) for t in terms):
        return "a term added to the scores is computed from q, k or v (not a mask)"
    checked = _check_shapes(out, q, k, v, terms, scale)
    if isinstance(checked, str):
        return checked
    shape_readers = [(u, n) for n in (qk, *chain) for u in n.users if reads_shape_only(u, n)]
    return (*checked, pattern, shape_readers, matrix_scales)


def _scores_root(x: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, float, list[fx.Node], list[fx.Node]] | None:
    """``(q @ k^T node, scale, the scale nodes from x back, tensor scales)`` when ``x`` is that matmul times (or over)
    constants: numbers, or constant tensors of one value per score matrix (NOTE [Per-matrix scales])."""
    scale, chain, tensors = 1.0, [], []
    for _ in range(4):
        if batched_matmul_operands(x) is not None:
            return x, scale, chain, tensors
        step = scaled_by_constant(x, gm)
        if step is not None:
            chain.append(x)
            x, s = step
            scale *= s
            continue
        step = _matrix_scale(x, gm)
        if step is None:
            return None
        chain.append(x)
        x, c = step
        tensors.append(c)
    return None


def _matrix_scale(x: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, fx.Node] | None:
    """``(y, c)`` when ``x`` is ``y * c`` with ``c`` a constant tensor of ``y``'s dtype whose last two dims are 1 and
    which broadcasts to ``y`` without growing it (SwinV2's per-head logit scale); else None."""
    if x.op not in ("call_function", "call_method"):
        return None
    call = ops.normalize(x, gm)
    if isinstance(call, str) or call.op is not ops.MUL or len(call.operands) != 2:
        return None
    for y, c in (call.operands, call.operands[::-1]):
        if not (isinstance(y, fx.Node) and isinstance(c, fx.Node) and c.op == "get_attr"):
            continue
        ty, tc = ops.tensor_meta(y), ops.tensor_meta(c)
        if ty is None or tc is None or tc.dtype != ty.dtype or len(tc.shape) < 2 or tuple(tc.shape[-2:]) != (1, 1):
            continue
        try:
            grown = tuple(torch.broadcast_shapes(tuple(tc.shape), tuple(ty.shape))) != tuple(ty.shape)
        except RuntimeError:
            grown = True
        if not grown:
            return y, c
    return None


def _check_shapes(out, q, k, v, terms, scale):
    tms = [ops.tensor_meta(n) for n in (q, k, v, out)]
    if any(tm is None for tm in tms):
        return "no shape recorded for q, k, v or the output"
    tq, tk, tv, to = tms
    if not (tq.dtype == tk.dtype == tv.dtype == to.dtype) or tq.dtype not in ops.FLOAT_DTYPES:
        return f"dtypes {tq.dtype}, {tk.dtype}, {tv.dtype}: SDPA takes one float dtype"
    if len({str(n.meta.get("device")) for n in (q, k, v)}) != 1:
        return "q, k, v on different devices"
    sq, sk, sv = tuple(tq.shape), tuple(tk.shape), tuple(tv.shape)
    if len(sq) < 3 or not (len(sq) == len(sk) == len(sv)) or not (sq[:-2] == sk[:-2] == sv[:-2]):
        return f"shapes {sq}, {sk}, {sv}: not [..., L, E] / [..., S, E] / [..., S, Ev] with one batch shape"
    if sq[-1] != sk[-1] or sk[-2] != sv[-2]:
        return f"shapes {sq}, {sk}, {sv} do not chain"
    scores = (*sq[:-1], sk[-2])
    for mask in terms:
        tm = ops.tensor_meta(mask)
        if tm is None or tm.dtype != tq.dtype:
            return f"mask of dtype {getattr(tm, 'dtype', None)}, q of {tq.dtype}: only a float mask of q's dtype"
        try:
            grown = tuple(torch.broadcast_shapes(tuple(tm.shape), scores)) != scores
        except RuntimeError:
            grown = True
        if grown:
            return f"mask of shape {tuple(tm.shape)} does not broadcast to the scores {scores}"
        if str(mask.meta.get("device")) != str(q.meta.get("device")):
            return "mask on another device"
    return out, q, k, v, terms, float(scale)
