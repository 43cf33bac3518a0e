"""Independent branches on side CUDA streams: the calls a graph rewritten by ``parallel_branches`` makes.

One fork/join region in the rewritten graph reads::

    fork = fxopt_runtime_streams_fork(0)                  # event on the caller's current stream of cuda:0
    enter_branch = fxopt_runtime_streams_enter_branch(fork, 0)   # side stream 0 waits for it, becomes current
    conv_b = torch.cudnn_convolution_relu(x, ...)         # ... the side branch, launched on side stream 0
    exit_branch = fxopt_runtime_streams_exit_branch(enter_branch, conv_b)   # event on side 0; caller's stream back
    conv_a = torch.cudnn_convolution_relu(x, ...)         # the main branch, on the caller's stream meanwhile
    join = fxopt_runtime_streams_join(fork, exit_branch, inputs=[x])   # caller's stream waits for every side
    cat = torch.cat([conv_a, conv_b], 1)

Streams
    The caller's stream is read at call time (``torch.cuda.current_stream(device)``), never stored: the same graph
    runs on the default stream, on a caller's own stream, and on the stream a CUDA-graph capture runs on. Side streams
    are created once per (device, priority, index) and reused by every graph in the process; they take the caller's
    stream priority. Sharing is safe (work on one stream is ordered) and at worst serializes two callers' branches.

CUDA graphs
    The pattern is CUDA's forked capture: a side stream that waits on an event recorded on the capturing stream joins
    the capture, and the capturing stream waits on every side stream's last event before the capture ends, so the
    captured graph has the branches as parallel paths. Allocations on a side stream during capture come from the
    capture's private pool (PyTorch routes every stream taking part in the capture there).

NOTE [Stream memory safety]
    The caching allocator hands a freed block to the next allocation *on the stream it was allocated on*, ordered on
    that stream only. Two hazards follow, both handled here:

    * a tensor of the caller's stream read on a side stream (a branch input): if its last reference died while the
      side stream still reads it, the caller's stream could reuse the block early. ``join`` takes the branch inputs
      (``inputs=``) and so keeps them alive until the caller's stream has waited for every side stream: the free
      happens after the wait, and every later allocation on the caller's stream is ordered after the reads
      (equivalent to ``record_stream(side)``, without its event per free).
    * a tensor allocated on a side stream and read on the caller's stream (a branch output): freed after its consumer
      is enqueued, its block returns to the side stream's pool, and another user of the shared side stream (another
      thread, another caller stream) could write it before the consumer ran. ``exit_branch`` calls
      ``record_stream(caller's stream)`` on each output, so the allocator waits for the caller's stream first.

    Intermediate tensors of a branch are allocated, used and freed on its side stream: ordered by the stream itself.

NOTE [Stream exceptions]
    An exception inside a side branch would leave the side stream current for the caller. Every open branch is kept
    on a per-thread list; :func:`guard`, wrapped around the call path by ``fxopt.optimize``, puts the caller's stream
    back (:func:`unwind`). A graph run some other way (``fxopt.annotate``, an ``fx.Interpreter``) that raises inside
    a branch should call :func:`unwind` itself.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch.fx.node import has_side_effect

_side_streams: dict[tuple[int, int, int], Any] = {}
_side_lock = threading.Lock()
_open = threading.local()  # .branches: the branches entered and not exited, in this thread


class Fork:
    """A fork point: the caller's stream and the event recorded on it, which every side branch waits for."""

    __slots__ = ("device", "main", "event", "priority")

    def __init__(self, device: int, main: Any, event: Any, priority: int):
        self.device, self.main, self.event, self.priority = device, main, event, priority

    def __repr__(self) -> str:
        return f"Fork(cuda:{self.device}, main={self.main})"


class Branch:
    """One side branch: its stream, and after :func:`exit_branch` the event its last kernel is followed by."""

    __slots__ = ("fork", "side", "done", "previous_device")

    def __init__(self, fork: Fork, side: Any, previous_device: int | None):
        self.fork, self.side, self.done, self.previous_device = fork, side, None, previous_device

    def __repr__(self) -> str:
        return f"Branch(side={self.side}, done={self.done is not None})"


def side_stream(device: int, index: int, priority: int = 0) -> Any:
    """Side stream ``index`` of ``device`` at ``priority``: created on first use, then reused."""
    key = (device, priority, index)
    stream = _side_streams.get(key)
    if stream is None:
        with _side_lock:
            stream = _side_streams.get(key)
            if stream is None:
                stream = torch.cuda.Stream(device=device, priority=priority)
                _side_streams[key] = stream
    return stream


def _open_branches() -> list[Branch]:
    branches = getattr(_open, "branches", None)
    if branches is None:
        branches = _open.branches = []
    return branches


@has_side_effect
def fork(device: int) -> Fork:
    """Record an event on the caller's current stream of ``device``: what the side branches start after."""
    main = torch.cuda.current_stream(device)
    event = torch.cuda.Event()
    event.record(main)
    return Fork(device, main, event, getattr(main, "priority", 0))


@has_side_effect
def enter_branch(fork: Fork, index: int) -> Branch:
    """Make side stream ``index`` wait for the fork's event and make it the current stream: the nodes up to
    :func:`exit_branch` launch on it."""
    side = side_stream(fork.device, index, fork.priority)
    side.wait_event(fork.event)
    current = torch.cuda.current_device()
    branch = Branch(fork, side, current if current != fork.device else None)
    _open_branches().append(branch)
    torch.cuda.set_stream(side)  # (also makes fork.device current; previous_device restores the caller's)
    return branch


def _record_on(values: Any, stream: Any) -> None:
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.is_cuda:
                v.record_stream(stream)
        elif isinstance(v, (list, tuple)):
            _record_on(v, stream)


@has_side_effect
def exit_branch(branch: Branch, *outputs: Any) -> Branch:
    """End a side branch: its ``outputs`` (read later on the caller's stream) are recorded on that stream
    (NOTE [Stream memory safety]), an event is recorded on the side stream, and the caller's stream is current
    again."""
    fork = branch.fork
    _record_on(outputs, fork.main)
    branch.done = torch.cuda.Event()
    branch.done.record(branch.side)
    torch.cuda.set_stream(fork.main)
    if branch.previous_device is not None:
        torch.cuda.set_device(branch.previous_device)
    branches = _open_branches()
    if branch in branches:
        branches.remove(branch)
    return branch


@has_side_effect
def join(fork: Fork, *branches: Branch, inputs: Any = ()) -> None:
    """The caller's stream waits for every side branch. ``inputs`` (the branches' inputs) are held until here
    (NOTE [Stream memory safety])."""
    main = fork.main
    for b in branches:
        main.wait_event(b.done)


def unwind() -> None:
    """Put the caller's stream back after an exception inside a side branch (NOTE [Stream exceptions])."""
    branches = _open_branches()
    while branches:
        branch = branches.pop()
        torch.cuda.set_stream(branch.fork.main)
        if branch.previous_device is not None:
            torch.cuda.set_device(branch.previous_device)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with :func:`unwind` on any exception: the call path of a graph that has side branches."""

    def guarded(*args: Any) -> Any:
        try:
            return fn(*args)
        except BaseException:
            unwind()
            raise

    guarded.__wrapped__ = fn
    return guarded


RUNTIME_FUNCTIONS = (fork, enter_branch, exit_branch, join)


def without_streams(gm: "torch.fx.GraphModule") -> "torch.fx.GraphModule":
    """A copy of ``gm`` with the stream calls removed: the same computation on the caller's stream alone. The calls
    only order work (their values are handles other stream calls read), so removing them all is exact; what
    torch.export and fxopt.save see (an exported program cannot hold streams and events)."""
    import torch.fx as fx

    graph = fx.Graph()
    env: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in RUNTIME_FUNCTIONS:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph._codegen = gm.graph._codegen
    return fx.GraphModule(gm, graph, gm.__class__.__name__)  # its own class and code; shares gm's modules and tensors
