"""Layout passes: to_channels_last's CPU side is in test_epilogue.py; here NOTE [Float32 convolutions in NCHW]
(convs_in_nchw). On the CPU the pass is tried on graphs whose values say they live on CUDA (it reads the recorded
device only); the rewritten graph runs on the CPU, where a copy is a copy. The GPU test counts cuDNN's kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.passes import convs_in_nchw

CUDA = torch.device("cuda")


class _Downsample(nn.Module):
    """ConvNeXt's downsampling: LayerNorm2d (a LayerNorm over channels, permuted there and back: a channels-last
    view) and a 2x2 convolution of stride 2; ``depthwise`` adds the next block's 7x7 depthwise convolution."""

    def __init__(self, c=8, out=16, depthwise=False):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.conv = nn.Conv2d(c, out, 2, stride=2)
        self.dw = nn.Conv2d(out, out, 7, padding=3, groups=out) if depthwise else nn.Identity()

    def forward(self, x):
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.dw(self.conv(x))


def _as_if_on_cuda(gm):
    for node in gm.graph.nodes:
        if "device" in node.meta:
            node.meta["device"] = CUDA
    return gm


def _rewritten(model, x, tf32=False, monkeypatch=None):
    gm = _as_if_on_cuda(fxopt.capture(model.eval(), [x]))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    return gm, convs_in_nchw(gm)


def _methods(gm):
    return [(n.target, dict(n.kwargs)) for n in gm.graph.nodes if n.op == "call_method"]


def test_cpu_graphs_are_left_alone():
    model, x = _Downsample(), torch.randn(2, 8, 6, 6)
    assert not convs_in_nchw(fxopt.capture(model.eval(), [x])).modified


def test_a_convolution_on_a_channels_last_view_runs_in_nchw_and_hands_back_eagers_layout(monkeypatch):
    model, x = _Downsample(depthwise=True), torch.randn(2, 8, 6, 6)
    gm, result = _rewritten(model, x, monkeypatch=monkeypatch)
    assert result.modified
    assert _methods(gm).count(("contiguous", {})) == 1  # the input, once
    assert _methods(gm).count(("contiguous", {"memory_format": torch.channels_last})) == 1  # the output, back
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert conv.args[0].target == "contiguous"  # the depthwise one (7x7, groups = channels) is not rewritten
    with torch.no_grad():
        out, ref = gm(x), model(x)
    torch.testing.assert_close(out, ref)
    assert out.stride() == ref.stride()


def test_tf32_and_nchw_inputs_keep_the_graph(monkeypatch):
    model = _Downsample()
    assert not _rewritten(model, torch.randn(2, 8, 6, 6), tf32=True, monkeypatch=monkeypatch)[1].modified

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3)

        def forward(self, x):
            return self.conv(x)

    assert not _rewritten(Plain(), torch.randn(2, 8, 6, 6), monkeypatch=monkeypatch)[1].modified


def test_a_channels_last_weight_gets_an_nchw_twin_and_the_users_module_keeps_its_own(monkeypatch):
    """A user's model moved to channels-last as a whole, in float32: its convolution weights are channels-last,
    which makes PyTorch ask cuDNN for NHWC even for an NCHW input."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, padding=1)
            self.w = nn.Parameter(torch.randn(16, 16, 3, 3))

        def forward(self, x):
            return F.conv2d(torch.relu(self.conv(x)), self.w, padding=1)

    model = M().to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 8, 5, 5)
    gm, result = _rewritten(model, x, monkeypatch=monkeypatch)
    assert result.modified
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)  # the user's module is untouched
    from fxopt.passes.fold import get_attr

    used = [gm.get_submodule(n.target).weight if n.op == "call_module" else get_attr(gm, n.args[1].target)
            for n in gm.graph.nodes if n.op == "call_module" or n.target is F.conv2d]
    assert len(used) == 2 and all(w.is_contiguous() for w in used)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.cuda
def test_on_cuda_a_downsampling_convolution_takes_no_transposes(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = _Downsample(c=96, out=192, depthwise=True).to(CUDA).eval()
    x = torch.randn(1, 96, 56, 56, device=CUDA)
    opt = fxopt.optimize(model, (x,), strict=True)
    assert {r.name: r for r in opt.records}["convs_in_nchw"].status == "applied"
    with torch.no_grad():
        out, ref = opt(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert out.stride() == ref.stride()
    eager = fxopt.count_launches(model, (x,)).cuda_kernels_by_name
    ours = fxopt.count_launches(opt, (x,)).cuda_kernels_by_name
    assert any("nhwcToNchw" in k for k in eager), eager  # what the rule is for: cuDNN's transposes in eager
    assert not any("nhwcToNchw" in k or "nchwToNhwc" in k for k in ours), ours
    assert sum(ours.values()) < sum(eager.values())


# -- NOTE [Reshapes of channels-last values] (to_channels_last) ----------------------------------------------------
class _PixelAttention(nn.Module):
    """A diffusion UNet's spatial attention, written by hand: 1x1 q/k/v projections flattened over the pixels, and
    a GroupNorm's reshapes; ``strict`` reads k through ``view``s instead (a view that needs eager's layout)."""

    def __init__(self, c=16, strict=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Conv2d(c, c, 1) for _ in range(4))
        self.strict = strict

    def forward(self, x):
        n, c, h, w = x.shape
        g = x.reshape(n, 4, -1).mean(-1)  # not a view of a channels-last x: reshape copies, as contiguous() did
        xn = (x.reshape(n, 4, c // 4, h * w) - g[:, :, None, None]).reshape(x.shape)  # a view of it
        q = self.q(xn).flatten(2).transpose(1, 2)
        k = self.k(xn).view(n, c, h * w) * 1.0 if self.strict else self.k(xn).flatten(2)
        if self.strict:
            k = k.view(n, c // 2, 2, h * w).flatten(1, 2)  # a strict view two ops later
        v = self.v(xn).flatten(2).transpose(1, 2)
        attn = torch.softmax(torch.bmm(q, k) * c ** -0.5, -1)
        out = torch.bmm(attn, v)
        return x + self.o(out.transpose(1, 2).reshape(x.shape)), out


def _contiguous_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "contiguous" and not n.kwargs]


@pytest.mark.parametrize("strict", [False, True])
def test_reshapes_take_channels_last_values_without_a_copy(monkeypatch, strict):
    from fxopt.passes import to_channels_last

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # float32 convolutions count as tensor-core ones
    model, x = _PixelAttention(strict=strict).eval(), torch.randn(2, 16, 6, 5)
    gm = _as_if_on_cuda(fxopt.capture(model, [x]))
    result = to_channels_last(gm)
    assert result.modified
    copies = _contiguous_calls(gm)
    # the two graph outputs (free when contiguous); strict: the k projection's view needs eager's layout
    assert len(copies) == 2 + strict
    outputs = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes
    assert all(c in outputs for c in copies[:2]) or strict
    with torch.no_grad():
        got, ref = gm(x), model(x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.stride() == b.stride()  # outputs in eager's layout
