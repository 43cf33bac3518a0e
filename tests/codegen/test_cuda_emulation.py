"""The CUDA strided elementwise kernel run on the CPU: its CUDA C++ compiled as C++ with the thread indices as
globals, every thread of a small grid called in turn (the kernel has no barriers or shuffles, so that is exact),
with the arguments the CUDA path computes (``FusedKernel.strided_args``). The generic kernel and the one compiled for
the call's shape (NOTE [Kernels for one shape]) must agree bit for bit, and both with eager: 64-bit, 32-bit and
vector iteration, broadcast and permuted operands, misaligned pointers."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.codegen.printer import (cuda_source, cuda_strided_source, header_text, strided_int_params,
                                   strided_specialized_name)
from fxopt.runtime import cc
from fxopt.runtime.kernel import _THREADS, FusedKernel
from fxopt.verify import compare

pytestmark = pytest.mark.skipif(cc.compiler_info() is None, reason="no C++ compiler")

# The CUDA names the generated kernel uses, for a C++ compiler: one thread at a time.
SHIM = r"""
#include <cstdlib>
#define __global__
#define __launch_bounds__(n)
struct fx_dim3 { unsigned x, y, z; };
static fx_dim3 blockIdx = {0, 0, 0}, blockDim = {%(threads)d, 1, 1}, threadIdx = {0, 0, 0}, gridDim = {%(grid)d, 1, 1};
extern "C" void emu_set(unsigned b, unsigned t) { blockIdx.x = b; threadIdx.x = t; }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
#define FX_GRID_DEPENDENCY()
#define __trap() abort()
"""
GRID = 3


class BiasGelu(nn.Module):
    def forward(self, x, b):
        return F.gelu(x + b)


class ScaleResidual(nn.Module):
    def forward(self, x, g, r):
        return r + g * torch.sigmoid(x)


def _cases():
    f16 = torch.float16
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    cl = r(1, 24, 5, 6, dtype=f16).contiguous(memory_format=torch.channels_last)
    return {
        "vector_fp16": (BiasGelu(), [r(2, 5, 64, dtype=f16), r(64, dtype=f16)]),
        "odd_inner_fp32": (BiasGelu(), [r(3, 5, 37), r(37)]),
        "permuted_bf16": (ScaleResidual(), [r(1, 5, 6, 24, dtype=torch.bfloat16), r(24, dtype=torch.bfloat16),
                                            cl.to(torch.bfloat16).permute(0, 2, 3, 1)]),
        "misaligned_fp16": (BiasGelu(), [r(2 * 16 * 8 + 1, dtype=f16)[1:].view(2, 16, 8), r(8, dtype=f16)]),
        "column_broadcast": (ScaleResidual(), [r(4, 1, 9), r(4, 7, 1), r(4, 7, 9)]),
    }


def _kernel(model, inputs) -> FusedKernel:
    opt = fxopt.optimize(model, inputs, backend="cpp", disable=["fuse_reductions"])
    (kernel,) = [k for k in opt.kernels.values() if isinstance(k, FusedKernel)]
    return kernel


def _emulate(source: str, name: str, inputs, kernel: FusedKernel, args: tuple) -> list[torch.Tensor]:
    shape = torch.broadcast_shapes(*[t.shape for t in inputs])
    out_stride = kernel._eager_stride(inputs, shape)
    outs = [torch.full_like(torch.empty_strided(shape, out_stride, dtype=d), float("nan"))
            for d in kernel.output_dtypes]
    body = source[source.index("// sizes, their dividers"):]
    lib = cc.compile_cpp(header_text() + SHIM % {"threads": _THREADS, "grid": GRID} + body, name_hint="emu_" + name)
    fn = getattr(lib, name)
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in list(inputs) + outs]
    values = [ctypes.c_int64(v) for v in args]
    for b in range(GRID):
        for t in range(_THREADS):
            lib.emu_set(b, t)
            fn(*ptrs, *values)
    return outs


@pytest.mark.parametrize("case", sorted(_cases()))
def test_specialized_strided_kernel_emulated_matches_the_generic_one_and_eager(case):
    model, inputs = _cases()[case]
    kernel = _kernel(model, inputs)
    region = kernel.region
    shape = torch.broadcast_shapes(*[t.shape for t in inputs])
    extra, _ = kernel.strided_args(inputs, shape, kernel._eager_stride(inputs, shape), cuda=True)
    args = (shape.numel(), *extra)
    constants = dict(zip(strided_int_params(region), args, strict=True))
    generic = _emulate(cuda_source(region, kernel.modes), f"{region.name}_strided", inputs, kernel, args)
    special = _emulate(cuda_strided_source(region, constants, _THREADS),
                       strided_specialized_name(region, constants, _THREADS), inputs, kernel, args)
    for g, s in zip(generic, special):
        assert torch.equal(g.view(torch.uint8) if g.dtype != torch.float32 else g.view(torch.int32),
                           s.view(torch.uint8) if s.dtype != torch.float32 else s.view(torch.int32))
    with torch.no_grad():
        expected = model(*inputs)
    assert compare(special[0] if len(special) == 1 else special, expected) is None


def test_the_cases_cover_every_kind_of_iteration():
    index32 = set()
    for model, inputs in _cases().values():
        kernel = _kernel(model, inputs)
        shape = torch.broadcast_shapes(*[t.shape for t in inputs])
        extra, _ = kernel.strided_args(inputs, shape, kernel._eager_stride(inputs, shape), cuda=True)
        index32.add(extra[0])
    assert index32 >= {1, 2}  # 32-bit scalar and vector; 64-bit needs 2^31 elements (the generic test below)


def test_64_bit_iteration_emulated():
    # index32 forced to 0: the 64-bit loop, the same arithmetic
    model, inputs = _cases()["odd_inner_fp32"]
    kernel = _kernel(model, inputs)
    shape = torch.broadcast_shapes(*[t.shape for t in inputs])
    extra, _ = kernel.strided_args(inputs, shape, kernel._eager_stride(inputs, shape), cuda=True)
    rank = kernel.region.ndim
    args = (shape.numel(), 0, *extra[1:1 + rank], *([0] * rank), *extra[1 + 2 * rank:])
    constants = dict(zip(strided_int_params(kernel.region), args, strict=True))
    special = _emulate(cuda_strided_source(kernel.region, constants, _THREADS),
                       strided_specialized_name(kernel.region, constants, _THREADS), inputs, kernel, args)
    with torch.no_grad():
        assert compare(special[0], model(*inputs)) is None
