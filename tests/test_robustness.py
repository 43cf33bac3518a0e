"""Issue 7: every model either gets optimized or runs unchanged, never wrong; misuse gets eager's errors."""

import pytest
import torch
import torch.nn as nn

import fxopt


class ValueDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # neither symbolic_trace nor torch.export can take this
            return x * 2
        return x - 1


class WithBadPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bad = ValueDependent()

    def forward(self, x):
        return torch.relu(self.bad(torch.sigmoid(self.fc(x)) * 3)) + 1


def test_untraceable_submodule_becomes_opaque_and_the_rest_is_optimized():
    model, x = WithBadPart().eval(), torch.randn(2, 8)
    opt = fxopt.optimize(model, [x], strict=True)
    info = opt.capture_info
    assert info.method == "symbolic_trace (opaque: bad)"
    assert [a.ok for a in info.attempts] == [False, True]
    assert any(n.op == "call_module" and n.target == "bad" for n in opt.graph_module.graph.nodes)
    torch.testing.assert_close(opt(x), model(x))
    assert {r.name: r for r in opt.records}["fuse_elementwise"].status == "applied"  # relu + 1 around it


def test_uncapturable_model_runs_unchanged_with_a_warning():
    model, x = ValueDependent(), torch.randn(5)
    with pytest.warns(RuntimeWarning, match="runs unoptimized"):
        opt = fxopt.optimize(model, [x])
    assert "symbolic_trace" in opt.unoptimized_reason and "export" in opt.unoptimized_reason
    torch.testing.assert_close(opt(x), model(x))
    torch.testing.assert_close(opt(-x.abs()), model(-x.abs()))  # both branches: it really is the original
    with pytest.raises(fxopt.CaptureError):
        fxopt.optimize(model, [x], strict=True)


def test_uncapturable_model_without_inputs_falls_back_at_first_call():
    model = ValueDependent()
    opt = fxopt.optimize(model)
    with pytest.warns(RuntimeWarning, match="runs unoptimized"):
        out = opt(torch.ones(3))
    torch.testing.assert_close(out, torch.ones(3) * 2)


def _opt_chain():
    model = fxopt.models.ElementwiseChain()
    x = torch.randn(2, 16)
    return model, fxopt.optimize(model, [x]), x


def test_wrong_rank_and_dtype_respecialize_instead_of_misusing_a_kernel():
    model, opt, _ = _opt_chain()
    for x in (torch.randn(2, 3, 16), torch.randn(2, 16, dtype=torch.float64)):
        assert fxopt.verify.compare(opt(x), model(x)) is None
    assert len(opt.specializations) == 3


def test_inputs_eager_rejects_raise_the_same_exception_type():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    opt = fxopt.optimize(model, [torch.randn(2, 8)])
    bad = torch.randn(2, 5)  # wrong feature size
    with pytest.raises(RuntimeError) as eager_err:
        model(bad)
    with pytest.raises(type(eager_err.value)):
        opt(bad)


def test_kernel_refuses_inputs_it_was_not_built_for():
    _, opt, x = _opt_chain()
    kernel = next(iter(opt.kernels.values()))
    with pytest.raises(TypeError, match="built for torch.float32"):
        kernel((x.double(),))
    with pytest.raises(ValueError, match="rank"):
        kernel((torch.randn(2, 2, 16),))


def test_empty_and_nan_inputs_behave_as_eager():
    model, opt, _ = _opt_chain()
    empty = torch.randn(0, 16)
    assert opt(empty).shape == model(empty).shape == (0, 16)
    x = torch.randn(2, 16)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    assert fxopt.verify.compare(opt(x), model(x)) is None


def test_model_that_calls_item_or_prints_is_correct(capsys):
    class Chatty(nn.Module):
        def forward(self, x):
            scale = x.abs().max().item()  # a host sync
            print("scale", round(scale, 3))
            return torch.relu(x) * 2 + 1

    model, x = Chatty(), torch.randn(4, 4)
    opt = fxopt.optimize(model, [x])
    capsys.readouterr()
    torch.testing.assert_close(opt(x), model(x))
    assert "scale" in capsys.readouterr().out


def test_cpu_model_with_inputs_on_another_device_fails_like_eager():
    model = nn.Linear(4, 4)
    opt = fxopt.optimize(model, [torch.randn(1, 4)])
    meta = torch.randn(1, 4, device="meta")
    with pytest.raises(Exception) as eager_err:
        model(meta)
    with pytest.raises(type(eager_err.value)):
        opt(meta)


# (model, dtype, passes that must apply): the model, its weights and its inputs really are in dtype, on the CPU.
PRECISION_CASES = [
    # 16-bit on the CPU: each BatchNorm a float32 affine in its ReLU's kernel, not folded (NOTE [16-bit folds])
    ("small_resnet", torch.float16, ("batchnorm_as_affine", "fuse_elementwise")),
    ("small_resnet", torch.bfloat16, ("batchnorm_as_affine", "fuse_elementwise")),
    ("small_resnet", torch.float64, ("fold_batchnorm", "fuse_elementwise")),
    ("mlp_block", torch.float16, ("fuse_reductions",)),  # LayerNorm rows and GELU in a float16 C++ kernel
]


@pytest.mark.parametrize("name, dtype, applied", PRECISION_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_low_and_high_precision_models(name, dtype, applied):
    model, inputs = fxopt.models.get(name).build(dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype} and [x.dtype for x in inputs] == [dtype]
    with torch.no_grad():
        want = model(*inputs)
    opt = fxopt.optimize(model, inputs)
    status = {r.name: r.status for r in opt.records}
    assert all(s != "rolled back" for s in status.values()), opt.summary()
    assert all(status[p] == "applied" for p in applied), opt.summary()
    with torch.no_grad():
        got = opt(*inputs)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    rtol, atol = fxopt.verify.TOLERANCES[dtype]  # the tolerance verification itself uses for this dtype
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert all(p.dtype == dtype for p in model.parameters())  # the user's model is not converted


def test_autocast_region_optimizes_correctly():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.fc(x)
            return torch.relu(y.float()) * 2

    model, x = Mixed().eval(), torch.randn(4, 16)
    opt = fxopt.optimize(model, [x])
    assert fxopt.verify.compare(opt(x), model(x)) is None
