"""Attention for short queries (a decode step) as a generated kernel: the program and its source text.

``scaled_dot_product_attention(q, k, v, attn_mask)`` with a few query rows per head against a long cache is a
matrix-vector problem: one pass over the keys and values, bound by memory latency, not by tensor-core math. The
library kernels eager picks for it are built for long queries: cuDNN's flash kernel plus a memset, about 7.5 µs a
call on an H100 for 3 query rows against 256 cached keys (NOTE [Short-query attention] in
``fxopt/passes/decode_attention.py`` has the measurements).

One thread block per (batch, KV head, split of the keys) holds every query row that reads that KV head: the
``G = Hq / Hk`` heads that share it (grouped-query attention) times the ``Lq`` query rows, ``R = G * Lq`` rows in
all. It walks its keys in tiles of ``THREADS`` keys::

    scores    thread j: s[r][j] = scale * (q[r] . k[j]) + mask[r][j]        for every row r  (k read once)
    softmax   warp per row: m' = max(m, max_j s), p = exp(s - m'), l = l * exp(m - m') + sum_j p   (online)
    values    thread (d, group): acc[r][d] = acc[r][d] * exp(m - m') + sum_j p[r][j] * v[j][d]   (v read once)

and ends with ``out = acc / l`` ("attend": the whole key range in one block) or with ``(acc, m, l)`` per row and split
("partial"), which a second kernel ("combine") merges over the splits, as flash-decoding does, when one block per KV
head would leave the GPU idle on a long cache. Arithmetic is float32 whatever the storage type (q . k, the softmax
and p @ v), so the 16-bit results are at least as close to a float32 reference as eager's flash kernels.

The C++ twin (CPU) runs the same tiles and online softmax in loops: CPU tests check the algorithm (splits, masks,
grouped heads, strides) against eager, and the CUDA source is compiled by NVRTC in CI.

Source text only: ``fxopt/runtime/attention.py`` compiles, plans and launches these programs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .printer import header_text, store
from .region import STORAGE_CTYPES

THREADS = 256  # keys per tile, threads per block
MAX_ROWS = 16  # query rows per KV head in one block (G * Lq), head dims up to 128; 8 above (registers)
MAX_HEAD_DIM = 256
KINDS = ("attend", "partial", "combine")
FLASH_ROWS = (8, 16, 32)  # query rows a flash block holds (NOTE [Flash tiles for long queries])
FLASH_MAX_HEAD_DIM = 128
TC_ROWS = 16  # query rows a tensor-core block holds: one m16n8k16 tile (NOTE [Tensor-core tiles for short sequences])
TC_WARPS = (4, 8)  # warps a tensor-core block splits its keys over
TC_MAX_HEAD_DIM = 128
TC_DTYPES = (torch.float16, torch.bfloat16)
_STATIC_SHARED = 48 * 1024  # bytes of static shared memory a block may declare
MASKS = ("none", "float", "bool")
_FP_TYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionProgram:
    """What one generated attention kernel computes (everything its source depends on).

    kind: "attend" (q, k, v[, mask] -> out), "partial" (q, k, v[, mask] -> float32 partials
    [B, Hk, G, Lq, splits, head_dim + 2]) or "combine" (partials -> out). ``chunk``: keys per split ("partial").
    ``rows``: every query row of a KV head (``G * Lq``, checked at launch), or with ``query_tiles`` a tile of them, the
    blocks of a KV head walking its rows ``rows`` at a time (NOTE [Attention in query tiles]).
    ``out_order``: the output's dims from outermost to innermost in memory (eager's SDPA kernels return
    ``[B, Lq, H, D]`` transposed, (0, 2, 1, 3), or contiguous), so later views see eager's strides."""

    kind: str
    backend: str  # "cuda" | "cpp"
    dtype: torch.dtype  # q, k, v and the output
    head_dim: int
    scale: float
    mask: str = "none"  # "none" | "float" (additive, mask_dtype) | "bool" (True: attend)
    mask_dtype: torch.dtype | None = None
    chunk: int = 0
    out_order: tuple[int, ...] = (0, 1, 2, 3)
    device: str = ""
    rows: int = 1  # query rows a block holds (attend, partial): the block's loops are unrolled for them
    query_tiles: bool = False  # rows is a tile of the G * Lq rows per KV head, one block a tile (long queries)
    causal: bool = False  # query row i reads keys 0..i (SDPA's is_causal: the top-left triangle)
    flash: bool = False  # long queries: the register-tiled kernel (NOTE [Flash tiles for long queries])
    warps: int = 0  # > 0: the tensor-core kernel, its keys split over this many warps (NOTE [Tensor-core tiles ...])

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.mask not in MASKS or self.backend not in ("cuda", "cpp"):
            raise ValueError(f"attention program: kind {self.kind!r}, mask {self.mask!r}, backend {self.backend!r}")
        if self.dtype not in _FP_TYPES:
            raise ValueError(f"attention program: dtype {self.dtype} (float32, float16 or bfloat16)")
        if not 1 <= self.head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"attention program: head_dim {self.head_dim} (1 to {MAX_HEAD_DIM})")
        if sorted(self.out_order) != [0, 1, 2, 3]:
            raise ValueError(f"attention program: out_order {self.out_order} is not a permutation of 4 dims")
        if self.kind == "partial" and self.chunk <= 0:
            raise ValueError("attention program: a partial kernel needs chunk > 0 keys per split")
        if self.query_tiles and self.kind == "combine":
            raise ValueError("attention program: a combine kernel has no query tiles")
        if self.flash and (self.kind != "attend" or not self.query_tiles or self.rows not in FLASH_ROWS
                           or self.head_dim > FLASH_MAX_HEAD_DIM):
            raise ValueError(f"attention program: flash tiles are an attend kernel in query tiles of {FLASH_ROWS} "
                             f"rows, head dim up to {FLASH_MAX_HEAD_DIM} (got {self.kind}, tiles "
                             f"{self.query_tiles}, {self.rows} rows, head dim {self.head_dim})")
        if self.warps and (self.backend != "cuda" or self.kind != "attend" or not self.query_tiles or self.flash
                           or self.rows != TC_ROWS or self.warps not in tc_warps(self.dtype, self.head_dim)):
            raise ValueError(f"attention program: tensor-core tiles are a CUDA attend kernel in query tiles of "
                             f"{TC_ROWS} rows, {TC_WARPS} warps, float16 or bfloat16, a head dim a multiple of 16 up "
                             f"to {TC_MAX_HEAD_DIM} within {_STATIC_SHARED} bytes of shared memory (got {self.kind}, "
                             f"{self.backend}, tiles {self.query_tiles}, {self.rows} rows, {self.warps} warps, "
                             f"{self.dtype}, head dim {self.head_dim})")
        if not self.flash and not self.warps and not 1 <= self.rows <= max_rows(self.head_dim):
            raise ValueError(f"attention program: {self.rows} query rows per KV head (1 to "
                             f"{max_rows(self.head_dim)} for head dim {self.head_dim})")

    @property
    def name(self) -> str:
        digest = hashlib.sha256(self.signature_text().encode()).hexdigest()[:8]
        return f"fxopt_attention_{self.kind}_{digest}"

    def signature_text(self) -> str:
        return (f"{self.kind}|{self.backend}|{self.dtype}|{self.head_dim}|{self.scale!r}|{self.mask}|"
                f"{self.mask_dtype}|{self.chunk}|{self.out_order}|{self.device if self.backend == 'cuda' else ''}|"
                f"{self.rows}|{self.query_tiles}|{self.causal}" + ("|flash" if self.flash else "")
                + (f"|tc{self.warps}" if self.warps else ""))

    @property
    def threads(self) -> int:
        """Threads per block: ``THREADS``, a flash kernel's 16 per ``rows_per_thread`` of its tile's rows, or a
        tensor-core kernel's warps."""
        if self.warps:
            return 32 * self.warps
        return 16 * self.rows // flash_rows_per_thread(self.rows) if self.flash else THREADS

    @property
    def has_mask(self) -> bool:
        return self.mask != "none"

    @property
    def input_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.kind == "combine":
            return (torch.float32,)
        return (self.dtype,) * 3 + ((self.mask_dtype,) if self.has_mask else ())

    @property
    def output_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,) if self.kind == "partial" else (self.dtype,)

    def to_json(self) -> dict:
        return {"kind": self.kind, "backend": self.backend, "dtype": str(self.dtype), "head_dim": self.head_dim,
                "scale": self.scale, "mask": self.mask, "mask_dtype": None if self.mask_dtype is None else
                str(self.mask_dtype), "chunk": self.chunk, "out_order": list(self.out_order), "device": self.device, "rows": self.rows,
                "query_tiles": self.query_tiles, "causal": self.causal, "flash": self.flash, "warps": self.warps}

    @staticmethod
    def from_json(data: dict) -> "AttentionProgram":
        def dt(s):
            return None if s is None else getattr(torch, s.removeprefix("torch."))

        return AttentionProgram(data["kind"], data["backend"], dt(data["dtype"]), int(data["head_dim"]),
                                float(data["scale"]), data["mask"], dt(data["mask_dtype"]), int(data["chunk"]),
                                tuple(data["out_order"]), data.get("device", ""), int(data.get("rows", 1)),
                                bool(data.get("query_tiles", False)), bool(data.get("causal", False)),
                                bool(data.get("flash", False)), int(data.get("warps", 0)))


# Argument order, both targets: pointers (inputs, then the output), then int64 values.
#   attend / partial: B, Hk, G, Lq, L, chunk, then 4 strides each of q, k, v[, mask][, out (attend)]
#   combine:          B, Hk, G, Lq, splits, then 4 strides of out

# The parts both targets share: the mask read as an additive float, and the row bookkeeping.
_COMMON = r"""
#define FXA_D {head_dim}
#define FXA_SCALE {scale}f
typedef {ctype} fxa_t;
typedef {mtype} fxa_m;
FX_INLINE float fxa_mask(fxa_m v) {{ return {mask_expr}; }}
"""

_CUDA_ATTEND = r"""
#define FXA_THREADS {threads}
#define FXA_WARPS (FXA_THREADS / 32)
#define FXA_ROWS {max_rows}
#define FXA_DL ((FXA_D + 31) / 32)  // dims per lane in the p @ v phase: d = lane + 32 * e
#define FXA_U (FXA_DL <= 2 ? 16 : FXA_DL <= 4 ? 8 : 4)  // keys whose values a warp loads before it uses them
#define FXA_V (16 / (int)sizeof(fxa_t))  // elements in 16 bytes
struct __align__(16) fxa_pack {{ fxa_t v[FXA_V]; }};
// One block per (batch * KV head, split[, query tile]): the query rows r0 + r = g * Lq + i of KV head hk (query
// head hk * G + g, query row i), r0 = 0 and r < G * Lq, or with query tiles r0 = blockIdx.z * FXA_ROWS. NOTE
// [Short-query attention] (passes/short_attention.py). A small kernel like this one is bound by memory latency, not
// bandwidth: each phase issues all its loads before it uses any (unrolled over the compile-time head dim; the values
// in batches of FXA_U keys a warp), so a tile costs a few round trips to memory, not one per key (the first version
// waited for one value load per key: 52 µs for 256 keys, H100).
extern "C" __global__ void __launch_bounds__(FXA_THREADS) {name}(
    const fxa_t* FX_RESTRICT q, const fxa_t* FX_RESTRICT k, const fxa_t* FX_RESTRICT v, {mask_param}
    {out_type}* FX_RESTRICT out, int64_t B, int64_t Hk, int64_t G, int64_t Lq, int64_t L, int64_t chunk,
    int64_t sq0, int64_t sq1, int64_t sq2, int64_t sq3, int64_t sk0, int64_t sk1, int64_t sk2, int64_t sk3,
    int64_t sv0, int64_t sv1, int64_t sv2, int64_t sv3{mask_strides}{out_strides}) {{
  FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]
  __shared__ float qs[FXA_ROWS][FXA_D];
  __shared__ float sc[FXA_ROWS][FXA_THREADS];
  __shared__ float ms[FXA_ROWS];  // per row: running max, sum and this tile's rescale
  __shared__ float ls[FXA_ROWS];
  __shared__ float al[FXA_ROWS];
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int64_t b = blockIdx.x / Hk, hk = blockIdx.x % Hk;
{rows_decl}
  const int64_t start = (int64_t)blockIdx.y * chunk;
  int64_t end = start + chunk < L ? start + chunk : L;
{causal_end}
  for (int e = t; e < R * FXA_D; e += FXA_THREADS) {{
    const int r = e / FXA_D, d = e % FXA_D;
    const int64_t h = hk * G + (r0 + r) / Lq, i = (r0 + r) % Lq;
    qs[r][d] = fx_load(q[b * sq0 + h * sq1 + i * sq2 + d * sq3]) * FXA_SCALE;
  }}
  if (t < FXA_ROWS) {{ ms[t] = -FX_INF_F; ls[t] = 0.f; }}
  float acc[FXA_ROWS][FXA_DL];
#pragma unroll
  for (int r = 0; r < FXA_ROWS; ++r)
#pragma unroll
    for (int e = 0; e < FXA_DL; ++e) acc[r][e] = 0.f;
  const fxa_t* kb = k + b * sk0 + hk * sk1;
  const fxa_t* vb = v + b * sv0 + hk * sv1;
  const bool kvec = FXA_D % FXA_V == 0 && sk3 == 1 && sk2 % FXA_V == 0
      && (reinterpret_cast<unsigned long long>(kb) & 15ull) == 0;
  __syncthreads();
  for (int64_t tile = start; tile < end; tile += FXA_THREADS) {{
    const int n = (int)(end - tile < FXA_THREADS ? end - tile : FXA_THREADS);
    // scores: thread t owns key tile + t; its key row is loaded (16 bytes at a time where the row is contiguous and
    // aligned) before the products, all loads of the row in flight together
    if (t < n) {{
      const fxa_t* kr = kb + (tile + t) * sk2;
      float s[FXA_ROWS];
#pragma unroll
      for (int r = 0; r < FXA_ROWS; ++r) s[r] = 0.f;
      if (kvec) {{
#pragma unroll 16
        for (int c = 0; c < FXA_D / FXA_V; ++c) {{
          const fxa_pack pk = reinterpret_cast<const fxa_pack*>(kr)[c];
#pragma unroll
          for (int e = 0; e < FXA_V; ++e) {{
            const float kx = fx_load(pk.v[e]);
#pragma unroll
            for (int r = 0; r < FXA_ROWS; ++r)
              if (r < R) s[r] += qs[r][c * FXA_V + e] * kx;
          }}
        }}
      }} else {{
#pragma unroll 8
        for (int d = 0; d < FXA_D; ++d) {{
          const float kx = fx_load(kr[d * sk3]);
#pragma unroll
          for (int r = 0; r < FXA_ROWS; ++r)
            if (r < R) s[r] += qs[r][d] * kx;
        }}
      }}
#pragma unroll
      for (int r = 0; r < FXA_ROWS; ++r) {{
        if (r < R) {{
          float x = s[r];
{mask_add}
          sc[r][t] = x;
        }}
      }}
    }}
    __syncthreads();
    // online softmax: one warp per row
    for (int r = warp; r < R; r += FXA_WARPS) {{
      float mx = -FX_INF_F;
      for (int j = lane; j < n; j += 32) mx = fmaxf(mx, sc[r][j]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = ms[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == -FX_INF_F ? 0.f : m_new;  // a fully masked tile: p = 0, not NaN
      float sum = 0.f;
      for (int j = lane; j < n; j += 32) {{
        const float p = expf(sc[r][j] - m_use);
        sc[r][j] = p;
        sum += p;
      }}
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      __syncwarp();
      if (lane == 0) {{
        const float alpha = expf(m_old - m_use);
        al[r] = alpha;
        ls[r] = ls[r] * alpha + sum;
        ms[r] = m_new;
      }}
    }}
    __syncthreads();
    // values: warp w takes keys w, w + WARPS, ...; lane l dims l, l + 32, ...; FXA_U keys' loads in flight
#pragma unroll
    for (int r = 0; r < FXA_ROWS; ++r)
      if (r < R) {{
        const float a = al[r];
#pragma unroll
        for (int e = 0; e < FXA_DL; ++e) acc[r][e] *= a;
      }}
    for (int j0 = warp; j0 < n; j0 += FXA_WARPS * FXA_U) {{
      float vv[FXA_U][FXA_DL];
#pragma unroll
      for (int u = 0; u < FXA_U; ++u) {{
        const int j = j0 + u * FXA_WARPS;
#pragma unroll
        for (int e = 0; e < FXA_DL; ++e) {{
          const int d = lane + 32 * e;
          vv[u][e] = (j < n && d < FXA_D) ? fx_load(vb[(tile + j) * sv2 + d * sv3]) : 0.f;
        }}
      }}
#pragma unroll
      for (int u = 0; u < FXA_U; ++u) {{
        const int j = j0 + u * FXA_WARPS;
        if (j < n) {{
#pragma unroll
          for (int r = 0; r < FXA_ROWS; ++r)
            if (r < R) {{
              const float p = sc[r][j];
#pragma unroll
              for (int e = 0; e < FXA_DL; ++e) acc[r][e] += p * vv[u][e];
            }}
        }}
      }}
    }}
    __syncthreads();
  }}
  // sum the warps' accumulators in shared memory (qs is free: the scores are done)
  for (int e = t; e < FXA_ROWS * FXA_D; e += FXA_THREADS) (&qs[0][0])[e] = 0.f;
  __syncthreads();
#pragma unroll
  for (int r = 0; r < FXA_ROWS; ++r)
    if (r < R) {{
#pragma unroll
      for (int e = 0; e < FXA_DL; ++e)
        if (lane + 32 * e < FXA_D) atomicAdd(&qs[r][lane + 32 * e], acc[r][e]);
    }}
  __syncthreads();
  for (int e = t; e < R * FXA_D; e += FXA_THREADS) {{
    const int r = e / FXA_D, d = e % FXA_D;
    const int64_t h = hk * G + (r0 + r) / Lq, i = (r0 + r) % Lq;
    const float total = qs[r][d];
{store}
  }}
}}
"""

# The parameters and first statement of the kernels that hold a tile of query rows a block (flash, tensor-core
# tiles): the attend kernel's arguments, the output's strides last. Pasted into their templates before formatting.
_TILE_KERNEL_PARAMS = """    const fxa_t* FX_RESTRICT q, const fxa_t* FX_RESTRICT k, const fxa_t* FX_RESTRICT v, {mask_param}
    fxa_t* FX_RESTRICT out, int64_t B, int64_t Hk, int64_t G, int64_t Lq, int64_t L, int64_t chunk,
    int64_t sq0, int64_t sq1, int64_t sq2, int64_t sq3, int64_t sk0, int64_t sk1, int64_t sk2, int64_t sk3,
    int64_t sv0, int64_t sv1, int64_t sv2, int64_t sv3{mask_strides}, int64_t so0, int64_t so1, int64_t so2,
    int64_t so3) {{
  FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]"""

# NOTE [Flash tiles for long queries]: SDPA's float32 kernel (the memory-efficient one) tiles 64 query rows of one
# head a block: a batch-1 ViT's 197 tokens x 6 heads are 24 blocks for 132 SMs, 16 µs a call on an H100 where the
# arithmetic at full occupancy is about 1 µs (DeiT-S: 12 calls, 193 of its 1110 µs of GPU time, H100,
# reports/2026-12-07-h100-s13-1717605). The short-query kernel above, in tiles of rows, reads every key once per
# row group but multiplies one key per thread, so it is no faster (17-21 µs). This kernel is FlashAttention's loop on
# CUDA cores: a block holds FXF_BM query rows (8, 16 or 32: 78 to 150 blocks for DeiT-S) and walks the keys FXF_BN
# at a time, both products register-tiled: thread (ty, tx) computes the scores of rows ty * RM .. + RM of keys
# tx * CN .. + CN, then the output of its rows for dims tx * DJ .. + DJ. The key tile is stored transposed and the
# probabilities transposed, so each step of both products is two vector loads from shared memory for RM x CN (or
# RM x DJ) multiply-adds. A row's scores live in the 16 lanes of a half warp: its max and sum are 4 shuffles.
# Measured (H100, 2026-12-07, reports/2026-12-07-h100-s15-4587b1d): faster than SDPA on Swin-T's 49-token windows
# (12.8 against 17.0 µs) but not at DeiT-S's 197 tokens (24.8 against 18-28, SDPA's math path 16.1): the prediction
# of 6-8 µs there was wrong, and why (shared-memory bandwidth of the transposed tiles, registers) is open.
_CUDA_FLASH = r"""
#define FXF_BM {rows}
#define FXF_RM {rm}
#define FXF_TY (FXF_BM / FXF_RM)
#define FXF_THREADS (16 * FXF_TY)
#define FXF_BN {keys}
#define FXF_CN (FXF_BN / 16)
#define FXF_DJ ((FXA_D + 15) / 16)
#define FXF_DP (16 * FXF_DJ)
#define FXA_V (16 / (int)sizeof(fxa_t))
struct __align__(16) fxa_pack {{ fxa_t v[FXA_V]; }};
struct __align__(16) fxf_f4 {{ float x[4]; }};
struct __align__(8) fxf_f2 {{ float x[2]; }};
// N floats from shared memory at src (aligned to 16 bytes where N % 4 == 0, to 8 where N % 2 == 0): vector loads
template <int N> FX_INLINE void fxf_read(float (&dst)[N], const float* src) {{
  if (N % 4 == 0) {{
#pragma unroll
    for (int u = 0; u < N / 4; ++u) {{
      const fxf_f4 x = reinterpret_cast<const fxf_f4*>(src)[u];
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[4 * u + e] = x.x[e];
    }}
  }} else if (N % 2 == 0) {{
#pragma unroll
    for (int u = 0; u < N / 2; ++u) {{
      const fxf_f2 x = reinterpret_cast<const fxf_f2*>(src)[u];
      dst[2 * u] = x.x[0]; dst[2 * u + 1] = x.x[1];
    }}
  }} else {{
#pragma unroll
    for (int u = 0; u < N; ++u) dst[u] = src[u];
  }}
}}
// One block per (batch * KV head, 1, tile of FXF_BM of the KV head's G * Lq query rows), FXF_THREADS threads.
extern "C" __global__ void __launch_bounds__(FXF_THREADS) {name}(
{tile_kernel_params}
  __shared__ __align__(16) float qt[FXA_D][FXF_BM + 4];  // the block's query rows, scaled, transposed: qt[d][r]
  __shared__ __align__(16) float kt[FXA_D][FXF_BN + 4];  // the key tile transposed: kt[d][j]
  __shared__ __align__(16) float vs[FXF_BN][FXF_DP];  // the value tile, dims past the head dim zero
  __shared__ __align__(16) float pt[FXF_BN][FXF_BM + 4];  // this tile's probabilities transposed: pt[j][r]
  const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
  const int64_t b = blockIdx.x / Hk, hk = blockIdx.x % Hk;
  const int64_t r0 = (int64_t)blockIdx.z * FXF_BM;  // this block's tile of the G * Lq rows
  const int R = (int)(G * Lq - r0 < FXF_BM ? G * Lq - r0 : FXF_BM);
  int64_t end = L;
{causal_end}
  for (int e = t; e < FXF_BM * FXA_D; e += FXF_THREADS) {{
    const int r = e / FXA_D, d = e % FXA_D;
    float x = 0.f;  // rows past the last one: zeros, never stored
    if (r < R) {{
      const int64_t h = hk * G + (r0 + r) / Lq, i = (r0 + r) % Lq;
      x = fx_load(q[b * sq0 + h * sq1 + i * sq2 + d * sq3]) * FXA_SCALE;
    }}
    qt[d][r] = x;
  }}
  for (int e = t; e < FXF_BN * (FXF_DP - FXA_D); e += FXF_THREADS)
    vs[e / (FXF_DP - FXA_D)][FXA_D + e % (FXF_DP - FXA_D)] = 0.f;
  int64_t hr[FXF_RM], ir[FXF_RM];  // this thread's rows: query head and row
  float m[FXF_RM], l[FXF_RM], acc[FXF_RM][FXF_DJ];
#pragma unroll
  for (int i = 0; i < FXF_RM; ++i) {{
    // a row past the last one computes on zeros and is never stored; it reads the mask at the last row's place
    const int64_t row = r0 + (ty * FXF_RM + i < R ? ty * FXF_RM + i : R - 1);
    hr[i] = hk * G + row / Lq; ir[i] = row % Lq;
    m[i] = -FX_INF_F; l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < FXF_DJ; ++j) acc[i][j] = 0.f;
  }}
  const fxa_t* kb = k + b * sk0 + hk * sk1;
  const fxa_t* vb = v + b * sv0 + hk * sv1;
  const bool vec = FXA_D % FXA_V == 0 && sk3 == 1 && sv3 == 1 && sk2 % FXA_V == 0 && sv2 % FXA_V == 0
      && ((reinterpret_cast<unsigned long long>(kb) | reinterpret_cast<unsigned long long>(vb)) & 15ull) == 0;
  for (int64_t tile = 0; tile < end; tile += FXF_BN) {{
    const int n = (int)(end - tile < FXF_BN ? end - tile : FXF_BN);
    __syncthreads();  // the previous tile's kt, vs and pt are read
    if (vec) {{
      // keys: consecutive threads take consecutive keys (the transposed stores hit distinct banks); values:
      // consecutive threads take consecutive 16 bytes of a row (coalesced)
#pragma unroll 4
      for (int e = t; e < FXF_BN * (FXA_D / FXA_V); e += FXF_THREADS) {{
        const int j = e % FXF_BN, c = e / FXF_BN;
        fxa_pack pk;
        if (j < n) pk = reinterpret_cast<const fxa_pack*>(kb + (tile + j) * sk2)[c];
#pragma unroll
        for (int u = 0; u < FXA_V; ++u) kt[c * FXA_V + u][j] = j < n ? fx_load(pk.v[u]) : 0.f;
      }}
#pragma unroll 4
      for (int e = t; e < FXF_BN * (FXA_D / FXA_V); e += FXF_THREADS) {{
        const int j = e / (FXA_D / FXA_V), c = e % (FXA_D / FXA_V);
        fxa_pack pv;
        if (j < n) pv = reinterpret_cast<const fxa_pack*>(vb + (tile + j) * sv2)[c];
#pragma unroll
        for (int u = 0; u < FXA_V; ++u) vs[j][c * FXA_V + u] = j < n ? fx_load(pv.v[u]) : 0.f;
      }}
    }} else {{
      for (int e = t; e < FXF_BN * FXA_D; e += FXF_THREADS) {{
        const int j = e % FXF_BN, d = e / FXF_BN;
        kt[d][j] = j < n ? fx_load(kb[(tile + j) * sk2 + d * sk3]) : 0.f;
      }}
      for (int e = t; e < FXF_BN * FXA_D; e += FXF_THREADS) {{
        const int j = e / FXA_D, d = e % FXA_D;
        vs[j][d] = j < n ? fx_load(vb[(tile + j) * sv2 + d * sv3]) : 0.f;
      }}
    }}
    __syncthreads();
    float s[FXF_RM][FXF_CN];
#pragma unroll
    for (int i = 0; i < FXF_RM; ++i)
#pragma unroll
      for (int j = 0; j < FXF_CN; ++j) s[i][j] = 0.f;
#pragma unroll 8
    for (int d = 0; d < FXA_D; ++d) {{
      float qv[FXF_RM], kv[FXF_CN];
      fxf_read<FXF_RM>(qv, &qt[d][ty * FXF_RM]);
      fxf_read<FXF_CN>(kv, &kt[d][tx * FXF_CN]);
#pragma unroll
      for (int i = 0; i < FXF_RM; ++i)
#pragma unroll
        for (int j = 0; j < FXF_CN; ++j) s[i][j] += qv[i] * kv[j];
    }}
    // online softmax: row ty * RM + i's scores are in the 16 lanes of this half warp
#pragma unroll
    for (int i = 0; i < FXF_RM; ++i) {{
      float mx = -FX_INF_F;
#pragma unroll
      for (int j = 0; j < FXF_CN; ++j) {{
        const int c = tx * FXF_CN + j;
        float x = s[i][j];
        if (c < n) {{
{mask_add}
        }} else {{
          x = -FX_INF_F;
        }}
        s[i][j] = x;
        mx = fmaxf(mx, x);
      }}
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m[i], mx);
      const float m_use = m_new == -FX_INF_F ? 0.f : m_new;  // nothing unmasked yet: p = 0, not NaN
      const float alpha = expf(m[i] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < FXF_CN; ++j) {{
        const float p = expf(s[i][j] - m_use);
        s[i][j] = p;
        sum += p;
      }}
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
#pragma unroll
      for (int j = 0; j < FXF_DJ; ++j) acc[i][j] *= alpha;
    }}
#pragma unroll
    for (int j = 0; j < FXF_CN; ++j)
#pragma unroll
      for (int i = 0; i < FXF_RM; ++i) pt[tx * FXF_CN + j][ty * FXF_RM + i] = s[i][j];
    __syncwarp();  // a row's probabilities are written and read by the same half warp
#pragma unroll 4
    for (int c = 0; c < FXF_BN; ++c) {{
      float pv[FXF_RM], vv[FXF_DJ];
      fxf_read<FXF_RM>(pv, &pt[c][ty * FXF_RM]);
      fxf_read<FXF_DJ>(vv, &vs[c][tx * FXF_DJ]);
#pragma unroll
      for (int i = 0; i < FXF_RM; ++i)
#pragma unroll
        for (int j = 0; j < FXF_DJ; ++j) acc[i][j] += pv[i] * vv[j];
    }}
  }}
#pragma unroll
  for (int i = 0; i < FXF_RM; ++i) {{
    if (ty * FXF_RM + i < R) {{
#pragma unroll
      for (int j = 0; j < FXF_DJ; ++j) {{
        const int d = tx * FXF_DJ + j;
        if (d < FXA_D) out[b * so0 + hr[i] * so1 + ir[i] * so2 + d * so3] = {store};
      }}
    }}
  }}
}}
"""

# NOTE [Tensor-core tiles for short sequences]: in float16 and bfloat16 eager's SDPA is FlashAttention's kernel,
# tiled 128 query rows a block for tensor cores: a batch-1 DeiT-S's 197 tokens x 6 heads are 12 blocks for 132 SMs,
# 8.4 µs a call on an H100 (12 calls, about a quarter of the model's 398 µs of GPU time; Inductor calls the same
# kernel), where the arithmetic is well under a microsecond. This kernel holds one m16n8k16 tile of 16 query rows a
# block (DeiT-S: 78 blocks) and splits the keys over the block's warps, 16 keys a step: warp w takes keys
# 16w.., 16(w + W).., each with FlashAttention-2's loop in registers: the scores of its 16 keys are two mma.sync
# products per 16 dims of the head, the online softmax works on the accumulator fragments (a row's values sit in the
# 4 lanes of a quad: two shuffles), and the probabilities, rounded to the storage type as FlashAttention rounds them,
# are the A fragment of the next product with the values, without a trip through shared memory. All of a step's
# loads (keys, values, mask) are issued before its first product. At the end the warps' (max, sum, accumulator) per
# row meet in shared memory and merge as flash-decoding's splits do. Scores, softmax and accumulation are float32.
# Outside CUDA (the tests' emulation of this source on the CPU) the product is computed from the warp's fragments.
_CUDA_TC = r"""
#define FXM_WARPS {warps}
#define FXM_THREADS (32 * FXM_WARPS)
#define FXM_KS (FXA_D / 16)  // k-steps of the scores (16 dims each)
#define FXM_NT (FXA_D / 8)  // n-tiles of the output (8 dims each)
#define FXM_LOG2E 1.4426950408889634f
// two 16-bit values as one register, lo in the low half (the order mma.sync's fragments hold them)
FX_INLINE uint32_t fxm_pack(float lo, float hi) {{
#if defined(__CUDACC__)
  uint32_t r;
  asm("cvt.rn.{ptx}x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return (uint32_t){store_fn}(lo).bits | ((uint32_t){store_fn}(hi).bits << 16);
#endif
}}
// p[0] and p[stride] as one register; vec: one 32-bit load (stride 1, p 4-byte aligned)
FX_INLINE uint32_t fxm_load2(const fxa_t* p, int64_t stride, bool vec) {{
  if (vec) return *reinterpret_cast<const uint32_t*>(p);
  return (uint32_t)p[0].bits | ((uint32_t)p[stride].bits << 16);
}}
// d += a (16 x 16, row major) * b (16 x 8, column major): one warp's m16n8k16 product, float32 accumulators
FX_INLINE void fxm_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {{
#if defined(__CUDACC__)
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.{ptx}.{ptx}.f32 {{%0, %1, %2, %3}}, {{%4, %5, %6, %7}}, "
               "{{%8, %9}}, {{%0, %1, %2, %3}};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  // the same product from every lane's fragments (PTX ISA, "mma.m16n8k16" fragment layouts)
  uint32_t mine[6] = {{a[0], a[1], a[2], a[3], b0, b1}}, all[32][6];
  fx_warp_allgather(mine, sizeof(mine), all);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {{
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float sum = 0.f;
    for (int kk = 0; kk < 16; ++kk) {{
      const uint32_t ar = all[(row & 7) * 4 + (kk & 7) / 2][(row >> 3) + 2 * (kk >> 3)];
      const uint32_t br = all[col * 4 + (kk & 7) / 2][4 + (kk >> 3)];
      fxa_t x, y;
      x.bits = (uint16_t)((kk & 1) ? ar >> 16 : ar & 0xffffu);
      y.bits = (uint16_t)((kk & 1) ? br >> 16 : br & 0xffffu);
      sum += fx_load(x) * fx_load(y);
    }}
    d[i] += sum;
  }}
#endif
}}
// One block per (batch * KV head, 1, tile of 16 of the KV head's G * Lq query rows), FXM_WARPS warps.
extern "C" __global__ void __launch_bounds__(FXM_THREADS) {name}(
{tile_kernel_params}
  __shared__ float red[FXM_WARPS][16][FXA_D + 1];  // each warp's accumulators, then merged
  __shared__ float red_m[FXM_WARPS][16];
  __shared__ float red_l[FXM_WARPS][16];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.x / Hk, hk = blockIdx.x % Hk;
  const int64_t r0 = (int64_t)blockIdx.z * 16;  // this block's tile of the G * Lq rows
  const int R = (int)(G * Lq - r0 < 16 ? G * Lq - r0 : 16);
  // this lane's two rows of the tile, g and g + 8 (a row past the last one computes on zeros, reads the last row's
  // mask and is never stored)
  int64_t hr[2], ir[2];
  bool live[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {{
    live[j] = g + 8 * j < R;
    const int64_t row = r0 + (live[j] ? g + 8 * j : R - 1);
    hr[j] = hk * G + row / Lq; ir[j] = row % Lq;
  }}
  int64_t end = L;
{causal_end}
  const bool qvec = sq3 == 1 && ((sq0 | sq1 | sq2) & 1) == 0 && (reinterpret_cast<unsigned long long>(q) & 3ull) == 0;
  const bool kvec = sk3 == 1 && ((sk0 | sk1 | sk2) & 1) == 0 && (reinterpret_cast<unsigned long long>(k) & 3ull) == 0;
  // the queries: A fragments, k-step s: a[j + 2h] = row g + 8j, dims 16s + 8h + 2t, +1
  uint32_t qa[FXM_KS][4];
#pragma unroll
  for (int s = 0; s < FXM_KS; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        qa[s][j + 2 * h] = live[j] ? fxm_load2(q + b * sq0 + hr[j] * sq1 + ir[j] * sq2 + (16 * s + 8 * h + 2 * t) * sq3,
                                               sq3, qvec) : 0u;
  float m[2] = {{-FX_INF_F, -FX_INF_F}}, l[2] = {{0.f, 0.f}};  // per row, log2 units; l: this lane's share
  float acc[FXM_NT][4];
#pragma unroll
  for (int j = 0; j < FXM_NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
  const fxa_t* kb = k + b * sk0 + hk * sk1;
  const fxa_t* vb = v + b * sv0 + hk * sv1;
  const float sl2 = FXA_SCALE * FXM_LOG2E;
  for (int64_t key0 = 16 * warp; key0 < end; key0 += 16 * FXM_WARPS) {{
    // keys: B fragments of the scores, n-tile u (keys key0 + 8u + g), k-step s: dims 16s + 2t, +1 and 16s + 8 + 2t, +1
    uint32_t kf[2][FXM_KS][2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {{
      const int64_t key = key0 + 8 * u + g;
#pragma unroll
      for (int s = 0; s < FXM_KS; ++s)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          kf[u][s][h] = key < end ? fxm_load2(kb + key * sk2 + (16 * s + 8 * h + 2 * t) * sk3, sk3, kvec) : 0u;
    }}
    // values: B fragments of p @ v, n-tile j (dim 8j + g): keys key0 + 2t, +1 (h = 0) and key0 + 8 + 2t, +1 (h = 1);
    // keys past the end read as zeros (their probabilities are zero: no 0 * nan)
    uint32_t vf[FXM_NT][2];
#pragma unroll
    for (int j = 0; j < FXM_NT; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {{
        const int64_t kk = key0 + 8 * h + 2 * t;
        const fxa_t* p = vb + kk * sv2 + (8 * j + g) * sv3;
        vf[j][h] = (kk < end ? (uint32_t)p[0].bits : 0u) | (kk + 1 < end ? (uint32_t)p[sv2].bits << 16 : 0u);
      }}
{mask_load}
    // scores: n-tile u holds row g (i = 0, 1) and row g + 8 (i = 2, 3) for keys key0 + 8u + 2t + (i & 1)
    float sc[2][4];
#pragma unroll
    for (int u = 0; u < 2; ++u) {{
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[u][i] = 0.f;
#pragma unroll
      for (int s = 0; s < FXM_KS; ++s) fxm_mma(sc[u], qa[s], kf[u][s][0], kf[u][s][1]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {{
        const int64_t key = key0 + 8 * u + 2 * t + (i & 1);
        float x = sc[u][i] * sl2;
{mask_add}
        sc[u][i] = key < end ? x : -FX_INF_F;
      }}
    }}
    // online softmax per row: the row's 16 scores are in the 4 lanes of this lane's quad
#pragma unroll
    for (int j = 0; j < 2; ++j) {{
      float mx = fmaxf(fmaxf(sc[0][2 * j], sc[0][2 * j + 1]), fmaxf(sc[1][2 * j], sc[1][2 * j + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[j], mx);
      const float m_use = m_new == -FX_INF_F ? 0.f : m_new;  // nothing unmasked yet: p = 0, not NaN
      const float alpha = exp2f(m[j] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int e = 0; e < 2; ++e) {{
          const float p = exp2f(sc[u][2 * j + e] - m_use);
          sc[u][2 * j + e] = p;
          sum += p;
        }}
      l[j] = l[j] * alpha + sum;
      m[j] = m_new;
#pragma unroll
      for (int n = 0; n < FXM_NT; ++n) {{ acc[n][2 * j] *= alpha; acc[n][2 * j + 1] *= alpha; }}
    }}
    // the probabilities as the A fragment of a 16-key k-step: the scores' accumulator layout, two n-tiles side by side
    const uint32_t pa[4] = {{fxm_pack(sc[0][0], sc[0][1]), fxm_pack(sc[0][2], sc[0][3]), fxm_pack(sc[1][0], sc[1][1]),
                            fxm_pack(sc[1][2], sc[1][3])}};
#pragma unroll
    for (int n = 0; n < FXM_NT; ++n) fxm_mma(acc[n], pa, vf[n][0], vf[n][1]);
  }}
  // merge the warps: each row's (max, sum, accumulator) per warp in shared memory, then as flash-decoding's splits
#pragma unroll
  for (int j = 0; j < 2; ++j) {{
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 1);
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 2);
    if (t == 0) {{ red_m[warp][g + 8 * j] = m[j]; red_l[warp][g + 8 * j] = l[j]; }}
  }}
#pragma unroll
  for (int n = 0; n < FXM_NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][g + 8 * (i >> 1)][8 * n + 2 * t + (i & 1)] = acc[n][i];
  __syncthreads();
  for (int e = tid; e < R * FXA_D; e += FXM_THREADS) {{
    const int r = e / FXA_D, d = e % FXA_D;
    float mm = -FX_INF_F;
#pragma unroll
    for (int w = 0; w < FXM_WARPS; ++w) mm = fmaxf(mm, red_m[w][r]);
    const float m_use = mm == -FX_INF_F ? 0.f : mm;
    float num = 0.f, den = 0.f;
#pragma unroll
    for (int w = 0; w < FXM_WARPS; ++w) {{
      const float c = exp2f(red_m[w][r] - m_use);
      num += c * red[w][r][d];
      den += c * red_l[w][r];
    }}
    const int64_t h = hk * G + (r0 + r) / Lq, i = (r0 + r) % Lq;
    out[b * so0 + h * so1 + i * so2 + d * so3] = {store};
  }}
}}
"""
_CUDA_FLASH = _CUDA_FLASH.replace("{tile_kernel_params}", _TILE_KERNEL_PARAMS)
_CUDA_TC = _CUDA_TC.replace("{tile_kernel_params}", _TILE_KERNEL_PARAMS)

# attend: the normalized row at the output's strides; partial: (acc[0..D), m, l) of this split, float32, at
# partial[b][hk][g][i][split][.] (contiguous, [B, Hk, G, Lq, splits, D + 2])
_STORE_ATTEND = "    out[b * so0 + h * so1 + i * so2 + d * so3] = {store};"
_STORE_PARTIAL = """    float* pr = out + ((((b * Hk + hk) * G * Lq + r0 + r) * (int64_t)gridDim.y) + blockIdx.y) * (FXA_D + 2);
    pr[d] = total;
    if (d == 0) { pr[FXA_D] = ms[r]; pr[FXA_D + 1] = ls[r]; }"""

_CUDA_COMBINE = r"""
// One block per output row (b, hk, g, i): the splits' (acc, m, l) merged as flash-decoding does.
extern "C" __global__ void {name}(const float* FX_RESTRICT part, fxa_t* FX_RESTRICT out, int64_t B, int64_t Hk,
                                  int64_t G, int64_t Lq, int64_t splits, int64_t so0, int64_t so1, int64_t so2,
                                  int64_t so3) {{
  FX_GRID_DEPENDENCY();  // NOTE [Programmatic dependent launch]
  const int64_t row = blockIdx.x;  // ((b * Hk + hk) * G + g) * Lq + i
  const int64_t i = row % Lq, g = (row / Lq) % G, hk = (row / (Lq * G)) % Hk, b = row / (Lq * G * Hk);
  const int64_t h = hk * G + g;
  const float* pr = part + row * splits * (FXA_D + 2);
  float m = -FX_INF_F;
  for (int64_t s = 0; s < splits; ++s) m = fmaxf(m, pr[s * (FXA_D + 2) + FXA_D]);
  const float m_use = m == -FX_INF_F ? 0.f : m;
  float l = 0.f;
  for (int64_t s = 0; s < splits; ++s) l += expf(pr[s * (FXA_D + 2) + FXA_D] - m_use) * pr[s * (FXA_D + 2) + FXA_D + 1];
  for (int d = threadIdx.x; d < FXA_D; d += blockDim.x) {{
    float a = 0.f;
    for (int64_t s = 0; s < splits; ++s) a += expf(pr[s * (FXA_D + 2) + FXA_D] - m_use) * pr[s * (FXA_D + 2) + d];
    out[b * so0 + h * so1 + i * so2 + d * so3] = {store};
  }}
}}
"""

# The C++ twin: the same tiles, online softmax and split merge, in loops (the CPU's float arithmetic, one thread).
_CPP_ATTEND = r"""
#define FXA_TILE {threads}
extern "C" void {name}(char** data, const int64_t* a) {{
  const fxa_t* q = reinterpret_cast<const fxa_t*>(data[0]);
  const fxa_t* k = reinterpret_cast<const fxa_t*>(data[1]);
  const fxa_t* v = reinterpret_cast<const fxa_t*>(data[2]);
  {cpp_mask_ptr}
  {out_type}* out = reinterpret_cast<{out_type}*>(data[{out_index}]);
  const int64_t B = a[0], Hk = a[1], G = a[2], Lq = a[3], L = a[4], chunk = a[5];
  const int64_t sq0 = a[6], sq1 = a[7], sq2 = a[8], sq3 = a[9], sk0 = a[10], sk1 = a[11], sk2 = a[12], sk3 = a[13];
  const int64_t sv0 = a[14], sv1 = a[15], sv2 = a[16], sv3 = a[17];
  {cpp_strides}
  const int64_t R = G * Lq;
  const int64_t splits = L > 0 ? (L + chunk - 1) / chunk : 1;
  std::vector<float> acc(FXA_D), s(FXA_TILE);
  for (int64_t b = 0; b < B; ++b)
  for (int64_t hk = 0; hk < Hk; ++hk)
  for (int64_t r = 0; r < R; ++r) {{
    const int64_t h = hk * G + r / Lq, i = r % Lq;
    for (int64_t split = 0; split < {split_count}; ++split) {{
      const int64_t start = split * chunk, end = start + chunk < L ? start + chunk : L;
      float m = -FX_INF_F, l = 0.f;
      for (int d = 0; d < FXA_D; ++d) acc[d] = 0.f;
      for (int64_t tile = start; tile < end; tile += FXA_TILE) {{
        const int64_t n = end - tile < FXA_TILE ? end - tile : FXA_TILE;
        float mx = -FX_INF_F;
        for (int64_t j = 0; j < n; ++j) {{
          const int64_t key = tile + j;
          float x = 0.f;
          for (int d = 0; d < FXA_D; ++d)
            x += fx_load(q[b * sq0 + h * sq1 + i * sq2 + d * sq3]) * fx_load(k[b * sk0 + hk * sk1 + key * sk2 + d * sk3]);
          x *= FXA_SCALE;
{cpp_mask_add}
          s[j] = x;
          mx = x > mx ? x : mx;
        }}
        const float m_new = m > mx ? m : mx;
        const float m_use = m_new == -FX_INF_F ? 0.f : m_new;
        const float alpha = std::exp(m - m_use);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {{ s[j] = std::exp(s[j] - m_use); sum += s[j]; }}
        l = l * alpha + sum;
        m = m_new;
        for (int d = 0; d < FXA_D; ++d) {{
          float x = acc[d] * alpha;
          for (int64_t j = 0; j < n; ++j) x += s[j] * fx_load(v[b * sv0 + hk * sv1 + (tile + j) * sv2 + d * sv3]);
          acc[d] = x;
        }}
      }}
{cpp_store}
    }}
  }}
}}
"""

_CPP_COMBINE = r"""
extern "C" void {name}(char** data, const int64_t* a) {{
  const float* part = reinterpret_cast<const float*>(data[0]);
  fxa_t* out = reinterpret_cast<fxa_t*>(data[1]);
  const int64_t B = a[0], Hk = a[1], G = a[2], Lq = a[3], splits = a[4];
  const int64_t so0 = a[5], so1 = a[6], so2 = a[7], so3 = a[8];
  for (int64_t row = 0; row < B * Hk * G * Lq; ++row) {{
    const int64_t i = row % Lq, g = (row / Lq) % G, hk = (row / (Lq * G)) % Hk, b = row / (Lq * G * Hk);
    const int64_t h = hk * G + g;
    const float* pr = part + row * splits * (FXA_D + 2);
    float m = -FX_INF_F;
    for (int64_t s = 0; s < splits; ++s) m = pr[s * (FXA_D + 2) + FXA_D] > m ? pr[s * (FXA_D + 2) + FXA_D] : m;
    const float m_use = m == -FX_INF_F ? 0.f : m;
    float l = 0.f;
    for (int64_t s = 0; s < splits; ++s) l += std::exp(pr[s * (FXA_D + 2) + FXA_D] - m_use) * pr[s * (FXA_D + 2) + FXA_D + 1];
    for (int d = 0; d < FXA_D; ++d) {{
      float x = 0.f;
      for (int64_t s = 0; s < splits; ++s) x += std::exp(pr[s * (FXA_D + 2) + FXA_D] - m_use) * pr[s * (FXA_D + 2) + d];
      out[b * so0 + h * so1 + i * so2 + d * so3] = {store};
    }}
  }}
}}
"""


def flash_rows_per_thread(rows: int) -> int:
    """Query rows each thread of a flash block computes (RM): 2 for tiles of 8 and 16 rows, 4 for 32."""
    return 4 if rows >= 32 else 2


def flash_keys_per_tile(rows: int, head_dim: int) -> int:
    """Keys a flash block holds at a time (FXF_BN): 64, or fewer where its shared memory would pass 48 KiB."""
    dp = 16 * ((head_dim + 15) // 16)
    for keys in (64, 32, 16):
        if 4 * (head_dim * (rows + 4) + head_dim * (keys + 4) + keys * dp + keys * (rows + 4)) <= _STATIC_SHARED:
            return keys
    raise ValueError(f"flash attention: {rows} rows of head dim {head_dim} do not fit a block's shared memory")


def max_rows(head_dim: int) -> int:
    """Query rows per KV head one block holds for this head dim (each lane keeps rows x head_dim / 32 sums)."""
    return MAX_ROWS if head_dim <= 128 else MAX_ROWS // 2


def _common(program: AttentionProgram) -> str:
    mtype = STORAGE_CTYPES[program.mask_dtype] if program.has_mask else "float"
    mask_expr = {"none": "0.f", "float": "fx_load(v)", "bool": "v ? 0.f : -FX_INF_F"}[program.mask]
    return _COMMON.format(head_dim=program.head_dim, scale=repr(float(program.scale)),
                          ctype=STORAGE_CTYPES[program.dtype], mtype=mtype, mask_expr=mask_expr)


def cuda_source(program: AttentionProgram) -> str:
    """CUDA C++ for NVRTC. attend / partial: grid ``(B * Hk, splits[, query tiles])``, ``THREADS`` threads; combine:
    one block per output row."""
    head = header_text() + _common(program)
    if program.kind == "combine":
        return head + _CUDA_COMBINE.format(name=program.name, store=store("a / l", program.dtype))
    if program.flash:
        return head + _flash_source(program)
    if program.warps:
        return head + _tc_source(program)
    attend = program.kind == "attend"
    store_code = (_STORE_ATTEND.format(store=store("total / ls[r]", program.dtype)) if attend else _STORE_PARTIAL)
    if program.query_tiles:
        rows_decl = ("  const int64_t r0 = (int64_t)blockIdx.z * FXA_ROWS;  // this block's tile of the G * Lq rows\n"
                     "  const int R = (int)(G * Lq - r0 < FXA_ROWS ? G * Lq - r0 : FXA_ROWS);")
    else:
        rows_decl = ("  const int64_t r0 = 0;\n"
                     "  const int R = FXA_ROWS;  // G * Lq, checked on the host: every row loop below is unrolled and "
                     "unguarded")
    # causal: no key after the block's last query row is read (the tiles past it are all masked)
    causal_end = ("  { const int64_t last = (r0 / Lq == (r0 + R - 1) / Lq) ? (r0 + R - 1) % Lq : Lq - 1;\n"
                  "    if (end > last + 1) end = last + 1; }") if program.causal else ""
    mask_add = []
    if program.has_mask or program.causal:
        mask_add.append("          { const int64_t h = hk * G + (r0 + r) / Lq, i = (r0 + r) % Lq;")
        if program.has_mask:
            mask_add.append("            x += fxa_mask(mask[b * sm0 + h * sm1 + i * sm2 + (tile + t) * sm3]);")
        if program.causal:
            mask_add.append("            if (tile + t > i) x = -FX_INF_F;")
        mask_add.append("            (void)h; }")
    return head + _CUDA_ATTEND.format(
        name=program.name, threads=THREADS, max_rows=program.rows, rows_decl=rows_decl, causal_end=causal_end,
        mask_param="const fxa_m* FX_RESTRICT mask," if program.has_mask else "",
        out_type="fxa_t" if attend else "float",
        mask_strides=", int64_t sm0, int64_t sm1, int64_t sm2, int64_t sm3" if program.has_mask else "",
        out_strides=", int64_t so0, int64_t so1, int64_t so2, int64_t so3" if attend else "",
        mask_add="\n".join(mask_add), store=store_code)


def _flash_source(program: AttentionProgram) -> str:
    causal_end = ("  { const int64_t last = (r0 / Lq == (r0 + R - 1) / Lq) ? (r0 + R - 1) % Lq : Lq - 1;\n"
                  "    if (end > last + 1) end = last + 1; }") if program.causal else ""
    mask_add = []
    if program.has_mask:
        mask_add.append("          x += fxa_mask(mask[b * sm0 + hr[i] * sm1 + ir[i] * sm2 + (tile + c) * sm3]);")
    if program.causal:
        mask_add.append("          if (tile + c > ir[i]) x = -FX_INF_F;")
    return _CUDA_FLASH.format(
        name=program.name, rows=program.rows, rm=flash_rows_per_thread(program.rows),
        keys=flash_keys_per_tile(program.rows, program.head_dim), causal_end=causal_end,
        mask_param="const fxa_m* FX_RESTRICT mask," if program.has_mask else "",
        mask_strides=", int64_t sm0, int64_t sm1, int64_t sm2, int64_t sm3" if program.has_mask else "",
        mask_add="\n".join(mask_add) or "          (void)0;",
        store=store("acc[i][j] / l[i]", program.dtype))


def tc_shared_bytes(warps: int, head_dim: int) -> int:
    """Static shared memory of a tensor-core block: every warp's accumulators, maxima and sums for 16 rows."""
    return 4 * warps * TC_ROWS * (head_dim + 1 + 2)


def tc_warps(dtype: torch.dtype, head_dim: int) -> tuple[int, ...]:
    """The warp counts a tensor-core kernel may have for this dtype and head dim: none outside float16 / bfloat16 and
    head dims that are multiples of 16 up to TC_MAX_HEAD_DIM, else those of TC_WARPS whose shared memory fits."""
    if dtype not in TC_DTYPES or head_dim % 16 or not 0 < head_dim <= TC_MAX_HEAD_DIM:
        return ()
    return tuple(w for w in TC_WARPS if tc_shared_bytes(w, head_dim) <= _STATIC_SHARED)


def _tc_source(program: AttentionProgram) -> str:
    causal_end = ("  { const int64_t last = (r0 / Lq == (r0 + R - 1) / Lq) ? (r0 + R - 1) % Lq : Lq - 1;\n"
                  "    if (end > last + 1) end = last + 1; }") if program.causal else ""
    mask_load, mask_add = "", []
    if program.has_mask:
        # the mask values of this lane's 8 scores, loaded with the keys and values
        mask_load = ("    float mk[2][4];\n"
                     "#pragma unroll\n"
                     "    for (int u = 0; u < 2; ++u)\n"
                     "#pragma unroll\n"
                     "      for (int i = 0; i < 4; ++i) {\n"
                     "        const int64_t key = key0 + 8 * u + 2 * t + (i & 1);\n"
                     "        const int j = i >> 1;\n"
                     "        mk[u][i] = key < end ? fxa_mask(mask[b * sm0 + hr[j] * sm1 + ir[j] * sm2 + key * sm3]) : 0.f;\n"
                     "      }")
        mask_add.append("        x += mk[u][i] * FXM_LOG2E;")
    if program.causal:
        mask_add.append("        if (key > ir[i >> 1]) x = -FX_INF_F;")
    ptx = "f16" if program.dtype == torch.float16 else "bf16"
    return _CUDA_TC.format(
        name=program.name, warps=program.warps, ptx=ptx,
        store_fn="fx_store_half" if program.dtype == torch.float16 else "fx_store_bf16", causal_end=causal_end,
        mask_param="const fxa_m* FX_RESTRICT mask," if program.has_mask else "",
        mask_strides=", int64_t sm0, int64_t sm1, int64_t sm2, int64_t sm3" if program.has_mask else "",
        mask_load=mask_load, mask_add="\n".join(mask_add) or "        (void)0;",
        store=store("num / den", program.dtype))


def cpp_source(program: AttentionProgram) -> str:
    """C++ for the CPU: ``void NAME(char** data, const int64_t* args)``, the arguments in the CUDA kernel's order."""
    head = header_text() + "#include <vector>\n" + _common(program)
    if program.kind == "combine":
        return head + _CPP_COMBINE.format(name=program.name, store=store("x / l", program.dtype))
    attend = program.kind == "attend"
    n_ptr = 3 + program.has_mask
    strides = []
    base = 18
    if program.has_mask:
        strides.append(f"const int64_t sm0 = a[{base}], sm1 = a[{base + 1}], sm2 = a[{base + 2}], sm3 = a[{base + 3}];")
        base += 4
    if attend:
        strides.append(f"const int64_t so0 = a[{base}], so1 = a[{base + 1}], so2 = a[{base + 2}], so3 = a[{base + 3}];")
    if attend:
        store_code = ("      for (int d = 0; d < FXA_D; ++d) out[b * so0 + h * so1 + i * so2 + d * so3] = "
                      + store("acc[d] / l", program.dtype) + ";")
    else:
        store_code = ("      float* pr = out + ((((b * Hk + hk) * R + r) * splits) + split) * (FXA_D + 2);\n"
                      "      for (int d = 0; d < FXA_D; ++d) pr[d] = acc[d];\n"
                      "      pr[FXA_D] = m; pr[FXA_D + 1] = l;")
    return head + _CPP_ATTEND.format(
        name=program.name, threads=THREADS, out_type="fxa_t" if attend else "float", out_index=n_ptr,
        cpp_mask_ptr=("const fxa_m* mask = reinterpret_cast<const fxa_m*>(data[3]);" if program.has_mask else ""),
        cpp_strides="\n  ".join(strides), split_count="1" if attend else "splits",
        cpp_mask_add="\n".join(
            (["          x += fxa_mask(mask[b * sm0 + h * sm1 + i * sm2 + key * sm3]);"] if program.has_mask else [])
            + (["          if (key > i) x = -FX_INF_F;"] if program.causal else [])), cpp_store=store_code)
