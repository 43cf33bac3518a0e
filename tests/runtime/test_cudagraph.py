"""fxopt.runtime.cudagraph on the CPU: guards, keys, eviction, buckets, output modes, with the capture faked.

Only the boundary is fake: :class:`FakeBackend` stands where :class:`TorchCUDABackend` talks to CUDA. Its "graph"
behaves like a real one where it matters here: capture does not run the work (outputs hold garbage until a replay),
and a replay writes fresh results into the *same* output tensors, reading the *same* static input tensors.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
import torch.utils._pytree as pytree

from fxopt.runtime import cudagraph
from fxopt.runtime.cudagraph import CaptureFailed, CUDAGraphRunner, cuda_graphs_supported, signature_key


class FakeGraph:
    def __init__(self, backend: "FakeBackend", fn, inputs, outputs):
        self.backend, self.fn, self.inputs = backend, fn, inputs
        self.leaves = pytree.tree_leaves(outputs)
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.backend.log.append("replay")
        if self.backend.broken_replay:
            return
        with torch.no_grad():
            new = pytree.tree_leaves(self.fn(*self.inputs))
        for s, n in zip(self.leaves, new):
            if isinstance(s, torch.Tensor) and s is not n:
                s.copy_(n)


class FakeBackend:
    """The capture boundary, on CPU tensors; records what the runner asked of it."""

    device_type = "cpu"

    def __init__(self):
        self.log: list[str] = []
        self.stream = 1
        self.capturing = False
        self.on_side = False
        self.outer_capture = False
        self.fail_capture: BaseException | None = None
        self.taint = False
        self.broken_replay = False
        self.pools = 0
        self.reserved = 0
        self.capture_bytes = 4096
        self.waits: list[int] = []
        self.syncs = 0
        self.health_checks = 0
        self.emptied = 0
        self.graphs: list[weakref.ref] = []
        self.streams = 0
        self.warmup_streams: list = []
        self.capture_streams: list = []
        self.capture_pools: list = []

    def new_stream(self, device):
        self.streams += 1
        return f"side{device}.{self.streams}"

    def fork(self, device, side):
        self.log.append("fork")

    def join(self, device, side):
        self.log.append("join")

    @contextlib.contextmanager
    def on_stream(self, device, side):
        self.warmup_streams.append(side)
        self.on_side = True
        try:
            yield
        finally:
            self.on_side = False

    def device_guard(self, device):
        return contextlib.nullcontext()

    @property
    def stream_id(self):
        return lambda device: self.stream

    @property
    def current_device(self):
        return lambda: 0

    def is_capturing(self, device):
        return self.outer_capture

    def wait_for(self, device, stream_id):
        self.waits.append(stream_id)

    def synchronize(self, device):
        self.syncs += 1

    def check_health(self, device):
        self.health_checks += 1

    def new_pool(self, device):
        self.pools += 1
        return (0, self.pools)

    def memory_reserved(self, device):
        return self.reserved

    def pool_reserved_bytes(self, device, pools):
        return self.reserved

    def empty_cache(self):
        self.emptied += 1

    def clear_blas_workspaces(self, device):
        self.log.append("clear workspaces")

    def rng_state(self, device):
        return torch.get_rng_state()

    def set_rng_state(self, device, state):
        torch.set_rng_state(state)

    def capture(self, fn, inputs, *, device, pool, stream):
        self.log.append("capture")
        self.capture_streams.append(stream)
        self.capture_pools.append(pool)
        if self.fail_capture is not None:
            raise CaptureFailed(self.fail_capture, self.taint)
        self.capturing = True
        try:
            out = fn(*inputs)
        except Exception as e:
            raise CaptureFailed(e, self.taint) from e
        finally:
            self.capturing = False
        self.reserved += self.capture_bytes
        input_ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):  # capture records the work, it does not run it
            if isinstance(t, torch.Tensor) and t.is_floating_point() and \
                    t.untyped_storage().data_ptr() not in input_ptrs:
                t.fill_(float("nan"))
        graph = FakeGraph(self, fn, inputs, out)
        self.graphs.append(weakref.ref(graph))
        return graph, out

    def replayer(self, graph):
        return graph.replay

    def num_nodes(self, graph):
        return 7


class Counting:
    """fn wrapper: counts calls, and calls made on the side stream (warm-up) or during capture."""

    def __init__(self, fn, backend: FakeBackend):
        self.fn, self.backend = fn, backend
        self.calls = self.side_calls = self.capture_calls = 0

    def __call__(self, *args):
        self.calls += 1
        if self.backend.capturing:
            self.capture_calls += 1
        elif self.backend.on_side:
            self.side_calls += 1
            self.backend.log.append("warmup")
        return self.fn(*args)


def model(x):
    return torch.sigmoid(torch.relu(x)) * 2 + 1


@pytest.fixture
def backend():
    return FakeBackend()


def make(fn=model, backend=None, **kw):
    kw.setdefault("output_mode", "copy")  # one graph per signature: the counts below assume it
    backend = backend or FakeBackend()
    counted = Counting(fn, backend)
    return CUDAGraphRunner(counted, backend=backend, **kw), counted, backend


def statuses(runner):
    return [(e.status, e.reason) for e in runner.entries()]


# -- capture and replay -------------------------------------------------------------------------------------------
def test_replay_matches_and_one_capture_per_signature():
    runner, fn, be = make()
    for _ in range(4):
        x = torch.randn(2, 8)
        torch.testing.assert_close(runner(x), model(x))
    assert runner.captures == 1 and be.log.count("capture") == 1
    (entry,) = runner.entries()
    assert entry.captured and entry.status == "captured" and entry.reason is None
    assert entry.num_nodes == 7 and entry.pool_bytes == be.capture_bytes and entry.graphs == 1
    assert entry.replays == 4 and entry.eager_calls == 0
    assert entry.output_bytes == 2 * 8 * 4
    assert "float32[2, 8]@cpu" in entry.signature


def test_warmup_on_side_stream_before_capture():
    runner, fn, be = make(warmup_iters=3)
    runner(torch.randn(3))
    assert fn.side_calls == 3 and fn.capture_calls == 1
    i = be.log.index("capture")
    assert be.log[:i] == ["fork", "warmup", "warmup", "warmup", "join", "clear workspaces"]
    assert "replay" in be.log[i:]


def test_blas_workspaces_are_cleared_around_every_capture():
    """NOTE [cuBLAS workspaces in graphs]: cleared before a capture (its GEMMs allocate their workspace in the pool)
    and after it (no one else's GEMM runs in the pool's memory), also when the capture fails."""
    runner, fn, be = make(warmup_iters=2)
    runner(torch.randn(3))
    i = be.log.index("capture")
    assert be.log[i - 1] == "clear workspaces" and be.log[i + 1] == "clear workspaces"
    assert be.log.count("clear workspaces") == 2
    assert be.capture_streams == be.warmup_streams[:1]  # the warm-up stream captures too

    runner, fn, be = make(output_mode="rotate", rotate_depth=2)
    runner(torch.randn(3))
    i = be.log.index("capture")
    assert be.log[i - 1:i + 3] == ["clear workspaces", "capture", "capture", "clear workspaces"]

    runner, fn, be = make()
    be.fail_capture = RuntimeError("operation not permitted when stream is capturing")
    runner(torch.randn(3))
    assert be.log.count("clear workspaces") == 2 and not runner.entries()[0].captured


def test_capture_output_is_replayed_before_it_is_returned():
    # capture leaves garbage (NaN) in the outputs: the first call must replay, not hand out the capture's buffers
    runner, _, _ = make(verify=False)
    x = torch.randn(5)
    torch.testing.assert_close(runner(x), model(x))


def test_signature_key_parts():
    x = torch.randn(4, 6)
    base = signature_key((x,))
    assert signature_key((torch.randn(4, 6),)) == base
    assert signature_key((torch.randn(4, 7),)) != base  # shape
    assert signature_key((x.double(),)) != base  # dtype
    assert signature_key((torch.randn(6, 4).t(),)) != base  # strides
    assert signature_key((x, 2.0)) != signature_key((x, 3.0))  # other arguments by value
    assert signature_key((x, 2)) != signature_key((x, 2.0))  # ... and type


def test_fast_key_of_one_tensor_is_the_generic_key():
    runner, _, _ = make()
    x = torch.randn(3, 2)
    runner(x)
    assert list(runner._fast) == [signature_key((x,))]
    p = torch.nn.Parameter(torch.randn(3, 2), requires_grad=False)  # a subclass takes the generic path
    runner(p)
    assert runner.captures == 1


def test_each_signature_gets_its_own_graph():
    runner, _, be = make()
    x = torch.randn(4, 6)
    runner(x)
    runner(torch.randn(4, 6))
    runner(torch.randn(4, 7))
    runner(x.double())
    xt = torch.randn(6, 4).t()
    torch.testing.assert_close(runner(xt), model(xt))
    assert runner.captures == 4
    assert len([e for e in runner.entries() if e.captured]) == 4


def test_strided_inputs_keep_their_layout_or_become_dense():
    runner, _, _ = make()
    xt = torch.randn(6, 4).t()  # dense, transposed: the static buffer has the same strides
    runner(xt)
    (s,) = runner.input_buffers(xt)
    assert s.stride() == xt.stride()
    xs = torch.randn(4, 12)[:, ::2]  # a slice with gaps: copied into a dense buffer
    torch.testing.assert_close(runner(xs), model(xs))
    (s2,) = runner.input_buffers(xs)
    assert s2.is_contiguous() and s2.shape == xs.shape


def test_non_tensor_arguments_are_part_of_the_key():
    runner, _, _ = make(lambda x, scale: x * scale)
    x = torch.randn(3)
    torch.testing.assert_close(runner(x, 2.0), x * 2)
    torch.testing.assert_close(runner(x, 3.0), x * 3)
    torch.testing.assert_close(runner(x, 2.0), x * 2)
    assert runner.captures == 2


def test_several_inputs_are_all_copied():
    runner, _, _ = make(lambda x, y, a: (x + y * a, x - y))
    for _ in range(3):
        x, y = torch.randn(4), torch.randn(4)
        out = runner(x, y, 0.5)
        assert isinstance(out, tuple) and len(out) == 2
        torch.testing.assert_close(out[0], x + y * 0.5)
        torch.testing.assert_close(out[1], x - y)
    s_x, s_y = runner.input_buffers(x, y, 0.5)
    torch.testing.assert_close(s_x, x)
    torch.testing.assert_close(s_y, y)


# -- input copies ----------------------------------------------------------------------------------------------------
def test_static_buffer_receives_the_input():
    runner, _, _ = make()
    x1, x2 = torch.randn(8), torch.randn(8)
    runner(x1)
    (s,) = runner.input_buffers(x1)
    assert s is not x1
    runner(x2)
    torch.testing.assert_close(s, x2)


def test_passing_the_static_buffer_skips_the_copy(monkeypatch):
    runner, _, _ = make()
    x = torch.randn(8)
    runner(x)
    (s,) = runner.input_buffers(x)
    copies = []
    original = torch.Tensor.copy_

    def counting_copy(self, src, *a, **k):
        copies.append((self, src))
        return original(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    x2 = torch.randn(8)
    s.copy_(x2)  # the caller fills the buffer in place
    copies.clear()
    out = runner(s)
    assert not any(dst is s for dst, _ in copies)
    torch.testing.assert_close(out, model(x2))
    runner(torch.randn(8))
    assert any(dst is s for dst, _ in copies)  # another tensor: copied


# -- eviction and budgets --------------------------------------------------------------------------------------------
def test_lru_eviction_releases_the_least_recently_used():
    runner, _, be = make(max_graphs=2)
    a, b, c = torch.randn(1, 4), torch.randn(2, 4), torch.randn(3, 4)
    runner(a)
    runner(b)
    graph_b = be.graphs[1]
    runner(a)  # a is now more recent than b
    syncs = be.syncs
    runner(c)  # evicts b
    assert be.syncs > syncs  # in-flight replays finish before the buffers go
    live = {e.signature: e.status for e in runner.entries()}
    assert [s for s, st in live.items() if st == "captured"] == ["float32[1, 4]@cpu", "float32[3, 4]@cpu"]
    evicted = [e for e in runner.entries() if e.status == "evicted"]
    assert len(evicted) == 1 and "2, 4" in evicted[0].signature and "least recently used" in evicted[0].reason
    assert evicted[0].graphs == 0
    gc.collect()
    assert graph_b() is None  # its graph and buffers are gone
    torch.testing.assert_close(runner(b), model(b))  # seen again: captured again, evicting a (now LRU)
    assert runner.captures == 4 and runner.evictions == 2
    captured = sorted(e.signature for e in runner.entries() if e.captured)
    assert captured == ["float32[2, 4]@cpu", "float32[3, 4]@cpu"]


def test_capture_budget_then_eager():
    runner, fn, _ = make(max_graphs=1, max_captures=2)
    for n in (1, 2, 3):
        x = torch.randn(n)
        torch.testing.assert_close(runner(x), model(x))
    (e3,) = [e for e in runner.entries() if "3]" in e.signature]
    assert e3.status == "eager" and "capture budget" in e3.reason
    calls = fn.calls
    runner(torch.randn(3))
    assert fn.calls == calls + 1 and runner.captures == 2  # eager, no new attempt


# -- fallbacks -------------------------------------------------------------------------------------------------------
def test_a_signature_the_owner_calls_not_capturable_runs_eagerly_without_a_capture():
    """``capturable`` is asked after the warm-ups (fxopt's module answers there whether the warm-ups found an
    optimized graph); a reason makes the signature run eagerly, with that reason in its entry."""
    asked = []

    def capturable(args):
        asked.append(tuple(a.shape for a in args))
        return "runs the original model" if args[0].shape[0] == 3 else None

    runner, fn, be = make(capturable=capturable)
    for n in (2, 3, 3, 2):
        x = torch.randn(n, 4)
        torch.testing.assert_close(runner(x), model(x))
    assert asked == [(torch.Size([2, 4]),), (torch.Size([3, 4]),)]  # once per signature, not per call
    assert sorted(statuses(runner)) == [("captured", None), ("eager", "runs the original model")]
    assert be.log.count("capture") == 1


def test_failed_capture_falls_back_and_stays_correct():
    def syncs_on_capture(x):
        if be.capturing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return model(x)

    be = FakeBackend()
    runner, fn, _ = make(syncs_on_capture, backend=be)
    x = torch.randn(4)
    torch.testing.assert_close(runner(x), model(x))
    (entry,) = runner.entries()
    assert not entry.captured and entry.status == "eager"
    assert entry.reason.startswith("CPU synchronization during capture")
    assert "operation not permitted" in entry.reason
    assert be.health_checks == 1
    for _ in range(3):
        x = torch.randn(4)
        torch.testing.assert_close(runner(x), model(x))
    assert runner.captures == 1 and runner.entries()[0].eager_calls == 4


def test_tainted_pool_is_replaced_after_a_failed_capture():
    be = FakeBackend()
    runner, _, _ = make(backend=be)
    runner(torch.randn(2))
    assert be.pools == 1
    be.fail_capture, be.taint = RuntimeError("cudaErrorStreamCaptureInvalidated"), True
    runner(torch.randn(3))
    be.fail_capture = None
    x = torch.randn(5)
    torch.testing.assert_close(runner(x), model(x))
    assert be.pools == 2  # later captures use a fresh pool
    assert [e.status for e in runner.entries()] == ["captured", "eager", "captured"]


def test_tainted_pool_of_one_graph_is_retired_with_its_bytes_still_counted():
    be = FakeBackend()
    runner, _, _ = make(backend=be, output_mode="unsafe")
    runner(torch.randn(2))
    be.fail_capture, be.taint = RuntimeError("cudaErrorStreamCaptureInvalidated"), True
    runner(torch.randn(3))
    failed = be.capture_pools[-1]
    assert runner._retired_pools[0] == [failed]
    assert all(failed not in e.pools for e in runner._entries.values())
    assert not runner._pools  # the shared pool was never made


def test_untainted_failure_keeps_the_pool():
    be = FakeBackend()
    runner, _, _ = make(backend=be)
    be.fail_capture = RuntimeError("boom")
    runner(torch.randn(3))
    be.fail_capture = None
    runner(torch.randn(4))
    assert be.pools == 1
    assert runner.entries()[0].reason == "capture failed: RuntimeError: boom"


def test_warmup_failure_propagates_the_models_error():
    def bad(x):
        raise ValueError("model bug")

    runner, _, _ = make(bad)
    with pytest.raises(ValueError, match="model bug"):
        runner(torch.randn(2))
    (entry,) = runner.entries()
    assert entry.status == "eager" and entry.reason.startswith("warm-up failed: ValueError")


def test_cpu_tensors_with_the_real_backend_run_eagerly():
    runner = CUDAGraphRunner(model)  # TorchCUDABackend: never touched for CPU inputs
    x = torch.randn(3, 3)
    torch.testing.assert_close(runner(x), model(x))
    (entry,) = runner.entries()
    assert entry.status == "eager" and "CPU" in entry.reason and "CUDA tensors" in entry.reason


def test_cuda_graphs_supported_on_cpu():
    ok, why = cuda_graphs_supported((torch.randn(2),))
    assert not ok and why == "inputs are on CPU: CUDA graphs need CUDA tensors"
    if not torch.cuda.is_available():
        ok, why = cuda_graphs_supported(())
        assert not ok and "CUDA" in why


def test_inputs_on_another_device_type_or_several_devices():
    runner, _, _ = make(lambda x, *r: x + 1)
    runner(torch.randn(2, device="meta"))
    runner(torch.randn(2), torch.randn(2, device="meta"))
    reasons = [e.reason for e in runner.entries()]
    assert "inputs are on meta" in reasons[0]
    assert "several devices" in reasons[1]


def test_output_on_another_device():
    runner, _, _ = make(lambda x: x.to("meta"))
    out = runner(torch.randn(2))
    assert out.device.type == "meta"
    assert "an output is on meta" in runner.entries()[0].reason


def test_no_tensor_inputs_and_nested_tensors_and_unhashable():
    runner, _, _ = make(lambda *a: torch.ones(1) * len(a))
    runner(3)
    runner((torch.ones(2),))
    runner(torch.ones(2), [1, 2])
    reasons = [e.reason for e in runner.entries()]
    assert any("no tensor inputs" in r for r in reasons)
    assert any("inside lists/tuples/dicts" in r for r in reasons)
    assert any("unhashable" in r for r in reasons)
    assert runner.captures == 0


def test_inputs_requiring_grad_run_eagerly():
    runner, fn, _ = make()
    x = torch.randn(3, requires_grad=True)
    y = runner(x)
    assert y.grad_fn is not None and runner.entries() == [] and runner.captures == 0
    with torch.no_grad():
        runner(x)
    assert runner.captures == 1


def test_inside_an_outer_capture_runs_the_ops_uncached():
    runner, _, be = make()
    be.outer_capture = True
    x = torch.randn(3)
    torch.testing.assert_close(runner(x), model(x))
    assert runner.captures == 0 and runner.entries() == []


def test_verify_catches_a_replay_that_differs():
    be = FakeBackend()
    be.broken_replay = True  # e.g. a kernel launched on another stream: not in the graph
    runner, _, _ = make(backend=be)
    x = torch.randn(4)
    torch.testing.assert_close(runner(x), model(x))
    (entry,) = runner.entries()
    assert entry.status == "eager" and entry.reason.startswith("graph replay differs from eager")
    be2 = FakeBackend()
    be2.broken_replay = True
    unverified, _, _ = make(backend=be2, verify=False)
    unverified(x)
    assert unverified.entries()[0].captured  # without verify nothing notices


# -- batch buckets -----------------------------------------------------------------------------------------------------
def test_bucket_normalization():
    assert CUDAGraphRunner(model, batch_buckets=8).batch_buckets == (1, 2, 4, 8)
    assert CUDAGraphRunner(model, batch_buckets=6).batch_buckets == (1, 2, 4, 6)
    assert CUDAGraphRunner(model, batch_buckets=[8, 2, 2, 1]).batch_buckets == (1, 2, 8)
    with pytest.raises(ValueError):
        CUDAGraphRunner(model, batch_buckets=[0, 4])


def test_bucket_pads_with_the_last_row_and_slices_outputs():
    runner, _, _ = make(batch_buckets=[1, 2, 4, 8])
    x = torch.randn(3, 5)
    y = runner(x)
    assert y.shape == (3, 5)
    torch.testing.assert_close(y, model(x))
    (entry,) = runner.entries()
    assert entry.bucket == 4 and "(bucket 4)" in entry.signature and "float32[4, 5]" in entry.signature
    (s,) = runner.input_buffers(torch.randn(4, 5))  # the bucket's buffer
    assert s.shape == (4, 5)
    torch.testing.assert_close(s[:3], x)
    torch.testing.assert_close(s[3], x[2])  # padded with the last row
    assert runner.captures == 1


def test_bucket_reuse_keeps_earlier_rows_as_padding():
    runner, _, _ = make(batch_buckets=[4])
    x4 = torch.randn(4, 3)
    torch.testing.assert_close(runner(x4), model(x4))
    x2 = torch.randn(2, 3)
    torch.testing.assert_close(runner(x2), model(x2))
    x1 = torch.randn(1, 3)
    torch.testing.assert_close(runner(x1), model(x1))
    assert runner.captures == 1
    (s,) = runner.input_buffers(x4)
    torch.testing.assert_close(s[0], x1[0])
    torch.testing.assert_close(s[1], x2[1])
    torch.testing.assert_close(s[2:], x4[2:])  # never zeros or garbage: rows the model already ran on
    assert runner.entries()[0].replays >= 3


def test_bucket_selection_and_exact_fallbacks():
    runner, _, _ = make(lambda x, y: x + y.sum(), batch_buckets=[1, 2, 4, 8])
    runner(torch.randn(2, 3), torch.randn(2, 3))  # bucket 2
    runner(torch.randn(5, 3), torch.randn(5, 3))  # bucket 8
    runner(torch.randn(7, 3), torch.randn(7, 3))  # bucket 8 again
    out = runner(torch.randn(9, 3), torch.randn(9, 3))  # above the largest: exact
    assert out.shape == (9, 3)
    runner(torch.randn(3, 3), torch.randn(2, 3))  # disagree on dim 0: exact
    es = runner.entries()
    assert [e.bucket for e in es] == [2, 8, None, None]
    assert "above the largest bucket 8" in es[2].note
    assert "disagree on dim 0" in es[3].note
    assert runner.captures == 4


def test_bucket_slices_only_batched_outputs():
    const = torch.arange(4.0)  # dim 0 == the bucket size by coincidence: must not be sliced

    def fn(x):
        return x * 2, const + 0, x.sum(0)

    runner, _, _ = make(fn, batch_buckets=[4])
    x4 = torch.randn(4, 3)
    runner(x4)  # b == bucket: which outputs are batched is found with a 1-row eager probe
    x3 = torch.randn(3, 3)
    y, c, s = runner(x3)
    assert y.shape == (3, 3) and c.shape == (4,) and s.shape == (3,)
    torch.testing.assert_close(y, x3 * 2)
    torch.testing.assert_close(c, const)


def test_bucket_verify_catches_rows_that_are_not_independent():
    runner, _, _ = make(lambda x: x - x.mean(0, keepdim=True), batch_buckets=[4])
    x = torch.randn(3, 2)
    torch.testing.assert_close(runner(x), x - x.mean(0, keepdim=True))
    (entry,) = runner.entries()
    assert entry.status == "eager" and "not independent" in entry.reason


# -- output modes ----------------------------------------------------------------------------------------------------
def test_copy_mode_returns_fresh_tensors():
    runner, _, _ = make(output_mode="copy")
    x1, x2 = torch.randn(6), torch.randn(6)
    y1 = runner(x1)
    y2 = runner(x2)
    assert y1 is not y2 and y1.data_ptr() != y2.data_ptr()
    torch.testing.assert_close(y1, model(x1))  # not overwritten by the next call
    torch.testing.assert_close(y2, model(x2))


def test_rotate_mode_cycles_buffers():
    runner, _, be = make(output_mode="rotate", rotate_depth=2)
    xs = [torch.randn(6) for _ in range(4)]
    y0 = runner(xs[0])
    y1 = runner(xs[1])
    assert y0 is not y1
    torch.testing.assert_close(y0, model(xs[0]))  # valid for rotate_depth - 1 = 1 later call
    y2 = runner(xs[2])
    assert y2 is y0  # ... and overwritten by the rotate_depth-th
    torch.testing.assert_close(y0, model(xs[2]))
    (entry,) = runner.entries()
    assert entry.graphs == 2 and be.log.count("capture") == 2


def test_rotate_depth_three():
    runner, _, _ = make(output_mode="rotate", rotate_depth=3)
    xs = [torch.randn(6) for _ in range(3)]
    ys = [runner(x) for x in xs]
    for x, y in zip(xs, ys):
        torch.testing.assert_close(y, model(x))
    assert len({id(y) for y in ys}) == 3


def test_rotate_clones_outputs_that_alias_the_static_input():
    runner, _, _ = make(lambda x: (x, x * 2), output_mode="rotate")
    x1, x2 = torch.randn(3), torch.randn(3)
    a1, b1 = runner(x1)
    runner(x2)
    torch.testing.assert_close(a1, x1)  # the identity output was cloned, not the static input
    torch.testing.assert_close(b1, x1 * 2)


def test_unsafe_mode_returns_the_static_buffer():
    runner, _, _ = make(output_mode="unsafe")
    x1, x2 = torch.randn(6), torch.randn(6)
    y1 = runner(x1)
    torch.testing.assert_close(y1, model(x1))
    y2 = runner(x2)
    assert y2 is y1  # the graph's own output, overwritten
    torch.testing.assert_close(y1, model(x2))


@pytest.mark.parametrize("mode", ["copy", "rotate", "unsafe"])
def test_output_structures(mode):
    runner, _, _ = make(lambda x: {"a": x + 1, "b": [x * 2, 3]}, output_mode=mode)
    x = torch.randn(2)
    out = runner(x)
    assert set(out) == {"a", "b"} and out["b"][1] == 3
    torch.testing.assert_close(out["a"], x + 1)
    torch.testing.assert_close(out["b"][0], x * 2)


def test_invalid_options():
    with pytest.raises(ValueError):
        CUDAGraphRunner(model, output_mode="fast")
    with pytest.raises(ValueError):
        CUDAGraphRunner(model, max_graphs=0)
    with pytest.raises(ValueError):
        CUDAGraphRunner(model, output_mode="rotate", rotate_depth=1)


# -- streams -----------------------------------------------------------------------------------------------------------
def test_a_new_caller_stream_waits_for_the_previous_one():
    runner, _, be = make()
    x = torch.randn(3)
    runner(x)
    runner(x)
    assert be.waits == []
    be.stream = 2
    runner(x)
    assert be.waits == [1]
    runner(x)
    assert be.waits == [1]
    be.stream = 1
    runner(torch.randn(4))  # another signature on the same device: the same rule
    assert be.waits == [1, 2]


# -- report and release ---------------------------------------------------------------------------------------------
def test_report_and_pool_bytes():
    def fn(x):
        if be.capturing and x.shape[0] == 3:
            raise RuntimeError("operation not permitted when stream is capturing")
        return model(x)

    be = FakeBackend()
    runner, _, _ = make(fn, backend=be)
    runner(torch.randn(2))
    runner(torch.randn(3))
    text = runner.report()
    assert "captured" in text and "eager" in text and "CPU synchronization" in text
    assert "output_mode=copy" in text
    assert runner.pool_reserved_bytes() == be.capture_bytes


def test_release_drops_graphs_and_empties_the_cache():
    runner, _, be = make()
    runner(torch.randn(3))
    ref = be.graphs[0]
    runner.release()
    gc.collect()
    assert ref() is None and runner.entries() == [] and be.emptied == 1
    x = torch.randn(3)
    torch.testing.assert_close(runner(x), model(x))  # usable again: captures anew
    assert runner.captures == 2


def test_describe_capture_error():
    e = RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    assert cudagraph.describe_capture_error(e).startswith("CPU synchronization during capture")
    e = RuntimeError("CUDA error: operation would make the legacy stream depend on a capturing blocking stream")
    assert cudagraph.describe_capture_error(e).startswith("work on the legacy default stream")
    assert cudagraph.describe_capture_error(ValueError("x")) == "capture failed: ValueError: x"


def test_inference_mode_callers():
    runner, _, _ = make(output_mode="unsafe", batch_buckets=[4])
    with torch.inference_mode():
        x = torch.randn(3, 2)
        y = runner(x)
    torch.testing.assert_close(y, model(x))
    y2 = runner(torch.randn(2, 2))  # outside inference mode: the buffers are normal tensors
    assert not y2.is_inference()


def test_default_output_mode_is_copy():
    runner = CUDAGraphRunner(model, backend=FakeBackend())
    assert runner.output_mode == "copy"


def test_concurrent_calls_each_get_their_own_result():
    """NOTE [Concurrent calls]: threads calling one runner with one signature never see each other's inputs."""
    import threading

    runner, _, _ = make()
    runner(torch.randn(4, 8))
    errors: list[str] = []

    def worker(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(200):
            x = torch.randn(4, 8, generator=g)
            if not torch.allclose(runner(x), model(x)):
                errors.append(f"thread {seed} got another call's result")
                return

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_native_replay_is_the_default_and_can_be_turned_off(monkeypatch):
    """NOTE [Native graph call]: on unless turned off, per runner or through NATIVE_REPLAY_DEFAULT (what
    ``pytest --python-replay`` clears)."""
    from fxopt.runtime import cudagraph

    assert cudagraph.NATIVE_REPLAY_DEFAULT is True

    monkeypatch.setattr(cudagraph.runner, "NATIVE_REPLAY_DEFAULT", False)
    assert not CUDAGraphRunner(lambda x: x, backend=FakeBackend()).native_replay
    assert CUDAGraphRunner(lambda x: x, backend=FakeBackend(), native_replay=True).native_replay
    monkeypatch.setattr(cudagraph.runner, "NATIVE_REPLAY_DEFAULT", True)
    assert CUDAGraphRunner(lambda x: x, backend=FakeBackend()).native_replay
    assert not CUDAGraphRunner(lambda x: x, backend=FakeBackend(), native_replay=False).native_replay


def test_report_says_how_each_signature_replays():
    """The "replay" column: native (C++), or Python and why (NOTE [Native graph call])."""
    from fxopt.runtime.cudagraph import _Entry

    runner, _, _ = make()
    runner(torch.randn(3))
    (entry,) = runner.entries()
    assert entry.replay == "Python: copies outside the graph (rotate mode, or graph_io=False)"  # the fake has no I/O
    assert "replay" in runner.report() and "copies outside the graph" in runner.report()

    e = _Entry(("k",), "float32[3]@cuda:0", 0, None)
    assert e.replay_path() == ""  # not captured
    e.status = "captured"
    assert e.replay_path().startswith("Python until the native extension is loaded (")
    e.python_replay = "native_replay=False"
    assert e.replay_path() == "Python: native_replay=False"

    class Call:  # stands for the C++ object
        pass

    call = Call()
    e.native_calls.append(weakref.ref(call))
    assert e.replay_path() == "native"
    del call
    assert e.replay_path() == "Python: native_replay=False"  # the call is gone: its path no longer serves


def test_modes_that_hand_out_graph_buffers_capture_each_graph_into_its_own_pool():
    """NOTE [Pools and held outputs]: copy mode shares one pool per runner; unsafe and rotate modes give each graph a
    pool, kept with its entry (counted by pool_reserved_bytes) and dropped with it; a user's pool= is always used."""
    runner, _, be = make()
    runner(torch.randn(3))
    runner(torch.randn(5))
    assert be.pools == 1 and len(set(be.capture_pools)) == 1

    runner, _, be = make(output_mode="unsafe", max_graphs=2)
    for n in (3, 5):
        runner(torch.randn(n))
    assert be.pools == 2 and len(set(be.capture_pools)) == 2
    assert [len(e.pools) for e in runner._entries.values()] == [1, 1]
    runner(torch.randn(7))  # evicts the signature of 3: its pool goes with it
    assert len(runner._entries) == 2 and all(len(e.pools) == 1 for e in runner._entries.values())
    assert be.capture_pools[0] not in [p for e in runner._entries.values() for p in e.pools]

    runner, _, be = make(output_mode="rotate", rotate_depth=3)
    runner(torch.randn(3))
    assert be.pools == 3 and len(set(be.capture_pools)) == 3
    (entry,) = runner._entries.values()
    assert entry.pools == be.capture_pools

    mine = ("user", 1)
    runner, _, be = make(output_mode="unsafe", pool=mine)
    runner(torch.randn(3))
    runner(torch.randn(5))
    assert be.pools == 0 and be.capture_pools == [mine, mine]


def test_pool_reserved_bytes_counts_the_entries_pools():
    seen = []

    class Counting(FakeBackend):
        def pool_reserved_bytes(self, device, pools):
            seen.append(list(pools))
            return super().pool_reserved_bytes(device, pools)

    be = Counting()
    runner, _, _ = make(backend=be, output_mode="unsafe")
    runner(torch.randn(3))
    runner(torch.randn(5))
    runner.pool_reserved_bytes()
    assert sorted(seen[-1]) == sorted(be.capture_pools)


def test_graphs_that_draw_random_numbers_are_verified_from_eagers_generator_state():
    """A replay draws what eager drew from the same generator state: verification restores it before each replay
    (on the GPU, the captured kernels read the seed and offset the replay sets). Without that, every model with a
    random op fell back to eager as 'graph replay differs from eager'."""
    runner, fn, be = make(lambda x: x + torch.rand_like(x))
    x = torch.zeros(64)
    runner(x)
    assert statuses(runner) == [("captured", None)]
    a, b = runner(x), runner(x)
    assert not torch.equal(a, b)  # the generator still advances between calls


def test_subclass_and_fake_inputs_never_replay_a_graph_built_for_tensors():
    """A FakeTensor has the shape, strides and device of the tensor a graph was captured for, and no memory: it must
    not share that graph's key (the replay would copy from no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class Tagged(torch.Tensor):
        pass

    runner, _, _ = make()
    x = torch.randn(3, 2)
    runner(x)
    assert signature_key((x.as_subclass(Tagged),)) != signature_key((x,))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(x)
    assert signature_key((fake,)) != signature_key((x,))
    runner(x.as_subclass(Tagged))
    assert runner.captures == 1  # the subclass ran without a graph
    (entry,) = [e for e in runner.entries() if not e.captured]
    assert "tensor subclass" in entry.reason


def test_warm_ups_of_a_stateful_model_leave_one_write_per_call():
    """NOTE [Warm-ups of stateful models]: warm-ups and the check replay run the model before the call's own
    replay; with ``preserve`` the model's state sees exactly one run per call."""
    from fxopt.state import preserved

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x * 2

    counted = Counting()
    runner = CUDAGraphRunner(counted, backend=FakeBackend(), output_mode="copy", preserve=lambda: preserved(counted))
    x = torch.randn(3, 2)
    torch.testing.assert_close(runner(x), x * 2)
    assert runner.captures == 1
    assert counted.calls.item() == 1
    runner(x)
    assert counted.calls.item() == 2
