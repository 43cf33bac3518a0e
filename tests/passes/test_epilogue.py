import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.launches import dispatched_ops
from fxopt.passes import fuse_epilogues
from fxopt.passes.epilogue import BIAS_IN_TAIL_DEVICES


def _apply(model, *inputs):
    gm = fxopt.capture(model.eval(), inputs)
    result = fuse_epilogues(gm)
    result.graph_module.graph.lint()
    return result


@pytest.mark.parametrize("act, shape", [(nn.ReLU(), (3, 8)), (nn.GELU(), (2, 5, 8))])
def test_linear_bias_activation_becomes_one_op(act, shape):
    model = nn.Sequential(nn.Linear(8, 16), act)
    x = torch.randn(shape)
    result = _apply(model, x)
    assert result.modified
    gm = result.graph_module
    assert any(n.target is torch._addmm_activation for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    assert dispatched_ops(gm, [x]) == {"_addmm_activation": 1}


def test_exact_gelu_and_shared_outputs_are_not_fused():
    x = torch.randn(4, 8)
    # on CPU _addmm_activation's GELU is the exact one: the tanh approximation must stay separate
    assert not _apply(nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh")), x).modified

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y), y  # y is needed before the activation

    assert not _apply(Shared(), x).modified
    assert not _apply(nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU()), x).modified


def test_conv_epilogues_are_left_alone_on_cpu_with_a_note():
    model, inputs = fxopt.models.get("small_resnet").build()
    opt = fxopt.optimize(model, inputs)
    rec = {r.name: r for r in opt.records}["fuse_epilogues"]
    assert "conv_relu" not in rec.changes
    note = next(n for n in rec.notes if "convolution(s) on CPU" in n)
    assert "CUDA only" in note and "cuDNN" in note  # says why, and what happens to the activation instead
    assert "fuse_elementwise" in note


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_relu_and_conv_add_relu_on_cuda(dtype):
    model, inputs = fxopt.models.get("small_resnet").build(device="cuda", dtype=dtype)
    opt = fxopt.optimize(model, inputs, strict=True)
    rec = {r.name: r for r in opt.records}["fuse_epilogues"]
    assert rec.changes.get("conv_relu", 0) >= 3 and rec.changes.get("conv_add_relu", 0) == 3
    with torch.no_grad():
        assert fxopt.verify.compare(opt(*inputs), model(*inputs)) is None


def test_channels_last_is_cuda_only_and_needs_enough_convolutions():
    from fxopt.passes import to_channels_last

    model, inputs = fxopt.models.get("small_resnet").build()
    gm = fxopt.capture(model, inputs)
    assert not to_channels_last(gm).modified  # CPU graph: untouched


@pytest.mark.cuda
def test_channels_last_removes_transposes_and_keeps_eager_strides():
    model, inputs = fxopt.models.get("small_resnet").build(device="cuda")
    opt = fxopt.optimize(model, inputs, strict=True)
    rec = {r.name: r for r in opt.records}["to_channels_last"]
    assert rec.status == "applied"
    with torch.no_grad():
        out, ref = opt(*inputs), model(*inputs)
    assert out.stride() == ref.stride()
    kernels = fxopt.count_launches(opt, inputs).cuda_kernels_by_name
    assert not any("nchwToNhwc" in k for k in kernels), kernels


# -- NOTE [Bias in the tail]: Linear + bias -> views -> elementwise becomes mm and the bias in the tail's kernel ----
_HERE = frozenset({"cpu"})  # the rule is on for CUDA only; the tests turn it on for the CPU


class _LayerScaleTail(nn.Module):
    """ConvNeXt's block end: Linear on channels-last rows, permute back, layer scale, residual."""

    def __init__(self, c=12, perm=(0, 3, 1, 2)):
        super().__init__()
        self.fc, self.perm = nn.Linear(3 * c, c), perm
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, h, x):
        return self.gamma * self.fc(h).permute(*self.perm) + x


def _bias_moves(model, *inputs):
    gm = fxopt.capture(model.eval(), inputs)
    result = fuse_epilogues(gm, bias_devices=_HERE)
    result.graph_module.graph.lint()
    return result


@pytest.mark.parametrize("shape", [(1, 5, 7), (2, 3, 4)])
def test_the_bias_moves_past_a_permute_into_the_tail(shape):
    model = _LayerScaleTail()
    h = torch.randn(shape[0], shape[1], shape[2], 36)
    x = torch.randn(shape[0], 12, shape[1], shape[2])
    result = _bias_moves(model, h, x)
    assert result.modified
    gm = result.graph_module
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.linear]
    assert len(linears) == 1 and len(linears[0].args) == 2  # the GEMM without its bias
    torch.testing.assert_close(gm(h, x), model(h, x), rtol=1e-5, atol=1e-6)


def test_through_the_pipeline_the_bias_shares_the_tails_kernel():
    import functools

    from fxopt.passes import Pass, default_pipeline

    model = _LayerScaleTail()
    h, x = torch.randn(1, 4, 4, 36), torch.randn(1, 12, 4, 4)
    passes = [Pass("fuse_epilogues", functools.partial(fuse_epilogues, bias_devices=_HERE), "")
              if p.name == "fuse_epilogues" else p.name for p in default_pipeline()]
    opt = fxopt.optimize(model.eval(), (h, x), passes=passes, strict=True)
    assert {r.name: r for r in opt.records}["fuse_epilogues"].changes == {"linear_bias_to_tail": 1}
    ops_run = dispatched_ops(opt, [h, x])
    assert ops_run.get("mm", 0) == 1 and "addmm" not in ops_run and "add" not in ops_run, ops_run
    with torch.no_grad():
        torch.testing.assert_close(opt(h, x), model(h, x), rtol=1e-5, atol=1e-6)


def test_the_bias_joins_a_residual_add_before_layernorm():
    class PostNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)

        def forward(self, a, x):
            return self.norm(x + self.proj(a))

    model, a, x = PostNorm().eval(), torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    result = _bias_moves(model, a, x)
    assert result.modified
    torch.testing.assert_close(result.graph_module(a, x), model(a, x), rtol=1e-5, atol=1e-5)


class _Conv1DMlp(nn.Module):
    """transformers' GPT-2 MLP: Conv1D layers are ``addmm(bias, x.view(-1, in), weight[in, out]).view(...)``."""

    def __init__(self, c=16):
        super().__init__()
        self.w_fc, self.b_fc = nn.Parameter(torch.randn(c, 4 * c) / 4), nn.Parameter(torch.randn(4 * c))
        self.w_proj, self.b_proj = nn.Parameter(torch.randn(4 * c, c) / 8), nn.Parameter(torch.randn(c))

    def forward(self, x):
        h = torch.addmm(self.b_fc, x.view(-1, x.size(-1)), self.w_fc).view(x.shape[0], x.shape[1], -1)
        h = torch.nn.functional.gelu(h, approximate="tanh")
        out = torch.addmm(self.b_proj, h.view(-1, h.size(-1)), self.w_proj).view(x.shape)
        return x + out


class _GeluNewMlp(nn.Module):
    """transformers' GPT-2 MLP-in: Conv1D, then NewGELUActivation written out, which reads its input three times."""

    def __init__(self, c=16, linear=False):
        super().__init__()
        self.fc = nn.Linear(c, 4 * c) if linear else None
        self.w, self.b = nn.Parameter(torch.randn(c, 4 * c) / 4), nn.Parameter(torch.randn(4 * c))

    def forward(self, x):
        if self.fc is not None:
            h = self.fc(x)
        else:
            h = torch.addmm(self.b, x.view(-1, x.size(-1)), self.w).view(x.shape[0], x.shape[1], -1)
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


@pytest.mark.parametrize("linear", [False, True], ids=["addmm", "linear"])
def test_the_bias_moves_to_a_tail_that_reads_the_output_several_times(linear):
    model, x = _GeluNewMlp(linear=linear), torch.randn(2, 5, 16)
    result = _bias_moves(model, x)
    assert result.modified
    gm = result.graph_module
    gm.recompile()
    adds = [n for n in gm.graph.nodes if n.target is operator.add and n.meta.get("fxopt_from_pass") == "fuse_epilogues"]
    assert len(adds) == 1 and len(adds[0].users) == 3  # one bias add, read by the GELU's three uses
    gemms = [n for n in gm.graph.nodes if n.target in (torch.addmm, torch.mm, F.linear) or n.op == "call_module"]
    assert [n.target for n in gemms] == [F.linear if linear else torch.mm] and len(gemms[0].args) == 2  # no bias
    torch.testing.assert_close(gm(x), model(x))


class _WindowReverse(nn.Module):
    """Swin's attention projection, then the window reverse (view, permute, contiguous, view), a roll back and the
    residual add: data movement that keeps every channel last, between the GEMM and its elementwise reader."""

    def __init__(self, c=8, ws=2, roll_dims=(1, 2)):
        super().__init__()
        self.proj, self.ws, self.roll_dims = nn.Linear(c, c), ws, roll_dims

    def forward(self, windows, x):  # windows [B * nW, ws * ws, C], x [B, H, W, C]
        b, h, w, c = x.shape
        y = self.proj(windows).view(b, h // self.ws, w // self.ws, self.ws, self.ws, c)
        y = y.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, c)
        y = torch.roll(y, shifts=(1, 1), dims=self.roll_dims)
        return x + y


def test_the_bias_moves_through_data_movement_that_keeps_channels_last():
    model = _WindowReverse()
    windows, x = torch.randn(8, 4, 8), torch.randn(2, 4, 4, 8)
    result = _bias_moves(model, windows, x)
    assert result.modified
    gm = result.graph_module
    gm.recompile()
    assert [n.target for n in gm.graph.nodes if n.target in (F.linear,)] == [F.linear]
    assert all(len(n.args) == 2 for n in gm.graph.nodes if n.target is F.linear)  # the GEMM has no bias now
    torch.testing.assert_close(gm(windows, x), model(windows, x))


def test_the_bias_stays_when_the_movement_moves_channels():
    """A roll over the channel dim puts channel j where channel j+1 was: a bias after it is not the bias before."""
    model = _WindowReverse(roll_dims=(1, 3))
    windows, x = torch.randn(8, 4, 8), torch.randn(2, 4, 4, 8)
    assert not _bias_moves(model, windows, x).modified


def test_the_bias_stays_when_one_reader_is_not_elementwise():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            h = self.fc(x)
            return h.relu() + h.sum(-1, keepdim=True)

    assert not _bias_moves(M(), torch.randn(3, 8)).modified


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_an_addmm_bias_moves_into_the_tail_torch_level_and_aten(capture):
    """GPT-2's Conv1D: the bias of ``addmm(b, x, w)`` goes to the GELU and residual kernels, the GEMMs run as
    ``mm``; both capture spellings (torch.addmm, aten.addmm.default)."""
    from fxopt.capture import annotate

    model, x = _Conv1DMlp().eval(), torch.randn(2, 5, 16)
    if capture == "export":
        gm = torch.export.export(model, (x,)).module()
        annotate(gm, (x,))
    else:
        gm = fxopt.capture(model, (x,))
    result = fuse_epilogues(gm, bias_devices=_HERE)
    assert result.modified
    targets = [n.target for n in result.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.mm) == 2 and not any("addmm" in str(t) for t in targets), targets
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_addmm_whose_bias_is_not_per_channel_stays():
    class FullBias(nn.Module):
        def forward(self, c, x, w):
            return torch.addmm(c, x, w) * 2

    c, x, w = torch.randn(3, 4), torch.randn(3, 5), torch.randn(5, 4)
    gm = fxopt.capture(FullBias(), (c, x, w))
    assert not fuse_epilogues(gm, bias_devices=_HERE).modified


@pytest.mark.parametrize("case", ["merged_rows", "no_elementwise_tail", "shared_output", "no_bias"])
def test_the_bias_stays_where_a_view_splits_rows_or_no_tail_takes_it(case):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8, bias=case != "no_bias")

        def forward(self, x):
            y = self.fc(x)
            if case == "merged_rows":  # (2, 3, 8) -> (2, 24): a row of the view spans three output rows
                return y.flatten(1) * 2
            if case == "no_elementwise_tail":
                return y.sum(-1)
            if case == "shared_output":
                return y * 2, y
            return y * 2

    x = torch.randn(2, 3, 8)
    assert not _bias_moves(Net(), x).modified


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_cuda_the_bias_moves_by_default_and_saves_kernels(dtype):
    model = _LayerScaleTail(c=64).to("cuda", dtype).eval()
    h = torch.randn(1, 14, 14, 192, device="cuda", dtype=dtype)
    x = torch.randn(1, 64, 14, 14, device="cuda", dtype=dtype)
    opt = fxopt.optimize(model, (h, x), strict=True)
    assert {r.name: r for r in opt.records}["fuse_epilogues"].changes.get("linear_bias_to_tail") == 1
    with torch.no_grad():
        assert fxopt.verify.compare(opt(h, x), model(h, x)) is None
    eager, fused = fxopt.count_launches(model, (h, x)), fxopt.count_launches(opt, (h, x))
    assert fused.cuda_kernels < eager.cuda_kernels, (fused.cuda_kernels_by_name, eager.cuda_kernels_by_name)


@pytest.mark.cuda
def test_on_cuda_an_addmm_bias_moves_by_default():
    model, x = _Conv1DMlp(c=64).cuda().eval(), torch.randn(1, 128, 64, device="cuda")
    opt = fxopt.optimize(model, (x,), strict=True)
    assert {r.name: r for r in opt.records}["fuse_epilogues"].changes.get("linear_bias_to_tail") == 2
    with torch.no_grad():
        assert fxopt.verify.compare(opt(x), model(x)) is None
    ran = dispatched_ops(opt, (x,))
    assert ran.get("mm", 0) == 2 and "addmm" not in ran, ran
    # The GEMMs' kernels are cuBLAS's choice (for some shapes a plain mm splits K into two kernels where addmm did
    # not, as Inductor's mm does too), so the test counts what the rewrite owns: the elementwise work after the
    # GEMMs, ATen's bias-free gelu and add in eager, is two generated kernels and nothing else.
    fused = fxopt.count_launches(opt, (x,)).cuda_kernels_by_name
    generated = {name: n for name, n in fused.items() if name.startswith("fxopt_")}
    aten_elementwise = {name: n for name, n in fused.items() if "elementwise_kernel" in name}
    assert sum(generated.values()) == 2 and not aten_elementwise, fused


# -- property: the bias follows any permutation of the output's dims -----------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _PermutedTail(nn.Module):
    def __init__(self, c, perm, op):
        super().__init__()
        self.fc, self.perm, self.op = nn.Linear(5, c), perm, op

    def forward(self, x, r):
        y = self.fc(x).permute(*self.perm)
        if self.op == "mul":
            return y * 1.5
        return y + r if self.op == "add" else F.gelu(y)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), c=st.integers(1, 9),
       op=st.sampled_from(["mul", "add", "gelu"]), data=st.data())
def test_the_bias_follows_any_permutation(lead, c, op, data):
    rank = len(lead) + 1
    perm = tuple(data.draw(st.permutations(range(rank))))
    model = _PermutedTail(c, perm, op).eval()
    x = torch.randn(*lead, 5)
    r = torch.randn(*[(*lead, c)[p] for p in perm])
    result = _bias_moves(model, x, r)
    torch.testing.assert_close(result.graph_module(x, r), model(x, r), rtol=1e-5, atol=1e-5)
    if c > 1:  # the output's last dim survives the permutation whole: the bias always moves
        assert result.modified


def test_the_cuda_source_of_the_tail_with_its_bias_compiles_with_nvrtc():
    """The kernel the bias joins (bias [C] read broadcast, layer scale, residual), printed for CUDA (no GPU)."""
    import functools

    from fxopt.codegen.printer import cuda_source
    from fxopt.passes import Pass, default_pipeline
    from fxopt.runtime import nvrtc
    from fxopt.runtime.kernel import FusedKernel

    ok, why = nvrtc.nvrtc_available()
    if not ok:
        pytest.skip(f"NVRTC is not available ({why})")
    model = _LayerScaleTail()
    h, x = torch.randn(1, 4, 4, 36), torch.randn(1, 12, 4, 4)
    passes = [Pass("fuse_epilogues", functools.partial(fuse_epilogues, bias_devices=_HERE), "")
              if p.name == "fuse_epilogues" else p.name for p in default_pipeline()]
    opt = fxopt.optimize(model.eval(), (h, x), passes=passes, strict=True, backend="cpp")
    (kernel,) = [k for k in opt.kernels.values() if isinstance(k, FusedKernel)]
    assert "add" in kernel.op_names and "mul" in kernel.op_names
    assert nvrtc.compile_cuda(cuda_source(kernel.region, kernel.modes), arch="sm_90",
                              name_hint=kernel.name).startswith(b"\x7fELF")


@pytest.mark.cuda
@pytest.mark.parametrize("linear", [False, True], ids=["addmm", "linear"])
def test_on_cuda_gpt2_gelu_new_gets_the_bias_in_its_kernel(linear):
    model, x = _GeluNewMlp(c=64, linear=linear).cuda().eval(), torch.randn(1, 128, 64, device="cuda")
    opt = fxopt.optimize(model, (x,), strict=True)
    assert {r.name: r for r in opt.records}["fuse_epilogues"].changes.get("linear_bias_to_tail") == 1
    with torch.no_grad():
        assert fxopt.verify.compare(opt(x), model(x)) is None
    # the optimized module's generated kernels run on fxopt's call path, out of a dispatch mode's sight (the GPU run
    # of 635fa9c showed it): the graph says what runs
    from fxopt.runtime.kernel import KERNELS, fused_op

    ran = dispatched_ops(opt, (x,))
    assert "addmm" not in ran and ran.get("mm", 0) == 1, ran
    (fused,) = [n for n in opt.graph_module.graph.nodes if n.target is fused_op]
    assert KERNELS[fused.args[0]].op_names[0] == "add"  # the bias, then the GELU's ops


class _DepthwiseLayerNorm(nn.Module):
    """torchvision ConvNeXt's block start: a depthwise convolution (with bias), permute to channels last, LayerNorm;
    ``reader``: what reads the permuted output instead ("pool": no elementwise or row reader; "silu": elementwise
    without the permute)."""

    def __init__(self, c=16, reader="layer_norm"):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.ln = nn.LayerNorm(c)
        self.reader = reader

    def forward(self, x):
        y = self.conv(x)
        if self.reader == "silu":
            return F.silu(y)
        if self.reader == "pool":
            return F.max_pool2d(y, 2)
        return self.ln(y.permute(0, 2, 3, 1))


@pytest.mark.parametrize("reader, moved", [("layer_norm", True), ("silu", True), ("pool", False)])
def test_a_conv_bias_moves_into_the_tail_that_reads_it(reader, moved):
    """NOTE [Conv bias in the tail]: the convolution runs without its bias, and the bias (shaped to the channel's
    dim after the permute) is added before its elementwise or row-reduction reader; a max pool keeps it in place."""
    model = _DepthwiseLayerNorm(reader=reader)
    x = torch.randn(2, 16, 10, 12)
    result = _bias_moves(model, x)
    assert result.modified == moved
    gm = result.graph_module
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.conv2d]
    if moved:
        assert len(convs) == 1 and convs[0].args[2] is None
        reshapes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
        # channels last after the permute: the bias as it is; NCHW: shaped (C, 1, 1)
        assert [r.args[1:] for r in reshapes] == ([] if reader == "layer_norm" else [(16, 1, 1)])
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_through_the_pipeline_a_conv_bias_joins_the_layernorm_kernel():
    import functools

    from fxopt.passes import Pass, default_pipeline

    model = _DepthwiseLayerNorm().eval()
    x = torch.randn(1, 16, 7, 7)
    passes = [Pass("fuse_epilogues", functools.partial(fuse_epilogues, bias_devices=_HERE), "")
              if p.name == "fuse_epilogues" else p for p in default_pipeline("cpp")]
    opt = fxopt.optimize(model, (x,), passes=passes, strict=True)
    assert {r.name: r for r in opt.records}["fuse_epilogues"].changes == {"conv_bias_to_tail": 1}
    kernels = [k for k in opt.kernels.values()]
    assert len(kernels) == 1 and kernels[0].op_names[:2] == ["add", "layer_norm"]
    ops_run = dispatched_ops(opt, [x])
    assert "add" not in ops_run and "add_" not in ops_run, ops_run
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)


# -- NOTE [Conv bias into the next convolution] --------------------------------------------------------------------
class _StageBoundary(nn.Module):
    """A projection convolution whose output only convolutions without padding read (EfficientNet's stage start:
    the next block's 1x1 expansion), one of them with a SiLU tail."""

    def __init__(self, k=1, stride=1, dilation=1, second_padding=0, groups=1):
        super().__init__()
        self.project = nn.Conv2d(4, 6, 3, padding=1)
        self.expand = nn.Conv2d(6, 12, 1)
        self.other = nn.Conv2d(6, 6, k, stride=stride, dilation=dilation, padding=second_padding, groups=groups)

    def forward(self, x):
        y = self.project(x)
        return F.silu(self.expand(y)), self.other(y)


def _through(model, x, devices=_HERE):
    gm = fxopt.capture(model.eval(), [x])
    result = fuse_epilogues(gm, bias_devices=devices)
    gm = result.graph_module
    gm.recompile()
    return result, gm


@pytest.mark.parametrize("k, stride, dilation", [(1, 1, 1), (2, 2, 1), (3, 1, 2), (3, 2, 1)])
def test_a_convolution_bias_goes_through_the_convolutions_that_read_it(k, stride, dilation):
    model, x = _StageBoundary(k, stride, dilation), torch.randn(2, 4, 9, 9)
    result, gm = _through(model, x)
    assert result.modified
    convs = [n for n in gm.graph.nodes if n.target in (torch.conv2d, F.conv2d)]
    assert len(convs) == 3 and convs[0].args[2] is None  # the projection runs without its bias
    with torch.no_grad():
        for got, want in zip(gm(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.project.bias is not None and model.expand.bias.shape == (12,)  # the user's model is untouched


@pytest.mark.parametrize("case", ["padding", "groups", "residual", "cpu_by_default"])
def test_a_convolution_bias_stays_where_a_reader_would_not_see_it_exactly(case):
    """A reader with padding (its border windows hold zeros, not the bias), a grouped one, a non-convolution
    reader (a residual add), or the CPU (the rule is on for CUDA, where ATen adds the bias with its own kernel)."""
    if case == "residual":
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.project, self.expand = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 1)

            def forward(self, x):
                y = self.project(x)
                return self.expand(y) + y

        model = M()
    else:
        model = _StageBoundary(3, second_padding=1 if case == "padding" else 0, groups=2 if case == "groups" else 1)
    x = torch.randn(1, 4, 8, 8)
    result, gm = _through(model, x, devices=BIAS_IN_TAIL_DEVICES if case == "cpu_by_default" else _HERE)
    assert any(n.op == "call_module" and n.target == "project" for n in gm.graph.nodes)  # with its bias
    with torch.no_grad():
        got, want = gm(x), model(x)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_on_cuda_the_projection_bias_costs_no_kernel(dtype):
    model = _StageBoundary().to("cuda", dtype).eval()
    x = torch.randn(1, 4, 28, 28, device="cuda", dtype=dtype)
    opt = fxopt.optimize(model, (x,), strict=True)
    assert {r.name: r for r in opt.records}["fuse_epilogues"].changes.get("conv_bias_to_next_conv") == 1
    with torch.no_grad():
        for got, want in zip(opt(x), model(x)):
            torch.testing.assert_close(got, want, rtol=2e-3 if dtype == torch.float16 else 1e-4, atol=2e-3)
    ours = fxopt.count_launches(opt, (x,)).cuda_kernels_by_name
    eager = fxopt.count_launches(model, (x,)).cuda_kernels_by_name
    assert sum(ours.values()) < sum(eager.values()), (ours, eager)


# -- NOTE [Grouped convolutions keep their ReLU apart] -------------------------------------------------------------
class _DepthwiseBlock(nn.Module):
    """MobileNetV3's early block: 1x1 expand + ReLU, depthwise 3x3 + ReLU, 1x1 project, residual."""

    def __init__(self, c=8, e=16):
        super().__init__()
        self.expand = nn.Conv2d(c, e, 1)
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e)
        self.project = nn.Conv2d(e, c, 1)

    def forward(self, x):
        return x + self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_grouped_float16_convolution_keeps_its_relu_apart(monkeypatch, dtype):
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    model, x = _DepthwiseBlock().eval(), torch.randn(1, 8, 6, 6)
    gm = fxopt.capture(model, [x])
    for node in gm.graph.nodes:  # as if on CUDA, in dtype: the pass reads the recorded device and dtype only
        if "device" in node.meta:
            node.meta["device"] = torch.device("cuda")
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "_replace"):
            node.meta["tensor_meta"] = tm._replace(dtype=dtype)
    result = fuse_epilogues(gm, bias_devices=frozenset())
    fused = [n for n in result.graph_module.graph.nodes if n.target is torch.cudnn_convolution_relu]
    geometry = [n.args[6] for n in fused]  # groups
    assert geometry == ([1] if dtype == torch.float16 else [1, 16])  # the expand always; the depthwise at fp32
