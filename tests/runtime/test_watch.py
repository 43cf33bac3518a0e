"""NOTE [Frozen weights]: a model changed after fxopt.optimize is noticed at the next call and optimized again,
whatever changed it; tensors the model's own forward writes are state, not weights."""

import warnings

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.runtime.watch import WeightWatch


def _model() -> nn.Module:
    """BatchNorm folded into the Linear before it: the optimized graph holds copies of those weights."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
    return m


def _other_state() -> dict:
    torch.manual_seed(1)
    return _model().state_dict()


def _optimized():
    model, x = _model(), torch.randn(4, 8)
    opt = fxopt.optimize(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    return model, opt, x


def _check(model, opt, x, match: str | None = "changed after fxopt.optimize"):
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = opt(x)
        want = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if match is not None:
        assert any(match in str(w.message) for w in caught), [str(w.message) for w in caught]


@pytest.mark.parametrize("change", ["load_state_dict", "in_place", "optimizer_step", "to_double", "data_swap",
                                    "replace_parameter", "assign", "replace_submodule"])
def test_a_changed_model_gives_the_new_weights_results(change):
    model, opt, x = _optimized()
    with torch.no_grad():
        if change == "load_state_dict":
            model.load_state_dict(_other_state())  # before: max difference 0.63 with the old weights' results
        elif change == "in_place":
            model[1].running_var.mul_(3.0)  # folded into the first Linear's copy
        elif change == "optimizer_step":
            pass
        elif change == "to_double":
            model.double()
            x = x.double()
        elif change == "data_swap":
            model[0].weight.data = torch.randn(16, 8)
        elif change == "replace_parameter":
            model[3].weight = nn.Parameter(torch.randn(4, 16))
        elif change == "assign":
            model.load_state_dict(_other_state(), assign=True)
        elif change == "replace_submodule":
            model[3] = nn.Linear(16, 4)
    if change == "optimizer_step":
        model.train()
        torch.optim.SGD(model.parameters(), lr=0.5).zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        model.eval()
    _check(model, opt, x)


def test_the_warning_shows_once_and_every_change_is_followed():
    model, opt, x = _optimized()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    _check(model, opt, x)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    _check(model, opt, x, match=None)  # no second warning, still the new weights' results


def test_an_unchanged_model_is_not_rebuilt():
    model, opt, x = _optimized()
    spec = opt.specializations[0]
    for _ in range(3):
        _check(model, opt, x, match=None)
    assert opt.specializations == [spec]


def test_state_written_by_the_forward_is_not_a_weight_change():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return self.fc(x).relu()

    model, x = Counter().eval(), torch.randn(2, 8)
    opt = fxopt.optimize(model, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "model changed" warning on every call
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(opt(x), model.fc(x).relu())
    assert len(opt.specializations) == 1


def test_the_user_model_gets_no_hooks_and_keeps_its_tensors():
    model, x = _model(), torch.randn(4, 8)
    before = {k: (v, v._version) for k, v in model.state_dict(keep_vars=True).items()}
    fxopt.optimize(model, (x,))
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is t and t._version == v for k, (t, v) in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._state_dict_hooks or m._load_state_dict_post_hooks
                   for m in model.modules())


def test_watch_python_and_native_fingerprints_agree():
    from fxopt.runtime import native

    mod = native.wait(timeout=120)
    if mod is None:
        pytest.skip(f"native call path unavailable: {native.status()}")
    a, b = torch.randn(3), torch.randn(4, requires_grad=True)
    watch = WeightWatch([], [a, b])
    assert watch._native_fp is not None and not watch.changed()
    b.requires_grad_(False)
    assert watch.changed() and watch.only_requires_grad_changed()
    watch.rebaseline()
    assert not watch.changed()
    with torch.no_grad():
        a.add_(1)
    assert watch.changed() and not watch.only_requires_grad_changed()
    assert "written in place" in watch.describe()
    with pytest.raises(TypeError, match="tuple of tensors"):
        mod.fingerprint((a, 1))


def test_a_compiled_forward_that_assigns_module_attributes_does_not_trace_the_watch_hooks(monkeypatch):
    """The registration hooks are global: a forward torch.compile traces (the transformers Llama step assigns
    module attributes) ran them inside Dynamo, which guarded on the watch's weak dictionary and failed when one of
    its keys was collected before the guards were built (H100, torch 2.11: InternalTorchDynamoError, IndexError).
    While compiling, the hooks return at once; outside, they still mark a replaced tensor."""
    model, opt, x = _optimized()  # installs the hooks and watches ``model``

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.seen = self.seen + 1  # a buffer registration, from inside the traced forward
            return x * 2

    for _ in range(8):  # watched modules that are collected: weak keys that come and go
        _optimized()
    counter = Counter()
    compiled = torch.compile(counter, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), x * 2)
    torch.testing.assert_close(compiled(x), x * 2)

    from fxopt.runtime import watch

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model[0].bias = nn.Parameter(model[0].bias.detach() + 1)  # a replacement seen "while compiling": ignored
    assert all(w.replaced is None for w in watch._WATCHED.get(model, ()))
    monkeypatch.undo()
    model[0].bias = nn.Parameter(model[0].bias.detach() + 1)
    assert any(w.replaced is not None for w in watch._WATCHED.get(model, ()))
    _check(model, opt, x)
