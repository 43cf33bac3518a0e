"""The CUDA C++ printer: the source of every fused region compiles with NVRTC (no GPU needed), and on a GPU the
CUDA backend matches eager (random DAGs, float16/bfloat16, vector and tail paths, CUDA graph capture).

Regions come from the CPU pipeline (backend="cpp"): the region IR is target-independent, so the same regions are
printed again with ``cuda_source`` and compiled for sm_90. A CUDA syntax or type error fails here.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from typing import Any
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import models
from fxopt.codegen import printer
from fxopt.codegen.printer import cuda_source, header_text
from fxopt.errors import CompileError
from fxopt.runtime import nvrtc
from fxopt.runtime.kernel import FusedKernel, fused_op, lookup

NVRTC_OK, NVRTC_WHY = nvrtc.nvrtc_available()
needs_nvrtc = pytest.mark.skipif(
    not NVRTC_OK, reason=f"NVRTC is not available ({NVRTC_WHY}); pip install nvidia-cuda-nvrtc (fxopt[cuda])")
ARCH = "sm_90"
TESTS = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    """A sibling test module by path (pytest runs with --import-mode=importlib: tests are not a package)."""
    key = f"_fxopt_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _compile(source: str, what: str) -> bytes:
    try:
        cubin = nvrtc.compile_cuda(source, arch=ARCH, name_hint=what)
    except CompileError as e:
        pytest.fail(f"generated CUDA source of {what} does not compile:\n{e}\n--- source ---\n"
                    f"{source[len(header_text()):] if source.startswith(header_text()) else source}")
    assert cubin.startswith(b"\x7fELF")
    return cubin


@needs_nvrtc
def test_a_cuda_syntax_error_fails_the_check():
    """The check above is real: NVRTC errors surface as test failures, with the log."""
    broken = header_text() + 'extern "C" __global__ void broken(float* p) { p[0] = fx_no_such_helper(1.0f) }\n'
    with pytest.raises(pytest.fail.Exception, match="does not compile"):
        _compile(broken, "broken")


def _fused_kernels(opt) -> list[FusedKernel]:
    return [k for k in opt.kernels.values() if isinstance(k, FusedKernel)]


# ---------------------------------------------------------------------------------------------------------------
# the zoo: every kernel it produces, printed for CUDA and compiled exactly as the CUDA backend would
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_kernels() -> dict[str, list[FusedKernel]]:
    out = {}
    for name in models.names():
        model, inputs = models.get(name).build(device="cpu")
        opt = fxopt.optimize(model, inputs, backend="cpp")
        out[name] = _fused_kernels(opt)
    return out


@needs_nvrtc
@pytest.mark.parametrize("name", models.names())
def test_zoo_kernels_compile_for_cuda(zoo_kernels, name):
    for kernel in zoo_kernels[name]:
        src = cuda_source(kernel.region, kernel.modes)
        cubin = _compile(src, kernel.name)
        for entry in ("_flat", "_vec", "_strided" if kernel.region.ndim else "_flat"):
            assert f"{kernel.region.name}{entry}".encode() in cubin, entry


@needs_nvrtc
@pytest.mark.parametrize("index32", [0, 1, 2])
def test_zoo_strided_kernels_specialized_to_a_shape_compile_for_cuda(zoo_kernels, index32):
    # NOTE [Kernels for one shape]: every integer argument a constant; 64-bit, 32-bit and vector iteration
    from fxopt.codegen.printer import cuda_strided_source, strided_int_params, strided_specialized_name
    from fxopt.runtime.strides import contiguous_strides, divider32

    kernels = {k.region.name: k for ks in zoo_kernels.values() for k in ks
               if k.region.ndim >= 1 and k.region.scatter_dim is None}
    assert kernels
    for kernel in kernels.values():
        region = kernel.region
        sizes = tuple(3 if d < region.ndim - 1 else 16 for d in range(region.ndim))
        n_t = len(region.input_dtypes) + len(region.outputs)
        strides = [s for t in range(n_t) for s in (contiguous_strides(sizes) if t else (0,) * region.ndim)]
        dividers = tuple(divider32(s) if index32 else 0 for s in sizes)
        values = (math.prod(sizes), index32, *sizes, *dividers, *strides)
        constants = dict(zip(strided_int_params(region), values))
        source = cuda_strided_source(region, constants, 256)
        name = strided_specialized_name(region, constants, 256)
        assert "__launch_bounds__(256)" in source and f"constexpr int64_t index32 = {index32};" in source
        cubin = _compile(source, name)
        assert name.encode() in cubin and f"{region.name}_vec".encode() not in cubin


def test_zoo_produces_fused_kernels(zoo_kernels):
    """Not vacuous: the zoo yields several kernels, among them the 16-op chain."""
    all_kernels = [k for ks in zoo_kernels.values() for k in ks]
    assert len(all_kernels) >= 3
    assert any(len(k.op_names) == 16 for k in zoo_kernels["elementwise_chain"])


# ---------------------------------------------------------------------------------------------------------------
# every op of the table, every dtype: the regions of tests/test_ops.py, printed for CUDA, compiled together
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table_kernels() -> list[tuple[str, FusedKernel]]:
    """(case id, kernel) for every row x dtype of the op table, lowered by the real pass with the C++ compile
    skipped (only the region and modes are needed here; tests/test_ops.py compiles and runs them on CPU)."""
    test_ops = _load("test_ops", TESTS / "test_ops.py")
    out = []
    for case in test_ops.CASES:
        for dtype in case.dtypes:
            for kernel in test_ops._kernels_without_compiling(case, dtype):
                out.append((f"{case.id}-{dtype}", kernel))
    return out


# Regions with a known C++/CUDA compile bug (tests/test_ops.py KNOWN_BUGS): compiled on their own, as strict xfails.
KNOWN_BROKEN_OPS = {"relu6"}


def _dtype_class(d: torch.dtype) -> str:
    if d in (torch.float32, torch.float64):
        return "float"
    if d in (torch.float16, torch.bfloat16):
        return "half"
    return "bool" if d == torch.bool else "int"


def covering_set(table_kernels) -> list[tuple[str, FusedKernel]]:
    """Regions covering every (op, dtype class) pair of the table, and every dtype at least once: the helpers'
    overloads differ by class (float/double, 16-bit storage, integer templates, bool), and ~0.15 s of NVRTC per
    region makes the full rows x dtypes product too slow for CI."""
    seen_pairs: set = set()
    seen_dtypes: set = set()
    chosen = []
    for case_id, kernel in table_kernels:
        dtypes = {*kernel.input_dtypes, *kernel.output_dtypes}
        pair = (kernel.op_names[0], _dtype_class(kernel.input_dtypes[0]) if kernel.input_dtypes else "none")
        if pair not in seen_pairs or not dtypes <= seen_dtypes:
            chosen.append((case_id, kernel))
            seen_pairs.add(pair)
            seen_dtypes |= dtypes
    return chosen


@needs_nvrtc
def test_table_kernels_compile_for_cuda(table_kernels):
    """The covering set in one NVRTC program (one header, every kernel body). On failure, each region is compiled
    alone to name the ones that break."""
    header = header_text()
    bodies = {}
    for case_id, kernel in covering_set(table_kernels):
        if KNOWN_BROKEN_OPS & set(kernel.op_names):
            continue
        src = cuda_source(kernel.region, kernel.modes)
        assert src.startswith(header)
        bodies.setdefault(kernel.region.name, (case_id, src[len(header):]))
    assert len(bodies) >= 100
    program = header + "\n".join(body for _, body in bodies.values())
    try:
        cubin = nvrtc.compile_cuda(program, arch=ARCH, name_hint="fxopt_op_table")
    except CompileError as e:
        failing = []
        for name, (case_id, body) in bodies.items():
            try:
                nvrtc.compile_cuda(header + body, arch=ARCH, name_hint=name)
            except CompileError as one:
                failing.append(f"{case_id} ({name}):\n{str(one)[-1500:]}")
        pytest.fail(f"{len(failing)} of {len(bodies)} regions do not compile for CUDA:\n" + "\n\n".join(failing)
                    if failing else f"the combined program does not compile, every region alone does:\n{e}")
    for name in bodies:  # a region with rotated reads has only its strided kernel (NOTE [Gathering reads])
        assert f"{name}_flat".encode() in cubin or f"{name}_strided".encode() in cubin


@needs_nvrtc
def test_relu6_region_compiles_for_cuda():
    """relu6 once printed fx_clamp(x, 0, 6) with int literals, which no float T deduces; it is hardtanh(0, 6) now."""
    import torch.nn.functional as F

    class M(nn.Module):
        def forward(self, x):
            return F.relu6(x * 2.0) + 1.0

    opt = fxopt.optimize(M(), [torch.randn(4, 8)], backend="cpp", strict=True)
    (kernel,) = opt.kernels.values()
    assert "hardtanh" in kernel.op_names
    nvrtc.compile_cuda(cuda_source(kernel.region, kernel.modes), arch=ARCH, name_hint=kernel.name)


def test_table_regions_cover_every_op_and_dtype(table_kernels):
    from fxopt import ops

    covering = covering_set(table_kernels)
    seen_ops = {op for _, k in covering for op in k.op_names}
    assert seen_ops == set(ops.ELEMENTWISE_OPS), set(ops.ELEMENTWISE_OPS) ^ seen_ops
    dtypes = {d for _, k in covering for d in (*k.input_dtypes, *k.output_dtypes)}
    for d in (torch.float16, torch.bfloat16, torch.float64, torch.float32, torch.int32, torch.int64, torch.bool,
              torch.uint8, torch.int8, torch.int16):
        assert d in dtypes, d


@needs_nvrtc
def test_cuda_source_of_a_zero_dim_region_has_no_strided_kernel():
    """ndim 0 regions print flat and vec entry points only, and still compile."""
    class M(nn.Module):
        def forward(self, x, y):
            return (x * y).sigmoid()

    opt = fxopt.optimize(M(), [torch.tensor(1.5), torch.tensor(-2.0)], backend="cpp", strict=True)
    (kernel,) = _fused_kernels(opt)
    src = cuda_source(kernel.region, kernel.modes)
    assert f"{kernel.region.name}_strided" not in src
    _compile(src, kernel.name)


def test_vector_width_is_16_bytes_of_the_widest_tensor():
    class M(nn.Module):
        def forward(self, x, y):
            return (x.float() + y).relu()

    opt = fxopt.optimize(M(), [torch.randn(4, 8).half(), torch.randn(4, 8).double()], backend="cpp", strict=True)
    (kernel,) = _fused_kernels(opt)
    assert printer.vector_width(kernel.region, kernel.modes) == 2  # double: 16 bytes = 2 elements


# ---------------------------------------------------------------------------------------------------------------
# on a GPU: the CUDA backend
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_kernel_registry(monkeypatch):
    """An empty kernel registry for this test: KERNELS is per process and keyed by region only, so a region
    already built for the CPU would be handed to the CUDA graph (test_same_region_on_cpu_then_cuda)."""
    from fxopt.runtime import kernel as kernel_mod

    monkeypatch.setattr(kernel_mod, "KERNELS", {})


@pytest.mark.cuda
def test_same_region_on_cpu_then_cuda():
    class M(nn.Module):
        def forward(self, x):
            return torch.relu(x * 1.40625).sigmoid()

    x = torch.randn(8, 32)
    cpu = fxopt.optimize(M(), [x], backend="cpp", strict=True)
    xc = x.cuda()
    gpu = fxopt.optimize(M(), [xc], backend="cuda", strict=True)
    with torch.no_grad():
        assert fxopt.verify.compare(gpu(xc).cpu(), cpu(x)) is None


@pytest.mark.cuda
def test_random_elementwise_dags_match_eager_on_cuda(fresh_kernel_registry):
    from hypothesis import HealthCheck, given, settings

    fuse_tests = _load("test_fuse_elementwise", TESTS / "passes" / "test_fuse_elementwise.py")

    @settings(max_examples=fuse_tests.PROPERTY_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(dag=fuse_tests.dags())
    def prop(dag):
        fuse_tests.check_dag(dag, device="cuda", backend="cuda")

    prop()


class _HalfChain(nn.Module):
    def forward(self, x, y):
        return torch.sigmoid(x * 1.5 + y).tanh() * x - 0.25


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [4096, 4099, 7])  # vector path; vector path + tail; tail only
def test_half_precision_on_cuda(fresh_kernel_registry, dtype, n):
    x = torch.randn(3, n, device="cuda").to(dtype)
    y = torch.randn(3, n, device="cuda").to(dtype)
    model = _HalfChain()
    with torch.no_grad():
        expected = model(x, y)
    opt = fxopt.optimize(model, [x, y], backend="cuda", strict=True)
    assert len([n_ for n_ in opt.graph_module.graph.nodes if n_.target is fused_op]) == 1
    with torch.no_grad():
        actual = opt(x, y)
        torch.cuda.synchronize()
    assert actual.dtype == dtype and actual.device.type == "cuda"
    assert fxopt.verify.compare(actual, expected) is None
    # same shape and strides one element off 16-byte alignment: the cached plan is the vector one, and the kernel
    # itself must notice the misaligned pointers (it once faulted here: misaligned address)
    xo, yo = (torch.cat([t.view(-1), t.view(-1)[:1]])[1:].view(3, n) for t in (x, y))
    assert xo.data_ptr() % 16 != 0 and xo.stride() == x.stride()
    with torch.no_grad():
        assert fxopt.verify.compare(opt(xo, yo), model(xo, yo)) is None
        torch.cuda.synchronize()
    # inputs one element off 16-byte alignment take the scalar path, same results
    xs, ys = (t.view(-1)[1:1 + 3 * (n - 1)].view(3, n - 1) for t in (x, y))
    assert xs.data_ptr() % 16 != 0
    opt2 = fxopt.optimize(model, [xs, ys], backend="cuda", strict=True)
    with torch.no_grad():
        assert fxopt.verify.compare(opt2(xs, ys), model(xs, ys)) is None


@pytest.mark.cuda
def test_channels_last_and_broadcast_on_cuda(fresh_kernel_registry):
    x = torch.randn(2, 8, 5, 7, device="cuda").to(memory_format=torch.channels_last)
    b = torch.randn(8, 1, 1, device="cuda")

    class M(nn.Module):
        def forward(self, x, b):
            return torch.relu(x + b) * 2

    opt = fxopt.optimize(M(), [x, b], backend="cuda", strict=True)
    with torch.no_grad():
        actual, expected = opt(x, b), M()(x, b)
    assert fxopt.verify.compare(actual, expected) is None
    assert actual.stride() == expected.stride()


@pytest.mark.cuda
def test_fused_kernel_in_a_cuda_graph(fresh_kernel_registry):
    model = models.ElementwiseChain()
    static_x = torch.randn(64, 1024, device="cuda")
    opt = fxopt.optimize(model, [static_x], backend="cuda", strict=True)
    assert len([n for n in opt.graph_module.graph.nodes if n.target is fused_op]) == 1
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(3):  # warm up (compiles, plans) outside the capture
            opt(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        static_out = opt(static_x)
    for _ in range(3):
        new = torch.randn(64, 1024, device="cuda")
        static_x.copy_(new)
        g.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            expected = model(new)
        assert fxopt.verify.compare(static_out, expected) is None


@pytest.mark.cuda
def test_fused_launches_from_several_threads_keep_their_own_arguments(fresh_kernel_registry):
    """NOTE [Launcher threads]: a launcher's argument storage belongs to one thread; others pack elsewhere."""
    import threading

    x0 = torch.randn(64, 257, device="cuda")
    opt = fxopt.optimize(_HalfChain(), [x0, x0], backend="cuda", strict=True)
    errors: list[str] = []

    def worker(seed: int) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        for _ in range(100):
            x, y = torch.randn(64, 257, device="cuda", generator=g), torch.randn(64, 257, device="cuda", generator=g)
            with torch.no_grad():
                why = fxopt.verify.compare(opt(x, y), _HalfChain()(x, y))
            if why is not None:
                errors.append(why)
                return

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


class _BiasGeluResidual(nn.Module):
    """ConvNeXt's tails: a bias broadcast over the last dim, GELU, a per-channel scale and a residual add."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(channels))
        self.gamma = nn.Parameter(torch.randn(channels))

    def forward(self, x, shortcut):
        return shortcut + self.gamma * torch.nn.functional.gelu(x + self.bias)


def test_strided_plans_get_coalesced_dims_on_cpu(fresh_kernel_registry):
    """NOTE [Strided iteration]: the bias makes the plan strided; the host hands it two dims, not four."""
    x, shortcut = torch.randn(1, 7, 7, 16), torch.randn(1, 7, 7, 16)
    model = _BiasGeluResidual(16)
    opt = fxopt.optimize(model, [x, shortcut], backend="cpp", strict=True)
    (kernel,) = _fused_kernels(opt)
    with torch.no_grad():
        assert fxopt.verify.compare(opt(x, shortcut), model(x, shortcut)) is None
    (plan,) = kernel._plans.values()
    assert plan.path == "strided" and plan.extra[0] == (1, 1, 49, 16)


@pytest.mark.cuda
@pytest.mark.parametrize("index32", [True, False])
def test_strided_kernel_in_32_and_64_bit_offsets(fresh_kernel_registry, monkeypatch, index32):
    """The loops of NAME_strided: 32-bit (with vectors along a dense inner dim) where the host finds every offset
    fits, 64-bit otherwise (forced here), on a bias broadcast, a channels_last input with a contiguous one, and a
    transposed read."""
    from fxopt.runtime import kernel as kernel_module

    monkeypatch.setattr(kernel_module, "fits_index32", lambda sizes, strides: index32)
    x, shortcut = torch.randn(2, 9, 11, 48, device="cuda"), torch.randn(2, 9, 11, 48, device="cuda")
    model = _BiasGeluResidual(48).cuda()
    cases = [(x, shortcut), (x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), shortcut),
             (x, shortcut.transpose(1, 2).contiguous().transpose(1, 2))]
    for args in cases:
        opt = fxopt.optimize(model, list(args), backend="cuda", strict=True)
        with torch.no_grad():
            actual, expected = opt(*args), model(*args)
        torch.cuda.synchronize()
        assert fxopt.verify.compare(actual, expected) is None
        assert actual.stride() == expected.stride()
        plans = [p for k in _fused_kernels(opt) for p in k._plans.values()]
        # 2: the vector loop along a dense inner dim (the bias and channels_last cases), 1: 32-bit, 0: 64-bit
        assert plans and all(p.path == "strided" and p.extra[0] in ((1, 2) if index32 else (0,)) for p in plans)
        if index32 and args[1] is shortcut and args[0] is x:
            assert all(p.extra[0] == 2 for p in plans)


# -- the CUDA strided kernel run on the host: its index arithmetic, without a GPU -----------------------------------
# NOTE [Strided iteration]: the strided entry point's loops (coalesced dims, 32-bit magic-number division, 64-bit
# division) are compiled as C++ with a few shims for CUDA's built-ins and run on the CPU as a grid of 3 blocks of 4
# threads, with the arguments the CUDA path passes. The CPU backend prints different loops, so this is the check of
# the CUDA ones that CI can run.
_HOST_SHIM = r"""
#include <cstdlib>
#define __global__
struct fx_dim3 { unsigned x; };
static fx_dim3 blockIdx = {0}, blockDim = {4}, threadIdx = {0}, gridDim = {3};
extern "C" void fx_host_thread(unsigned b, unsigned t) { blockIdx.x = b; threadIdx.x = t; }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
#define FX_GRID_DEPENDENCY()
#define __trap() abort()
"""


def _compile_with_ubsan(source: str, out_dir: str) -> Any:
    """``source`` built with UndefinedBehaviorSanitizer's alignment check: a vector load or store through a
    misaligned pointer (a fault on the GPU, silently fine on x86) aborts the process."""
    import ctypes
    import hashlib
    import subprocess

    from fxopt.runtime.cc import CXX_FLAGS, compiler_info

    base = Path(out_dir) / hashlib.sha1(source.encode()).hexdigest()[:16]
    base.with_suffix(".cpp").write_text(source)
    cmd = [*compiler_info().command, *CXX_FLAGS, "-fsanitize=alignment", "-fno-sanitize-recover=all",
           str(base.with_suffix(".cpp")), "-o", str(base.with_suffix(".so"))]
    subprocess.run(cmd, check=True, capture_output=True)
    return ctypes.CDLL(str(base.with_suffix(".so")))


def _run_cuda_strided_on_host(kernel: FusedKernel, inputs, loop: str, ubsan_dir: str | None = None
                              ) -> list[torch.Tensor]:
    """``loop``: "vector" (where the host would pick it, else 32-bit), "32-bit" or "64-bit"; ``ubsan_dir``: build
    with the alignment sanitizer there (run it in a process of its own: a finding aborts)."""
    import ctypes

    from fxopt.codegen.printer import strided_vector_width
    from fxopt.runtime.cc import compile_cpp
    from fxopt.runtime.strides import coalesce, divider32, fits_index32, vector_inner

    source = cuda_source(kernel.region, kernel.modes)
    strided = header_text() + _HOST_SHIM + source[source.index("// sizes, their dividers"):]
    if ubsan_dir is None:
        lib = compile_cpp(strided, name_hint=f"host_{kernel.name}")
    else:
        lib = _compile_with_ubsan(strided, ubsan_dir)
    shape = torch.broadcast_shapes(*[t.shape for t in inputs])
    out_stride = kernel._eager_stride(inputs, shape)
    outs = [torch.full_like(torch.empty_strided(shape, out_stride, dtype=d), 7) for d in kernel.output_dtypes]
    per = [t.expand(shape).stride() for t in inputs] + [out_stride] * len(outs)
    sizes, per = coalesce(shape, per, out_stride)
    index32 = int(loop != "64-bit" and fits_index32(sizes, per))
    if index32 and loop == "vector" and vector_inner(sizes, per, len(outs), strided_vector_width(kernel.region)):
        index32 = 2
    dividers = [divider32(s) if index32 and s else 0 for s in sizes]
    args = [ctypes.c_void_p(t.data_ptr()) for t in [*inputs, *outs]]
    args += [ctypes.c_int64(v) for v in (shape.numel(), int(index32), *sizes, *dividers, *[s for st in per for s in st])]
    fn = getattr(lib, f"{kernel.region.name}_strided")
    for block in range(3):
        for thread in range(4):
            lib.fx_host_thread(block, thread)
            fn(*args)
    return outs


def _fused_calls(opt, inputs) -> list[tuple[str, list[torch.Tensor], list[torch.Tensor]]]:
    """(kernel name, its input tensors, its outputs) of every fused node, as the graph runs them on ``inputs``."""
    calls = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            out = super().call_function(target, args, kwargs)
            if target is fused_op:
                calls.append((args[0], list(args[1]), list(out)))
            return out

    with torch.no_grad():
        Recorder(opt.graph_module).run(*inputs)
    return calls


_LAYOUTS = ["bias", "channels_last", "transposed", "sliced", "misaligned", "offset_rows"]


def _layout_inputs(layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, shortcut = torch.randn(2, 5, 6, 8), torch.randn(2, 5, 6, 8)
    if layout == "channels_last":
        x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    elif layout == "transposed":
        shortcut = shortcut.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(2, 5, 12, 8)[:, :, ::2]
    elif layout == "misaligned":  # the vector loop's pointer check sends it to the 32-bit loop
        x = torch.randn(2 * 5 * 6 * 8 + 1)[1:].view(2, 5, 6, 8)
    elif layout == "offset_rows":  # rows 10 elements apart: no vector loop (its rows would start unaligned)
        x = torch.randn(2, 5, 6, 10)[..., :8]
    return x, shortcut


def _check_layout_on_host(layout: str, loop: str, ubsan_dir: str | None = None) -> None:
    x, shortcut = _layout_inputs(layout)
    opt = fxopt.optimize(_BiasGeluResidual(8), [x, shortcut], backend="cpp", strict=True)
    ((name, inputs, outputs),) = _fused_calls(opt, [x, shortcut])
    got = _run_cuda_strided_on_host(lookup(name), inputs, loop, ubsan_dir)
    for a, b in zip(got, outputs):
        assert torch.equal(a, b) and a.stride() == b.stride()


@pytest.mark.parametrize("loop", ["vector", "32-bit", "64-bit"])
@pytest.mark.parametrize("layout", _LAYOUTS)
def test_the_cuda_strided_loops_on_the_host(fresh_kernel_registry, layout, loop):
    _check_layout_on_host(layout, loop)


def test_the_vector_loop_loads_and_stores_aligned(tmp_path):
    """On the GPU a misaligned 16-byte access faults; on x86 it does not, so the host run is built with
    UndefinedBehaviorSanitizer's alignment check, in a process of its own (a finding aborts it)."""
    import subprocess

    from fxopt.runtime.cc import compiler_info

    probe = tmp_path / "probe.cpp"
    probe.write_text('extern "C" int f(const int* p) { return *p; }\n')
    built = subprocess.run([*compiler_info().command, "-shared", "-fPIC", "-fsanitize=alignment", str(probe), "-o",
                            str(tmp_path / "probe.so")], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"the C++ compiler cannot build with -fsanitize=alignment here: {built.stderr[-300:]}")
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('t', {str(__file__)!r}); "
            "m = importlib.util.module_from_spec(spec); sys.modules['t'] = m; spec.loader.exec_module(m); "
            f"[m._check_layout_on_host(layout, 'vector', {str(tmp_path)!r}) for layout in m._LAYOUTS]; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]
    assert "runtime error" not in done.stderr, done.stderr[-4000:]


def test_the_cuda_strided_loops_on_the_host_on_random_dags(fresh_kernel_registry):
    """Every kernel of random elementwise DAGs (broadcasts, permuted and sliced inputs, dtypes), both loops."""
    from hypothesis import HealthCheck, given, settings

    fuse_tests = _load("test_fuse_elementwise", TESTS / "passes" / "test_fuse_elementwise.py")

    @settings(max_examples=20, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(dag=fuse_tests.dags())
    def prop(dag):
        if not dag.steps:
            return
        inputs = [s.make(dag.seed + k) for k, s in enumerate(dag.inputs)]
        model = {1: fuse_tests.DagModel1, 2: fuse_tests.DagModel2, 3: fuse_tests.DagModel3}[len(inputs)](dag)
        opt = fxopt.optimize(model.eval(), inputs, backend="cpp", strict=True)
        for name, kernel_inputs, outputs in _fused_calls(opt, inputs):
            if lookup(name).region.ndim == 0:
                continue
            for loop in ("vector", "32-bit", "64-bit"):
                got = _run_cuda_strided_on_host(lookup(name), kernel_inputs, loop)
                for a, b in zip(got, outputs):
                    assert a.stride() == b.stride()
                    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    prop()


def test_grids_cover_the_work_not_the_elements():
    """NOTE [Grids for the work]: a vector loop's threads take ``vector`` elements each, so the grid is sized for
    numel / vector threads (ConvNeXt-T's [1, 56, 56, 96] float16 tail: 147 blocks, not 1176), capped at 16 blocks an
    SM; the loops are grid-stride, so any grid is correct."""
    from fxopt.runtime.kernel import _THREADS, launch_grid

    numel = 56 * 56 * 96
    assert launch_grid(numel, 8, 132) == -(-numel // 8 // _THREADS) == 147
    assert launch_grid(numel, 1, 132) == 1176
    assert launch_grid(numel + 3, 8, 132) == 148  # a partial vector still gets a thread
    assert launch_grid(10 ** 9, 1, 132) == 132 * 16
    assert launch_grid(0, 8, 132) == launch_grid(5, 8, 132) == 1
