"""The module that runs (runtime/lower.py, NOTE [Lean runner]): same ops and results as the optimized graph, weights
read flat, views of weights computed once, Linear/Conv leaves called functionally."""

from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.launches import dispatched_ops
from fxopt.models import build_any
from fxopt.runtime.lower import lower_for_execution


def optimized(model, inputs, **options):
    opt = fxopt.optimize(model, inputs, **options)
    return opt, opt._last.graph_module, opt._last.runner


@pytest.mark.parametrize("name", ["mlp_block", "simple_cnn", "small_resnet", "transformer_encoder"])
def test_runner_matches_the_graph_with_the_same_compute_ops(name):
    model, inputs = build_any(name)
    opt, gm, runner = optimized(model, inputs)
    with torch.no_grad():
        want, got = gm(*inputs), runner(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    graph_ops = dispatched_ops(gm, inputs)
    fused = Counter({k: v for k, v in graph_ops.items() if "fxopt" in k})
    assert dispatched_ops(runner, inputs) + fused == graph_ops  # kernels are called directly, nothing else moves


def test_weights_are_flat_attributes_shared_with_the_model():
    model, inputs = build_any("mlp_block")
    _, _, runner = optimized(model, inputs)
    code = runner.code
    assert "getattr(self" not in code and ".t()" not in code and "fc2(" not in code
    assert "torch._C._nn.linear(" in code
    flat = {k: v for k, v in vars(runner).items() if k.startswith("_w")}
    registered = {**dict(runner.named_parameters()), **dict(runner.named_buffers())}  # folded views: buffers
    assert flat and all(registered[k] is v for k, v in flat.items())  # what parameters() reports, read directly
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert all(t.untyped_storage().data_ptr() in storages for t in flat.values())  # no copies, only views


def test_folded_view_keeps_autograd_and_a_copying_reshape_stays():
    root = nn.Module()
    root.w = nn.Parameter(torch.randn(6, 4))
    root.b = nn.Parameter(torch.randn(4, 6).t(), requires_grad=False)  # not contiguous: reshape(-1) copies
    g = torch.fx.Graph()
    x = g.placeholder("x")
    t = g.call_method("t", (g.get_attr("w"),))
    flat_b = g.call_method("reshape", (g.get_attr("b"), -1))
    g.output(g.call_function(torch.add, (g.call_function(torch.matmul, (x, t)),
                                         g.call_function(operator.getitem, (flat_b, slice(0, 6))))))
    gm = torch.fx.GraphModule(root, g)
    runner = lower_for_execution(gm)
    x = torch.randn(3, 4)
    torch.testing.assert_close(runner(x), gm(x))
    assert ".t()" not in runner.code and "reshape" in runner.code and "getitem" in runner.code
    (folded,) = [v for v in vars(runner).values() if isinstance(v, torch.Tensor) and v.shape == (4, 6)]
    assert folded.grad_fn is not None  # as the per-call t() of a parameter would have
    runner(x).sum().backward()  # gradients still reach the weight through the folded view
    assert root.w.grad is not None


def test_leaves_with_hooks_or_other_padding_stay_module_calls():
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding="same"), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    model[4].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    gm = torch.fx.symbolic_trace(model)
    runner = lower_for_execution(gm)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(runner(x), model(x))
    code = runner.code
    assert 'getattr(self, "0")(' in code and 'getattr(self, "4")(' in code  # reflect padding, the hooked Linear
    assert code.count("torch.conv2d(") == 1 and "linear(" not in code
    assert len(seen) == 2  # the hook ran for model(x) and for the runner


def test_functional_conv_and_linear_match_the_modules():
    model = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, dilation=1, groups=1, bias=False), nn.Flatten(),
                          nn.Linear(3 * 4, 2, bias=False)).eval()
    gm = torch.fx.symbolic_trace(model)
    runner = lower_for_execution(gm)
    assert F.conv1d.__name__ in runner.code and "linear(" in runner.code
    x = torch.randn(1, 2, 9)
    torch.testing.assert_close(runner(x), model(x))


@pytest.mark.parametrize("module", [nn.ReLU(), nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d((2, 3)),
                                    nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten(),
                                    nn.Flatten(0, 2)], ids=repr)
def test_stateless_leaves_become_their_builtin(module):
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Identity(), module))
    runner = lower_for_execution(gm)
    assert 'getattr(self, "1")' not in runner.code
    x = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(runner(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("module", [nn.MaxPool2d(2, return_indices=True), nn.AdaptiveAvgPool2d((None, 2)),
                                    nn.ReLU6()], ids=repr)
def test_other_stateless_leaves_stay_module_calls(module):
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Identity(), module))
    runner = lower_for_execution(gm)
    assert 'getattr(self, "1")' in runner.code
    x = torch.randn(2, 3, 7, 9)
    for got, want in zip(torch.utils._pytree.tree_leaves(runner(x)), torch.utils._pytree.tree_leaves(module(x))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inplace_relu_leaf_stays_in_place():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU(inplace=True)))
    runner = lower_for_execution(gm)
    x = torch.randn(8)
    want = x.clamp(min=0)
    out = runner(x)
    assert out is x and torch.equal(x, want)
