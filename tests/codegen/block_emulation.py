"""What the CPU emulations of CUDA kernels with barriers share (test_row_emulation.py, test_attention_emulation.py):
the CUDA names a kernel uses, for a C++ compiler, with every CUDA thread a ``std::thread``. ``__syncthreads`` is a
barrier of the block's threads, a warp shuffle an exchange through memory between two barriers of the warp,
``atomicAdd`` a locked add, ``fx_warp_allgather`` every lane's registers to every lane, and each block's ``__shared__`` memory its own arena (``shared_in_arena`` rewrites the
declarations). A driver (per test file) sets ``blockDim``, ``gridDim``, each thread's ``blockIdx`` / ``threadIdx``
and ``fx_blk``, and runs the block's threads together."""

from __future__ import annotations

import re

SHIM = r"""
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) alignas(n)
#define __cluster_dims__(x, y, z)
#define __builtin_assume(x)
#define FX_GRID_DEPENDENCY()
#define __trap() abort()
struct fx_dim3 { unsigned x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };  // CUDA's vector type
struct fx_barrier {  // a reusable barrier (C++17 has none)
  explicit fx_barrier(unsigned n) : count(n), left(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m);
    const unsigned gen = generation;
    if (--left == 0) { left = count; ++generation; cv.notify_all(); return; }
    cv.wait(lock, [&] { return gen != generation; });
  }
  std::mutex m; std::condition_variable cv; unsigned count, left, generation = 0;
};
struct fx_emu_block {
  std::unique_ptr<fx_barrier> bar;
  std::vector<std::unique_ptr<fx_barrier>> warps;
  std::vector<char> smem = std::vector<char>(1 << 16);
  std::vector<double> exchange;
  std::vector<char> gather = std::vector<char>(1024 * 64);  // fx_warp_allgather: up to 64 bytes a thread
};
static fx_dim3 blockDim, gridDim;
static thread_local fx_dim3 blockIdx, threadIdx;
static thread_local fx_emu_block* fx_blk;
static thread_local size_t fx_cursor;
static fx_barrier* fx_cluster_bar;
static std::vector<fx_emu_block>* fx_cluster_blocks;
static void* fx_emu_shared(size_t bytes) {  // the same declarations in the same order in every thread of a block
  void* p = fx_blk->smem.data() + fx_cursor;
  fx_cursor += (bytes + 15) / 16 * 16;
  return p;
}
static inline void __syncthreads() { fx_blk->bar->wait(); }
static inline void __syncwarp(unsigned = 0xffffffffu) {
  fx_blk->warps[(threadIdx.x + threadIdx.y * blockDim.x) >> 5]->wait();
}
static std::mutex fx_atomic_mutex;
static inline float atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> lock(fx_atomic_mutex);
  const float old = *p; *p = old + v; return old;
}
// every lane's `bytes` (at most 64) at `mine`, lane by lane into `all` (an emulated warp's register exchange, e.g.
// for mma.sync's fragments)
static inline void fx_warp_allgather(const void* mine, size_t bytes, void* all) {
  const unsigned tid = threadIdx.x + threadIdx.y * blockDim.x, warp = tid >> 5;
  std::memcpy(fx_blk->gather.data() + tid * 64, mine, bytes);
  fx_blk->warps[warp]->wait();
  for (unsigned l = 0; l < 32; ++l)
    std::memcpy(static_cast<char*>(all) + l * bytes, fx_blk->gather.data() + ((warp << 5) | l) * 64, bytes);
  fx_blk->warps[warp]->wait();
}
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int o) {
  const unsigned tid = threadIdx.x + threadIdx.y * blockDim.x, lane = tid & 31, warp = tid >> 5;
  double slot = 0; std::memcpy(&slot, &v, sizeof(T));
  fx_blk->exchange[tid] = slot;
  fx_blk->warps[warp]->wait();
  slot = fx_blk->exchange[(warp << 5) | (lane ^ (unsigned)o)];
  fx_blk->warps[warp]->wait();
  T out; std::memcpy(&out, &slot, sizeof(T));
  return out;
}
"""

_SHARED = re.compile(r"__shared__ (?:__align__\(\d+\) )?(\w+) (\w+)((?:\[[^\]]+\])+);")


def shared_in_arena(source: str) -> str:
    """Each ``__shared__ [__align__(n)] T name[..]..;`` declaration (one name a declaration) as a reference into the
    block's arena (16-byte aligned): the same declarations in the same order in every thread of a block give every
    thread the same addresses."""
    return _SHARED.sub(lambda m: f"{m[1]} (&{m[2]}){m[3]} = *reinterpret_cast<{m[1]} (*){m[3]}>("
                                 f"fx_emu_shared(sizeof({m[1]}{m[3]})));", source)


# A driver for a kernel with barriers: each block's threads run together (``std::thread`` each), one block after
# another over a 3-D grid; KERNEL_CALL is the kernel's call with the pointers P[] and the integers I[].
GRID_DRIVER = r"""
extern "C" void emu_run(unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** P, const int64_t* I) {
  blockDim = {threads, 1, 1}; gridDim = {gx, gy, gz};
  for (unsigned z = 0; z < gz; ++z)
  for (unsigned y = 0; y < gy; ++y)
  for (unsigned x = 0; x < gx; ++x) {
    fx_emu_block block;
    block.bar.reset(new fx_barrier(threads));
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) block.warps.emplace_back(new fx_barrier(32));
    block.exchange.resize(threads);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        blockIdx = {x, y, z}; threadIdx = {t, 0, 0}; fx_blk = &block; fx_cursor = 0;
        KERNEL_CALL;
      });
    for (auto& th : pool) th.join();
  }
}
"""
