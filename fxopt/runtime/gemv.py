"""The GEMV kernel behind ``fxopt::fused``: plans and launches what ``fxopt/codegen/gemv.py`` printed (its docstring
describes the kernel; the pass is ``fxopt/passes/gemv.py``)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..codegen import gemv as codegen
from ..codegen.gemv import MAX_ROWS, WARPS, GemvProgram
from .strides import contiguous_strides
from .template import LaunchSpec, TemplateKernel, template_kernel


class GemvKernel(TemplateKernel):
    """``y = x @ W^T (+ bias)`` for ``x`` [..., K] of at most ``MAX_ROWS`` rows and ``W`` [N, K] with contiguous
    rows: inputs ``(x, W[, bias])``, output ``[..., N]`` contiguous (F.linear's)."""

    op_names = ["linear"]

    def cuda_source(self) -> str:
        return codegen.cuda_source(self.program)

    def cpp_source(self) -> str:
        return codegen.cpp_source(self.program)

    def _shape(self, shapes: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], int, int, int]:
        x, w = tuple(shapes[0]), tuple(shapes[1])
        if len(x) < 1 or len(w) != 2 or x[-1] != w[1]:
            raise ValueError(f"{self.name}: x {x} and weight {w}; the kernel computes x [..., K] @ W[N, K]^T")
        if self.program.bias and tuple(shapes[2]) != (w[0],):
            raise ValueError(f"{self.name}: bias of shape {tuple(shapes[2])} for {w[0]} outputs")
        M = math.prod(x[:-1])
        if M > MAX_ROWS:
            raise ValueError(f"{self.name}: {M} rows; the kernel takes at most {MAX_ROWS}")
        return x[:-1] + (w[0],), M, w[0], w[1]

    def fake(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        shape, *_ = self._shape([t.shape for t in inputs])
        return [inputs[0].new_empty(shape, dtype=self.output_dtypes[0])]

    def launch_spec(self, inputs: Sequence[torch.Tensor]) -> LaunchSpec:
        shape, M, N, K = self._shape([t.shape for t in inputs])
        x, w = inputs[0], inputs[1]
        if K > 1 and (x.stride(-1) != 1 or w.stride(1) != 1):
            raise ValueError(f"{self.name}: rows of x (stride {x.stride(-1)}) and of the weight (stride "
                             f"{w.stride(1)}) must be contiguous")
        try:
            sx = x.view(M, K).stride(0) if M > 1 else K
        except RuntimeError:
            raise ValueError(f"{self.name}: the rows of x {tuple(x.shape)} at strides {x.stride()} are not one "
                             f"strided run") from None
        if N > 1 and w.stride(0) < K:
            raise ValueError(f"{self.name}: weight rows overlap (stride {w.stride(0)} for {K} elements)")
        return LaunchSpec([shape], [contiguous_strides(shape)], (M, N, K, sx, w.stride(0) if N > 1 else K, N),
                          (max(1, math.ceil(N / WARPS)),), WARPS * 32, M * N)


def gemv_kernel(program: GemvProgram, device: torch.device) -> GemvKernel:
    """The registered kernel for ``program`` (the first one built for it), compiled."""
    return template_kernel(GemvKernel(program, device))
