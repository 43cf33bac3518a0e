"""split_k_linears (NOTE [Split-K linears], fxopt/passes/split_k.py): the rewrite on the CPU with a stand-in timer
(which split wins is the device's measurement; here the timer says), the sum joined to the tail's kernel, what it
leaves alone, and on a GPU the measured choice inside CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.passes import Pass, build_pipeline, default_pipeline
from tests.passes.gemm_pipeline import pipeline_with
from fxopt.passes.split_k import SplitKLinears, _splits


class Mlp(nn.Module):  # a ViT block's second half: LayerNorm, fc1 + GELU (cuBLASLt's epilogue), fc2, residual
    def __init__(self, c=256, hidden=512):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.scale = nn.Parameter(torch.rand(hidden))

    def forward(self, x):
        h = self.fc1(self.norm(x)) * self.scale  # the scale keeps fc1 out of cuBLASLt's GELU epilogue
        return x + self.fc2(F.gelu(h))


class Conv1DMlp(nn.Module):  # transformers' GPT-2 Conv1D: addmm on a [K, N] weight, then a view back
    def __init__(self, c=64, hidden=384):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(c, hidden) / c ** 0.5), nn.Parameter(torch.randn(hidden))
        self.w2, self.b2 = nn.Parameter(torch.randn(hidden, c) / hidden ** 0.5), nn.Parameter(torch.randn(c))

    def forward(self, x):
        h = torch.addmm(self.b1, x.view(-1, x.size(-1)), self.w1).view(*x.shape[:-1], -1)
        h = F.gelu(h, approximate="tanh")
        return torch.addmm(self.b2, h.view(-1, h.size(-1)), self.w2).view(x.shape) * 0.5


def _timer(prefer: int | None, calls: list):
    """µs of one GEMM (10), then of each split: ``prefer`` at 5, the others at 12 (None: none wins)."""
    def timer(device, M, K, N, dtype):
        calls.append((M, K, N, dtype))
        return (10.0, *[5.0 if s == prefer else 12.0 for s in _splits(K, dtype)])
    return timer


def _pipeline(split_k=None):
    return pipeline_with(*([Pass("split_k_linears", split_k)] if split_k is not None else []))


def _fused_calls(opt) -> int:
    return opt.graph_module.code.count("fxopt.fused")


@pytest.mark.parametrize("prefer", [2, 4])
def test_split_linears_compute_eagers_result_with_no_kernel_more(prefer):
    dtype = torch.float32
    model = Mlp().eval().to(dtype)
    x = torch.randn(1, 50, 256, dtype=dtype)
    calls = []
    split = SplitKLinears(graphs_only=False, devices=("cpu",), timer=_timer(prefer, calls))
    opt = fxopt.optimize(model, (x,), passes=_pipeline(split), strict=True)
    record = next(r for r in opt.records if r.name == "split_k_linears")
    assert record.changes == {"linears": 2}, record.notes
    assert sorted(calls) == [(50, 256, 512, dtype), (50, 512, 256, dtype)]
    code = opt.graph_module.code
    assert code.count("torch.bmm") == 2 and f"view(50, {prefer}, " in code
    plain = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    assert _fused_calls(opt) == _fused_calls(plain)  # the partial sums joined the tails' kernels
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)
        y = torch.randn(1, 50, 256, dtype=dtype)  # another input of the signature
        torch.testing.assert_close(opt(y), model(y), atol=1e-5, rtol=1e-5)


def test_16_bit_linears_stay_one_gemm():
    """Each 16-bit partial product would be rounded before the sum, where one GEMM rounds once."""
    model, x = Mlp().eval().to(torch.bfloat16), torch.randn(1, 50, 256, dtype=torch.bfloat16)
    calls = []
    split = SplitKLinears(graphs_only=False, devices=("cpu",), timer=_timer(2, calls))
    opt = fxopt.optimize(model, (x,), passes=_pipeline(split), strict=True)
    assert next(r for r in opt.records if r.name == "split_k_linears").status == "unchanged" and not calls


def test_a_gemm_through_a_reshape_as_transformers_conv1d_splits():
    model, x = Conv1DMlp().eval(), torch.randn(2, 24, 64)
    split = SplitKLinears(graphs_only=False, devices=("cpu",), timer=_timer(3, []))
    opt = fxopt.optimize(model, (x,), passes=_pipeline(split), strict=True)
    record = next(r for r in opt.records if r.name == "split_k_linears")
    assert record.changes == {"linears": 1}  # the second GEMM: K = 384 in three slices; the first has K = 64
    assert any("K in 3 slices" in n for n in record.notes)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


def test_no_faster_split_without_graphs_or_without_an_elementwise_reader_leaves_the_graph():
    model, x = Mlp().eval(), torch.randn(1, 50, 256)
    slower = SplitKLinears(graphs_only=False, devices=("cpu",), timer=_timer(None, []))
    record = next(r for r in fxopt.optimize(model, (x,), passes=_pipeline(slower), strict=True).records
                  if r.name == "split_k_linears")
    assert record.status == "unchanged" and record.changes == {"kept_one_gemm": 2}
    assert any("stays one GEMM" in n and "2 slices 12.00" in n for n in record.notes)

    calls = []
    graphs_only = SplitKLinears(devices=("cpu",), timer=_timer(2, calls))  # optimize(cuda_graphs=False)
    record = next(r for r in fxopt.optimize(model, (x,), passes=_pipeline(graphs_only), strict=True).records
                  if r.name == "split_k_linears")
    assert record.status == "unchanged" and not calls and any("without CUDA graphs" in n for n in record.notes)
    with_graphs = fxopt.optimize(model, (x,), passes=_pipeline(graphs_only), cuda_graphs=True, strict=True)
    assert next(r for r in with_graphs.records if r.name == "split_k_linears").changes == {"linears": 2}

    class Projection(nn.Module):  # q/k/v: read by a permute and SDPA, not an elementwise op
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(256, 768, bias=False)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, 50, 3, 4, 64).permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q, k, v)

    calls = []
    split = SplitKLinears(graphs_only=False, devices=("cpu",), timer=_timer(2, calls))
    opt = fxopt.optimize(Projection().eval(), (x,), passes=_pipeline(split), strict=True)
    assert next(r for r in opt.records if r.name == "split_k_linears").status == "unchanged" and not calls


def test_the_pass_is_opt_in_runs_before_the_fusions_and_leaves_cpu_graphs():
    names = [p.name for p in build_pipeline(None, "cpp", ["split_k_linears", "parallel_branches"])]
    assert "split_k_linears" not in [p.name for p in default_pipeline("cpp")]
    assert names.index("split_k_linears") == names.index("fuse_epilogues") + 1 and names[-1] == "parallel_branches"
    model, x = Mlp().eval(), torch.randn(1, 50, 256)
    opt = fxopt.optimize(model, (x,), backend="cpp", cuda_graphs=True, enable=["split_k_linears"])
    assert next(r for r in opt.records if r.name == "split_k_linears").status == "unchanged"


@pytest.mark.cuda
@pytest.mark.parametrize("forced", [False, True], ids=["measured", "forced"])
def test_on_cuda_with_graphs_the_split_computes_eagers_result(forced, monkeypatch):
    """DeiT-S's MLP at batch 1 (197 rows): each GEMM timed (a note with the times); forced, every candidate splits."""
    from fxopt.passes import split_k

    if forced:
        monkeypatch.setattr(split_k, "MIN_GAIN", 1e9)
    model = Mlp(384, 1536).eval().cuda()
    x = torch.randn(1, 197, 384, device="cuda")
    opt = fxopt.optimize(model, (x,), cuda_graphs=True, enable=["split_k_linears"], strict=True)
    record = next(r for r in opt.records if r.name == "split_k_linears")
    assert len(record.notes) == 2 and all("µs" in n for n in record.notes), record.notes
    if forced:
        assert record.changes.get("linears") == 2
    with torch.no_grad():
        for _ in range(3):
            y = torch.randn_like(x)
            torch.testing.assert_close(opt(y), model(y), atol=1e-4, rtol=1e-4)
