"""The split of a float32 GEMM's input for 3xTF32 (NOTE [3xTF32 GEMMs], fxopt/passes/tf32x3.py): the source text.

Each row ``x`` of ``K`` floats becomes three parts, ``x_hi``, ``x_lo``, ``x_hi``: side by side (``[rows, 3K]``, one
GEMM of depth 3K) or stacked (``[3, rows, K]``, a batched GEMM whose three products the elementwise tail adds).
``x_hi`` is ``x`` with its 13 low
mantissa bits cleared (exact in TF32, which keeps 10 of float32's 23), ``x_lo = x - x_hi`` (exact in float32). A
non-finite ``x`` (inf, NaN) is its own ``x_hi`` and has ``x_lo = 0``, so it reaches the product as it would in
float32 (clearing bits of a NaN could make it an inf). One thread an element; the row stride of ``x`` is an
argument (rows of a view), and so are the output's row and part strides (dense either way). Source text only: the kernel that plans and launches it is
``fxopt/runtime/tf32.py``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .printer import header_text

THREADS = 256
MAX_BLOCKS = 4096  # a grid-stride loop beyond: enough blocks to fill any GPU

# Arguments, both targets: x, y; then M, K, x's row stride, y's row stride, y's part stride.

_CUDA = r"""
extern "C" __global__ void __launch_bounds__({threads}) {name}(
    const float* FX_RESTRICT x, float* FX_RESTRICT y, int64_t M, int64_t K, int64_t sx, int64_t sy, int64_t sp) {{
  FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]
  const int64_t n = M * K;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {{
    const int64_t r = i / K, c = i - r * K;
    const float v = x[r * sx + c];
    const bool finite = isfinite(v);
    const float hi = finite ? __uint_as_float(__float_as_uint(v) & 0xffffe000u) : v;
    float* out = y + r * sy + c;
    out[0] = hi;
    out[sp] = finite ? v - hi : 0.f;
    out[2 * sp] = hi;
  }}
}}
"""

_CPP = r"""
#include <cmath>
#include <cstring>
extern "C" void {name}(char** data, const int64_t* a) {{
  const float* x = reinterpret_cast<const float*>(data[0]);
  float* y = reinterpret_cast<float*>(data[1]);
  const int64_t M = a[0], K = a[1], sx = a[2], sy = a[3], sp = a[4];
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < K; ++c) {{
      const float v = x[r * sx + c];
      const bool finite = std::isfinite(v);
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      bits &= 0xffffe000u;
      float hi;
      std::memcpy(&hi, &bits, 4);
      if (!finite) hi = v;
      float* out = y + r * sy + c;
      out[0] = hi;
      out[sp] = finite ? v - hi : 0.f;
      out[2 * sp] = hi;
    }}
}}
"""


@dataclass(frozen=True)
class Tf32SplitProgram:
    """The split kernel for one backend ("cuda" or "cpp") and, on CUDA, one device; ``stacked``: the parts as
    ``[3, rows, K]`` instead of ``[rows, 3K]``."""

    backend: str
    device: str = ""
    stacked: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("cuda", "cpp"):
            raise ValueError(f"tf32 split program: backend {self.backend!r}")

    @property
    def name(self) -> str:
        text = f"{self.backend}|{self.device if self.backend == 'cuda' else ''}|{self.stacked}"
        return f"fxopt_tf32_split_{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    @property
    def input_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,)

    @property
    def output_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,)

    def to_json(self) -> dict:
        return {"backend": self.backend, "device": self.device, "stacked": self.stacked}

    @staticmethod
    def from_json(data: dict) -> "Tf32SplitProgram":
        return Tf32SplitProgram(data["backend"], data.get("device", ""), bool(data.get("stacked", False)))


def cuda_source(program: Tf32SplitProgram) -> str:
    """CUDA C++ for NVRTC: ``THREADS`` threads a block, one element a thread, grid-stride."""
    return header_text() + _CUDA.format(name=program.name, threads=THREADS)


def cpp_source(program: Tf32SplitProgram) -> str:
    return header_text() + _CPP.format(name=program.name)
