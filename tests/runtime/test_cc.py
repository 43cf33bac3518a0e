"""fxopt.runtime.cc: building C++ kernels with the system compiler, loading them with ctypes, and caching."""

from __future__ import annotations

import ctypes
import subprocess
import time

import pytest
import torch

from fxopt.errors import CompileError
from fxopt.runtime import cc
from fxopt.runtime.cache import cache_dir, cache_key

pytestmark = pytest.mark.skipif(cc.compiler_info() is None, reason="no C++ compiler on this machine")

ADD_SOURCE = r"""
#include <cstdint>
extern "C" void add_f32(const float* a, const float* b, float* out, int64_t n) {
#pragma omp parallel for
    for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}
"""


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own disk cache and an empty in-memory cache."""
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path / "cache"))
    cc.clear_memory_cache()
    yield tmp_path / "cache"
    cc.clear_memory_cache()


def _bind_add(lib: ctypes.CDLL):
    fn = lib.add_f32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    return fn


def _forbid_subprocess(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError(f"compiler invoked on a cache hit: {args}")

    monkeypatch.setattr(subprocess, "run", fail)


def test_compiler_info():
    info = cc.compiler_info()
    assert info is not None and info.path and info.version
    assert "-ffp-contract=off" in info.flags and "-march=native" not in info.flags
    assert ("-fopenmp" in info.flags) == info.openmp


def test_compile_and_call_matches_torch():
    start = time.perf_counter()
    lib = cc.compile_cpp(ADD_SOURCE + f"// unique {time.time_ns()}\n", name_hint="add")
    elapsed = time.perf_counter() - start
    # Reported, not asserted: timing depends on the machine (budget: well under 2 s).
    print(f"\nfirst build of a small C++ kernel: {elapsed:.3f} s (openmp={cc.compiler_info().openmp})")
    add = _bind_add(lib)
    a, b = torch.randn(10_001), torch.randn(10_001)
    out = torch.empty_like(a)
    add(a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel())
    torch.testing.assert_close(out, a + b, rtol=0, atol=0)


def test_memory_cache_returns_same_object(monkeypatch):
    lib = cc.compile_cpp(ADD_SOURCE)
    _forbid_subprocess(monkeypatch)
    assert cc.compile_cpp(ADD_SOURCE) is lib


def test_disk_cache_hit_needs_no_compiler(monkeypatch, isolated_cache):
    cc.compile_cpp(ADD_SOURCE)
    entries = list((isolated_cache / "cpp").glob("*.so"))
    assert len(entries) == 1
    cc.clear_memory_cache()
    _forbid_subprocess(monkeypatch)
    add = _bind_add(cc.compile_cpp(ADD_SOURCE))
    a = torch.arange(5, dtype=torch.float32)
    out = torch.empty_like(a)
    add(a.data_ptr(), a.data_ptr(), out.data_ptr(), 5)
    assert out.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    # No temp files are left behind by the atomic writes.
    assert not [p for p in (isolated_cache / "cpp").iterdir() if p.name.startswith(".")]


def test_syntax_error_raises_compile_error_with_log():
    with pytest.raises(CompileError) as info:
        cc.compile_cpp('extern "C" int broken( { return 0; }', name_hint="broken")
    message = str(info.value)
    assert "broken" in message
    assert "error" in message.lower()
    assert cc.compiler_info().path in message  # the command line is included


def test_cache_dir_override(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(target))
    assert cache_dir() == target and target.is_dir()
    cc.compile_cpp(ADD_SOURCE)
    assert len(list((target / "cpp").glob("*.so"))) == 1


def test_cache_dir_default_respects_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("FXOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fxopt"


def test_cache_key_separates_parts():
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert cache_key("x", b"y") == cache_key(b"x", "y")
    assert len(cache_key("x")) == 32


def test_concurrent_compiles_share_one_library():
    from concurrent.futures import ThreadPoolExecutor

    source = ADD_SOURCE + "// threads\n"
    with ThreadPoolExecutor(4) as pool:
        libs = list(pool.map(lambda _: cc.compile_cpp(source), range(8)))
    assert all(lib is libs[0] for lib in libs)
