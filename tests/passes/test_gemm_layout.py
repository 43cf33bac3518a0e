"""gemm_weight_layouts (NOTE [GEMM weight layouts], fxopt/passes/gemm_layout.py): on the CPU with a
stand-in timer (the device's measurement decides which layout wins; here the timer says), both directions of the
rewrite against eager, what it leaves alone, its place in the pipeline; on a GPU the measured choice inside CUDA
graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.passes import Pass, build_pipeline, default_pipeline
from tests.passes.gemm_pipeline import pipeline_with
from fxopt.passes.gemm_layout import GemmWeightLayouts


class Attention(nn.Module):  # timm's: the q/k/v projection keeps its bias (a reshape and a permute read it)
    def __init__(self, c=64, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        return self.proj(y)  # the graph's output: no elementwise reader, the bias stays too


class Conv1DAttention(nn.Module):  # transformers' GPT-2 c_attn: addmm on a [K, N] weight, then a view and a split
    def __init__(self, c=64):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(c, 3 * c) / c ** 0.5), nn.Parameter(torch.randn(3 * c))

    def forward(self, x):
        qkv = torch.addmm(self.b, x.view(-1, x.size(-1)), self.w).view(*x.shape[:-1], -1)
        q, k, v = qkv.split(x.size(-1), dim=-1)
        return torch.cat([q, k], -1) @ torch.cat([v, v], -1).transpose(-1, -2)


class ScaledMlp(nn.Module):  # elementwise ops read both Linears: their biases move into the tails, the GEMMs are bias-free
    def __init__(self, c=64, hidden=128):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.s1, self.s2 = nn.Parameter(torch.rand(hidden)), nn.Parameter(torch.rand(c))

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x) * self.s1)) * self.s2


def _timer(faster: str | None, calls: list):
    """(µs as F.linear, µs on [K, N]): ``faster`` at 5, the other at 10 (None: both 10)."""
    def timer(device, M, K, N, dtype, bias):
        calls.append((M, K, N, dtype, bias))
        return (5.0 if faster == "linear" else 10.0, 5.0 if faster == "addmm" else 10.0)
    return timer


def _pipeline(layouts=None):
    return pipeline_with(*([Pass("gemm_weight_layouts", layouts)] if layouts is not None else []))


def _record(opt):
    return next(r for r in opt.records if r.name == "gemm_weight_layouts")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_biased_linears_take_the_faster_layout_with_eagers_result(dtype):
    model, x = Attention().eval().to(dtype), torch.randn(2, 10, 64, dtype=dtype)
    calls = []
    opt = fxopt.optimize(model, (x,), strict=True,
                         passes=_pipeline(GemmWeightLayouts(graphs_only=False, devices=("cpu",),
                                                            timer=_timer("addmm", calls))))
    assert _record(opt).changes == {"gemms": 2}, _record(opt).notes
    assert sorted(calls) == [(20, 64, 64, dtype, True), (20, 64, 192, dtype, True)]
    assert opt.graph_module.code.count("torch.addmm") == 2 and "linear" not in opt.graph_module.code
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for inp in (x, torch.randn(2, 10, 64, dtype=dtype)):
            torch.testing.assert_close(opt(inp), model(inp), atol=tol, rtol=tol)


def test_an_addmm_on_a_k_by_n_weight_becomes_flinear_where_that_is_faster():
    model, x = Conv1DAttention().eval(), torch.randn(1, 12, 64)
    opt = fxopt.optimize(model, (x,), strict=True,
                         passes=_pipeline(GemmWeightLayouts(graphs_only=False, devices=("cpu",),
                                                            timer=_timer("linear", []))))
    assert _record(opt).changes == {"gemms": 1}
    assert any("-> F.linear" in n for n in _record(opt).notes)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


def test_no_faster_layout_without_graphs_or_without_a_bias_leaves_the_graph():
    model, x = Attention().eval(), torch.randn(2, 10, 64)
    same = GemmWeightLayouts(graphs_only=False, devices=("cpu",), timer=_timer(None, []))
    record = _record(fxopt.optimize(model, (x,), passes=_pipeline(same), strict=True))
    assert record.status == "unchanged" and record.changes == {"kept_layout": 2}
    assert all("keeps its layout" in n and "F.linear 10.00 µs" in n for n in record.notes)

    calls = []
    graphs_only = GemmWeightLayouts(devices=("cpu",), timer=_timer("addmm", calls))  # cuda_graphs=False
    record = _record(fxopt.optimize(model, (x,), passes=_pipeline(graphs_only), strict=True))
    assert record.status == "unchanged" and not calls and any("without CUDA graphs" in n for n in record.notes)
    opt = fxopt.optimize(model, (x,), passes=_pipeline(graphs_only), cuda_graphs=True, strict=True)
    assert _record(opt).changes == {"gemms": 2}



def test_bias_free_linears_take_mm_on_the_transposed_weight_where_faster():
    model, x = ScaledMlp().eval(), torch.randn(2, 8, 64)
    calls = []
    layouts = GemmWeightLayouts(graphs_only=False, devices=("cpu",), timer=_timer("addmm", calls))
    opt = fxopt.optimize(model, (x,), passes=_pipeline(layouts), strict=True)
    assert _record(opt).changes == {"gemms": 2} and sorted(calls) == [(16, 64, 128, torch.float32, False),
                                                                      (16, 128, 64, torch.float32, False)]
    assert opt.graph_module.code.count("torch.mm(") == 2
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)
    few = torch.randn(1, 4, 64)  # 4 rows: few_row_linears' GEMV territory, not timed here
    calls.clear()
    fxopt.optimize(model, (few,), passes=_pipeline(layouts), strict=True)
    assert not calls


def test_the_pass_is_opt_in_and_runs_before_the_fusions():
    names = [p.name for p in build_pipeline(None, "cpp", ["gemm_weight_layouts", "split_k_linears"])]
    assert "gemm_weight_layouts" not in [p.name for p in default_pipeline("cpp")]
    position = names.index("fuse_epilogues")
    assert set(names[position + 1: position + 3]) == {"gemm_weight_layouts", "split_k_linears"}
    assert names.index("fuse_elementwise") > position + 2


@pytest.mark.cuda
@pytest.mark.parametrize("forced", [False, True], ids=["measured", "forced"])
def test_on_cuda_with_graphs_the_layout_computes_eagers_result(forced, monkeypatch):
    """ViT-B's attention at batch 1 (197 rows): both GEMMs (biased: no elementwise reader) timed (notes with both times); forced, both take
    the other layout."""
    from fxopt.passes import gemm_layout

    if forced:
        monkeypatch.setattr(gemm_layout, "MIN_GAIN", 1e9)
    model = Attention(768, 12).eval().cuda()
    x = torch.randn(1, 197, 768, device="cuda")
    # tf32x3_linears (on by default with graphs) would take these float32 GEMMs first
    opt = fxopt.optimize(model, (x,), cuda_graphs=True, enable=["gemm_weight_layouts"], disable=["tf32x3_linears"],
                         strict=True)
    record = _record(opt)
    assert len(record.notes) == 2 and all("µs" in n for n in record.notes), record.notes
    if forced:
        assert record.changes.get("gemms") == 2
    with torch.no_grad():
        for _ in range(3):
            y = torch.randn_like(x)
            torch.testing.assert_close(opt(y), model(y), atol=1e-4, rtol=1e-4)


def test_with_split_k_linears_after_it_the_two_compose():
    from fxopt.passes.split_k import SplitKLinears, _splits

    model, x = ScaledMlp(256, 512).eval(), torch.randn(1, 20, 256)
    split_calls = []

    def split_timer(device, M, K, N, dtype):
        split_calls.append((M, K, N))
        return (10.0, *[5.0 for _ in _splits(K, dtype)])

    passes = pipeline_with(
        Pass("gemm_weight_layouts", GemmWeightLayouts(graphs_only=False, devices=("cpu",), timer=_timer("addmm", []))),
        Pass("split_k_linears", SplitKLinears(graphs_only=False, devices=("cpu",), timer=split_timer)))
    opt = fxopt.optimize(model, (x,), passes=passes, strict=True)
    assert _record(opt).changes == {"gemms": 2}
    assert next(r for r in opt.records if r.name == "split_k_linears").changes == {"linears": 2}
    assert sorted(split_calls) == [(20, 256, 512), (20, 512, 256)]  # the mm forms, through their views
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_chain_of_linears_each_reading_the_one_rewritten_before():
    """Found by the fuzz generator (seed 7700003): each candidate is matched again when its turn comes, on the
    input the previous rewrite left, whose shape it carries."""
    model = nn.Sequential(nn.Linear(4, 7), nn.Linear(7, 13), nn.Linear(13, 7)).eval()
    x = torch.randn(3, 4, 5, 4)
    opt = fxopt.optimize(model, (x,), strict=True,
                         passes=_pipeline(GemmWeightLayouts(graphs_only=False, devices=("cpu",),
                                                            timer=_timer("addmm", []))))
    assert _record(opt).changes == {"gemms": 3}
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)
