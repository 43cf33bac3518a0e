"""The capture boundary: :class:`TorchCUDABackend` (streams, pools, capture, replay, memory numbers),
:class:`CaptureFailed`, and the helpers around a capture (the reason of a failed one, the CUDA RNG after it,
graph node counts). CPU tests replace the backend with a fake that has the same methods.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from .. import graph_io
from . import pdl

log = logging.getLogger(__name__)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def describe_capture_error(exc: BaseException) -> str:
    """A reason for the report from an exception raised while capturing."""
    msg = f"{type(exc).__name__}: {first_line(exc)}"
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


def _count_graph_nodes(graph: Any) -> int | None:
    """Node count of a captured graph: ``cuGraphGetNodes`` on the raw graph (needs ``keep_graph=True``)."""
    raw_fn = getattr(graph, "raw_cuda_graph", None)
    if raw_fn is None:
        return None
    try:
        from .. import driver

        return driver.graph_node_count(int(raw_fn()))
    except Exception:  # noqa: BLE001 -- no cuda-bindings, no driver, no kept graph: the count is only reported
        return None


class TorchCUDABackend:
    """The boundary between :class:`CUDAGraphRunner` and CUDA: streams, pools, capture, replay, memory numbers.

    Tests replace it with a fake that has the same methods.
    """

    device_type = "cuda"

    def __init__(self, capture_error_mode: str = "thread_local", programmatic_launch: bool | None = None):
        self.capture_error_mode = capture_error_mode
        self._keep_graph = True  # becomes False when this torch's CUDAGraph has no keep_graph
        # NOTE [Programmatic dependent launch]: edges into generated kernels made programmatic (runtime/cudagraph/pdl.py)
        self.programmatic_launch = pdl.PROGRAMMATIC_LAUNCH_DEFAULT if programmatic_launch is None else programmatic_launch
        self.programmatic_edges = 0  # of the last capture
        self.programmatic_note: str | None = None  # why the last capture has none, when it could have had

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
            self._programmatic_edges(graph, device)
            try:
                graph.instantiate()
            except Exception as e:
                del graph, outputs
                raise CaptureFailed(e, False) from e
        return graph, outputs

    def _programmatic_edges(self, graph: Any, device: int) -> None:
        """Make the captured graph's edges into generated kernels programmatic, where on (before instantiation).
        A refusal costs only the overlap: the graph keeps its full edges, and the note says why."""
        self.programmatic_edges, self.programmatic_note = 0, None
        if not self.programmatic_launch:
            return
        if not pdl.supported(device):
            self.programmatic_note = "programmatic launch needs compute capability 9.0"
            return
        try:
            self.programmatic_edges = pdl.make_programmatic(graph.raw_cuda_graph())
        except Exception as e:  # noqa: BLE001 -- the graph's edges are unchanged or fully rewritten; see make_programmatic
            self.programmatic_note = f"programmatic edges not made: {type(e).__name__}: {e}"
            log.info(self.programmatic_note)

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
