"""3xTF32 GEMMs at run time (NOTE [3xTF32 GEMMs], fxopt/passes/tf32x3.py): the split kernel behind
``fxopt::fused`` that writes ``[x_hi | x_lo | x_hi]`` (its source: fxopt/codegen/tf32_split.py), and
``fxopt::mm_tf32``, a GEMM (batched for 3-D operands) that cuBLAS may run on TF32 tensor cores whatever the
process's TF32 setting."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..codegen import tf32_split as codegen
from ..codegen.tf32_split import MAX_BLOCKS, THREADS, Tf32SplitProgram
from .template import LaunchSpec, TemplateKernel, template_kernel


class Tf32SplitKernel(TemplateKernel):
    """``x`` [..., K] float32 whose rows are one strided run -> ``[x_hi | x_lo | x_hi]`` [rows, 3K], or stacked
    [3, rows, K] (``program.stacked``), dense."""

    op_names = ["tf32_split"]

    def cuda_source(self) -> str:
        return codegen.cuda_source(self.program)

    def cpp_source(self) -> str:
        return codegen.cpp_source(self.program)

    def _rows(self, x: torch.Tensor) -> tuple[int, int, int]:
        if x.dim() < 1:
            raise ValueError(f"{self.name}: a 0-d input; the kernel splits rows of x [..., K]")
        K, M = x.shape[-1], math.prod(x.shape[:-1])
        if K > 1 and x.stride(-1) != 1:
            raise ValueError(f"{self.name}: the rows of x must be contiguous (last stride {x.stride(-1)})")
        try:
            sx = x.view(M, K).stride(0) if M > 1 else K
        except RuntimeError:
            raise ValueError(f"{self.name}: the rows of x {tuple(x.shape)} at strides {x.stride()} are not one "
                             f"strided run") from None
        return M, K, sx

    def fake(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs[0]
        return [x.new_empty(self._out_shape(math.prod(x.shape[:-1]), x.shape[-1]), dtype=torch.float32)]

    def _out_shape(self, M: int, K: int) -> tuple[int, ...]:
        return (3, M, K) if self.program.stacked else (M, 3 * K)

    def launch_spec(self, inputs: Sequence[torch.Tensor]) -> LaunchSpec:
        M, K, sx = self._rows(inputs[0])
        shape = self._out_shape(M, K)
        strides = (M * K, K, 1) if self.program.stacked else (3 * K, 1)
        row_stride, part_stride = (K, M * K) if self.program.stacked else (3 * K, K)
        blocks = max(1, min(MAX_BLOCKS, math.ceil(M * K / THREADS)))
        return LaunchSpec([shape], [strides], (M, K, sx, row_stride, part_stride), (blocks,), THREADS, M * K)


def tf32_split_kernel(program: Tf32SplitProgram, device: torch.device) -> Tf32SplitKernel:
    """The registered split kernel for ``program`` (the first one built for it), compiled."""
    return template_kernel(Tf32SplitKernel(program, device))


# -- fxopt::mm_tf32 ---------------------------------------------------------------------------------------------
# The TF32 switch is process-wide; the op sets it around its one GEMM and puts it back as it was. torch has two
# APIs for it (``allow_tf32`` and ``fp32_precision``) and raises when they disagree, so the op sets it through the
# call that keeps both in step and restores the new API's value too (torch 2.11 and 2.13: state after == before,
# whichever API the user set). Inside a CUDA graph capture cuBLAS reads it at capture: the replay runs what was
# captured.
_lib = torch.library.Library("fxopt", "FRAGMENT")
_lib.define("mm_tf32(Tensor x, Tensor w, Tensor? bias=None) -> Tensor")


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 3:  # the stacked parts: a batched GEMM (no bias: the tail adds it)
        return torch.bmm(x, w)
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)


def _mm_tf32_cuda(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    C = torch._C
    old, old_precision = C._get_cublas_allow_tf32(), C._get_fp32_precision_getter("cuda", "matmul")
    C._set_cublas_allow_tf32(True)
    try:
        return _gemm(x, w, bias)
    finally:
        C._set_cublas_allow_tf32(old)
        C._set_fp32_precision_setter("cuda", "matmul", old_precision)


def _mm_tf32_cpu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _gemm(x, w, bias)  # no TF32 on the CPU: the float32 product (the split's three terms, exactly summed)


_lib.impl("mm_tf32", _mm_tf32_cuda, "CUDA")
_lib.impl("mm_tf32", _mm_tf32_cpu, "CPU")


@torch.library.register_fake("fxopt::mm_tf32")
def _mm_tf32_fake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    torch._check(x.dim() == w.dim() and x.dim() in (2, 3) and x.shape[-1] == w.shape[-2]
                 and (x.dim() == 2 or (x.shape[0] == w.shape[0] and bias is None)),
                 lambda: f"fxopt::mm_tf32: x {tuple(x.shape)} @ w {tuple(w.shape)}")
    return x.new_empty((*x.shape[:-1], w.shape[-1]))


mm_tf32_op = torch.ops.fxopt.mm_tf32.default
