"""CUDA row kernels with barriers run on the CPU: the generated CUDA C++ compiled as C++, every CUDA thread of a
cluster a ``std::thread``, ``__syncthreads`` and the cluster barrier a barrier, warp shuffles an exchange through
memory, each block's ``__shared__`` memory its own arena, and a read of another block's shared memory (distributed
shared memory) a read of that block's arena at the same offset. So NOTE [Rows split over a cluster] and NOTE [Rows
as columns] are checked in CI, without a GPU, with the arguments the CUDA path computes (the row kernel's plan):
against the generic kernel, run the same way, and against eager. What the emulation cannot show is speed, and what
the hardware does that C++ does not (memory ordering beyond the barriers, which these kernels rely on only there)."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.codegen import rowwise
from fxopt.passes import base
from fxopt.passes.fuse_reductions import fuse_reductions
from fxopt.runtime import cc
from fxopt.runtime.kernel import KERNELS, fused_op
from fxopt.verify import compare
from tests.codegen.block_emulation import SHIM, shared_in_arena

pytestmark = pytest.mark.skipif(cc.compiler_info() is None, reason="no C++ compiler")

# Replaces the PTX of rowwise.CLUSTER_HELPERS: the cluster's barrier, and another block's shared memory at the offset
# this block's pointer has in its own.
EMU_CLUSTER_HELPERS = r"""
static inline void fxr_cluster_sync() { fx_cluster_bar->wait(); }
template <class T> static inline T fxr_remote(const T* p, unsigned rank) {
  const size_t offset = (const char*)p - fx_blk->smem.data();
  return *(const T*)((*fx_cluster_blocks)[rank].smem.data() + offset);
}
template <int S, class T, class Op>
static inline T fxr_cluster_reduce(T v, Op op, T identity, T* slot) {
  if (threadIdx.x == 0) *slot = v;
  fxr_cluster_sync();
  T r = identity;
  for (int k = 0; k < S; ++k) r = op(r, fxr_remote(slot, k));
  return r;
}
"""
DRIVER = r"""
extern "C" void emu_run(unsigned grid, unsigned bx, unsigned by, unsigned cluster, void** P, const int64_t* I) {
  blockDim = {bx, by, 1}; gridDim = {grid, 1, 1};
  const unsigned threads = bx * by;
  for (unsigned first = 0; first < grid; first += cluster) {
    std::vector<fx_emu_block> blocks(cluster);
    for (auto& b : blocks) {
      b.bar.reset(new fx_barrier(threads));
      for (unsigned w = 0; w < (threads + 31) / 32; ++w) b.warps.emplace_back(new fx_barrier(32));
      b.exchange.resize(threads);
    }
    fx_barrier cluster_bar(cluster * threads);
    fx_cluster_bar = &cluster_bar; fx_cluster_blocks = &blocks;
    std::vector<std::thread> pool;
    for (unsigned r = 0; r < cluster; ++r)
      for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, r, t] {
          blockIdx = {first + r, 0, 0}; threadIdx = {t % bx, t / bx, 0};
          fx_blk = &blocks[r]; fx_cursor = 0;
          KERNEL_CALL;
        });
    for (auto& th : pool) th.join();
  }
}
"""


def _as_cpp(source: str, program: rowwise.RowProgram, name: str) -> str:
    """The CUDA source as C++ for the shim: shared declarations into the block's arena, the PTX helpers replaced."""
    body = source.replace(rowwise.CLUSTER_HELPERS, EMU_CLUSTER_HELPERS)
    body = shared_in_arena(body)
    head = body.index("#ifndef FXR_HELPERS")  # the header is the C++ one
    n_ptr = len(program.inputs) + len(program.outputs)
    n_int = len(rowwise.cuda_int_params(program))
    types = [rowwise.STORAGE_CTYPES[i.dtype] for i in program.inputs] + [
        rowwise.STORAGE_CTYPES[o.dtype] for o in program.outputs]
    args = [f"({t}*)P[{k}]" for k, t in enumerate(types)] + [f"I[{k}]" for k in range(n_int)]
    assert len(args) == n_ptr + n_int
    return (rowwise.header_text() + SHIM + body[head:].replace('extern "C" __global__ void', 'static void')
            + DRIVER.replace("KERNEL_CALL", f"{name}({', '.join(args)})"))


def _emulate(program, source, name, plan, inputs, grid, block, cluster):
    outs = [torch.empty_strided(s, st, dtype=o.dtype).fill_(float("nan"))
            for s, st, o in zip(plan.out_shapes, plan.out_strides, program.outputs)]
    lib = cc.compile_cpp(_as_cpp(source, program, name), name_hint="emu_" + name)
    ptrs = (ctypes.c_void_p * (len(inputs) + len(outs)))(*[t.data_ptr() for t in list(inputs) + outs])
    ints = (ctypes.c_int64 * len(plan.args))(*plan.args)
    lib.emu_run(ctypes.c_uint(grid), ctypes.c_uint(block[0]), ctypes.c_uint(block[1]), ctypes.c_uint(cluster),
                ptrs, ints)
    return outs


def _row_kernel(model, inputs):
    """The model's one row kernel (lowered for the CPU; its program prints for CUDA too), what the graph hands it,
    its plan for that (the arguments the CUDA path passes: runtime/rowwise.py computes them before the backend
    matters) and the C++ kernel's outputs, the reference."""
    gm = fxopt.capture(model.eval(), inputs)
    with base._collect("fuse_reductions"):
        gm = fuse_reductions("cpp")(gm).graph_module
    gm.recompile()
    (name,) = [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_op]
    kernel = KERNELS[name]
    seen = []

    def record(xs):
        seen.append(list(xs))
        return kernel(xs)

    KERNELS[name] = record
    try:
        with torch.no_grad():
            assert compare(gm(*inputs), model(*inputs)) is None
    finally:
        KERNELS[name] = kernel
    xs = seen[0]
    expected = kernel(xs)
    # the kernel object is shared by every test of its program: this call's plan has its outputs' layout
    plan = [p for p in kernel._plans.values()
            if p.out_shapes == [tuple(e.shape) for e in expected] and p.out_strides == [e.stride() for e in expected]
            and list(p.c_args)[:2] == [p.rows, p.n]][-1]
    plan.args = tuple(plan.c_args)  # the C++ call passes them as an array; the CUDA launch as arguments
    return kernel, xs, plan, expected


class AddNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x, r):
        return self.norm(x + r)


class SoftmaxMax(nn.Module):
    def forward(self, x, r):
        h = x * 0.5 + r
        return torch.softmax(h, -1), h.amax(-1)


class SqueezeKeep(nn.Module):
    def forward(self, x, b):
        h = F.silu(x + b)
        return h, h.mean((2, 3), keepdim=True)


class SqueezeGate(nn.Module):
    def forward(self, x):
        h = F.silu(x)
        return h * torch.sigmoid(h.mean((2, 3), keepdim=True))


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype, torch.int16))


def _check(outs, generic, expected, dtype):
    """The emulated kernel against the emulated generic one and the C++ kernel (the reference)."""
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype != torch.float16 else {"rtol": 2e-3, "atol": 2e-3}
    assert len(outs) == len(generic) == len(expected)
    for o, g, e in zip(outs, generic, expected):
        assert not torch.isnan(o.float()).any()
        torch.testing.assert_close(o, g, **tol)
        torch.testing.assert_close(o, e, **tol)


@pytest.mark.parametrize("model_type, shape, split, threads", [
    (AddNorm, (3, 2500), 2, 256),       # two stages; parts in registers
    (AddNorm, (2, 9000), 4, 32),        # parts past the registers: the loop over memory
    (SoftmaxMax, (2, 3000), 2, 64),     # a max stage, a per-row output written by part 0 only
])
def test_rows_split_over_a_cluster_emulated(model_type, shape, split, threads):
    n = shape[-1]
    model = model_type(n) if model_type is AddNorm else model_type()
    kernel, xs, plan, expected = _row_kernel(model, [_randn(*shape, seed=1), _randn(*shape, seed=2)])
    program = kernel.program
    constants = dict(zip(rowwise.cuda_int_params(program), plan.args, strict=True))
    block = (threads, 1)
    split_source = rowwise.cuda_source(program, constants, block, split)
    name = rowwise.specialized_name(program, constants, block, split)
    outs = _emulate(program, split_source, name, plan, xs, plan.rows * split, block, split)
    generic = _emulate(program, rowwise.cuda_source(program), program.name, plan, xs, 2, (threads, 1), 1)
    _check(outs, generic, expected, torch.float32)
    again = _emulate(program, split_source, name, plan, xs, plan.rows * split, block, split)
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(outs, again))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("model_type", [SqueezeKeep, SqueezeGate])
@pytest.mark.parametrize("shape, split, lanes", [
    ((1, 40, 9, 7), 1, 8),    # two tiles, the second with 8 rows of 32: lanes past the last row store nothing
    ((2, 24, 8, 8), 2, 4),    # rows over two batches; a cluster of two blocks a tile
    ((1, 32, 13, 11), 4, 8),  # parts of unequal length
])
def test_rows_as_columns_emulated(model_type, shape, split, lanes, dtype):
    x = _randn(*shape, dtype=dtype, seed=1).contiguous(memory_format=torch.channels_last)
    inputs = [x, _randn(1, shape[1], 1, 1, dtype=dtype, seed=2)] if model_type is SqueezeKeep else [x]
    kernel, xs, plan, expected = _row_kernel(model_type(), inputs)
    program = kernel.program
    from fxopt.runtime.rowwise import column_layout

    R, n_in = program.ndim, len(program.inputs)
    elem = [i.mode == "elem" for i in program.inputs]
    strides = list(plan.args[2 + R - 1:2 + R - 1 + n_in * (R - 1)])
    row_strides = list(plan.args[2 + R - 1 + n_in * (R - 1):2 + R - 1 + n_in * (R - 1) + sum(elem)])
    out_args = list(plan.args[2 + R - 1 + n_in * (R - 1) + sum(elem):])
    n_ordered = sum(1 for o in program.outputs if o.level == rowwise.ELEM and o.order is not None)
    n_elem = sum(1 for o in program.outputs if o.level == rowwise.ELEM)
    assert column_layout(R, n_in, elem, strides, row_strides, out_args, n_ordered, n_elem)
    constants = dict(zip(rowwise.cuda_int_params(program), plan.args, strict=True))
    block = (32, lanes)
    source = rowwise.cuda_source(program, constants, block, split, columns=True)
    name = rowwise.specialized_name(program, {**constants, "columns": 1}, block, split)
    tiles = -(-plan.rows // 32)
    outs = _emulate(program, source, name, plan, xs, tiles * split, block, split)
    generic = _emulate(program, rowwise.cuda_source(program), program.name, plan, xs, 2, (64, 1), 1)
    _check(outs, generic, expected, dtype)
    for o, g in zip(outs, generic):
        assert o.stride() == g.stride()


# -- NOTE [Rows over two dims]: a GroupNorm's statistics over a channels-last value, read where it is -------------
class GroupStats(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        x4 = x.reshape(n, 4, c // 4, h * w)
        mean = x4.mean((-2, -1), keepdim=True)
        centered = x4 - mean
        return mean, torch.rsqrt((centered * centered).mean((-2, -1), keepdim=True) + 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (1, 40, 8, 8)])
def test_statistics_over_two_dims_of_any_strides(shape, dtype):
    import dataclasses

    from fxopt.runtime.rowwise import RowwiseKernel

    x = (_randn(*shape, dtype=torch.float32, seed=3) * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    kernel, xs, plan, expected = _row_kernel(GroupStats(), [x])
    assert plan.fixes is not None  # one level: the C++ kernel copies the channels-last group dense first
    program = dataclasses.replace(kernel.program, two_level=True)
    two = RowwiseKernel(program, torch.device("cpu"))
    got = two(xs)
    (two_plan,) = two._plans.values()
    assert two_plan.fixes is None  # two levels: no copy
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    two_plan.args = tuple(two_plan.c_args)
    constants = dict(zip(rowwise.cuda_int_params(program), two_plan.args, strict=True))
    special = _emulate(program, rowwise.cuda_source(program, constants, (64, 1)),
                       rowwise.specialized_name(program, constants, (64, 1)), two_plan, xs, two_plan.rows, (64, 1), 1)
    generic = _emulate(program, rowwise.cuda_source(program), program.name, two_plan, xs, 2, (32, 4), 1)
    _check(special, generic, expected, torch.float32)
