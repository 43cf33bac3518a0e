"""move_scales_past_matmuls: ``(x * s) @ y`` -> ``(x @ y) * s`` where the product's readers are fused (NOTE [Scales
after matmuls])."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import fxopt


def _only_this_pass(model, *inputs):
    opt = fxopt.optimize(model, inputs, passes=["move_scales_past_matmuls"])
    return opt, opt.records[0]


def _scales_before_matmuls(opt) -> int:
    """Matmul operands that are a scalar multiplication or division."""
    count = 0
    for n in opt.graph_module.graph.nodes:
        if n.op == "call_function" and n.target in (operator.matmul, torch.matmul):
            count += sum(isinstance(a, torch.fx.Node) and a.target in (operator.mul, operator.truediv) for a in n.args)
    return count


class _Scores(nn.Module):
    def __init__(self, spelling: str, side: int):
        super().__init__()
        self.spelling, self.side = spelling, side

    def forward(self, q, k, bias):
        kt = k.transpose(-2, -1)
        if self.side == 0:
            q = q * 0.125 if self.spelling == "mul" else q / 8 if self.spelling == "div" else 0.125 * q
        else:
            kt = kt * 0.125 if self.spelling == "mul" else kt / 8 if self.spelling == "div" else 0.125 * kt
        return (q @ kt + bias).softmax(-1)


@pytest.mark.parametrize("side", [0, 1], ids=["q", "k"])
@pytest.mark.parametrize("spelling", ["mul", "div", "rmul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_scale_moves_onto_the_product(spelling, side, dtype):
    torch.manual_seed(0)
    q, k, bias = (torch.randn(2, 3, 5, 8, dtype=dtype), torch.randn(2, 3, 7, 8, dtype=dtype),
                  torch.randn(1, 3, 5, 7, dtype=dtype))
    model = _Scores(spelling, side)
    opt, record = _only_this_pass(model, q, k, bias)
    assert record.status == "applied" and record.changes == {"scales_moved": 1}
    assert _scales_before_matmuls(opt) == 0
    torch.testing.assert_close(opt(q, k, bias), model(q, k, bias))


class _ProductReturned(nn.Module):
    def forward(self, q, k):
        return (q * 0.5) @ k.transpose(-2, -1)


class _ScaledReadTwice(nn.Module):
    def forward(self, q, k):
        s = q * 0.5
        return ((s @ k.transpose(-2, -1)).softmax(-1), s)


class _ProductIntoMatmul(nn.Module):
    def forward(self, q, k, v):
        return ((q * 0.5) @ k.transpose(-2, -1)) @ v


@pytest.mark.parametrize("model, count", [(_ProductReturned(), 2), (_ScaledReadTwice(), 2), (_ProductIntoMatmul(), 3)],
                         ids=["product-returned", "scaled-read-twice", "product-into-a-matmul"])
def test_left_alone_where_the_scale_would_not_join_a_kernel(model, count):
    inputs = [torch.randn(2, 4, 6) for _ in range(count)]
    opt, record = _only_this_pass(model, *inputs)
    assert record.status == "unchanged"


def test_a_tensor_scale_that_broadcasts_is_not_a_scale():
    class Broadcast(nn.Module):
        def forward(self, q, k, s):
            return ((q * s) @ k.transpose(-2, -1)).softmax(-1)

    q, k, s = torch.randn(2, 4, 6), torch.randn(2, 5, 6), torch.randn(6)
    opt, record = _only_this_pass(Broadcast(), q, k, s)
    assert record.status == "unchanged"


class _ShiftedWindows(nn.Module):
    """Swin's shifted-window attention as timm writes it: the scale on q, a bias, and a window mask added through a
    reshape sandwich (collapse_views turns it into ``mask.expand_as(scores.view(...)).reshape_as(scores)``, which
    read the scores' shape only); the attention weights are returned too, so rewrite_attention keeps it as written."""

    def __init__(self, windows=4, heads=2, tokens=9, dim=16):
        super().__init__()
        self.windows, self.heads = windows, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("bias", torch.randn(heads, tokens, tokens))
        self.register_buffer("mask", torch.randn(windows, tokens, tokens))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * 0.25) @ k.transpose(-2, -1)
        attn = attn + self.bias.unsqueeze(0)
        attn = attn.view(-1, self.windows, self.heads, N, N) + self.mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.heads, N, N).softmax(-1)
        return (attn @ v).transpose(1, 2).reshape(B, N, C), attn


def test_swin_shifted_windows_in_the_default_pipeline():
    """The moved scale joins the softmax's row kernel (readers of the scores' shape stay on the matmul): one op less
    than with the pass off, outputs unchanged."""
    torch.manual_seed(0)
    model = _ShiftedWindows().eval()
    x = torch.randn(8, 9, 16)
    on = fxopt.optimize(model, (x,))
    off = fxopt.optimize(model, (x,), disable=["move_scales_past_matmuls"])
    record = next(r for r in on.records if r.name == "move_scales_past_matmuls")
    assert record.status == "applied", [(r.name, r.status, r.notes[:2]) for r in on.records]
    assert on.records[-1].dispatched_after == off.records[-1].dispatched_after - 1
    for got, want in zip(on(x), model(x)):
        torch.testing.assert_close(got, want)
