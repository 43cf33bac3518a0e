"""The CUDA driver through NVIDIA's cuda-bindings (``cuda.bindings.driver``): torch's context, cubin modules, kernel
handles and attributes, launches, and the graph calls of runtime/graph_io.py and runtime/cudagraph.

The one module of fxopt that binds the driver, and cuda-bindings is what opens libcuda. The few calls made per
launch take the driver's raw entry points (:func:`entry_point`, cuGetProcAddress) with the GIL held: from Python
through ctypes (NOTE [Hot driver calls]), from C++ in native_call.cpp. Importing this module loads no driver.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import struct
import threading
from collections.abc import Callable, Sequence

from cuda.bindings import driver as cu

from ..errors import CompileError
from .cache import cache_key
from .nvrtc import compile_cuda, current_arch

__all__ = [
    "CudaFunction",
    "CudaModule",
    "Launcher",
    "capture_tail",
    "check",
    "cu_launch_kernel",
    "ensure_context",
    "entry_point",
    "error_text",
    "gil_function",
    "graph_node_count",
    "is_programmatic",
    "load_cuda",
    "load_module",
    "sm_count",
]

logger = logging.getLogger(__name__)

_SUCCESS = cu.CUresult.CUDA_SUCCESS
_INVALID_CONTEXT = cu.CUresult.CUDA_ERROR_INVALID_CONTEXT
_ELF_MAGIC = b"\x7fELF"

_lock = threading.RLock()
_initialized = False
_retained: dict[int, object] = {}  # device ordinal -> the primary context (CUcontext) fxopt retained, never released
# Loaded modules are kept for the life of the process and never unloaded: CUDA graphs captured through torch hold
# raw CUfunction handles with no Python reference to the module, and unloading would leave them dangling.
_modules: dict[tuple[str, int], CudaModule] = {}


def _init() -> None:
    global _initialized
    if not _initialized:
        with _lock:
            if not _initialized:
                check(cu.cuInit(0)[0], "cuInit")
                _initialized = True


def error_text(code) -> str:
    """``CUDA_ERROR_NAME (code): description`` for a CUresult (or its int); the description needs a loaded driver."""
    code = int(code)
    try:
        result = cu.CUresult(code)
    except ValueError:
        return f"CUDA_ERROR_? ({code})"
    text = ""
    if _initialized:
        err, desc = cu.cuGetErrorString(result)
        if err == _SUCCESS and desc:
            text = ": " + desc.decode(errors="replace")
    return f"{result.name} ({code}){text}"


def check(err, what: str) -> None:
    """Raise RuntimeError naming ``what`` unless ``err`` (a CUresult) is CUDA_SUCCESS."""
    if err != _SUCCESS:
        raise RuntimeError(f"{what} failed: {error_text(err)}")


@functools.cache
def entry_point(name: str, version: int) -> int:
    """Raw address of driver function ``name`` in its ABI as of CUDA ``version`` (cuGetProcAddress; the legacy
    default-stream variant, which ``dlsym`` would give), for the hot calls (NOTE [Hot driver calls])."""
    _init()
    err, address = cu.cuGetProcAddress(name.encode(), version,
                                       cu.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_LEGACY_STREAM)[:2]
    check(err, f"cuGetProcAddress({name}, {version})")
    return int(address)


# --------------------------------------------------------------------------------------------------------------------
# Context, modules, functions


def ensure_context() -> tuple[int, int]:
    """Make torch's primary context for its current device current on this thread; return (context, device)."""
    import torch

    torch.cuda.init()
    device = torch.cuda.current_device()
    _init()
    err, ctx = cu.cuCtxGetCurrent()
    check(err, "cuCtxGetCurrent")
    if int(ctx):
        err, current = cu.cuCtxGetDevice()
        check(err, "cuCtxGetDevice")
        if int(current) == device:
            return int(ctx), device
    with _lock:
        primary = _retained.get(device)
        if primary is None:
            err, dev = cu.cuDeviceGet(device)
            check(err, "cuDeviceGet")
            err, primary = cu.cuDevicePrimaryCtxRetain(dev)
            check(err, "cuDevicePrimaryCtxRetain")
            _retained[device] = primary
    check(cu.cuCtxSetCurrent(primary)[0], "cuCtxSetCurrent")
    return int(primary), device


# Kernels that start with FX_GRID_DEPENDENCY() (NOTE [Programmatic dependent launch] in fxopt_kernel.h): the CUfunction
# handles that runtime/cudagraph/pdl.py may give programmatic edges in a captured graph.
_programmatic: set[int] = set()


def load_cuda(source: str, *, device_index: int, name_hint: str = "kernel",
              cubin: bytes | None = None) -> tuple[CudaModule, bytes]:
    """(module, cubin) of ``source`` on a device: ``cubin`` when given (built from exactly this source, e.g. a saved
    artifact's), else compiled for the device's architecture now or taken from the cache."""
    if cubin is None:
        cubin = compile_cuda(source, arch=current_arch(device_index), name_hint=name_hint)
    module = load_module(cubin)
    if "FX_GRID_DEPENDENCY();" in source:
        module.programmatic = True
    return module, cubin


def is_programmatic(function_handle: int) -> bool:
    """Whether a CUfunction is a generated kernel that waits for its programmatic dependencies itself."""
    return function_handle in _programmatic


def load_module(cubin: bytes) -> CudaModule:
    """Load `cubin` into torch's context for its current device (cuModuleLoadData); same cubin -> same module."""
    if not cubin.startswith(_ELF_MAGIC):
        raise ValueError("load_module expects a cubin (ELF) image")
    with _lock:
        ctx, device = ensure_context()
        key = (cache_key(cubin), ctx)
        module = _modules.get(key)
        if module is None:
            err, handle = cu.cuModuleLoadData(cubin)
            check(err, f"cuModuleLoadData (device {device})")
            module = _modules[key] = CudaModule(handle, device)
        return module


@functools.cache
def _sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device_index: int | None = None) -> int:
    """Number of SMs of the current (or given) CUDA device, from torch; cached."""
    if device_index is None:
        import torch

        device_index = torch.cuda.current_device()
    return _sm_count(device_index)


class CudaModule:
    """A loaded CUmodule."""

    def __init__(self, handle: cu.CUmodule, device: int) -> None:
        self.cu_handle = handle
        self.handle = int(handle)
        self.device = device
        self._functions: dict[str, CudaFunction] = {}
        self.programmatic = False  # every kernel starts with FX_GRID_DEPENDENCY() (load_cuda)

    def function(self, name: str) -> CudaFunction:
        """The kernel `name` (an `extern "C"` name, or the mangled one) from this module."""
        fn = self._functions.get(name)
        if fn is None:
            err, handle = cu.cuModuleGetFunction(self.cu_handle, name.encode())
            check(err, f"kernel {name}")
            fn = self._functions[name] = CudaFunction(handle, name, self)
            if self.programmatic:
                _programmatic.add(fn.handle)
        return fn

    def __repr__(self) -> str:
        return f"CudaModule(handle={self.handle:#x}, device={self.device})"


class CudaFunction:
    """A CUfunction; `launcher()` makes the fast callable for it."""

    def __init__(self, handle: cu.CUfunction, name: str, module: CudaModule) -> None:
        self.cu_handle = handle
        self.handle = int(handle)
        self.name = name
        self.module = module  # keeps the module reachable for as long as the function is

    def attribute(self, attr: cu.CUfunction_attribute) -> int:
        """cuFuncGetAttribute(attr)."""
        err, value = cu.cuFuncGetAttribute(attr, self.cu_handle)
        check(err, f"cuFuncGetAttribute({attr.name})")
        return value

    @functools.cached_property
    def max_threads_per_block(self) -> int:
        """Largest block this kernel can launch with (lower than 1024 when it uses many registers)."""
        return self.attribute(cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)

    @functools.cached_property
    def num_regs(self) -> int:
        """Registers per thread."""
        return self.attribute(cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS)

    def set_max_dynamic_shared_mem(self, nbytes: int) -> None:
        """Opt in to more than 48 KiB of dynamic shared memory."""
        attr = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        check(cu.cuFuncSetAttribute(self.cu_handle, attr, nbytes)[0], "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE)")

    def launcher(self, arg_types: Sequence[str], *, shared_mem: int = 0) -> Launcher:
        """A Launcher for this kernel taking arguments of `arg_types` ("ptr", "i64", "i32", "f32", "f64")."""
        return Launcher(self.handle, arg_types, cu_launch_kernel(), shared_mem=shared_mem, owner=self)

    def __repr__(self) -> str:
        return f"CudaFunction({self.name!r}, handle={self.handle:#x})"


# --------------------------------------------------------------------------------------------------------------------
# Launches

# NOTE [Hot driver calls]: cold driver calls go through cuda-bindings. The calls made per fused launch or per graph
# replay from Python (cuLaunchKernel; cuGraphExecKernelNodeSetParams in runtime/graph_io.py) call the driver's raw
# entry point instead (entry_point: cuGetProcAddress, through cuda-bindings) with the GIL held. Python's share of
# one launch on the dev box, against a stand-in libcuda (benchmarks/launch_paths.py measures it on the GPU):
# the generated call path through the trampoline below 0.54 µs (Launcher.__call__ 1.0 µs, 2.1 µs without the
# trampoline), cuda-bindings' cuLaunchKernel with a kernelParams array built once 0.78 µs. Beside one busy Python
# thread: 1.0 µs (Launcher.__call__ without the trampoline 4.0 µs) against 2.6 µs, or 150-200 µs in some runs, for
# cuda-bindings: it releases the GIL in every call, and taking it back can wait out the other thread's switch
# interval (the GIL convoy; its cuGraphExecKernelNodeSetParams likewise: 0.51 µs alone, up to 140 µs beside a busy
# thread, against 0.43 and 0.85 µs held). Holding the GIL also means no other thread repacks the argument storage
# during a call. On the H100 beside a busy thread (reports/2026-12-06-h100-sweep2-6edf166/session.txt): the
# trampoline path 9.9 µs, Launcher.__call__ 13.3, ctypes without the trampoline 17.2, cuda-bindings' cuLaunchKernel
# 4470 µs (an eager torch op, which also releases the GIL, 6431 µs).


@functools.cache
def gil_function(name: str, version: int, argtypes: tuple) -> Callable[..., int]:
    """Driver function ``name`` (:func:`entry_point`) taking ``argtypes`` (a tuple of ctypes types) as a ctypes
    function that returns its CUresult as an int and keeps the GIL held (NOTE [Hot driver calls])."""
    return ctypes.PYFUNCTYPE(ctypes.c_int, *argtypes)(entry_point(name, version))


_LAUNCH_ARGTYPES = (ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


def _declare_launch(fn) -> None:
    """Give `fn` cuLaunchKernel's signature (for stand-ins in tests)."""
    fn.argtypes, fn.restype = list(_LAUNCH_ARGTYPES), ctypes.c_int


def cu_launch_kernel() -> Callable[..., int]:
    """The driver's cuLaunchKernel as a GIL-holding ctypes function (NOTE [Hot driver calls])."""
    return gil_function("cuLaunchKernel", 4000, _LAUNCH_ARGTYPES)


_ARG_FORMATS = {"ptr": "P", "i64": "q", "i32": "i", "f32": "f", "f64": "d"}


def _dim3(dims: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(dims, int):
        return dims, 1, 1
    dims = tuple(dims)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"grid/block must have 1 to 3 dimensions, got {dims!r}")
    return (*dims, 1, 1)[:3]  # type: ignore[return-value]


# NOTE [Launch trampoline]: a ctypes call converts every argument: cuLaunchKernel's eleven cost about 1 µs more than
# one pointer (NOTE [Hot driver calls]). So the launch configuration and the kernel's arguments are packed, with one
# struct.pack_into, into one buffer laid out as `fx_launch_t` followed by the argument storage, and this three-line
# C function, built once with the system compiler, unpacks it and calls the driver: one pointer argument per launch.
# Without a compiler (or when it fails) the same storage is launched through the direct ctypes call.
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
    cuLaunchKernel (during stream capture too, into the graph node). ``launch`` is cuLaunchKernel as a ctypes
    function that keeps the GIL (:func:`cu_launch_kernel`; a stand-in in tests).
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

    def for_thread(self) -> Launcher:
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
        if res == _INVALID_CONTEXT:
            # This thread has no current context (e.g. a fresh thread); make torch's current and retry once.
            ensure_context()
            res = self._launch(self._func, *grid, *block, self.shared_mem, stream, self._params_addr, None)
            if not res:
                return
        name = getattr(self.owner, "name", hex(self._func))
        raise RuntimeError(f"cuLaunchKernel({name}, grid={grid}, block={block}, shared_mem={self.shared_mem}) "
                           f"failed: {error_text(res)}")

    def __repr__(self) -> str:
        return f"Launcher({getattr(self.owner, 'name', hex(self._func))}, {list(self.arg_types)})"


# --------------------------------------------------------------------------------------------------------------------
# Graphs


def capture_tail(stream: int) -> int:
    """The node a capturing ``stream`` just added: the one node its next node would depend on."""
    res = cu.cuStreamGetCaptureInfo(stream)  # cuda-bindings 13: 7 values (edge data at [5]); 12: 6
    check(res[0], "cuStreamGetCaptureInfo")
    status, deps, n = res[1], res[4], res[-1]
    if status != cu.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE or n != 1:
        raise RuntimeError(f"capture status {int(status)}, {n} dependencies after the node")
    return int(deps[0])


def graph_node_count(graph: int) -> int | None:
    """Node count of a captured CUgraph (cuGraphGetNodes), or None if the driver refuses."""
    _init()
    res = cu.cuGraphGetNodes(graph, numNodes=0)
    return int(res[-1]) if res[0] == _SUCCESS else None
