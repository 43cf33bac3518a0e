"""The runner: :class:`CUDAGraphRunner` plans a call (signature, bucket), captures and checks its graph, keeps
the entries (eviction, budget) and reports them; the replay closures are in replay.py.

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
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from .. import graph_io
from ..kernel import is_dense
from .backend import CaptureFailed, TorchCUDABackend, describe_capture_error, first_line
from .entries import Entry, GraphEntry
from .replay import ReplayClosures
from .signatures import MEMORY_FORMATS, PLAIN_TENSORS, describe_tensor, layout_of, signature_key

log = logging.getLogger(__package__)  # fxopt.runtime.cudagraph, as before the split

OUTPUT_MODES = ("copy", "rotate", "unsafe")

_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled
# One capture at a time in the process (torch's documented restriction, and the allocator's pool routing).
_CAPTURE_LOCK = threading.RLock()
_UNKEYED = ("<no signature>",)
# What ``native_replay=None`` means (NOTE [Native graph call]): on since the GPU suite passed with it three times in a
# row on the H200 (benchmarks/NOTES.md, 2026-12-01 fourth session); `python -m pytest -m cuda --python-replay` runs
# the suite with the Python closure instead.
NATIVE_REPLAY_DEFAULT = True


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (subclasses)
        return -1



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
class CUDAGraphRunner(ReplayClosures):
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
    * ``programmatic_launch``: edges into fxopt's generated kernels in each captured graph made programmatic, so a
      kernel's launch overlaps the kernel before it (NOTE [Programmatic dependent launch], runtime/cudagraph/pdl.py;
      Hopper and later). None: ``pdl.PROGRAMMATIC_LAUNCH_DEFAULT`` (``FXOPT_PDL=0`` turns it off).
    * ``capturable``: called with the call's inputs after the warm-ups; a string (why not) makes that signature run
      eagerly instead of capturing. fxopt's module says why where the warm-ups found it cannot optimize the model:
      a graph of the unchanged model would replay what the model did at capture time, and a model fxopt could not
      capture is often one whose work changes from call to call (a cache that grows).
    """

    def __init__(self, fn: Callable[..., Any], *, max_graphs: int = 8, batch_buckets: Sequence[int] | int | None = None,
                 output_mode: str = "copy", warmup_iters: int = 3, pool: Any = None, rotate_depth: int = 2,
                 max_captures: int | None = None, verify: bool = True, backend: Any = None, graph_io: bool = True,
                 native_replay: bool | None = None, preserve: Callable[[], Any] | None = None,
                 capturable: Callable[[tuple], str | None] | None = None, programmatic_launch: bool | None = None):
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
        self._capturable = capturable
        self.max_graphs = int(max_graphs)
        self.batch_buckets = _normalize_buckets(batch_buckets)
        self.output_mode = output_mode
        self.rotate_depth = int(rotate_depth) if output_mode == "rotate" else 1
        self.warmup_iters = max(1, int(warmup_iters))
        self.max_captures = int(max_captures) if max_captures is not None else 8 * self.max_graphs
        self.verify = verify
        self.graph_io = graph_io
        self.native_replay = NATIVE_REPLAY_DEFAULT if native_replay is None else native_replay
        self._backend = backend if backend is not None else TorchCUDABackend(programmatic_launch=programmatic_launch)
        self._user_pool = pool
        self._pools: dict[int, Any] = {}
        self._retired_pools: dict[int, list] = {}
        self._side_streams: dict[int, Any] = {}  # device -> stream for warm-ups and captures
        self._stream_state: dict[int, list] = {}
        self._entries: dict[tuple, Entry] = {}  # entry key -> entry (captured or eager)
        self._fast: dict[tuple, Callable[[tuple], Any]] = {}  # call key -> closure
        self._history: deque[Entry] = deque(maxlen=64)  # evicted entries, for the report
        self._last: Entry | None = None
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
                entry = Entry(_UNKEYED, "<unhashable argument or tensor without strides>", None, None)
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
            if type(t) not in PLAIN_TENSORS:  # FakeTensors and subclasses: no memory a graph can copy
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
            describe_tensor(a.shape, a.dtype, a.device, a.stride()) if isinstance(a, _Tensor) else repr(a)
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
                        layout = layout_of(a)
                        shape = (bucket, *a.shape[1:])
                        parts.append((shape, layout, a.dtype, a.get_device()))
                        descs.append(describe_tensor(shape, a.dtype, a.device, layout=layout))
                    else:
                        parts.append((type(a), a))
                        descs.append(repr(a))
                return tuple(parts), f"{', '.join(descs)} (bucket {bucket})", bucket, b, None
        return key, exact_desc, None, None, note

    # -- entries ---------------------------------------------------------------------------------------------------
    def _new_entry(self, args, entry_key, description, device, bucket, b, note, reason) -> Entry:
        entry = Entry(entry_key, description, device, bucket)
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

    def _mark_eager(self, entry: Entry, reason: str) -> None:
        entry.status, entry.reason = "eager", reason
        entry.drop_buffers()
        log.info("fxopt cuda graphs: %s runs eagerly: %s", entry.description, reason)
        eager = [k for k, e in self._entries.items() if e.status == "eager"]
        for k in eager[: max(0, len(eager) - self._max_eager_entries)]:
            self._drop(self._entries.pop(k))

    def _drop(self, entry: Entry) -> None:
        for k in entry.fast_keys:
            self._fast.pop(k, None)
        entry.fast_keys = []
        if self._last is entry:
            self._last = None

    def _evict(self, entry: Entry) -> None:
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

    def _touch(self, entry: Entry) -> None:
        self._clock += 1
        entry.last_used = self._clock
        self._last = entry

    def _pool(self, device: int, entry: Entry) -> Any:
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
                                memory_format=MEMORY_FORMATS[layout_of(a)])
                s[:b].copy_(a)
                if b < bucket:
                    s[b:].copy_(a[b - 1])  # pad with the last row (broadcast)
            statics.append(s)
        return statics

    def _capture(self, entry: Entry, args: tuple, b: int | None) -> None:
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
                return self._mark_eager(entry, f"warm-up failed: {type(e).__name__}: {first_line(e)}")
            be.join(dev, side)
            why_not = self._capturable(statics) if self._capturable is not None else None
            if why_not is not None:
                return self._mark_eager(entry, why_not)
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
                    io["error"] = f"{type(e).__name__}: {first_line(e)}"
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
            entry.programmatic_edges = getattr(be, "programmatic_edges", 0)
            if getattr(be, "programmatic_note", None) and entry.note is None:
                entry.note = be.programmatic_note
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
                io["error"] = f"{type(e).__name__}: {first_line(e)}"
                return fn(*args)
            out = fn(*args)
            outs: list = []
            leaves = pytree.tree_leaves(out)
            if self.output_mode == "copy" and leaves and all(isinstance(t, _Tensor) and is_dense(t) for t in leaves):
                try:
                    outs = [graph_io.CopyNode.over(dev, stream, t) for t in leaves]
                except Exception as e:  # noqa: BLE001
                    io["error"] = f"{type(e).__name__}: {first_line(e)}"
                    return out
            io["inputs"], io["outputs"] = ins, outs
            return out

        return target

    def _check(self, entry: Entry, args: tuple, b: int | None, fresh: list[bool]) -> str | None:
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

    # -- public helpers --------------------------------------------------------------------------------------------
    def input_buffers(self, *args: Any) -> tuple[torch.Tensor, ...]:
        """The static input buffers of the graph for these inputs' signature (captured now if new).

        Write the next inputs into them in place and call the runner with them: the copy into the graph is skipped.
        With batch buckets these are the bucket-sized buffers (calling with them runs the full bucket).
        """
        def find() -> Entry | None:
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
                         e.programmatic_edges, e.replay, e.reason or e.note or ""))
        head = ["signature", "status", "bucket", "graphs", "nodes", "pool MiB added", "outputs KiB", "replays",
                "eager calls", "capture ms", "programmatic edges", "replay", "reason"]
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
