"""Dynamic batching: many callers send single samples, one worker runs them through the module in batches.

    opt = fxopt.optimize(model, example_inputs)
    with fxopt.serve.DynamicBatcher(opt, max_batch_size=32, max_wait_ms=2) as batcher:
        y = batcher(x)                      # blocking, from any thread
        fut = batcher.submit(x)             # concurrent.futures.Future
        y = await batcher.infer(x)          # asyncio
        print(batcher.metrics())

NOTE [Requests are single samples]: a request is one sample WITHOUT the batch dimension (``x.shape == (3, 32, 32)``
for a model taking ``(N, 3, 32, 32)``), one tensor per model input. The worker stacks the requests of a batch with
``torch.stack`` along a new dim 0, calls the module once, and gives each caller row ``i`` of every tensor output
(``y.shape == (10,)`` for a model returning ``(N, 10)``). Outputs may be a tensor or any nesting of
tuples/lists/dicts of tensors batched on dim 0; non-tensor leaves are given to every caller unchanged. A request
with a leading batch dim of 1 is NOT unwrapped: it is a sample of another shape, and is rejected by the shape check.

NOTE [Output copies]: a CUDA-graph module may return its static output buffers, overwritten by its next call. With
``copy_outputs=True`` (the default) the rows of the batch are copied once per batch (one ``clone`` of each output,
one kernel, not one per caller) before the callers get them, so results stay valid; a caller's result is a view
into that per-batch copy (its memory is freed when every caller of the batch dropped its result). The cost is one
device copy of each output per batch: small next to the model for classifier heads. ``copy_outputs=False`` hands
out views of what the module returned: right for modules that return fresh tensors (eager models, fxopt without
CUDA graphs or with the default ``output_mode="copy"``, a ``LoadedModule``). ``output_device="cpu"`` moves each
batched output to the host once (one transfer per batch) and implies a copy.

NOTE [Padding to buckets]: modules that hold graphs for fixed batch sizes only (a ``LoadedModule`` saved for batch
sizes 1, 2, 4, ...; a CUDA-graph runner without its own buckets) get ``pad_to_buckets=[1, 2, 4, ...]``: a batch
of n rows is padded to the smallest bucket >= n by repeating its last sample, and the outputs are sliced back to n
rows. fxopt's own CUDA-graph runner (``graph_options={"batch_buckets": N}``) pads by itself, so it needs no padding
here.

Deadlines: ``timeout`` (per request, or the batcher's default) is the time from submission by which the request must
have STARTED running. A request still queued at its deadline fails with :class:`RequestTimeout` (a
``TimeoutError``) at the deadline and is never run; a request whose batch is running completes. On a full queue,
``on_full="reject"`` raises :class:`QueueFull` at once; ``on_full="block"`` waits for room until the deadline.

Errors: an exception raised by the module for a batch is set on every future of that batch, and the worker goes on
with the next batch. A request whose shapes, dtypes or devices differ from the expected ones (``input_spec``, or the
first request accepted) is rejected alone, at submission, with a ``ValueError`` naming both.

Closing: ``close()`` (or leaving the ``with`` block) refuses new requests with :class:`BatcherClosed`, runs everything
already accepted, then stops the worker. ``close(drain=False)`` fails the queued requests with ``BatcherClosed``
instead. Closing twice is a no-op.

Threads: one worker thread runs the batches (GPU work is serialized anyway), under ``torch.no_grad()``; a deadline
thread is started at the first request with a deadline.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import functools
import heapq
import itertools
import logging
import math
import threading
import time
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from ..errors import FxoptError

log = logging.getLogger(__name__)

__all__ = ["BatcherClosed", "BatcherError", "DynamicBatcher", "QueueFull", "RequestTimeout", "SampleSpec"]


class BatcherError(FxoptError, RuntimeError):
    """Base class of the errors a :class:`DynamicBatcher` raises about the batcher itself (not the model)."""


class QueueFull(BatcherError):
    """The batcher's queue holds ``max_queue`` requests and ``on_full="reject"``: try again later."""


class BatcherClosed(BatcherError):
    """The batcher is closed (or closing) and takes no new requests."""


class RequestTimeout(FxoptError, TimeoutError):
    """The request did not start running (or find room in the queue) before its deadline; it was not run."""


# A request's state, changed only under the batcher's lock.
_PENDING, _STARTED, _EXPIRED = 0, 1, 2


class SampleSpec(tuple):
    """What one request must look like: (shape, dtype, device) of each input sample, without the batch dim."""

    @classmethod
    def of(cls, samples: Sequence[torch.Tensor]) -> "SampleSpec":
        return cls((tuple(s.shape), s.dtype, s.device) for s in samples)

    @classmethod
    def coerce(cls, spec: Any) -> "SampleSpec":
        """From example sample tensors, or (shape, dtype[, device]) tuples, one per input."""
        if isinstance(spec, SampleSpec):
            return spec
        if isinstance(spec, torch.Tensor) or (isinstance(spec, tuple) and len(spec) >= 2
                                              and isinstance(spec[1], torch.dtype)):
            spec = [spec]
        items = []
        for s in spec:
            if isinstance(s, torch.Tensor):
                items.append((tuple(s.shape), s.dtype, s.device))
            else:
                shape, dtype, *rest = s
                items.append((tuple(shape), dtype, torch.device(rest[0]) if rest and rest[0] is not None else None))
        return cls(items)

    def mismatch(self, samples: Sequence[torch.Tensor]) -> str | None:
        if len(samples) != len(self):
            return f"expected {len(self)} input tensor(s) per request, got {len(samples)}"
        for i, (s, (shape, dtype, device)) in enumerate(zip(samples, self)):
            got = (tuple(s.shape), s.dtype, s.device)
            if got[0] != shape or got[1] != dtype or (device is not None and got[2] != device):
                return (f"input {i}: expected a sample of shape {list(shape)}, {_name(dtype)}"
                        f"{'' if device is None else f' on {device}'} (one sample, without the batch dim), got shape "
                        f"{list(got[0])}, {_name(got[1])} on {got[2]}")
        return None

    def describe(self) -> str:
        return ", ".join(f"{_name(d)}{list(s)}{'' if dev is None else f'@{dev}'}" for s, d, dev in self)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _Request:
    __slots__ = ("inputs", "future", "submitted", "deadline", "state", "started", "seq")

    def __init__(self, inputs: tuple, future: concurrent.futures.Future, submitted: float, deadline: float | None,
                 seq: int):
        self.inputs = inputs
        self.future = future
        self.submitted = submitted
        self.deadline = deadline
        self.state = _PENDING
        self.started = 0.0
        self.seq = seq

    def __lt__(self, other: "_Request") -> bool:  # heap ties
        return self.seq < other.seq


def _fail(future: concurrent.futures.Future, exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except concurrent.futures.InvalidStateError:  # the caller cancelled it meanwhile
        pass


def _percentiles(samples: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    if not samples:
        return {f"p{q}": None for q in qs}
    s = sorted(samples)
    out = {}
    for q in qs:
        k = max(0, math.ceil(q / 100 * len(s)) - 1)  # nearest rank
        out[f"p{q}"] = s[k] * 1e3
    out["mean"] = sum(s) / len(s) * 1e3
    return out


class DynamicBatcher:
    """Groups single-sample requests from many threads or coroutines into batches for one module.

    * ``module``: a callable taking one tensor (or several) batched on dim 0 and returning a tensor, or a nesting
      of tuples/lists/dicts of tensors, batched on dim 0: an :class:`~fxopt.OptimizedModule`, a ``LoadedModule``,
      any ``nn.Module``.
    * ``max_batch_size``: the most requests one batch holds. ``max_wait_ms``: how long the oldest queued request
      waits for others before its batch runs anyway (a batch also runs at once when it is full, or while closing).
    * ``max_queue``: the most requests waiting; ``on_full``: ``"reject"`` (raise :class:`QueueFull`) or
      ``"block"`` (wait for room, until the request's deadline).
    * ``timeout``: default per-request deadline in seconds (None: no deadline), see the module docstring.
    * ``input_spec``: what a request must be (example sample tensors, or ``(shape, dtype[, device])`` per input,
      without the batch dim); None: the first request accepted fixes it.
    * ``pad_to_buckets``: batch sizes the module accepts (None: any); batches are padded up, outputs sliced back.
    * ``copy_outputs``, ``output_device``: see NOTE [Output copies]. ``device``: where the stacked batch is moved
      before the call (None: where the samples are).
    * ``max_samples``: how many recent latencies the metrics keep for percentiles.
    """

    def __init__(self, module: Callable[..., Any], max_batch_size: int = 32, max_wait_ms: float = 2.0, *,
                 max_queue: int = 1024, on_full: str = "reject", timeout: float | None = None,
                 input_spec: Any = None, pad_to_buckets: Sequence[int] | None = None, copy_outputs: bool = True,
                 device: str | torch.device | None = None, output_device: str | torch.device | None = None,
                 max_samples: int = 100_000, name: str | None = None):
        if not callable(module):
            raise TypeError(f"DynamicBatcher needs a callable module, got {type(module).__name__}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue!r}")
        if on_full not in ("reject", "block"):
            raise ValueError(f"on_full must be 'reject' or 'block', got {on_full!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
        if pad_to_buckets is not None:
            buckets = sorted({int(b) for b in pad_to_buckets})
            if not buckets or buckets[0] < 1:
                raise ValueError(f"pad_to_buckets must be positive batch sizes, got {list(pad_to_buckets)!r}")
            if max_batch_size > buckets[-1]:
                raise ValueError(f"max_batch_size {max_batch_size} is larger than the largest bucket {buckets[-1]} "
                                 f"of pad_to_buckets {buckets}: a full batch could not be padded to a size the module "
                                 "accepts")
            self.pad_to_buckets: list[int] | None = buckets
        else:
            self.pad_to_buckets = None
        self.module = module
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.on_full = on_full
        self.timeout = timeout
        self.copy_outputs = copy_outputs
        self.device = None if device is None else torch.device(device)
        self.output_device = None if output_device is None else torch.device(output_device)
        self.name = name or f"DynamicBatcher({type(module).__name__})"
        self._spec: SampleSpec | None = None if input_spec is None else SampleSpec.coerce(input_spec)

        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._queue: collections.deque[_Request] = collections.deque()
        self._live = 0  # requests queued and still pending (not expired): what counts against max_queue
        self._closing = False
        self._stopped = False
        self._seq = itertools.count()
        # deadlines: a heap of (deadline, request), watched by a thread started at the first request with one
        self._deadlines: list[tuple[float, _Request]] = []
        self._deadline_cv = threading.Condition(self._lock)
        self._deadline_thread: threading.Thread | None = None

        self._mlock = threading.Lock()
        self._max_samples = max_samples
        self._reset_metrics_locked(time.perf_counter())

        self._worker = threading.Thread(target=self._run, name=f"{self.name}-worker", daemon=True)
        self._worker.start()

    # -- submitting ----------------------------------------------------------------------------------------------
    @property
    def input_spec(self) -> SampleSpec | None:
        """What each request must look like (fixed by ``input_spec`` or the first request accepted)."""
        return self._spec

    @property
    def closed(self) -> bool:
        return self._closing

    def submit(self, *inputs: torch.Tensor, timeout: float | None = None) -> concurrent.futures.Future:
        """Queue one request (one sample per model input, without the batch dim); returns its Future.

        Raises at once: ``ValueError`` for a sample of the wrong shape/dtype/device, :class:`QueueFull` on a full
        queue with ``on_full="reject"``, :class:`BatcherClosed` after :meth:`close`, :class:`RequestTimeout` when
        ``on_full="block"`` found no room before the deadline. Errors of the model come through the Future.
        ``fut.cancel()`` withdraws a request that has not started.
        """
        return self._submit(inputs, timeout, block=self.on_full == "block").future

    def __call__(self, *inputs: torch.Tensor, timeout: float | None = None) -> Any:
        """Submit one request and wait for its result (raises what the model raised, or RequestTimeout)."""
        return self.submit(*inputs, timeout=timeout).result()

    async def infer(self, *inputs: torch.Tensor, timeout: float | None = None) -> Any:
        """The asyncio form of ``__call__``: awaits the result without blocking the event loop.

        A full queue with ``on_full="block"`` is waited on in the loop's default executor. Cancelling the awaiting
        task withdraws the request if it has not started.
        """
        if self.on_full == "block":
            t0 = time.perf_counter()
            try:
                req = self._submit(inputs, timeout, block=False, count_reject=False)
            except QueueFull:
                loop = asyncio.get_running_loop()
                req = await loop.run_in_executor(None, functools.partial(self._submit, inputs, timeout, block=True,
                                                                         t0=t0))
        else:
            req = self._submit(inputs, timeout, block=False)
        return await asyncio.wrap_future(req.future)

    def _submit(self, inputs: tuple, timeout: float | None, block: bool, count_reject: bool = True,
                t0: float | None = None) -> _Request:
        now = time.perf_counter() if t0 is None else t0
        if timeout is None:
            timeout = self.timeout
        elif timeout <= 0:
            raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
        deadline = None if timeout is None else now + timeout
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input {i}: a request is one tensor sample per model input, got {type(x).__name__}")
        if not inputs:
            raise TypeError("a request needs at least one tensor")
        spec = self._spec
        if spec is not None:
            why = spec.mismatch(inputs)
            if why is not None:
                raise ValueError(f"{self.name}: request rejected: {why}")
        req = _Request(inputs, concurrent.futures.Future(), now, deadline, next(self._seq))
        with self._lock:
            if self._closing:
                raise BatcherClosed(f"{self.name} is closed: it takes no new requests")
            if self._spec is None:  # the first request fixes the sample spec (checked again under the lock)
                self._spec = SampleSpec.of(inputs)
            elif spec is None:
                why = self._spec.mismatch(inputs)
                if why is not None:
                    raise ValueError(f"{self.name}: request rejected: {why}")
            while self._live >= self.max_queue:
                if not block:
                    if count_reject:
                        self._count("rejected")
                    raise QueueFull(f"{self.name}: the queue is full ({self.max_queue} requests waiting); retry "
                                    "later, raise max_queue, or use on_full='block'")
                remaining = None if deadline is None else deadline - time.perf_counter()
                if remaining is not None and remaining <= 0:
                    self._count("timed_out")
                    raise RequestTimeout(f"{self.name}: no room in the queue ({self.max_queue} requests waiting) "
                                         f"within the request's timeout of {timeout:g} s; it was not queued")
                self._not_full.wait(remaining)
                if self._closing:
                    raise BatcherClosed(f"{self.name} was closed while the request waited for room in the queue")
            self._queue.append(req)
            self._live += 1
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, req))
                if self._deadline_thread is None:
                    self._deadline_thread = threading.Thread(target=self._watch_deadlines, daemon=True,
                                                             name=f"{self.name}-deadlines")
                    self._deadline_thread.start()
                elif self._deadlines[0][1] is req:
                    self._deadline_cv.notify()
            self._not_empty.notify()
            depth = self._live
        with self._mlock:
            self._m["submitted"] += 1
            if self._m["first_submit"] is None:
                self._m["first_submit"] = now
            if depth > self._m["max_queue_depth"]:
                self._m["max_queue_depth"] = depth
        return req

    # -- deadlines -----------------------------------------------------------------------------------------------
    def _watch_deadlines(self) -> None:
        while True:
            expired = []
            with self._lock:
                while True:
                    if self._stopped:
                        return
                    now = time.perf_counter()
                    while self._deadlines and self._deadlines[0][0] <= now:
                        _, req = heapq.heappop(self._deadlines)
                        if req.state == _PENDING:
                            req.state = _EXPIRED
                            self._live -= 1
                            expired.append(req)
                    if expired:
                        self._not_full.notify(len(expired))
                        break
                    self._deadline_cv.wait(None if not self._deadlines else self._deadlines[0][0] - now)
            self._count("timed_out", len(expired))
            for req in expired:  # outside the lock: a Future's callbacks may call back into the batcher
                _fail(req.future, RequestTimeout(
                    f"{self.name}: the request did not start within its timeout of "
                    f"{req.deadline - req.submitted:g} s (queue depth {self._live}); it was not run"))

    # -- the worker ----------------------------------------------------------------------------------------------
    def _next_batch(self) -> list[_Request] | None:
        """Wait for a batch; None when closed and drained."""
        with self._lock:
            while True:
                while not self._queue and not self._closing:
                    self._not_empty.wait()
                if not self._queue:
                    return None  # closing, and nothing left
                # wait for more requests until the batch is full or the oldest pending request waited max_wait
                while not self._closing and self._live < self.max_batch_size:
                    oldest = next((r for r in self._queue if r.state == _PENDING), None)
                    if oldest is None:
                        break
                    remaining = oldest.submitted + self.max_wait - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._not_empty.wait(remaining)
                batch = []
                now = time.perf_counter()
                while self._queue and len(batch) < self.max_batch_size:
                    req = self._queue.popleft()
                    if req.state != _PENDING:
                        continue  # expired: already failed, no longer counted
                    self._live -= 1
                    if not req.future.set_running_or_notify_cancel():
                        self._count("cancelled")
                        continue  # cancelled by its caller
                    req.state = _STARTED
                    req.started = now
                    batch.append(req)
                if self._deadlines and len(self._deadlines) > 4 * (self._live + 16):
                    # drop entries of requests that already started, so the heap does not grow without bound
                    self._deadlines = [e for e in self._deadlines if e[1].state == _PENDING]
                    heapq.heapify(self._deadlines)
                self._not_full.notify(self.max_batch_size)
                if batch:
                    return batch

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                try:
                    self._run_batch(batch)
                except BaseException as e:  # noqa: BLE001 - the worker must survive anything a batch does
                    log.warning("%s: a batch of %d failed: %r", self.name, len(batch), e)
                    self._record_batch(batch, ok=False)
                    for req in batch:
                        _fail(req.future, e)
        with self._lock:
            self._stopped = True
            self._deadline_cv.notify_all()

    def _run_batch(self, batch: list[_Request]) -> None:
        n = len(batch)
        size = n
        if self.pad_to_buckets is not None:
            size = self.pad_to_buckets[bisect.bisect_left(self.pad_to_buckets, n)]
        rows = [r.inputs for r in batch]
        if size > n:
            rows = rows + [rows[-1]] * (size - n)
        stacked = []
        for column in zip(*rows):
            first = column[0].device
            if any(c.device != first for c in column):  # samples from several devices (the spec allows any)
                column = [c.to(self.device or first) for c in column]
            x = torch.stack(column)
            if self.device is not None and x.device != self.device:
                x = x.to(self.device, non_blocking=True)
            stacked.append(x)
        out = self.module(*stacked)
        leaves, tree = pytree.tree_flatten(out)
        per_leaf = []
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                per_leaf.append(None)
                continue
            if leaf.dim() == 0 or leaf.shape[0] != size:
                raise RuntimeError(f"{self.name}: the module returned an output of shape {list(leaf.shape)} for a "
                                   f"batch of {size}: every tensor output must be batched on dim 0")
            if size > n:
                leaf = leaf[:n]
            if self.output_device is not None and leaf.device != self.output_device:
                leaf = leaf.to(self.output_device)
            elif self.copy_outputs:
                leaf = leaf.clone()
            per_leaf.append(leaf.unbind(0))
        results = [pytree.tree_unflatten([leaf if rows_ is None else rows_[i] for leaf, rows_ in zip(leaves, per_leaf)],
                                         tree) for i in range(n)]
        self._record_batch(batch, ok=True, padded=size - n)  # before the results: a caller that has one sees it counted
        for req, result in zip(batch, results):
            req.future.set_result(result)

    # -- closing -------------------------------------------------------------------------------------------------
    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; run (``drain=True``) or fail (``drain=False``) the queued ones; stop the worker.

        Waits up to ``timeout`` seconds (None: until done) for the worker to finish. Idempotent.
        """
        dropped: list[_Request] = []
        with self._lock:
            self._closing = True
            if not drain:
                while self._queue:
                    req = self._queue.popleft()
                    if req.state == _PENDING:
                        req.state = _EXPIRED
                        self._live -= 1
                        dropped.append(req)
            self._not_empty.notify_all()
            self._not_full.notify_all()
        for req in dropped:
            if req.future.set_running_or_notify_cancel():
                req.future.set_exception(BatcherClosed(f"{self.name} was closed with drain=False before the "
                                                       "request ran"))
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- metrics -------------------------------------------------------------------------------------------------
    def _reset_metrics_locked(self, now: float) -> None:
        self._m: dict[str, Any] = {
            "since": now, "first_submit": None, "last_done": None, "submitted": 0, "completed": 0, "failed": 0,
            "rejected": 0, "timed_out": 0, "cancelled": 0, "batches": 0, "failed_batches": 0, "padded_rows": 0,
            "max_queue_depth": 0, "histogram": collections.Counter(),
            "latency": collections.deque(maxlen=self._max_samples),
            "queue_wait": collections.deque(maxlen=self._max_samples),
            "batch_time": collections.deque(maxlen=self._max_samples),
        }

    def _count(self, key: str, k: int = 1) -> None:
        if k:
            with self._mlock:
                self._m[key] += k

    def _record_batch(self, batch: list[_Request], ok: bool, padded: int = 0) -> None:
        now = time.perf_counter()
        with self._mlock:
            m = self._m
            m["batches"] += 1
            m["histogram"][len(batch)] += 1
            m["padded_rows"] += padded
            m["completed" if ok else "failed"] += len(batch)
            if not ok:
                m["failed_batches"] += 1
            m["last_done"] = now
            m["batch_time"].append(now - batch[0].started)
            for r in batch:
                m["latency"].append(now - r.submitted)
                m["queue_wait"].append(r.started - r.submitted)

    def reset_metrics(self) -> None:
        """Start the counters and latency samples afresh (e.g. after warm-up)."""
        with self._mlock:
            self._reset_metrics_locked(time.perf_counter())

    def metrics(self) -> dict[str, Any]:
        """A snapshot: queue depth, counts, batch-size histogram, latency percentiles (ms), throughput (req/s).

        ``latency_ms`` is submission to result, ``queue_wait_ms`` submission to the start of its batch,
        ``batch_ms`` one batch (stack, module, split). ``throughput_rps`` is requests finished (completed or failed
        by the model) per second from the first submission to the last finished batch since the last reset.
        """
        with self._lock:
            depth = self._live
        with self._mlock:
            m = self._m
            hist = dict(sorted(m["histogram"].items()))
            latency, queue_wait, batch_time = list(m["latency"]), list(m["queue_wait"]), list(m["batch_time"])
            counts = {k: m[k] for k in ("submitted", "completed", "failed", "rejected", "timed_out", "cancelled",
                                        "batches", "failed_batches", "padded_rows", "max_queue_depth")}
            first, last = m["first_submit"], m["last_done"]
        done = counts["completed"] + counts["failed"]
        span = (last - first) if first is not None and last is not None and last > first else None
        return {
            "queue_depth": depth,
            "max_queue": self.max_queue,
            **counts,
            "batch_size_histogram": hist,
            "mean_batch_size": (sum(k * v for k, v in hist.items()) / sum(hist.values())) if hist else None,
            "latency_ms": _percentiles(latency, (50, 90, 99)),
            "queue_wait_ms": _percentiles(queue_wait, (50, 99)),
            "batch_ms": _percentiles(batch_time, (50, 99)),
            "throughput_rps": done / span if span else None,
            "closed": self._closing,
        }

    def __repr__(self) -> str:
        return (f"{self.name}(max_batch_size={self.max_batch_size}, max_wait_ms={self.max_wait * 1e3:g}, "
                f"max_queue={self.max_queue}, on_full={self.on_full!r}, queued={self._live}"
                f"{', closed' if self._closing else ''})")
