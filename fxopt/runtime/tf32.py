"""3xTF32 GEMMs at run time (NOTE [3xTF32 GEMMs], fxopt/passes/tf32x3.py): ``fxopt::mm_tf32``, a GEMM (batched for
3-D operands) that cuBLAS may run on TF32 tensor cores whatever the process's TF32 setting. The split of its input
is elementwise (``fxopt::tf32_hi``, ``fxopt::tf32_lo`` in the op table, fxopt/ops/elementwise.py)."""

from __future__ import annotations

import torch

# -- fxopt::mm_tf32 ---------------------------------------------------------------------------------------------
# The TF32 switch is process-wide; the op sets it around its one GEMM and puts it back as it was. torch has two
# APIs for it (``allow_tf32`` and ``fp32_precision``) and raises when they disagree, so the op sets it through the
# call that keeps both in step and restores the new API's value too: the state after is the state before, whichever
# API the user set it with (tests/passes/test_tf32x3.py). Inside a CUDA graph capture cuBLAS reads it at capture:
# the replay runs what was captured.
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
