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
to [..., L, S] without growing it. Anything else is left alone, with a note. The graph from ``torch.export`` spells
the matmuls of >3-d tensors as expand/view/bmm/view, which this pass does not match (a note says so); its
``aten.matmul`` / ``aten.bmm`` / ``aten.transpose.int`` / ``aten._softmax`` spellings are matched where they appear
directly. The runner checks the rewritten graph against eager (``fxopt/verify.py``).
"""

from __future__ import annotations

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
        out, q, k, v, mask, scale, pattern = match
        with gm.graph.inserting_before(out):
            kwargs: dict[str, Any] = {"scale": scale}
            if mask is not None:
                kwargs["attn_mask"] = mask
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
    """``(out, q, k, v, mask, scale)`` for the attention around ``softmax``, or why it is not one."""
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
    x, mask = sm.input, None
    call = ops.normalize(x, gm) if x.op in ("call_function", "call_method") else "not an op"
    if not isinstance(call, str) and call.op is ops.ADD and call.attrs.get("alpha", 1) == 1:
        a, b = call.operands
        if _only_user(x) is not softmax:
            return "the masked scores are read elsewhere"
        # the scores are the side that is a (scaled) matmul; the other is the mask
        for scores, m in ((a, b), (b, a)):
            if isinstance(scores, fx.Node) and isinstance(m, fx.Node) and _scores_root(scores, gm) is not None:
                x, mask = scores, m
                break
        else:
            return "the softmax input is an add that is no `scores + mask`"
    root = _scores_root(x, gm)
    if root is None:
        return "the softmax input is no `q @ k^T` times a constant"
    qk, scale, chain = root
    if any(_only_user(n) is None for n in [qk, *chain]):
        return "the scores are read elsewhere"
    q, kt = batched_matmul_operands(qk)
    if not isinstance(kt, fx.Node) or not isinstance(q, fx.Node):
        return "q or k^T is not a graph value"
    k = last_two_dims_swapped(kt)
    if k is None:
        return "the second matmul operand is no transpose of the last two dims of k"
    # `(q * s) @ k^T`: the scale folds into SDPA's
    pattern = [kt, qk, *reversed(chain), *([sm.input] if mask is not None else []), softmax, out]
    pre = scaled_by_constant(q, gm) if q.op in ("call_function", "call_method") else None
    if pre is not None:
        pattern.insert(0, q)
        q, s = pre
        scale *= s
    if softmax.meta.get("fxopt_from_pass") or any(ops.is_inplace(n, gm) for n in (qk, kt, softmax, out)):
        return "an in-place op in the pattern"
    checked = _check_shapes(out, q, k, v, mask, scale)
    return checked if isinstance(checked, str) else (*checked, pattern)


def _scores_root(x: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """``(q @ k^T node, scale, the scale nodes from x back)`` when ``x`` is that matmul times (or over) constants."""
    scale, chain = 1.0, []
    for _ in range(4):
        if batched_matmul_operands(x) is not None:
            return x, scale, chain
        step = scaled_by_constant(x, gm)
        if step is None:
            return None
        chain.append(x)
        x, s = step
        scale *= s
    return None


def _check_shapes(out, q, k, v, mask, scale):
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
    if mask is not None:
        tm = ops.tensor_meta(mask)
        scores = (*sq[:-1], sk[-2])
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
    return out, q, k, v, mask, float(scale)
