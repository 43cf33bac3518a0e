"""Inputs and outputs copied inside a CUDA graph, with pointers set per call instead of copy kernels launched.

A replayed graph reads its inputs from static buffers and leaves its outputs in its private pool. Without this
module every call pays an eager ``static.copy_(x)`` before the replay and an ``out.clone()`` after it: two more
launches from Python, ~10-15 µs of host time each (benchmarks/NOTES.md, "CUDA graphs at batch 1"). Here the graph
itself holds the copies: a byte-copy kernel node at its start (caller's tensor -> static buffer) and one at its end
(pool output -> fresh tensor). A call only points those nodes at this call's tensors with
``cuGraphExecKernelNodeSetParams`` (a host-side update of the instantiated graph; launches already queued keep the
parameters they were launched with) and replays: one launch in all.

How the nodes are found: each copy kernel is launched on the capturing stream, and right after it
``cuStreamGetCaptureInfo`` names the stream's current dependency, which is that kernel's node.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import struct
import threading

import torch

log = logging.getLogger(__name__)

_COPY_SOURCE = r"""
// fxopt graph I/O: copy nbytes from src to dst; 16-byte vectors when both pointers allow, bytes for the rest.
extern "C" __global__ void fxopt_graph_copy(const unsigned char* src, unsigned char* dst,
                                            long long nbytes) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)blockDim.x * gridDim.x;
  long long head = 0;
  if ((((unsigned long long)src | (unsigned long long)dst) & 15ull) == 0) {
    const long long nv = nbytes / 16;
    for (long long v = tid; v < nv; v += stride)
      reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(src)[v];
    head = nv * 16;
  }
  for (long long i = head + tid; i < nbytes; i += stride) dst[i] = src[i];
}
"""
_THREADS = 256
_MAX_BLOCKS = 1024

# CUDA_KERNEL_NODE_PARAMS_v2: func, grid xyz, block xyz, shared memory, kernelParams, extra, kern, ctx
_NODE_PARAMS = struct.Struct("@P7IPPPP")


class _Api:
    """The driver entry points this module needs (runtime/driver.py), or the reason they are missing."""

    def __init__(self) -> None:
        from . import driver

        vp = ctypes.c_void_p
        # 12000: the variant taking CUDA_KERNEL_NODE_PARAMS_v2. Called with the GIL held, so no other thread repacks
        # a node's parameter storage during the call (NOTE [Hot driver calls]).
        self.set_params = driver.gil_function("cuGraphExecKernelNodeSetParams", 12000, (vp, vp, vp))
        # addresses for the native replay (runtime/native_call.cpp's graph_call, NOTE [Native graph call])
        self.set_params_address = driver.entry_point("cuGraphExecKernelNodeSetParams", 12000)
        self.graph_launch_address = driver.entry_point("cuGraphLaunch", 10000)
        self.capture_tail = driver.capture_tail
        self.check = driver.check


@functools.lru_cache(maxsize=1)
def _api() -> _Api:
    return _Api()


_copy_functions: dict[int, object] = {}
_copy_lock = threading.Lock()


def _copy_function(device: int):
    from . import driver

    with _copy_lock:
        fn = _copy_functions.get(device)
        if fn is None:
            module, _ = driver.load_cuda(_COPY_SOURCE, device_index=device, name_hint="fxopt_graph_copy")
            fn = _copy_functions[device] = module.function("fxopt_graph_copy")
        return fn


def prepare(device: int) -> None:
    """Compile, load and launch the copy kernel once outside any capture (module loading and the first launch of a
    lazily loaded kernel are not stream operations a capture may contain)."""
    fn = _copy_function(device)
    with torch.cuda.device(device):
        fn.launcher(["ptr", "ptr", "i64"])(1, _THREADS, torch._C._cuda_getCurrentRawStream(device), 0, 0, 0)


def available() -> str | None:
    """None when graph I/O can be used in this process, else why not."""
    if not hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph_exec"):
        return "this torch's CUDAGraph has no raw_cuda_graph_exec()"
    try:
        _api()
    except Exception as e:  # noqa: BLE001 -- a missing driver entry point only costs speed
        return f"driver entry points missing: {type(e).__name__}: {e}"
    return None


class CopyNode:
    """One byte-copy kernel node of a captured graph whose source or destination is set per call."""

    __slots__ = ("_func", "_grid", "_node", "_exec", "_params", "_storage", "_params_addr", "_set", "_check",
                 "nbytes", "src", "dst")

    def __init__(self, device: int, stream: int, src: int, dst: int, nbytes: int) -> None:
        fn = _copy_function(device)
        api = _api()
        self._func = fn.handle
        self._grid = max(1, min(_MAX_BLOCKS, (nbytes // 16 + _THREADS - 1) // _THREADS))
        self.src, self.dst, self.nbytes = src, dst, nbytes
        # argument values (src, dst, nbytes) and the void*[3] pointing at them: what the node's kernelParams holds
        self._storage = (ctypes.c_uint64 * 3)(src, dst, nbytes)
        base = ctypes.addressof(self._storage)
        self._params = (ctypes.c_void_p * 3)(base, base + 8, base + 16)
        launch = fn.launcher(["ptr", "ptr", "i64"])
        launch(self._grid, _THREADS, stream, src, dst, nbytes)
        self._node = api.capture_tail(stream)
        self._exec: int | None = None
        buf = ctypes.create_string_buffer(_NODE_PARAMS.size)
        _NODE_PARAMS.pack_into(buf, 0, self._func, self._grid, 1, 1, _THREADS, 1, 1, 0,
                               ctypes.addressof(self._params), 0, 0, 0)
        self._params_addr = buf  # the CUDA_KERNEL_NODE_PARAMS_v2 struct, reused by every update
        self._set = api.set_params
        self._check = api.check

    @classmethod
    def over(cls, device: int, stream: int, t: torch.Tensor) -> "CopyNode":
        """A node copying the dense tensor ``t`` onto itself (a no-op) until :meth:`point` aims it elsewhere."""
        return cls(device, stream, t.data_ptr(), t.data_ptr(), t.numel() * t.element_size())

    def attach(self, graph_exec: int) -> None:
        """The instantiated graph whose node this is (``CUDAGraph.raw_cuda_graph_exec()``)."""
        self._exec = graph_exec

    def native_input(self, position: int, nbytes: int) -> tuple:
        """This input node as native_call.cpp's graph_call takes it: the caller's argument ``position`` is copied
        (``nbytes``) into the static buffer."""
        return (position, int(self._node), int(self._func), self._grid, _THREADS, self.dst, nbytes)

    def native_output(self, nbytes: int, shape, stride, dtype: torch.dtype) -> tuple:
        """This output node as graph_call takes it: a fresh tensor (``shape``, ``stride``, ``dtype``) per call."""
        return (int(self._node), int(self._func), self._grid, _THREADS, self.src, nbytes, tuple(shape),
                tuple(stride), dtype)

    def point(self, src: int, dst: int, nbytes: int) -> None:
        """Copy ``nbytes`` from ``src`` to ``dst`` at the next replay (not above the captured size)."""
        storage = self._storage
        storage[0], storage[1], storage[2] = src, dst, nbytes
        code = self._set(self._exec, self._node, self._params_addr)
        if code:
            self._check(code, "cuGraphExecKernelNodeSetParams")
