"""The row-wise kernel behind ``fxopt::fused``: compiles, plans and launches what ``fxopt/codegen/rowwise.py``
printed for a :class:`~fxopt.codegen.rowwise.RowProgram` (reductions over the last dimension with their elementwise
prologue and epilogue; that module's docstring describes the program and the generated code).

Inputs are addressed by row base + j, the row base from runtime batch sizes and per-input batch strides, so one
compiled kernel serves every batch shape and row length of its rank; a plan per input signature says how. On CUDA a
kernel's first shapes each also get a kernel compiled for exactly them (NOTE [Kernels for one shape]).
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..codegen.rowwise import (CLUSTER_SPLITS, COLUMN_LANES, ELEM, RIGHT, ROWK, RowProgram, aligned_shape, cpp_source,
                               cuda_arg_types, cuda_int_params, cuda_source, dense_strides, one_strided_run,
                               specialized_name)
from . import native
from .kernel import GeneratedKernel, check_inputs, inline_preparer, specialized_launcher
from .strides import contiguous_strides

# NOTE [Rows that do not fill the GPU]: with ~8 elements a thread, a batch-1 LayerNorm over 16 rows of 512 runs 16
# blocks of 64 threads, and every pass over the row (mean, variance, the output) is 8 dependent trips to memory per
# thread: 5.6 µs on the H200 against 3.6 for ATen's LayerNorm and add together (benchmarks/kernel_table.py,
# mlp_block, 2026-12-01). When the rows are fewer than FEW_ROWS_PER_SM per SM, the kernel is latency-bound, not
# bandwidth-bound: more threads a row (fewer elements each) shorten every pass. benchmarks/sweep_rows_config.py
# measured the values below (benchmarks/NOTES.md, fifth session). Since rows this short are held in registers (NOTE
# [Rows in registers] in codegen/rowwise.py) only the first pass reads memory, and 4 elements a thread beat 2 (H100,
# torch 2.11, reports/2026-12-06-h100-decode-5df2246): add + RMSNorm of one row of 768 2.46 µs against 2.85,
# add + LayerNorm of 256 rows of 768 3.26 against 5.66, softmax of 4 rows of 1024 2.56 against 2.66.
ELEMENTS_PER_THREAD = 8
FEW_ROWS_ELEMENTS_PER_THREAD = 4
FEW_ROWS_PER_SM = 2
# NOTE [Rows split over a cluster] (codegen/rowwise.py): on sm_90 and later, in the kernels compiled for one shape,
# rows split over a cluster of blocks where one block a row measured slow (H100, torch 2.11,
# reports/2026-12-06-h100-s9-b02a0d4/call4-959656a/probe.txt; one block a row -> split):
#   * very few rows (at most an eighth of the SMs): LayerNorm over 4 rows of 6000, fp32: 5.66 -> 4.38 µs (4 blocks
#     a row; Inductor 3.49);
#   * strided rows (each load of a block touches as many sectors as threads) that leave most SMs idle: EfficientNet's
#     first SE squeeze, 32 channels-last rows of 12544 fp16, 19.2 -> 11.4 µs (8 blocks a row).
# Not elsewhere: a GroupNorm's statistics over 32 contiguous rows of 10240 took 2.78 µs one block a row and 5.18 with
# 8 blocks a row; the second squeeze (96 strided rows of 3136) 10.75 and 12.19 with 2 (192 blocks: two waves).
# Each block takes a part of at least SPLIT_MIN_ELEMENTS. FXOPT_SPLIT_ROWS=0 keeps one block a row.
SPLIT_MIN_ELEMENTS = 1024
SPLIT_ROWS = os.environ.get("FXOPT_SPLIT_ROWS", "1") != "0"


# NOTE [Rows as columns] (codegen/rowwise.py): rows whose elements are far apart and whose neighbours are
# neighbouring addresses (an SE squeeze over a channels-last tensor) can run 32 a block, one a lane. Opt-in
# (FXOPT_COLUMN_ROWS=1) until it has run on a GPU.
COLUMN_ROWS = os.environ.get("FXOPT_COLUMN_ROWS", "0") == "1"


def column_config(rows: int, n: int, sm_count: int, clusters: bool) -> tuple[tuple[int, int], int, int]:
    """Rows as columns: (block, grid, split). 32 rows a block; a cluster of ``split`` blocks a tile of them where the
    tiles are fewer than the SMs and each block keeps at least 64 elements a row; ``threadIdx.y`` lanes so that each
    thread takes about 4 or more elements of its row."""
    tiles = -(-rows // 32)
    split = 1
    if clusters and SPLIT_ROWS:
        for candidate in CLUSTER_SPLITS:
            if tiles >= sm_count or n < candidate * 64:
                break
            split = candidate
            if tiles * candidate >= sm_count:
                break
    part = -(-n // split)
    lanes = COLUMN_LANES[0]
    for candidate in COLUMN_LANES:
        if part >= 4 * candidate:
            lanes = candidate
    return (32, lanes), min(tiles, sm_count * 16 // split) * split, split


def column_layout(R: int, n_in: int, elem: Sequence[bool], strides: Sequence[int], row_strides: Sequence[int],
                  out_args: Sequence[int], ordered: int, elem_outputs: int) -> bool:
    """Whether a plan's operands are laid out for rows as columns (NOTE [Rows as columns]): every per-element input
    either constant along the row or strided along it with neighbouring rows at neighbouring addresses (the innermost
    batch dim of stride 1), at least one of them strided; every per-element output stored in eager's layout so."""
    if R < 2 or elem_outputs != ordered:
        return False
    inner = [strides[i * (R - 1) + R - 2] for i in range(n_in)]
    elem_inner = [st for st, e in zip(inner, elem) if e]
    if len(elem_inner) != len(row_strides):
        return False
    strided = False
    for st, rs in zip(elem_inner, row_strides):
        if rs == 0:
            continue
        if st != 1 or rs <= 1:
            return False
        strided = True
    out_inner = [out_args[k * (R - 1) + R - 2] for k in range(ordered)]
    out_rows = out_args[ordered * (R - 1):]
    return strided and all(st == 1 for st in out_inner) and all(rs > 1 for rs in out_rows)


def split_for(rows: int, n: int, sm_count: int, strided: bool = False) -> int:
    """Blocks a row (NOTE [Rows split over a cluster]): 1 unless the rows are at most an eighth of the SMs, or
    strided and at most half of them; then the fewest of CLUSTER_SPLITS that fill the SMs with parts of at least
    SPLIT_MIN_ELEMENTS, else the most that keep parts that long."""
    if rows > sm_count // 8 and not (strided and 2 * rows <= sm_count):
        return 1
    best = 1
    for split in CLUSTER_SPLITS:
        if n < split * SPLIT_MIN_ELEMENTS:
            break
        best = split
        if rows * split >= sm_count:
            break
    return best


# NOTE [Strided rows]: a per-element input is read at ``row base + j * stride along the row``, so a row that is not
# contiguous needs no copy. ConvNeXt's LayerNorm over channels reads its NCHW input through permute(0, 2, 3, 1):
# rows of C elements H * W apart. Neighbouring rows are neighbouring addresses, so the 32-byte sectors one warp
# reads for its row are the ones the warps of the next rows read: the reads cost L1/L2 traffic, not DRAM, against
# a copy kernel (a full read and write, and a launch) before every LayerNorm: 26 copies, 53 µs of ConvNeXt-T's
# 1035 (H100, reports/2026-12-06-h100-s5-9f859ee). A value broadcast along the row (a per-row tensor of a
# per-element input) has stride 0, also without a copy. Rows over several trailing dims (row_dims > 1) are still
# made dense.
@dataclass
class _Plan:
    """How to run one set of input shapes/strides: computed once, reused every call."""

    fixes: list[Callable[[torch.Tensor], torch.Tensor] | None]  # per input: a copy that makes it addressable
    out_shapes: list[tuple[int, ...]]
    out_strides: list[tuple[int, ...]]
    rows: int
    n: int
    args: tuple[int, ...]  # rows, n, batch sizes, batch strides per input, row strides; the ordered outputs' strides
    c_args: Any = None  # the same as a ctypes int64 array (C++)
    grid: int = 1
    block: tuple[int, int] = (32, 1)
    # the generated call path (runtime/kernel.py NOTE [Fused call path]): launch(stream, *pointers, *args)
    launch: Callable[..., None] | None = None
    inline: dict = field(default_factory=dict)
    prepare: Callable[[], tuple] | None = None
    numel: int = 0  # rows: nothing to launch when 0
    native: tuple | None = None  # runtime.native.plan_args(...) for the compiled call path
    split: int = 1  # blocks a row (NOTE [Rows split over a cluster]), in a kernel compiled for this shape
    columns: bool = False  # 32 rows a block, one a lane (NOTE [Rows as columns]), in a kernel compiled for this shape

    def __post_init__(self) -> None:
        self.numel = self.rows
        if not any(f is not None for f in self.fixes):
            self.fixes = None  # type: ignore[assignment]  # the call path's cheap test


class RowwiseKernel(GeneratedKernel):
    """One generated row-wise kernel (C++ or CUDA), callable by name through ``torch.ops.fxopt.fused``."""

    call_alloc = "empty_strided(plan.out_shapes[{k}], plan.out_strides[{k}], dtype=D{k}, device=device)"
    call_fixes = True

    def __init__(self, program: RowProgram, device: torch.device):
        self.program = program
        self.name = program.name
        self.backend = program.backend
        self.device = self.resolve_device(device)
        self.ndim = program.ndim
        self.row_dims = program.row_dims  # rows span this many trailing dims of the inputs' (logical) shape
        self.input_dtypes = tuple(i.dtype for i in program.inputs)
        self.output_dtypes = tuple(o.dtype for o in program.outputs)
        self.op_names = list(program.op_names)
        self.source = cuda_source(program) if self.backend == "cuda" else cpp_source(program)
        self._plans: dict[Any, _Plan] = {}
        self._specializations: dict[tuple, Any] = {}  # (args, block) -> launcher or None: NOTE [Kernels for one shape]
        self._bind: Callable[[_Plan], None] | None = None
        self._max_threads = 1024
        self._sm_count = 1
        self._clusters = False  # the device runs thread block clusters (sm_90 and later)

    def __repr__(self) -> str:
        return f"RowwiseKernel({self.name!r}, backend={self.backend!r})"

    # -- compilation -------------------------------------------------------------------------------------------
    def compile(self, binary: bytes | str | None = None) -> "RowwiseKernel":
        """Compile and load now (raises CompileError with the compiler log). ``binary``: a cubin (CUDA) or the path
        of a shared library (C++) already built from exactly this source, e.g. from a saved artifact."""
        if self._bind is None:
            self._compile_cuda(binary) if self.backend == "cuda" else self._compile_cpp(binary)
        return self

    def _compile_cpp(self, library_path: str | None = None) -> None:
        from .cc import load_library

        lib = load_library(self.source, name_hint=self.name, path=library_path)
        self._binary = lib._name
        fn = getattr(lib, self.name)
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], None
        ptr_array = ctypes.c_void_p * max(1, len(self.input_dtypes) + len(self.output_dtypes))

        def bind(plan: _Plan) -> None:
            plan.launch = lambda _stream, *ptrs: fn(ptr_array(*ptrs), plan.c_args)
            plan.args = ()
            plan.native = native.plan_args(*self._native_outputs(plan), native.CPU_ARGS if plan.rows else native.NONE,
                                           native.address(fn), tail=plan.c_args)

        self._bind = bind

    def _compile_cuda(self, cubin: bytes | None = None) -> None:
        from . import driver

        index = self.device.index
        module, self._binary = driver.load_cuda(self.source, device_index=index, name_hint=self.name, cubin=cubin)
        function = module.function(self.name)
        generic = function.launcher(cuda_arg_types(self.program))
        self._max_threads = max(32, function.max_threads_per_block // 32 * 32)
        self._sm_count = driver.sm_count(index)
        self._clusters = torch.cuda.get_device_capability(index) >= (9, 0)

        def bind(plan: _Plan) -> None:
            launcher = self._specialized(plan)
            if launcher is None and (plan.split > 1 or plan.columns):  # the generic kernel runs one block a row
                plan.split, plan.columns = 1, False
                plan.block, plan.grid = self._launch_config(plan.rows, plan.n)
            launcher = launcher or generic
            plan.launch = launcher.bind(plan.grid, plan.block)
            plan.prepare = inline_preparer(plan, launcher, plan.grid, plan.block)
            spec = launcher.native(plan.grid, plan.block)
            if not plan.rows:
                plan.native = native.plan_args(*self._native_outputs(plan), native.NONE)
            elif spec is not None:
                plan.native = native.plan_args(*self._native_outputs(plan), native.CUDA, *spec, tail=plan.args)

        self._bind = bind

    def _specialized(self, plan: _Plan) -> Any:
        """This kernel compiled for ``plan``'s arguments and block (NOTE [Kernels for one shape]), or None."""
        if not plan.rows:
            return None

        def build() -> tuple[str, str]:
            constants = dict(zip(cuda_int_params(self.program), plan.args, strict=True))
            named = {**constants, "columns": 1} if plan.columns else constants
            return (cuda_source(self.program, constants, plan.block, plan.split, plan.columns),
                    specialized_name(self.program, named, plan.block, plan.split))

        key = (plan.args, plan.block, plan.split, plan.columns)
        return specialized_launcher(self, key, build, cuda_arg_types(self.program))

    @staticmethod
    def _native_outputs(plan: _Plan) -> tuple[list, list]:
        """The outputs' sizes and strides, for the native call path."""
        return plan.out_shapes, plan.out_strides

    # -- shapes --------------------------------------------------------------------------------------------------
    def _shapes(self, shapes: Sequence[Sequence[Any]]) -> tuple[list[tuple], tuple]:
        """Each input's shape aligned to the (logical) row rank, and the row shape they broadcast to."""
        K = self.row_dims
        R = self.ndim + K - 1
        aligned = []
        for i, (shape, spec) in enumerate(zip(shapes, self.program.inputs)):
            limit = R if spec.align == RIGHT else R - K
            if len(shape) > limit:
                raise ValueError(f"{self.name}: input {i} has rank {len(shape)}, the kernel was built for rows of "
                                 f"rank {R}")
            aligned.append(aligned_shape(shape, spec.align, R, K))
        values = [a for a, spec in zip(aligned, self.program.inputs) if spec.mode != "map"]  # maps are checked apart
        return aligned, tuple(torch.broadcast_shapes(*values)) if values else ()

    def _out_shapes(self, full: tuple) -> list[tuple]:
        K = self.row_dims
        shapes = []
        for o in self.program.outputs:
            shapes.append(full if o.level == ELEM else full[:-K] + (1,) * K if o.level == ROWK else full[:-K])
        return shapes

    def _out_layouts(self, full: tuple) -> tuple[list[tuple], list[tuple], list[int]]:
        """The outputs' shapes and strides for rows of logical shape ``full``, and the kernel's arguments for those
        stored in eager's layout (NOTE [Outputs in eager's layout] in codegen/rowwise.py): their batch strides, then
        their strides along the row. An order that does not keep the row one strided run at this shape: row-major."""
        K = self.row_dims
        shapes = self._out_shapes(full)
        strides, batch, along = [], [], []
        for o, shape in zip(self.program.outputs, shapes):
            st = contiguous_strides(shape)
            if o.level == ELEM and o.order is not None and o.scatter is None:
                ordered = dense_strides(shape, o.order)
                run = one_strided_run(shape[-K:], ordered[-K:])
                if run is not None:
                    st = ordered
                batch.extend(st[d] for d in range(len(shape) - K))
                along.append(run if run is not None else 1)
            strides.append(tuple(st))
        return shapes, strides, batch + along

    def fake(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Output metadata (for fake-tensor tracing): per-element outputs have the row shape (in eager's layout
        where the program keeps it), per-row outputs the reduced one, contiguous."""
        _, full = self._shapes([t.shape for t in inputs])
        shapes, strides, _ = self._out_layouts(full)
        return [inputs[0].new_empty_strided(s, st, dtype=d) for s, st, d in zip(shapes, strides, self.output_dtypes)]

    # -- calls (the generated call path: GeneratedKernel.call, runtime/kernel.py) ---------------------------------
    def _plan(self, inputs: Sequence[torch.Tensor], key) -> _Plan:
        """Check the inputs against what the kernel addresses, before anything launches: per-row inputs must have
        one value per row; per-element inputs are read with any stride along the row (NOTE [Strided rows]). Rows
        over ``row_dims > 1`` trailing dims merge them: per-element inputs dense over them or one strided run (else
        a copy); in a program over two dims that stores nothing per element, any strides (NOTE [Rows over two
        dims])."""
        check_inputs(self, inputs)
        self.compile()
        R, K = self.ndim, self.row_dims
        aligned, full = self._shapes([t.shape for t in inputs])
        n = math.prod(full[-K:])
        fixes: list = []
        strides: list[int] = []
        row_strides: list[int] = []  # per-element inputs' strides along the row (NOTE [Strided rows])
        two_level = self.program.two_level and K == 2  # NOTE [Rows over two dims] in codegen/rowwise.py
        fast = self._fast_dim(inputs, aligned, full) if two_level else -1
        other_strides: list[int] = []  # two-level: strides along the dim visited second
        for i, (t, spec, logical) in enumerate(zip(inputs, self.program.inputs, aligned)):
            fix = None
            per_row = math.prod(logical[-K:])
            if spec.mode == "row" and per_row != 1:
                raise ValueError(f"{self.name}: input {i} of shape {tuple(t.shape)} has {per_row} values per row; "
                                 f"the kernel was built for one per row")
            if spec.mode == "map":
                _check_map(self.name, i, t, full, inputs, self.program)
            shape = logical[:-K] + (1 if per_row == 1 else n,)  # the trailing dims merged into one row
            view = t.reshape(logical)  # a view: only unit dims are added
            row_stride = 1
            if two_level and spec.mode == "elem":
                pair = [view.stride(d) if view.shape[d] != 1 else 0 for d in (-2, -1)]
                row_strides.append(pair[fast])
                other_strides.append(pair[-1 - fast])
            elif spec.mode == "elem" and n > 1:
                if per_row == 1:
                    row_stride = 0  # broadcast along the row: every j reads the row's one value
                elif K == 1:
                    row_stride = view.stride(-1)
                elif logical[-K:] == full[-K:] and one_strided_run(view.shape[-K:], view.stride()[-K:]) is not None:
                    row_stride = one_strided_run(view.shape[-K:], view.stride()[-K:])  # NOTE [Rows over strided dims]
                elif logical[-K:] != full[-K:] or not _dense(view, K):
                    fix = _dense_rows(logical, full[-K:])
                    view = fix(t)
            if spec.mode == "elem" and not two_level:
                row_strides.append(row_stride)
            if (K > 1 or per_row == 1) and not two_level:
                view = view.reshape(shape[:-1] + (view.shape[-K:].numel(),))  # a view: merges dense or unit dims
            strides.extend(view.stride(d) if shape[d] != 1 else 0 for d in range(R - 1))
            fixes.append(fix)
        rows = math.prod(full[:-K])
        out_shapes, out_strides, out_args = self._out_layouts(full)
        level_args = (full[fast], *other_strides) if two_level else ()
        args = (rows, n, *full[:-K], *strides, *row_strides, *level_args, *out_args)
        plan = _Plan(fixes, out_shapes, out_strides, rows, n, args)
        if self.backend == "cuda":
            strided = any(stride > 1 for stride in row_strides)
            elem = [spec.mode == "elem" for spec in self.program.inputs]
            n_ordered = sum(1 for o in self.program.outputs if o.level == ELEM and o.order is not None
                            and o.scatter is None)
            n_elem_out = sum(1 for o in self.program.outputs if o.level == ELEM)
            if COLUMN_ROWS and not any(spec.mode == "map" for spec in self.program.inputs) and column_layout(
                    R, len(inputs), elem, strides, row_strides, out_args, n_ordered, n_elem_out):
                plan.block, plan.grid, plan.split = column_config(rows, n, self._sm_count, self._clusters)
                plan.columns = True
            else:
                split = split_for(rows, n, self._sm_count, strided) if self._clusters and SPLIT_ROWS else 1
                plan.block, plan.grid = self._launch_config(rows, n, split)
                plan.split = split
        else:
            plan.c_args = (ctypes.c_int64 * len(args))(*args)
        self._bind(plan)
        self._plans[key] = plan
        return plan

    def _fast_dim(self, inputs: Sequence[torch.Tensor], aligned: Sequence[tuple], full: tuple) -> int:
        """Of the two row dims, the one visited first (NOTE [Rows over two dims]): -2 where the first per-element
        input that varies along both has the smaller stride along it, else -1."""
        for t, spec, logical in zip(inputs, self.program.inputs, aligned):
            if spec.mode != "elem" or logical[-2:] != full[-2:] or 1 in full[-2:]:
                continue
            s2, s1 = (abs(st) for st in t.reshape(logical).stride()[-2:])
            return -2 if s2 < s1 else -1
        return -1

    def _launch_config(self, rows: int, n: int, split: int = 1) -> tuple[tuple[int, int], int]:
        """One warp per row for short rows (8 rows per block), else one block per row: about 8 elements a thread,
        or ``FEW_ROWS_ELEMENTS_PER_THREAD`` when the rows do not fill the GPU (NOTE [Rows that do not fill the GPU]).
        ``split`` > 1: ``split`` blocks a row, one row a block, sized for a part (NOTE [Rows split over a
        cluster])."""
        per_thread = ELEMENTS_PER_THREAD if rows >= FEW_ROWS_PER_SM * self._sm_count else FEW_ROWS_ELEMENTS_PER_THREAD
        part = -(-n // split)
        threads = 32
        while threads * 2 <= min(1024, self._max_threads) and threads * per_thread < part:
            threads *= 2
        if split > 1:
            return (threads, 1), rows * split
        rows_per_block = max(1, min(8, self._max_threads // 32)) if threads == 32 else 1
        blocks = (rows + rows_per_block - 1) // rows_per_block
        return (threads, rows_per_block), max(1, min(blocks, self._sm_count * 32))


def _check_map(name: str, i: int, m: torch.Tensor, full: tuple, inputs: Sequence[torch.Tensor],
               program: RowProgram) -> None:
    """An index map (NOTE [Movement maps]) has one entry per element of the row shape, contiguous, and every entry
    addresses an element of the input it gathers or the output it scatters: checked once per input signature (the
    plan is cached), before anything launches, so the kernel never reads or writes out of bounds."""
    if tuple(m.shape) != tuple(full) or not m.is_contiguous():
        raise ValueError(f"{name}: index map (input {i}) of shape {tuple(m.shape)} for rows of shape {tuple(full)}; "
                         f"the kernel was built for a contiguous map of the row shape")
    limits = [inputs[k].numel() for k, spec in enumerate(program.inputs) if spec.gather == i]
    limits += [math.prod(full) for o in program.outputs if o.scatter == i]
    if m.numel() and limits and (int(m.min()) < 0 or int(m.max()) >= min(limits)):
        raise ValueError(f"{name}: index map (input {i}) addresses elements outside {min(limits)}")


def _dense(view: torch.Tensor, K: int) -> bool:
    """The last ``K`` dims of ``view`` are laid out as one contiguous run (unit dims have any stride)."""
    expected = 1
    for d in range(view.dim() - 1, view.dim() - 1 - K, -1):
        if view.size(d) != 1 and view.stride(d) != expected:
            return False
        expected *= view.size(d)
    return True


def _dense_rows(logical: tuple[int, ...], row: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A per-element input whose row (its last ``len(row)`` dims) is broadcast or strided, copied dense."""
    def fix(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(logical).expand(*logical[:-len(row)], *row).contiguous()

    return fix
