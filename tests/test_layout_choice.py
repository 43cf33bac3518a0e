"""NOTE [Layout by measurement] (``optimize(..., choose_layout=True)``): where to_channels_last applied on CUDA, the
pipeline runs again without it and the faster optimized module is kept. On the CPU the pass never applies, so these
tests open the gate and replace the timer; the CUDA test runs the real measurement."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import layout_choice


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                                                                  nn.SiLU())])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _record(opt):
    return next(r for r in opt.records if r.name == layout_choice.PASS)


@pytest.fixture
def gate_open(monkeypatch):
    """The measurement's gate opened on the CPU, with the timer replaced by ``times`` (channels-last, NCHW); the
    timer still calls both modules, as the real one does."""
    calls = []

    def install(times):
        def replay_us(fns):
            calls.append([fn() for fn in fns])
            return list(times)
        monkeypatch.setattr(layout_choice, "may_apply", lambda *a: True)
        monkeypatch.setattr(layout_choice, "applied", lambda records: True)
        monkeypatch.setattr(layout_choice, "replay_us", replay_us)
        return calls
    return install


@pytest.mark.parametrize("times, nchw_kept", [((20.0, 10.0), True), ((10.2, 10.0), False), ((10.0, 12.0), False)],
                         ids=["nchw-faster", "within-margin", "channels-last-faster"])
def test_the_faster_module_is_kept_and_both_times_are_noted(gate_open, times, nchw_kept):
    calls = gate_open(times)
    torch.manual_seed(0)
    model = _ConvNet().eval()
    x = torch.randn(2, 16, 12, 12)
    opt = fxopt.optimize(model, (x,), choose_layout=True)
    assert len(calls) == 1 and len(calls[0]) == 2  # both modules ran under the timer
    for out in calls[0]:
        torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
    record = _record(opt)
    assert record.status == ("measured slower" if nchw_kept else "unchanged")  # on the CPU the pass never applies
    (message,) = [n for n in record.notes if "a CUDA graph's replay" in n]
    assert f"channels-last {times[0]:.1f} µs a call against NCHW {times[1]:.1f}" in message
    assert message.endswith(("NCHW kept" if nchw_kept else "channels-last kept") + " (NOTE [Layout by measurement])")
    torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)


def test_an_nchw_build_that_fails_keeps_channels_last(gate_open, monkeypatch):
    gate_open((20.0, 10.0))
    real = layout_choice.choose

    def failing_build(first, build, args):
        def broken():
            raise RuntimeError("no memory for the second build")
        return real(first, broken, args)
    monkeypatch.setattr(layout_choice, "choose", failing_build)
    model = _ConvNet().eval()
    x = torch.randn(1, 16, 8, 8)
    opt = fxopt.optimize(model, (x,), choose_layout=True)
    assert any("NCHW not timed (RuntimeError: no memory for the second build); channels-last kept" in n
               for n in _record(opt).notes)
    torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)


def test_the_gate():
    """Only the default pipeline on CUDA, with to_channels_last not disabled, for a model that keeps no state."""
    cuda = torch.cuda.is_available()
    assert layout_choice.may_apply("cuda", None, (), False) == cuda
    assert not layout_choice.may_apply("cpp", None, (), False)
    assert not layout_choice.may_apply("cuda", ["fuse_elementwise"], (), False)
    assert not layout_choice.may_apply("cuda", None, ("to_channels_last",), False)
    assert not layout_choice.may_apply("cuda", None, (), True)


def test_on_the_cpu_nothing_is_timed(monkeypatch):
    def never(fns):
        raise AssertionError("timed on the CPU")
    monkeypatch.setattr(layout_choice, "replay_us", never)
    opt = fxopt.optimize(_ConvNet().eval(), (torch.randn(1, 16, 8, 8),), choose_layout=True)
    assert not any("replay" in n for r in opt.records for n in r.notes)


def test_off_unless_asked(gate_open):
    """Opt-in until a GPU run has measured it: without ``choose_layout`` nothing is timed even where it could be."""
    calls = gate_open((20.0, 10.0))
    opt = fxopt.optimize(_ConvNet().eval(), (torch.randn(1, 16, 8, 8),))
    assert calls == [] and _record(opt).status == "unchanged"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
def test_on_cuda_both_layouts_are_timed(dtype):
    model = _ConvNet().cuda().eval().to(dtype)
    x = torch.randn(1, 16, 56, 56, device="cuda", dtype=dtype)
    opt = fxopt.optimize(model, (x,), choose_layout=True)
    record = _record(opt)
    (message,) = [n for n in record.notes if "a CUDA graph's replay" in n]
    assert record.status == ("measured slower" if "NCHW kept" in message else "applied")
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=2e-2, rtol=2e-2)
