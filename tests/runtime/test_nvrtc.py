"""fxopt.runtime.nvrtc: NVRTC compilation to cubin and caching (CPU), and load + launch through the driver (GPU)."""

from __future__ import annotations

import ctypes
import time

import pytest
import torch

from fxopt.errors import CompileError
from fxopt.runtime import cc, nvrtc

NVRTC_OK, NVRTC_WHY = nvrtc.nvrtc_available()
# NVRTC needs no GPU: it only has to be installed (pip install nvidia-cuda-nvrtc, or fxopt[cuda]).
needs_nvrtc = pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC not available: {NVRTC_WHY}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")

AXPB_SOURCE = r"""
extern "C" __global__ void axpb(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                                long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] * 2.0f + b[i];
}
"""


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path / "cache"))
    nvrtc.clear_memory_cache()
    yield tmp_path / "cache"
    nvrtc.clear_memory_cache()


@needs_nvrtc
def test_version_and_archs():
    major, minor = nvrtc.nvrtc_version()
    assert major >= 11
    print(f"\nNVRTC {major}.{minor} at {nvrtc.nvrtc_library_path()}")
    assert "sm_90" in nvrtc.supported_archs()


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_compile_to_cubin(arch):
    start = time.perf_counter()
    cubin = nvrtc.compile_cuda(AXPB_SOURCE, arch=arch, name_hint="axpb")
    print(f"\nNVRTC compile for {arch}: {time.perf_counter() - start:.3f} s, {len(cubin)} bytes")
    assert cubin.startswith(b"\x7fELF")
    assert b"axpb" in cubin


@needs_nvrtc
def test_cache_hits_skip_nvrtc(monkeypatch, isolated_cache):
    cubin = nvrtc.compile_cuda(AXPB_SOURCE, arch="sm_90")

    def fail(*args, **kwargs):
        raise AssertionError("NVRTC invoked on a cache hit")

    monkeypatch.setattr(nvrtc, "_nvrtc_compile", fail)
    assert nvrtc.compile_cuda(AXPB_SOURCE, arch="sm_90") is cubin  # memory
    nvrtc.clear_memory_cache()
    assert nvrtc.compile_cuda(AXPB_SOURCE, arch="sm_90") == cubin  # disk
    assert len(list((isolated_cache / "cuda").glob("*.cubin"))) == 1
    # A different arch or option is a different entry.
    with pytest.raises(AssertionError, match="cache hit"):
        nvrtc.compile_cuda(AXPB_SOURCE, arch="sm_80")
    with pytest.raises(AssertionError, match="cache hit"):
        nvrtc.compile_cuda(AXPB_SOURCE, arch="sm_90", options=["-lineinfo"])


@needs_nvrtc
def test_syntax_error_raises_compile_error_with_log():
    source = 'extern "C" __global__ void bad(float* o) { o[0] = 1.0f }'
    with pytest.raises(CompileError) as info:
        nvrtc.compile_cuda(source, arch="sm_90", name_hint="bad")
    message = str(info.value)
    assert "bad.cu" in message
    assert 'expected a ";"' in message  # NVRTC's own diagnostic
    assert "--gpu-architecture=sm_90" in message


@needs_nvrtc
def test_virtual_arch_rejected():
    with pytest.raises(ValueError, match="sm_90"):
        nvrtc.compile_cuda(AXPB_SOURCE, arch="compute_90")


@pytest.mark.skipif(cc.compiler_info() is None, reason="no C++ compiler to build a cuLaunchKernel stand-in")
def test_launcher_packs_arguments():
    """The Launcher's argument storage and kernelParams, checked on the CPU through a C stand-in for cuLaunchKernel."""
    stub = cc.compile_cpp(
        r"""
        #include <cstdint>
        #include <cstring>
        static uint64_t seen[16];
        extern "C" int fake_launch(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                   unsigned bz, unsigned shmem, void* stream, void** params, void** extra) {
            seen[0] = (uint64_t)f; seen[1] = gx; seen[2] = gy; seen[3] = gz; seen[4] = bx; seen[5] = by;
            seen[6] = bz; seen[7] = shmem; seen[8] = (uint64_t)stream; seen[15] = (uint64_t)extra;
            void* p; std::memcpy(&p, params[0], 8); seen[9] = (uint64_t)p;
            int32_t i32; std::memcpy(&i32, params[1], 4); seen[10] = (uint64_t)(int64_t)i32;
            int64_t i64; std::memcpy(&i64, params[2], 8); seen[11] = (uint64_t)i64;
            float f32; std::memcpy(&f32, params[3], 4); double d = f32; std::memcpy(&seen[12], &d, 8);
            std::memcpy(&seen[13], params[4], 8);  // f64
            return 0;
        }
        extern "C" uint64_t get_seen(int i) { return seen[i]; }
        """,
        name_hint="fake_launch",
    )
    nvrtc._declare_launch(stub.fake_launch)
    stub.get_seen.argtypes = [ctypes.c_int]
    stub.get_seen.restype = ctypes.c_uint64

    def seen(i):
        return stub.get_seen(i)

    def seen_f64(i):
        return ctypes.c_double.from_buffer_copy(ctypes.c_uint64(seen(i))).value

    launch = nvrtc.Launcher(0xABC0, ["ptr", "i32", "i64", "f32", "f64"], stub.fake_launch)
    for grid, block, dims in [(7, 128, (7, 1, 1, 128, 1, 1)), ((2, 3), (32, 4, 2), (2, 3, 1, 32, 4, 2))]:
        launch.shared_mem = 96
        launch(grid, block, 0x5000, 0xDEAD_BEEF_0000, -5, -(2**40), 1.5, -2.25)
        assert tuple(seen(i) for i in range(1, 7)) == dims
        assert (seen(0), seen(7), seen(8), seen(15)) == (0xABC0, 96, 0x5000, 0)
        assert seen(9) == 0xDEAD_BEEF_0000
        assert ctypes.c_int64(seen(10)).value == -5
        assert ctypes.c_int64(seen(11)).value == -(2**40)
        assert seen_f64(12) == 1.5 and seen_f64(13) == -2.25
    with pytest.raises(TypeError, match="do not match"):
        launch(1, 1, 0, 0, 1, 2, 3.0)  # one argument short
    with pytest.raises(TypeError, match="do not match"):
        launch(1, 1, 0, 0, 1.5, 2, 3.0, 4.0)  # float for an i32
    with pytest.raises(ValueError, match="unknown kernel argument types"):
        nvrtc.Launcher(0, ["ptr", "f16"], stub.fake_launch)


def test_launcher_without_trampoline_launches_through_ctypes(monkeypatch, caplog):
    """NOTE [Launch trampoline]: a compiler that is found but fails to build the trampoline only costs speed. The
    fallback logs why and the Launcher calls cuLaunchKernel (here a Python stand-in) directly, no compiler needed."""
    def broken_compile(source, *, name_hint="kernel"):
        raise CompileError(f"C++ kernel {name_hint!r} failed to compile (exit 1)")

    monkeypatch.setattr(cc, "compiler_info", lambda: object())  # a compiler is found ...
    monkeypatch.setattr(cc, "compile_cpp", broken_compile)  # ... and fails
    u, vp = ctypes.c_uint, ctypes.c_void_p
    seen = []

    @ctypes.CFUNCTYPE(ctypes.c_int, vp, u, u, u, u, u, u, u, vp, vp, vp)
    def fake_launch(func, gx, gy, gz, bx, by, bz, shmem, stream, params, extra):
        slots = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        seen.append((func, (gx, gy, gz), (bx, by, bz), shmem, stream, extra,
                     ctypes.c_int64.from_address(slots[0]).value, ctypes.c_double.from_address(slots[1]).value))
        return 0

    nvrtc._trampoline.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=nvrtc.__name__):
            launch = nvrtc.Launcher(0xABC0, ["i64", "f64"], fake_launch)
        assert launch.prepared(4, 64) == ()  # no inline trampoline path for generated callers
        launch.shared_mem = 32
        launch((2, 3), 128, 0x5000, -(2**40), 2.5)
    finally:
        nvrtc._trampoline.cache_clear()  # later tests build the real trampoline again
    assert "launch trampoline unavailable" in caplog.text and "failed to compile" in caplog.text
    assert seen == [(0xABC0, (2, 3, 1), (128, 1, 1), 32, 0x5000, None, -(2**40), 2.5)]


@needs_nvrtc
@needs_gpu
@pytest.mark.cuda
def test_load_and_launch_on_gpu():
    n = 10_000
    a = torch.randn(n, device="cuda")
    b = torch.randn(n, device="cuda")
    out = torch.empty_like(a)
    cubin = nvrtc.compile_cuda(AXPB_SOURCE, arch=nvrtc.current_arch(), name_hint="axpb")
    module = nvrtc.load_module(cubin)
    assert nvrtc.load_module(cubin) is module
    fn = module.function("axpb")
    assert module.function("axpb") is fn
    assert fn.max_threads_per_block >= 256
    assert nvrtc.sm_count() > 0
    launch = fn.launcher(["ptr", "ptr", "ptr", "i64"])
    block = 256
    grid = (n + block - 1) // block
    launch(grid, block, torch.cuda.current_stream().cuda_stream, a.data_ptr(), b.data_ptr(), out.data_ptr(), n)
    torch.testing.assert_close(out, a * 2 + b)

    # Captured into a CUDA graph on the capture stream, then replayed with new inputs in the same buffers.
    graph = torch.cuda.CUDAGraph()
    out.zero_()
    with torch.cuda.graph(graph):
        stream = torch.cuda.current_stream().cuda_stream
        launch(grid, block, stream, a.data_ptr(), b.data_ptr(), out.data_ptr(), n)
    a.copy_(torch.randn(n, device="cuda"))
    b.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, a * 2 + 3.0)


@needs_nvrtc
@needs_gpu
@pytest.mark.cuda
def test_launch_from_new_thread_and_errors():
    import threading

    module = nvrtc.load_module(nvrtc.compile_cuda(AXPB_SOURCE, arch=nvrtc.current_arch()))
    launch = module.function("axpb").launcher(["ptr", "ptr", "ptr", "i64"])
    a = torch.ones(64, device="cuda")
    out = torch.empty_like(a)
    errors = []

    def worker():
        # A fresh thread may have no current CUDA context; the launcher recovers from CUDA_ERROR_INVALID_CONTEXT.
        try:
            launch(1, 64, 0, a.data_ptr(), a.data_ptr(), out.data_ptr(), 64)
        except RuntimeError as exc:  # surfaced to the main thread below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert not errors
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(a, 3.0))
    with pytest.raises(RuntimeError, match="CUDA_ERROR"):
        launch(1, 4096, 0, a.data_ptr(), a.data_ptr(), out.data_ptr(), 64)  # block too large
    with pytest.raises(RuntimeError, match="CUDA_ERROR_NOT_FOUND"):
        module.function("no_such_kernel")
