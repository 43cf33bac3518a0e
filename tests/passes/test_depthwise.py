"""depthwise_convolutions (NOTE [Depthwise convolutions], fxopt/passes/depthwise.py) and its kernel
(fxopt/codegen/depthwise.py): the C++ twin against F.conv2d on the CPU over random geometries, layouts and dtypes,
the pass on models (what it takes and what it leaves), inputs refused before launch, the CUDA source through NVRTC,
save/load; on a GPU the kernel against cuDNN and a model in CUDA graphs (the CUDA kernel itself is also emulated on
the CPU: tests/codegen/test_depthwise_emulation.py)."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.codegen.depthwise import DepthwiseProgram, cuda_source
from fxopt.passes import Pass, default_pipeline
from fxopt.passes.depthwise import NORM_SHAPES, depthwise_convolutions
from fxopt.runtime import nvrtc
from fxopt.runtime.depthwise import depthwise_kernel, weight_for

CPU = torch.device("cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _geometries(count: int, seed: int) -> list[tuple]:
    """(N, C, H, W, kernel, stride, padding, dilation): random, small, every dim of the geometry varied."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        k = (rng.choice([1, 3, 5, 7]), rng.choice([1, 3, 5, 7]))
        s, d = (rng.randint(1, 2), rng.randint(1, 2)), (rng.randint(1, 2), 1)
        p = (rng.randint(0, k[0] // 2 * d[0]), rng.randint(0, k[1] // 2))
        N, C, H, W = rng.randint(1, 2), rng.choice([3, 4, 8, 12, 17]), rng.randint(1, 12), rng.randint(1, 12)
        if all((n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 >= 1 for n, pp, dd, kk, ss in zip((H, W), p, d, k, s)):
            out.append((N, C, H, W, k, s, p, d))
    return out


def _check(x, w, b, program, device):
    got = depthwise_kernel(program, device)([x, weight_for(program, w)] + ([b.float()] if b is not None else []))[0]
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double(), program.stride, program.padding,
                    program.dilation, x.shape[1])
    assert got.shape == want.shape and got.dtype == x.dtype
    assert got.stride() == F.conv2d(x, w, b, program.stride, program.padding, program.dilation,
                                    x.shape[1]).stride() or min(got.shape[2:]) == 1
    scale = want.abs().max().item() + 1
    torch.testing.assert_close(got.double() / scale, want / scale, atol=TOL[x.dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("geometry", _geometries(4, seed=1), ids=lambda g: "x".join(map(str, g[:4]))
                         + f"-k{g[4][0]}{g[4][1]}-s{g[5][0]}{g[5][1]}-p{g[6][0]}{g[6][1]}-d{g[7][0]}")
def test_the_kernel_computes_a_depthwise_conv2d(geometry, layout, dtype):
    N, C, H, W, k, s, p, d = geometry
    gen = torch.Generator().manual_seed(C * H + W)
    x = torch.randn(N, C, H, W, generator=gen).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, *k, generator=gen).to(dtype)
    for b in (None, torch.randn(C, generator=gen).to(dtype)):
        program = DepthwiseProgram("cpp", dtype, k, s, p, d, b is not None, layout, 4)
        _check(x, w, b, program, CPU)


def test_inputs_it_was_not_built_for_are_refused_before_launch():
    program = DepthwiseProgram("cpp", torch.float32, (3, 3), padding=(1, 1), layout="nhwc")
    kernel = depthwise_kernel(program, CPU)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    w = weight_for(program, torch.randn(8, 1, 3, 3))
    with pytest.raises(ValueError, match="not dense NHWC"):
        kernel([x.contiguous(), w])
    with pytest.raises(ValueError, match="weight of shape"):
        kernel([x, torch.randn(3, 3, 7)])
    with pytest.raises(TypeError, match="built for torch.float32"):  # the module's dtype, not the kernel's float32
        kernel([x, w.half()])
    with pytest.raises(ValueError, match="takes \\[N, C, H, W\\]"):
        kernel([x[0], w])
    small = DepthwiseProgram("cpp", torch.float32, (5, 5), layout="nchw")
    with pytest.raises(ValueError, match="smaller than"):
        depthwise_kernel(small, CPU)([torch.randn(1, 2, 3, 3), torch.randn(2, 5, 5)])
    with pytest.raises(ValueError, match="pairs of ints|kernel"):
        DepthwiseProgram("cpp", torch.float32, (17, 3))


class _Net(nn.Module):
    """ConvNeXt's 7x7 depthwise convolution, MobileNet's strided 3x3 one without bias, a grouped convolution with
    two channels a group and a channel multiplier (neither depthwise), and a dense one."""

    def __init__(self):
        super().__init__()
        self.dw7 = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.dw3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=8)
        self.multiplier = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.dense = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = self.dw3(F.gelu(self.dw7(x)))
        return self.dense(self.multiplier(self.grouped(y)))


def _pipeline():
    """The default pipeline with the opt-in pass in its place (after convs_in_nchw), rewriting CPU graphs."""
    passes = default_pipeline("cpp")
    at = [p.name for p in passes].index("convs_in_nchw") + 1
    return passes[:at] + [Pass("depthwise_convolutions", depthwise_convolutions("cpp", cpu=True))] + passes[at:]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_pass_takes_depthwise_convolutions_and_leaves_the_rest(channels_last):
    model = _Net().eval()
    x = torch.randn(2, 16, 14, 14)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    record = next(r for r in opt.records if r.name == "depthwise_convolutions")
    assert record.changes == {"convolutions": 2, "epilogue_ops": 1}  # the GELU after dw7 (NOTE [Depthwise epilogues])
    code = opt.graph_module.code
    assert code.count("fxopt_depthwise_") == 2 and "grouped" in code and "multiplier" in code and "gelu" not in code
    got, want = opt(x), model(x)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x2 = torch.randn(2, 16, 14, 14)  # other values, the same signature
    torch.testing.assert_close(opt(x2), model(x2), atol=1e-5, rtol=1e-5)


class _Epilogues(nn.Module):
    """EfficientNet's depthwise convolution + BatchNorm (folded) + SiLU; a convolution without bias, a per-channel
    parameter added through a view (fuse_epilogues' moved bias) and ReLU6; one whose output has a second reader
    (nothing absorbed); one followed by hardswish that two ops read."""

    def __init__(self):
        super().__init__()
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw2 = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)
        self.b2 = nn.Parameter(torch.randn(8))
        self.dw3 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw4 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = F.silu(self.bn(self.dw1(x)))
        y = F.relu6(self.dw2(y) + self.b2.view(1, 8, 1, 1))
        z = self.dw3(y)
        y = torch.relu(z) + z
        h = F.hardswish(self.dw4(y))
        return h * 2 + h.mean()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_kernel_absorbs_a_bias_add_and_the_activation_after_it(channels_last):
    """NOTE [Depthwise epilogues]: SiLU after the folded BatchNorm, a per-channel add then ReLU6 (hardtanh), nothing
    after a convolution whose output has two readers, hardswish read by two ops."""
    model = _Epilogues().eval()
    x = torch.randn(2, 8, 12, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    record = next(r for r in opt.records if r.name == "depthwise_convolutions")
    assert record.changes == {"convolutions": 4, "epilogue_ops": 4}  # silu; add + hardtanh; none; hardswish
    code = opt.graph_module.code
    assert "silu" not in code and "relu6" not in code and "hardtanh" not in code and "hardswish" not in code
    kernels = [k for k in opt.graph_module.meta["fxopt_kernels"].values() if "depthwise" in k.name]
    assert sorted(k.program.activation for k in kernels) == ["", "hardswish", "hardtanh", "silu"]
    got, want = opt(x), model(x)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _BatchNormAfter(nn.Module):
    """16-bit depthwise convolutions, with and without bias, each before a BatchNorm and an activation: the
    BatchNorms do not fold (NOTE [16-bit folds]), batchnorm_as_affine makes them float32 affines."""

    def __init__(self):
        super().__init__()
        self.dw1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw2 = nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16)
        self.bn2 = nn.BatchNorm2d(16)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)

    def forward(self, x):
        return F.hardswish(self.bn2(self.dw2(F.silu(self.bn1(self.dw1(x))))))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_a_16bit_batchnorm_after_the_convolution_folds_into_its_float32_weights(channels_last, dtype):
    """NOTE [Depthwise epilogues]: the unfolded 16-bit BatchNorm (``x.float() * scale + shift``, cast back) and the
    activation run in the kernel, the scale multiplied into the float32 weights, the shift (and the bias times the
    scale) the float32 bias: one kernel per convolution, and a result at least as close to float32 as eager's."""
    torch.manual_seed(0)
    model = _BatchNormAfter().eval()
    x = torch.randn(2, 16, 12, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = model(x).double()
    model16, x16 = copy.deepcopy(model).to(dtype), x.to(dtype)
    opt = fxopt.optimize(model16, (x16,), passes=_pipeline(), strict=True)
    records = {r.name: r for r in opt.records}
    assert records["fold_batchnorm"].status == "unchanged" and records["batchnorm_as_affine"].changes
    # per convolution: cast, mul, add, cast and the activation
    assert records["depthwise_convolutions"].changes == {"convolutions": 2, "epilogue_ops": 10}
    kernels = [k for k in opt.graph_module.meta["fxopt_kernels"].values() if "depthwise" in k.name]
    assert len(kernels) == 2 and all(k.program.bias for k in kernels)
    assert sorted(k.program.activation for k in kernels) == ["hardswish", "silu"]
    weights = [getattr(opt.graph_module, n.target) for n in opt.graph_module.graph.nodes
               if n.op == "get_attr" and "depthwise_weight" in n.target]
    assert len(weights) == 2 and all(w.dtype == torch.float32 for w in weights)
    bn = model16.bn1
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
    want_w1 = (model16.dw1.weight.float()[:, 0] * scale.view(-1, 1, 1))
    want_w1 = want_w1.permute(1, 2, 0) if channels_last else want_w1
    assert any(w.shape == want_w1.shape and torch.allclose(w, want_w1.contiguous()) for w in weights)
    got, eager = opt(x16), model16(x16)
    assert got.dtype == dtype and got.stride() == eager.stride()
    err = lambda t: ((t.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert err(got) <= 1.5 * err(eager), (err(got), err(eager))


class _ConvNeXtBlocks(nn.Module):
    """ConvNeXt's block start twice: the depthwise convolution with its bias, the permute to NHWC, LayerNorm over the
    channels (timm's, torchvision's), then a Linear; the second with its bias moved after the permute as
    fuse_epilogues moves it on CUDA (NOTE [Conv bias in the tail]) and a LayerNorm without affine; then a third whose
    LayerNorm is over another dim (not taken with it) and a fourth whose permuted output has a second reader."""

    def __init__(self, c: int = 96):
        super().__init__()
        self.dw1, self.ln1 = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c, eps=1e-6)
        self.dw2 = nn.Conv2d(c, c, 7, padding=3, groups=c, bias=False)
        self.b2, self.ln2 = nn.Parameter(torch.randn(c)), nn.LayerNorm(c, elementwise_affine=False)
        self.dw3, self.dw4 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.ln4 = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)
        with torch.no_grad():
            for ln in (self.ln1, self.ln4):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.uniform_(-1, 1)

    def forward(self, x):
        y = self.fc(self.ln1(self.dw1(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        y = self.ln2(self.dw2(y).permute(0, 2, 3, 1) + self.b2).permute(0, 3, 1, 2)
        z = F.layer_norm(self.dw3(y), (y.shape[-1],))  # over W, not the channels
        p = self.dw4(z).permute(0, 2, 3, 1)
        return self.ln4(p) + p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_layer_norm_over_the_channels_joins_the_kernel(dtype):
    """NOTE [Depthwise + LayerNorm]: the permute, the moved bias and the LayerNorm after a depthwise convolution in
    NHWC run in its kernel (the C++ twin here); a LayerNorm over another dim, or a permuted value read twice, stays.
    Against eager in float64: fxopt's one rounding is at least as close as eager's."""
    torch.manual_seed(0)
    model = _ConvNeXtBlocks().eval()
    x = torch.randn(2, 96, 9, 9).contiguous(memory_format=torch.channels_last)
    ref = copy.deepcopy(model).double()(x.double())
    model, x = model.to(dtype), x.to(dtype)
    opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    record = next(r for r in opt.records if r.name == "depthwise_convolutions")
    assert record.changes == {"convolutions": 4, "layer_norms": 2, "epilogue_ops": 5}  # permute, LN; permute, add, LN
    kernels = sorted((k for k in opt.graph_module.meta["fxopt_kernels"].values() if "depthwise" in k.name),
                     key=lambda k: k.program.norm_channels)
    assert [k.program.norm_channels for k in kernels] == [0, 0, 96, 96]
    assert sorted(k.program.norm_eps for k in kernels[2:]) == [1e-6, 1e-5]
    code = opt.graph_module.code
    assert code.count("layer_norm") == 2  # dw3's (over W) and ln4 (its input read twice) stay ATen's
    # ln1's value for fc, fc's own permute back, dw4's; the permute back after ln2 went (the kernel's output is NCHW)
    assert code.count(".permute(") == 3
    got, eager = opt(x), model(x)
    assert got.dtype == dtype and got.stride() == eager.stride()
    err = lambda t: ((t.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert err(got) <= max(1.5 * err(eager), 1e-6), (err(got), err(eager))
    x2 = torch.randn(2, 96, 9, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(opt(x2), model(x2), atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


class _Permute(nn.Module):
    """torchvision.ops.misc.Permute: ``torch.permute(x, dims)``."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


def test_torchvisions_block_spelling_joins_the_kernel_too():
    """torchvision's CNBlock: ``nn.Sequential(Conv2d, Permute([0, 2, 3, 1]), LayerNorm, Linear, GELU, Linear,
    Permute([0, 3, 1, 2]))``, the permute a ``torch.permute`` call and the LayerNorm a module."""
    torch.manual_seed(0)
    c = 32
    block = nn.Sequential(nn.Conv2d(c, c, 7, padding=3, groups=c), _Permute([0, 2, 3, 1]), nn.LayerNorm(c, eps=1e-6),
                          nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c), _Permute([0, 3, 1, 2])).eval()
    x = torch.randn(1, c, 10, 10).contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(block, (x,), passes=_pipeline(), strict=True)
    record = next(r for r in opt.records if r.name == "depthwise_convolutions")
    assert record.changes == {"convolutions": 1, "layer_norms": 1, "epilogue_ops": 2}
    assert "layer_norm" not in opt.graph_module.code
    torch.testing.assert_close(opt(x), block(x), atol=1e-4, rtol=1e-4)


def test_a_layer_norm_the_kernel_cannot_take_leaves_the_convolution_to_the_plain_kernel():
    """An odd channel count over 1024 (one channel a lane, at most 1024 lanes): the convolution alone; 10 channels
    (two a lane) are taken."""
    torch.manual_seed(0)
    model = _ConvNeXtBlocks(c=1025).eval()
    x = torch.randn(1, 1025, 3, 3).contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    record = next(r for r in opt.records if r.name == "depthwise_convolutions")
    assert record.changes == {"convolutions": 4}
    assert sum("stay apart" in n and "no lane shape" in n for n in record.notes) == 2, record.notes
    torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)
    model = _ConvNeXtBlocks(c=10).eval()
    x = torch.randn(1, 10, 6, 6).contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    assert next(r for r in opt.records if r.name == "depthwise_convolutions").changes["layer_norms"] == 2
    kernels = [k for k in opt.graph_module.meta["fxopt_kernels"].values() if "depthwise" in k.name]
    assert sorted(k.program.lane_channels for k in kernels if k.program.norm_channels) == [2, 2]
    torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)


def test_it_is_opt_in_and_leaves_cpu_convolutions_to_aten():
    """Opt-in until a GPU run (NOTE [Depthwise convolutions]); enabled, it leaves CPU graphs to ATen by default."""
    model, x = _Net().eval(), torch.randn(1, 16, 8, 8)
    assert not any(r.name == "depthwise_convolutions" for r in fxopt.optimize(model, (x,), backend="cpp").records)
    opt = fxopt.optimize(model, (x,), backend="cpp", enable=["depthwise_convolutions"])
    assert next(r for r in opt.records if r.name == "depthwise_convolutions").status == "unchanged"
    names = [r.name for r in opt.records]
    assert names.index("depthwise_convolutions") == names.index("convs_in_nchw") + 1
    names = [r.name for r in fxopt.optimize(model, (x,), backend="cpp", enable=["depthwise_layer_norms"]).records]
    assert names.index("depthwise_layer_norms") == names.index("convs_in_nchw") + 1


def test_a_functional_depthwise_convolution_with_a_graph_bias():
    """F.conv2d with the bias computed in the graph (not a parameter) and padding that is not symmetric in h, w."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 1, 3, 5))
            self.b = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return F.conv2d(x, self.w, self.b * 2, 1, (1, 2), 1, 6)

    model, x = Functional().eval(), torch.randn(1, 6, 9, 11)
    opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    assert next(r for r in opt.records if r.name == "depthwise_convolutions").changes == {"convolutions": 1}
    torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


def test_an_optimized_module_with_the_kernel_saves_and_loads(tmp_path):
    model, x = _Net().eval(), torch.randn(1, 16, 10, 10)
    opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    fxopt.save(opt, tmp_path / "net")
    assert '"kind": "depthwise"' in (tmp_path / "net" / "manifest.json").read_text()
    torch.testing.assert_close(fxopt.load(tmp_path / "net")(x), model(x), atol=1e-5, rtol=1e-5)
    # with the LayerNorm in the kernel (NOTE [Depthwise + LayerNorm]): its channel count and epsilon travel along
    torch.manual_seed(0)
    blocks = _ConvNeXtBlocks(c=32).eval()
    x = torch.randn(2, 32, 7, 7).contiguous(memory_format=torch.channels_last)
    fxopt.save(fxopt.optimize(blocks, (x,), passes=_pipeline(), strict=True), tmp_path / "blocks")
    assert '"norm_channels": 32' in (tmp_path / "blocks" / "manifest.json").read_text()
    torch.testing.assert_close(fxopt.load(tmp_path / "blocks")(x), blocks(x), atol=1e-4, rtol=1e-4)


NVRTC_OK, NVRTC_WHY = nvrtc.nvrtc_available()


@pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC is not available ({NVRTC_WHY})")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_cuda_source_compiles_with_nvrtc(dtype):
    for layout in ("nchw", "nhwc"):
        for kernel, stride, cols, bias in (((7, 7), (1, 1), 4, False), ((3, 3), (2, 2), 2, True), ((5, 1), (1, 2), 1, True)):
            program = DepthwiseProgram("cuda", dtype, kernel, stride, (1, 0), (1, 1), bias, layout, cols, "cuda:0")
            assert program.name.encode() in nvrtc.compile_cuda(cuda_source(program), arch="sm_90",
                                                               name_hint=program.name)
    for channels, cols, vc in ((96, 4, 4), (192, 2, 2), (768, 1, 1), (4096, 1, 4), (30, 2, 2)):  # NOTE [Depthwise +
        program = DepthwiseProgram("cuda", dtype, (7, 7), (1, 1), (3, 3), (1, 1), True, "nhwc", cols,  # LayerNorm]
                                   "cuda:0", norm_channels=channels, norm_eps=1e-6, lane_channels=vc)
        assert program.name.encode() in nvrtc.compile_cuda(cuda_source(program), arch="sm_90", name_hint=program.name)


# -- on a GPU --------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("case", [(1, 96, 56, 56, (7, 7), (1, 1), (3, 3)), (1, 240, 28, 28, (5, 5), (2, 2), (2, 2)),
                                  (2, 30, 9, 7, (3, 3), (1, 1), (1, 1))], ids=["convnext", "effnet-s2", "odd"])
@pytest.mark.parametrize("cols", [1, 2, 4])
def test_on_cuda_the_kernel_computes_a_depthwise_conv2d(case, layout, dtype, cols):
    N, C, H, W, k, s, p = case
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(N, C, H, W, device=device).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, *k, device=device).to(dtype)
    b = torch.randn(C, device=device).to(dtype)
    for bias in (None, b):
        program = DepthwiseProgram("cuda", dtype, k, s, p, (1, 1), bias is not None, layout, cols, str(device))
        _check(x, w, bias, program, device)
    if layout == "nhwc":  # a view off 16-byte alignment: the kernel's one-channel path
        xs = torch.randn(N * C * H * W + 1, device=device).to(dtype)[1:].view(N, H, W, C).permute(0, 3, 1, 2)
        _check(xs, w, b, DepthwiseProgram("cuda", dtype, k, s, p, (1, 1), True, layout, cols, str(device)), device)


@pytest.mark.cuda
@pytest.mark.parametrize("forced", [False, True], ids=["measured", "forced"])
def test_on_cuda_a_model_in_graphs(forced, monkeypatch):
    """Each shape is timed against cuDNN (a note with the times); forced, both depthwise convolutions run the kernel
    inside the CUDA graph, and the outputs stay eager's."""
    from fxopt.passes import depthwise

    if forced:
        monkeypatch.setattr(depthwise, "MIN_GAIN", 1e9)
    model = _Net().cuda().eval()
    x = torch.randn(1, 16, 56, 56, device="cuda")
    opt = fxopt.optimize(model, (x,), cuda_graphs=True, strict=True, enable=["depthwise_convolutions"])
    record = next(r for r in opt.records if r.name == "depthwise_convolutions")
    assert sum("µs" in n for n in record.notes) == 2, record.notes
    if forced:
        assert record.changes.get("convolutions") == 2
    torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)


class _MovedAndOwnBias(nn.Module):
    """Three depthwise convolutions: fuse_epilogues moves the first one's bias into the LayerNorm's row kernel after
    it (ConvNeXt's block), so neither the kernel nor cuDNN runs it; the second has no bias, and the per-channel add
    after it becomes the kernel's bias, an op it absorbs (cuDNN is timed without it); the third's output is the
    graph's output, so its bias stays on it."""

    def __init__(self):
        super().__init__()
        self.dw1 = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.dw2 = nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False)
        self.shift = nn.Parameter(torch.randn(16, 1, 1))
        self.dw3 = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x):
        h = self.norm(self.dw1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.dw3(torch.relu(self.dw2(h) + self.shift))


@pytest.mark.cuda
def test_on_cuda_cudnn_is_timed_with_the_convolutions_own_bias_only(monkeypatch):
    """NOTE [Depthwise baseline]: a bias fuse_epilogues moved into a later kernel is not charged to cuDNN (ATen adds
    a convolution's bias with a kernel of its own); a bias still on the convolution is."""
    from fxopt.passes import depthwise

    seen = []
    timed = depthwise._timed

    def spy(kernels, device, tm, weight, program, conv_bias):
        seen.append((tuple(weight.shape), program.bias, conv_bias))
        return timed(kernels, device, tm, weight, program, conv_bias)

    monkeypatch.setattr(depthwise, "_timed", spy)
    model = _MovedAndOwnBias().cuda().eval()
    x = torch.randn(1, 16, 28, 28, device="cuda")
    opt = fxopt.optimize(model, (x,), strict=True, enable=["depthwise_convolutions"])
    # (weight shape, the kernel adds a bias, cuDNN is timed with one): the moved bias is in neither, the absorbed
    # add only in the kernel, the convolution's own bias in both
    assert sorted(seen) == [((16, 1, 3, 3), True, True), ((16, 1, 5, 5), True, False),
                            ((16, 1, 7, 7), False, False)], seen
    torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: f"tw{s[0]}-vc{s[1]}")
@pytest.mark.parametrize("case", [(1, 96, 56, 56), (1, 192, 28, 28), (2, 384, 14, 14), (1, 768, 7, 7), (1, 4096, 3, 5)],
                         ids=["stage1", "stage2", "stage3-b2", "stage4", "wide"])
def test_on_cuda_the_layer_norm_kernel_matches_eager(case, shape, dtype):
    """NOTE [Depthwise + LayerNorm] on the device: ConvNeXt's four stages (and the widest channel count), against
    float64 eager, from an aligned input and from one 2 elements off (the scalar loads)."""
    N, C, H, W = case
    gen = torch.Generator().manual_seed(C)
    x = torch.randn(N, C, H, W, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, 7, 7, generator=gen).to(dtype), torch.randn(C, generator=gen)
    gamma, beta = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    want = F.layer_norm(F.conv2d(x.double(), w.double(), b.double(), 1, 3, 1, C).permute(0, 2, 3, 1), (C,),
                        gamma.double(), beta.double(), 1e-6)
    cols, vc = shape
    if C > 1024 * vc:
        pytest.skip(f"{C} channels take more than 1024 lanes of {vc}")
    program = DepthwiseProgram("cuda", dtype, (7, 7), (1, 1), (3, 3), (1, 1), True, "nhwc", cols, "cuda:0",
                               norm_channels=C, norm_eps=1e-6, lane_channels=vc)
    kernel = depthwise_kernel(program, torch.device("cuda", 0))
    xs = torch.empty(x.numel() + 2, dtype=dtype)[2:].view(N, H, W, C).permute(0, 3, 1, 2)
    xs.copy_(x)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for xin in (x, xs):
        (got,) = kernel([t.cuda() for t in (xin, weight_for(program, w), b, gamma, beta)])
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.permute(0, 2, 3, 1).cpu().double(), want,
                                   atol=tol * (want.abs().max().item() + 1), rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("forced", [False, True], ids=["measured", "forced"])
def test_on_cuda_convnext_blocks_with_their_layer_norms_in_graphs(forced, monkeypatch):
    """NOTE [Depthwise + LayerNorm] in a model in float16 under CUDA graphs: each convolution + LayerNorm is timed
    against cuDNN + ATen's layer_norm (a note with the times); forced, both run the fused kernel, and the output stays
    as close to float32 as eager's."""
    from fxopt.passes import depthwise

    if forced:
        monkeypatch.setattr(depthwise, "MIN_GAIN", 1e9)
    torch.manual_seed(0)
    model = _ConvNeXtBlocks().eval()
    x = torch.randn(1, 96, 56, 56).contiguous(memory_format=torch.channels_last)
    ref = copy.deepcopy(model).double()(x.double())
    model16, x16 = model.cuda().half(), x.cuda().half()
    opt = fxopt.optimize(model16, (x16,), cuda_graphs=True, strict=True, enable=["depthwise_convolutions"])
    record = next(r for r in opt.records if r.name == "depthwise_convolutions")
    assert sum("LayerNorm" in n and "µs" in n for n in record.notes) == 2, record.notes
    if forced:
        assert record.changes.get("layer_norms") == 2, record.changes
    err = lambda t: ((t.cpu().double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert err(opt(x16)) <= 1.5 * err(model16(x16)), (err(opt(x16)), err(model16(x16)))


def test_the_layer_norm_baselines_compute_the_layer_norm():
    """NOTE [Depthwise + LayerNorm]: what the fused kernel is timed against after cuDNN: ATen's layer_norm and the
    pipeline's row kernel for it (here the C++ one), on the permuted NHWC value the graph hands the LayerNorm."""
    from fxopt.passes.depthwise import _layer_norms

    torch.manual_seed(0)
    y = torch.randn(2, 40, 5, 6).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    gamma, beta = torch.rand(40) + 0.5, torch.randn(40)
    norms = _layer_norms(y, gamma, beta, 1e-6, "cpp")
    assert len(norms) == 2 and any("rows_layer_norm" in str(n.args) for n in norms[1].graph.nodes)
    for norm in norms:
        torch.testing.assert_close(norm(y), F.layer_norm(y, (40,), gamma, beta, 1e-6), atol=1e-5, rtol=1e-5)


def test_with_alone_false_only_convolutions_with_their_layer_norm_are_taken():
    """``alone=False``: the fused convolution + LayerNorm only; the two other depthwise convolutions stay ATen's."""
    passes = default_pipeline("cpp")
    at = [p.name for p in passes].index("convs_in_nchw") + 1
    pipeline = passes[:at] + [Pass("depthwise_convolutions", depthwise_convolutions("cpp", cpu=True, alone=False))] \
        + passes[at:]
    torch.manual_seed(0)
    model = _ConvNeXtBlocks().eval()
    x = torch.randn(1, 96, 8, 8).contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(model, (x,), passes=pipeline, strict=True)
    record = next(r for r in opt.records if r.name == "depthwise_convolutions")
    assert record.changes == {"convolutions": 2, "layer_norms": 2, "epilogue_ops": 5}
    code = opt.graph_module.code
    assert "self.dw3(" in code and "self.dw4(" in code and code.count("fxopt_depthwise_") == 2
    torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)


def test_the_choice_between_the_kernel_and_cudnn(monkeypatch):
    """The decision both the plain kernel and the one with the LayerNorm go through (``_choose``), on CUDA times
    given here: the fastest candidate where it takes at most MIN_GAIN of cuDNN's time, else cuDNN with the times
    said; a candidate that does not build or a timing that fails keeps the graph's op, and is not "slower"."""
    import types

    from fxopt.passes import depthwise

    monkeypatch.setattr(depthwise, "depthwise_kernel", lambda p, device: types.SimpleNamespace(program=p))
    times = {}
    monkeypatch.setattr(depthwise, "_timed", lambda built, *a: times["now"])
    x = torch.fx.Graph().placeholder("x")
    x.meta["tensor_meta"] = torch.fx.passes.shape_prop._extract_tensor_metadata(
        torch.empty(1, 96, 8, 8).contiguous(memory_format=torch.channels_last))
    base = DepthwiseProgram("cuda", torch.float16, (7, 7), (1, 1), (3, 3), (1, 1), True, "nhwc", 4, "cuda:0",
                            norm_channels=96, norm_eps=1e-6)
    programs = [base, dataclasses.replace(base, cols=1, lane_channels=1)]
    cuda, w = torch.device("cuda", 0), torch.randn(96, 1, 7, 7)
    times["now"] = (9.0, 7.0, 10.0)  # the second candidate, at 0.7 of cuDNN + the LayerNorm
    kernel, said, slower = depthwise._choose(programs, cuda, x, w, False)
    assert kernel.program.lane_channels == 1 and not slower
    assert "1 columns x 1 channels a lane 7.00 µs" in said and "cuDNN + the LayerNorm 10.00 µs" in said
    times["now"] = (9.5, 9.2, 10.0)  # 0.92: not enough
    kernel, said, slower = depthwise._choose(programs, cuda, x, w, False)
    assert kernel is None and slower and said.endswith("9.20 µs")
    monkeypatch.setattr(depthwise, "_timed", lambda *a: (_ for _ in ()).throw(RuntimeError("capture refused")))
    assert depthwise._choose(programs, cuda, x, w, False) == (None, "timing it failed: RuntimeError: capture "
                                                                   "refused", False)
