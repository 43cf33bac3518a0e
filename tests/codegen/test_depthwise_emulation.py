"""The CUDA depthwise convolution kernel (fxopt/codegen/depthwise.py) run on the CPU: the CUDA source compiled as
C++ (tests/codegen/block_emulation.py's names, a block's threads together), every thread of the grid
``DepthwiseKernel.launch_spec`` computes, against eager's F.conv2d: both layouts, the NHWC kernel's 16-byte channel
path and its one-channel path (a channel count or an address that does not allow vector loads), a last column group
of fewer columns, strides, dilation and padding, with and without a bias; and the kernel with the LayerNorm after
the convolution (NOTE [Depthwise + LayerNorm]) against eager's conv2d + layer_norm in float64."""

from __future__ import annotations

import ctypes
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fxopt.codegen.depthwise import DepthwiseProgram, cuda_source
from fxopt.runtime import cc
from fxopt.runtime.depthwise import DepthwiseKernel, weight_for
from tests.codegen.block_emulation import GRID_DRIVER, SHIM, shared_in_arena

pytestmark = pytest.mark.skipif(cc.compiler_info() is None, reason="no C++ compiler")

CUDA = torch.device("cuda", 0)  # the program's device: nothing is compiled for it or launched on it here


def _emulate(program: DepthwiseProgram, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The kernel's grid run on the CPU, a block's threads together (block_emulation.GRID_DRIVER: the LayerNorm
    kernel's segments sum over warps with shuffles and __syncthreads), one block after another."""
    kernel = DepthwiseKernel(program, CUDA)
    spec = kernel.launch_spec(inputs)
    out = torch.empty_strided(spec.out_shapes[0], spec.out_strides[0], dtype=program.dtype).fill_(float("nan"))
    source = shared_in_arena(cuda_source(program).replace('extern "C" __global__ void', "static void"))
    head = source.index("// the depthwise program")
    pointers = (["(const fxd_t*)P[0]"] + [f"(const float*)P[{i}]" for i in range(1, len(inputs))]  # float32 w, ...
                + [f"(fxd_t*)P[{len(inputs)}]"])
    call = f"{program.name}({', '.join(pointers + [f'I[{k}]' for k in range(len(spec.args))])})"
    lib = cc.compile_cpp(source[:head] + SHIM + source[head:] + GRID_DRIVER.replace("KERNEL_CALL", call),
                         name_hint="emu_" + program.name)
    ptrs = (ctypes.c_void_p * (len(inputs) + 1))(*[t.data_ptr() for t in inputs + [out]])
    ints = (ctypes.c_int64 * len(spec.args))(*spec.args)
    lib.emu_run(ctypes.c_uint(spec.grid[0]), ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(spec.block), ptrs,
                ints)
    return out


CASES = [  # N, C, H, W, kernel, stride, padding, dilation, columns a thread, dtype
    (1, 8, 9, 10, (7, 7), (1, 1), (3, 3), (1, 1), 4, torch.float32),  # ConvNeXt's, a last column group of 2
    (2, 16, 7, 7, (3, 3), (2, 2), (1, 1), (1, 1), 2, torch.float16),  # MobileNet's strided 3x3
    (1, 6, 8, 9, (5, 3), (1, 2), (2, 0), (2, 1), 3, torch.float32),  # dilation, channels off 16 bytes (NHWC: one a
    (1, 4, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, torch.float16),  # thread)
]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4][0]}{c[4][1]}-tw{c[8]}"
                         f"-{str(c[9])[6:]}")
def test_the_cuda_kernel_emulated_matches_eager(case, layout):
    N, C, H, W, k, s, p, d, cols, dtype = case
    gen = torch.Generator().manual_seed(C * H + W)
    x = torch.randn(N, C, H, W, generator=gen).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, *k, generator=gen).to(dtype)
    b = torch.randn(C, generator=gen).to(dtype)
    want = F.conv2d(x.double(), w.double(), b.double(), s, p, d, C)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for bias in (None, b):
        program = DepthwiseProgram("cuda", dtype, k, s, p, d, bias is not None, layout, cols, "cuda:0")
        got = _emulate(program, [x, weight_for(program, w)] + ([bias.float()] if bias is not None else []))
        ref = want if bias is not None else want - b.double().view(1, C, 1, 1)
        assert not got.isnan().any()
        scale = ref.abs().max().item() + 1
        torch.testing.assert_close(got.double() / scale, ref / scale, atol=tol, rtol=0)
    # an activation applied before the store (NOTE [Depthwise epilogues]), with an attribute
    program = DepthwiseProgram("cuda", dtype, k, s, p, d, True, layout, cols, "cuda:0", "leaky_relu",
                               (("negative_slope", 0.2),))
    got = _emulate(program, [x, weight_for(program, w), b.float()])
    torch.testing.assert_close(got.double() / scale, F.leaky_relu(want, 0.2) / scale, atol=tol, rtol=0)
    if layout == "nhwc":  # 4 bytes off 16-byte alignment: the one-channel path whatever C
        storage = torch.empty(x.numel() + 1, dtype=dtype)
        xs = storage[1:].view(N, H, W, C).permute(0, 3, 1, 2)
        xs.copy_(x)
        program = DepthwiseProgram("cuda", dtype, k, s, p, d, True, layout, cols, "cuda:0")
        got = _emulate(program, [xs, weight_for(program, w), b.float()])
        torch.testing.assert_close(got.double() / scale, want / scale, atol=tol, rtol=0)


NORM_CASES = [  # N, C, H, W, kernel, stride, padding, columns a segment, channels a lane, dtype
    (1, 96, 6, 7, (7, 7), (1, 1), (3, 3), 4, 4, torch.float16),  # ConvNeXt's first stage: 24 of 32 lanes, 4 segments
    (2, 12, 5, 5, (3, 3), (1, 1), (1, 1), 2, 1, torch.float32),  # 12 lanes a segment, a last block half empty
    (1, 136, 4, 9, (5, 5), (2, 2), (2, 2), 3, 2, torch.bfloat16),  # three warps a segment, the last with 4 live lanes
    (1, 768, 3, 3, (7, 7), (1, 1), (3, 3), 1, 1, torch.float16),  # ConvNeXt's last stage: 24 warps, one segment
    (1, 768, 3, 3, (7, 7), (1, 1), (3, 3), 2, 4, torch.float16),  # the same in six warps
]


@pytest.mark.parametrize("case", NORM_CASES,
                         ids=lambda c: "x".join(map(str, c[:4])) + f"-tw{c[7]}-vc{c[8]}-{str(c[9])[6:]}")
def test_the_layer_norm_kernel_emulated_matches_eager(case):
    """NOTE [Depthwise + LayerNorm]: the convolution and the LayerNorm over each pixel's channels, in float32 to one
    rounding, against float64 eager; also through the scalar path (an input 2 elements off the vector alignment)."""
    N, C, H, W, k, s, p, cols, vc, dtype = case
    gen = torch.Generator().manual_seed(C + H * W)
    x = torch.randn(N, C, H, W, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, *k, generator=gen).to(dtype), torch.randn(C, generator=gen)
    gamma, beta = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    conv = F.conv2d(x.double(), w.double(), b.double(), s, p, 1, C).permute(0, 2, 3, 1)
    want = F.layer_norm(conv, (C,), gamma.double(), beta.double(), 1e-6)
    program = DepthwiseProgram("cuda", dtype, k, s, p, (1, 1), True, "nhwc", cols, "cuda:0", norm_channels=C,
                               norm_eps=1e-6, lane_channels=vc)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    storage = torch.empty(x.numel() + 2, dtype=dtype)
    xs = storage[2:].view(N, H, W, C).permute(0, 3, 1, 2)  # 4 (8) bytes off: the kernel's scalar loads
    xs.copy_(x)
    for xin in (x, xs):
        got = _emulate(program, [xin, weight_for(program, w), b, gamma, beta])
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.isnan().any()
        torch.testing.assert_close(got.permute(0, 2, 3, 1).double(), want, atol=tol * (want.abs().max().item() + 1),
                                   rtol=0)


def test_the_layer_norm_program_checks_what_it_was_built_for():
    """The program refuses what the kernel cannot compute; the launch refuses an input of another channel count."""
    common = dict(backend="cuda", dtype=torch.float16, kernel=(7, 7), padding=(3, 3), bias=True, layout="nhwc",
                  device="cuda:0")
    for bad in (dict(norm_channels=98), dict(norm_channels=8192), dict(layout="nchw", norm_channels=96),
                dict(bias=False, norm_channels=96), dict(activation="relu", norm_channels=96),
                dict(norm_channels=96, lane_channels=3), dict(norm_channels=2048, lane_channels=1)):
        with pytest.raises(ValueError, match="LayerNorm"):
            DepthwiseProgram(**{**common, **bad, "norm_eps": 1e-6})
    program = DepthwiseProgram(**common, norm_channels=96, norm_eps=1e-6)
    assert (program.segment_warps, program.segments) == (1, 4)
    assert [(p.segment_warps, p.segments) for p in (dataclasses.replace(program, lane_channels=1),
            dataclasses.replace(program, norm_channels=768, lane_channels=2))] == [(3, 1), (12, 1)]
    assert DepthwiseProgram.from_json(program.to_json()) == program
    x = torch.randn(1, 64, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = weight_for(DepthwiseProgram(**{**common, "dtype": torch.float16}), torch.randn(64, 1, 7, 7).half())
    with pytest.raises(ValueError, match="built for 96"):
        DepthwiseKernel(program, CUDA).launch_spec([x, w, torch.zeros(64), torch.ones(64), torch.zeros(64)])
    x96 = torch.randn(1, 96, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w96 = weight_for(program, torch.randn(96, 1, 7, 7).half())
    with pytest.raises(ValueError, match="LayerNorm weight and bias"):
        DepthwiseKernel(program, CUDA).launch_spec([x96, w96, torch.zeros(96), torch.ones(95), torch.zeros(96)])
    assert DepthwiseKernel(program, CUDA).launch_spec([x96, w96, torch.zeros(96), torch.ones(96),
                                                       torch.zeros(96)]).block == 128


from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 2), C=st.sampled_from([4, 12, 60, 96, 132, 260, 30, 7]), H=st.integers(1, 8), W=st.integers(1, 9),
       kh=st.integers(1, 7), kw=st.integers(1, 7), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       pad=st.integers(0, 3), cols=st.integers(1, 4), vc=st.sampled_from([1, 2, 4]),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_the_layer_norm_kernel_emulated_on_random_geometries(N, C, H, W, kh, kw, stride, dilation, pad, cols, vc,
                                                             dtype):
    """NOTE [Depthwise + LayerNorm] on random geometries: segments of one to nine warps with idle lanes, several
    segments a block with a last block partly empty, column groups past the row's end, padding, stride, dilation,
    one, two or four channels a lane."""
    assume(C % vc == 0)
    program = DepthwiseProgram("cuda", dtype, (kh, kw), (stride, stride), (pad, pad), (dilation, 1), True, "nhwc",
                               cols, "cuda:0", norm_channels=C, norm_eps=1e-5, lane_channels=vc)
    OH, OW = program.out_size(H, W)
    assume(OH >= 1 and OW >= 1)
    gen = torch.Generator().manual_seed(C * 31 + H * 7 + W)
    x = torch.randn(N, C, H, W, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, kh, kw, generator=gen).to(dtype), torch.randn(C, generator=gen)
    gamma, beta = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    conv = F.conv2d(x.double(), w.double(), b.double(), stride, pad, (dilation, 1), C).permute(0, 2, 3, 1)
    want = F.layer_norm(conv, (C,), gamma.double(), beta.double(), 1e-5)
    got = _emulate(program, [x, weight_for(program, w), b, gamma, beta])
    assert not got.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.permute(0, 2, 3, 1).double(), want, atol=tol * (want.abs().max().item() + 1),
                               rtol=0)
