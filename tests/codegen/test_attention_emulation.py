"""The CUDA attention kernels (fxopt/codegen/attention.py) run on the CPU: the CUDA source compiled as C++, every
CUDA thread a ``std::thread`` (tests/codegen/block_emulation.py), every block of the grid in turn, with the arguments
and grid the CUDA path computes (``AttentionKernel.launch_spec``). So the CUDA kernel itself, not only its C++ twin,
is checked in CI against eager's SDPA: query tiles (NOTE [Attention in query tiles]), a last tile of fewer rows,
tiles across the query heads of a KV head, is_causal, masks, splits and their merge."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
import torch.nn.functional as F

from fxopt.codegen.attention import AttentionProgram, cuda_source
from fxopt.runtime import cc
from fxopt.runtime.attention import AttentionKernel
from tests.codegen.block_emulation import GRID_DRIVER, SHIM, shared_in_arena

pytestmark = pytest.mark.skipif(cc.compiler_info() is None, reason="no C++ compiler")

CUDA = torch.device("cuda", 0)  # the program's device: nothing is compiled for it or launched on it here


def _as_cpp(program: AttentionProgram, n_ints: int) -> str:
    source = cuda_source(program).replace('extern "C" __global__ void', "static void")
    head = source.index("#define FXA_D")  # the kernel's own text after the shared header, which compiles as C++
    body = shared_in_arena(source[head:]).replace("__launch_bounds__(FXA_THREADS)", "")
    if program.kind == "combine":
        pointers = ["(const float*)P[0]", "(fxa_t*)P[1]"]
    else:
        pointers = [f"(const fxa_t*)P[{i}]" for i in range(3)]
        if program.has_mask:
            pointers.append("(const fxa_m*)P[3]")
        pointers.append(f"({'fxa_t' if program.kind == 'attend' else 'float'}*)P[{len(pointers)}]")
    call = f"{program.name}({', '.join(pointers + [f'I[{k}]' for k in range(n_ints)])})"
    return source[:head] + SHIM + body + GRID_DRIVER.replace("KERNEL_CALL", call)


def _emulate(program: AttentionProgram, inputs: list[torch.Tensor]) -> torch.Tensor:
    kernel = AttentionKernel(program, CUDA)
    spec = kernel.launch_spec(inputs)
    out = torch.empty_strided(spec.out_shapes[0], spec.out_strides[0], dtype=program.output_dtypes[0])
    out.fill_(float("nan"))
    lib = cc.compile_cpp(_as_cpp(program, len(spec.args)), name_hint="emu_" + program.name)
    grid = tuple(spec.grid) + (1,) * (3 - len(spec.grid))
    ptrs = (ctypes.c_void_p * (len(inputs) + 1))(*[t.data_ptr() for t in inputs + [out]])
    ints = (ctypes.c_int64 * len(spec.args))(*spec.args)
    lib.emu_run(*(ctypes.c_uint(g) for g in grid), ctypes.c_uint(spec.block), ptrs, ints)
    return out


CASES = [  # B, Hk, G, Lq, L, D, mask ("key": [B, 1, 1, L] float; "bool": [B, 1, Lq, L]), causal, rows, chunk
    (1, 2, 1, 37, 37, 32, None, False, 16, None),  # three tiles, the last of 5 rows
    (1, 1, 2, 11, 20, 16, None, True, 8, None),  # tiles across the two query heads of a KV head, causal
    (2, 1, 1, 9, 300, 8, "key", False, 4, None),  # keys over two tiles of 256, a mask on the keys
    (1, 1, 3, 5, 40, 16, "bool", False, 8, 16),  # tiles with splits of 16 keys and their merge
    (1, 2, 1, 24, 17, 16, None, True, 8, 8),  # causal with more queries than keys, splits: some splits empty
    (1, 2, 2, 3, 50, 32, "key", False, 6, None),  # no tiles: every row of a KV head in one block (a decode step)
]


def _inputs(B, Hk, G, Lq, L, D, mask, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk * G, Lq, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, Hk, L, D, generator=gen).to(dtype) for _ in range(2))
    if mask == "key":
        m = torch.randn(B, 1, 1, L, generator=gen).to(dtype)
        m[..., L // 3: L // 2] = float("-inf")
    elif mask == "bool":
        m = torch.rand(B, 1, Lq, L, generator=gen) < 0.6
        m[..., 0] = True
    else:
        m = None
    return q, k, v, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}-causal{int(c[7])}"
                         f"-rows{c[8]}-chunk{c[9]}")
def test_the_cuda_kernel_emulated_matches_eager(case, dtype):
    B, Hk, G, Lq, L, D, mask, causal, rows, chunk = case
    q, k, v, m = _inputs(B, Hk, G, Lq, L, D, mask, dtype, seed=sum(case[:6]))
    tiled = rows < G * Lq
    common = dict(backend="cuda", dtype=dtype, head_dim=D, scale=1 / math.sqrt(D), device="cuda:0")
    masking = dict(mask="none" if m is None else "bool" if m.dtype == torch.bool else "float",
                   mask_dtype=None if m is None else m.dtype, causal=causal)
    inputs = [q, k, v] + ([m] if m is not None else [])
    if chunk is None:
        got = _emulate(AttentionProgram("attend", rows=rows, query_tiles=tiled, **masking, **common), inputs)
    else:
        part = _emulate(AttentionProgram("partial", rows=rows, query_tiles=tiled, chunk=chunk, **masking, **common),
                        inputs)
        assert part.shape[4] == math.ceil(L / chunk) and not part.isnan().any()
        got = _emulate(AttentionProgram("combine", **{**common, "scale": 0.0}), [part])
    want = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(G, 1),
                                          v.double().repeat_interleave(G, 1),
                                          attn_mask=None if m is None else m if m.dtype == torch.bool else m.double(),
                                          is_causal=causal)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


FLASH_CASES = [  # B, Hk, G, Lq, L, D, mask, causal, rows: NOTE [Flash tiles for long queries]
    (1, 2, 1, 37, 70, 64, None, False, 16),  # two key tiles of 64, the last of 6 keys; a last query tile of 5 rows
    (1, 1, 2, 11, 20, 32, None, True, 8),  # tiles across the two query heads of a KV head, causal
    (2, 1, 1, 9, 40, 16, "key", False, 32),  # a mask on the keys, some -inf; 4 rows a thread
    (1, 1, 1, 12, 33, 80, "bool", False, 8),  # head dim 80: 5 dims a thread, scalar loads of shared memory
    (1, 1, 1, 5, 130, 128, None, False, 16),  # head dim 128: key tiles of 32 (shared memory)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}-causal{int(c[7])}"
                         f"-rows{c[8]}")
def test_the_flash_kernel_emulated_matches_eager(case, dtype):
    *dims, rows = case
    _tile_kernel_matches_eager(dims, dtype, 2e-5 if dtype == torch.float32 else 4e-3, rows=rows, flash=True)


def _tile_kernel_matches_eager(dims, dtype, tol, **program):
    """A kernel in query tiles (flash, tensor-core) on the case ``dims`` (B, Hk, G, Lq, L, D, mask, causal),
    emulated, against eager's SDPA in float64."""
    B, Hk, G, Lq, L, D, mask, causal = dims
    q, k, v, m = _inputs(B, Hk, G, Lq, L, D, mask, dtype, seed=sum(dims[:6]))
    program = AttentionProgram("attend", backend="cuda", dtype=dtype, head_dim=D, scale=1 / math.sqrt(D),
                               device="cuda:0", query_tiles=True, causal=causal,
                               mask="none" if m is None else "bool" if m.dtype == torch.bool else "float",
                               mask_dtype=None if m is None else m.dtype, **program)
    got = _emulate(program, [q, k, v] + ([m] if m is not None else []))
    want = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(G, 1),
                                          v.double().repeat_interleave(G, 1),
                                          attn_mask=None if m is None else m if m.dtype == torch.bool else m.double(),
                                          is_causal=causal)
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_the_flash_kernel_reads_strided_views_and_writes_eagers_layout():
    """q, k, v as slices of one merged projection [B, L, 3, H, D] (not 16-byte aligned rows: the scalar loads),
    the output in the [B, L, H, D] order eager's kernels return."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 21, 3, 2, 12, generator=gen)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    program = AttentionProgram("attend", backend="cuda", dtype=torch.float32, head_dim=12, scale=0.3,
                               device="cuda:0", rows=8, query_tiles=True, flash=True, out_order=(0, 2, 1, 3))
    got = _emulate(program, [q, k, v])
    assert got.stride() == (21 * 2 * 12, 12, 2 * 12, 1)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


TC_CASES = [  # B, Hk, G, Lq, L, D, mask, causal, warps: NOTE [Tensor-core tiles for short sequences]
    (1, 2, 1, 37, 70, 32, None, False, 4),  # three query tiles, the last of 5 rows; keys over the 4 warps, a tail
    (1, 1, 2, 11, 20, 16, None, True, 4),  # tiles across the two query heads of a KV head, causal
    (2, 1, 1, 9, 40, 16, "key", False, 8),  # a mask on the keys, some -inf; 8 warps, some with no keys at all
    (1, 1, 1, 12, 33, 48, "bool", False, 4),  # a bool mask per row; head dim 48 (3 k-steps)
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TC_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}-causal{int(c[7])}"
                         f"-warps{c[8]}")
def test_the_tensor_core_kernel_emulated_matches_eager(case, dtype):
    """The mma.sync kernel's fragments, online softmax and warp merge, its products computed from the fragments."""
    *dims, warps = case
    # the probabilities are rounded to the storage type before the product with the values, as FlashAttention does
    _tile_kernel_matches_eager(dims, dtype, 4e-3 if dtype == torch.float16 else 3e-2, rows=16, warps=warps)


def test_the_tensor_core_kernel_reads_strided_views():
    """q, k, v as slices of one merged projection [B, L, 3, H, D] (rows 2-byte aligned only where D is odd... here
    a strided head dim: the paired 16-bit loads), the output in the [B, L, H, D] order eager's kernels return."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(1, 21, 3, 2, 16, generator=gen).half()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    q = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim stride != 1: no 32-bit loads of q
    program = AttentionProgram("attend", backend="cuda", dtype=torch.float16, head_dim=16, scale=0.3,
                               device="cuda:0", rows=16, query_tiles=True, warps=4, out_order=(0, 2, 1, 3))
    got = _emulate(program, [q, k, v])
    assert got.stride() == (21 * 2 * 16, 16, 2 * 16, 1)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    torch.testing.assert_close(got.double(), want, atol=4e-3, rtol=4e-3)


from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), Hk=st.integers(1, 2), G=st.integers(1, 2), Lq=st.integers(1, 40), L=st.integers(6, 70),
       D=st.sampled_from([16, 32]), mask=st.sampled_from([None, "key", "bool"]), causal=st.booleans(),
       warps=st.sampled_from([4, 8]), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_the_tensor_core_kernel_emulated_on_random_shapes(B, Hk, G, Lq, L, D, mask, causal, warps, dtype):
    """Random tilings: query tails within a tile, key tails within a warp's step, warps without keys, heads of a KV
    head sharing a tile, masks or causal (SDPA takes one or the other)."""
    assume(mask is None or not causal)
    _tile_kernel_matches_eager((B, Hk, G, Lq, L, D, mask, causal), dtype,
                               4e-3 if dtype == torch.float16 else 3e-2, rows=16, warps=warps)
