"""fxopt.runtime.nvrtc: NVRTC (through cuda-bindings) compiling to cubins, and the caches; no GPU needed. Loading and
launching them is tests/runtime/test_driver.py's."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fxopt.errors import CompileError
from fxopt.runtime import nvrtc

NVRTC_OK, NVRTC_WHY = nvrtc.nvrtc_available()
# NVRTC needs no GPU: it only has to be installed (pip install 'fxopt[cuda]': cuda-bindings and nvidia-cuda-nvrtc).
needs_nvrtc = pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC not available: {NVRTC_WHY}")

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
    assert major >= 12
    path = nvrtc.nvrtc_library_path()
    print(f"\nNVRTC {major}.{minor} at {path}")
    assert os.path.basename(path).startswith(f"libnvrtc.so.{major}") and os.path.isabs(path)
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


def _python(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_unavailable_says_why():
    """NOTE [Which libnvrtc]: an FXOPT_NVRTC_LIBRARY that does not load is used alone, and the reason says so."""
    code = "from fxopt.runtime import nvrtc; ok, why = nvrtc.nvrtc_available(); print(ok, why)"
    out = _python(code, FXOPT_NVRTC_LIBRARY="/nonexistent/libnvrtc.so.13")
    assert out.startswith("False NVRTC is unavailable: ")
    assert "FXOPT_NVRTC_LIBRARY=/nonexistent/libnvrtc.so.13 could not be loaded" in out or "not installed" in out


@needs_nvrtc
def test_override_names_the_library_in_use():
    """NOTE [Which libnvrtc]: FXOPT_NVRTC_LIBRARY is the library cuda-bindings then calls."""
    path = nvrtc.nvrtc_library_path()
    out = _python("from fxopt.runtime import nvrtc; print(nvrtc.nvrtc_available())", FXOPT_NVRTC_LIBRARY=path)
    assert out == repr((True, path))


def test_candidates_match_the_major(tmp_path, monkeypatch):
    """NOTE [Which libnvrtc]: only libnvrtc.so.<torch's CUDA major> is loaded ahead of cuda-bindings' own search."""
    lib64 = tmp_path / "lib64"
    lib64.mkdir()
    (lib64 / "libnvrtc.so.12").touch()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert str(lib64 / "libnvrtc.so.12") in nvrtc._matching_candidates(12)
    assert str(lib64 / "libnvrtc.so.12") not in nvrtc._matching_candidates(13)
