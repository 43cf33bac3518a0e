"""Compile generated C++ for the CPU with the system compiler and load it with ctypes.

Built libraries are cached on disk (`cache_dir()/cpp/<key>.so`) and in memory, so a given source is compiled
once per machine and dlopen'ed once per process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from fxopt.errors import CompileError
from fxopt.runtime.cache import atomic_output, atomic_write_bytes, cache_dir, cache_key

__all__ = ["CXX_FLAGS", "CompilerInfo", "clear_memory_cache", "compile_cpp", "compiler_info"]

logger = logging.getLogger(__name__)

# No -march=native: the disk cache may be shared between machines with different CPUs.
# No -ffast-math and no FMA contraction: results have to match PyTorch's eager kernels bit for bit where they can.
CXX_FLAGS: tuple[str, ...] = ("-O3", "-fPIC", "-shared", "-std=c++17", "-ffp-contract=off")

# Bump when the way sources are built changes in a way the flags don't capture, to invalidate old entries.
_CACHE_FORMAT = "fxopt-cpp-v1"

_OPENMP_PROBE = """
#include <omp.h>
extern "C" int fxopt_probe_threads() {
    int n = 0;
#pragma omp parallel reduction(+ : n)
    n += 1;
    return n + 0 * omp_get_max_threads();
}
"""


@dataclasses.dataclass(frozen=True)
class CompilerInfo:
    """The C++ compiler fxopt builds with."""

    command: tuple[str, ...]  # argv prefix: the resolved compiler path plus any extra words from $CXX
    path: str
    version: str  # first line of `--version` plus the target triple; part of every cache key
    openmp: bool  # whether `-fopenmp` compiles and links

    @property
    def flags(self) -> tuple[str, ...]:
        """Flags every kernel is built with."""
        return (*CXX_FLAGS, "-fopenmp") if self.openmp else CXX_FLAGS


_info_lock = threading.Lock()
_info_cache: dict[str | None, CompilerInfo | None] = {}

_build_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def _find_compiler() -> tuple[list[str], str] | None:
    cxx = os.environ.get("CXX")
    if cxx:
        words = shlex.split(cxx)
        resolved = shutil.which(words[0]) if words else None
        if resolved is None:
            logger.warning("C++ compiler from $CXX=%r not found; C++ kernels are unavailable", cxx)
            return None
        return [resolved, *words[1:]], resolved
    for name in ("g++", "c++", "clang++"):
        resolved = shutil.which(name)
        if resolved:
            return [resolved], resolved
    logger.warning("no C++ compiler found ($CXX unset, no g++/c++/clang++ on PATH); C++ kernels are unavailable")
    return None


def _probe_openmp(command: list[str]) -> bool:
    with tempfile.TemporaryDirectory(prefix="fxopt-omp-") as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(_OPENMP_PROBE)
        proc = _run([*command, *CXX_FLAGS, "-fopenmp", str(src), "-o", str(Path(tmp) / "probe.so")])
    if proc.returncode != 0:
        logger.info("-fopenmp does not work with %s; C++ kernels will be single-threaded:\n%s", command[0], proc.stderr)
    return proc.returncode == 0


def compiler_info() -> CompilerInfo | None:
    """The compiler `compile_cpp` uses (`$CXX`, else g++/c++/clang++), or None if there is none (reason logged).

    Probed once per value of `$CXX` and cached.
    """
    env = os.environ.get("CXX")
    if env in _info_cache:
        return _info_cache[env]
    with _info_lock:
        if env in _info_cache:
            return _info_cache[env]
        info = None
        found = _find_compiler()
        if found is not None:
            command, path = found
            proc = _run([*command, "--version"])
            if proc.returncode != 0:
                logger.warning("%s --version failed (rc=%d): %s", path, proc.returncode, proc.stderr.strip())
            else:
                first = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else path
                machine = _run([*command, "-dumpmachine"]).stdout.strip()
                info = CompilerInfo(tuple(command), path, f"{first} [{machine}]", _probe_openmp(command))
                logger.debug("C++ compiler: %s", info)
        _info_cache[env] = info
        return info


def clear_memory_cache() -> None:
    """Forget the in-process cache of loaded libraries (the disk cache stays); mainly for tests."""
    with _build_lock:
        _loaded.clear()


def compile_cpp(source: str, *, name_hint: str = "kernel") -> ctypes.CDLL:
    """Build `source` into a shared library and load it; cached in memory and at `cache_dir()/cpp/<key>.so`.

    Exported functions should be `extern "C"`. Raises CompileError with the command and compiler output on failure.
    """
    info = compiler_info()
    if info is None:
        raise CompileError(f"cannot build C++ kernel {name_hint!r}: no working C++ compiler (set $CXX or install g++)")
    flags = info.flags
    key = cache_key(_CACHE_FORMAT, info.version, " ".join(flags), source)
    lib = _loaded.get(key)
    if lib is not None:
        return lib
    with _build_lock:
        lib = _loaded.get(key)
        if lib is not None:
            return lib
        out_dir = cache_dir() / "cpp"
        so_path = out_dir / f"{key}.so"
        if so_path.exists():
            try:
                lib = ctypes.CDLL(str(so_path))
                logger.debug("C++ kernel %r loaded from disk cache %s", name_hint, so_path)
            except OSError as exc:
                # e.g. an entry built on a machine with another libgomp/glibc: rebuild it here rather than fail.
                logger.warning("cached %s does not load (%s); rebuilding", so_path, exc)
        if lib is None:
            _build(info, flags, source, out_dir, key, so_path, name_hint)
            lib = ctypes.CDLL(str(so_path))
        _loaded[key] = lib
        return lib


def _build(
    info: CompilerInfo, flags: tuple[str, ...], source: str, out_dir: Path, key: str, so_path: Path, name_hint: str
) -> None:
    # The source is kept beside the library so a cached kernel can be read back when debugging.
    src_path = out_dir / f"{key}.cpp"
    atomic_write_bytes(src_path, source.encode())
    start = time.perf_counter()
    with atomic_output(so_path) as tmp:
        cmd = [*info.command, *flags, str(src_path), "-o", str(tmp)]
        proc = _run(cmd)
        if proc.returncode != 0:
            raise CompileError(
                f"C++ kernel {name_hint!r} failed to compile (exit {proc.returncode}).\n"
                f"command: {shlex.join(cmd)}\n"
                f"source: {src_path}\n"
                f"compiler output:\n{proc.stderr}{proc.stdout}"
            )
    logger.debug("built C++ kernel %r in %.3f s -> %s", name_hint, time.perf_counter() - start, so_path)


def load_library(source: str, *, name_hint: str = "kernel", path: str | None = None) -> ctypes.CDLL:
    """The shared library of ``source``: the one at ``path`` (built from exactly this source, e.g. a saved
    artifact's), else compiled now or taken from the cache."""
    return ctypes.CDLL(path) if path else compile_cpp(source, name_hint=name_hint)
