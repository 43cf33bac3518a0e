"""Depthwise 2-D convolutions (one input channel per group, one output channel per input channel) as a generated
kernel: the program and its source text.

cuDNN runs a depthwise convolution as a general grouped one: ConvNeXt-T's 7x7 depthwise convolution at 96 channels
x 56x56 in float32 took 4.9 µs a call on an H100 (``conv2d_c1_k1_nhwc``, 18 calls, 88 of the model's 1058 µs of GPU
time; reports/2026-12-06-h100-s6-de87d03), where reading its 1.2 MB input and writing its output is about 1 µs.
NOTE [Depthwise convolutions]: one thread computes ``FXD_TW`` neighbouring output columns of one output row for
``VC`` channels (four in NHWC, one in NCHW). Per kernel row it loads the input row segment those
columns read once into registers (``(TW - 1) * stride + (KW - 1) * dilation + 1`` pixels: 10 for TW 4 of a 7-wide
kernel, against 28 for one column at a time) and the kernel row's weights once for all TW columns; arithmetic is
float32 whatever the storage type. Padding is read as zeros. Consecutive threads take consecutive channels (NHWC) or
columns (NCHW), so the loads of a warp are contiguous. NHWC needs the channel count to be a multiple of four and
the pointers aligned for vector loads; the kernel checks that itself and otherwise walks one channel a thread.

Weights as the kernel reads them: float32 whatever the storage type (a BatchNorm after the convolution folds into
them without a 16-bit rounding: NOTE [Depthwise epilogues]), NHWC ``[KH, KW, C]`` contiguous (the channels one
thread loads are contiguous), NCHW ``[C, KH, KW]`` (the module's ``[C, 1, KH, KW]``); the bias float32 too. The pass
stores the permuted copy.

The C++ twin (CPU) computes the same sums in loops: CPU tests check it against eager, the CUDA kernel is emulated on
the CPU (tests/codegen/test_depthwise_emulation.py), and NVRTC compiles the CUDA source in CI. Source text only:
``fxopt/runtime/depthwise.py`` plans and launches it; the pass is ``fxopt/passes/depthwise.py``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..ops.elementwise import ELEMENTWISE_OPS
from .printer import header_text, store
from .region import STORAGE_CTYPES

THREADS = 128
LAYOUTS = ("nchw", "nhwc")
# NOTE [Depthwise epilogues]: a unary op of the op table after a depthwise convolution (EfficientNet's SiLU,
# MobileNet's ReLU and hardswish, any activation), written as the table writes it, is applied to each output before
# the store: one kernel and one pass over the output less. Arithmetic in float32, one rounding at the store (eager
# rounds the convolution's output before the activation too: the fused value is at least as close to the float32
# result). Before it, a per-channel affine: a constant added (fuse_epilogues' moved bias), or a 16-bit BatchNorm
# left unfolded (NOTE [16-bit folds]), ``x.float() * scale + shift``, whose scale the pass multiplies into the
# float32 weights and whose shift becomes the float32 bias: no rounding of ``w * scale`` to 16 bits, and no kernel
# for the affine.
MAX_KERNEL = 15  # kernel height and width up to this (registers: the row segment a thread holds)
# NOTE [Depthwise + LayerNorm]: ConvNeXt's block runs its depthwise convolution, then a LayerNorm over the channels
# of each pixel (the output permuted to NHWC order): cuDNN's kernel, then a row kernel that reads the convolution's
# output back (18 pairs in ConvNeXt-T). In NHWC a pixel's channels are contiguous, so one kernel can do both: a
# *segment* of ``ceil(C / (32 VC))`` warps computes ``TW`` neighbouring output pixels for all C channels (VC channels
# a lane, 1, 2 or 4: fewer lanes for wide maps, more warps for the small late-stage maps; the lanes past C / VC
# idle), sums each pixel's values over the segment (warp shuffles, then one shared-memory slot a warp), subtracts
# the mean, sums the squares the same way, and stores ``(v - mean) * rstd * gamma + beta``.
# Everything float32 from the loaded input to the store (eager rounds the convolution's output to the storage type
# before its LayerNorm: the fused value is at least as close to the float32 result). Built for one channel count
# (a multiple of VC, at most 1024 lanes); NHWC only.
MAX_NORM_CHANNELS = 4096  # a segment of at most 32 warps (1024 threads)
SEGMENT_THREADS = 128  # a block holds this many threads' worth of segments (at least one segment)


def epilogue_op(name: str) -> bool:
    """Whether the op table's ``name`` can run in the kernel's epilogue: one operand, computed in the output's type,
    reading its operand at the element's own index."""
    op = ELEMENTWISE_OPS.get(name)
    return op is not None and op.arity == 1 and op.compute == "out" and not op.gathers


_FP_TYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DepthwiseProgram:
    """What one generated depthwise convolution computes: ``kernel`` (KH, KW), ``stride``, ``padding``,
    ``dilation`` (pairs), ``bias``: whether it adds one, ``layout``: the input's and output's memory order ("nchw"
    or "nhwc", both dense), ``cols``: output columns per thread (TW)."""

    backend: str  # "cuda" | "cpp"
    dtype: torch.dtype
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = False
    layout: str = "nchw"
    cols: int = 4
    device: str = ""
    activation: str = ""  # a unary op of the op table applied to each output (NOTE [Depthwise epilogues]), or none
    activation_attrs: tuple[tuple[str, float], ...] = ()  # its attributes, (name, value) pairs
    norm_channels: int = 0  # a LayerNorm over this many channels after the convolution (NOTE [Depthwise + LayerNorm])
    norm_eps: float = 0.0  # its epsilon
    lane_channels: int = 4  # with the LayerNorm: channels a lane (1, 2 or 4; the launch's warps follow)

    def __post_init__(self) -> None:
        if self.dtype not in _FP_TYPES or self.backend not in ("cuda", "cpp") or self.layout not in LAYOUTS:
            raise ValueError(f"depthwise program: dtype {self.dtype}, backend {self.backend!r}, layout "
                             f"{self.layout!r}")
        pairs = (self.kernel, self.stride, self.padding, self.dilation)
        if any(len(p) != 2 or not all(isinstance(v, int) for v in p) for p in pairs):
            raise ValueError(f"depthwise program: kernel {self.kernel}, stride {self.stride}, padding "
                             f"{self.padding}, dilation {self.dilation} must be pairs of ints")
        if self.activation and (not epilogue_op(self.activation) or {k for k, _ in self.activation_attrs}
                                != set(ELEMENTWISE_OPS[self.activation].attrs)):
            raise ValueError(f"depthwise program: activation {self.activation!r} with {self.activation_attrs} (a "
                             "unary op of the op table, with its attributes)")
        if not all(1 <= k <= MAX_KERNEL for k in self.kernel) or min(self.stride + self.dilation) < 1 \
                or min(self.padding) < 0 or not 1 <= self.cols <= 8:
            raise ValueError(f"depthwise program: kernel {self.kernel} (1 to {MAX_KERNEL}), stride {self.stride}, "
                             f"dilation {self.dilation} (>= 1), padding {self.padding} (>= 0), {self.cols} columns "
                             "a thread (1 to 8)")
        if self.norm_channels and not (self.layout == "nhwc" and self.bias and not self.activation
                                       and self.lane_channels in (1, 2, 4)
                                       and self.norm_channels % self.lane_channels == 0
                                       and self.norm_channels <= 1024 * self.lane_channels
                                       and 0 <= self.norm_eps < float("inf")):
            raise ValueError(f"depthwise program: a LayerNorm over {self.norm_channels} channels (eps "
                             f"{self.norm_eps}, {self.lane_channels} a lane) needs the NHWC layout, a bias, no "
                             "activation, 1, 2 or 4 channels a lane, a channel count they divide, and at most 1024 "
                             f"lanes ({MAX_NORM_CHANNELS} channels at 4 a lane)")

    @property
    def segment_warps(self) -> int:
        """NOTE [Depthwise + LayerNorm]: the warps that compute one pixel's channels (``lane_channels`` a lane)."""
        return -(-self.norm_channels // (32 * self.lane_channels))

    @property
    def segments(self) -> int:
        """Segments (each ``cols`` pixels of one output row, all channels) a block."""
        return max(1, SEGMENT_THREADS // (32 * self.segment_warps))

    @property
    def name(self) -> str:
        text = (f"{self.backend}|{self.dtype}|{self.kernel}|{self.stride}|{self.padding}|{self.dilation}|"
                f"{self.bias}|{self.layout}|{self.cols}|{self.device if self.backend == 'cuda' else ''}"
                + (f"|{self.activation}{self.activation_attrs}" if self.activation else "")
                + (f"|norm{self.norm_channels}|{self.norm_eps!r}|{self.lane_channels}" if self.norm_channels else ""))
        return f"fxopt_depthwise_{hashlib.sha256(text.encode()).hexdigest()[:8]}"

    @property
    def input_dtypes(self) -> tuple[torch.dtype, ...]:
        # x, then float32 weight and bias, and a LayerNorm's float32 weight and bias
        return (self.dtype,) + (torch.float32,) * ((2 if self.bias else 1) + (2 if self.norm_channels else 0))

    @property
    def output_dtypes(self) -> tuple[torch.dtype, ...]:
        return (self.dtype,)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Output height and width for an input of ``h`` x ``w`` (F.conv2d's)."""
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                     zip((h, w), self.padding, self.dilation, self.kernel, self.stride))

    def to_json(self) -> dict:
        return {"backend": self.backend, "dtype": str(self.dtype), "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "bias": self.bias, "layout": self.layout, "cols": self.cols, "device": self.device,
                "activation": self.activation, "activation_attrs": [list(a) for a in self.activation_attrs],
                "norm_channels": self.norm_channels, "norm_eps": self.norm_eps, "lane_channels": self.lane_channels}

    @staticmethod
    def from_json(data: dict) -> "DepthwiseProgram":
        return DepthwiseProgram(data["backend"], getattr(torch, data["dtype"].removeprefix("torch.")),
                                tuple(data["kernel"]), tuple(data["stride"]), tuple(data["padding"]),
                                tuple(data["dilation"]), bool(data["bias"]), data["layout"], int(data["cols"]),
                                data.get("device", ""), data.get("activation", ""),
                                tuple((str(k), float(v)) for k, v in data.get("activation_attrs", ())),
                                int(data.get("norm_channels", 0)), float(data.get("norm_eps", 0.0)),
                                int(data.get("lane_channels", 4)))


# Arguments, both targets: x, w[, bias], out; then N, C, H, W, OH, OW.

_COMMON = r"""
// the depthwise program (everything above is the shared header)
typedef {ctype} fxd_t;
#define FXD_KH {kh}
#define FXD_KW {kw}
#define FXD_SH {sh}
#define FXD_SW {sw}
#define FXD_PH {ph}
#define FXD_PW {pw}
#define FXD_DH {dh}
#define FXD_DW {dw}
#define FXD_TW {cols}
#define FXD_J ((FXD_TW - 1) * FXD_SW + (FXD_KW - 1) * FXD_DW + 1)  // input columns a thread's TW outputs read
#define FXD_ACT(v) {activation}
#define FXD_STORE(v) {store}
"""

_CUDA_HELPERS = r"""
// NHWC: four channels a thread in every dtype (16 bytes of float32, 8 of a 16-bit type). Eight 16-bit channels
// (16 bytes) took 96-247 registers against float32's 60-140 (ptxas, sm_90, 7x7, 1-8 columns) and half the threads:
// 15.2 µs against float32's 7.7 for ConvNeXt's 96 x 56 x 56 (H100, reports/2026-12-07-h100-s15-4587b1d).
#define FXD_V 4
// VC neighbouring channels, loaded or stored in one access where the address allows it (VEC)
template <int VC> struct __align__(VC * sizeof(fxd_t)) fxd_vec {{ fxd_t v[VC]; }};
template <int VC, bool VEC> FX_INLINE void fxd_load(float (&dst)[VC], const fxd_t* src) {{
  if (VEC) {{
    const fxd_vec<VC> p = *reinterpret_cast<const fxd_vec<VC>*>(src);
#pragma unroll
    for (int v = 0; v < VC; ++v) dst[v] = fx_load(p.v[v]);
  }} else {{
#pragma unroll
    for (int v = 0; v < VC; ++v) dst[v] = fx_load(src[v]);
  }}
}}
// the float32 weights and bias: one 16-byte load for the vector width's four channels
template <int VC> FX_INLINE void fxd_loadf(float (&dst)[VC], const float* src) {{
  if (VC == FXD_V) {{
    const float4 q = *reinterpret_cast<const float4*>(src);
    dst[0] = q.x; dst[1 % VC] = q.y; dst[2 % VC] = q.z; dst[3 % VC] = q.w;  // % VC: compiled for VC 1 too
  }} else {{
#pragma unroll
    for (int v = 0; v < VC; ++v) dst[v] = src[v];
  }}
}}
// NHWC, C channels a pixel: acc[t][v] += the products of output column ow0 + t of row oh, channel c0 + v, for
// t < TW and v < VC; each kernel row's input segment is loaded once for all TW columns
template <int VC, bool VEC> FX_INLINE void fxd_window_nhwc(float (&acc)[FXD_TW][VC], const fxd_t* FX_RESTRICT x,
                                                           const float* FX_RESTRICT w, int64_t n, int64_t oh,
                                                           int64_t ow0, int64_t c0, int64_t C, int64_t H,
                                                           int64_t W) {{
#pragma unroll
  for (int kh = 0; kh < FXD_KH; ++kh) {{
    const int64_t ih = oh * FXD_SH - FXD_PH + kh * FXD_DH;
    if (ih < 0 || ih >= H) continue;
    const fxd_t* xrow = x + (n * H + ih) * W * C + c0;
    float xr[FXD_J][VC];
#pragma unroll
    for (int j = 0; j < FXD_J; ++j) {{
      const int64_t iw = ow0 * FXD_SW - FXD_PW + j;
      if (iw >= 0 && iw < W) {{
        fxd_load<VC, VEC>(xr[j], xrow + iw * C);
      }} else {{
#pragma unroll
        for (int v = 0; v < VC; ++v) xr[j][v] = 0.f;
      }}
    }}
#pragma unroll
    for (int kw = 0; kw < FXD_KW; ++kw) {{
      float wv[VC];
      fxd_loadf<VC>(wv, w + (kh * FXD_KW + kw) * C + c0);
#pragma unroll
      for (int t = 0; t < FXD_TW; ++t)
#pragma unroll
        for (int v = 0; v < VC; ++v) acc[t][v] += xr[t * FXD_SW + kw * FXD_DW][v] * wv[v];
    }}
  }}
}}
"""

_CUDA = r"""// NHWC: work item idx = ((n * OH + oh) * ceil(OW / TW) + column group) * (C / VC) + channel group
template <int VC> FX_INLINE void fxd_nhwc(const fxd_t* FX_RESTRICT x, const float* FX_RESTRICT w,
                                          const float* FX_RESTRICT bias, fxd_t* FX_RESTRICT out, int64_t idx,
                                          int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW) {{
  const int64_t CG = C / VC, OWG = (OW + FXD_TW - 1) / FXD_TW;
  const int64_t c0 = idx % CG * VC;
  int64_t rest = idx / CG;
  const int64_t ow0 = rest % OWG * FXD_TW;
  rest /= OWG;
  const int64_t oh = rest % OH, n = rest / OH;
  float acc[FXD_TW][VC];
  float b0[VC];
#pragma unroll
  for (int v = 0; v < VC; ++v) b0[v] = 0.f;
  if (bias) fxd_loadf<VC>(b0, bias + c0);
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t)
#pragma unroll
    for (int v = 0; v < VC; ++v) acc[t][v] = b0[v];
  fxd_window_nhwc<VC, VC == FXD_V>(acc, x, w, n, oh, ow0, c0, C, H, W);
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t) {{
    const int64_t ow = ow0 + t;
    if (ow >= OW) break;
    fxd_t* dst = out + ((n * OH + oh) * OW + ow) * C + c0;
    if (VC == FXD_V) {{
      fxd_vec<VC> p;
#pragma unroll
      for (int v = 0; v < VC; ++v) p.v[v] = FXD_STORE(FXD_ACT(acc[t][v]));
      *reinterpret_cast<fxd_vec<VC>*>(dst) = p;
    }} else {{
#pragma unroll
      for (int v = 0; v < VC; ++v) dst[v] = FXD_STORE(FXD_ACT(acc[t][v]));
    }}
  }}
}}
// NCHW: work item idx = ((n * C + c) * OH + oh) * ceil(OW / TW) + column group
FX_INLINE void fxd_nchw(const fxd_t* FX_RESTRICT x, const float* FX_RESTRICT w, const float* FX_RESTRICT bias,
                        fxd_t* FX_RESTRICT out, int64_t idx, int64_t C, int64_t H, int64_t W, int64_t OH,
                        int64_t OW) {{
  const int64_t OWG = (OW + FXD_TW - 1) / FXD_TW;
  const int64_t ow0 = idx % OWG * FXD_TW;
  int64_t rest = idx / OWG;
  const int64_t oh = rest % OH;
  rest /= OH;
  const int64_t c = rest % C, n = rest / C;
  const float b0 = bias ? bias[c] : 0.f;
  float acc[FXD_TW];
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t) acc[t] = b0;
#pragma unroll
  for (int kh = 0; kh < FXD_KH; ++kh) {{
    const int64_t ih = oh * FXD_SH - FXD_PH + kh * FXD_DH;
    if (ih < 0 || ih >= H) continue;
    const fxd_t* xrow = x + ((n * C + c) * H + ih) * W;
    float xr[FXD_J];
#pragma unroll
    for (int j = 0; j < FXD_J; ++j) {{
      const int64_t iw = ow0 * FXD_SW - FXD_PW + j;
      xr[j] = iw >= 0 && iw < W ? fx_load(xrow[iw]) : 0.f;
    }}
#pragma unroll
    for (int kw = 0; kw < FXD_KW; ++kw) {{
      const float wv = w[(c * FXD_KH + kh) * FXD_KW + kw];
#pragma unroll
      for (int t = 0; t < FXD_TW; ++t) acc[t] += xr[t * FXD_SW + kw * FXD_DW] * wv;
    }}
  }}
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t) {{
    const int64_t ow = ow0 + t;
    if (ow >= OW) break;
    out[((n * C + c) * OH + oh) * OW + ow] = FXD_STORE(FXD_ACT(acc[t]));
  }}
}}
extern "C" __global__ void __launch_bounds__({threads}) {name}(
    const fxd_t* FX_RESTRICT x, const float* FX_RESTRICT w, {bias_param} fxd_t* FX_RESTRICT out, int64_t N,
    int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW) {{
  FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]
  const float* b = {bias_value};
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t columns = N * OH * ((OW + FXD_TW - 1) / FXD_TW);
{body}
}}
"""

_CUDA_NORM = r"""
// NOTE [Depthwise + LayerNorm] (codegen/depthwise.py): a segment of FXL_SEGW warps computes FXD_TW pixels of one
// output row for all FXL_C channels, FXL_VC a lane; FXL_SEGS segments a block.
#define FXL_C {channels}
#define FXL_VC {lane_channels}
#define FXL_CG (FXL_C / FXL_VC)
#define FXL_SEGW {segment_warps}
#define FXL_SEGS {segments}
#define FXL_EPS {eps}
// s[t] summed over the segment's lanes, in every lane of the segment (every thread of the block calls it: barriers)
FX_INLINE void fxl_segment_sum(float (&s)[FXD_TW], float (*red)[FXD_TW], int warp, int lane, int seg) {{
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s[t] += __shfl_xor_sync(0xffffffffu, s[t], o);
  if (lane == 0)
#pragma unroll
    for (int t = 0; t < FXD_TW; ++t) red[warp][t] = s[t];
  __syncthreads();
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t) {{
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < FXL_SEGW; ++k) total += red[seg * FXL_SEGW + k][t];
    s[t] = total;
  }}
  __syncthreads();  // red is written again by the next sum
}}
// segment item = (n * OH + oh) * ceil(OW / TW) + column group
template <bool VEC> FX_INLINE void fxl_block(const fxd_t* FX_RESTRICT x, const float* FX_RESTRICT w,
                                             const float* FX_RESTRICT bias, const float* FX_RESTRICT gamma,
                                             const float* FX_RESTRICT beta, fxd_t* FX_RESTRICT out, int64_t N,
                                             int64_t H, int64_t W, int64_t OH, int64_t OW,
                                             float (*red)[FXD_TW]) {{
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, seg = warp / FXL_SEGW;
  const int cg = (warp % FXL_SEGW) * 32 + lane;  // this lane's channels: FXL_VC * cg ...
  const int64_t OWG = (OW + FXD_TW - 1) / FXD_TW;
  const int64_t item = (int64_t)blockIdx.x * FXL_SEGS + seg;
  const bool live = item < N * OH * OWG && cg < FXL_CG;
  const int64_t c0 = FXL_VC * (int64_t)cg, ow0 = item % OWG * FXD_TW, oh = item / OWG % OH, n = item / OWG / OH;
  float acc[FXD_TW][FXL_VC];
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t)
#pragma unroll
    for (int v = 0; v < FXL_VC; ++v) acc[t][v] = 0.f;
  if (live) {{
    float b0[FXL_VC];
    fxd_loadf<FXL_VC>(b0, bias + c0);
#pragma unroll
    for (int t = 0; t < FXD_TW; ++t)
#pragma unroll
      for (int v = 0; v < FXL_VC; ++v) acc[t][v] = b0[v];
    fxd_window_nhwc<FXL_VC, VEC>(acc, x, w, n, oh, ow0, c0, FXL_C, H, W);
  }}
  float s[FXD_TW];  // the mean, then the variance (two passes over the registers: no cancellation)
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t) {{
    s[t] = 0.f;
#pragma unroll
    for (int v = 0; v < FXL_VC; ++v) s[t] += acc[t][v];
  }}
  fxl_segment_sum(s, red, warp, lane, seg);
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t) {{
    const float mean = s[t] / (float)FXL_C;
    float q = 0.f;
#pragma unroll
    for (int v = 0; v < FXL_VC; ++v) {{
      acc[t][v] -= mean;
      q += acc[t][v] * acc[t][v];
    }}
    s[t] = live ? q : 0.f;
  }}
  fxl_segment_sum(s, red, warp, lane, seg);
  if (!live) return;  // after the last barrier
  float g[FXL_VC], b[FXL_VC];
  fxd_loadf<FXL_VC>(g, gamma + c0);
  fxd_loadf<FXL_VC>(b, beta + c0);
#pragma unroll
  for (int t = 0; t < FXD_TW; ++t) {{
    const int64_t ow = ow0 + t;
    if (ow >= OW) break;
    const float rstd = fx_rsqrt(s[t] / (float)FXL_C + FXL_EPS);
    fxd_t* dst = out + ((n * OH + oh) * OW + ow) * FXL_C + c0;
    fxd_vec<FXL_VC> p;
#pragma unroll
    for (int v = 0; v < FXL_VC; ++v) p.v[v] = FXD_STORE(acc[t][v] * rstd * g[v] + b[v]);
    if (VEC) {{
      *reinterpret_cast<fxd_vec<FXL_VC>*>(dst) = p;
    }} else {{
#pragma unroll
      for (int v = 0; v < FXL_VC; ++v) dst[v] = p.v[v];
    }}
  }}
}}
extern "C" __global__ void __launch_bounds__(FXL_SEGS * FXL_SEGW * 32) {name}(
    const fxd_t* FX_RESTRICT x, const float* FX_RESTRICT w, const float* FX_RESTRICT bias,
    const float* FX_RESTRICT gamma, const float* FX_RESTRICT beta, fxd_t* FX_RESTRICT out, int64_t N, int64_t C,
    int64_t H, int64_t W, int64_t OH, int64_t OW) {{
  FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]
  __shared__ float fxl_red[FXL_SEGS * FXL_SEGW][FXD_TW];
  const unsigned long long addresses = reinterpret_cast<unsigned long long>(x)
      | reinterpret_cast<unsigned long long>(out);
  if ((addresses & (FXL_VC * sizeof(fxd_t) - 1)) == 0) {{
    fxl_block<true>(x, w, bias, gamma, beta, out, N, H, W, OH, OW, fxl_red);
  }} else {{
    fxl_block<false>(x, w, bias, gamma, beta, out, N, H, W, OH, OW, fxl_red);
  }}
}}
"""

_BODY_NHWC = r"""  const unsigned long long addresses = reinterpret_cast<unsigned long long>(x)
      | reinterpret_cast<unsigned long long>(w) | reinterpret_cast<unsigned long long>(out)
      | reinterpret_cast<unsigned long long>(b);
  if (C % FXD_V == 0 && (addresses & 15ull) == 0) {
    if (idx < columns * (C / FXD_V)) fxd_nhwc<FXD_V>(x, w, b, out, idx, C, H, W, OH, OW);
  } else if (idx < columns * C) {
    fxd_nhwc<1>(x, w, b, out, idx, C, H, W, OH, OW);
  }"""
_BODY_NCHW = r"""  if (idx < columns * C) fxd_nchw(x, w, b, out, idx, C, H, W, OH, OW);"""

# the C++ twins' one output element: acc plus the window's products, in the CUDA kernel's order
_CPP_AT = r"""
static inline float fxd_at(const fxd_t* x, const float* w, float acc, int64_t n, int64_t c, int64_t oh, int64_t ow,
                           int64_t C, int64_t H, int64_t W) {{
  for (int kh = 0; kh < FXD_KH; ++kh) {{
    const int64_t ih = oh * FXD_SH - FXD_PH + kh * FXD_DH;
    if (ih < 0 || ih >= H) continue;
    for (int kw = 0; kw < FXD_KW; ++kw) {{
      const int64_t iw = ow * FXD_SW - FXD_PW + kw * FXD_DW;
      if (iw < 0 || iw >= W) continue;
      acc += fx_load(x[{x_index}]) * w[{w_index}];
    }}
  }}
  return acc;
}}
"""
_CPP = r"""
extern "C" void {name}(char** data, const int64_t* a) {{
  const fxd_t* x = reinterpret_cast<const fxd_t*>(data[0]);
  const float* w = reinterpret_cast<const float*>(data[1]);
  const float* bias = {cpp_bias};
  fxd_t* out = reinterpret_cast<fxd_t*>(data[{out_index}]);
  const int64_t N = a[0], C = a[1], H = a[2], W = a[3], OH = a[4], OW = a[5];
  for (int64_t n = 0; n < N; ++n)
  for (int64_t c = 0; c < C; ++c)
  for (int64_t oh = 0; oh < OH; ++oh)
  for (int64_t ow = 0; ow < OW; ++ow)
    out[{out_pos}] = FXD_STORE(FXD_ACT(fxd_at(x, w, bias ? bias[c] : 0.f, n, c, oh, ow, C, H, W)));
}}
"""
_CPP_NORM = r"""
#include <vector>
// NOTE [Depthwise + LayerNorm]: each pixel's channels convolved into a float32 row, then normalized (two passes)
extern "C" void {name}(char** data, const int64_t* a) {{
  const fxd_t* x = reinterpret_cast<const fxd_t*>(data[0]);
  const float* w = reinterpret_cast<const float*>(data[1]);
  const float* bias = reinterpret_cast<const float*>(data[2]);
  const float* gamma = reinterpret_cast<const float*>(data[3]);
  const float* beta = reinterpret_cast<const float*>(data[4]);
  fxd_t* out = reinterpret_cast<fxd_t*>(data[5]);
  const int64_t N = a[0], C = a[1], H = a[2], W = a[3], OH = a[4], OW = a[5];
  std::vector<float> row(C);
  for (int64_t n = 0; n < N; ++n)
  for (int64_t oh = 0; oh < OH; ++oh)
  for (int64_t ow = 0; ow < OW; ++ow) {{
    float sum = 0.f;
    for (int64_t c = 0; c < C; ++c) {{
      row[c] = fxd_at(x, w, bias[c], n, c, oh, ow, C, H, W);
      sum += row[c];
    }}
    const float mean = sum / (float)C;
    float q = 0.f;
    for (int64_t c = 0; c < C; ++c) {{
      row[c] -= mean;
      q += row[c] * row[c];
    }}
    const float rstd = fx_rsqrt(q / (float)C + {eps});
    for (int64_t c = 0; c < C; ++c)
      out[((n * OH + oh) * OW + ow) * C + c] = FXD_STORE(row[c] * rstd * gamma[c] + beta[c]);
  }}
}}
"""
_INDEX = {  # (x, w, out) positions in each layout
    "nchw": ("((n * C + c) * H + ih) * W + iw", "(c * FXD_KH + kh) * FXD_KW + kw", "((n * C + c) * OH + oh) * OW + ow"),
    "nhwc": ("((n * H + ih) * W + iw) * C + c", "(kh * FXD_KW + kw) * C + c", "((n * OH + oh) * OW + ow) * C + c"),
}


def _common(program: DepthwiseProgram) -> str:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = program.kernel, program.stride, program.padding, program.dilation
    activation = "(v)"
    if program.activation:
        attrs = {k: f"((float){float(v)!r})" for k, v in program.activation_attrs}
        activation = ELEMENTWISE_OPS[program.activation].expr.format("(v)", **attrs)
    return _COMMON.format(ctype=STORAGE_CTYPES[program.dtype], kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, dh=dh,
                          dw=dw, cols=program.cols, activation=activation, store=store("(v)", program.dtype))


def _eps(program: DepthwiseProgram) -> str:
    return f"{float(program.norm_eps)!r}f"


def cuda_source(program: DepthwiseProgram) -> str:
    """CUDA C++ for NVRTC: ``THREADS`` threads a block, one work item (TW columns x VC channels) a thread; with a
    LayerNorm, ``segments * segment_warps`` warps a block (NOTE [Depthwise + LayerNorm])."""
    if program.norm_channels:
        return header_text() + _common(program) + _CUDA_HELPERS.format() + _CUDA_NORM.format(
            name=program.name, channels=program.norm_channels, lane_channels=program.lane_channels,
            segment_warps=program.segment_warps,
            segments=program.segments, eps=_eps(program))
    return header_text() + _common(program) + _CUDA_HELPERS.format() + _CUDA.format(
        name=program.name, threads=THREADS,
        bias_param="const float* FX_RESTRICT bias," if program.bias else "",
        bias_value="bias" if program.bias else "nullptr",
        body=_BODY_NHWC if program.layout == "nhwc" else _BODY_NCHW)


def cpp_source(program: DepthwiseProgram) -> str:
    """C++ for the CPU: ``void NAME(char** data, const int64_t* args)``, the arguments in the CUDA kernel's order."""
    x_index, w_index, out_pos = _INDEX[program.layout]
    at = _CPP_AT.format(x_index=x_index, w_index=w_index)
    if program.norm_channels:
        return header_text() + _common(program) + at + _CPP_NORM.format(name=program.name, eps=_eps(program))
    return header_text() + _common(program) + at + _CPP.format(
        name=program.name, cpp_bias="reinterpret_cast<const float*>(data[2])" if program.bias else "nullptr",
        out_index=3 if program.bias else 2, out_pos=out_pos)
