"""CUDA graphs around a module: capture per input signature, replay through static buffers, guards and fallbacks.

:class:`CUDAGraphRunner` wraps any callable on tensors (fxopt's rewritten GraphModule, or a plain module). The first
call with a new *signature* warms the callable up, captures it into a CUDA graph and replays it; later calls with that
signature copy their inputs into the graph's static input buffers and replay. Calls the graph cannot serve run the
callable eagerly, and :meth:`CUDAGraphRunner.entries` / :meth:`CUDAGraphRunner.report` say why.

Signature
    Per tensor argument: shape, strides, dtype and device index; per other argument: its type and value (so it must be
    hashable). Strides are part of it: a transposed, channels_last or sliced input gets its own graph. Its static buffer
    is allocated with ``torch.empty_like`` (dense, same dimension order as the input), so a dense input of any layout
    (contiguous, channels_last, a transpose) is replayed with exactly the strides the model saw eagerly; a non-dense
    input (a slice with gaps, an expanded tensor) is copied into a dense buffer of the same dimension order.
    The key costs about 0.5 µs for one input (CPU measurement); ``x.device`` objects are not built on the call path.

Capture (the slow path, once per signature)
    Static inputs are allocated and filled on the caller's stream. A side stream (one per runner and device) waits for
    the caller's stream, runs ``warmup_iters`` eager calls (fxopt's NVRTC kernels compile and load lazily on their first
    call, cuBLAS/cuDNN create their workspaces: all of it before capture), then captures on that same side stream into
    a private memory pool: in copy mode one ``torch.cuda.graph_pool_handle()`` per runner and device, shared by every
    graph of the runner; in "unsafe" and "rotate" modes one per graph (NOTE [Pools and held outputs]).
    ``capture_error_mode="thread_local"``: other threads' CUDA calls are not affected by the capture. Only
    one fxopt capture runs at a time in the process. With ``verify=True`` (default), the graph's fresh outputs are
    poisoned (NaN / a sentinel), the graph is replayed once on the caller's inputs and compared with an eager call, so
    a kernel launched outside the capture stream, or a value the capture baked in, falls back instead of returning
    wrong numbers.

Replay (the fast path)
    key -> precomputed closure: on a change of the caller's current stream, make the new stream wait for the old one
    (so successive calls on different streams never race on the static buffers); then, with ``graph_io`` (default, one
    graph per signature): the graph's own first nodes copy each dense input into its static buffer and, in copy mode,
    its last nodes copy each output into a fresh tensor; the call only points those copy nodes at this call's tensors
    (``cuGraphExecKernelNodeSetParams``, ~1 µs each; runtime/graph_io.py) and replays: one launch per call. Without
    it: ``static.copy_(x)`` per tensor input (skipped when ``x`` *is* the static buffer: see
    :meth:`CUDAGraphRunner.input_buffers`), ``graph.replay()``, outputs per ``output_mode``. Either way on the caller's
    current stream, no pytree work for a tensor or a tuple of tensors, no device objects; one uncontended lock
    (NOTE [Concurrent calls]). With ``native_replay`` (the default) the graph I/O call runs in C++ (NOTE [Native
    graph call]).

Output modes
    ``"copy"`` (default): every call returns fresh tensors (one allocation each, filled by a copy node inside the
    graph); the caller may keep them forever. It is also the cheaper safe mode: on the H200 (2026-12-01,
    bench_cudagraph_outputs.py) copy costs 2.5 µs of latency over "unsafe" at batch 1, rotating buffers 6.0-6.4 µs
    (the rotation's calls cannot use the native graph call). ``"rotate"``: ``rotate_depth`` (k) graphs are captured
    per signature, each with its own output buffers and pool, and the calls cycle through them; no copy, but an
    output stays valid only for the next k-1 calls *with the same signature* (the k-th overwrites it). Outputs that
    alias a static input are cloned in this mode. ``"unsafe"``: the graph's static outputs are returned, overwritten by
    the next call with the same signature; for callers that consume the output (or copy it) before calling again. Which
    of copy and rotate is cheaper is measured by ``benchmarks/bench_cudagraph_outputs.py``. Calls with different
    signatures never overwrite each other's outputs (NOTE [Pools and held outputs]).

Guards and fallbacks (the entry's ``reason``)
    CPU tensors, inputs on several devices, no tensor inputs, tensors nested in lists/dicts, unhashable arguments;
    outputs on the CPU; a failed warm-up; a failed capture (CPU synchronization such as ``.item()``/``.cpu()``/printing
    or Python control flow on tensor values, ops that cannot be captured); replay differing from eager; the capture
    budget ``max_captures`` spent. A failed capture is cleaned up (stream capture ended, allocator routing to the pool
    ended; on torch versions whose ``capture_end`` does not do that itself, later captures use a fresh pool), the
    context is checked with a synchronize, and that call and later calls with the signature run eagerly and correctly.
    At most ``max_graphs`` signatures hold graphs; a new one evicts the least recently used (after a device
    synchronize, its graphs and buffers are dropped and their memory returns to the pool for later captures; an
    evicted signature seen again is captured again). Inputs that require grad under grad mode run eagerly (the
    runner is inference-only; capture runs under ``no_grad``).

Batch buckets (``batch_buckets=[1, 2, 4, 8]`` or ``batch_buckets=8`` for the powers of two up to 8)
    Dim 0 of every tensor input is the batch. A batch of b rows runs the graph of the smallest bucket >= b: rows [0, b)
    of each static input are copied from the call's inputs; outputs whose dim 0 is the batch (found at capture by
    comparing with an eager call on fewer rows) are sliced back to b rows. The padding rows are never zeros or
    uninitialized memory: at capture they are the last row of the input repeated, afterwards they keep rows of earlier
    calls (rows the model has run on), so a partial batch costs no extra copy per call. This assumes the rows are
    independent (each output row depends only on its input row: true of inference models without cross-batch ops);
    with ``verify=True`` the capture checks it for the capturing call. Inputs that disagree on dim 0, a 0-dim input,
    an empty batch or a batch above the largest bucket use the exact signature instead.

Report
    :meth:`entries` returns one :class:`GraphEntry` per signature: captured or not, the reason, graph node count
    (``cudaGraphGetNodes`` on ``CUDAGraph(keep_graph=True).raw_cuda_graph()`` through cuda-bindings or libcuda;
    None where the torch version cannot expose the graph), ``pool_bytes`` (growth of the device's reserved memory
    during the signature's capture: the segments the shared pool gained for it; 0 when it fit in memory the pool
    already held), ``output_bytes`` (the live output buffers it holds), replays and eager calls.
    :meth:`pool_reserved_bytes` sums the segments owned by the runner's pool(s) (``torch.cuda.memory_snapshot``).

Limits
    One runner's calls must not run from several threads at once (the static buffers are shared; calls from one
    thread on several streams are fine). A ``pool=`` shared between runners is only safe when their calls are
    ordered (one stream, or the caller's events): the stream hand-over above is per runner. A graph holds raw handles
    of the kernels it launched, so their modules must stay loaded while it lives (fxopt's kernel registry is
    process-wide and never unloads). Called inside the caller's own CUDA-graph capture, a new signature runs eagerly
    (its ops join the caller's graph) and nothing is cached. On torch versions whose failed ``capture_end`` skips the
    pool release (fixed upstream in 2026), the failed capture's pool keeps its segments until the process exits.

The capture machinery sits behind a small backend object (:class:`TorchCUDABackend`); CPU tests pass a fake one.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from . import graph_io, nvtx
from .kernel import is_dense

log = logging.getLogger(__name__)

__all__ = ["CUDAGraphRunner", "GraphEntry", "CaptureFailed", "TorchCUDABackend", "cuda_graphs_supported",
           "describe_capture_error", "signature_key", "OUTPUT_MODES"]

OUTPUT_MODES = ("copy", "rotate", "unsafe")

_Tensor = torch.Tensor
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_grad_enabled = torch.is_grad_enabled
# One capture at a time in the process (torch's documented restriction, and the allocator's pool routing).
_CAPTURE_LOCK = threading.RLock()
_UNKEYED = ("<no signature>",)
# What ``native_replay=None`` means (NOTE [Native graph call]): on since the GPU suite passed with it three times in a
# row on the H200 (benchmarks/NOTES.md, 2026-12-01 fourth session); `python -m pytest -m cuda --python-replay` runs
# the suite with the Python closure instead.
NATIVE_REPLAY_DEFAULT = True


# -- signatures ---------------------------------------------------------------------------------------------------
def signature_key(args: Sequence[Any]) -> tuple:
    """The cache key of a call: (shape, strides, dtype, device index) per tensor, (type, value) per other argument.

    Raises TypeError for unhashable arguments and RuntimeError for tensors without strides (sparse, nested).
    """
    # A subclass's type is part of its key: FakeTensors and subclasses (same shape, strides and device) never meet
    # a graph built for plain tensors (a Parameter is one).
    return tuple([((a.shape, a.stride(), a.dtype, a.get_device()) if type(a) in _PLAIN_TENSORS
                   else (type(a), a.shape, a.stride(), a.dtype, a.get_device())) if isinstance(a, _Tensor)
                  else (type(a), a) for a in args])


def _describe_tensor(shape: Sequence[int], dtype: torch.dtype, device: Any, stride: Sequence[int] | None = None,
                     layout: str | None = None) -> str:
    s = f"{str(dtype).replace('torch.', '')}{list(shape)}"
    if layout is not None and layout != "contiguous":
        s += f"({layout})"
    elif stride is not None and tuple(stride) != _contiguous_strides(shape):
        s += f"(strides {list(stride)})"
    return s + f"@{device}"


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(list(shape)):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


def _layout_of(x: torch.Tensor) -> str:
    """The dense layout a bucketed static buffer gets for an input like ``x``."""
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return "contiguous"


_MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
                   "channels_last_3d": torch.channels_last_3d}


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (subclasses)
        return -1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def describe_capture_error(exc: BaseException) -> str:
    """A reason for the report from an exception raised while capturing."""
    msg = f"{type(exc).__name__}: {_first_line(exc)}"
    low = str(exc).lower()
    if "implicit" in low or "legacy stream" in low:
        return f"work on the legacy default stream during capture (an op that cannot be captured): {msg}"
    if ("capturing" in low or "capture" in low and ("unsupported" in low or "invalidated" in low
                                                    or "not permitted" in low)) or "synchroniz" in low:
        return ("CPU synchronization during capture (e.g. .item(), .tolist(), .cpu(), print(tensor), Python control "
                f"flow on tensor values, or an op that syncs): {msg}")
    return f"capture failed: {msg}"


def _reset_generator_capture(device: int) -> None:
    """NOTE [Failed capture and the CUDA RNG]: capture_begin puts the device's default generator in capture mode and
    capture_end takes it out, but when cudaStreamEndCapture fails (an invalidated capture: ``.item()``, a sync),
    torch's capture_end raises before that step, and every later random op on the device fails with "Offset
    increment outside graph capture". A fresh copy of the generator's state is not capturing: install it."""
    gen = torch.cuda.default_generators[device]
    if hasattr(gen, "clone_state") and hasattr(gen, "graphsafe_set_state"):
        gen.graphsafe_set_state(gen.clone_state())


def cuda_graphs_supported(example_args: Sequence[Any]) -> tuple[bool, str]:
    """Whether :class:`CUDAGraphRunner` can capture for these inputs: (False, why) on CPU inputs, without CUDA, ..."""
    tensors = [t for t in pytree.tree_leaves(list(example_args)) if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.device.type != "cuda":
            return False, (f"inputs are on {t.device.type.upper() if t.device.type == 'cpu' else t.device}: "
                           "CUDA graphs need CUDA tensors")
    if not torch.cuda.is_available():
        return False, "CUDA is not available in this process: CUDA graphs need a GPU"
    if not tensors:
        return False, "no tensor inputs: CUDA graphs need CUDA tensors"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return False, f"inputs on several devices ({', '.join(sorted(map(str, devices)))}): one graph runs on one"
    return True, f"inputs on {devices.pop()}"


# -- the capture backend ------------------------------------------------------------------------------------------
class CaptureFailed(Exception):
    """Raised by a backend's ``capture``: ``error`` is what the callable or CUDA raised; ``pool_tainted`` says the
    allocator had to be told by hand that the capture ended (later captures should use a fresh pool)."""

    def __init__(self, error: BaseException, pool_tainted: bool = False):
        super().__init__(str(error))
        self.error = error
        self.pool_tainted = pool_tainted


_libcuda_handle: Any = None


def _libcuda() -> Any:
    global _libcuda_handle
    if _libcuda_handle is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuGraphGetNodes.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
            lib.cuGraphGetNodes.restype = ctypes.c_int
            _libcuda_handle = lib
        except (OSError, AttributeError):
            _libcuda_handle = False
    return _libcuda_handle or None


def _count_graph_nodes(graph: Any) -> int | None:
    """Node count of a captured graph: ``cudaGraphGetNodes`` on the raw graph (needs ``keep_graph=True``)."""
    raw_fn = getattr(graph, "raw_cuda_graph", None)
    if raw_fn is None:
        return None
    try:
        raw = raw_fn()
    except Exception:
        return None
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]

        res = cudart.cudaGraphGetNodes(raw, numNodes=0)
        if int(res[0]) == 0:
            return int(res[-1])
    except Exception:
        pass
    lib = _libcuda()
    if lib is None:
        return None
    n = ctypes.c_size_t(0)
    rc = lib.cuGraphGetNodes(ctypes.c_void_p(int(raw)), None, ctypes.byref(n))
    return int(n.value) if rc == 0 else None


class TorchCUDABackend:
    """The boundary between :class:`CUDAGraphRunner` and CUDA: streams, pools, capture, replay, memory numbers.

    Tests replace it with a fake that has the same methods.
    """

    device_type = "cuda"

    def __init__(self, capture_error_mode: str = "thread_local"):
        self.capture_error_mode = capture_error_mode
        self._keep_graph = True  # becomes False when this torch's CUDAGraph has no keep_graph

    # streams and devices ------------------------------------------------------------------------------------------
    def new_stream(self, device: int) -> Any:
        return torch.cuda.Stream(device=device)

    def fork(self, device: int, side: Any) -> None:
        """``side`` waits for the work queued so far on the caller's current stream."""
        side.wait_stream(torch.cuda.current_stream(device))

    def join(self, device: int, side: Any) -> None:
        """The caller's current stream waits for the work queued so far on ``side``."""
        torch.cuda.current_stream(device).wait_stream(side)

    def on_stream(self, device: int, side: Any) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(device))
        stack.enter_context(torch.cuda.stream(side))
        return stack

    def device_guard(self, device: int) -> contextlib.AbstractContextManager:
        return torch.cuda.device(device)

    @property
    def stream_id(self) -> Callable[[int], int]:
        """``f(device) -> int``: the caller's current stream on ``device`` (cheap; called on every replay)."""
        return torch._C._cuda_getCurrentRawStream

    @property
    def current_device(self) -> Callable[[], int]:
        return torch._C._cuda_getDevice

    def is_capturing(self, device: int) -> bool:
        with torch.cuda.device(device):
            return torch.cuda.is_current_stream_capturing()

    def wait_for(self, device: int, stream_id: int) -> None:
        """Make the caller's current stream on ``device`` wait for all work queued on the stream ``stream_id``."""
        current = torch.cuda.current_stream(device)
        try:
            default = torch.cuda.default_stream(device)
            old = default if stream_id == default.cuda_stream else torch.cuda.ExternalStream(stream_id, device=device)
            current.wait_stream(old)
        except Exception:  # the old stream is gone (a destroyed external stream): wait for everything instead
            torch.cuda.synchronize(device)

    def synchronize(self, device: int) -> None:
        torch.cuda.synchronize(device)

    def check_health(self, device: int) -> None:
        """After a failed capture: the context must still work (a sticky error would make every later call fail)."""
        try:
            torch.cuda.synchronize(device)
            if self.is_capturing(device):
                raise RuntimeError("the current stream is still capturing")
        except Exception as e:
            raise RuntimeError(f"fxopt: the CUDA context on cuda:{device} is unusable after a failed CUDA-graph "
                               f"capture: {e}") from e

    # pools and memory ---------------------------------------------------------------------------------------------
    def new_pool(self, device: int) -> Any:
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    def memory_reserved(self, device: int) -> int:
        return torch.cuda.memory_reserved(device)

    def pool_reserved_bytes(self, device: int, pools: Sequence[Any]) -> int:
        ids = {tuple(p) for p in pools}
        try:
            segments = torch.cuda.memory_snapshot(include_traces=False)
        except TypeError:  # older torch: no include_traces
            segments = torch.cuda.memory_snapshot()
        return sum(int(s.get("total_size", 0)) for s in segments
                   if s.get("device", device) == device and tuple(s.get("segment_pool_id", ())) in ids)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def clear_blas_workspaces(self, device: int) -> None:
        """Free the cuBLAS workspaces of every stream (NOTE [cuBLAS workspaces in graphs]); a no-op on a torch
        without the call. The next GEMM on a stream allocates a new one."""
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            with torch.cuda.device(device):
                clear()

    # capture and replay -------------------------------------------------------------------------------------------
    def _new_graph(self) -> Any:
        if self._keep_graph:
            try:
                return torch.cuda.CUDAGraph(keep_graph=True)
            except TypeError:
                self._keep_graph = False
        return torch.cuda.CUDAGraph()

    def _end_pool_routing(self, device: int, pool: Any) -> bool:
        """Tell the caching allocator that capture into ``pool`` ended, if torch's ``capture_end`` could not.

        Returns True when it had to (older torch: a failed ``cudaStreamEndCapture`` skipped it), False when torch
        already had (the call then raises 'not currently recording'). Never releases the pool: torch's ``reset()``
        does that on versions that do it, and a second release could free memory a live graph uses.
        """
        end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
            torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
        if end is None:
            return True
        try:
            end(device, pool)
            return True
        except Exception:
            return False

    def capture(self, fn: Callable[..., Any], inputs: Sequence[Any], *, device: int, pool: Any, stream: Any) -> tuple:
        """Capture ``fn(*inputs)`` on ``stream`` into ``pool``; returns (graph, outputs) or raises CaptureFailed."""
        graph = self._new_graph()
        keep = self._keep_graph
        with torch.cuda.device(device), torch.cuda.stream(stream):
            began = False
            try:
                graph.capture_begin(pool=pool, capture_error_mode=self.capture_error_mode)
                began = True
                outputs = fn(*inputs)
            except BaseException as e:
                if began:
                    try:
                        graph.capture_end()  # ends the (invalidated) stream capture
                        tainted = False
                    except Exception:
                        tainted = self._end_pool_routing(device, pool)
                        _reset_generator_capture(device)
                else:
                    tainted = self._end_pool_routing(device, pool)
                del graph
                if not isinstance(e, Exception):
                    raise  # KeyboardInterrupt and the like: cleaned up, not a capture failure
                raise CaptureFailed(e, tainted) from e
            try:
                graph.capture_end()
            except Exception as e:
                tainted = self._end_pool_routing(device, pool)
                _reset_generator_capture(device)
                del graph, outputs
                raise CaptureFailed(e, tainted) from e
        if keep:
            try:
                graph.instantiate()
            except Exception as e:
                del graph, outputs
                raise CaptureFailed(e, False) from e
        return graph, outputs

    def replayer(self, graph: Any) -> Callable[[], None]:
        return graph.replay

    @functools.cached_property
    def graph_io(self) -> str | None:
        """None when captured graphs can hold their own input and output copies (runtime/graph_io.py), else why
        not; fakes without this attribute never do."""
        return "needs CUDAGraph(keep_graph=True)" if not self._keep_graph else graph_io.available()

    def graph_exec(self, graph: Any) -> int:
        return graph.raw_cuda_graph_exec()

    def rng_state(self, device: int) -> Any:
        """The device's default CUDA generator state (seed and Philox offset, held on the host)."""
        return torch.cuda.get_rng_state(device)

    def set_rng_state(self, device: int, state: Any) -> None:
        torch.cuda.set_rng_state(state, device)

    def replay_uses_rng(self, device: int, replay: Callable[[], None]) -> bool:
        """Whether a replay advances the device's default CUDA generator (the graph captured random ops): replay
        once and compare the generator's offset. torch's ``replay()`` then updates the generator first, which the
        native graph call does not do."""
        try:
            gen = torch.cuda.default_generators[device]
            before = gen.get_offset()
            replay()
            return gen.get_offset() != before
        except Exception:  # noqa: BLE001 -- unknown: keep torch's replay
            return True

    def num_nodes(self, graph: Any) -> int | None:
        return _count_graph_nodes(graph)


# -- entries --------------------------------------------------------------------------------------------------------
@dataclass
class GraphEntry:
    """One signature as :meth:`CUDAGraphRunner.entries` reports it (a snapshot)."""

    signature: str  # human-readable: "float32[8, 1024]@cuda:0 (bucket 8)"
    status: str  # "captured" | "eager" | "evicted"
    captured: bool
    reason: str | None  # why it runs eagerly / was evicted
    bucket: int | None
    graphs: int  # graphs held (rotate_depth in "rotate" mode, else 1)
    num_nodes: int | None  # nodes of one graph
    pool_bytes: int | None  # device memory the shared pool gained during this signature's capture
    output_bytes: int  # live output buffers of its graphs (inside the pool)
    replays: int
    eager_calls: int
    capture_seconds: float
    note: str | None = None
    key: tuple = ()
    replay: str = ""  # "native", or "Python: why" (NOTE [Native graph call]); "" when not captured


class _Entry:
    __slots__ = ("key", "description", "device", "bucket", "status", "reason", "note", "graphs", "replayers",
                 "static_inputs", "out_leaves", "spec", "batched", "alias_input", "num_nodes", "pool_bytes",
                 "output_bytes", "replays", "eager_calls", "capture_seconds", "last_used", "cursor", "fast_keys",
                 "io_inputs", "io_outputs", "uses_rng", "native_calls", "python_replay", "pools")

    def __init__(self, key: tuple, description: str, device: int | None, bucket: int | None):
        self.key = key
        self.description = description
        self.device = device
        self.bucket = bucket
        self.status = "pending"
        self.reason: str | None = None
        self.note: str | None = None
        self.graphs: list = []
        self.replayers: list = []
        self.static_inputs: list = []  # (argument position, static tensor)
        self.out_leaves: list[list] = []  # per graph: flat outputs
        self.spec = None
        self.batched: list[bool] = []
        self.alias_input: list[bool] = []
        self.num_nodes: int | None = None
        self.pool_bytes: int | None = None
        self.output_bytes = 0
        self.replays = 0
        self.eager_calls = 0
        self.capture_seconds = 0.0
        self.last_used = 0
        self.cursor = 0
        self.fast_keys: list = []
        self.io_inputs: list = []  # (argument position, graph_io.CopyNode into its static buffer)
        self.io_outputs: list = []  # per output leaf: graph_io.CopyNode out of it (empty: outputs cloned instead)
        self.uses_rng = True  # whether a replay advances the CUDA generator (then only torch's replay() will do)
        self.native_calls: list = []  # weak references to its native graph calls (NOTE [Native graph call])
        self.python_replay: str | None = None  # why its last call path replays from Python, when it does
        self.pools: list = []  # pools of its own graphs (NOTE [Pools and held outputs]); empty: the runner's pool

    def drop_buffers(self) -> None:
        self.forget_native_calls()
        self.graphs, self.replayers, self.static_inputs, self.out_leaves = [], [], [], []
        self.io_inputs, self.io_outputs, self.pools = [], [], []

    def forget_native_calls(self) -> None:
        """Drop the native graph calls (their closures are gone), keeping the count of their replays."""
        self.replays += self.native_replays()
        self.native_calls = []

    def native_replays(self) -> int:
        """Replays launched by the native graph calls (the Python closures count theirs in ``replays``)."""
        from . import native

        mod = native.module()
        calls = [ref() for ref in self.native_calls]
        return sum(mod.graph_launches(c) for c in calls if c is not None) if mod else 0

    def snapshot(self) -> GraphEntry:
        return GraphEntry(signature=self.description, status=self.status, captured=self.status == "captured",
                          reason=self.reason, bucket=self.bucket, graphs=len(self.graphs), num_nodes=self.num_nodes,
                          pool_bytes=self.pool_bytes, output_bytes=self.output_bytes,
                          replays=self.replays + self.native_replays(),
                          eager_calls=self.eager_calls, capture_seconds=self.capture_seconds, note=self.note,
                          key=self.key, replay=self.replay_path())

    def replay_path(self) -> str:
        """How calls replay its graph: from C++ (native) or through the Python closure, and why."""
        if self.status != "captured":
            return ""
        if any(ref() is not None for ref in self.native_calls):
            return "native"
        if self.python_replay is not None:
            return f"Python: {self.python_replay}"
        from . import native

        return f"Python until the native extension is loaded ({native.status()})"


def _is_plain(spec: Any, n: int) -> str | None:
    """'leaf' when the output is one leaf, 'tuple' when it is a plain tuple of leaves, else None."""
    probe = pytree.tree_unflatten(list(range(n)), spec)
    if n == 1 and probe == 0 and not isinstance(probe, (tuple, list, dict)):
        return "leaf"
    if type(probe) is tuple and probe == tuple(range(n)):
        return "tuple"
    return None


def _poison(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(123)  # fits every integer dtype


def _mismatch(got: Any, want: Any, index: int) -> str | None:
    if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
        return f"output {index}: tensor vs non-tensor"
    if not isinstance(want, torch.Tensor):
        return None if got == want else f"output {index}: {got!r} vs eager {want!r}"
    if got.shape != want.shape or got.dtype != want.dtype:
        return (f"output {index}: {str(got.dtype).replace('torch.', '')}{list(got.shape)} vs eager "
                f"{str(want.dtype).replace('torch.', '')}{list(want.shape)}")
    if got.numel() == 0:
        return None
    if got.is_floating_point() or got.is_complex():
        ok = torch.allclose(got, want, rtol=1e-3, atol=1e-3, equal_nan=True)
        if not ok:
            diff = (got.double() - want.double()).abs().nan_to_num(float("inf")).max().item()
            return f"output {index}: max abs difference {diff:.3g}"
        return None
    return None if torch.equal(got, want) else f"output {index}: values differ"


# -- the runner -----------------------------------------------------------------------------------------------------
class CUDAGraphRunner:
    """Replays ``fn`` from CUDA graphs, one per input signature (see the module docstring for the design).

    * ``max_graphs``: signatures that hold graphs at once; a new one evicts the least recently used.
    * ``batch_buckets``: batch sizes to capture for (a list, or an int N for the powers of two up to N); a batch is
      padded up to its bucket and the outputs sliced back. None: one graph per exact signature.
    * ``output_mode``: ``"copy"`` (fresh outputs every call; default), ``"rotate"`` (``rotate_depth`` graphs per
      signature; an output stays valid for ``rotate_depth - 1`` later calls with the same signature), ``"unsafe"``
      (the graph's own buffers, overwritten by the next call with the same signature).
    * ``warmup_iters``: eager calls on a side stream before capture (at least 1: it compiles and loads kernels).
    * ``pool``: a ``torch.cuda.graph_pool_handle()`` to capture into (to share one pool between runners whose calls
      are never concurrent; every graph then shares it, in every output mode); None: private pools (per runner and
      device in copy mode, per graph in the others: NOTE [Pools and held outputs]).
    * ``max_captures``: capture attempts allowed over the runner's life (default ``8 * max_graphs``); past it, new
      signatures run eagerly (protects against a workload that keeps cycling through more signatures than fit).
    * ``verify``: replay once at capture on poisoned outputs and compare with eager; fall back on a difference.
    * ``graph_io``: the graph copies its own inputs in (and, in copy mode, its outputs out) through kernel nodes
      pointed at each call's tensors (runtime/graph_io.py): one launch per call instead of three. False: copies
      launched from Python around the replay, as before.
    * ``native_replay``: calls served by graph I/O run in C++ (NOTE [Native graph call]) once fxopt's native
      extension is loaded (runtime/native.py; ``FXOPT_NATIVE_CALL=0`` turns it off); None: ``NATIVE_REPLAY_DEFAULT``
      (True). False: the Python closure, 5-12 µs more per call on the H200.
    * ``backend``: the capture boundary (tests pass a fake); default :class:`TorchCUDABackend`.
    * ``preserve``: a context manager factory around each capture (warm-ups, capture, check replay) that puts the
      model's state back after it (``fxopt.state.preserved``; NOTE [Warm-ups of stateful models]).
    """

    def __init__(self, fn: Callable[..., Any], *, max_graphs: int = 8, batch_buckets: Sequence[int] | int | None = None,
                 output_mode: str = "copy", warmup_iters: int = 3, pool: Any = None, rotate_depth: int = 2,
                 max_captures: int | None = None, verify: bool = True, backend: Any = None, graph_io: bool = True,
                 native_replay: bool | None = None, preserve: Callable[[], Any] | None = None):
        if max_graphs < 1:
            raise ValueError("max_graphs must be at least 1")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if rotate_depth < 2:
            raise ValueError("rotate_depth must be at least 2 (depth 1 is output_mode='unsafe')")
        self._fn = fn
        # NOTE [Warm-ups of stateful models]: warm-ups and the check replay run the model 4-5 times before the
        # call's own replay; a model that writes state (a KV cache, a counter) must see one run per call.
        self._preserve = preserve if preserve is not None else contextlib.nullcontext
        self.max_graphs = int(max_graphs)
        self.batch_buckets = _normalize_buckets(batch_buckets)
        self.output_mode = output_mode
        self.rotate_depth = int(rotate_depth) if output_mode == "rotate" else 1
        self.warmup_iters = max(1, int(warmup_iters))
        self.max_captures = int(max_captures) if max_captures is not None else 8 * self.max_graphs
        self.verify = verify
        self.graph_io = graph_io
        self.native_replay = NATIVE_REPLAY_DEFAULT if native_replay is None else native_replay
        self._backend = backend if backend is not None else TorchCUDABackend()
        self._user_pool = pool
        self._pools: dict[int, Any] = {}
        self._retired_pools: dict[int, list] = {}
        self._side_streams: dict[int, Any] = {}  # device -> stream for warm-ups and captures
        self._stream_state: dict[int, list] = {}
        self._entries: dict[tuple, _Entry] = {}  # entry key -> entry (captured or eager)
        self._fast: dict[tuple, Callable[[tuple], Any]] = {}  # call key -> closure
        self._history: deque[_Entry] = deque(maxlen=64)  # evicted entries, for the report
        self._last: _Entry | None = None
        self._clock = 0
        self._lock = threading.RLock()
        # NOTE [Concurrent calls]: calls with one signature share its static buffers and copy nodes; two threads
        # interleaving "fill the inputs, replay" would replay one thread's graph on the other's inputs. One call at
        # a time per runner (an uncontended lock costs ~0.1 µs); calls on one stream keep their launch order.
        self._call_lock = threading.RLock()
        self.captures = 0  # capture attempts
        self.evictions = 0
        self._max_fast = 4096
        self._max_eager_entries = max(64, 4 * self.max_graphs)

    # -- the call path ---------------------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        if _grad_enabled():
            for a in args:
                if isinstance(a, _Tensor) and a.requires_grad:
                    return self._fn(*args)  # inference-only: autograd needs the eager ops
        try:
            if len(args) == 1 and type(args[0]) is _Tensor:  # the common case, ~0.2 µs cheaper; same key as below
                a = args[0]
                key = ((a.shape, a.stride(), a.dtype, a.get_device()),)
            else:
                key = signature_key(args)
            run = self._fast.get(key)
        except Exception:  # unhashable argument, tensor without strides
            return self._call_unkeyed(args)
        if run is None:
            return self._call_slow(args, key)
        with self._call_lock:  # NOTE [Concurrent calls]
            return run(args)

    def _call_unkeyed(self, args: tuple) -> Any:
        with self._lock:
            entry = self._entries.get(_UNKEYED)
            if entry is None:
                entry = _Entry(_UNKEYED, "<unhashable argument or tensor without strides>", None, None)
                entry.status, entry.reason = "eager", ("an argument is unhashable, or a tensor has no strides "
                                                       "(sparse, nested): the call has no signature")
                self._entries[_UNKEYED] = entry
            entry.eager_calls += 1
        return self._fn(*args)

    def _call_slow(self, args: tuple, key: tuple) -> Any:
        with self._lock:
            run = self._fast.get(key)
            if run is None:
                device, reason = self._classify(args)
                if reason is None and self._backend.is_capturing(device):
                    # Inside the caller's own capture: run the ops so they land in the caller's graph; no caching.
                    return self._fn(*args)
                entry_key, description, bucket, b, note = self._plan(args, key, device, reason)
                entry = self._entries.get(entry_key)
                if entry is None:
                    entry = self._new_entry(args, entry_key, description, device, bucket, b, note, reason)
                with torch.inference_mode(False):  # views of the buffers must be normal tensors
                    run = self._closure(entry, b, args)
                if len(self._fast) >= self._max_fast:
                    self._forget_fast()
                self._fast[key] = run
                entry.fast_keys.append(key)
        with self._call_lock:
            return run(args)

    # -- planning --------------------------------------------------------------------------------------------------
    def _classify(self, args: tuple) -> tuple[int | None, str | None]:
        """(device index, None) when a graph may serve these inputs, else (None, reason)."""
        tensors = [a for a in args if isinstance(a, _Tensor)]
        for a in args:
            if not isinstance(a, _Tensor) and any(isinstance(t, _Tensor) for t in pytree.tree_leaves(a)):
                return None, "tensors inside lists/tuples/dicts: pass tensors as positional arguments"
        if not tensors:
            return None, "no tensor inputs"
        for t in tensors:
            if t.layout != torch.strided:
                return None, f"a {t.layout} tensor input: CUDA graphs need dense tensors"
            if type(t) not in _PLAIN_TENSORS:  # FakeTensors and subclasses: no memory a graph can copy
                return None, f"a {type(t).__name__} input (a tensor subclass): CUDA graphs need plain tensors"
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            return None, f"inputs on several devices ({', '.join(sorted(map(str, devices)))})"
        device = devices.pop()
        if device.type != self._backend.device_type:
            kind = "CPU (CPU tensors)" if device.type == "cpu" else str(device)
            return None, f"inputs are on {kind}: CUDA graphs need {self._backend.device_type.upper()} tensors"
        return (device.index if device.index is not None else 0), None

    def _plan(self, args: tuple, key: tuple, device: int | None, reason: str | None):
        """(entry key, description, bucket, batch, note) for a call."""
        exact_desc = ", ".join(
            _describe_tensor(a.shape, a.dtype, a.device, a.stride()) if isinstance(a, _Tensor) else repr(a)
            for a in args)
        if reason is not None or not self.batch_buckets:
            return key, exact_desc, None, None, None
        tensors = [a for a in args if isinstance(a, _Tensor)]
        note = None
        if any(t.dim() == 0 for t in tensors):
            note = "no batch bucketing: a 0-dim tensor input"
        elif len({t.shape[0] for t in tensors}) > 1:
            note = "no batch bucketing: tensor inputs disagree on dim 0"
        else:
            b = tensors[0].shape[0]
            bucket = next((s for s in self.batch_buckets if s >= b), None)
            if b == 0:
                note = "no batch bucketing: empty batch"
            elif bucket is None:
                note = f"no batch bucketing: batch {b} above the largest bucket {self.batch_buckets[-1]}"
            else:
                parts, descs = [("bucket", bucket)], []
                for a in args:
                    if isinstance(a, _Tensor):
                        layout = _layout_of(a)
                        shape = (bucket, *a.shape[1:])
                        parts.append((shape, layout, a.dtype, a.get_device()))
                        descs.append(_describe_tensor(shape, a.dtype, a.device, layout=layout))
                    else:
                        parts.append((type(a), a))
                        descs.append(repr(a))
                return tuple(parts), f"{', '.join(descs)} (bucket {bucket})", bucket, b, None
        return key, exact_desc, None, None, note

    # -- entries ---------------------------------------------------------------------------------------------------
    def _new_entry(self, args, entry_key, description, device, bucket, b, note, reason) -> _Entry:
        entry = _Entry(entry_key, description, device, bucket)
        entry.note = note
        self._entries[entry_key] = entry
        if reason is None and self.captures >= self.max_captures:
            reason = (f"capture budget spent (max_captures={self.max_captures}): more signatures than fit in "
                      f"max_graphs={self.max_graphs}; consider batch_buckets")
        if reason is not None:
            self._mark_eager(entry, reason)
            return entry
        captured = [e for e in self._entries.values() if e.status == "captured"]
        for victim in sorted(captured, key=lambda e: e.last_used)[: max(0, len(captured) - self.max_graphs + 1)]:
            self._evict(victim)
        self._capture(entry, args, b)
        return entry

    def _mark_eager(self, entry: _Entry, reason: str) -> None:
        entry.status, entry.reason = "eager", reason
        entry.drop_buffers()
        log.info("fxopt cuda graphs: %s runs eagerly: %s", entry.description, reason)
        eager = [k for k, e in self._entries.items() if e.status == "eager"]
        for k in eager[: max(0, len(eager) - self._max_eager_entries)]:
            self._drop(self._entries.pop(k))

    def _drop(self, entry: _Entry) -> None:
        for k in entry.fast_keys:
            self._fast.pop(k, None)
        entry.fast_keys = []
        if self._last is entry:
            self._last = None

    def _evict(self, entry: _Entry) -> None:
        if entry.device is not None:
            self._backend.synchronize(entry.device)  # in-flight replays finish before their buffers are reused
        self._drop(entry)
        self._entries.pop(entry.key, None)
        entry.status = "evicted"
        entry.reason = f"evicted: least recently used of max_graphs={self.max_graphs}"
        entry.drop_buffers()
        self.evictions += 1
        self._history.append(entry)
        log.info("fxopt cuda graphs: evicted %s", entry.description)

    def _forget_fast(self) -> None:
        self._fast.clear()
        for e in self._entries.values():
            e.fast_keys = []
            e.forget_native_calls()

    def _touch(self, entry: _Entry) -> None:
        self._clock += 1
        entry.last_used = self._clock
        self._last = entry

    def _pool(self, device: int, entry: _Entry) -> Any:
        """The pool the next graph of ``entry`` is captured into.

        NOTE [Pools and held outputs]: graphs captured into one pool may reuse each other's freed memory: a later
        graph's outputs can sit where an earlier graph keeps its temporaries (and the cuBLAS workspace, NOTE [cuBLAS
        workspaces in graphs]), so replaying the earlier graph overwrites them. In copy mode that is harmless: every
        output leaves the pool (copied by the graph, or cloned right after the replay, on the same stream) before
        another replay can start. In "unsafe" and "rotate" modes the caller holds the graph's own buffers across
        calls, so each graph gets a pool of its own, kept with its entry and dropped with it: more memory (the
        temporaries of graphs are no longer shared), outputs no other graph writes. A rotate-mode call followed by
        one with the other of its two graphs could see the second's temporaries land on the first's outputs; the
        test of calls on two streams failed in rotate mode for a reason never found, and this may be it.
        """
        if self._user_pool is not None:
            return self._user_pool
        if self.output_mode != "copy":
            pool = self._backend.new_pool(device)
            entry.pools.append(pool)
            return pool
        pool = self._pools.get(device)
        if pool is None:
            pool = self._pools[device] = self._backend.new_pool(device)
        return pool

    def _side_stream(self, device: int) -> Any:
        """The runner's stream on ``device`` for warm-up calls and captures."""
        s = self._side_streams.get(device)
        if s is None:
            s = self._side_streams[device] = self._backend.new_stream(device)
        return s

    # -- capture ---------------------------------------------------------------------------------------------------
    def _static_inputs(self, args: tuple, bucket: int | None, b: int | None) -> list:
        statics = []
        for a in args:
            if not isinstance(a, _Tensor):
                statics.append(a)
                continue
            if bucket is None:
                s = torch.empty_like(a, memory_format=torch.preserve_format)
                s.copy_(a)
            else:
                s = torch.empty((bucket, *a.shape[1:]), dtype=a.dtype, device=a.device,
                                memory_format=_MEMORY_FORMATS[_layout_of(a)])
                s[:b].copy_(a)
                if b < bucket:
                    s[b:].copy_(a[b - 1])  # pad with the last row (broadcast)
            statics.append(s)
        return statics

    def _capture(self, entry: _Entry, args: tuple, b: int | None) -> None:
        be, dev, fn = self._backend, entry.device, self._fn
        t0 = time.perf_counter()
        self.captures += 1
        with _CAPTURE_LOCK, torch.inference_mode(False), torch.no_grad(), self._preserve():
            statics = self._static_inputs(args, entry.bucket, b)
            side = self._side_stream(dev)
            be.fork(dev, side)
            try:
                with be.on_stream(dev, side):
                    for _ in range(self.warmup_iters):
                        warm = fn(*statics)
            except Exception as e:
                be.join(dev, side)
                return self._mark_eager(entry, f"warm-up failed: {type(e).__name__}: {_first_line(e)}")
            be.join(dev, side)
            warm_leaves, spec = pytree.tree_flatten(warm)
            wrong = next((o.device for o in warm_leaves if isinstance(o, _Tensor) and (
                o.device.type != be.device_type or max(o.get_device(), 0) != dev)), None)
            if wrong is not None:
                kind = "CPU (CPU tensors)" if wrong.type == "cpu" else str(wrong)
                return self._mark_eager(entry, f"an output is on {kind}: CUDA graphs need outputs on cuda:{dev}")
            # Outputs that are not fresh (parameters, buffers, inputs returned as they are) keep their storage.
            warm_ptrs = {_storage_ptr(t) for t in warm_leaves if isinstance(t, _Tensor)}
            static_ptrs = {_storage_ptr(s) for s in statics if isinstance(s, _Tensor)}
            del warm, warm_leaves
            be.synchronize(dev)
            before = be.memory_reserved(dev)
            graphs, outs = [], []
            io: dict = {}
            target = fn
            if self._use_graph_io():
                try:
                    graph_io.prepare(dev)
                    target = self._with_graph_io(fn, dev, io)
                except Exception as e:  # noqa: BLE001 -- only costs speed: copies stay outside the graph
                    io["error"] = f"{type(e).__name__}: {_first_line(e)}"
            # NOTE [cuBLAS workspaces in graphs]: torch keeps one cuBLAS workspace per (handle, stream), allocated
            # at the stream's first GEMM, and a captured GEMM bakes its address in. Captured with the workspace the
            # warm-up (or anyone who ran GEMMs on this raw stream before: torch recycles 32 raw streams per device
            # and priority) left, the graph would use memory of the general allocator, or of another runner's pool,
            # that torch frees whenever workspaces are cleared (torch.compile's reduce-overhead does it around every
            # recording; newer torch when a graph captured on that stream is destroyed): the next replay writes
            # freed memory, an illegal address once the allocator gives it back to the driver. So, as CUDA graph
            # trees do, every workspace is cleared before the capture, which then allocates its own inside the
            # runner's pool, and again after it, so no one else's GEMM runs in the pool's memory later. The freed
            # workspace stays in the pool, reserved while the pool lives; the graphs of a signature share it (their
            # replays are ordered). A later capture into the same pool may put a buffer there that the older
            # graphs' GEMMs then use as scratch: harmless in copy mode, and the other modes give every graph a
            # pool of its own (NOTE [Pools and held outputs]).
            # Cost: every pool whose graphs run a GEMM holds one workspace (32 MiB with torch 2.11 on the H200:
            # pools of 34 MiB where 2 did before; benchmarks/NOTES.md): one per runner in copy mode, one per
            # signature in the others.
            be.clear_blas_workspaces(dev)
            try:
                for _ in range(self.rotate_depth):
                    pool = self._pool(dev, entry)
                    graph, out = be.capture(target, statics, device=dev, pool=pool, stream=side)
                    leaves, out_spec = pytree.tree_flatten(out)
                    graphs.append(graph)
                    outs.append(leaves)
                    if out_spec != spec:
                        graphs.clear()
                        outs.clear()
                        return self._mark_eager(entry, "the output structure changes between calls")
            except CaptureFailed as e:
                graphs.clear()
                outs.clear()
                if e.pool_tainted and self._user_pool is None:
                    if pool in entry.pools:  # its own pool: keep counting what it holds
                        self._retired_pools.setdefault(dev, []).append(pool)
                    elif dev in self._pools:
                        self._retired_pools.setdefault(dev, []).append(self._pools.pop(dev))
                be.check_health(dev)
                return self._mark_eager(entry, describe_capture_error(e.error))
            finally:
                be.clear_blas_workspaces(dev)
            be.join(dev, side)
            entry.pool_bytes = max(0, be.memory_reserved(dev) - before)
            first = outs[0]
            fresh = [isinstance(t, _Tensor) and _storage_ptr(t) not in warm_ptrs and _storage_ptr(t) not in
                     static_ptrs for t in first]
            entry.alias_input = [isinstance(t, _Tensor) and _storage_ptr(t) in static_ptrs for t in first]
            entry.graphs, entry.out_leaves, entry.spec = graphs, outs, spec
            entry.replayers = [be.replayer(g) for g in graphs]
            entry.static_inputs = [(i, s) for i, s in enumerate(statics) if isinstance(s, _Tensor)]
            entry.output_bytes = sum(t.numel() * t.element_size() for leaves in outs
                                     for t, f in zip(leaves, fresh) if f)
            entry.num_nodes = be.num_nodes(graphs[0])
            if io.get("inputs") is not None:
                graph_exec = be.graph_exec(graphs[0])
                for _, node in io["inputs"]:
                    node.attach(graph_exec)
                for node in io["outputs"]:
                    node.attach(graph_exec)
                entry.io_inputs, entry.io_outputs = io["inputs"], io["outputs"]
                if self.native_replay:  # only the native graph call needs to know (NOTE [Native graph call])
                    entry.uses_rng = be.replay_uses_rng(dev, entry.replayers[0])
            elif io.get("error"):
                entry.note = f"inputs and outputs copied outside the graph: {io['error']}"
            reason = self._check(entry, args, b, fresh)
            if reason is not None:
                return self._mark_eager(entry, reason)
        entry.status = "captured"
        entry.capture_seconds = time.perf_counter() - t0
        self._touch(entry)
        log.info("fxopt cuda graphs: captured %s (%s nodes, %.1f ms)", entry.description, entry.num_nodes,
                 entry.capture_seconds * 1e3)

    def _use_graph_io(self) -> bool:
        # one graph per signature (rotate mode keeps several, each with its own outputs) and a backend that can
        return self.rotate_depth == 1 and self.graph_io and getattr(self._backend, "graph_io", "no") is None

    def _with_graph_io(self, fn: Callable[..., Any], dev: int, io: dict) -> Callable:
        """``fn`` wrapped for capture with a copy node into every static tensor input first and, in copy mode, one
        out of every output last (runtime/graph_io.py). On any failure the graph is captured without them."""

        def target(*args: Any) -> Any:
            stream = self._backend.stream_id(dev)
            try:
                ins = [(i, graph_io.CopyNode.over(dev, stream, a))
                       for i, a in enumerate(args) if isinstance(a, _Tensor) and is_dense(a)]
            except Exception as e:  # noqa: BLE001 -- only costs speed: the copies stay outside the graph
                io["error"] = f"{type(e).__name__}: {_first_line(e)}"
                return fn(*args)
            out = fn(*args)
            outs: list = []
            leaves = pytree.tree_leaves(out)
            if self.output_mode == "copy" and leaves and all(isinstance(t, _Tensor) and is_dense(t) for t in leaves):
                try:
                    outs = [graph_io.CopyNode.over(dev, stream, t) for t in leaves]
                except Exception as e:  # noqa: BLE001
                    io["error"] = f"{type(e).__name__}: {_first_line(e)}"
                    return out
            io["inputs"], io["outputs"] = ins, outs
            return out

        return target

    def _check(self, entry: _Entry, args: tuple, b: int | None, fresh: list[bool]) -> str | None:
        """Find the batched outputs of a bucketed entry and, with ``verify``, compare a replay with eager."""
        fn, bucket, be = self._fn, entry.bucket, self._backend
        first = entry.out_leaves[0]
        ref = None
        # A replay draws the same random numbers as eager from the same generator state (the captured kernels read
        # the seed and offset the replay sets), so each replay below starts where eager started.
        rng = be.rng_state(entry.device) if self.verify else None
        if self.verify or (bucket is not None and b < bucket):
            ref = pytree.tree_leaves(fn(*args))
            if len(ref) != len(first):
                return f"graph outputs ({len(first)}) differ in number from eager ({len(ref)})"
        if bucket is not None:
            if b < bucket:
                rows = [r.shape[0] if isinstance(r, _Tensor) and r.dim() else None for r in ref]
                probe_rows = b
            elif bucket > 1:
                probe = pytree.tree_leaves(fn(*[a[:1] if isinstance(a, _Tensor) else a for a in args]))
                rows = [r.shape[0] if isinstance(r, _Tensor) and r.dim() else None for r in probe]
                probe_rows = 1
            else:
                rows, probe_rows = [None] * len(first), 1
            entry.batched = [isinstance(t, _Tensor) and t.dim() > 0 and t.shape[0] == bucket and r == probe_rows
                             and r != bucket for t, r in zip(first, rows)]
        else:
            entry.batched = [False] * len(first)
        if not self.verify:
            return None
        for leaves in entry.out_leaves:
            for t, f in zip(leaves, fresh):
                if f:
                    _poison(t)
        for replay, leaves in zip(entry.replayers, entry.out_leaves):
            be.set_rng_state(entry.device, rng)
            replay()
            for i, (t, want, batched) in enumerate(zip(leaves, ref, entry.batched)):
                got = t[:b] if batched else t
                why = _mismatch(got, want, i)
                if why is not None:
                    return (f"graph replay differs from eager ({why}): a kernel launched outside the capture stream, "
                            f"a value read on the CPU at capture time" +
                            (", or batch rows that are not independent" if bucket is not None else ""))
        return None

    # -- per-signature closures ------------------------------------------------------------------------------------
    def _closure(self, entry: _Entry, b: int | None, args: tuple = ()) -> Callable[[tuple], Any]:
        if entry.status != "captured":
            fn = self._fn

            def run_eager(args: tuple) -> Any:
                entry.eager_calls += 1
                return fn(*args)

            return run_eager
        # with FXOPT_NVTX=1 when set up: each replay inside a range named for its signature (NOTE [NVTX ranges])
        return nvtx.replay_range(self._replay_closure(entry, b, args), f"CUDA graph replay: {entry.description}")

    def _replay_closure(self, entry: _Entry, b: int | None, args: tuple = ()) -> Callable[[tuple], Any]:
        if entry.io_inputs and args:
            return self._graph_io_closure(entry, b, args)
        entry.python_replay = entry.note or "copies outside the graph (rotate mode, or graph_io=False)"
        be, dev, runner = self._backend, entry.device, self
        partial = entry.bucket is not None and b is not None and b < entry.bucket
        ins = [(i, s.narrow(0, 0, b) if partial else s, s) for i, s in entry.static_inputs]
        stream_id, current_device = be.stream_id, be.current_device
        state = self._stream_state.setdefault(dev, [None])

        def switch(sid: int) -> None:
            old, state[0] = state[0], sid
            if old is not None:
                be.wait_for(dev, old)

        def replay_elsewhere(replay: Callable[[], None]) -> None:
            with be.device_guard(dev):
                replay()

        producers = [self._producer(entry, leaves, b if partial else None) for leaves in entry.out_leaves]
        replayers = entry.replayers
        k = len(replayers)

        if len(ins) == 1:
            (p0, d0, s0), = ins
            if k == 1:
                replay0, produce0 = replayers[0], producers[0]

                def run(args: tuple) -> Any:
                    sid = stream_id(dev)
                    if sid != state[0]:
                        switch(sid)
                    x = args[p0]
                    if x is not s0:
                        d0.copy_(x)
                    if current_device() != dev:
                        replay_elsewhere(replay0)
                    else:
                        replay0()
                    entry.replays += 1
                    if runner._last is not entry:
                        runner._touch(entry)
                    return produce0()

                return run

        def run_general(args: tuple) -> Any:
            sid = stream_id(dev)
            if sid != state[0]:
                switch(sid)
            for p, d, s in ins:
                x = args[p]
                if x is not s:
                    d.copy_(x)
            i = entry.cursor
            entry.cursor = i + 1 if i + 1 < k else 0
            if current_device() != dev:
                replay_elsewhere(replayers[i])
            else:
                replayers[i]()
            entry.replays += 1
            if runner._last is not entry:
                runner._touch(entry)
            return producers[i]()

        return run_general

    def _graph_io_closure(self, entry: _Entry, b: int | None, args: tuple) -> Callable[[tuple], Any]:
        """The call for an entry whose graph copies its own inputs and outputs: point the copy nodes at this call's
        tensors, allocate the outputs, replay (NOTE in runtime/graph_io.py). Built per call signature: ``args``
        fixes every size below."""
        be, dev, runner = self._backend, entry.device, self
        partial = entry.bucket is not None and b is not None and b < entry.bucket
        statics = dict(entry.static_inputs)
        pointed, copied = [], []  # (position, node, bytes) pointed at the caller's tensor / copied in eagerly
        for p, node in entry.io_inputs:
            s = statics[p].narrow(0, 0, b) if partial else statics[p]
            x = args[p]
            if x.stride() == s.stride() and x.shape == s.shape and is_dense(x):
                pointed.append((p, node, x.numel() * x.element_size()))
            else:  # a layout the static buffer does not share: copied before the replay, the node copies nothing
                copied.append((p, node, s))
        copied += [(p, None, s.narrow(0, 0, b) if partial else s) for p, s in entry.static_inputs
                   if p not in {q for q, _ in entry.io_inputs}]
        leaves = entry.out_leaves[0]
        if partial:
            leaves = [t.narrow(0, 0, b) if batched else t for t, batched in zip(leaves, entry.batched)]
        outs = []
        if entry.io_outputs and all(is_dense(t) for t in leaves):
            outs = [(node, t.shape, t.stride(), t.dtype, t.numel() * t.element_size())
                    for node, t in zip(entry.io_outputs, leaves)]
        produce = None if outs else self._producer(entry, entry.out_leaves[0], b if partial else None)
        idle_outputs = [] if outs else entry.io_outputs  # outputs cloned after the replay: these copy nothing
        device = torch.device(be.device_type, dev)
        spec, shape = entry.spec, _is_plain(entry.spec, len(leaves))
        unflatten, empty_strided = pytree.tree_unflatten, torch.empty_strided
        stream_id, current_device = be.stream_id, be.current_device
        state = self._stream_state.setdefault(dev, [None])
        replay = entry.replayers[0]

        def run(args: tuple) -> Any:
            sid = stream_id(dev)
            if sid != state[0]:
                old, state[0] = state[0], sid
                if old is not None:
                    be.wait_for(dev, old)
            for p, node, nbytes in pointed:
                node.point(args[p].data_ptr(), node.dst, nbytes)
            for p, node, s in copied:
                if args[p] is not s:
                    s.copy_(args[p])
                if node is not None:
                    node.point(node.dst, node.dst, 0)
            for node in idle_outputs:
                node.point(node.src, node.src, 0)
            if outs:
                result = []
                for node, shp, st, dt, nbytes in outs:
                    o = empty_strided(shp, st, dtype=dt, device=device)
                    node.point(node.src, o.data_ptr(), nbytes)
                    result.append(o)
            if current_device() != dev:
                with be.device_guard(dev):
                    replay()
            else:
                replay()
            entry.replays += 1
            if runner._last is not entry:
                runner._touch(entry)
            if not outs:
                return produce()
            return result[0] if shape == "leaf" else tuple(result) if shape == "tuple" else unflatten(result, spec)

        if copied or idle_outputs:
            entry.python_replay = ("an input copied before the replay (a layout its static buffer does not share)"
                                   if copied else "outputs cloned after the replay (not dense)")
            return run
        return self._native_closure(entry, run, pointed, outs, shape, produce)

    def _native_closure(self, entry: _Entry, run: Callable[[tuple], Any], pointed: list, outs: list,
                        shape: str | None, produce: Callable[[], Any] | None) -> Callable[[tuple], Any]:
        """NOTE [Native graph call]: ``run`` above, done in C++ (native_call.cpp's ``graph_call``): point the input
        copy nodes, allocate the outputs and point their copy nodes, cuGraphLaunch. It takes the calls whose every
        tensor input is pointed (none copied eagerly), whose outputs are copied out by the graph into a tensor or a
        plain tuple (or are the graph's own buffers, in unsafe mode), and whose graph draws no random numbers (torch's
        ``replay()`` advances the generator first). Until the extension is loaded, and for a call on another stream
        or device than the last (the stream hand-over), ``run`` serves the call; ``run`` is also what the C++ side
        falls back to on anything unexpected. Saves the Python-side allocation, the ctypes calls and torch's replay
        wrapper: measured in benchmarks/NOTES.md."""
        from . import native

        fixed = getattr(produce, "result", None) if produce is not None else None
        if outs:
            kind = {"leaf": 0, "tuple": 1}.get(shape)
        else:
            kind = 2 if fixed is not None else None
        entry.python_replay = (
            "native_replay=False" if not self.native_replay else "FXOPT_NATIVE_CALL=0" if not native.enabled()
            else "the graph draws random numbers (torch's replay() advances the generator)" if entry.uses_rng
            else "outputs are not one tensor or a plain tuple of tensors" if kind is None else None)
        if entry.python_replay is not None:
            return run
        be, dev, runner = self._backend, entry.device, self
        api = graph_io._api()
        graph_exec = be.graph_exec(entry.graphs[0])
        inputs = [node.native_input(p, nbytes) for p, node, nbytes in pointed]
        outputs = [node.native_output(nbytes, shp, st, dt) for node, shp, st, dt, nbytes in outs]
        device = torch.device(be.device_type, dev)
        holder: list = [None]

        # The C++ object's references are invisible to the garbage collector, so it must not hold anything that
        # leads back to it (run -> entry/runner -> run_native -> holder -> it): a cycle through it would never be
        # collected, and a deleted runner would keep its graphs and pool. It gets ``run`` through a weak reference
        # (run_native holds ``run`` while it can be called) and holds the graph itself, whose execution it launches.
        run_ref = weakref.ref(run)

        def fallback(args: tuple) -> Any:
            live = run_ref()
            if live is None:
                raise RuntimeError("fxopt: a native graph call outlived its runner's signature (released or evicted)")
            return live(args)

        graph = entry.graphs[0]

        def attach(mod) -> None:
            call = mod.graph_call(entry.description[:200], fallback, device, torch.Tensor, torch.nn.Parameter,
                                  api.set_params_address, api.graph_launch_address, graph_exec, inputs, outputs,
                                  kind, fixed, graph)
            holder[0] = call
            entry.native_calls.append(weakref.ref(call))
        native.start()
        native.when_ready(attach)
        stream_id, current_device = be.stream_id, be.current_device
        state = self._stream_state.setdefault(dev, [None])

        def run_native(args: tuple) -> Any:
            call = holder[0]
            if call is None:
                return run(args)
            sid = stream_id(dev)
            if sid != state[0] or current_device() != dev:
                return run(args)  # the hand-over between streams, the device guard
            if runner._last is not entry:
                runner._touch(entry)
            return call(args, sid)

        run_native.native = holder  # for tests and benchmarks: holder[0] is the native call once attached
        return run_native

    def _producer(self, entry: _Entry, leaves: list, b: int | None) -> Callable[[], Any]:
        """What a call returns after the replay, per output mode, with everything precomputed."""
        spec, n = entry.spec, len(leaves)
        if b is not None:
            leaves = [t.narrow(0, 0, b) if batched else t for t, batched in zip(leaves, entry.batched)]
        shape = _is_plain(spec, n)
        is_tensor = [isinstance(t, _Tensor) for t in leaves]
        if self.output_mode == "copy":
            clone = is_tensor
        elif self.output_mode == "rotate":
            clone = [t and a for t, a in zip(is_tensor, entry.alias_input)]
        else:
            clone = [False] * n
        if not any(clone) and shape is not None:
            result = leaves[0] if shape == "leaf" else tuple(leaves)
            fixed = lambda: result  # noqa: E731
            fixed.result = result  # the same object every call (the native graph call returns it too)
            return fixed
        if shape == "leaf":
            (o,) = leaves
            return o.clone
        if shape == "tuple" and all(clone):
            return lambda: tuple([o.clone() for o in leaves])
        pairs = list(zip(leaves, clone))
        unflatten = pytree.tree_unflatten
        return lambda: unflatten([o.clone() if c else o for o, c in pairs], spec)

    # -- public helpers --------------------------------------------------------------------------------------------
    def input_buffers(self, *args: Any) -> tuple[torch.Tensor, ...]:
        """The static input buffers of the graph for these inputs' signature (captured now if new).

        Write the next inputs into them in place and call the runner with them: the copy into the graph is skipped.
        With batch buckets these are the bucket-sized buffers (calling with them runs the full bucket).
        """
        def find() -> _Entry | None:
            with self._lock:
                device, reason = self._classify(args)
                entry_key = self._plan(args, signature_key(args), device, reason)[0]
                return self._entries.get(entry_key)

        entry = find()
        if entry is None:
            self(*args)  # capture now (this runs one call)
            entry = find()
        if entry is None or entry.status != "captured":
            reason = entry.reason if entry is not None else "no graph"
            raise RuntimeError(f"fxopt: no CUDA graph for these inputs: {reason}")
        return tuple(s for _, s in entry.static_inputs)

    def entries(self) -> list[GraphEntry]:
        """Per signature: captured or not and why, graph nodes, pool memory, replays (evicted ones last)."""
        with self._lock:
            live = [e.snapshot() for e in self._entries.values()]
            return live + [e.snapshot() for e in self._history]

    def pool_reserved_bytes(self) -> int:
        """Device memory held now by the segments of this runner's pool(s) (torch.cuda.memory_snapshot)."""
        with self._lock:
            devices = set(self._pools) | set(self._retired_pools) | {
                e.device for e in self._entries.values() if e.device is not None}
            total = 0
            for dev in sorted(devices):
                pools = ([self._user_pool] if self._user_pool is not None else []) + \
                    ([self._pools[dev]] if dev in self._pools else []) + self._retired_pools.get(dev, []) + \
                    [p for e in self._entries.values() if e.device == dev for p in e.pools]
                if pools:
                    total += self._backend.pool_reserved_bytes(dev, pools)
            return total

    def report(self) -> str:
        """The entries as a table."""
        from tabulate import tabulate

        rows = []
        for e in self.entries():
            rows.append((e.signature, e.status, e.bucket if e.bucket is not None else "", e.graphs,
                         e.num_nodes if e.num_nodes is not None else "?",
                         f"{e.pool_bytes / 2**20:.2f}" if e.pool_bytes is not None else "",
                         f"{e.output_bytes / 2**10:.1f}", e.replays, e.eager_calls, f"{e.capture_seconds * 1e3:.1f}",
                         e.replay, e.reason or e.note or ""))
        head = ["signature", "status", "bucket", "graphs", "nodes", "pool MiB added", "outputs KiB", "replays",
                "eager calls", "capture ms", "replay", "reason"]
        return (f"CUDA graphs: output_mode={self.output_mode}, max_graphs={self.max_graphs}, "
                f"buckets={list(self.batch_buckets) or None}, captures={self.captures}, evictions={self.evictions}\n"
                + tabulate(rows, head))

    def release(self, empty_cache: bool = True) -> None:
        """Drop every graph, buffer and record; with ``empty_cache``, give the pool's memory back to the driver."""
        with self._lock:
            for dev in {e.device for e in self._entries.values() if e.device is not None}:
                self._backend.synchronize(dev)
            for e in self._entries.values():
                e.drop_buffers()
                e.fast_keys = []
            self._entries.clear()
            self._fast.clear()
            self._history.clear()
            self._last = None
            self._stream_state.clear()
            self._pools.clear()
            self._retired_pools.clear()
        if empty_cache:
            self._backend.empty_cache()

    def __repr__(self) -> str:
        captured = sum(e.status == "captured" for e in self._entries.values())
        return (f"CUDAGraphRunner({getattr(self._fn, '__name__', type(self._fn).__name__)}, "
                f"output_mode={self.output_mode!r}, graphs={captured}/{self.max_graphs})")


def _normalize_buckets(buckets: Sequence[int] | int | None) -> tuple[int, ...]:
    if buckets is None:
        return ()
    if isinstance(buckets, int):
        if buckets < 1:
            raise ValueError("batch_buckets must be positive")
        out, s = [], 1
        while s < buckets:
            out.append(s)
            s *= 2
        out.append(buckets)
        return tuple(out)
    out = sorted({int(s) for s in buckets})
    if not out or out[0] < 1:
        raise ValueError(f"batch_buckets must be positive batch sizes, got {list(buckets)}")
    return tuple(out)
