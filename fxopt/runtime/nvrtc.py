"""CUDA C++ compiled to cubins at run time with NVRTC, through NVIDIA's cuda-bindings (``cuda.bindings.nvrtc``).

No GPU, nvcc or Triton needed: libnvrtc comes from the ``nvidia-cuda-nvrtc`` wheel or a CUDA install (NOTE [Which
libnvrtc]). Importing this module loads nothing; the library is found on first use, so CUDA source compiles on
machines without a GPU (CI). Loading and launching the cubins is runtime/driver.py's job.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

from fxopt.errors import CompileError
from fxopt.runtime.cache import atomic_write_bytes, cache_dir, cache_key, read_cached

__all__ = [
    "BASE_OPTIONS",
    "clear_memory_cache",
    "compile_cuda",
    "current_arch",
    "nvrtc_available",
    "nvrtc_library_path",
    "nvrtc_version",
    "supported_archs",
]

logger = logging.getLogger(__name__)

# Options every program gets. Deliberately no --use_fast_math: results must track PyTorch's kernels. FMA contraction
# stays at NVRTC's default (on), which is also what nvcc builds PyTorch's own kernels with.
BASE_OPTIONS: tuple[str, ...] = ("-std=c++17", "-default-device")

_CACHE_FORMAT = "fxopt-cuda-v1"
_ELF_MAGIC = b"\x7fELF"
# Only real architectures: a cubin needs one; compute_XX would produce PTX only.
_ARCH_RE = re.compile(r"sm_\d+[af]?")


# --------------------------------------------------------------------------------------------------------------------
# Which libnvrtc

# NOTE [Which libnvrtc]: cuda-bindings finds libnvrtc itself (from 12.9 through cuda-pathfinder: the pip wheels'
# nvidia/cu13/lib then nvidia/cuda_nvrtc/lib, conda, the loader's search path, CUDA_HOME), and before searching it
# takes a libnvrtc.so.N that is already loaded in the process. fxopt chooses through that: it loads the library
# named by FXOPT_NVRTC_LIBRARY, else a libnvrtc.so.<torch's CUDA major> from the wheels or a CUDA install, before
# cuda-bindings' first NVRTC call. A cubin from a newer NVRTC than torch's CUDA may need a newer driver than torch
# does; a mismatch that remains is logged. With a CPU-only torch (CI) cuda-bindings' own choice stands.


def _torch_cuda_major() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    version = torch.version.cuda
    return int(version.split(".")[0]) if version else None


def _matching_candidates(major: int) -> list[str]:
    """Existing ``libnvrtc.so.<major>`` files, best first: the pip wheels, then CUDA installs."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    # CUDA 13 wheels: nvidia/cu13/lib/libnvrtc.so.13; CUDA 12 wheels: nvidia/cuda_nvrtc/lib/libnvrtc.so.12.
    folders = [os.path.join(root, sub, "lib") for root in roots for sub in (f"cu{major}", "cuda_nvrtc")]
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    folders += [os.path.join(home, "lib64") for home in homes if home]
    return [p for p in (os.path.join(f, f"libnvrtc.so.{major}") for f in folders) if os.path.exists(p)]


def _loaded_path(major: int) -> str | None:
    """Where this process's libnvrtc.so.<major> was loaded from (Linux's /proc/self/maps), or None."""
    name = f"libnvrtc.so.{major}"
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].rstrip("\n")).startswith(name):
                    return fields[5].rstrip("\n")
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class _Nvrtc:
    """The NVRTC in use: cuda-bindings' module and the library it called."""

    api: ModuleType  # cuda.bindings.nvrtc
    path: str
    version: tuple[int, int]


_preloaded: list[ctypes.CDLL] = []  # libraries loaded for cuda-bindings to find; kept for the life of the process
_nvrtc_lock = threading.Lock()
_nvrtc_state: _Nvrtc | str | None = None  # NVRTC once loaded, or why it could not be


def _preload(path: str) -> None:
    _preloaded.append(ctypes.CDLL(path))


def _load_nvrtc() -> _Nvrtc | str:
    try:
        from cuda.bindings import nvrtc as api
    except ImportError as e:
        return f"cuda-bindings is not installed ({e}; pip install 'fxopt[cuda]')"
    override = os.environ.get("FXOPT_NVRTC_LIBRARY")
    torch_major = _torch_cuda_major()
    if override:  # used alone: silently falling back would hide a typo in it
        try:
            _preload(override)
        except OSError as e:
            return f"FXOPT_NVRTC_LIBRARY={override} could not be loaded: {e}"
    elif torch_major is not None:
        for path in _matching_candidates(torch_major):
            try:
                _preload(path)
                break
            except OSError as e:
                logger.debug("could not preload %s: %s", path, e)
    try:
        err, major, minor = api.nvrtcVersion()
    except RuntimeError as e:  # cuda-bindings found no libnvrtc (cuda-pathfinder's DynamicLibNotFoundError)
        return (f"cuda-bindings found no libnvrtc ({e}); pip install nvidia-cuda-nvrtc, install the CUDA toolkit, "
                "or set FXOPT_NVRTC_LIBRARY to the library's path")
    if err != api.nvrtcResult.NVRTC_SUCCESS:
        return f"nvrtcVersion failed: {err!r}"
    path = _loaded_path(major) or f"libnvrtc.so.{major}"
    if override and os.sep in override and os.path.realpath(path) != os.path.realpath(override):
        return f"FXOPT_NVRTC_LIBRARY={override} is loaded, but cuda-bindings {_bindings_version()} uses {path}"
    if torch_major is not None and major != torch_major:
        logger.warning("using NVRTC %d.%d from %s but torch is built for CUDA %d; cubins may need a newer driver",
                       major, minor, path, torch_major)
    # libnvrtc dlopens "libnvrtc-builtins.so.M.m" by bare name when compiling, and the CUDA 12 wheels set no RPATH:
    # loading it first lets that dlopen match the loaded library by its soname.
    builtins = os.path.join(os.path.dirname(path), f"libnvrtc-builtins.so.{major}.{minor}")
    if os.path.dirname(path) and os.path.isfile(builtins):
        _preload(builtins)
    logger.debug("NVRTC %d.%d from %s (cuda-bindings %s)", major, minor, path, _bindings_version())
    return _Nvrtc(api, path, (major, minor))


def _bindings_version() -> str:
    from cuda.bindings import __version__

    return __version__


def _nvrtc() -> _Nvrtc:
    global _nvrtc_state
    state = _nvrtc_state
    if state is None:
        with _nvrtc_lock:
            if _nvrtc_state is None:
                _nvrtc_state = _load_nvrtc()
            state = _nvrtc_state
    if isinstance(state, str):
        raise CompileError(f"NVRTC is unavailable: {state}")
    return state


def _check(nv: _Nvrtc, result, what: str) -> None:
    if result != nv.api.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what} failed: {getattr(result, 'name', result)} ({int(result)})")


def nvrtc_available() -> tuple[bool, str]:
    """(True, path of the libnvrtc in use) if NVRTC loads, else (False, why not)."""
    try:
        nv = _nvrtc()
    except CompileError as exc:
        return False, str(exc)
    return True, nv.path


def nvrtc_library_path() -> str:
    """Path of the libnvrtc in use; raises CompileError if there is none."""
    return _nvrtc().path


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the libnvrtc in use; raises CompileError if there is none."""
    return _nvrtc().version


def supported_archs() -> tuple[str, ...]:
    """The sm_XX architectures this NVRTC can compile for (NVRTC 13 starts at sm_75)."""
    nv = _nvrtc()
    err, archs = nv.api.nvrtcGetSupportedArchs()
    _check(nv, err, "nvrtcGetSupportedArchs")
    return tuple(f"sm_{a}" for a in archs)


# --------------------------------------------------------------------------------------------------------------------
# Compilation


def _program_log(nv: _Nvrtc, prog) -> str:
    err, size = nv.api.nvrtcGetProgramLogSize(prog)
    if err != nv.api.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return ""
    log = bytearray(size)  # written in place by NVRTC (never a bytes object: b" " * 1 is a shared constant)
    nv.api.nvrtcGetProgramLog(prog, log)
    return log.rstrip(b"\0").decode(errors="replace")


def _nvrtc_compile(source: str, name: str, options: Sequence[str]) -> bytes:
    """One NVRTC compilation of `source` to a cubin (no caching)."""
    nv = _nvrtc()
    api = nv.api
    err, prog = api.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    _check(nv, err, "nvrtcCreateProgram")
    try:
        encoded = [o.encode() for o in options]
        res = api.nvrtcCompileProgram(prog, len(encoded), encoded)[0]
        log = _program_log(nv, prog)
        if res != api.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(
                f"NVRTC {nv.version[0]}.{nv.version[1]} failed to compile {name} ({res.name}).\n"
                f"options: {' '.join(options)}\n"
                f"NVRTC log:\n{log}"
            )
        if log.strip():
            logger.debug("NVRTC messages for %s:\n%s", name, log)
        err, size = api.nvrtcGetCUBINSize(prog)
        _check(nv, err, "nvrtcGetCUBINSize")
        if size == 0:
            raise CompileError(f"NVRTC produced no cubin for {name} (options: {' '.join(options)})")
        cubin = bytearray(size)
        _check(nv, api.nvrtcGetCUBIN(prog, cubin)[0], "nvrtcGetCUBIN")
        return bytes(cubin)
    finally:
        api.nvrtcDestroyProgram(prog)


_compile_lock = threading.Lock()
_cubins: dict[str, bytes] = {}


def compile_cuda(source: str, *, arch: str, name_hint: str = "kernel", options: Sequence[str] = ()) -> bytes:
    """Compile CUDA C++ `source` for `arch` ("sm_90") to a cubin; cached in memory and at `cache_dir()/cuda/`.

    Kernels meant to be looked up by name should be `extern "C"`. Raises CompileError with NVRTC's log on failure.
    """
    if not _ARCH_RE.fullmatch(arch):
        raise ValueError(f"arch must name a real GPU architecture like 'sm_90', got {arch!r}")
    nv = _nvrtc()
    opts = (f"--gpu-architecture={arch}", *BASE_OPTIONS, *options)
    key = cache_key(_CACHE_FORMAT, f"nvrtc-{nv.version[0]}.{nv.version[1]}", "\0".join(opts), source)
    cubin = _cubins.get(key)
    if cubin is not None:
        return cubin
    with _compile_lock:
        cubin = _cubins.get(key)
        if cubin is not None:
            return cubin
        path = cache_dir() / "cuda" / f"{key}.cubin"
        cubin = read_cached(path)
        if cubin is not None and not cubin.startswith(_ELF_MAGIC):
            logger.warning("cache entry %s is not a cubin; recompiling", path)
            cubin = None
        if cubin is None:
            start = time.perf_counter()
            cubin = _nvrtc_compile(source, f"{name_hint}.cu", opts)
            logger.debug("NVRTC compiled %s for %s in %.3f s", name_hint, arch, time.perf_counter() - start)
            atomic_write_bytes(path, cubin)
        _cubins[key] = cubin
        return cubin


def clear_memory_cache() -> None:
    """Forget the in-process cubin cache (the disk cache and loaded modules stay); mainly for tests."""
    with _compile_lock:
        _cubins.clear()


def current_arch(device_index: int | None = None) -> str:
    """The current (or given) CUDA device's architecture as "sm_XY", from torch: what to compile for."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"
