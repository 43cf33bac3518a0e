"""merge_sibling_linears: Linears reading one input become one GEMM on concatenated weights and a view each."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.launches import dispatched_ops
from fxopt.passes import merge_sibling_linears


class QKV(nn.Module):
    """Grouped-query projections as transformers' LlamaAttention writes them (k and v narrower than q)."""

    def __init__(self, d=32, kv=16, bias=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d, bias=bias), nn.Linear(d, kv, bias=bias), nn.Linear(d, kv, bias=bias)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return q.view(*q.shape[:-1], 4, 8).sum(-1), k.relu() * v


def _linears(gm):
    return [n for n in gm.graph.nodes if (n.op == "call_function" and n.target in (F.linear, torch.ops.aten.linear.default))
            or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear))]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 7, 32), (5, 32)])
def test_siblings_become_one_gemm_with_views(bias, shape):
    model, x = QKV(bias=bias).eval(), torch.randn(shape)
    gm = fxopt.capture(model, (x,))
    result = merge_sibling_linears(gm)
    assert result.modified
    gm = result.graph_module
    gm.graph.lint()
    (linear,) = _linears(gm)
    assert getattr(gm, linear.args[1].target).shape == (64, 32)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    assert model.q.weight.shape == (32, 32)  # the model's own parameters are untouched


def test_through_optimize_one_gemm_is_dispatched():
    model, x = QKV().eval(), torch.randn(3, 32)
    opt = fxopt.optimize(model, (x,), strict=True)
    assert {r.name: r for r in opt.records}["merge_sibling_linears"].changes == {"linears_merged": 3}
    assert dispatched_ops(opt, [x])["mm"] == 1
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)


def test_linears_that_cannot_concatenate_stay_apart():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8, bias=False)  # one bias, one not
            self.c = nn.Linear(8, 8)

        def forward(self, x, y):
            return self.a(x) + self.b(x) + self.c(y)  # c reads another input

    x, y = torch.randn(2, 8), torch.randn(2, 8)
    gm = fxopt.capture(Mixed().eval(), (x, y))
    assert not merge_sibling_linears(gm).modified


def test_a_consumer_that_needs_a_contiguous_output_rolls_the_pass_back():
    """``view(-1)`` on a slice of the merged output cannot be a view: eager raises, so verification rolls the pass
    back and the model runs as it did."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x).view(-1) + self.b(x).view(-1)

    model, x = Flat().eval(), torch.randn(3, 8)
    opt = fxopt.optimize(model, (x,))
    record = {r.name: r for r in opt.records}["merge_sibling_linears"]
    assert record.status == "rolled back"
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


def test_the_decoder_step_merges_qkv_and_gate_up_and_decodes_as_eager():
    from fxopt.models.decoder import PRESETS, Decoder, greedy_generate

    torch.manual_seed(0)
    step, eager = Decoder(PRESETS["small"]).eval(), Decoder(PRESETS["small"]).eval()
    eager.load_state_dict(step.state_dict())
    ids = torch.tensor([[3]])
    opt = fxopt.optimize(step, (ids, torch.tensor([0])), strict=True)
    layers = PRESETS["small"].layers
    assert {r.name: r for r in opt.records}["merge_sibling_linears"].changes == {"linears_merged": 5 * layers}
    with torch.no_grad():
        assert greedy_generate(opt, ids, 0, 8) == greedy_generate(eager, ids, 0, 8)


# -- property: any number of siblings, widths, biases and leading dims ---------------------------------------------
# -- NOTE [Sibling convolutions] ----------------------------------------------------------------------------------
class _PixelQKV(nn.Module):
    """A diffusion UNet's attention projections: 1x1 convolutions of one input, read through flatten by bmm."""

    def __init__(self, c=8, bias=True, functional=False, relu=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1, bias=bias) for _ in range(3))
        self.functional, self.relu = functional, relu

    def forward(self, x):
        if self.functional:
            q, k, v = (F.conv2d(x, m.weight, m.bias) for m in (self.q, self.k, self.v))
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if self.relu:  # an elementwise reader: cuDNN's fused ReLU or the bias in its kernel, kept apart
            q, k, v = torch.relu(q), torch.relu(k), torch.relu(v)
        q, k, v = q.flatten(2).transpose(1, 2), k.flatten(2), v.flatten(2).transpose(1, 2)
        return torch.bmm(torch.softmax(torch.bmm(q, k), -1), v)


@pytest.mark.parametrize("bias, functional", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sibling_convolutions_become_one_with_channel_slices(bias, functional, channels_last):
    model = _PixelQKV(bias=bias, functional=functional).eval()
    x = torch.randn(2, 8, 5, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    result = merge_sibling_linears(fxopt.capture(model, [x]))
    assert result.modified
    gm = result.graph_module
    convs = [n for n in gm.graph.nodes if n.target is F.conv2d]
    assert len(convs) == 1 and [n.target for n in convs[0].users] == ["narrow"] * 3
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_sibling_convolutions_read_by_elementwise_ops_stay_apart():
    model, x = _PixelQKV(relu=True).eval(), torch.randn(1, 8, 4, 4)
    assert not merge_sibling_linears(fxopt.capture(model, [x])).modified


def test_through_optimize_the_diffusion_blocks_projections_are_one_convolution():
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "sweep_models.py"
    spec = importlib.util.spec_from_file_location("_horizontal_sweep_models", script)
    sweep = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sweep  # its dataclasses look their module up
    spec.loader.exec_module(sweep)
    model, inputs = sweep.MODELS["diffusion_block_small"].build(1, torch.device("cpu"))
    opt = fxopt.optimize(model.eval(), inputs, strict=True)
    rec = {r.name: r for r in opt.records}["merge_sibling_linears"]
    assert rec.status == "applied" and rec.changes["convs_merged"] == 3
    with torch.no_grad():
        assert fxopt.verify.compare(opt(*inputs), model(*inputs)) is None


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _Siblings(nn.Module):
    def __init__(self, d_in, widths, bias):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d_in, w, bias=bias) for w in widths)

    def forward(self, x):
        return tuple(layer(x) * (i + 1) for i, layer in enumerate(self.layers))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d_in=st.integers(1, 12), widths=st.lists(st.integers(1, 20), min_size=2, max_size=4), bias=st.booleans(),
       lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), seed=st.integers(0, 2 ** 16))
def test_merged_siblings_match_eager_for_any_widths(d_in, widths, bias, lead, seed):
    torch.manual_seed(seed)
    model, x = _Siblings(d_in, widths, bias).eval(), torch.randn(*lead, 3, d_in)
    result = merge_sibling_linears(fxopt.capture(model, (x,)))
    assert result.modified
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-5)
