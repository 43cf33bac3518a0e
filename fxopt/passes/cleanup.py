"""Cleanup passes: remove what computes nothing (dropout in eval, identities, no-op arithmetic, dead code)."""

from __future__ import annotations

import builtins
import operator
import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from .base import new_attr, note, record, tag



def _is_impure(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    if ops.has_side_effect(node):  # asserts, print
        return True
    if node.op == "call_module" and getattr(gm.get_submodule(node.target), "_is_impure", False):
        return True
    return ops.is_inplace(node, gm)


def remove_dead_code(gm: fx.GraphModule) -> PassResult:
    """Erase nodes whose results nobody uses (in-place ops and asserts are kept), then unused attributes.

    torch.fx's eliminate_dead_code treats an unused ``x.add_(1)`` (call_method) as pure and would drop it.
    """
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not _is_impure(node, gm):
            gm.graph.erase_node(node)
            removed += 1
    # Modules and tensors nobody reads any more go too, whether or not a node was erased here: a pass that points
    # a node at a new module (to_channels_last's weight twins) leaves the old one behind.
    hoisted = _hoist_from_partly_read_modules(gm)
    modules_before = sum(1 for _ in gm.modules())
    gm.delete_all_unused_submodules()
    modules_dropped = modules_before - sum(1 for _ in gm.modules())
    tensors_dropped = _delete_unused_tensors(gm)
    changed = removed + hoisted + modules_dropped + tensors_dropped
    if changed:
        gm.recompile()
        counts = {"nodes_removed": removed, "modules_released": modules_dropped, "tensors_released": tensors_dropped}
        record(**{k: v for k, v in counts.items() if v})
    return PassResult(gm, changed > 0)


def _hoist_from_partly_read_modules(gm: fx.GraphModule) -> int:
    """A module no node calls, of which the graph reads some tensors but not all, keeps the others alive: after
    fold_batchnorm and to_channels_last, ResNet-18's folded convolutions were read for their bias only and held
    their NCHW weights, 42 MiB (bench_memory.py, H200). Point those reads at root attributes holding the same
    tensors (no copy), so that delete_all_unused_submodules can release the module. Returns the reads moved."""
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    reads: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and "." in n.target:
            reads.setdefault(n.target.rsplit(".", 1)[0], []).append(n)
    moved = 0
    for owner_path, nodes in reads.items():
        if any(c == owner_path or c.startswith(owner_path + ".") or owner_path.startswith(c + ".") for c in called):
            continue  # the module (or one inside or around it) still runs
        try:
            owner = gm.get_submodule(owner_path)
        except AttributeError:
            continue
        read = {n.target.rsplit(".", 1)[1] for n in nodes}
        held = {name for name, _ in owner.named_parameters(recurse=True)} | \
            {name for name, _ in owner.named_buffers(recurse=True)}
        if not held - read or any(not isinstance(getattr(owner, a, None), torch.Tensor) for a in read):
            continue  # everything it holds is read anyway, or a read is not a tensor of its own
        names: dict[str, str] = {}
        for n in nodes:
            attr = n.target.rsplit(".", 1)[1]
            if attr not in names:
                value = getattr(owner, attr)
                names[attr] = new_attr(gm, f"{owner_path}_{attr}", value.detach() if isinstance(value, nn.Parameter)
                                       else value)
            n.target = names[attr]
            moved += 1
    return moved


def _delete_unused_tensors(gm: fx.GraphModule) -> int:
    """Drop the root's tensor attributes no node reads any more (what a pass replaced: a folded weight once the
    channels_last pass made its copy held ~40 MiB in ResNet-18, bench_memory.py). Only root-level names: those are
    the ones passes create (base.new_attr); tensors of submodules live and die with their module."""
    read = {n.target.split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    plain = [k for k, v in vars(gm).items() if isinstance(v, torch.Tensor) and not k.startswith("_")]
    names = [name for name in (*gm._parameters, *gm._buffers, *plain) if name not in read]
    for name in names:
        delattr(gm, name)
    return len(names)


def _dropout_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input a dropout node returns unchanged in eval mode, or None if the node is not such a dropout."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if ops.is_dropout_module(m) and (not m.training or m.p == 0):
            return node.args[0]
        return None
    if node.op == "call_function":
        if node.target in ops.DROPOUT_FUNCTIONS:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            inplace = node.kwargs.get("inplace", node.args[3] if len(node.args) > 3 else False)
            return node.args[0] if training is False and not inplace else None
        if ops.is_aten_dropout(node.target):
            train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else None)
            return node.args[0] if train is False else None
        if ops.is_stochastic_depth(node.target):
            a = ops.bind_args(node, ("input", "p", "mode", "training"))
            if isinstance(a, str) or "input" not in a:
                return None
            return a["input"] if a.get("training", True) is False or a.get("p") == 0 else None
    return None


def remove_dropout(gm: fx.GraphModule) -> PassResult:
    """Dropout in eval mode and nn.Identity return their input: replace the node by that input (the same tensor, as
    in eager, so this is safe before functionalize_inplace: ``act_(drop(x))`` still writes what it wrote; with the
    Identity in between, timm's BatchNormAct2d kept its in-place activation)."""
    removed = identities = 0
    for node in list(gm.graph.nodes):
        src = _dropout_input(node, gm)
        identity = src is None and node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity
        if identity and node.args and not node.kwargs:
            src = node.args[0]
        if src is not None:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            removed += not identity
            identities += identity
    if removed or identities:
        gm.delete_all_unused_submodules()
        gm.recompile()
        record(**{k: v for k, v in (("dropouts_removed", removed), ("identity_modules_removed", identities)) if v})
    return PassResult(gm, removed + identities > 0)


_UNKNOWN = object()


def _static_value(node: fx.Node) -> Any:
    """The value a node has in every call of this specialization (fxopt specializes on shapes), or _UNKNOWN: ranks,
    sizes of dims other than 0, and integer arithmetic on them (NOTE [Folded sizes])."""
    if node.op == "call_method" and node.target in ops.RANK_METHODS and len(node.args) == 1 and not node.kwargs:
        tm = ops.tensor_meta(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        return len(tm.shape) if tm is not None else _UNKNOWN
    size = _folded_size(node)
    if size is not _UNKNOWN:
        return size
    if node.op != "call_function" or node.kwargs:
        return _UNKNOWN
    if node.target in ops.SIZE_ARITHMETIC and node.args and all(type(a) is int for a in node.args):
        try:
            return node.target(*node.args)
        except Exception:  # noqa: BLE001 -- eager raises too (a division by zero); leave the node to do so
            return _UNKNOWN
    if node.target is builtins.getattr and len(node.args) == 2 and node.args[1] == "ndim":
        tm = ops.tensor_meta(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        return len(tm.shape) if tm is not None else _UNKNOWN
    if node.target in ops.LITERAL_OPERATORS and not any(isinstance(a, fx.Node) for a in node.args):
        try:
            return node.target(*node.args)
        except Exception:  # noqa: BLE001 -- eager raises too; leave the node to do so
            return _UNKNOWN
    return _UNKNOWN


# NOTE [Folded sizes]: fxopt specializes a graph per input signature, so every size is a constant of it. Sizes are
# folded (with the integer arithmetic on them) where shape code decides what runs: timm's Swin computes its window
# padding as ``(ws - H % ws) % ws`` from ``x.shape`` in every block, and only once that is the literal 0 can
# remove_identity drop the pad (eager copies the tensor: 15 copy kernels a forward at 224x224). Dim 0 is never
# folded: fxopt.save exports the batch dynamic (NOTE [Dynamic batch] in artifact.py), so ``B, H, W, C = x.shape``
# keeps ``B`` a graph value. A size of another dim that still follows the batch (after a transpose or a flatten of
# dim 0) makes the dynamic export specialize or differ from the model at another batch; save() checks both and
# then keeps the signature's own batch, with the reason.


def _folded_size(node: fx.Node) -> Any:
    """``x.size(d)``, ``x.shape[d]``, ``x.size()[d]`` for d other than dim 0: that size, else _UNKNOWN."""
    if node.op == "call_method" and node.target in ops.SIZE_METHODS and len(node.args) + len(node.kwargs) == 2:
        src, dim = node.args[0], node.args[1] if len(node.args) == 2 else node.kwargs.get("dim")
    elif node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2 and not node.kwargs:
        shape, dim = node.args
        if not isinstance(shape, fx.Node) or not isinstance(dim, int) or not (
                (shape.op == "call_function" and shape.target is builtins.getattr and shape.args[1:] == ("shape",))
                or (shape.op == "call_method" and shape.target in ops.SIZE_METHODS and len(shape.args) == 1
                    and not shape.kwargs)):
            return _UNKNOWN
        src = shape.args[0]
    else:
        return _UNKNOWN
    tm = ops.tensor_meta(src) if isinstance(src, fx.Node) else None
    if tm is None or type(dim) is not int or not -len(tm.shape) <= dim < len(tm.shape):
        return _UNKNOWN
    dim %= len(tm.shape)
    return int(tm.shape[dim]) if dim != 0 else _UNKNOWN


def fold_shape_checks(gm: fx.GraphModule) -> PassResult:
    """Rank queries (``x.ndim``, ``x.dim()``) -> their value, sizes of dims other than 0 and integer arithmetic on
    them -> the number (NOTE [Folded sizes]), comparisons of literals -> the bool, and ``torch._assert(True, msg)``
    -> gone. timm's ``_assert(x.ndim == 4)`` gave each BatchNorm input a second user, which kept the BatchNorm
    from folding into its convolution."""
    folded = asserts = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch._assert and node.args and node.args[0] is True:
            gm.graph.erase_node(node)
            asserts += 1
            continue
        value = _static_value(node)
        if value is _UNKNOWN:
            continue
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        gm.graph.erase_node(node)
        folded += 1
    if folded or asserts:
        gm.recompile()
        record(**{k: v for k, v in (("shape_queries_folded", folded), ("asserts_removed", asserts)) if v})
    return PassResult(gm, folded + asserts > 0)


def _same_tensor_meta(a: fx.Node, b: fx.Node) -> bool:
    ta, tb = ops.tensor_meta(a), ops.tensor_meta(b)
    return (ta is not None and tb is not None and ta.shape == tb.shape and ta.dtype == tb.dtype
            and tuple(ta.stride) == tuple(tb.stride) and a.meta.get("device") == b.meta.get("device"))


def _returns_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input that a node returns unchanged, in eager too (same tensor object), or None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity):
        return node.args[0] if node.args else None
    if node.op == "call_method" and (node.target == "contiguous" or node.target in ops.IDENTITY_CAST_METHODS):
        src = node.args[0]
        if isinstance(src, fx.Node) and not node.kwargs.get("copy") and _same_tensor_meta(src, node):
            return src
    if node.op == "call_function" and ops.is_same_tensor_overload(node.target):
        src = node.args[0]
        if isinstance(src, fx.Node) and not node.kwargs.get("copy") and _same_tensor_meta(src, node):
            return src
    return None


def _noop_arithmetic_input(node: fx.Node) -> fx.Node | None:
    """``x + 0``, ``x * 1``, ``x / 1``, ``x - 0`` whose result has x's dtype, shape and strides: x, else None.

    Unlike identities, eager returns a new tensor here; the rewrite makes the result alias x, which is only
    allowed when nothing can observe it (checked by the caller).
    """
    if node.op not in ("call_function", "call_method") or len(node.args) != 2:
        return None
    spec = ops.neutral_scalar(node.target)
    if spec is None or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
        return None
    neutral, positions = spec
    for pos in positions:
        scalar, other = node.args[pos], node.args[1 - pos]
        if isinstance(other, fx.Node) and type(scalar) in (int, float) and scalar == neutral \
                and _same_tensor_meta(other, node):
            return other
    return None


def _zero_pad_input(node: fx.Node) -> fx.Node | None:
    """``F.pad(x, (0, 0, ...))`` whose result has x's dtype, shape and strides: x (eager copies it), else None."""
    src = ops.zero_pad_input(node)
    return src if src is not None and _same_tensor_meta(src, node) else None


def _written_through(n: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether an in-place op writes ``n``'s memory, directly or through views of it."""
    return bool(ops.inplace_writers(n, gm))


def _aliasing_observable(node: fx.Node, src: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether making ``node`` the same tensor as ``src`` could be observed: an in-place op touches either, or
    the result is a graph output while ``src`` is an input or another output (outputs would alias)."""
    for n in (node, src):
        if _written_through(n, gm):
            return True
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if output in node.users and (src.op in ("placeholder", "get_attr") or output in src.users):
        return True
    return False


def remove_identity(gm: fx.GraphModule) -> PassResult:
    """Remove nodes that compute nothing: nn.Identity, .contiguous() on a contiguous tensor, .to()/.float() to
    the same dtype and device, and ``x + 0``, ``x * 1``, ``x - 0``, ``x / 1``, a pad by 0 when the aliasing cannot
    be seen."""
    removed = 0
    for node in list(gm.graph.nodes):
        src = _returns_input(node, gm)
        if src is None:
            src = _noop_arithmetic_input(node) or _zero_pad_input(node)
            if src is not None and _aliasing_observable(node, src, gm):
                continue  # e.g. `y = x * 1; y.add_(1)` must not write into x
        if src is None:
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        removed += 1
    if removed:
        gm.delete_all_unused_submodules()
        gm.recompile()
        record(identities_removed=removed)
    return PassResult(gm, removed > 0)


def _out_of_place_twin(node: fx.Node, gm: fx.GraphModule):
    """How to turn an in-place node into its out-of-place twin: a callable that rewrites the node, or None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if getattr(m, "inplace", False) is True:
            def rewrite():
                twin = copy.copy(m)  # a shallow copy: the shared submodule itself is never changed
                twin.inplace = False
                node.target = new_attr(gm, f"{node.target}_out_of_place", twin)
            return rewrite
        return None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        twin_name = node.target[:-1]
        if hasattr(torch.Tensor, twin_name) and twin_name not in ("copy", "set", "resize", "fill", "zero"):
            def rewrite():
                node.target = twin_name
            return rewrite
        return None
    if node.op == "call_function":
        if node.kwargs.get("inplace") is True:
            def rewrite():
                node.kwargs = {**node.kwargs, "inplace": False}
            return rewrite
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and hasattr(torch, name[:-1]) and \
                getattr(torch, name, None) is node.target:
            def rewrite():
                node.target = getattr(torch, name[:-1])
            return rewrite
    return None


def _promotes(node: fx.Node, written: fx.Node) -> str | None:
    """Why the out-of-place twin would not keep the written tensor's dtype: ``x.mul_(y)`` stores into x's dtype,
    ``x.mul(y)`` promotes (bfloat16 * float32 -> float32; fuzz seeds 9900633, 9900934)."""
    own = getattr(ops.tensor_meta(written), "dtype", None)
    others = {getattr(ops.tensor_meta(a), "dtype", None) for a in node.all_input_nodes if a is not written}
    if own is None or None in others:
        return "the operands' dtypes are unknown"
    if others - {own}:
        return f"an operand of another dtype than {own} (the out-of-place op would promote)"
    return None


def _is_private_intermediate(value: fx.Node, writer: fx.Node, gm: fx.GraphModule) -> str | None:
    """Why an in-place write into ``value`` is observable (so it must stay in place), or None if it is not."""
    if value.op in ("placeholder", "get_attr"):
        return "it writes into a graph input or a parameter"
    if value.op == "output" or value.meta.get("has_tensor") is False:
        return "it writes into a non-tensor"
    if ops.may_alias_input(value, gm):
        return "it writes through a view (or an op that may return its input) into another tensor"
    for u in value.users:
        if u is not writer and ops.may_alias_input(u, gm):
            return f"{u.name} may share the written tensor's memory"
    return None


def functionalize_inplace(gm: fx.GraphModule) -> PassResult:
    """Rewrite in-place ops whose write nobody else can see into their out-of-place twin.

    ``out = bn(x); out = relu_(out); y = out + 1`` becomes ``relu = relu(bn); y = relu + 1``: later uses of the
    written tensor read the new value instead. Only when the written tensor is an intermediate of this graph
    (not an input, parameter or view, and not viewed by anything else); anything else stays in place, as
    in-place ops block fusion and reordering.
    """
    changed = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if not ops.is_inplace(node, gm) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        rewrite = _out_of_place_twin(node, gm)
        written = node.args[0]
        why = "no out-of-place twin" if rewrite is None else (
            _promotes(node, written) or _is_private_intermediate(written, node, gm))
        if why is not None:
            note(f"functionalize_inplace: {node.name} stays in place: {why}")
            continue
        rewrite()
        for u in list(written.users):
            if u is not node and order[u] > order[node]:
                u.replace_input_with(written, node)
        changed += 1
    if changed:
        gm.recompile()
        record(inplace_rewritten=changed)
    return PassResult(gm, changed > 0)


# NOTE [Reshape sandwiches]: timm's shifted-window attention adds its window mask through a reshape and back::
#
#     attn = attn.view(-1, num_win, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)   # mask: [1, num_win, 1, N, N]
#     attn = attn.view(-1, heads, N, N)
#
# The add runs on another shape than the ops around it, so it stays out of the softmax's row kernel: an add kernel
# and a softmax kernel where one would do. Elementwise, ``(x.view(s) + m).view(x.shape)`` is
# ``x + m.expand_as(x.view(s)).reshape_as(x)``: the operand takes the reshape instead, and where the batch is 1
# (or the operand is full-size) its reshape is a view, so nothing is copied; otherwise the reshape copies the
# operand, which is no larger than the result. Only an op the op table knows as elementwise (no gathering read),
# whose tensor operands broadcast to the reshaped shape without growing it, each reshape read by the next step alone.
def _reshape_sandwich(c: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(x, view, op)`` when ``c`` is the outer reshape of ``op(x.view(s), m...).view(x.shape)`` (the note)."""
    if not (ops.reads_layout(c, gm) and c.op == "call_method" and isinstance(c.args[0], fx.Node)):
        return None
    op = c.args[0]
    if len(op.users) != 1 or op.op not in ("call_function", "call_method"):
        return None
    call = ops.normalize(op, gm)
    if isinstance(call, str) or call.op.gathers or ops.is_inplace(op, gm):
        return None
    views = [o for o in call.operands if isinstance(o, fx.Node) and ops.reads_layout(o, gm)
             and o.op == "call_method" and len(o.users) == 1 and isinstance(o.args[0], fx.Node)]
    if len(views) != 1 or sum(o is views[0] for o in call.operands) != 1:
        return None
    view = views[0]
    x = view.args[0]
    tms = [ops.tensor_meta(n) for n in (x, view, op, c)]
    if any(tm is None for tm in tms) or tuple(tms[3].shape) != tuple(tms[0].shape):
        return None
    if tuple(tms[2].shape) != tuple(tms[1].shape):
        return None  # an operand grows the result: not the note's identity
    for o in call.operands:
        if isinstance(o, fx.Node) and o is not view and ops.tensor_meta(o) is None:
            return None
    return x, view, op


def _shape_twin(x: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The first value back from ``x``, through elementwise ops, that has ``x``'s shape whatever the batch (a full-size
    operand of each op): the reshaped operand takes its shape from there, so reading ``x``'s shape does not keep
    ``x`` out of the kernel that fuses it with what follows (Swin's scores + position bias, then the mask add)."""
    shape = tuple(getattr(ops.tensor_meta(x), "shape", ()))
    for _ in range(8):
        if x.op not in ("call_function", "call_method", "call_module") or isinstance(ops.normalize(x, gm), str):
            return x
        # not a constant: its shape would not follow the batch where the graph runs with another one
        full = [o for o in x.all_input_nodes
                if o.op != "get_attr" and tuple(getattr(ops.tensor_meta(o), "shape", ())) == shape]
        if not full:
            return x
        x = full[0]
    return x


def _unsplit_reshape_sandwiches(gm: fx.GraphModule) -> int:
    """NOTE [Reshape sandwiches]: ``op(x.view(s), m).view(x.shape)`` -> ``op(x, m.expand_as(x.view(s)).reshape_as(x))``."""
    done = 0
    for c in list(gm.graph.nodes):
        found = _reshape_sandwich(c, gm) if c.op == "call_method" else None
        if found is None:
            continue
        x, view, op = found
        others = [o for o in dict.fromkeys(op.all_input_nodes) if o is not view]
        twin = _shape_twin(x, gm)
        if twin is not x:  # the reshaped shape, read from the twin
            with gm.graph.inserting_before(op):
                shape_of = tag(gm.graph.node_copy(view, lambda a: twin if a is x else a), "collapse_views")
        else:
            shape_of = view
        for m in others:
            with gm.graph.inserting_before(op):
                expanded = tag(gm.graph.call_method("expand_as", (m, shape_of)), "collapse_views")
                reshaped = tag(gm.graph.call_method("reshape_as", (expanded, twin)), "collapse_views")
            op.replace_input_with(m, reshaped)
        op.replace_input_with(view, x)
        op.meta.pop("tensor_meta", None)  # x's shape now; the runner re-annotates
        c.replace_all_uses_with(op)
        gm.graph.erase_node(c)
        if not view.users:
            gm.graph.erase_node(view)
        done += 1
    return done


def collapse_views(gm: fx.GraphModule) -> PassResult:
    """A chain of reshape-like views (view, reshape, flatten, squeeze, unsqueeze, ...) becomes one reshape to the
    final shape; a reshape to the shape it already has disappears. Each view costs host time at batch 1. An
    elementwise op between a reshape and its inverse runs on the original shape (NOTE [Reshape sandwiches]).

    The shapes are the specialization's own (every OptimizedModule graph is built for one input signature).
    """
    sandwiches = _unsplit_reshape_sandwiches(gm)
    if sandwiches:
        record(reshape_sandwiches=sandwiches)
    collapsed = 0
    for node in list(gm.graph.nodes):
        if not ops.is_reshape(node, gm) or ops.tensor_meta(node) is None:
            continue
        if any(ops.is_reshape(u, gm) for u in node.users):
            continue  # not the end of a chain
        src, length = node.args[0], 1
        while isinstance(src, fx.Node) and ops.is_reshape(src, gm) and len(src.users) == 1 \
                and isinstance(src.args[0], fx.Node):
            src, length = src.args[0], length + 1
        if not isinstance(src, fx.Node) or ops.tensor_meta(src) is None:
            continue
        shape = tuple(ops.tensor_meta(node).shape)
        if tuple(ops.tensor_meta(src).shape) == shape:
            node.replace_all_uses_with(src)  # the chain ends where it began: a view of src, now src itself
            replacement = None
        elif length > 1:
            with gm.graph.inserting_before(node):
                replacement = tag(gm.graph.call_method("reshape", (src, *shape)), "collapse_views")
            replacement.meta.update({k: node.meta[k] for k in ("tensor_meta", "device", "has_tensor")
                                     if k in node.meta})
            node.replace_all_uses_with(replacement)
        else:
            continue
        # erase the old chain, end first
        cur = node
        while cur is not src:
            prev = cur.args[0]
            gm.graph.erase_node(cur)
            cur = prev
        collapsed += 1
    if collapsed or sandwiches:
        gm.delete_all_unused_submodules()
        gm.recompile()
    if collapsed:
        record(chains_collapsed=collapsed)
    return PassResult(gm, collapsed + sandwiches > 0)
