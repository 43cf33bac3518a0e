"""fxopt.runtime.driver: the CUDA driver through cuda-bindings. On the CPU: argument packing, error names, and every
driver call fxopt makes against a stand-in libcuda.so.1 (built here) in a fresh interpreter; on the GPU (marked
``cuda``): real loads and launches."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("cuda.bindings", reason="cuda-bindings is not installed (pip install 'fxopt[cuda]')")

from fxopt.errors import CompileError  # noqa: E402 -- after the skip
from fxopt.runtime import cc, driver, nvrtc  # noqa: E402

NVRTC_OK, NVRTC_WHY = nvrtc.nvrtc_available()
needs_nvrtc = pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC not available: {NVRTC_WHY}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")
needs_compiler = pytest.mark.skipif(cc.compiler_info() is None, reason="no C++ compiler to build the stand-in")

AXPB_SOURCE = r"""
extern "C" __global__ void axpb(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                                long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] * 2.0f + b[i];
}
"""


@pytest.mark.skipif(cc.compiler_info() is None, reason="no C++ compiler to build a cuLaunchKernel stand-in")
def test_launcher_packs_arguments():
    """The Launcher's argument storage and kernelParams, checked on the CPU through a C stand-in for cuLaunchKernel
    called by the trampoline (NOTE [Launch trampoline])."""
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
    driver._declare_launch(stub.fake_launch)
    stub.get_seen.argtypes = [ctypes.c_int]
    stub.get_seen.restype = ctypes.c_uint64

    def seen(i):
        return stub.get_seen(i)

    def seen_f64(i):
        return ctypes.c_double.from_buffer_copy(ctypes.c_uint64(seen(i))).value

    launch = driver.Launcher(0xABC0, ["ptr", "i32", "i64", "f32", "f64"], stub.fake_launch)
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
        driver.Launcher(0, ["ptr", "f16"], stub.fake_launch)


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

    driver._trampoline.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=driver.__name__):
            launch = driver.Launcher(0xABC0, ["i64", "f64"], fake_launch)
        assert launch.prepared(4, 64) == ()  # no inline trampoline path for generated callers
        launch.shared_mem = 32
        launch((2, 3), 128, 0x5000, -(2**40), 2.5)
    finally:
        driver._trampoline.cache_clear()  # later tests build the real trampoline again
    assert "launch trampoline unavailable" in caplog.text and "failed to compile" in caplog.text
    assert seen == [(0xABC0, (2, 3, 1), (128, 1, 1), 32, 0x5000, None, -(2**40), 2.5)]


def test_error_text_names_the_code_without_a_driver():
    assert driver.error_text(201).startswith("CUDA_ERROR_INVALID_CONTEXT (201)")
    assert driver.error_text(driver.cu.CUresult.CUDA_ERROR_NOT_FOUND).startswith("CUDA_ERROR_NOT_FOUND (500)")
    assert driver.error_text(123456) == "CUDA_ERROR_? (123456)"
    driver.check(driver.cu.CUresult.CUDA_SUCCESS, "nothing")
    with pytest.raises(RuntimeError, match=r"cuThing failed: CUDA_ERROR_INVALID_VALUE \(1\)"):
        driver.check(driver.cu.CUresult.CUDA_ERROR_INVALID_VALUE, "cuThing")


# A libcuda.so.1 that records what it is given: cuda-bindings finds it already loaded (by its soname) and resolves
# every entry point through its cuGetProcAddress_v2. Contexts are per thread, as the driver's are.
_STAND_IN = r"""
#include <cstdint>
#include <cstring>
typedef int CUresult;
struct NodeParams { void* func; unsigned gx, gy, gz, bx, by, bz, shmem; void** params; void** extra; void* kern; void* ctx; };
static uint64_t rec[64];
static thread_local void* current_ctx;
static void* deps[1] = {(void*)0x3000};
static uint64_t edges[2];
extern "C" {
int fake_nparams = 4;
uint64_t fake_record(int i) { return rec[i]; }
CUresult cuInit(unsigned) { return 0; }
CUresult cuGetExportTable(const void** table, const void*) { *table = nullptr; return 500; }  // libnvrtc asks
CUresult cuDriverGetVersion(int* v) { *v = 13000; return 0; }
CUresult cuGetErrorName(CUresult e, const char** s) { *s = "CUDA_ERROR_?"; return 0; }
CUresult cuGetErrorString(CUresult e, const char** s) { *s = e == 500 ? "named symbol not found" : "stand-in"; return 0; }
CUresult cuCtxGetCurrent(void** c) { *c = current_ctx; return 0; }
CUresult cuCtxSetCurrent(void* c) { current_ctx = c; rec[20]++; return 0; }
CUresult cuCtxGetDevice(int* d) { *d = 0; return current_ctx ? 0 : 201; }
CUresult cuDeviceGet(int* d, int o) { *d = o; return 0; }
CUresult cuDevicePrimaryCtxRetain(void** c, int d) { *c = (void*)(0xC0 + (uintptr_t)d); return 0; }
CUresult cuModuleLoadData(void** m, const void* image) {
  if (!current_ctx) return 201;
  if (std::memcmp(image, "\177ELF", 4)) return 200;
  *m = (void*)(0x1000 + rec[23]++); return 0;
}
CUresult cuModuleGetFunction(void** f, void* m, const char* n) {
  if (!std::strcmp(n, "no_such_kernel")) return 500;
  *f = (void*)(uintptr_t)(std::strcmp(n, "axpb") ? 0x2100 : 0x2000); return 0;
}
CUresult cuFuncGetAttribute(int* v, int a, void*) { *v = a == 0 ? 768 : a == 4 ? 40 : -1; return 0; }
CUresult cuFuncSetAttribute(void*, int a, int v) { rec[21] = a; rec[22] = v; return 0; }
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shmem, void* stream, void** params, void** extra) {
  if (!current_ctx) return 201;
  if (bx * by * bz > 1024) return 1;
  uint64_t head[] = {(uint64_t)f, gx, gy, gz, bx, by, bz, shmem, (uint64_t)stream, (uint64_t)extra};
  std::memcpy(rec, head, sizeof head);
  for (int i = 0; i < fake_nparams; ++i) std::memcpy(&rec[10 + i], params[i], 8);
  rec[19]++;
  return 0;
}
CUresult cuStreamGetCaptureInfo_v3(void*, int* status, uint64_t* id, void** graph, void*** d, void** e, size_t* n) {
  *status = 1; *id = 7; *graph = (void*)0x4000; *d = deps; *e = edges; *n = 1; return 0;
}
CUresult cuStreamGetCaptureInfo_v2(void*, int* status, uint64_t* id, void** graph, void*** d, size_t* n) {
  *status = 1; *id = 7; *graph = (void*)0x4000; *d = deps; *n = 1; return 0;
}
CUresult cuGraphExecKernelNodeSetParams(void* exec, void* node, const NodeParams* p) {
  uint64_t seen[] = {(uint64_t)exec, (uint64_t)node, (uint64_t)p->func, p->gx, p->bx, p->shmem};
  std::memcpy(&rec[30], seen, sizeof seen);
  for (int i = 0; i < 3; ++i) std::memcpy(&rec[36 + i], p->params[i], 8);
  return 0;
}
CUresult cuGraphLaunch(void* exec, void*) { rec[40] = (uint64_t)exec; return 0; }
CUresult cuGraphGetNodes(void*, void**, size_t* n) { *n = 7; return 0; }
CUresult cuGetProcAddress_v2(const char* s, void** p, int, uint64_t flags, int* status);
}
static void* lookup(const char* s, int version) {
#define E(n) if (!std::strcmp(s, #n)) return (void*)n;
  E(cuInit) E(cuDriverGetVersion) E(cuGetErrorName) E(cuGetErrorString) E(cuCtxGetCurrent) E(cuCtxSetCurrent)
  E(cuCtxGetDevice) E(cuDeviceGet) E(cuDevicePrimaryCtxRetain) E(cuModuleLoadData) E(cuModuleGetFunction)
  E(cuFuncGetAttribute) E(cuFuncSetAttribute) E(cuLaunchKernel) E(cuGraphLaunch)
  E(cuGraphExecKernelNodeSetParams) E(cuGraphGetNodes) E(cuGetProcAddress_v2)
  if (!std::strcmp(s, "cuGetProcAddress")) return (void*)cuGetProcAddress_v2;
  if (!std::strcmp(s, "cuStreamGetCaptureInfo"))  // the ABI follows the version asked for, as the driver's does
    return version >= 12030 ? (void*)cuStreamGetCaptureInfo_v3 : (void*)cuStreamGetCaptureInfo_v2;
  return nullptr;
}
extern "C" CUresult cuGetProcAddress_v2(const char* s, void** p, int version, uint64_t flags, int* status) {
  rec[50] = flags; *p = lookup(s, version);
  if (status) *status = *p ? 0 : 1;
  return *p ? 0 : 500;
}
"""

# Run in a fresh interpreter: cuda-bindings binds libcuda once per process, and this one must be the stand-in.
_SCRIPT = r"""
import ctypes, os, sys, threading
import torch

fake = ctypes.CDLL(sys.argv[1], mode=os.RTLD_GLOBAL)
fake.fake_record.restype = ctypes.c_uint64
rec, nparams = fake.fake_record, ctypes.c_int.in_dll(fake, "fake_nparams")
address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value
torch.cuda.init = lambda: None  # a CPU build of torch: device 0 of compute capability 9.0
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_capability = lambda device=None: (9, 0)
from fxopt.runtime import driver, nvrtc

# context, module, function, attributes
module = driver.load_module(b"\x7fELF not really")
assert driver.load_module(b"\x7fELF not really") is module and module.handle == 0x1000, module
assert rec(20) == 1  # the primary context made current once
fn = module.function("axpb")
assert (fn.handle, module.function("axpb") is fn, fn.max_threads_per_block, fn.num_regs) == (0x2000, True, 768, 40)
fn.set_max_dynamic_shared_mem(65536)
assert (rec(21), rec(22)) == (8, 65536)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
try:
    module.function("no_such_kernel")
    raise AssertionError("no error")
except RuntimeError as e:
    assert "kernel no_such_kernel failed: CUDA_ERROR_NOT_FOUND (500): named symbol not found" in str(e), e

# a launch (through the trampoline): configuration and values as the driver sees them
launch = fn.launcher(["ptr", "i64", "f64", "i32"], shared_mem=96)
launch((2, 3), 128, 0x5000, 0xDEAD0000, -5, 2.5, 7)
assert [rec(i) for i in range(10)] == [0x2000, 2, 3, 1, 128, 1, 1, 96, 0x5000, 0], [rec(i) for i in range(10)]
values = (rec(10), ctypes.c_int64(rec(11)).value, ctypes.c_double.from_buffer_copy(ctypes.c_uint64(rec(12))).value,
          rec(13))
assert values == (0xDEAD0000, -5, 2.5, 7), values

# the generated call path's inline launch
pack, storage, offset, config, tramp, storage_address = launch.prepared(4, 64)
pack(storage, offset, *config, 0x6000, 1, 2, 3.0, 4)
assert not tramp(storage_address)
assert (rec(1), rec(4), rec(8), rec(10), rec(13)) == (4, 64, 0x6000, 1, 4)

# a fresh thread has no current context: the launcher makes torch's current and launches once more, directly
errors, before = [], rec(19)
def worker():
    try:
        launch(1, 32, 0x7000, 5, 6, 7.0, 8)
    except Exception as e:
        errors.append(e)
t = threading.Thread(target=worker)
t.start()
t.join()
assert not errors and rec(19) == before + 1 and rec(8) == 0x7000 and rec(20) == 2, (errors, rec(19), rec(20))
try:
    launch(1, 2048, 0, 1, 2, 3.0, 4)
    raise AssertionError("no error")
except RuntimeError as e:
    assert "cuLaunchKernel(axpb, grid=(1, 1, 1), block=(2048, 1, 1), shared_mem=96) failed: " \
           "CUDA_ERROR_INVALID_VALUE (1)" in str(e), e

# without a C++ compiler: the same storage through the raw cuLaunchKernel (ctypes, GIL held)
from fxopt.runtime import cc
driver._trampoline.cache_clear()
cc.compiler_info = lambda: None
plain = fn.launcher(["ptr", "i64", "f64", "i32"])
assert plain.prepared(1, 1) == ()
plain(5, 32, 0x8000, 9, 10, 11.0, 12)
assert (rec(1), rec(4), rec(8), rec(10), rec(11), rec(13)) == (5, 32, 0x8000, 9, 10, 12)

# raw entry points (legacy-stream variants): the GIL-holding ctypes calls and native_call.cpp's
assert rec(50) == 1  # CU_GET_PROC_ADDRESS_LEGACY_STREAM
nparams.value = 2
spec = fn.launcher(["ptr", "i64"]).native(3, 256)
assert spec == (0x2000, address(fake.cuLaunchKernel), (3, 1, 1), (256, 1, 1), 0), spec
assert driver.entry_point("cuGraphLaunch", 10000) == address(fake.cuGraphLaunch)

# graphs
assert driver.capture_tail(0x5000) == 0x3000
assert driver.graph_node_count(0x4000) == 7

# graph_io: its copy kernel (compiled by NVRTC), node found at capture, pointed per call
if nvrtc.nvrtc_available()[0]:
    from fxopt.runtime import graph_io
    nparams.value = 3
    node = graph_io.CopyNode(0, 0x5000, 0x100, 0x200, 4096)
    assert (rec(0), rec(8), rec(10), rec(11), rec(12)) == (0x2100, 0x5000, 0x100, 0x200, 4096)
    node.attach(0x6000)
    node.point(0x300, 0x200, 64)
    assert [rec(i) for i in range(30, 39)] == [0x6000, 0x3000, 0x2100, 1, 256, 0, 0x300, 0x200, 64]
    api = graph_io._api()
    assert (api.set_params_address, api.graph_launch_address) == (address(fake.cuGraphExecKernelNodeSetParams),
                                                                  address(fake.cuGraphLaunch))
    assert graph_io.available() in (None, "this torch's CUDAGraph has no raw_cuda_graph_exec()")
print("ok")
"""


@needs_compiler
def test_every_driver_call_against_a_stand_in_libcuda(tmp_path):
    """The cuda-bindings calling conventions fxopt relies on ((err, value) tuples, handles as ints or objects,
    cuGetProcAddress) and the raw entry points it calls, checked on the CPU: a mistake here would otherwise first
    show on the GPU."""
    src, lib = tmp_path / "libcuda.cpp", tmp_path / "libcuda.so.1"
    src.write_text(_STAND_IN)
    info = cc.compiler_info()
    built = subprocess.run([*info.command, "-std=c++17", "-O1", "-fPIC", "-shared", "-Wl,-soname,libcuda.so.1",
                            str(src), "-o", str(lib)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    env = {**os.environ, "FXOPT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT), str(lib)], capture_output=True, text=True,
                          timeout=300, check=False, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


@needs_nvrtc
@needs_gpu
@pytest.mark.cuda
def test_load_and_launch_on_gpu():
    n = 10_000
    a = torch.randn(n, device="cuda")
    b = torch.randn(n, device="cuda")
    out = torch.empty_like(a)
    cubin = nvrtc.compile_cuda(AXPB_SOURCE, arch=nvrtc.current_arch(), name_hint="axpb")
    module = driver.load_module(cubin)
    assert driver.load_module(cubin) is module
    fn = module.function("axpb")
    assert module.function("axpb") is fn
    assert fn.max_threads_per_block >= 256 and fn.num_regs > 0
    assert driver.sm_count() > 0
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

    module = driver.load_module(nvrtc.compile_cuda(AXPB_SOURCE, arch=nvrtc.current_arch()))
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

