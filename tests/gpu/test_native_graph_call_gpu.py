"""The native graph call on a GPU (NOTE [Native graph call] in fxopt/runtime/cudagraph/replay.py): a captured signature
whose graph copies its own inputs and outputs is replayed from C++, with the same results as the Python closure."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.models import ReluSigmoid, SimpleCNN
from fxopt.runtime import native
from fxopt.runtime.cudagraph import CUDAGraphRunner

DEV = "cuda"
TOL = dict(rtol=1e-3, atol=1e-3)


class TwoOutputs(nn.Module):
    def forward(self, x, y):
        return torch.relu(x) + y, (x * 2).permute(0, 2, 3, 1)


class Noisy(nn.Module):
    """Draws random numbers: torch's replay() must advance the generator, so the native call stands aside."""

    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.fixture(autouse=True)
def _ready():
    if native.wait(timeout=600) is None:
        pytest.fail(f"the native call path did not build: {native.status()}")
    yield
    gc.collect()
    torch.cuda.synchronize()


def eager(model, *args):
    with torch.no_grad():
        return model(*args)


def _closure(runner, *args):
    from fxopt.runtime.cudagraph import signature_key

    return runner._fast[signature_key(args)]


@pytest.mark.cuda
@pytest.mark.parametrize("build,shapes", [(ReluSigmoid, [(1, 1024)]), (TwoOutputs, [(2, 3, 4, 5), (2, 3, 4, 5)]),
                                          (SimpleCNN, [(1, 3, 32, 32)])], ids=["leaf", "tuple", "cnn"])
def test_native_replays_match_eager_with_fresh_outputs(build, shapes):
    torch.manual_seed(0)
    model = build().to(DEV).eval()
    runner = CUDAGraphRunner(model, native_replay=True)
    args = [torch.randn(s, device=DEV) for s in shapes]
    runner(*args)
    runner(*args)  # the second call takes the closure (the first captured)
    run = _closure(runner, *args)
    assert getattr(run, "native", [None])[0] is not None, "the native graph call did not attach"
    kept, wants = [], []
    for _ in range(5):
        new = [torch.randn_like(a) for a in args]
        got = runner(*new)
        kept.append(got)
        wants.append(eager(model, *new))
    torch.cuda.synchronize()
    for got, want in zip(kept, wants):  # no later call wrote into an earlier call's outputs
        for g, w in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            assert g.stride() == w.stride()
            torch.testing.assert_close(g, w, **TOL)
    (entry,) = runner.entries()
    assert entry.replays >= 6  # native launches are counted with the Python closure's
    assert entry.replay == "native"
    assert any(line.rstrip().endswith(" native") for line in runner.report().splitlines()), runner.report()


@pytest.mark.cuda
def test_unsafe_mode_returns_the_graph_buffers_natively():
    model = ReluSigmoid().to(DEV)
    runner = CUDAGraphRunner(model, output_mode="unsafe", native_replay=True)
    x = torch.randn(4, 256, device=DEV)
    first = runner(x)
    second = runner(torch.randn_like(x))
    assert _closure(runner, x).native[0] is not None
    x3 = torch.randn_like(x)
    third = runner(x3)
    assert first is second is third
    torch.testing.assert_close(third, eager(model, x3), **TOL)


@pytest.mark.cuda
def test_random_ops_keep_torchs_replay():
    runner = CUDAGraphRunner(Noisy(), native_replay=True)
    x = torch.zeros(1024, device=DEV)
    a = runner(x)
    (entry,) = runner._entries.values()
    assert entry.uses_rng
    assert not hasattr(_closure(runner, x), "native")
    assert runner.entries()[0].replay.startswith("Python: the graph draws random numbers")
    b, c = runner(x), runner(x)
    assert not torch.equal(b, c) and not torch.equal(a, b)  # the generator advanced between replays


@pytest.mark.cuda
def test_native_and_python_replays_agree_across_streams_and_subclasses():
    """Calls that alternate between the caller's streams (the hand-over runs in Python), and an input of a tensor
    subclass (the C++ side hands it back to Python)."""
    torch.manual_seed(0)
    model = SimpleCNN().to(DEV).eval()
    fast = CUDAGraphRunner(model, native_replay=True)
    slow = CUDAGraphRunner(model, native_replay=False)
    side = torch.cuda.Stream()

    class Sub(torch.Tensor):
        pass

    for i in range(12):
        x = torch.randn(1, 3, 32, 32, device=DEV)
        if i % 4 == 3:
            x = x.as_subclass(Sub)
        stream = side if i % 3 == 1 else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            a, b = fast(x), slow(x)
        torch.cuda.current_stream().wait_stream(stream)
        torch.testing.assert_close(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor), rtol=0, atol=0)
        torch.testing.assert_close(a.as_subclass(torch.Tensor), eager(model, x.as_subclass(torch.Tensor)), **TOL)
    assert not hasattr(_closure(slow, torch.randn(1, 3, 32, 32, device=DEV)), "native")


@pytest.mark.cuda
def test_optimize_with_cuda_graphs_takes_the_native_call_on_request():
    torch.manual_seed(0)
    model = SimpleCNN().to(DEV).eval()
    x = torch.randn(1, 3, 32, 32, device=DEV)
    opt = fxopt.optimize(model, [x], cuda_graphs=True, graph_options={"native_replay": True})
    with torch.no_grad():
        for _ in range(3):
            opt(x)
        assert _closure(opt._graphs, x).native[0] is not None
        torch.testing.assert_close(opt(x), model(x), **TOL)
