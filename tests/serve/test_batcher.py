"""DynamicBatcher on CPU: correctness under many threads, batching, backpressure, deadlines, error isolation,
shape checks, draining on close, the asyncio API and the metrics.

Timing never decides a result here: batches are made deterministic with a gated module (its first call blocks on an
event, the test queues requests behind it, then opens the gate), and the few waits have generous bounds.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import fxopt
from fxopt.serve import BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout

WAIT = 10.0  # upper bound for anything that should happen at once (never reached when the code is right)


class Gated:
    """A module whose calls block until ``release`` is set; records the batches it sees."""

    def __init__(self, fn=lambda x: x * 2 + 1):
        self.fn = fn
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[torch.Tensor] = []

    def __call__(self, *xs):
        self.batches.append(xs[0].clone())
        self.entered.set()
        assert self.release.wait(WAIT), "the test never opened the gate"
        return self.fn(*xs)

    @property
    def sizes(self):
        return [b.shape[0] for b in self.batches]


def _start_blocked(b: DynamicBatcher, gate: Gated, x=None):
    """Submit one request and wait until the worker is inside the module with it: everything after it queues."""
    fut = b.submit(torch.zeros(4) if x is None else x)
    assert gate.entered.wait(WAIT)
    return fut


def _sample(i: int, n: int = 4) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + 1000.0 * i


def _wait_for(cond, what: str):
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


# -- correctness --------------------------------------------------------------------------------------------------
def test_many_threads_each_get_their_own_result():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    threads, per_thread = 32, 20
    inputs = torch.randn(threads, per_thread, 16)
    with torch.no_grad():
        expected = model(inputs.reshape(-1, 16)).reshape(threads, per_thread, 8)
    results = [[None] * per_thread for _ in range(threads)]
    errors = []
    barrier = threading.Barrier(threads)

    with DynamicBatcher(model, max_batch_size=16, max_wait_ms=1) as b:
        def client(t):
            try:
                barrier.wait()
                for j in range(per_thread):
                    results[t][j] = b(inputs[t, j])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        ts = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(WAIT * 3)
        m = b.metrics()
    assert not errors, errors[:3]
    for t in range(threads):
        for j in range(per_thread):
            assert results[t][j].shape == (8,)
            torch.testing.assert_close(results[t][j], expected[t, j], rtol=1e-5, atol=1e-5)
    assert m["completed"] == m["submitted"] == threads * per_thread
    assert sum(k * v for k, v in m["batch_size_histogram"].items()) == threads * per_thread
    assert max(m["batch_size_histogram"]) <= 16
    assert m["queue_depth"] == 0 and m["failed"] == 0


def test_requests_arriving_together_are_batched():
    gate = Gated()
    with DynamicBatcher(gate, max_batch_size=8, max_wait_ms=1) as b:
        first = _start_blocked(b, gate)
        xs = [_sample(i) for i in range(20)]
        futs = [b.submit(x) for x in xs]
        assert b.metrics()["queue_depth"] == 20
        gate.release.set()
        for x, f in zip(xs, futs):
            assert torch.equal(f.result(WAIT), x * 2 + 1)
        assert torch.equal(first.result(WAIT), torch.ones(4))
        m = b.metrics()
    assert gate.sizes == [1, 8, 8, 4]
    assert m["batch_size_histogram"] == {1: 1, 4: 1, 8: 2}
    assert m["batches"] == 4 and m["mean_batch_size"] == 21 / 4
    # the batch was stacked in submission order
    assert torch.equal(gate.batches[1], torch.stack(xs[:8]))


def test_nested_outputs_and_several_inputs():
    def module(a, b):
        return {"sum": a + b, "parts": (a * 2, b.mean(-1)), "tag": "v1", "none": None}

    with DynamicBatcher(module, max_batch_size=4, max_wait_ms=1) as b:
        pairs = [(torch.randn(3), torch.randn(3)) for _ in range(10)]
        futs = [b.submit(x, y) for x, y in pairs]
        for (x, y), f in zip(pairs, futs):
            out = f.result(WAIT)
            assert set(out) == {"sum", "parts", "tag", "none"}
            torch.testing.assert_close(out["sum"], x + y)
            torch.testing.assert_close(out["parts"][0], x * 2)
            torch.testing.assert_close(out["parts"][1], y.mean())
            assert out["tag"] == "v1" and out["none"] is None


class StaticBuffer:
    """Like a CUDA-graph replay: writes into one output buffer and returns it (overwritten by the next call)."""

    def __init__(self):
        self.out = torch.zeros(64, 4)

    def __call__(self, x):
        out = self.out[: x.shape[0]]
        torch.mul(x, 3, out=out)
        return out


@pytest.mark.parametrize("copy", [True, False])
def test_outputs_are_copied_out_of_static_buffers(copy):
    gate_first = Gated(fn=StaticBuffer())
    with DynamicBatcher(gate_first, max_batch_size=8, max_wait_ms=0, copy_outputs=copy) as b:
        first = _start_blocked(b, gate_first, _sample(0))
        gate_first.release.set()
        y0 = first.result(WAIT)
        later = [b(_sample(i)) for i in range(1, 4)]  # later batches overwrite the module's buffer
    assert torch.equal(later[-1], _sample(3) * 3)
    if copy:
        assert torch.equal(y0, _sample(0) * 3)
    else:  # documented: without copies a result aliases the module's buffer
        assert torch.equal(y0, _sample(3) * 3)


def test_pad_to_buckets_pads_and_slices():
    seen = []

    def fixed_sizes(x):
        seen.append(x.shape[0])
        if x.shape[0] not in (1, 2, 4, 8):
            raise ValueError(f"no graph for batch {x.shape[0]}")
        return x.sum(-1)

    gate = Gated(fn=fixed_sizes)
    with DynamicBatcher(gate, max_batch_size=8, max_wait_ms=1, pad_to_buckets=[1, 2, 4, 8]) as b:
        _start_blocked(b, gate)
        xs = [_sample(i) for i in range(11)]
        futs = [b.submit(x) for x in xs]
        gate.release.set()
        for x, f in zip(xs, futs):
            assert torch.equal(f.result(WAIT), x.sum())
        m = b.metrics()
    assert seen == [1, 8, 4]  # 11 = 8 + 3, the 3 padded to 4 with the last sample repeated
    assert torch.equal(gate.batches[2][3], xs[-1])
    assert m["padded_rows"] == 1 and m["batch_size_histogram"] == {1: 1, 3: 1, 8: 1}
    with pytest.raises(ValueError, match="largest bucket"):
        DynamicBatcher(fixed_sizes, max_batch_size=16, pad_to_buckets=[1, 2, 4, 8])


def test_with_an_fxopt_optimized_module():
    model, _ = fxopt.models.get("relu_sigmoid").build()
    opt = fxopt.optimize(model, (torch.randn(4, 1024),))
    xs = torch.randn(24, 1024)
    with DynamicBatcher(opt, max_batch_size=4, max_wait_ms=1, pad_to_buckets=[4]) as b:
        futs = [b.submit(x) for x in xs]
        ys = torch.stack([f.result(WAIT * 6) for f in futs])
    torch.testing.assert_close(ys, model(xs))
    assert len(opt.specializations) == 1  # always batch 4: one specialization


# -- backpressure ---------------------------------------------------------------------------------------------------
def test_full_queue_rejects():
    gate = Gated()
    with DynamicBatcher(gate, max_batch_size=1, max_wait_ms=0, max_queue=2, on_full="reject") as b:
        running = _start_blocked(b, gate)
        queued = [b.submit(_sample(i)) for i in range(2)]
        with pytest.raises(QueueFull, match="queue is full"):
            b.submit(_sample(9))
        with pytest.raises(QueueFull):
            b(_sample(9))
        assert b.metrics()["rejected"] == 2
        gate.release.set()
        assert running.result(WAIT) is not None and all(f.result(WAIT) is not None for f in queued)
        assert torch.equal(b(_sample(5)), _sample(5) * 2 + 1)  # room again


def test_full_queue_blocks_until_room():
    gate = Gated()
    with DynamicBatcher(gate, max_batch_size=1, max_wait_ms=0, max_queue=1, on_full="block") as b:
        _start_blocked(b, gate)
        b.submit(_sample(1))
        submitted = threading.Event()
        box = {}

        def blocked_client():
            box["fut"] = b.submit(_sample(2))
            submitted.set()

        t = threading.Thread(target=blocked_client)
        t.start()
        assert not submitted.wait(0.05)  # still waiting for room
        gate.release.set()
        assert submitted.wait(WAIT)
        assert torch.equal(box["fut"].result(WAIT), _sample(2) * 2 + 1)
        t.join(WAIT)


def test_full_queue_blocking_respects_the_timeout():
    gate = Gated()
    with DynamicBatcher(gate, max_batch_size=1, max_wait_ms=0, max_queue=1, on_full="block") as b:
        _start_blocked(b, gate)
        b.submit(_sample(1))
        t0 = time.perf_counter()
        with pytest.raises(RequestTimeout, match="no room in the queue"):
            b.submit(_sample(2), timeout=0.05)
        assert time.perf_counter() - t0 >= 0.05
        gate.release.set()


# -- deadlines ------------------------------------------------------------------------------------------------------
def test_queued_request_times_out_and_is_not_run_while_a_running_one_completes():
    gate = Gated()
    with DynamicBatcher(gate, max_batch_size=4, max_wait_ms=0) as b:
        running = b.submit(_sample(1), timeout=0.05)
        assert gate.entered.wait(WAIT)
        late = b.submit(_sample(2), timeout=0.05)
        with pytest.raises(RequestTimeout, match="did not start within its timeout"):
            late.result(WAIT)  # fails at its deadline, while the worker is still busy
        assert isinstance(late.exception(), TimeoutError)
        assert b.metrics()["queue_depth"] == 0  # the expired request freed its place
        gate.release.set()
        assert torch.equal(running.result(WAIT), _sample(1) * 2 + 1)  # started in time: completes
        assert torch.equal(b(_sample(3), timeout=WAIT), _sample(3) * 2 + 1)
        m = b.metrics()
    assert all(not (batch == _sample(2)).all(dim=-1).any() for batch in gate.batches)  # never run
    assert m["timed_out"] == 1 and m["completed"] == 2


def test_default_timeout_and_cancel():
    gate = Gated()
    with DynamicBatcher(gate, max_batch_size=4, max_wait_ms=0, timeout=0.05) as b:
        _start_blocked(b, gate)
        with pytest.raises(TimeoutError):
            b(_sample(2))  # the batcher's default timeout
        cancelled = b.submit(_sample(3), timeout=WAIT)
        assert cancelled.cancel()
        kept = b.submit(_sample(4), timeout=WAIT)
        gate.release.set()
        assert torch.equal(kept.result(WAIT), _sample(4) * 2 + 1)
        m = b.metrics()
    assert m["cancelled"] == 1 and m["timed_out"] == 1
    assert gate.sizes == [1, 1]


# -- errors ---------------------------------------------------------------------------------------------------------
def test_an_error_fails_only_its_batch_and_the_worker_keeps_serving():
    def poisonable(x):
        if torch.isnan(x).any():
            raise ValueError("poisoned sample in batch")
        return x * 2 + 1

    gate = Gated(fn=poisonable)
    with DynamicBatcher(gate, max_batch_size=4, max_wait_ms=1) as b:
        _start_blocked(b, gate)
        bad = [_sample(i) for i in range(4)]
        bad[2] = torch.full((4,), float("nan"))
        good = [_sample(10 + i) for i in range(4)]
        bad_futs = [b.submit(x) for x in bad]
        good_futs = [b.submit(x) for x in good]
        gate.release.set()
        for f in bad_futs:
            with pytest.raises(ValueError, match="poisoned"):
                f.result(WAIT)
        for x, f in zip(good, good_futs):
            assert torch.equal(f.result(WAIT), x * 2 + 1)
        assert torch.equal(b(_sample(99)), _sample(99) * 2 + 1)  # still serving
        m = b.metrics()
    assert gate.sizes == [1, 4, 4, 1]
    assert m["failed"] == 4 and m["failed_batches"] == 1 and m["completed"] == 6


def test_an_output_not_batched_on_dim_0_is_an_error_for_that_batch():
    with DynamicBatcher(lambda x: x.sum(), max_batch_size=4, max_wait_ms=0) as b:
        with pytest.raises(RuntimeError, match="batched on dim 0"):
            b(_sample(0))
        assert b.metrics()["failed"] == 1


def test_a_mismatching_request_is_rejected_alone():
    with DynamicBatcher(lambda x: x * 2, max_batch_size=4, max_wait_ms=0) as b:
        assert torch.equal(b(_sample(1)), _sample(1) * 2)  # the first request fixes the spec: float32[4]
        assert b.input_spec.describe() == "float32[4]@cpu"
        with pytest.raises(ValueError, match=r"expected a sample of shape \[4\], float32.*got shape \[5\]"):
            b.submit(torch.zeros(5))
        with pytest.raises(ValueError, match=r"without the batch dim.*got shape \[1, 4\]"):
            b.submit(torch.zeros(1, 4))
        with pytest.raises(ValueError, match="got shape \\[4\\], float64"):
            b.submit(torch.zeros(4, dtype=torch.float64))
        with pytest.raises(ValueError, match="expected 1 input tensor"):
            b.submit(torch.zeros(4), torch.zeros(4))
        with pytest.raises(TypeError):
            b.submit([1.0, 2.0, 3.0, 4.0])
        assert torch.equal(b(_sample(2)), _sample(2) * 2)
        assert b.metrics()["submitted"] == 2


def test_explicit_input_spec():
    with DynamicBatcher(lambda x: x, input_spec=[((2, 3), torch.float32)], max_wait_ms=0) as b:
        with pytest.raises(ValueError, match=r"expected a sample of shape \[2, 3\]"):
            b(torch.zeros(4))  # even the first request is checked
        assert b(torch.ones(2, 3)).shape == (2, 3)
    with DynamicBatcher(lambda x: x, input_spec=torch.zeros(7), max_wait_ms=0) as b:
        with pytest.raises(ValueError):
            b(torch.zeros(6))


def test_bad_options():
    for kwargs in ({"max_batch_size": 0}, {"on_full": "drop"}, {"max_queue": 0}, {"max_wait_ms": -1},
                   {"timeout": 0}, {"pad_to_buckets": []}):
        with pytest.raises(ValueError):
            DynamicBatcher(lambda x: x, **kwargs).close()
    with pytest.raises(TypeError):
        DynamicBatcher(42)


# -- closing --------------------------------------------------------------------------------------------------------
def test_close_drains_everything_accepted_and_refuses_new_work():
    gate = Gated()
    b = DynamicBatcher(gate, max_batch_size=8, max_wait_ms=50)
    first = _start_blocked(b, gate)
    xs = [_sample(i) for i in range(30)]
    futs = [b.submit(x) for x in xs]
    closer = threading.Thread(target=b.close)
    closer.start()
    _wait_for(lambda: b.closed, "close() to start")
    with pytest.raises(BatcherClosed, match="is closed"):
        b.submit(_sample(99))
    assert not any(f.done() for f in futs)
    gate.release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert first.done() and all(f.done() for f in futs)  # close() returned after the queue was drained
    for x, f in zip(xs, futs):
        assert torch.equal(f.result(0), x * 2 + 1)
    assert gate.sizes == [1, 8, 8, 8, 6]  # while draining, batches do not wait for max_wait_ms
    b.close()  # idempotent
    with pytest.raises(BatcherClosed):
        b(_sample(1))
    assert b.metrics()["closed"] and not b._worker.is_alive()


def test_close_without_drain_fails_the_queued_requests():
    gate = Gated()
    b = DynamicBatcher(gate, max_batch_size=8, max_wait_ms=0)
    first = _start_blocked(b, gate)
    futs = [b.submit(_sample(i)) for i in range(5)]
    closer = threading.Thread(target=b.close, kwargs={"drain": False})
    closer.start()
    for f in futs:
        with pytest.raises(BatcherClosed, match="drain=False"):
            f.result(WAIT)
    gate.release.set()
    closer.join(WAIT)
    assert torch.equal(first.result(0), torch.ones(4))  # the running batch completed
    assert gate.sizes == [1]


def test_close_wakes_a_submitter_blocked_on_a_full_queue():
    gate = Gated()
    b = DynamicBatcher(gate, max_batch_size=1, max_wait_ms=0, max_queue=1, on_full="block")
    _start_blocked(b, gate)
    b.submit(_sample(1))
    box = {}

    def blocked():
        try:
            b.submit(_sample(2))
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=blocked)
    t.start()
    _wait_for(lambda: t.is_alive(), "the client to start")
    closer = threading.Thread(target=b.close)
    closer.start()
    t.join(WAIT)
    assert isinstance(box.get("error"), BatcherClosed)
    gate.release.set()
    closer.join(WAIT)


# -- asyncio --------------------------------------------------------------------------------------------------------
def test_async_infer_with_gather():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).eval()
    xs = torch.randn(200, 8)

    async def main(b):
        return await asyncio.gather(*[b.infer(x) for x in xs])

    with DynamicBatcher(model, max_batch_size=32, max_wait_ms=2) as b:
        ys = asyncio.run(main(b))
        m = b.metrics()
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(ys), model(xs), rtol=1e-5, atol=1e-5)
    assert m["completed"] == 200 and max(m["batch_size_histogram"]) > 1  # gather submits before any result


def test_async_errors_timeouts_and_blocking_queue():
    gate = Gated()

    async def main(b):
        blocked = asyncio.ensure_future(b.infer(_sample(1)))
        await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, WAIT)
        with pytest.raises(ValueError):
            await b.infer(torch.zeros(3))
        with pytest.raises(RequestTimeout):
            await b.infer(_sample(2), timeout=0.02)
        queued = asyncio.ensure_future(b.infer(_sample(3)))           # fills the queue (max_queue=1)
        waiting = asyncio.ensure_future(b.infer(_sample(4)))          # waits for room without blocking the loop
        await asyncio.sleep(0.01)
        assert not waiting.done()
        gate.release.set()
        return await asyncio.gather(blocked, queued, waiting)

    with DynamicBatcher(gate, max_batch_size=1, max_wait_ms=0, max_queue=1, on_full="block") as b:
        ys = asyncio.run(main(b))
    assert [torch.equal(y, _sample(i) * 2 + 1) for y, i in zip(ys, (1, 3, 4))] == [True] * 3


# -- metrics --------------------------------------------------------------------------------------------------------
def test_metrics_snapshot():
    gate = Gated()
    b = DynamicBatcher(gate, max_batch_size=4, max_wait_ms=0, max_queue=100)
    m0 = b.metrics()
    assert m0["queue_depth"] == 0 and m0["batch_size_histogram"] == {} and m0["latency_ms"]["p50"] is None
    assert m0["throughput_rps"] is None
    _start_blocked(b, gate)
    futs = [b.submit(_sample(i)) for i in range(6)]
    assert b.metrics()["queue_depth"] == 6 and b.metrics()["max_queue_depth"] == 6
    gate.release.set()
    for f in futs:
        f.result(WAIT)
    b.close()
    m = b.metrics()
    assert m["queue_depth"] == 0 and m["submitted"] == m["completed"] == 7 and m["batches"] == 3
    assert m["batch_size_histogram"] == {1: 1, 2: 1, 4: 1}
    for key in ("p50", "p90", "p99", "mean"):
        assert m["latency_ms"][key] > 0
    assert m["latency_ms"]["p50"] <= m["latency_ms"]["p90"] <= m["latency_ms"]["p99"]
    assert set(m["queue_wait_ms"]) == {"p50", "p99", "mean"} and m["queue_wait_ms"]["p99"] > 0
    assert m["throughput_rps"] > 0 and m["batch_ms"]["p50"] > 0
    b.reset_metrics()
    assert b.metrics()["completed"] == 0 and b.metrics()["batch_size_histogram"] == {}
