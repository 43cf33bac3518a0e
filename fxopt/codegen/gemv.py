"""Linear layers on a few rows (a decode step's projections) as a generated kernel: the source text.

``y = x @ W^T (+ bias)`` with ``x`` of ``M <= MAX_ROWS`` rows is a matrix-vector product: every weight element is
read once and used ``M`` times, so the kernel is bound by how fast the weight streams from memory. cuBLAS picks a
tensor-core GEMM tile for it (``nvjet_sm90_tst_64x8...``): 4.4 µs a call on average over the 12-layer decoder
preset's projections (bf16, 1.2 to 6.3 MB of weight; H100, reports/2026-12-06-h100-decode-5df2246), 20% of the
memory's bandwidth.

One warp per output column (a weight row), ``WARPS`` warps a block: each lane loads 16 bytes of the weight row per
step (the row is contiguous: a Linear's weight), and the matching 16 bytes of each input row (read by every warp:
L1/L2 hits), accumulates in float32, and the warp's shuffle sum gives the ``M`` outputs; lane 0 adds the bias and
stores them. Rows whose address or length does not allow 16-byte loads take a scalar loop. Source text only: the
kernel that plans and launches it is ``fxopt/runtime/gemv.py``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .printer import header_text, store
from .region import STORAGE_CTYPES

MAX_ROWS = 4
WARPS = 8
_FP_TYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class GemvProgram:
    """What one generated GEMV kernel computes: ``dtype`` for x, W, bias and y; ``bias``: whether it adds one."""

    backend: str  # "cuda" | "cpp"
    dtype: torch.dtype
    bias: bool
    device: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in _FP_TYPES or self.backend not in ("cuda", "cpp"):
            raise ValueError(f"gemv program: dtype {self.dtype}, backend {self.backend!r}")

    @property
    def name(self) -> str:
        text = f"{self.backend}|{self.dtype}|{self.bias}|{self.device if self.backend == 'cuda' else ''}"
        return f"fxopt_gemv_{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    @property
    def input_dtypes(self) -> tuple[torch.dtype, ...]:
        return (self.dtype,) * (3 if self.bias else 2)

    @property
    def output_dtypes(self) -> tuple[torch.dtype, ...]:
        return (self.dtype,)

    def to_json(self) -> dict:
        return {"backend": self.backend, "dtype": str(self.dtype), "bias": self.bias, "device": self.device}

    @staticmethod
    def from_json(data: dict) -> "GemvProgram":
        return GemvProgram(data["backend"], getattr(torch, data["dtype"].removeprefix("torch.")), bool(data["bias"]),
                           data.get("device", ""))


# Arguments, both targets: x, W[, bias], y; then M, N, K, x's row stride, W's row stride, y's row stride.

_COMMON = r"""
#define FXG_ROWS {max_rows}
typedef {ctype} fxg_t;
#define FXG_VEC {vec}  // elements in 16 bytes
"""

_CUDA = r"""
struct __align__(16) fxg_pack {{ fxg_t v[FXG_VEC]; }};
extern "C" __global__ void __launch_bounds__({threads}) {name}(
    const fxg_t* FX_RESTRICT x, const fxg_t* FX_RESTRICT w, {bias_param} fxg_t* FX_RESTRICT y,
    int64_t M, int64_t N, int64_t K, int64_t sx, int64_t sw, int64_t sy) {{
  FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]
  const int lane = threadIdx.x & 31;
  const int64_t n = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (n >= N) return;
  const fxg_t* wr = w + n * sw;
  float acc[FXG_ROWS];
#pragma unroll
  for (int m = 0; m < FXG_ROWS; ++m) acc[m] = 0.f;
  const bool vec = K % FXG_VEC == 0 && sx % FXG_VEC == 0 && sw % FXG_VEC == 0
      && (reinterpret_cast<unsigned long long>(x) & 15ull) == 0 && (reinterpret_cast<unsigned long long>(w) & 15ull) == 0;
  if (vec) {{
#pragma unroll 4
    for (int64_t k = (int64_t)lane * FXG_VEC; k < K; k += 32 * FXG_VEC) {{
      const fxg_pack wv = *reinterpret_cast<const fxg_pack*>(wr + k);
#pragma unroll
      for (int m = 0; m < FXG_ROWS; ++m) {{
        if (m < M) {{
          const fxg_pack xv = *reinterpret_cast<const fxg_pack*>(x + m * sx + k);
#pragma unroll
          for (int e = 0; e < FXG_VEC; ++e) acc[m] += fx_load(wv.v[e]) * fx_load(xv.v[e]);
        }}
      }}
    }}
  }} else {{
    for (int64_t k = lane; k < K; k += 32) {{
      const float wk = fx_load(wr[k]);
#pragma unroll
      for (int m = 0; m < FXG_ROWS; ++m)
        if (m < M) acc[m] += wk * fx_load(x[m * sx + k]);
    }}
  }}
#pragma unroll
  for (int m = 0; m < FXG_ROWS; ++m) {{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  }}
  if (lane == 0) {{
#pragma unroll
    for (int m = 0; m < FXG_ROWS; ++m)
      if (m < M) y[m * sy + n] = {store};
  }}
}}
"""

_CPP = r"""
extern "C" void {name}(char** data, const int64_t* a) {{
  const fxg_t* x = reinterpret_cast<const fxg_t*>(data[0]);
  const fxg_t* w = reinterpret_cast<const fxg_t*>(data[1]);
  {cpp_bias}
  fxg_t* y = reinterpret_cast<fxg_t*>(data[{out_index}]);
  const int64_t M = a[0], N = a[1], K = a[2], sx = a[3], sw = a[4], sy = a[5];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {{
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += fx_load(w[n * sw + k]) * fx_load(x[m * sx + k]);
      y[m * sy + n] = {store};
    }}
}}
"""


def _common(program: GemvProgram) -> str:
    return _COMMON.format(max_rows=MAX_ROWS, ctype=STORAGE_CTYPES[program.dtype],
                          vec=16 // torch.empty((), dtype=program.dtype).element_size())


def cuda_source(program: GemvProgram) -> str:
    """CUDA C++ for NVRTC: ``WARPS * 32`` threads a block, one warp per output column."""
    value = "acc[m] + fx_load(bias[n])" if program.bias else "acc[m]"
    return header_text() + _common(program) + _CUDA.format(
        name=program.name, threads=WARPS * 32, bias_param="const fxg_t* FX_RESTRICT bias," if program.bias else "",
        store=store(value, program.dtype))


def cpp_source(program: GemvProgram) -> str:
    value = "acc + fx_load(bias[n])" if program.bias else "acc"
    return header_text() + _common(program) + _CPP.format(
        name=program.name, cpp_bias="const fxg_t* bias = reinterpret_cast<const fxg_t*>(data[2]);"
        if program.bias else "", out_index=3 if program.bias else 2, store=store(value, program.dtype))
