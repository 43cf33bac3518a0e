"""NOTE [Inference only] (fxopt/grad.py): one autograd rule for every entry point. Outputs never carry a partial
history: under grad mode they either come from the original model (inputs that require grad) or raise
InferenceOnlyError, naming fxopt, when a backward pass reaches them."""

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.errors import InferenceOnlyError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_outputs_carry_no_history_under_no_grad():
    model, x = _mlp(), torch.randn(2, 8)
    opt = fxopt.optimize(model, (x,))
    with torch.no_grad():
        out = opt(x)
    assert out.grad_fn is None and not out.requires_grad


def test_backward_through_fxopt_outputs_raises_a_clear_error_and_fills_no_gradient():
    """Before: the output's grad_fn was AddmmBackward0 and backward filled the last layers' gradients only."""
    model, x = _mlp(), torch.randn(2, 8)
    opt = fxopt.optimize(model, (x,))
    out = opt(x)  # grad mode, parameters require grad, inputs do not
    assert out.requires_grad  # as eager's output would
    with pytest.raises(InferenceOnlyError, match="fxopt.*inference-only.*original model"):
        out.sum().backward()
    assert all(p.grad is None for p in model.parameters())  # no silent partial gradients
    torch.testing.assert_close(out.detach(), model(x).detach())


def test_frozen_parameters_give_plain_outputs_as_eager_does():
    model, x = _mlp(), torch.randn(2, 8)
    model.requires_grad_(False)
    opt = fxopt.optimize(model, (x,))
    out = opt(x)
    assert not out.requires_grad and out.grad_fn is None
    model.requires_grad_(True)  # toggled after optimizing: the rule follows it, without re-optimizing
    assert opt(x).requires_grad
    assert len(opt.specializations) == 1


def test_inputs_that_require_grad_run_the_original_model_with_correct_gradients():
    model, x = _mlp(), torch.randn(2, 8)
    opt = fxopt.optimize(model, (x,))
    xg = x.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="original model runs instead"):
        out = opt(xg)
    out.sum().backward()
    expected = x.clone().requires_grad_()
    ref = _mlp()
    ref(expected).sum().backward()
    torch.testing.assert_close(xg.grad, expected.grad)
    assert all(p.grad is not None for p in model.parameters())


def test_torch_compile_backend_follows_the_same_rule():
    model, x = _mlp(), torch.randn(2, 8)
    compiled = torch.compile(model, backend="fxopt")
    with torch.no_grad():
        plain = compiled(x)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, model(x).detach())
    with pytest.warns(RuntimeWarning, match="original model runs instead"):
        out = compiled(x)  # Dynamo passes the parameters as inputs: they require grad -> eager's graph
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_nested_and_integer_outputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = self.fc(x).relu()
            return {"y": y, "argmax": y.argmax(-1)}

    model, x = Two().eval(), torch.randn(3, 8)
    opt = fxopt.optimize(model, (x,))
    out = opt(x)
    assert out["y"].requires_grad and not out["argmax"].requires_grad
    torch.testing.assert_close(out["argmax"], model(x)["argmax"])
    with pytest.raises(InferenceOnlyError):
        out["y"].sum().backward()


@pytest.mark.cuda
def test_cuda_graphs_follow_the_same_rule():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _mlp().cuda()
    x = torch.randn(2, 8, device="cuda")
    opt = fxopt.optimize(model, (x,), cuda_graphs=True)
    with torch.no_grad():
        plain = opt(x)
    assert plain.grad_fn is None
    out = opt(x)  # grad mode: the graph replays with autograd off, and backward raises
    torch.testing.assert_close(out.detach(), model(x).detach())
    with pytest.raises(InferenceOnlyError):
        out.sum().backward()
    assert all(p.grad is None for p in model.parameters())
