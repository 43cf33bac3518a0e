"""fuse_reductions on the CUDA backend (NVRTC): numerics against eager, fp16/bf16, long and short rows, many rows,
launch configuration, CUDA graph capture and replay. Run on the GPU machine: python -m pytest -m cuda."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import ops
from fxopt.launches import dispatched_ops
from fxopt.passes import Pass, base
from fxopt.passes.fuse_reductions import fuse_reductions
from fxopt.runtime.kernel import KERNELS, fused_op
from fxopt.runtime.rowwise import RowwiseKernel
from fxopt.verify import compare

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
KINDS = ["softmax", "log_softmax", "layer_norm", "rms_norm", "sum", "mean", "amax"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _fuse(model, inputs, **options):
    model = model.eval()
    gm = fxopt.capture(model, inputs)
    with base._collect("fuse_reductions") as plog:
        result = fuse_reductions("cuda", **options)(gm)
    gm = result.graph_module
    gm.recompile()
    return gm, plog


def _kernels(gm):
    return [KERNELS[n.args[0]] for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_op]


def _assert_matches(gm, model, inputs):
    with torch.no_grad():
        mismatch = compare(gm(*inputs), model(*inputs))
    torch.cuda.synchronize()
    assert mismatch is None, str(mismatch)


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)


class Kind(nn.Module):
    def __init__(self, kind: str, n: int):
        super().__init__()
        self.kind, self.n = kind, n
        self.weight = nn.Parameter(torch.randn(n))
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x, r):
        h = x * 0.5 + r
        if self.kind == "softmax":
            y = torch.softmax(h, -1)
        elif self.kind == "log_softmax":
            y = F.log_softmax(h, dim=-1)
        elif self.kind == "layer_norm":
            y = F.layer_norm(h, (self.n,), self.weight, self.bias)
        elif self.kind == "rms_norm":
            y = F.rms_norm(h, (self.n,), self.weight, 1e-6)
        elif self.kind == "sum":
            y = h.sum(-1, keepdim=True) * 0.01
        elif self.kind == "mean":
            y = h.mean(dim=-1, keepdim=True)
        else:
            y = h.amax(-1, keepdim=True)
        return torch.tanh(y) * 2 - r


class ResidualNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x, residual):
        h = x + residual
        return self.norm(h), h


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_kind_on_cuda(kind, dtype):
    model = Kind(kind, 384).to(DEVICE, dtype)
    inputs = [_randn(4, 33, 384, dtype=dtype, seed=1), _randn(4, 33, 384, dtype=dtype, seed=2)]
    gm, plog = _fuse(model, inputs)
    assert plog.counts["groups"] == 1
    (kernel,) = _kernels(gm)
    assert isinstance(kernel, RowwiseKernel) and kernel.backend == "cuda"
    assert dict(dispatched_ops(gm, inputs)) == {"fxopt.fused.default": 1}
    _assert_matches(gm, model, inputs)


@pytest.mark.parametrize("n", [1, 7, 32, 33, 1000, 4096, 16384, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_row_lengths_on_cuda(n, dtype):
    for model in (ResidualNorm(n), Kind("softmax", n), Kind("sum", n)):
        model = model.to(DEVICE, dtype)
        inputs = [_randn(3, 5, n, dtype=dtype, seed=3), _randn(3, 5, n, dtype=dtype, seed=4)]
        gm, _ = _fuse(model, inputs)
        assert len(_kernels(gm)) == 1
        _assert_matches(gm, model, inputs)
        _assert_matches(gm, model, [_randn(1, 2, n, dtype=dtype), _randn(1, 2, n, dtype=dtype)])  # other batch


def test_launch_configuration():
    short, long_ = ResidualNorm(7).to(DEVICE), ResidualNorm(16384).to(DEVICE)
    inputs_s, inputs_l = [_randn(64, 7), _randn(64, 7)], [_randn(2, 16384), _randn(2, 16384)]
    gm_s, _ = _fuse(short, inputs_s)
    gm_l, _ = _fuse(long_, inputs_l)
    gm_s(*inputs_s), gm_l(*inputs_l)  # a plan is made at the first call
    (ks,), (kl,) = _kernels(gm_s), _kernels(gm_l)
    # one shape-generic kernel may serve both models: each call's plan is the latest one made
    plan_s, plan_l = list(ks._plans.values())[0], list(kl._plans.values())[-1]
    assert plan_s.block == (32, 8)  # one warp per row, 8 rows per block
    assert plan_l.block[1] == 1 and plan_l.block[0] >= 256  # one block per row
    assert plan_l.block[0] <= kl._max_threads


def test_many_rows_grid_stride():
    """More rows than blocks launched: every block loops over rows."""
    model = Kind("layer_norm", 7).to(DEVICE)
    inputs = [_randn(300_000, 7), _randn(300_000, 7)]
    gm, _ = _fuse(model, inputs)
    gm(*inputs)  # a plan is made at the first call
    (kernel,) = _kernels(gm)
    plan = next(iter(kernel._plans.values()))
    assert plan.grid * plan.block[1] < 300_000
    _assert_matches(gm, model, inputs)


def test_long_rows_fp16_softmax_and_layer_norm():
    x = _randn(8, 16384, dtype=torch.float16) * 4
    for model in (nn.Sequential(nn.Softmax(-1)), nn.Sequential(nn.LayerNorm(16384))):
        model = model.to(DEVICE, torch.float16)
        gm, _ = _fuse(model, [x])
        assert len(_kernels(gm)) == 1
        _assert_matches(gm, model, [x])


def test_attention_softmax_with_mask_on_cuda():
    class M(nn.Module):
        def forward(self, q, k, mask):
            return torch.softmax((q @ k.transpose(-2, -1)) * 0.125 + mask, dim=-1)

    q, k = _randn(2, 8, 128, 64, dtype=torch.float16), _randn(2, 8, 128, 64, dtype=torch.float16, seed=5)
    mask = torch.triu(torch.full((128, 128), float("-inf"), device=DEVICE), 1).half()
    gm, _ = _fuse(M(), [q, k, mask])
    (kernel,) = _kernels(gm)
    assert kernel.op_names == ["mul", "add", "softmax"]
    _assert_matches(gm, M(), [q, k, mask])


def test_non_contiguous_inputs_and_nan_rows_on_cuda():
    model = Kind("layer_norm", 64).to(DEVICE)
    x, r = _randn(4, 8, 64), _randn(4, 8, 64)
    gm, _ = _fuse(model, [x, r])
    _assert_matches(gm, model, [_randn(4, 64, 8).transpose(-1, -2), r])
    _assert_matches(gm, model, [_randn(1, 8, 64).expand(4, 8, 64), r])

    class M(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1), x.amax(-1)

    inf, nan = float("inf"), float("nan")
    y = torch.tensor([[1.0, nan, 2.0], [-inf, -inf, -inf], [inf, 1.0, 2.0]], device=DEVICE)
    gm, _ = _fuse(M(), [y])
    _assert_matches(gm, M(), [y])


@pytest.mark.parametrize("c, hw", [(96, 56), (768, 7), (4096, 3)])  # rows in registers; 4096: the loop over memory
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_over_channels_reads_the_permuted_rows_in_place(c, hw, dtype):
    """ConvNeXt's LayerNorm over the channels of NCHW (NOTE [Strided rows]): one kernel, no copy before it, eager's
    result; the same kernel then called with a broadcast (stride-0) and a transposed input."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(c)

        def forward(self, x):
            return F.gelu(self.norm(x.permute(0, 2, 3, 1)))

    model = M().to(DEVICE, dtype)
    nn.init.normal_(model.norm.weight), nn.init.normal_(model.norm.bias)
    x = _randn(2, c, hw, hw).to(dtype)
    gm, _ = _fuse(model, [x])
    (kernel,) = _kernels(gm)
    _assert_matches(gm, model, [x])
    _assert_matches(gm, model, [_randn(2, c, 1, 1).to(dtype).expand(2, c, hw, hw)])
    _assert_matches(gm, model, [_randn(2, c, hw, hw).to(dtype).transpose(2, 3)])
    assert all(plan.fixes is None for plan in kernel._plans.values())


@pytest.mark.parametrize("n, c, hw", [(1, 32, 112), (1, 672, 14), (4, 96, 7), (2, 1152, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_squeeze_stores_the_silu_channels_last_on_cuda(n, c, hw, dtype):
    """NOTE [Outputs in eager's layout] on CUDA: an EfficientNet SE block's SiLU + squeeze are one kernel over the
    channels-last input (no copy), the SiLU stored channels-last as eager's, the result eager's."""
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c, 1)

        def forward(self, x):
            h = F.silu(x)
            g = torch.sigmoid(self.fc2(F.silu(self.fc1(h.mean((2, 3), keepdim=True)))))
            return h * g

    model = SE().to(DEVICE, dtype).to(memory_format=torch.channels_last)
    x = _randn(n, c, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
    gm, plog = _fuse(model, [x])
    (kernel,) = [k for k in _kernels(gm) if k.program.row_dims == 2]
    silu, mean = kernel([x])
    assert silu.stride() == F.silu(x).stride()
    torch.testing.assert_close(silu, F.silu(x))
    torch.testing.assert_close(mean, F.silu(x).mean((2, 3), keepdim=True), rtol=2e-3, atol=2e-3)
    assert all(plan.fixes is None for plan in kernel._plans.values())
    _assert_matches(gm, model, [x])


def test_cuda_graph_capture_and_replay():
    model = ResidualNorm(1024).to(DEVICE, torch.float16)
    static_x, static_r = _randn(16, 1024, dtype=torch.float16), _randn(16, 1024, dtype=torch.float16, seed=7)
    gm, _ = _fuse(model, [static_x, static_r])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm up: plans are computed on the first call, never during capture
            gm(static_x, static_r)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = gm(static_x, static_r)
    for seed in (11, 12):
        static_x.copy_(_randn(16, 1024, dtype=torch.float16, seed=seed))
        static_r.copy_(_randn(16, 1024, dtype=torch.float16, seed=seed + 100))
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            assert compare(tuple(static_out), model(static_x, static_r)) is None


def test_optimize_transformer_block_on_cuda():
    class Block(nn.Module):
        def __init__(self, d=256, h=4):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.h, self.d = h, d

        def forward(self, x):
            q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
            q, k, v = (t.unflatten(-1, (self.h, self.d // self.h)).transpose(1, 2) for t in (q, k, v))
            att = torch.softmax((q @ k.transpose(-2, -1)) * 0.125, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).flatten(2))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    names = fxopt.passes.pass_names("cuda")
    passes = None
    if "fuse_reductions" not in names:
        i = names.index("fuse_elementwise")
        passes = names[:i] + [Pass("fuse_reductions", fuse_reductions("cuda"))] + names[i:]
    model = Block().to(DEVICE, torch.float16)
    x = _randn(4, 64, 256, dtype=torch.float16)
    opt = fxopt.optimize(model, [x], backend="cuda", strict=True, passes=passes)
    # the hand-written softmax attention became one SDPA call (rewrite_attention), the two LayerNorms row kernels
    assert any(n.target is F.scaled_dot_product_attention for n in opt.graph_module.graph.nodes)
    rec = {r.name: r for r in opt.records}["fuse_reductions"]
    assert rec.changes["reductions"] == 2
    with torch.no_grad():
        assert compare(opt(x), model(x)) is None
    assert not [n for n in opt.graph_module.graph.nodes if ops.match_row_reduction(n, opt.graph_module) is not None]
