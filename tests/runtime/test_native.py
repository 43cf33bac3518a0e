"""The compiled call path of generated kernels (fxopt/runtime/native.py, NOTE [Native call path]): it serves only
inputs that exactly match a plan the Python path made, and gives the same outputs; everything else goes back to
the Python path, with its errors."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.runtime import native

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _backend(device: str) -> str:
    return "cuda" if device == "cuda" else "cpp"


class _TwoOutputs(nn.Module):
    """One fused kernel with two outputs (the intermediate is also returned), a broadcast operand and a scalar."""

    def forward(self, x, b):
        h = torch.sigmoid(x * 2.0 + b)
        return h, torch.relu(h - 0.5)


class _RowNorm(nn.Module):
    """A row-wise kernel: add -> layer_norm."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)

    def forward(self, x, y):
        return self.norm(x + y)


def _kernels(opt):
    return list(opt.kernels.values())


def _native_and_slow(kernel):
    nat = kernel.call.native()
    assert nat is not None, native.status()
    return nat, kernel.call.__globals__["slow"]


@pytest.fixture()
def ready(native_module):
    return native_module


def test_status_says_ready(ready):
    assert native.status().startswith("ready")


@pytest.mark.parametrize("device", DEVICES)
def test_native_matches_the_python_path_for_flat_strided_and_broadcast_inputs(ready, device):
    x, b = torch.randn(8, 33, device=device), torch.randn(33, device=device)
    opt = fxopt.optimize(_TwoOutputs(), [x, b], backend=_backend(device), strict=True)
    (kernel,) = _kernels(opt)
    nat, slow = _native_and_slow(kernel)
    cases = [
        (x, b),
        (torch.randn(33, 8, device=device).t(), b),  # transposed: the strided path
        (torch.randn(8, 66, device=device)[:, ::2], b),  # a step along the row
        (torch.randn(8, 34, device=device)[:, 1:], b),  # an offset pointer
    ]
    for inputs in cases:
        got, want = nat(list(inputs)), slow(list(inputs))
        assert len(got) == 2
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.stride() == w.stride() and g.dtype == w.dtype and g.device == w.device
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        with torch.no_grad():
            for g, e in zip(got, _TwoOutputs()(*inputs)):
                torch.testing.assert_close(g, e)
    assert ready.plan_count(nat) == len(kernel._plans) == 4  # one per layout; the offset is not part of a plan


@pytest.mark.parametrize("device", DEVICES)
def test_a_row_kernel_runs_natively(ready, device):
    x, y = torch.randn(4, 16, 64, device=device), torch.randn(4, 16, 64, device=device)
    model = _RowNorm().to(device).eval()
    opt = fxopt.optimize(model, [x, y], backend=_backend(device), strict=True)
    rows = [k for k in _kernels(opt) if "rows" in k.name]
    assert rows, list(opt.kernels)
    nat, slow = _native_and_slow(rows[0])
    before = ready.plan_count(nat)
    with torch.no_grad():
        out = opt(x, y)
        torch.testing.assert_close(out, model(x, y))
    assert ready.plan_count(nat) == before == len(rows[0]._plans) >= 1  # served natively: no new plan


@pytest.mark.parametrize("device", DEVICES)
def test_a_new_shape_is_planned_by_python_then_served_natively(ready, device):
    x = torch.randn(4, 32, device=device)
    opt = fxopt.optimize(_TwoOutputs(), [x, torch.randn(32, device=device)], backend=_backend(device),
                         strict=True)
    (kernel,) = _kernels(opt)
    nat, _ = _native_and_slow(kernel)
    n = ready.plan_count(nat)
    new = [torch.randn(7, 32, device=device), torch.randn(32, device=device)]
    nat(new)  # a miss: the Python path makes the plan and registers it
    assert ready.plan_count(nat) == n + 1
    nat(new)
    assert ready.plan_count(nat) == n + 1


def test_inputs_it_was_not_built_for_get_the_python_paths_errors(ready):
    x, b = torch.randn(8, 33), torch.randn(33)
    opt = fxopt.optimize(_TwoOutputs(), [x, b], backend="cpp", strict=True)
    (kernel,) = _kernels(opt)
    nat, _ = _native_and_slow(kernel)
    with pytest.raises(ValueError, match="expected 2 inputs, got 1"):
        nat([x])
    with pytest.raises(TypeError, match="input 1 has dtype torch.float64"):
        nat([x, b.double()])
    with pytest.raises(TypeError, match="input 0 is int"):
        nat([3, b])
    with pytest.raises(ValueError, match="broadcast to rank 3"):
        nat([torch.randn(2, 8, 33), b])


def test_a_tensor_subclass_and_an_empty_input_are_served_correctly(ready):
    class Marked(torch.Tensor):
        pass

    x, b = torch.randn(8, 33), torch.randn(33)
    opt = fxopt.optimize(_TwoOutputs(), [x, b], backend="cpp", strict=True)
    (kernel,) = _kernels(opt)
    nat, _ = _native_and_slow(kernel)
    got = nat([x.as_subclass(Marked), b])  # not a plain tensor: the Python path takes it
    torch.testing.assert_close(got[0], torch.sigmoid(x * 2.0 + b))
    empty = nat([torch.randn(0, 33), b])  # a plan with nothing to launch
    assert [t.shape for t in empty] == [torch.Size([0, 33])] * 2
    assert [t.shape for t in nat([torch.randn(0, 33), b])] == [torch.Size([0, 33])] * 2


def test_parameters_are_plain_inputs(ready):
    x = torch.randn(4, 64)
    model = _RowNorm().eval()
    opt = fxopt.optimize(model, [x, x], backend="cpp", strict=True)
    rows = [k for k in _kernels(opt) if "rows" in k.name][0]
    nat, _ = _native_and_slow(rows)
    n = ready.plan_count(nat)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(opt(x, x), model(x, x))
    assert ready.plan_count(nat) == n  # the weight and bias (nn.Parameter) matched the plan


def test_the_lowered_graph_calls_the_native_path(ready):
    x = torch.randn(4, 32)
    opt = fxopt.optimize(_TwoOutputs(), [x, torch.randn(32)], backend="cpp", strict=True)
    (kernel,) = _kernels(opt)
    runner = opt.specializations[0].runner
    targets = [n.target for n in runner.graph.nodes if n.op == "call_function"]
    assert kernel.call.native() in targets
    assert kernel.name in runner.code


def test_plans_made_before_the_path_was_ready_are_registered_when_it_attaches(ready, monkeypatch):
    from fxopt.runtime import kernel as kernel_mod

    monkeypatch.setattr(kernel_mod, "KERNELS", {})  # a kernel of its own, not one built earlier with the path on
    monkeypatch.setenv("FXOPT_NATIVE_CALL", "0")  # the kernel is made while the path is off: Python only
    x, b = torch.randn(8, 33), torch.randn(33)
    opt = fxopt.optimize(_TwoOutputs(), [x, b], backend="cpp", strict=True)
    (kernel,) = _kernels(opt)
    assert kernel.call.native() is None
    kernel.call([x, b])
    assert kernel._plans
    monkeypatch.delenv("FXOPT_NATIVE_CALL")
    kernel.call.attach_native(ready)
    nat = kernel.call.native()
    assert nat is not None and ready.plan_count(nat) == len(kernel._plans)


@pytest.mark.parametrize("device", DEVICES)
def test_native_calls_from_several_threads_get_their_own_results(ready, device):
    x0 = torch.randn(16, 100, device=device)
    opt = fxopt.optimize(_TwoOutputs(), [x0, torch.randn(100, device=device)], backend=_backend(device),
                         strict=True)
    errors: list[str] = []

    def worker(seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        for _ in range(200):
            x = torch.randn(16, 100, device=device, generator=g)
            b = torch.randn(100, device=device, generator=g)
            with torch.no_grad():
                why = fxopt.verify.compare(opt(x, b), _TwoOutputs()(x, b))
            if why is not None:
                errors.append(why)
                return

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


@pytest.mark.cuda
def test_native_launch_is_captured_by_a_cuda_graph(ready):
    x = torch.randn(64, 1024, device="cuda")
    model = fxopt.models.ReluSigmoid()
    opt = fxopt.optimize(model, [x], backend="cuda", strict=True)
    (kernel,) = _kernels(opt)
    assert kernel.call.native() is not None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(3):
            opt(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        out = opt(x)
    for _ in range(3):
        x.copy_(torch.randn(64, 1024, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, torch.sigmoid(torch.relu(x)))


@pytest.mark.cuda
def test_native_launch_on_a_side_stream_and_from_a_fresh_thread(ready):
    x = torch.randn(256, 1024, device="cuda")
    opt = fxopt.optimize(fxopt.models.ReluSigmoid(), [x], backend="cuda", strict=True)
    s = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(s):
        y = opt(x)
    s.synchronize()
    torch.testing.assert_close(y, torch.sigmoid(torch.relu(x)))
    out: list = []
    t = threading.Thread(target=lambda: out.append(opt(x)))  # no current driver context on a fresh thread
    with torch.no_grad():
        t.start()
        t.join()
    torch.testing.assert_close(out[0], torch.sigmoid(torch.relu(x)))


def test_without_the_native_path_kernels_keep_the_python_path(tmp_path):
    """A machine where the extension cannot be built (no Python.h, a broken compiler): the status says why, and
    every kernel keeps working through the Python call path."""
    import subprocess
    import sys

    code = """
from pathlib import Path
import torch, fxopt
from fxopt.runtime import native
native._SOURCE = Path('/nonexistent/native_call.cpp')  # the build fails as a missing header would
assert native.wait(timeout=120) is None
print(native.status())
x = torch.randn(4, 33)
opt = fxopt.optimize(fxopt.models.ReluSigmoid(), [x], backend="cpp", strict=True)
(kernel,) = opt.kernels.values()
assert kernel.call.native() is None
with torch.no_grad():
    torch.testing.assert_close(opt(x), torch.sigmoid(torch.relu(x)))
print("ok")
"""
    import os

    env = dict(os.environ, FXOPT_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("unavailable: ") and lines[-1] == "ok", done.stdout
