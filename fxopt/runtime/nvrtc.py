"""CUDA C++ compiled at run time with NVRTC, loaded and launched through the CUDA driver API, both via ctypes.

No cuda-python, nvcc or Triton at run time: libnvrtc comes from the `nvidia-cuda-nvrtc` wheel (or a CUDA install),
libcuda.so.1 from the driver. Importing this module touches neither library; each is loaded on first use, so the
module imports (and NVRTC compiles) on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence

from fxopt.errors import CompileError
from fxopt.runtime.cache import atomic_write_bytes, cache_dir, cache_key, read_cached

__all__ = [
    "BASE_OPTIONS",
    "CudaFunction",
    "CudaModule",
    "Launcher",
    "clear_memory_cache",
    "compile_cuda",
    "current_arch",
    "load_module",
    "nvrtc_available",
    "nvrtc_library_path",
    "nvrtc_version",
    "sm_count",
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
# NVRTC library discovery and loading


def _torch_cuda_major() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    version = torch.version.cuda
    return int(version.split(".")[0]) if version else None


def _soname_major(path: str) -> int | None:
    match = re.search(r"libnvrtc\.so\.(\d+)", os.path.basename(path))
    return int(match.group(1)) if match else None


def _is_main_nvrtc(path: str) -> bool:
    # The wheels also ship libnvrtc.alt.so.N and libnvrtc-builtins*; only the plain library is the one to load.
    name = os.path.basename(path)
    return name.startswith("libnvrtc.so") and ".alt." not in name


def _candidate_paths() -> list[str]:
    """libnvrtc candidates, best first: pip wheels, then CUDA installs, then the loader's search path."""
    found: list[str] = []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        # CUDA 13 wheels: nvidia/cu13/lib/libnvrtc.so.13; CUDA 12 wheels: nvidia/cuda_nvrtc/lib/libnvrtc.so.12.
        for pattern in ("cu*/lib/libnvrtc.so*", "cuda_nvrtc/lib/libnvrtc.so*"):
            found += sorted(glob.glob(os.path.join(root, pattern)), reverse=True)
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, homes):
        found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(system)
    unique: list[str] = []
    seen: set[str] = set()
    for path in filter(_is_main_nvrtc, found):
        real = os.path.realpath(path) if os.path.sep in path else path
        if real not in seen:
            seen.add(real)
            unique.append(path)
    torch_major = _torch_cuda_major()
    if torch_major is not None:
        # A cubin from a newer NVRTC than torch's CUDA may need a newer driver than torch does; prefer the matching one.
        unique.sort(key=lambda p: _soname_major(p) != torch_major)
    return unique


class _Nvrtc:
    """A loaded libnvrtc with its function signatures declared."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        signatures = {
            "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
            "nvrtcGetNumSupportedArchs": [ctypes.POINTER(ctypes.c_int)],
            "nvrtcGetSupportedArchs": [ctypes.POINTER(ctypes.c_int)],
            "nvrtcCreateProgram": [ctypes.POINTER(vp), cp, cp, ctypes.c_int, vp, vp],
            "nvrtcCompileProgram": [vp, ctypes.c_int, ctypes.POINTER(cp)],
            "nvrtcGetProgramLogSize": [vp, ctypes.POINTER(sz)],
            "nvrtcGetProgramLog": [vp, cp],
            "nvrtcGetCUBINSize": [vp, ctypes.POINTER(sz)],
            "nvrtcGetCUBIN": [vp, cp],
            "nvrtcDestroyProgram": [ctypes.POINTER(vp)],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)  # AttributeError here means this is not an NVRTC library
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib = lib
        self.path = path
        self.check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)
        self._preload_builtins()

    def _preload_builtins(self) -> None:
        # libnvrtc dlopens "libnvrtc-builtins.so.M.m" by bare name when compiling, and the wheels set no RPATH, so
        # it is not found unless its folder is on the loader path. Loading it ourselves first makes that dlopen
        # match the already-loaded library by its soname.
        directory = os.path.dirname(self.path)
        if not directory:
            return
        builtins = os.path.join(directory, f"libnvrtc-builtins.so.{self.version[0]}.{self.version[1]}")
        if os.path.exists(builtins):
            self._builtins = ctypes.CDLL(builtins)
        else:
            logger.debug("no %s beside %s; relying on the loader's search path", builtins, self.path)

    def error_string(self, code: int) -> str:
        text = self.lib.nvrtcGetErrorString(code)
        return text.decode() if text else f"NVRTC error {code}"

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise CompileError(f"{what} failed: {self.error_string(code)} ({code})")


_nvrtc_lock = threading.Lock()
_nvrtc_state: _Nvrtc | str | None = None  # the library once loaded, or why it could not be


def _load_nvrtc() -> _Nvrtc | str:
    override = os.environ.get("FXOPT_NVRTC_LIBRARY")
    # An explicit override is used alone: silently falling back would hide a typo in it.
    candidates = [override] if override else _candidate_paths()
    if not candidates:
        return (
            "libnvrtc not found (pip install nvidia-cuda-nvrtc, install the CUDA toolkit, "
            "or set FXOPT_NVRTC_LIBRARY to the library's path)"
        )
    failures = []
    for path in candidates:
        try:
            nv = _Nvrtc(path)
        except (OSError, AttributeError, CompileError) as exc:
            failures.append(f"{path}: {exc}")
            continue
        torch_major = _torch_cuda_major()
        if torch_major is not None and nv.version[0] != torch_major:
            logger.warning(
                "using NVRTC %d.%d from %s but torch is built for CUDA %d; cubins may need a newer driver",
                *nv.version,
                path,
                torch_major,
            )
        logger.debug("NVRTC %d.%d loaded from %s", *nv.version, path)
        return nv
    return "no libnvrtc candidate could be loaded: " + "; ".join(failures)


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
    count = ctypes.c_int()
    nv.check(nv.lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * count.value)()
    nv.check(nv.lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return tuple(f"sm_{a}" for a in archs)


# --------------------------------------------------------------------------------------------------------------------
# Compilation


def _program_log(nv: _Nvrtc, prog: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    if nv.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) != 0 or size.value <= 1:
        return ""
    buf = ctypes.create_string_buffer(size.value)
    nv.lib.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace")


def _nvrtc_compile(source: str, name: str, options: Sequence[str]) -> bytes:
    """One NVRTC compilation of `source` to a cubin (no caching)."""
    nv = _nvrtc()
    lib = nv.lib
    prog = ctypes.c_void_p()
    nv.check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "nvrtcCreate")
    try:
        encoded = [o.encode() for o in options]
        res = lib.nvrtcCompileProgram(prog, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        log = _program_log(nv, prog)
        if res != 0:
            raise CompileError(
                f"NVRTC {nv.version[0]}.{nv.version[1]} failed to compile {name} ({nv.error_string(res)}).\n"
                f"options: {' '.join(options)}\n"
                f"NVRTC log:\n{log}"
            )
        if log.strip():
            logger.debug("NVRTC messages for %s:\n%s", name, log)
        size = ctypes.c_size_t()
        nv.check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        if size.value == 0:
            raise CompileError(f"NVRTC produced no cubin for {name} (options: {' '.join(options)})")
        cubin = ctypes.create_string_buffer(size.value)
        nv.check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


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


# --------------------------------------------------------------------------------------------------------------------
# Devices


def current_arch(device_index: int | None = None) -> str:
    """The current (or given) CUDA device's architecture as "sm_XY", from torch."""
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


@functools.cache
def _sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device_index: int | None = None) -> int:
    """Number of SMs of the current (or given) CUDA device; cached."""
    if device_index is None:
        import torch

        device_index = torch.cuda.current_device()
    return _sm_count(device_index)


# --------------------------------------------------------------------------------------------------------------------
# Driver API

_CUDA_ERROR_INVALID_CONTEXT = 201
_CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0
_CU_FUNC_ATTRIBUTE_NUM_REGS = 4
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


def _declare_launch(fn) -> None:
    """Give `fn` cuLaunchKernel's signature (also used for stand-ins in tests)."""
    u = ctypes.c_uint
    fn.argtypes = [ctypes.c_void_p, u, u, u, u, u, u, u, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int


class _Driver:
    """libcuda.so.1 with the few entry points fxopt uses: the one place fxopt opens the CUDA driver library."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        vp, ip, i = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int
        vpp = ctypes.POINTER(ctypes.c_void_p)
        signatures = {
            "cuInit": [ctypes.c_uint],
            "cuGetErrorName": [i, ctypes.POINTER(ctypes.c_char_p)],
            "cuGetErrorString": [i, ctypes.POINTER(ctypes.c_char_p)],
            "cuCtxGetCurrent": [vpp],
            "cuCtxSetCurrent": [vp],
            "cuCtxGetDevice": [ip],
            "cuDeviceGet": [ip, i],
            "cuDevicePrimaryCtxRetain": [vpp, i],
            "cuModuleLoadData": [vpp, ctypes.c_char_p],
            "cuModuleGetFunction": [vpp, vp, ctypes.c_char_p],
            "cuFuncGetAttribute": [ip, i, vp],
            "cuFuncSetAttribute": [vp, i, i],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        self.lib = lib
        # cuLaunchKernel comes through PyDLL so the GIL stays held during the call: a Launcher reuses one argument
        # buffer, and with the GIL released another thread could repack it while the driver is still reading it.
        # Holding it also skips a GIL release/reacquire on the hot path; the call only enqueues work.
        # ``gil_lib``: the same library through PyDLL, for every entry point that must keep the GIL (graph_io.py).
        self.gil_lib = ctypes.PyDLL("libcuda.so.1")
        self.launch = self.gil_lib.cuLaunchKernel
        _declare_launch(self.launch)
        self.retained: dict[int, int] = {}  # device ordinal -> primary context we retained (never released)
        self.check(lib.cuInit(0), "cuInit")

    def error_text(self, code: int) -> str:
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        self.lib.cuGetErrorName(code, ctypes.byref(name))
        self.lib.cuGetErrorString(code, ctypes.byref(text))
        return f"{(name.value or b'CUDA_ERROR_?').decode()} ({code}): {(text.value or b'unknown error').decode()}"

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what} failed: {self.error_text(code)}")

    def ensure_context(self) -> tuple[int, int]:
        """Make torch's primary context for its current device current on this thread; return (context, device)."""
        import torch

        torch.cuda.init()
        device = torch.cuda.current_device()
        ctx = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if ctx.value:
            current = ctypes.c_int()
            self.check(self.lib.cuCtxGetDevice(ctypes.byref(current)), "cuCtxGetDevice")
            if current.value == device:
                return ctx.value, device
        primary = self.retained.get(device)
        if primary is None:
            dev = ctypes.c_int()
            self.check(self.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
            ctx = ctypes.c_void_p()
            self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            primary = self.retained[device] = ctx.value
        self.check(self.lib.cuCtxSetCurrent(primary), "cuCtxSetCurrent")
        return primary, device


_driver_lock = threading.RLock()
_driver_state: _Driver | None = None
# Loaded modules are kept for the life of the process and never unloaded: CUDA graphs captured through torch hold
# raw CUfunction handles with no Python reference to the module, and unloading would leave them dangling.
_modules: dict[tuple[str, int], CudaModule] = {}


def driver() -> _Driver:
    global _driver_state
    if _driver_state is None:
        with _driver_lock:
            if _driver_state is None:
                _driver_state = _Driver()
    return _driver_state


def load_cuda(source: str, *, device_index: int, name_hint: str = "kernel",
              cubin: bytes | None = None) -> tuple["CudaModule", bytes]:
    """(module, cubin) of ``source`` on a device: ``cubin`` when given (built from exactly this source, e.g. a saved
    artifact's), else compiled for the device's architecture now or taken from the cache."""
    if cubin is None:
        cubin = compile_cuda(source, arch=current_arch(device_index), name_hint=name_hint)
    return load_module(cubin), cubin


def load_module(cubin: bytes) -> CudaModule:
    """Load `cubin` into torch's context for its current device (cuModuleLoadData); same cubin -> same module."""
    if not cubin.startswith(_ELF_MAGIC):
        raise ValueError("load_module expects a cubin (ELF) image")
    with _driver_lock:
        drv = driver()
        ctx, device = drv.ensure_context()
        key = (cache_key(cubin), ctx)
        module = _modules.get(key)
        if module is None:
            handle = ctypes.c_void_p()
            drv.check(drv.lib.cuModuleLoadData(ctypes.byref(handle), cubin), f"cuModuleLoadData (device {device})")
            module = _modules[key] = CudaModule(handle.value, device)
        return module


class CudaModule:
    """A loaded CUmodule."""

    def __init__(self, handle: int, device: int) -> None:
        self.handle = handle
        self.device = device
        self._functions: dict[str, CudaFunction] = {}

    def function(self, name: str) -> CudaFunction:
        """The kernel `name` (an `extern "C"` name, or the mangled one) from this module."""
        fn = self._functions.get(name)
        if fn is None:
            drv = driver()
            handle = ctypes.c_void_p()
            drv.check(drv.lib.cuModuleGetFunction(ctypes.byref(handle), self.handle, name.encode()), f"kernel {name}")
            fn = self._functions[name] = CudaFunction(handle.value, name, self)
        return fn

    def __repr__(self) -> str:
        return f"CudaModule(handle={self.handle:#x}, device={self.device})"


class CudaFunction:
    """A CUfunction; `launcher()` makes the fast callable for it."""

    def __init__(self, handle: int, name: str, module: CudaModule) -> None:
        self.handle = handle
        self.name = name
        self.module = module  # keeps the module reachable for as long as the function is

    def attribute(self, attr: int) -> int:
        """cuFuncGetAttribute(attr)."""
        drv = driver()
        value = ctypes.c_int()
        drv.check(drv.lib.cuFuncGetAttribute(ctypes.byref(value), attr, self.handle), f"cuFuncGetAttribute({attr})")
        return value.value

    @functools.cached_property
    def max_threads_per_block(self) -> int:
        """Largest block this kernel can launch with (lower than 1024 when it uses many registers)."""
        return self.attribute(_CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)

    @functools.cached_property
    def num_regs(self) -> int:
        """Registers per thread."""
        return self.attribute(_CU_FUNC_ATTRIBUTE_NUM_REGS)

    def set_max_dynamic_shared_mem(self, nbytes: int) -> None:
        """Opt in to more than 48 KiB of dynamic shared memory."""
        drv = driver()
        code = drv.lib.cuFuncSetAttribute(self.handle, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
        drv.check(code, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")

    def launcher(self, arg_types: Sequence[str], *, shared_mem: int = 0) -> Launcher:
        """A Launcher for this kernel taking arguments of `arg_types` ("ptr", "i64", "i32", "f32", "f64")."""
        return Launcher(self.handle, arg_types, driver().launch, shared_mem=shared_mem, owner=self)

    def __repr__(self) -> str:
        return f"CudaFunction({self.name!r}, handle={self.handle:#x})"


_ARG_FORMATS = {"ptr": "P", "i64": "q", "i32": "i", "f32": "f", "f64": "d"}


def _dim3(dims: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(dims, int):
        return dims, 1, 1
    dims = tuple(dims)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"grid/block must have 1 to 3 dimensions, got {dims!r}")
    return (*dims, 1, 1)[:3]  # type: ignore[return-value]


# NOTE [Launch trampoline]: a ctypes call converts every argument; cuLaunchKernel's eleven cost about 2 µs per
# launch on the dev box. Instead the launch configuration and the kernel's arguments are packed, with one
# struct.pack_into, into one buffer laid out as `fx_launch_t` followed by the argument storage, and this
# three-line C function, built once with the system compiler, unpacks it and calls the driver: one pointer
# argument per launch (measured 3.4 µs -> 1.4 µs, packing included). Without a compiler the direct call is used.
_TRAMPOLINE_SOURCE = r"""
#include <cstdint>
typedef int (*launch_fn)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                         void**);
struct fx_launch_t { launch_fn fn; void* func; void** params; uint32_t gx, gy, gz, bx, by, bz, shmem, pad; void* stream; };
extern "C" int fx_launch(const fx_launch_t* l) {
  return l->fn(l->func, l->gx, l->gy, l->gz, l->bx, l->by, l->bz, l->shmem, l->stream, l->params, nullptr);
}
"""
_CONFIG_FORMAT = "@IIIIIIIIP"  # gx gy gz bx by bz shmem pad stream: fx_launch_t after its three constant pointers
_CONFIG_OFFSET = 24


@functools.lru_cache(maxsize=1)
def _trampoline():
    """The compiled trampoline (a ctypes function taking one pointer), or None if no C++ compiler is available."""
    from .cc import compile_cpp, compiler_info

    if compiler_info() is None:
        return None
    try:
        lib = ctypes.PyDLL(compile_cpp(_TRAMPOLINE_SOURCE, name_hint="fx_launch")._name)  # PyDLL: keep the GIL
    except (CompileError, OSError) as e:  # a broken toolchain only costs speed: the direct ctypes call works
        logger.warning("launch trampoline unavailable (%s); launching through ctypes directly", e)
        return None
    fn = lib.fx_launch
    fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_int
    return fn


class Launcher:
    """Launches one kernel with a fixed argument signature, with as little Python per call as possible.

    All argument storage and the `void*[]` kernelParams array are allocated once, here: a call packs the launch
    configuration and the values into that storage with one `struct.pack_into` and calls the trampoline (NOTE
    [Launch trampoline]). Reusing the storage is safe because the driver copies the parameter values during
    cuLaunchKernel (during stream capture too, into the graph node).
    """

    __slots__ = ("_func", "_launch", "_owner_thread", "_pack", "_params", "_params_addr", "_storage", "_storage_addr",
                 "_tramp", "_twins", "_twins_lock", "arg_types", "owner", "shared_mem")

    def __init__(
        self, func: int, arg_types: Sequence[str], launch, *, shared_mem: int = 0, owner: object = None
    ) -> None:
        unknown = [t for t in arg_types if t not in _ARG_FORMATS]
        if unknown:
            raise ValueError(f"unknown kernel argument types {unknown}; expected one of {sorted(_ARG_FORMATS)}")
        self.arg_types = tuple(arg_types)
        self.shared_mem = shared_mem
        self.owner = owner  # keeps the CudaFunction (and so its module) alive
        formats = [_ARG_FORMATS[t] for t in self.arg_types]
        # Native ('@') struct layout aligns every field naturally, which is what each kernel parameter needs; the
        # packed part starts at an 8-byte boundary, so relative and absolute alignment agree.
        fmt = _CONFIG_FORMAT + "".join(formats)
        packer = struct.Struct(fmt)
        self._pack = packer.pack_into
        self._storage = (ctypes.c_uint64 * ((_CONFIG_OFFSET + packer.size + 7) // 8))()
        self._storage_addr = base = ctypes.addressof(self._storage)
        offsets = [struct.calcsize(_CONFIG_FORMAT + "".join(formats[: i + 1])) - struct.calcsize(f)
                   for i, f in enumerate(formats)]
        self._params = (ctypes.c_void_p * max(1, len(formats)))(*[base + _CONFIG_OFFSET + off for off in offsets])
        self._params_addr = ctypes.addressof(self._params)
        self._func = func
        self._launch = launch
        self._tramp = _trampoline()
        launch_addr = ctypes.cast(launch, ctypes.c_void_p).value
        struct.pack_into("@PPP", self._storage, 0, launch_addr, func, self._params_addr)
        # NOTE [Launcher threads]: the storage above belongs to the first thread that launches; every other thread
        # gets a twin launcher with its own storage (for_thread), so no thread packs into storage another thread is
        # about to launch from, and no lock is taken per launch.
        self._owner_thread: int | None = None
        self._twins: dict[int, Launcher] = {}
        self._twins_lock = threading.Lock()

    def for_thread(self) -> "Launcher":
        """This launcher, or its twin for the calling thread (NOTE [Launcher threads])."""
        tid = threading.get_ident()
        if self._owner_thread is None:
            self._owner_thread = tid
        if tid == self._owner_thread:
            return self
        with self._twins_lock:
            twin = self._twins.get(tid)
            if twin is None:  # a dead thread's id may be reused: its twin is then this thread's alone
                twin = Launcher(self._func, self.arg_types, self._launch, shared_mem=self.shared_mem, owner=self.owner)
                twin._owner_thread = tid
                self._twins[tid] = twin
            return twin

    def prepared(self, grid: int | tuple[int, ...], block: int | tuple[int, ...]) -> tuple:
        """What a generated call path needs to launch inline on the calling thread, for a fixed grid and block:
        ``(pack, storage, offset, config, trampoline, address)``; it then does ``pack(storage, offset, *config,
        stream, *values)`` and ``trampoline(address)``. Empty without the trampoline."""
        if self._tramp is None:
            return ()
        mine = self.for_thread()
        (gx, gy, gz), (bx, by, bz) = _dim3(grid), _dim3(block)
        return (mine._pack, mine._storage, _CONFIG_OFFSET, (gx, gy, gz, bx, by, bz, mine.shared_mem, 0), mine._tramp,
                mine._storage_addr)

    def native(self, grid: int | tuple[int, ...], block: int | tuple[int, ...]) -> tuple | None:
        """``(function, cuLaunchKernel address, grid, block, shared_mem)`` for the compiled call path
        (runtime/native.py), or None unless every argument is a pointer or an int64 (it passes each as 8 bytes)."""
        if any(t not in ("ptr", "i64") for t in self.arg_types):
            return None
        return (self._func, ctypes.cast(self._launch, ctypes.c_void_p).value, _dim3(grid), _dim3(block),
                self.shared_mem)

    def bind(self, grid: int | tuple[int, ...], block: int | tuple[int, ...]) -> Callable[..., None]:
        """``launch(stream, *values)`` for a fixed grid and block, from any thread."""
        grid3, block3 = _dim3(grid), _dim3(block)
        return lambda stream, *values: self.for_thread()._launch_now(grid3, block3, stream, values)

    def __call__(self, grid: int | tuple[int, ...], block: int | tuple[int, ...], stream: int, *values) -> None:
        """Launch on `stream` (a raw cudaStream_t, e.g. torch's `stream.cuda_stream`); ptr values are ints."""
        self.for_thread()._launch_now(grid, block, stream, values)

    def _launch_now(self, grid, block, stream: int, values: tuple) -> None:
        if grid.__class__ is int:
            gx, gy, gz = grid, 1, 1
        else:
            gx, gy, gz = _dim3(grid)
        if block.__class__ is int:
            bx, by, bz = block, 1, 1
        else:
            bx, by, bz = _dim3(block)
        try:
            self._pack(self._storage, _CONFIG_OFFSET, gx, gy, gz, bx, by, bz, self.shared_mem, 0, stream, *values)
        except struct.error as exc:
            raise TypeError(f"kernel arguments {values!r} do not match {self.arg_types}: {exc}") from None
        if self._tramp is not None:
            res = self._tramp(self._storage_addr)
        else:
            res = self._launch(self._func, gx, gy, gz, bx, by, bz, self.shared_mem, stream, self._params_addr, None)
        if res:
            self._failed(res, (gx, gy, gz), (bx, by, bz), stream)

    def _failed(self, res: int, grid: tuple, block: tuple, stream: int) -> None:
        drv = driver()
        if res == _CUDA_ERROR_INVALID_CONTEXT:
            # This thread has no current context (e.g. a fresh thread); make torch's current and retry once.
            drv.ensure_context()
            args = (self._func, *grid, *block, self.shared_mem, stream, self._params_addr, None)
            res = self._launch(*args)
            if not res:
                return
        name = getattr(self.owner, "name", hex(self._func))
        raise RuntimeError(
            f"cuLaunchKernel({name}, grid={grid}, block={block}, shared_mem={self.shared_mem}) failed: "
            f"{drv.error_text(res)}"
        )

    def __repr__(self) -> str:
        return f"Launcher({getattr(self.owner, 'name', hex(self._func))}, {list(self.arg_types)})"
