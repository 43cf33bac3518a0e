"""The short-query attention kernels behind ``fxopt::fused``: compiles, plans and launches what
``fxopt/codegen/attention.py`` printed (its docstring describes the algorithm; the pass is
``fxopt/passes/decode_attention.py``).

A plan per input signature checks the shapes against what the program was built for (head dim, dtypes, at most
``MAX_ROWS`` query rows per KV head, a mask that broadcasts to the scores) before anything launches, and passes
every tensor's four strides, so views (a query sliced out of a merged projection, an expanded mask) need no copy.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..codegen.attention import MAX_ROWS, THREADS, AttentionProgram, cpp_source, cuda_source, pointer_count, \
    value_count
from . import native
from .kernel import GeneratedKernel, check_inputs, inline_preparer


@dataclass
class _Plan:
    out_shapes: list[tuple[int, ...]]
    out_strides: list[tuple[int, ...]]
    args: tuple[int, ...]
    grid: tuple[int, int] = (1, 1)
    block: int = THREADS
    numel: int = 0  # nothing to launch when 0
    c_args: Any = None
    launch: Callable[..., None] | None = None
    inline: dict = field(default_factory=dict)
    prepare: Callable[[], tuple] | None = None
    native: tuple | None = None
    fixes: None = None  # the call path's contract: these kernels address every input as it is


def strides_in_order(shape: Sequence[int], order: Sequence[int]) -> tuple[int, ...]:
    """Dense strides for ``shape`` with its dims laid out in ``order`` (outermost first)."""
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= max(1, shape[d])
    return tuple(strides)


class AttentionKernel(GeneratedKernel):
    """One generated short-query attention kernel (attend, partial or combine), callable by name through
    ``torch.ops.fxopt.fused``."""

    call_alloc = "empty_strided(plan.out_shapes[{k}], plan.out_strides[{k}], dtype=D{k}, device=device)"

    def __init__(self, program: AttentionProgram, device: torch.device):
        self.program = program
        self.name = program.name
        self.backend = program.backend
        self.device = self.resolve_device(device)
        self.input_dtypes = program.input_dtypes
        self.output_dtypes = program.output_dtypes
        self.op_names = ["scaled_dot_product_attention"] if program.kind != "combine" else ["attention_combine"]
        self.source = cuda_source(program) if self.backend == "cuda" else cpp_source(program)
        self._plans: dict[Any, _Plan] = {}
        self._bind: Callable[[_Plan], None] | None = None

    def __repr__(self) -> str:
        return f"AttentionKernel({self.name!r}, kind={self.program.kind!r}, backend={self.backend!r})"

    # -- compilation -------------------------------------------------------------------------------------------
    def compile(self, binary: bytes | str | None = None) -> "AttentionKernel":
        """Compile and load now (raises CompileError with the compiler log); ``binary``: a cubin or shared library
        built from exactly this source (a saved artifact's)."""
        if self._bind is None:
            self._compile_cuda(binary) if self.backend == "cuda" else self._compile_cpp(binary)
        return self

    def _compile_cpp(self, library_path: str | None = None) -> None:
        from .cc import load_library

        lib = load_library(self.source, name_hint=self.name, path=library_path)
        self._binary = lib._name
        fn = getattr(lib, self.name)
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], None
        ptr_array = ctypes.c_void_p * pointer_count(self.program)

        def bind(plan: _Plan) -> None:
            plan.c_args = (ctypes.c_int64 * len(plan.args))(*plan.args)
            plan.launch = lambda _stream, *ptrs: fn(ptr_array(*ptrs), plan.c_args)
            plan.native = native.plan_args(plan.out_shapes, plan.out_strides,
                                           native.CPU_ARGS if plan.numel else native.NONE, native.address(fn),
                                           tail=plan.c_args)
            plan.args = ()

        self._bind = bind

    def _compile_cuda(self, cubin: bytes | None = None) -> None:
        from . import driver

        module, self._binary = driver.load_cuda(self.source, device_index=self.device.index, name_hint=self.name,
                                                cubin=cubin)
        launcher = module.function(self.name).launcher(["ptr"] * pointer_count(self.program)
                                                       + ["i64"] * value_count(self.program))

        def bind(plan: _Plan) -> None:
            plan.launch = launcher.bind(plan.grid, plan.block)
            plan.prepare = inline_preparer(plan, launcher, plan.grid, plan.block)
            spec = launcher.native(plan.grid, plan.block)
            if not plan.numel:
                plan.native = native.plan_args(plan.out_shapes, plan.out_strides, native.NONE)
            elif spec is not None:
                plan.native = native.plan_args(plan.out_shapes, plan.out_strides, native.CUDA, *spec, tail=plan.args)

        self._bind = bind

    # -- shapes ----------------------------------------------------------------------------------------------------
    def _dims(self, shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """(B, Hk, G, Lq, L or splits) from the inputs' shapes, checked against what the program computes; a clear
        error otherwise."""
        p = self.program
        if p.kind == "combine":
            part = tuple(shapes[0])
            if len(part) != 6 or part[5] != p.head_dim + 2:
                raise ValueError(f"{self.name}: partial results of shape {part}, expected [B, Hk, G, Lq, splits, "
                                 f"{p.head_dim + 2}]")
            return part[:5]
        q, k, v = (tuple(s) for s in shapes[:3])
        if len(q) != 4 or len(k) != 4 or len(v) != 4:
            raise ValueError(f"{self.name}: q, k, v of shapes {q}, {k}, {v}; the kernel takes 4-D [B, H, L, D]")
        B, Hq, Lq, D = q
        Hk, L = k[1], k[2]
        if D != p.head_dim or k[3] != D or v[3] != D:
            raise ValueError(f"{self.name}: head dims q {D}, k {k[3]}, v {v[3]}; the kernel was built for "
                             f"{p.head_dim}")
        if k[0] != B or v[0] != B or v[1] != Hk or v[2] != L:
            raise ValueError(f"{self.name}: q {q}, k {k}, v {v} do not share batch, heads and length")
        if Hk == 0 or Hq % Hk:
            raise ValueError(f"{self.name}: {Hq} query heads are not a multiple of {Hk} key/value heads")
        G = Hq // Hk
        if G * Lq > MAX_ROWS:
            raise ValueError(f"{self.name}: {G * Lq} query rows per key/value head; the kernel holds at most "
                             f"{MAX_ROWS}")
        if p.has_mask:
            try:
                torch.broadcast_shapes(tuple(shapes[3]), (B, Hq, Lq, L))
            except RuntimeError:
                raise ValueError(f"{self.name}: mask of shape {tuple(shapes[3])} does not broadcast to the scores "
                                 f"{(B, Hq, Lq, L)}") from None
            if len(shapes[3]) > 4 or torch.broadcast_shapes(tuple(shapes[3]), (B, Hq, Lq, L)) != (B, Hq, Lq, L):
                raise ValueError(f"{self.name}: mask of shape {tuple(shapes[3])} is larger than the scores "
                                 f"{(B, Hq, Lq, L)}")
        return B, Hk, G, Lq, L

    def splits(self, length: int) -> int:
        return max(1, math.ceil(length / self.program.chunk)) if self.program.kind == "partial" else 1

    def _out_shape(self, dims: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        B, Hk, G, Lq, L = dims
        p = self.program
        if p.kind == "partial":
            shape = (B, Hk, G, Lq, self.splits(L), p.head_dim + 2)
            return shape, strides_in_order(shape, range(6))
        shape = (B, Hk * G, Lq, p.head_dim)
        return shape, strides_in_order(shape, p.out_order)

    def fake(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Output metadata for fake-tensor tracing (torch.export, torch.compile)."""
        shape, stride = self._out_shape(self._dims([t.shape for t in inputs]))
        return [inputs[0].new_empty_strided(shape, stride, dtype=self.output_dtypes[0])]

    # -- calls (the generated call path: GeneratedKernel.call, runtime/kernel.py) ---------------------------------
    def _plan(self, inputs: Sequence[torch.Tensor], key) -> _Plan:
        check_inputs(self, inputs)
        self.compile()
        p = self.program
        dims = self._dims([t.shape for t in inputs])
        B, Hk, G, Lq, L = dims
        shape, stride = self._out_shape(dims)
        if p.kind == "combine":
            args = (B, Hk, G, Lq, L, *stride)
            rows = B * Hk * G * Lq
            grid, block = (max(1, rows), 1), min(THREADS, 32 * math.ceil(p.head_dim / 32))
            numel = rows
        else:
            Hq = Hk * G
            strides = [inputs[0].stride(), inputs[1].stride(), inputs[2].stride()]
            if p.has_mask:
                strides.append(inputs[3].expand(B, Hq, Lq, L).stride())
            if p.kind == "attend":
                strides.append(stride)
            chunk = p.chunk if p.kind == "partial" else max(1, L)
            args = (B, Hk, G, Lq, L, chunk, *(s for st in strides for s in st))
            grid, block = (max(1, B * Hk), self.splits(L)), THREADS
            numel = B * Hk * Lq * G * (L > 0 or p.kind == "partial")
            if L == 0 and p.kind == "attend" and B * Hq * Lq:
                raise ValueError(f"{self.name}: attention over 0 keys")
        plan = _Plan([shape], [stride], args, grid, block, numel)
        self._bind(plan)
        self._plans[key] = plan
        return plan


def attention_kernel(program: AttentionProgram, device: torch.device) -> AttentionKernel:
    """The registered kernel for ``program`` (the first one built for it), compiled."""
    from .kernel import register

    return register(AttentionKernel(program, device)).compile()
