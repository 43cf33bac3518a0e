"""Data movement between a row kernel and its neighbour -> an index map the row kernel reads or stores through.

Before (timm's Swin: the LayerNorm's output rolled and cut into windows for the qkv GEMM; four copy kernels'
worth of ops, two of them copies: ``roll`` and ``contiguous``)::

    fused_rows = torch.ops.fxopt.fused.default('fxopt_rows_layer_norm_...', [x, w, b])
    ln = fused_rows[0]
    roll = torch.roll(ln, shifts=(-3, -3), dims=(1, 2))
    windows = roll.view(1, 8, 7, 8, 7, 96).permute(0, 1, 3, 2, 4, 5).contiguous().view(64, 49, 96)

After (the LayerNorm stores each element where the window partition puts it)::

    fused_rows = torch.ops.fxopt.fused.default('fxopt_rows_layer_norm_..._m...', [x, w, b, partition_map])
    windows = fused_rows[0].view(64, 49, 96)

and the same for an input: the window reverse and the roll back before the residual add + LayerNorm become a read
through a map of the attention's output. NOTE [Movement maps] in codegen/rowwise.py says how the kernel uses a map.

A chain qualifies when every op in it moves data only (view, reshape, flatten, unflatten, permute, transpose,
squeeze, unsqueeze, contiguous, clone, roll, slices that keep every element), each value in it is read by the next
op alone (or by shape queries that only the chain reads), it moves every element once (a permutation: the map is
checked), at least one of its ops copies (a chain of views costs nothing to begin with), the value at its far
end is contiguous, and no in-place op writes the values it moves (the copy reads them where it stands, the kernel
later). The map is computed for the graph's shapes, which are the specialization's (NOTE [Folded
sizes]); a saved artifact with a map serves its own batch size, with the reason in its manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..codegen import rowwise
from ..codegen.rowwise import ELEM
from ..runtime.kernel import KERNELS, fused_op, register
from ..runtime.rowwise import RowwiseKernel
from .base import new_attr, note, record, tag
from .fuse_elementwise import mutated_values

PASS_NAME = "fold_movements"

def _read_only_by(node: fx.Node, allowed: set[fx.Node]) -> bool:
    """Every reader of ``node`` is in ``allowed``, or a shape query whose readers (through ``getitem``) are."""
    for u in node.users:
        if u in allowed:
            continue
        if not ops.is_shape_query(u):
            return False
        stack = list(u.users)
        while stack:
            v = stack.pop()
            if v in allowed:
                continue
            if v.op == "call_function" and v.target is operator.getitem:
                stack.extend(v.users)
                continue
            return False
    return True


def evaluate_chain(chain: list[fx.Node], source: fx.Node, value: torch.Tensor) -> torch.Tensor:
    """Run ``chain`` (source's readers, in order) on ``value`` standing for ``source``, shape queries included."""
    env: dict[fx.Node, Any] = {source: value}

    def get(a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        if a not in env:
            base = a.args[0] if a.args else None
            if ops.is_shape_query(a) and isinstance(base, fx.Node) and base not in env:
                # the shape of a value outside the chain: the specialization's, as recorded (NOTE [Folded sizes])
                tm = ops.tensor_meta(base)
                if tm is None:
                    raise ValueError(f"{base.name} has no recorded shape")
                env[base] = torch.empty(tuple(tm.shape), device="meta")
            if a.op == "call_function" and a.target is getattr:
                env[a] = getattr(get(a.args[0]), a.args[1])
            elif a.op == "call_function" and a.target is operator.getitem:
                env[a] = get(a.args[0])[get(a.args[1])]
            elif a.op == "call_method" and a.target in ops.SHAPE_QUERY_METHODS:
                env[a] = getattr(get(a.args[0]), a.target)(*[get(x) for x in a.args[1:]])
            elif a.op == "call_function" and a.target in ops.SIZE_ARITHMETIC:  # ``h // window`` on sizes
                env[a] = a.target(*[get(x) for x in a.args])
            else:
                raise ValueError(f"{a.name} is not computed from the chain")
        return env[a]

    for node in chain:
        args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), get)
        if node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            env[node] = node.target(*args, **kwargs)
    return env[chain[-1]]


def _copies(chain: list[fx.Node], source: fx.Node, meta: torch.Tensor) -> bool:
    """Whether running the chain copies data (else it is views alone: nothing to save)."""
    probe = torch.empty_strided(meta.shape, meta.stride(), dtype=torch.float32)
    return evaluate_chain(chain, source, probe).untyped_storage().data_ptr() != probe.untyped_storage().data_ptr()


def _chain_after(start: fx.Node) -> list[fx.Node] | None:
    """The movement ops after ``start``, each the only reader of the one before (shape queries aside)."""
    chain: list[fx.Node] = []
    node = start
    while True:
        movers = [u for u in node.users if ops.moves_data(u) and u.args[0] is node]
        if len(movers) != 1 or not _read_only_by(node, {movers[0]} | set(chain)):
            break
        chain.append(movers[0])
        node = movers[0]
    return chain or None


def _chain_before(end: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(source, chain)``: the movement ops that lead to ``end``, each read by the next alone."""
    if not ops.moves_data(end):
        return None
    chain = [end]
    while True:
        prev = chain[0].args[0]
        if not (isinstance(prev, fx.Node) and ops.moves_data(prev) and _read_only_by(prev, set(chain))):
            break
        chain.insert(0, prev)
    return chain[0].args[0], chain


def _permutation_map(chain: list[fx.Node], source: fx.Node, shape: tuple[int, ...]) -> torch.Tensor | None:
    """For each element of the chain's result (row-major), its flat index in the source; None unless every source
    element lands once."""
    numel = 1
    for d in shape:
        numel *= d
    if numel >= 2 ** 31:
        return None
    src = torch.arange(numel, dtype=torch.int64).view(shape)
    out = evaluate_chain(chain, source, src).reshape(-1)
    if out.numel() != numel or not torch.equal(torch.sort(out).values, torch.arange(numel)):
        return None
    return out


class _Rewrite:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.maps: dict[tuple, fx.Node] = {}

    def map_node(self, index: torch.Tensor, shape: tuple[int, ...], device: torch.device, before: fx.Node) -> fx.Node:
        """A get_attr of the int32 map of ``shape`` (one buffer per distinct map)."""
        m = index.to(torch.int32).reshape(shape).contiguous()
        key = (tuple(shape), str(device), hashlib.sha256(m.numpy().tobytes()).hexdigest())
        if key in self.maps:
            return self.maps[key]
        buf = m.to(device)
        name = new_attr(self.gm, "movement_map", buf)
        with self.gm.graph.inserting_before(before):
            node = tag(self.gm.graph.get_attr(name), PASS_NAME)
        ops.set_tensor_meta(node, buf, device)
        self.maps[key] = node
        return node


def _erase_chain(gm: fx.GraphModule, chain: list[fx.Node]) -> None:
    """Erase the chain's ops, end first, and the shape queries only they read."""
    for node in reversed(chain):
        for u in list(node.users):
            _erase_unread(gm, u)
        if not node.users:
            gm.graph.erase_node(node)


def _erase_unread(gm: fx.GraphModule, node: fx.Node) -> None:
    for u in list(node.users):
        _erase_unread(gm, u)
    if not node.users and (ops.is_shape_query(node) or (node.op == "call_function" and node.target is operator.getitem)):
        gm.graph.erase_node(node)


def fold_movements(gm: fx.GraphModule) -> PassResult:
    """Each qualifying movement chain next to a row kernel -> an index map the kernel uses (module docstring)."""
    kernels = gm.meta.setdefault("fxopt_kernels", {})
    rewrite = _Rewrite(gm)
    # A value an in-place op writes (or a view of it) is read when the copy runs; through a map it would be read
    # when the kernel runs, after the write: those chains keep their copies.
    mutated = mutated_values(gm)
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not fused_op:
            continue
        kernel = KERNELS.get(node.args[0])
        if not isinstance(kernel, RowwiseKernel) or kernel.program.row_dims != 1:
            continue
        if any(i.mode == "map" for i in kernel.program.inputs):
            continue  # rewritten already
        try:
            changed = _fold_into(gm, node, kernel, rewrite, kernels, mutated)
        except Exception as e:  # noqa: BLE001 -- a chain that cannot be folded stays as it is
            note(f"{PASS_NAME}: {node.name} keeps its movement ops ({type(e).__name__}: {e})")
            continue
        done += changed
    if done:
        gm.graph.lint()
        gm.recompile()
        record(chains_folded=done)
    return PassResult(gm, done > 0)


def _fold_into(gm: fx.GraphModule, fused: fx.Node, kernel: RowwiseKernel, rewrite: _Rewrite, kernels: dict,
               mutated: set[fx.Node]) -> int:
    """Fold the chains around one row kernel; how many."""
    program = kernel.program
    inputs = list(fused.args[1])
    if not all(isinstance(a, fx.Node) and ops.tensor_meta(a) is not None for a in inputs):
        return 0
    aligned, full = kernel._shapes([tuple(ops.tensor_meta(a).shape) for a in inputs])
    items = {u.args[1]: u for u in fused.users if u.op == "call_function" and u.target is operator.getitem}
    new_inputs = [dataclasses.replace(i) for i in program.inputs]
    new_outputs = [dataclasses.replace(o) for o in program.outputs]
    args = list(inputs)
    edits: list = []  # deferred graph edits, applied once the new kernel compiles
    device = fused.meta.get("device") or next(a.meta.get("device") for a in inputs if isinstance(a, fx.Node))
    # outputs: a per-element output read by a movement chain alone -> stored through a map
    for k, out in enumerate(program.outputs):
        item = items.get(k)
        if out.level != ELEM or item is None or len(item.users) == 0:
            continue
        chain = _chain_after(item)
        if chain is None or any(n in mutated for n in (item, *chain)):
            continue
        end = chain[-1]
        meta, end_meta = ops.meta_tensor(item), ops.meta_tensor(end)
        if meta is None or end_meta is None or not end_meta.is_contiguous() or not _copies(chain, item, meta):
            continue
        if tuple(meta.shape) != tuple(full):
            continue
        positions = _permutation_map(chain, item, tuple(meta.shape))
        if positions is None:
            continue
        # element i of the output goes where the chain puts it: the inverse of "result position -> source index"
        scatter = torch.empty_like(positions)
        scatter[positions] = torch.arange(positions.numel())
        args.append(("map", scatter, full))
        new_outputs[k] = dataclasses.replace(out, scatter=len(args) - 1, order=None)  # positions in row-major
        edits.append(("output", item, end, chain))
    # inputs: a per-element input at the end of a movement chain from a contiguous value -> read through a map
    for i, (spec, arg) in enumerate(zip(program.inputs, inputs)):
        if spec.mode != "elem" or not isinstance(arg, fx.Node) or spec.gather is not None:
            continue
        found = _chain_before(arg) if ops.moves_data(arg) else None
        if found is None:
            continue
        source, chain = found
        if any(n in mutated for n in (source, *chain)):
            continue
        src_meta, arg_meta = ops.meta_tensor(source), ops.tensor_meta(arg)
        if src_meta is None or arg_meta is None or not src_meta.is_contiguous():
            continue
        if len(arg.users) != 1 or not _copies(chain, source, src_meta):
            continue
        if tuple(aligned[i]) != tuple(full):
            continue  # broadcast within the row shape: not one element per position
        gather = _permutation_map(chain, source, tuple(src_meta.shape))
        if gather is None:
            continue
        args.append(("map", gather, full))
        new_inputs[i] = dataclasses.replace(spec, gather=len(args) - 1)
        edits.append(("input", i, source, full, chain))
    if not edits:
        return 0
    maps = [a for a in args if isinstance(a, tuple)]
    for _ in maps:
        new_inputs.append(rowwise.RowInput(torch.int32, "map", rowwise.RIGHT))
    new_program = dataclasses.replace(program, inputs=new_inputs, outputs=new_outputs)
    text = new_program.signature_text() + (f"|{kernel.device}" if program.backend == "cuda" else "")
    new_program.name = f"{program.name.rsplit('_', 1)[0]}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    new_kernel = KERNELS.get(new_program.name) or register(RowwiseKernel(new_program, kernel.device).compile())
    graph = gm.graph
    final_args: list = []
    for a in args:
        final_args.append(rewrite.map_node(a[1], a[2], device, fused) if isinstance(a, tuple) else a)
    for edit in edits:
        if edit[0] == "input":
            _, i, source, shape, chain = edit
            with graph.inserting_before(fused):
                flat = tag(graph.call_method("reshape", (source, *shape)), PASS_NAME)  # a view: source is contiguous
            ops.set_tensor_meta(flat, ops.meta_tensor(source).reshape(shape), source.meta.get("device"))
            final_args[i] = flat
    fused.args = (new_kernel.name, final_args)
    fused.meta["fxopt_kernel"] = new_kernel.name
    kernels[fused.name] = new_kernel
    for edit in edits:
        if edit[0] == "output":
            _, item, end, chain = edit
            end_meta = ops.tensor_meta(end)
            with graph.inserting_after(item):
                view = tag(graph.call_method("view", (item, *end_meta.shape)), PASS_NAME)
            view.meta.update({m: end.meta[m] for m in ("tensor_meta", "device", "has_tensor") if m in end.meta})
            end.replace_all_uses_with(view)
            _erase_chain(gm, chain)
        else:
            _erase_chain(gm, edit[4])
    return len(edits)
