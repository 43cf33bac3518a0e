"""Row-wise kernels: reductions over the last dimension, with their elementwise prologue and epilogue, as one kernel.

A fused group (built by ``fxopt/passes/fuse_reductions.py``) is a set of nodes over one *row shape* ``S = (..., n)``:
reductions over the last dim (softmax, layer_norm, sum, ...), elementwise ops of shape ``S`` (per element) and
elementwise ops of the reduced shape (per row). Lowering gives a program run once per row::

    inputs   in0: float16 elem, in1: float16 elem, in2: float32 elem (a weight: batch strides 0)
    v0 = (in0 + 1.0f * in1)                 elem   <- x + residual (the prologue)
    v1 = v0                                  elem   stage 0: r0 = sum(v1) / n       (mean)
    v2 = ((v0 - r0) * (v0 - r0))             elem   stage 1: r1 = rsqrt(sum(v2) / n + eps)
    v3 = (((v0 - r0) * r1) * in2)            elem   <- layer_norm's output (the epilogue would follow)
    outputs  v3 -> float16 elem, v0 -> float16 elem

Each stage is one pass over the row: the per-element statements it needs are recomputed from the inputs in every
pass (no scratch memory, nothing but registers), then combined (sum or max) into one per-row value. A final pass
computes and stores the per-element outputs; per-row outputs (sum, mean, amax) are stored once per row.

A row may span the last ``row_dims`` dims (``x.mean((2, 3))`` of ``[N, C, H, W]``: rows of ``H * W``; the program's
rank is then the rank of ``[N, C, H * W]``): the kernel sees rows of ``n`` elements all the same, and the runtime
merges the trailing dims of each input (per-element inputs dense over them, per-row inputs unit there).

Inputs are addressed by ``row base + j * stride along the row`` (per-element inputs, any stride: NOTE [Strided
rows] in ``fxopt/runtime/rowwise.py``) or ``row base`` (per-row inputs); the row base comes from runtime batch sizes and per-input batch strides (0 where the input broadcasts), so
one compiled kernel serves every batch shape and row length of its rank. The C++ kernel loops over rows (OpenMP)
and accumulates sums of float rows in double; the CUDA kernel runs one warp (short rows, several rows per block)
or one block per row, grid-stride over rows, accumulating in the compute type (float for 16-bit types).

The op table (:data:`fxopt.ops.ROW_REDUCTION_OPS`) describes each reduction's stages; this module only prints them
(source text only: the kernel that compiles, plans and launches a program is ``fxopt/runtime/rowwise.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torch.fx as fx

from .. import ops
from .printer import IndentedBuffer, header_text, specialized_suffix, store
from .region import ROUNDING, STORAGE_CTYPES, RegionBuilder, compute_ctype, convert, literal

# Levels: where a value lives. ELEM: one value per element of the row shape; ROWK: one per row, kept as a trailing
# unit dim (shape S[:-1] + (1,), keepdim=True); ROWN: one per row, reduced shape S[:-1] (keepdim=False).
ELEM, ROWK, ROWN = "elem", "rowk", "rown"
# Input alignment: "right" broadcasts against the row shape (numpy rules); "reduced" against S[:-1] (inputs of
# keepdim=False per-row ops), which is the same as "right" after appending a unit dim.
RIGHT, REDUCED = "right", "reduced"

InputKey = tuple[Union[fx.Node, str], str]  # (graph value or parameter name, alignment)


@dataclass(frozen=True)
class RowInput:
    dtype: torch.dtype
    mode: str  # "elem": one value per element | "row": one value per row | "map": an index map (NOTE [Movement maps])
    align: str  # RIGHT | REDUCED
    gather: int | None = None  # "elem" read through the index map that is input ``gather`` (NOTE [Movement maps])


@dataclass(frozen=True)
class RowStmt:
    var: str
    dtype: torch.dtype  # compute dtype of the value
    expr: str
    op: str
    deps: tuple[str, ...]
    per_row: bool  # computed once per row (else in every pass that needs it)


@dataclass(frozen=True)
class RowStage:
    """One pass over the row: ``var = finish(combine over j of value)``. The accumulator type is the printer's
    choice (:func:`acc_dtype`), so one program prints for both targets."""

    combine: str  # "sum" | "max"
    value: str  # per-element value combined
    acc: str  # accumulator name
    finish: str  # template over {acc}, {n} (the row length) and {eps}, from the op table
    eps: float | None
    var: str  # the per-row result
    dtype: torch.dtype  # its compute dtype


def acc_dtype(stage: RowStage, cuda: bool) -> torch.dtype:
    """C++ sums float rows in double (a sequential sum over the row); CUDA in float: each thread's partial sum
    covers n / threads elements and the partials combine as a tree, accurate without widening."""
    if stage.combine == "sum" and stage.dtype == torch.float32 and not cuda:
        return torch.float64
    return stage.dtype


def finish_expr(stage: RowStage, cuda: bool) -> str:
    """The stage's per-row result, in its compute dtype."""
    acc = acc_dtype(stage, cuda)
    eps = literal(stage.eps, acc) if stage.eps is not None else None
    expr = stage.finish.format(acc=stage.acc, n=f"(({STORAGE_CTYPES[acc]})n)", eps=eps)
    return convert(expr, acc, stage.dtype)


@dataclass(frozen=True)
class RowOutput:
    var: str
    dtype: torch.dtype  # dtype stored
    level: str  # ELEM (stored in the final pass), ROWK or ROWN (stored once per row)
    scatter: int | None = None  # ELEM stored where index map input ``scatter`` says (NOTE [Movement maps])
    # ELEM stored in eager's layout: the logical dims from outermost to innermost (NOTE [Outputs in eager's layout]);
    # None: row-major
    order: tuple[int, ...] | None = None


@dataclass
class RowProgram:
    name: str
    backend: str
    ndim: int  # rank R of the row shape
    inputs: list[RowInput]
    body: list[Union[RowStmt, RowStage]]  # in dependency order
    outputs: list[RowOutput]
    op_names: list[str] = field(default_factory=list)
    row_dims: int = 1  # trailing dims of the logical shape merged into one row (ndim counts them as one)
    two_level: bool = False  # per-element inputs addressed over two row dims of any strides (NOTE [Rows over two dims])

    def signature_text(self) -> str:
        return repr((self.backend, self.ndim, self.inputs, self.body, self.outputs, self.row_dims, self.two_level))

    def describe(self) -> str:
        """The program as text (for debugging and reports)."""
        lines = [f"rowwise program {self.name} (rank {self.ndim}, {self.backend})"]
        if self.row_dims > 1:
            lines[0] += f", rows over the last {self.row_dims} dims"
        for i, inp in enumerate(self.inputs):
            lines.append(f"  in{i}: {inp.dtype} {inp.mode} ({inp.align})")
        for item in self.body:
            if isinstance(item, RowStmt):
                lines.append(f"  {item.var} = {item.expr}  {'row' if item.per_row else 'elem'}  // {item.op}")
            else:
                finish = item.finish.format(acc=item.acc, n="n", eps=item.eps)
                lines.append(f"  {item.var} = {finish} with {item.acc} = {item.combine}_j {item.value}")
        for k, o in enumerate(self.outputs):
            lines.append(f"  out{k} = {o.var} -> {o.dtype} {o.level}" + (f" in dim order {o.order}" if o.order else ""))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Lowering: fx nodes -> RowProgram
# ---------------------------------------------------------------------------------------------------------------
def input_meta(key: Union[fx.Node, str], gm: fx.GraphModule) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
    """(shape, stride, dtype) of a group input: a graph value's recorded meta, or a parameter/buffer of ``gm``."""
    if isinstance(key, str):
        try:
            t = gm.get_parameter(key)
        except AttributeError:
            t = gm.get_buffer(key)
        return tuple(t.shape), tuple(t.stride()), t.dtype
    tm = ops.tensor_meta(key)
    return tuple(tm.shape), tuple(tm.stride), tm.dtype


def aligned_shape(shape: Sequence[Any], align: str, ndim: int, row_dims: int = 1) -> tuple:
    """An input's shape lined up with the rank-``ndim`` (logical) row shape whose rows span the last ``row_dims``
    dims: leading unit dims; ``row_dims`` trailing ones if REDUCED."""
    shape = tuple(shape)
    if align == REDUCED:
        return (1,) * (ndim - row_dims - len(shape)) + shape + (1,) * row_dims
    return (1,) * (ndim - len(shape)) + shape


class RowProgramBuilder(RegionBuilder):
    """Lowers a group: ``members`` in topological order, ``calls`` the canonical call of each value node
    (``ops.ElementwiseCall`` or ``ops.RowReductionCall``; members without a call, the tuple-returning reduction
    nodes whose element 0 is the value, are skipped), ``levels`` each value node's level."""

    def __init__(self, gm: fx.GraphModule, members: Sequence[fx.Node], calls: dict, levels: dict[fx.Node, str],
                 outputs: Sequence[fx.Node], ndim: int, backend: str, device: torch.device, row_dims: int = 1):
        super().__init__(gm, members, [], outputs)
        self.calls = calls
        self.levels = levels
        self.ndim = ndim  # the program's rank: a row's ``row_dims`` trailing dims count as one
        self.row_dims = row_dims
        self.backend = backend
        self.device = device
        self.in_keys: list[InputKey] = []
        self.in_specs: list[RowInput] = []
        self.body: list[Union[RowStmt, RowStage]] = []
        self.kinds: dict[str, str] = {}  # var -> "in_elem" | "in_row" | "elem" | "row"
        self.deps: dict[str, tuple[str, ...]] = {}
        self.n_stmts = 0
        self.n_stages = 0

    # -- values ----------------------------------------------------------------------------------------------
    def _input(self, key: Union[fx.Node, str], align: str) -> tuple[str, torch.dtype]:
        k = (key, align)
        if k not in self.in_keys:
            shape, _, dtype = input_meta(key, self.gm)
            K = self.row_dims
            trailing = aligned_shape(shape, align, self.ndim + K - 1, K)[-K:]
            mode = "row" if all(d == 1 for d in trailing) else "elem"
            self.in_keys.append(k)
            self.in_specs.append(RowInput(dtype, mode, align))
            self.kinds[f"in{len(self.in_keys) - 1}"] = "in_" + mode
        i = self.in_keys.index(k)
        return f"in{i}", ops.compute_dtype(self.in_specs[i].dtype)

    def _bind_inputs(self, operands: Sequence[Any], level: str) -> None:
        """Point every operand from outside the group at its input variable, aligned for a consumer at ``level``."""
        for o in operands:
            if isinstance(o, str) or (isinstance(o, fx.Node) and o not in self.levels):
                self.values[o] = self._input(o, REDUCED if level == ROWN else RIGHT)

    def _value(self, o: Union[fx.Node, str], to: torch.dtype) -> tuple[str, tuple[str, ...]]:
        var, dtype = self.values[o]
        return convert(var, dtype, to), (var,)

    def _stmt(self, expr: str, dtype: torch.dtype, op: str, deps: Sequence[str], per_row: bool) -> str:
        if expr in self.kinds and not (per_row and self.kinds[expr] in ("elem", "in_elem")):
            return expr  # a plain copy of a value: use the value
        var = f"v{self.n_stmts}"
        self.n_stmts += 1
        deps = tuple(dict.fromkeys(deps))
        if per_row:
            bad = [d for d in deps if self.kinds[d] in ("elem", "in_elem")]
            assert not bad, f"per-row value {var} ({op}) depends on per-element values {bad}"
        self.body.append(RowStmt(var, dtype, expr, op, deps, per_row))
        self.kinds[var] = "row" if per_row else "elem"
        self.deps[var] = deps
        return var

    # -- lowering ----------------------------------------------------------------------------------------------
    def build_program(self) -> tuple[RowProgram, list[InputKey]]:
        op_names = []
        for node in self.nodes:
            call = self.calls.get(node)
            if call is None:
                continue  # a tuple-returning reduction: its getitem carries the value
            level = self.levels[node]
            if isinstance(call, ops.RowReductionCall):
                self._bind_inputs([call.input, *call.operands.values()], ELEM)
                self._lower_reduction(node, call)
                op_names.append(call.op.name)
            else:
                self._bind_inputs(call.operands, level)
                dtype, expr = self._lower(node, call)
                deps = [self.values[o][0] for o in call.operands if isinstance(o, fx.Node)]
                var = self._stmt(expr, dtype, call.op.name, deps, per_row=level != ELEM)
                self.values[node] = (var, dtype)
                op_names.append(call.op.name)
        outs = []
        for node in self.outputs:
            var, _ = self.values[node]
            tm = ops.tensor_meta(node)
            order = storable_order(tm.shape, tm.stride, self.row_dims) if self.levels[node] == ELEM else None
            outs.append(RowOutput(var, tm.dtype, self.levels[node], order=order))
        # NOTE [Rows over two dims]: statistics alone (nothing stored per element), over two dims, on CUDA
        two_level = (self.backend == "cuda" and self.row_dims == 2 and all(o.level != ELEM for o in outs)
                     and all(spec.mode != "map" for spec in self.in_specs))
        program = RowProgram("", self.backend, self.ndim, list(self.in_specs), self.body, outs, op_names,
                             self.row_dims, two_level)
        text = program.signature_text() + (f"|{self.device}" if self.backend == "cuda" else "")
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        ops_part = "_".join(dict.fromkeys(op_names))[:48].rstrip("_")
        program.name = f"fxopt_rows_{ops_part}_{digest}"
        return program, list(self.in_keys)

    def _lower_reduction(self, node: fx.Node, call: ops.RowReductionCall) -> None:
        op = call.op
        cdt = ops.compute_dtype(ops.tensor_meta(node).dtype)
        x_expr, x_deps = self._value(call.input, cdt)
        out_dtype, in_dtype = ops.tensor_meta(node).dtype, ops.tensor_meta(call.input).dtype
        if out_dtype in (torch.float16, torch.bfloat16) and in_dtype != out_dtype:
            # softmax(x, dtype=torch.float16) of a wider x: eager converts first, then reduces the rounded values
            x_expr = f"fx_round_{'half' if out_dtype == torch.float16 else 'bf16'}({x_expr})"
        x_row = all(self.kinds[d] in ("row", "in_row") for d in x_deps)
        x = self._stmt(x_expr, cdt, op.name, x_deps, per_row=x_row)
        results: list[str] = []
        for combine, element, finish in op.stages:
            fmt = {"x": x, **{f"r{i}": r for i, r in enumerate(results)}}
            value = self._stmt(element.format(**fmt), cdt, op.name, [x, *results], per_row=False)
            k = self.n_stages
            self.n_stages += 1
            stage = RowStage(combine, value, f"acc{k}", finish, call.attrs.get("eps"), f"r{k}", cdt)
            self.body.append(stage)
            self.kinds[stage.var] = "row"
            self.deps[stage.var] = (value,)
            results.append(stage.var)
        # NOTE [16-bit intermediates] (codegen/region.py) holds for reductions too: eager stores a float16/bfloat16
        # softmax, LayerNorm or sum in its type, and an op after it in the group reads it rounded. Unrounded, a
        # softmax an ulp off eager's feeds a LayerNorm of nearly equal values, which multiplies it by
        # 1/sqrt(var + eps) (up to 316; 260 there): fuzz seed 61206363, 0.0111 off eager where float16 allows 0.0056.
        rounding = ROUNDING.get(out_dtype)
        if op.result is None:
            r = results[-1]
            if rounding is not None:
                r = self._stmt(f"{rounding}({r})", cdt, op.name, [r], per_row=True)
            self.values[node] = (r, cdt)
            return
        y = op.result.format(x=x, **{f"r{i}": r for i, r in enumerate(results)})
        deps = [x, *results]
        for name, template in op.optional:
            if name in call.operands:
                operand, operand_deps = self._value(call.operands[name], cdt)
                y = template.format(y=y, **{name: operand})
                deps.extend(operand_deps)
        if rounding is not None:
            y = f"{rounding}({y})"
        self.values[node] = (self._stmt(y, cdt, op.name, deps, per_row=False), cdt)


def build_program(gm: fx.GraphModule, members: Sequence[fx.Node], calls: dict, levels: dict[fx.Node, str],
                  outputs: Sequence[fx.Node], ndim: int, backend: str, device: torch.device,
                  row_dims: int = 1) -> tuple[RowProgram, list[InputKey]]:
    """Lower a fused row-wise group; returns the program and its inputs, in kernel argument order. ``ndim`` is the
    program's rank, rows spanning the last ``row_dims`` dims of the logical shape (counted as one there)."""
    return RowProgramBuilder(gm, members, calls, levels, outputs, ndim, backend, device, row_dims).build_program()


# ---------------------------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------------------------
def _identity(combine: str, dtype: torch.dtype) -> str:
    return literal(0, dtype) if combine == "sum" else literal(-math.inf, dtype)


def _row_offsets(buf: IndentedBuffer, program: RowProgram, size: Callable[[int], str],
                 stride: Callable[[int, int], str]) -> None:
    """``b{i}``: input i's offset (in elements) of the row's first element, from the batch index of ``row``;
    ``ob{k}`` the same for each output stored in eager's layout (``stride(n_in + position, d)``)."""
    R, n_in = program.ndim, len(program.inputs)
    ordered = _ordered_outputs(program)
    for i in range(n_in):
        buf.line(f"int64_t b{i} = 0;")
    for k in ordered:
        buf.line(f"int64_t ob{k} = 0;")
    if R > 1 and (n_in or ordered):
        buf.line("{")
        with buf.indent():
            buf.line("int64_t rem = row;")
            for d in range(R - 2, -1, -1):
                buf.line(f"const int64_t idx{d} = rem % {size(d)}; rem /= {size(d)};")
                for i in range(n_in):
                    buf.line(f"b{i} += idx{d} * {stride(i, d)};")
                for pos, k in enumerate(ordered):
                    buf.line(f"ob{k} += idx{d} * {stride(n_in + pos, d)};")
        buf.line("}")


# NOTE [Movement maps]: a row kernel may read a per-element input, or store a per-element output, through an index
# map: an int32 tensor of the row shape whose entry at (row, j) is the element's offset in the input's storage, or
# its position in the output's. A chain of data movement between a row kernel and its neighbour (Swin's window
# partition, ``roll`` + ``view`` + ``permute`` + ``contiguous``, and the reverse) is a fixed permutation of the
# elements for a given shape, so the pass that finds it (passes/movement.py) computes the map once, by running the
# chain on ``arange``, and the copies are gone: the LayerNorm stores its output already partitioned, the residual
# add + LayerNorm reads the attention's output from where the window reverse would have put it. The price is memory:
# 4 bytes an element for each distinct map, held by the module (Swin-T: 15 maps, 10 MiB at batch 1, 40 at batch
# 4, about 320 at batch 32), and an indirect load per element; index arithmetic derived from the chain (as
# Inductor's indexing does) would need neither.
# NOTE [Rows over two dims]: a GroupNorm's group of a channels-last tensor (``[N, G, C / G, H * W]``, the group's
# channels adjacent, its pixels C apart) is not one strided run (NOTE [Rows over strided dims]), so its statistics
# read a copy: three of the fp16 diffusion block's copies (3.7 µs each, H100, reports/2026-12-06-h100-s9-b02a0d4/
# call4-959656a/kt_diffusion_block_float16.txt). A program that stores nothing per element does not care in which
# order it visits a row, so on CUDA such a program over two row dims addresses element ``j`` of input ``i`` as
# ``b_i + (j % rn) * rs_i + (j / rn) * ros_i``: ``rn`` the length of the dim visited first (the one the first
# strided input has the smaller stride along, the group's channels), ``rs``/``ros`` each input's strides along it
# and the other (0 where it broadcasts). Any strides, no copy; a division a element, by a constant in the kernels
# compiled for one shape.
def _elem_offset(i: int, program: RowProgram | None = None) -> str:
    """Where element ``j`` of the row is in per-element input ``i``: its row base plus ``j`` times its stride along
    the row (NOTE [Strided rows]), two strides over two dims (NOTE [Rows over two dims]), or the entry of its index
    map (NOTE [Movement maps])."""
    if program is not None and program.inputs[i].gather is not None:
        return f"fx_map_index(p_in{program.inputs[i].gather}[row * n + j], rows * n)"
    if program is not None and program.two_level:
        return f"b{i} + (j % rn) * rs{i} + (j / rn) * ros{i}"
    return f"b{i} + j * rs{i}"


# NOTE [Rows over strided dims]: a row over several trailing dims (an SE squeeze's H x W) is read without a copy
# where those dims, in the operand's layout, make one run of a single stride: a channels-last [N, C, H, W] has H and W
# at strides W*C and C, so a channel's H*W elements are C apart, and the kernel reads them as a strided row (NOTE
# [Strided rows]). ConvNeXt's last block output, the residual add of a permuted (channels-last) branch, joins the
# global average pool's kernel so. Per-element outputs are stored in eager's layout (NOTE [Outputs in eager's
# layout]); fuse_reductions takes such operands only into groups whose per-element outputs it can store so.
def one_strided_run(shape: Sequence[int], strides: Sequence[int]) -> int | None:
    """The stride of the one run that the dims ``shape`` (at ``strides``) make, unit dims ignored (1: dense); None
    when they do not make one (a dim's stride is not the next non-unit dim's size times its stride)."""
    dims = [(n, st) for n, st in zip(shape, strides) if n != 1]
    if not dims:
        return 1
    for (_, outer), (n, inner) in zip(dims, dims[1:]):
        if outer != n * inner:
            return None
    return dims[-1][1] if dims[-1][1] > 0 else None


# NOTE [Outputs in eager's layout]: a per-element output is stored in the layout eager gives that value, not
# row-major, where eager's is another dense order: an SE block's SiLU over a channels-last convolution output is
# channels-last in eager, read by the squeeze (this kernel) and by the gate's multiply and the next convolution,
# which want it so. Stored row-major, the multiply and the convolution would read another layout than eager's (a
# copy kernel before cuDNN's channels-last convolution), so such groups used to keep the SiLU out (NOTE [Rows over
# strided dims]) and it ran as a kernel of its own. The program keeps the dim order (outermost first) of the
# value's recorded strides; the plan allocates the output dense in that order for the call's shape and hands the
# kernel its batch strides and its stride along the row, which it needs the row's dims to make one strided run in
# that order (a channels-last H x W: stride C). A layout that does not (or a dim order the call's shape makes
# ambiguous) is stored row-major, as before: correct either way, the strides are the tensor's own.
def storable_order(shape: Sequence[int], stride: Sequence[int], row_dims: int = 1) -> tuple[int, ...] | None:
    """The dim order (outermost first) of a per-element output's layout (NOTE [Outputs in eager's layout]), where
    it is dense, not row-major, and keeps the last ``row_dims`` dims one strided run; else None (row-major)."""
    shape, stride = tuple(shape), tuple(stride)
    if len(shape) < 2 or len(stride) != len(shape) or 0 in shape:
        return None
    order = tuple(sorted(range(len(shape)), key=lambda d: (-stride[d], d)))
    if order == tuple(range(len(shape))):
        return None
    dense = dense_strides(shape, order)
    if any(shape[d] != 1 and dense[d] != stride[d] for d in range(len(shape))):
        return None  # not dense in any order: broadcast, gaps or overlap
    if one_strided_run(shape[-row_dims:], dense[-row_dims:]) is None:
        return None
    return order


def dense_strides(shape: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """Strides of a tensor of ``shape`` laid out densely in dim ``order`` (outermost first)."""
    out, acc = [0] * len(shape), 1
    for d in reversed(order):
        out[d] = acc
        acc *= max(shape[d], 1)
    return tuple(out)


def _ordered_outputs(program: RowProgram) -> list[int]:
    """Outputs stored in eager's layout (NOTE [Outputs in eager's layout]): batch strides and a row stride each."""
    return [k for k, o in enumerate(program.outputs) if o.level == ELEM and o.order is not None and o.scatter is None]


def _elem_inputs(program: RowProgram) -> list[int]:
    return [i for i, inp in enumerate(program.inputs) if inp.mode == "elem"]


def _emit_pass(buf: IndentedBuffer, program: RowProgram, targets: Sequence[str], cached: bool = False) -> None:
    """The per-element statements ``targets`` need, with the loads they need, in program order; ``cached``: the
    per-element inputs come from the registers the row was loaded into (NOTE [Rows in registers])."""
    stmts = {s.var: s for s in program.body if isinstance(s, RowStmt) and not s.per_row}
    needed: set[str] = set()
    loads: set[int] = set()
    stack = list(targets)
    while stack:
        v = stack.pop()
        if v in stmts and v not in needed:
            needed.add(v)
            stack.extend(stmts[v].deps)
        elif v.startswith("in") and program.inputs[int(v[2:])].mode == "elem":
            loads.add(int(v[2:]))
    for i in sorted(loads):
        source = f"c_in{i}[k]" if cached else f"fx_load(p_in{i}[{_elem_offset(i, program)}])"
        buf.line(f"const {compute_ctype(program.inputs[i].dtype)} in{i} = {source};")
    for s in program.body:
        if isinstance(s, RowStmt) and s.var in needed:
            buf.line(f"const {STORAGE_CTYPES[s.dtype]} {s.var} = {s.expr};  // {s.op}")


# NOTE [Rows in registers]: a row the block's threads hold at most ROW_CACHE elements each of (every short row of a
# batch-1 transformer: 768 elements over 256 threads) is loaded once into registers; every pass (mean, variance,
# the output) then reads the registers instead of memory. A pass over memory is a dependent round trip of several
# hundred nanoseconds that the row's reductions wait for, and these kernels are latency-bound: the decoder's add +
# RMSNorm over one row of 768 took 3.3 µs with two passes over memory against 1.6 for Inductor's single-load kernel
# (benchmarks/kernel_table.py decode/plain/gpt2_small_size/bfloat16, H100). Longer rows take the loop over memory.
ROW_CACHE = 8
def _row_body(buf: IndentedBuffer, program: RowProgram, cuda: bool, split: int = 1) -> None:
    """One row: per-row loads, the stages (a pass each), per-row statements, the final pass and the stores. On CUDA,
    a row of at most ROW_CACHE elements a thread is held in registers (NOTE [Rows in registers]); a block takes the
    elements ``fxr_j0 <= j < fxr_j1`` (the whole row, or its part of a row split over a cluster: ``split`` blocks,
    NOTE [Rows split over a cluster])."""
    for i, inp in enumerate(program.inputs):
        if inp.mode == "row":
            buf.line(f"const {compute_ctype(inp.dtype)} in{i} = fx_load(p_in{i}[b{i}]);")
    if not cuda:
        _row_passes(buf, program, cuda, cached=False)
        return
    elem_inputs = [i for i, inp in enumerate(program.inputs) if inp.mode == "elem"]
    longest = "fxr_chunk" if split > 1 else "n"  # the most elements a block takes
    buf.line(f"if ({longest} <= bx * {ROW_CACHE}) {{  // NOTE [Rows in registers]")
    with buf.indent():
        for i in elem_inputs:
            buf.line(f"{compute_ctype(program.inputs[i].dtype)} c_in{i}[{ROW_CACHE}];")
        buf.line("#pragma unroll")
        buf.line("for (int k = 0; k < fxr_per; ++k) {")
        with buf.indent():
            buf.line("const int64_t j = fxr_j0 + threadIdx.x + (int64_t)k * bx;")
            for i in elem_inputs:
                zero = literal(0, ops.compute_dtype(program.inputs[i].dtype))
                buf.line(f"c_in{i}[k] = j < fxr_j1 ? fx_load(p_in{i}[{_elem_offset(i, program)}]) : {zero};")
        buf.line("}")
        _row_passes(buf, program, cuda, cached=True, split=split)
    buf.line("} else {")
    with buf.indent():
        _row_passes(buf, program, cuda, cached=False, split=split)
    buf.line("}")


def _row_passes(buf: IndentedBuffer, program: RowProgram, cuda: bool, cached: bool, split: int = 1,
                columns: bool = False) -> None:
    """The row's passes; ``columns``: a thread's row is ``threadIdx.x``'s, its elements ``threadIdx.y`` apart (NOTE
    [Rows as columns])."""
    if columns:
        loop = "for (int64_t j = fxr_j0 + threadIdx.y; j < fxr_j1; j += by) {"
    elif cached:
        loop = ("#pragma unroll\nfor (int k = 0; k < fxr_per; ++k) { "
                "const int64_t j = fxr_j0 + threadIdx.x + (int64_t)k * bx; if (j >= fxr_j1) break;")
    elif cuda:
        loop = "for (int64_t j = fxr_j0 + threadIdx.x; j < fxr_j1; j += bx) {"
    else:
        loop = "for (int64_t j = 0; j < n; ++j) {"
    stages = 0
    for item in program.body:
        if isinstance(item, RowStmt):
            if item.per_row:
                buf.line(f"const {STORAGE_CTYPES[item.dtype]} {item.var} = {item.expr};  // {item.op}")
            continue
        acc = acc_dtype(item, cuda)
        buf.line(f"// pass: {item.var} = {item.combine} over the row")
        buf.line(f"{STORAGE_CTYPES[acc]} {item.acc} = {_identity(item.combine, acc)};")
        for line in loop.split("\n"):
            buf.line(line)
        with buf.indent():
            _emit_pass(buf, program, [item.value], cached)
            value = convert(item.value, item.dtype, acc)
            if item.combine == "sum":
                buf.line(f"{item.acc} += {value};")
            else:
                buf.line(f"{item.acc} = fx_maximum({item.acc}, {value});")
        buf.line("}")
        if cuda and columns:
            kind = "d" if acc == torch.float64 else "f"
            functor = "fxr_sum_op" if item.combine == "sum" else "fxr_max_op"
            buf.line(f"{item.acc} = fxc_reduce<by>({item.acc}, {functor}(), fxc_smem_{kind}, fxc_row_{kind});")
            if split > 1:
                buf.line(f"{item.acc} = fxc_cluster_reduce<{split}>({item.acc}, {functor}(), "
                         f"{_identity(item.combine, acc)}, fxr_part_{kind}[{stages}]);")
            stages += 1
        elif cuda:
            smem = "fxr_smem_d" if acc == torch.float64 else "fxr_smem_f"
            functor = "fxr_sum_op" if item.combine == "sum" else "fxr_max_op"
            buf.line(f"{item.acc} = fxr_reduce({item.acc}, {functor}(), {_identity(item.combine, acc)}, {smem}, "
                     "(int)bx);")
            if split > 1:  # NOTE [Rows split over a cluster]: the blocks' partials, in one order in every block
                buf.line(f"{item.acc} = fxr_cluster_reduce<{split}>({item.acc}, {functor}(), "
                         f"{_identity(item.combine, acc)}, &{smem.replace('smem', 'part')}[{stages}]);")
            stages += 1
        buf.line(f"const {STORAGE_CTYPES[item.dtype]} {item.var} = {finish_expr(item, cuda)};")
    elem_outs = [(k, o) for k, o in enumerate(program.outputs) if o.level == ELEM]
    if elem_outs:
        buf.line("// final pass: per-element outputs")
        for line in loop.split("\n"):
            buf.line(line)
        with buf.indent():
            _emit_pass(buf, program, [o.var for _, o in elem_outs], cached)
            if columns:
                buf.line("if (!fxc_valid) continue;  // a lane past the last row computes, stores nothing")
            for k, o in elem_outs:
                if o.scatter is not None:
                    at = f"fx_map_index(p_in{o.scatter}[row * n + j], rows * n)"
                else:
                    at = f"ob{k} + j * ors{k}" if o.order is not None else "row * n + j"
                buf.line(f"p_out{k}[{at}] = {store(o.var, o.dtype)};")
        buf.line("}")
    row_outs = [(k, o) for k, o in enumerate(program.outputs) if o.level != ELEM]
    if row_outs:
        if cuda:
            first = "threadIdx.y == 0 && fxc_valid" if columns else "threadIdx.x == 0"
            buf.line(f"if ({first} && fxr_part == 0) {{" if split > 1 else f"if ({first}) {{")
        with buf.indent() if cuda else contextlib.nullcontext():
            for k, o in row_outs:
                buf.line(f"p_out{k}[row] = {store(o.var, o.dtype)};")
        if cuda:
            buf.line("}")


def _title(program: RowProgram) -> str:
    return f"// fxopt row-wise kernel {program.name}: {' -> '.join(program.op_names)}"


def cpp_source(program: RowProgram) -> str:
    """C++ for the CPU: ``void NAME(char** data, const int64_t* args)``; ``data`` holds the inputs' then the outputs'
    pointers, ``args`` = rows, n, the R-1 batch sizes, R-1 batch strides (in elements) per input, the stride
    along the row of each per-element input (over two dims: then ``rn`` and each one's second stride, NOTE [Rows
    over two dims]), then R-1 batch strides per output stored in eager's layout and the stride along the row of each
    (NOTE [Outputs in eager's layout])."""
    R, n_in = program.ndim, len(program.inputs)
    buf = IndentedBuffer()
    buf.line(_title(program))
    buf.line('extern "C" {')
    buf.line(f"void {program.name}(char** data, const int64_t* args) {{")
    with buf.indent():
        for i, inp in enumerate(program.inputs):
            t = STORAGE_CTYPES[inp.dtype]
            buf.line(f"const {t}* FX_RESTRICT p_in{i} = reinterpret_cast<const {t}*>(data[{i}]);")
        for k, o in enumerate(program.outputs):
            t = STORAGE_CTYPES[o.dtype]
            buf.line(f"{t}* FX_RESTRICT p_out{k} = reinterpret_cast<{t}*>(data[{n_in + k}]);")
        buf.line("const int64_t rows = args[0];")
        buf.line("const int64_t n = args[1];")
        base = 2 + (R - 1) + n_in * (R - 1)
        elem = _elem_inputs(program)
        for k, i in enumerate(elem):
            buf.line(f"const int64_t rs{i} = args[{base + k}];")
        if program.two_level:  # NOTE [Rows over two dims]
            buf.line(f"const int64_t rn = args[{base + len(elem)}];")
            for k, i in enumerate(elem):
                buf.line(f"const int64_t ros{i} = args[{base + len(elem) + 1 + k}];")
        ordered = _ordered_outputs(program)
        out_base = base + len(elem) + (1 + len(elem) if program.two_level else 0)
        for pos, k in enumerate(ordered):
            buf.line(f"const int64_t ors{k} = args[{out_base + len(ordered) * (R - 1) + pos}];")
        buf.line("#pragma omp parallel for schedule(static) if (rows > 1 && rows * n >= 32768)")
        buf.line("for (int64_t row = 0; row < rows; ++row) {")
        with buf.indent():
            _row_offsets(buf, program, lambda d: f"args[{2 + d}]", lambda i, d: (
                f"args[{2 + (R - 1) + i * (R - 1) + d}]" if i < n_in
                else f"args[{out_base + (i - n_in) * (R - 1) + d}]"))
            _row_body(buf, program, cuda=False)
        buf.line("}")
    buf.line("}")
    buf.line('}  // extern "C"')
    return header_text() + "\n" + buf.getvalue()


CUDA_HELPERS = r"""
// ---- row reductions: warp shuffles, then one value per warp through shared memory -----------------------------
struct fxr_sum_op { template <class T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; } };
struct fxr_max_op {
  template <class T> __device__ __forceinline__ T operator()(T a, T b) const { return fx_maximum(a, b); }
};
// Every thread of the row's threads (threadIdx.x, a multiple of 32) gets the result. blockDim.x > 32 means one row
// per block (blockDim.y == 1), so the __syncthreads are reached by the whole block.
// ``threads`` is blockDim.x, a constant in a kernel specialized to its launch (NOTE [Kernels for one shape]).
template <class T, class Op>
__device__ __forceinline__ T fxr_reduce(T v, Op op, T identity, T* smem, int threads) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threads <= 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = threads >> 5;
  __syncthreads();  // the previous reduction is done reading smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : identity;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
"""

# NOTE [Rows split over a cluster]: a row kernel runs one block a row, so rows fewer than the SMs leave most of the
# GPU idle: at batch 1 a GroupNorm of 32 groups (a diffusion UNet's 320 channels at 32 x 32: 32 rows of 10240) runs
# 32 blocks on an H100's 132 SMs, each thread looping over memory; an EfficientNet's first SE squeeze is 32 rows of
# 12544. Splitting a row over several blocks needs their partial sums combined before the pass that uses them
# (LayerNorm's mean before its variance, both before the output), which a grid cannot do in one kernel without a
# workspace in global memory (shared by concurrent launches of one kernel, so unsafe on several streams) or a second
# kernel. Hopper's thread block clusters can: the blocks of a cluster (at most 8, portably) run at the same time and
# read each other's shared memory. A kernel compiled for one shape (NOTE [Kernels for one shape]) with ``split`` S
# > 1 has ``__cluster_dims__(S, 1, 1)``: block ``b`` takes part ``b % S`` of row ``b / S``; after each stage's block
# reduction, thread 0 puts the block's partial in its shared memory, the cluster's barrier orders it before the
# reads, and every thread combines the S partials in rank order, so every block holds the same per-row value
# (deterministic, and the same in every block). A barrier after the row keeps each block's shared memory alive until
# the others have read it. The runtime chooses S (runtime/rowwise.py, ``split_for``) and needs sm_90 or later;
# elsewhere, or where the specialized kernel does not compile, the generic kernel runs one block a row.
CLUSTER_SPLITS = (2, 4, 8)
CLUSTER_HELPERS = r"""
// ---- rows split over a cluster: each block's partial in its shared memory, read by every block ----------------
__device__ __forceinline__ void fxr_cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ unsigned fxr_cluster_address(const void* p, unsigned rank) {
  unsigned out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"((unsigned)__cvta_generic_to_shared(p)), "r"(rank));
  return out;
}
__device__ __forceinline__ float fxr_remote(const float* p, unsigned rank) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(fxr_cluster_address(p, rank)) : "memory");
  return v;
}
__device__ __forceinline__ double fxr_remote(const double* p, unsigned rank) {
  double v;
  asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(fxr_cluster_address(p, rank)) : "memory");
  return v;
}
// Every thread of every block of the cluster gets the same value: the partials combined in rank order.
template <int S, class T, class Op>
__device__ __forceinline__ T fxr_cluster_reduce(T v, Op op, T identity, T* slot) {
  if (threadIdx.x == 0) *slot = v;
  fxr_cluster_sync();
  T r = identity;
#pragma unroll
  for (int k = 0; k < S; ++k) r = op(r, fxr_remote(slot, k));
  return r;
}
"""


# NOTE [Rows as columns]: one block a row reads a row whose elements are far apart (an SE squeeze's channel of a
# channels-last tensor: H x W elements C apart) one sector per element: each warp's load touches 32 sectors for 64
# bytes of float16, and EfficientNet-B0's squeezes took 6.1 µs each against Inductor's 1.3-2.8
# (reports/2026-12-06-h100-s9-b02a0d4/call4-959656a/probe.txt: the first, 32 rows of 12544, 19.2 µs one block a row,
# 11.4 split over 8, Inductor's three kernels 4.5). Neighbouring rows are neighbouring addresses there, so a block
# takes 32 rows, one a lane (``threadIdx.x``), and their elements over ``threadIdx.y``: a warp reads 32 neighbouring
# rows' element j, one or two sectors. Each stage reduces a lane's elements, then the block's ``by`` partials of each
# row through shared memory in one order; with ``split`` > 1 the blocks of a cluster take parts of the rows'
# elements and combine as in NOTE [Rows split over a cluster]. Lanes past the last row compute on the last row and
# store nothing. Only in kernels compiled for one shape, only where the runtime finds every per-element operand laid
# out so (runtime/rowwise.py ``column_layout``), and opt-in (FXOPT_COLUMN_ROWS=1) until measured.
COLUMN_LANES = (4, 8, 16, 32)
COLUMN_HELPERS = r"""
// ---- rows as columns: lane x's row, its elements over y; the y partials combined in one order ------------------
template <int TY, class T, class Op>
__device__ __forceinline__ T fxc_reduce(T v, Op op, T (*smem)[33], T* row) {
  __syncthreads();  // the previous reduction is done reading smem and row
  smem[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0) {
    T r = smem[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < TY; ++k) r = op(r, smem[k][threadIdx.x]);
    row[threadIdx.x] = r;
  }
  __syncthreads();
  return row[threadIdx.x];
}
#ifdef FXR_CLUSTER_HELPERS
template <int S, class T, class Op>
__device__ __forceinline__ T fxc_cluster_reduce(T v, Op op, T identity, T* slots) {
  if (threadIdx.y == 0) slots[threadIdx.x] = v;
  fxr_cluster_sync();
  T r = identity;
#pragma unroll
  for (int k = 0; k < S; ++k) r = op(r, fxr_remote(&slots[threadIdx.x], k));
  return r;
}
#endif
"""


def _part_bounds(buf: IndentedBuffer, split: int) -> None:
    """``fxr_j0 <= j < fxr_j1``: the elements of the row this block takes (all of them, or its part)."""
    if split > 1:
        buf.line("const int64_t fxr_j0 = fxr_part * fxr_chunk;")
        buf.line("const int64_t fxr_j1 = fxr_j0 + fxr_chunk < n ? fxr_j0 + fxr_chunk : n;")
    else:
        buf.line("const int64_t fxr_j0 = 0;")
        buf.line("const int64_t fxr_j1 = n;")


def _column_kernel_body(buf: IndentedBuffer, program: RowProgram, split: int, stages: Mapping[torch.dtype, int],
                        ordered: Sequence[int]) -> None:
    """The tile loop of a kernel of rows as columns (NOTE [Rows as columns])."""
    n_in = len(program.inputs)
    total = sum(stages.values())
    for dtype, kind in ((torch.float64, "d"), (torch.float32, "f")):
        if stages[dtype]:
            ctype = STORAGE_CTYPES[dtype]
            buf.line(f"__shared__ {ctype} fxc_smem_{kind}[by][33];")
            buf.line(f"__shared__ {ctype} fxc_row_{kind}[32];")
            if split > 1:
                buf.line(f"__shared__ {ctype} fxr_part_{kind}[{total}][32];")
    buf.line("for (int64_t fxc_tile = (int64_t)blockIdx.x / fxr_split; fxc_tile * bx < rows; "
             "fxc_tile += (int64_t)gridDim.x / fxr_split) {")
    with buf.indent():
        buf.line("const bool fxc_valid = fxc_tile * bx + threadIdx.x < rows;")
        buf.line("const int64_t row = fxc_valid ? fxc_tile * bx + threadIdx.x : rows - 1;")
        _row_offsets(buf, program, lambda d: f"size{d}",
                     lambda i, d: f"st{i}_{d}" if i < n_in else f"ost{ordered[i - n_in]}_{d}")
        _part_bounds(buf, split)
        for i, inp in enumerate(program.inputs):
            if inp.mode == "row":
                buf.line(f"const {compute_ctype(inp.dtype)} in{i} = fx_load(p_in{i}[b{i}]);")
        _row_passes(buf, program, cuda=True, cached=False, split=split, columns=True)
        if split > 1:
            buf.line("fxr_cluster_sync();  // the partials are read: the next tile may write its own, blocks exit")
    buf.line("}")


def cuda_int_params(program: RowProgram) -> list[str]:
    """The CUDA kernel's integer parameters in order, after the pointers (see :func:`cuda_source`)."""
    R, n_in = program.ndim, len(program.inputs)
    ordered = _ordered_outputs(program)
    two_level = ["rn"] + [f"ros{i}" for i in _elem_inputs(program)] if program.two_level else []
    return (["rows", "n"] + [f"size{d}" for d in range(R - 1)]
            + [f"st{i}_{d}" for i in range(n_in) for d in range(R - 1)]
            + [f"rs{i}" for i in _elem_inputs(program)] + two_level
            + [f"ost{k}_{d}" for k in ordered for d in range(R - 1)] + [f"ors{k}" for k in ordered])


def cuda_arg_types(program: RowProgram) -> list[str]:
    return ["ptr"] * (len(program.inputs) + len(program.outputs)) + ["i64"] * len(cuda_int_params(program))


# NOTE [Kernels for one shape]: a row kernel is generic over its shapes: rows, row length, batch sizes and every
# stride are arguments, the block's size is read at run time, and the kernel carries both the register path and the
# loop over memory (NOTE [Rows in registers]). At batch 1 such a kernel does a few thousand elements, and what it
# costs is the length of its dependent chain of instructions, not its memory traffic: DeiT-S's add + LayerNorm over
# 197 rows of 384 ran 3.46 µs against 1.76 for Inductor's kernel, which is compiled for exactly those sizes (H100,
# reports/2026-12-06-h100-s7-92b51af/call1-92b51af/kt_deit_fp32.txt). The same program compiled with its integer
# arguments and its block as constants (``cuda_source(program, constants, block)``) folds the row decomposition into
# constant multiplies, unrolls the register path to exactly the elements a thread holds, drops the bounds checks
# where the row is a multiple of the block, and loses the loop over memory: a fifth of the code (fp32, sm_90: 5.0 KB
# of SASS against 26 KB) and 1.79 µs against 3.20 (H100; ViT-B's 197 rows of 768: 2.05 against 3.90; ConvNeXt's
# LayerNorm over channels, fp16: 1.76 against 3.81, Inductor's 2.21; variants.txt and probe.txt in
# reports/2026-12-06-h100-s8-058a168/call1-058a168). The runtime compiles one for each of a kernel's first shapes
# (runtime/kernel.py specialized_launcher) and runs the generic kernel for the rest; the arguments are still passed,
# so both have one launcher. The strided elementwise kernel can be specialized the same way (codegen/printer.py
# cuda_strided_source: 3.58 -> 2.94 µs for ConvNeXt's bias + GELU, runtime/kernel.py). Compiling for a shape is cheaper than the
# generic kernel (NVRTC on this project's CPU machine, this one: 60 ms against 158), but it is one more compile for
# each shape of a kernel.
def specialized_name(program: RowProgram, constants: Mapping[str, int], block: tuple[int, int],
                     split: int = 1) -> str:
    """The kernel name of ``program`` compiled for these argument values and block (and rows split over
    ``split`` blocks)."""
    return program.name + specialized_suffix({**constants, "split": split} if split > 1 else constants, block)


def cuda_source(program: RowProgram, constants: Mapping[str, int] | None = None,
                block: tuple[int, int] | None = None, split: int = 1, columns: bool = False) -> str:
    """CUDA C++ for NVRTC: ``NAME(inputs..., outputs..., rows, n, size_0..size_{R-2}, st{i}_{d}..., rs{i}...,
    [rn, ros{i}...,] ost{k}_{d}..., ors{k}...)`` (``rs``: per-element inputs' strides along the row; ``rn``,
    ``ros``: over two dims, NOTE [Rows over two dims]; ``ost``, ``ors``: the same for
    outputs stored in eager's layout, NOTE [Outputs in eager's layout]), launched with
    ``blockDim = (threads per row, rows per block)``; grid-stride over rows. With ``constants`` (values of some of the
    integer parameters) and ``block``, the kernel ``specialized_name(...)`` for exactly those (NOTE [Kernels for one
    shape]): it takes the same arguments and ignores the ones it was given as constants. ``split`` > 1 (with
    ``constants`` holding ``n`` and ``block`` one row a block): each row taken by a cluster of that many blocks, a
    part each (NOTE [Rows split over a cluster]); launched with ``split`` blocks a row. ``columns``: 32 rows a
    block, one a lane, their elements over ``threadIdx.y`` (NOTE [Rows as columns]; with ``split``, ``split`` blocks
    a tile of 32 rows)."""
    constants = dict(constants or {})
    if columns:
        if block is None or block[0] != 32 or block[1] not in COLUMN_LANES or "n" not in constants \
                or "rows" not in constants or (split > 1 and split not in CLUSTER_SPLITS):
            raise ValueError(f"{program.name}: rows as columns need the row count and length, a block of 32 x "
                             f"{COLUMN_LANES} threads and a split among {CLUSTER_SPLITS}")
        if any(i.mode == "map" for i in program.inputs):
            raise ValueError(f"{program.name}: rows as columns read no index maps")
    elif split > 1 and (block is None or block[1] != 1 or "n" not in constants or split not in CLUSTER_SPLITS):
        raise ValueError(f"{program.name}: a row split over {split} blocks needs the row length, one row a block "
                         f"and a split among {CLUSTER_SPLITS}")
    int_params = cuda_int_params(program)
    if unknown := set(constants) - set(int_params):
        raise ValueError(f"{program.name}: no such parameters {sorted(unknown)}")
    name = program.name if block is None else specialized_name(
        program, {**constants, "columns": 1} if columns else constants, block, split)
    params = [f"const {STORAGE_CTYPES[inp.dtype]}* FX_RESTRICT p_in{i}" for i, inp in enumerate(program.inputs)]
    params += [f"{STORAGE_CTYPES[o.dtype]}* FX_RESTRICT p_out{k}" for k, o in enumerate(program.outputs)]
    params += [f"int64_t {p}_given" if p in constants else f"int64_t {p}" for p in int_params]
    ordered = _ordered_outputs(program)
    acc_dtypes = {acc_dtype(s, cuda=True) for s in program.body if isinstance(s, RowStage)}
    n_in = len(program.inputs)
    buf = IndentedBuffer()
    buf.line(_title(program))
    bounds = f"__launch_bounds__({block[0] * block[1]}) " if block is not None else ""
    if split > 1:
        bounds = f"__cluster_dims__({split}, 1, 1) " + bounds
    buf.line(f'extern "C" __global__ void {bounds}{name}({", ".join(params)}) {{')
    with buf.indent():
        buf.line("FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]")
        for p, v in constants.items():
            buf.line(f"constexpr int64_t {p} = {int(v)};")
        if block is None:
            buf.line("const int64_t bx = blockDim.x, by = blockDim.y;")
            buf.line(f"constexpr int fxr_per = {ROW_CACHE};  // register slots a thread fills")
        else:
            buf.line(f"constexpr int64_t bx = {block[0]}, by = {block[1]};")
            buf.line("__builtin_assume(threadIdx.x < bx && threadIdx.y < by);")
            if columns:
                buf.line("__builtin_assume(blockDim.x == bx && blockDim.y == by);")
            longest = -(-constants["n"] // split) if "n" in constants else None  # the most elements a block takes
            per = -(-longest // block[0]) if longest is not None else ROW_CACHE
            buf.line(f"constexpr int fxr_per = {max(1, min(per, ROW_CACHE))};")
            if split > 1:
                buf.line(f"constexpr int64_t fxr_split = {split}, fxr_chunk = {longest};")
                buf.line("const int64_t fxr_part = blockIdx.x % fxr_split;  // this block's rank in its cluster")
            elif columns:
                buf.line("constexpr int64_t fxr_split = 1;")
        if torch.float64 in acc_dtypes:
            buf.line("__shared__ double fxr_smem_d[32];")
        if acc_dtypes - {torch.float64}:
            buf.line("__shared__ float fxr_smem_f[32];")
        stages = {torch.float64: 0, torch.float32: 0}
        for item in program.body:
            if isinstance(item, RowStage):
                stages[torch.float64 if acc_dtype(item, cuda=True) == torch.float64 else torch.float32] += 1
        if columns:
            _column_kernel_body(buf, program, split, stages, ordered)
        elif split > 1:  # one slot per stage (the stage's index among all of them)
            total = sum(stages.values())
            if stages[torch.float64]:
                buf.line(f"__shared__ double fxr_part_d[{total}];")
            if stages[torch.float32]:
                buf.line(f"__shared__ float fxr_part_f[{total}];")
            buf.line("for (int64_t row = (int64_t)blockIdx.x / fxr_split; row < rows; "
                     "row += (int64_t)gridDim.x / fxr_split) {")
        else:
            buf.line("for (int64_t row = (int64_t)blockIdx.x * by + threadIdx.y; row < rows; "
                     "row += (int64_t)gridDim.x * by) {")
        if not columns:
            with buf.indent():
                _row_offsets(buf, program, lambda d: f"size{d}",
                             lambda i, d: f"st{i}_{d}" if i < n_in else f"ost{ordered[i - n_in]}_{d}")
                _part_bounds(buf, split)
                _row_body(buf, program, cuda=True, split=split)
                if split > 1:
                    buf.line("fxr_cluster_sync();  // the partials are read: the next row may write its own, "
                             "blocks exit")
            buf.line("}")
    buf.line("}")
    helpers = "\n#ifndef FXR_HELPERS\n#define FXR_HELPERS" + CUDA_HELPERS + "#endif\n"
    if split > 1:
        helpers += "#ifndef FXR_CLUSTER_HELPERS\n#define FXR_CLUSTER_HELPERS" + CLUSTER_HELPERS + "#endif\n"
    if columns:
        helpers += "#ifndef FXC_HELPERS\n#define FXC_HELPERS" + COLUMN_HELPERS + "#endif\n"
    return header_text() + helpers + "\n" + buf.getvalue()
