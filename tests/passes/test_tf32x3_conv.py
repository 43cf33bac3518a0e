"""tf32x3_convolutions (NOTE [3xTF32 convolutions], fxopt/passes/tf32x3.py): the stacked weight against the split
per group, ``fxopt::conv_tf32``'s epilogues on the CPU and under fake tensors, the rewrite with a stand-in timer
against eager for each spelling and geometry, what it leaves alone, its place in the pipeline, a saved module; on a
GPU TF32 engaged and the cuDNN switch put back, and ResNet-style blocks (cuDNN's fused ReLU and residual calls)
inside CUDA graphs against eager, measured and forced."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.ops.elementwise import tf32_hi, tf32_lo
from fxopt.passes import Pass, build_pipeline
from fxopt.passes.tf32x3 import Tf32x3Convolutions, stacked_conv_weight
from fxopt.runtime.tf32 import conv_tf32_op
from tests.passes.gemm_pipeline import pipeline_with


def _split(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[x_hi | x_lo | x_hi] per group along the channels, in eager ops."""
    N, C, H, W = x.shape
    parts = [p.view(N, groups, 1, C // groups, H, W) for p in (tf32_hi(x), tf32_lo(x), tf32_hi(x))]
    return torch.cat(parts, 2).reshape(N, 3 * C, H, W)


@pytest.mark.parametrize("groups, stride, padding, dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (4, 1, 2, 2), (1, 3, 1, 1)])
def test_the_stacked_weight_against_the_split_is_the_convolution_to_float32s_accuracy(groups, stride, padding,
                                                                                        dilation):
    g = torch.Generator().manual_seed(groups * 10 + stride)
    x, w = torch.randn(2, 32, 13, 11, generator=g), torch.randn(24, 32 // groups, 3, 3, generator=g)
    got = F.conv2d(_split(x, groups), stacked_conv_weight(w), None, stride, padding, dilation, groups)
    want = F.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6


def test_conv_tf32_on_the_cpu_applies_the_graphs_epilogue_and_traces():
    x, w, b = torch.randn(2, 8, 7, 7), torch.randn(6, 8, 3, 3), torch.randn(6)
    z = torch.randn(2, 6, 7, 7)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    y = F.conv2d(x, w, b, 1, 1)
    torch.testing.assert_close(conv_tf32_op(x, w, b, *geometry), y)
    torch.testing.assert_close(conv_tf32_op(x, w, b, *geometry, None, 1.0, True), torch.relu(y))
    torch.testing.assert_close(conv_tf32_op(x, w, b, *geometry, z, 0.5, True), torch.relu(y + 0.5 * z))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = conv_tf32_op(torch.empty(2, 24, 9, 9), torch.empty(6, 12, 3, 3), None, [2, 2], [0, 0], [1, 1], 2)
        assert out.shape == (2, 6, 4, 4)


_USER_CUDNN_TF32 = {  # ways a user sets cuDNN's TF32 before calling the model
    "untouched": "",
    "legacy_off": "torch.backends.cudnn.allow_tf32 = False",
    "legacy_on": "torch.backends.cudnn.allow_tf32 = True",
    "conv_new_api": "torch.backends.cudnn.conv.fp32_precision = 'ieee'",
    "cudnn_new_api": "torch.backends.cudnn.fp32_precision = 'ieee'",
    "global_new_api": "torch.backends.fp32_precision = 'ieee'",
}


@pytest.mark.parametrize("setting", list(_USER_CUDNN_TF32))
def test_the_cudnn_tf32_switch_is_put_back_as_the_user_set_it(setting):
    """conv_tf32's switch (runtime/tf32.py) in a fresh process per setting: inside it the convolution's precision is
    TF32, after it both APIs read as before, whichever the user set (the new API's conv precision alone makes the
    legacy getter raise: the switch then uses the new API only)."""
    import subprocess
    import sys

    script = f"""
import torch, fxopt
from fxopt.runtime.tf32 import _tf32
{_USER_CUDNN_TF32[setting]}
from fxopt.runtime.tf32 import _legacy_switch, tf32_allowed
c = torch.backends.cudnn
state = lambda: (_legacy_switch("cudnn"), c.conv.fp32_precision, c.rnn.fp32_precision, c.fp32_precision,
                 torch.backends.fp32_precision)
before = state()
with _tf32("cudnn"):
    assert tf32_allowed("cudnn") and c.conv.fp32_precision == "tf32"
assert state() == before, (state(), before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


class Blocks(nn.Module):
    """A stem conv + BatchNorm + ReLU, a grouped conv with a residual, a strided dilated functional conv, a 1x1 conv,
    and a depthwise conv (too few channels per group: not tried)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.w = nn.Parameter(torch.randn(48, 32, 3, 3) / 17)
        self.point = nn.Conv2d(48, 32, 1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.grouped(y) + y)
        y = F.conv2d(y, self.w, None, 2, 2, 2)
        return self.depthwise(self.point(y)).sigmoid()


def _blocks() -> nn.Module:
    m = Blocks().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def _pass(win: bool, calls: list | None = None, graphs_only: bool = False, split_error: float = 1e-6,
          channels_last_wins: bool = False) -> Pass:
    """A stand-in timer: float32 at 10 µs, 3xTF32 in NCHW at 5 (``win``) or 20, in channels-last at 3 where
    ``channels_last_wins``, else 30; errors against float64 1e-7 for float32, ``split_error`` for both forms."""
    def timer(device, conv):
        if calls is not None:
            calls.append(conv.key(device))
        times = {"float32": 10.0, "NCHW": 5.0 if win else 20.0, "channels-last": 3.0 if channels_last_wins else 30.0}
        return times, {"float32": 1e-7, "NCHW": split_error, "channels-last": split_error}
    return Pass("tf32x3_convolutions", Tf32x3Convolutions(graphs_only=graphs_only, devices=("cpu",), timer=timer))


def _record(opt):
    return next(r for r in opt.records if r.name == "tf32x3_convolutions")


def test_convolutions_that_win_become_the_split_and_a_tf32_convolution_with_eagers_result():
    model, x, calls = _blocks(), torch.randn(2, 16, 15, 13), []
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, calls)), strict=True)
    assert _record(opt).changes == {"convolutions": 4}, _record(opt).notes
    assert sorted(c[8] for c in calls) == [1, 1, 1, 4]  # groups; the depthwise conv not timed
    code = opt.graph_module.code
    assert code.count("torch.ops.fxopt.conv_tf32") == 4
    assert code.count("torch.conv2d(") == 1 and "[1, 1], 32)" in code  # the depthwise conv (its bias moved to the tail)
    assert "torch.ops.fxopt.tf32_hi" not in code and "torch.where" not in code  # the split: generated kernels
    with torch.no_grad():
        for _ in range(3):
            y = torch.randn_like(x)
            torch.testing.assert_close(opt(y), model(y), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(15, 13), (7, 7)])
def test_the_channels_last_form_where_it_wins_computes_eagers_result(size):
    """The parts written channels-last through a permute of x, the weight stored channels-last, the output copied
    back to NCHW (NOTE [3xTF32 convolutions in channels-last])."""
    model, x = _blocks(), torch.randn(2, 16, *size)
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, channels_last_wins=True)), strict=True)
    record = _record(opt)
    assert record.changes == {"convolutions": 4, "channels_last": 4}, record.notes
    assert all("-> 3xTF32 channels-last" in n for n in record.notes if "->" in n)
    code = opt.graph_module.code
    assert code.count("torch.ops.fxopt.conv_tf32") == 4 and code.count(".contiguous()") >= 4
    weights = [getattr(opt.graph_module, n) for n, _ in opt.graph_module.named_buffers() if "tf32x3_weight" in n]
    assert len(weights) == 4 and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    with torch.no_grad():
        for _ in range(3):
            y = torch.randn_like(x)
            got = opt(y)
            torch.testing.assert_close(got, model(y), atol=1e-5, rtol=1e-4)
            assert got.is_contiguous()
    seen, written = [], set()  # each conv_tf32 reads its split kernel's output itself, dense in NHWC: no copy

    class Watch(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is conv_tf32_op:
                seen.append(args[0].is_contiguous(memory_format=torch.channels_last) and args[0].data_ptr() in written)
            out = super().call_function(target, args, kwargs)
            if target is torch.ops.fxopt.fused.default:
                written.update(t.data_ptr() for t in out)
            return out

    with torch.no_grad():
        Watch(opt.specialization_for((x,)).graph_module).run(x)
    assert seen == [True] * 4


class FusedCalls(nn.Module):
    """What fuse_epilogues writes on a GPU: cuDNN's conv + bias + ReLU and conv + bias + residual + ReLU calls."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 8, 3, 3) / 9), nn.Parameter(torch.randn(16))
        self.w2, self.b2 = nn.Parameter(torch.randn(16, 16, 1, 1) / 4), nn.Parameter(torch.randn(16))

    def forward(self, x, z):
        y = torch.cudnn_convolution_relu(x, self.w1, self.b1, [1, 1], [1, 1], [1, 1], 1)
        return torch.cudnn_convolution_add_relu(y, self.w2, z, 0.5, self.b2, [1, 1], [0, 0], [1, 1], 1)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels-last"])
def test_cudnns_fused_calls_keep_their_bias_residual_and_relu(channels_last):
    """Read from a traced graph (cuDNN's calls do not run on the CPU: the meta is set by hand) and rewritten; the CPU's
    conv_tf32 then computes relu(conv + bias + alpha * residual) as cuDNN's calls define it."""
    from fxopt.ops import set_tensor_meta
    from fxopt.passes import tf32x3

    model, x, z = FusedCalls().eval(), torch.randn(2, 8, 9, 7), torch.randn(2, 16, 9, 7)
    gm = torch.fx.symbolic_trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    set_tensor_meta(nodes["x"], x, torch.device("cpu"))
    set_tensor_meta(nodes["z"], z, torch.device("cpu"))
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            set_tensor_meta(n, getattr(model, n.target), torch.device("cpu"))
    convs = [n for n in gm.graph.nodes if n.op == "call_function"]
    for n in convs:
        set_tensor_meta(n, torch.empty(2, 16, 9, 7), torch.device("cpu"))
    first = tf32x3._as_conv(gm, convs[0], ("cpu",))
    assert first.relu and first.residual is None and first.bias.target == "b1" and first.groups == 1
    tf32x3._rewrite_conv(gm, first, channels_last=channels_last)
    second = tf32x3._as_conv(gm, convs[1], ("cpu",))
    assert second.relu and second.residual is nodes["z"] and second.alpha == 0.5 and second.padding == (0, 0)
    tf32x3._rewrite_conv(gm, second, channels_last=channels_last)
    gm.graph.lint()
    gm.recompile()
    assert gm.code.count("torch.ops.fxopt.conv_tf32") == 2 and "torch.cudnn" not in gm.code
    with torch.no_grad():
        y = torch.relu(F.conv2d(x, model.w1, model.b1, 1, 1))
        want = torch.relu(F.conv2d(y, model.w2, model.b2) + 0.5 * z)
        torch.testing.assert_close(gm(x, z), want, atol=1e-5, rtol=1e-5)


def test_convolutions_that_lose_inaccurate_forms_and_other_dtypes_stay():
    model, x = _blocks(), torch.randn(2, 16, 15, 13)
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(False)), strict=True)
    assert _record(opt).changes == {"kept_float32": 4} and "conv_tf32" not in opt.graph_module.code
    assert all("stays float32" in n and "µs" in n for n in _record(opt).notes)
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, split_error=1e-4)), strict=True)
    assert _record(opt).changes == {"kept_float32": 4} and "conv_tf32" not in opt.graph_module.code
    assert all("3xTF32 inaccurate here" in n for n in _record(opt).notes)  # 1000 times float32's error
    calls = []
    opt = fxopt.optimize(_blocks().double(), (x.double(),), passes=pipeline_with(_pass(True, calls)), strict=True)
    assert "conv_tf32" not in opt.graph_module.code and calls == []


def test_channels_last_inputs_take_only_the_channels_last_form_and_keep_eagers_layout():
    """x dense in NHWC: no copy of it before the split, the output left channels-last, as eager's is; the NCHW form
    (which would read x across its layout) is not a candidate."""
    model, x = _blocks(), torch.randn(2, 16, 15, 13).contiguous(memory_format=torch.channels_last)
    calls = []
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, calls)), strict=True)  # NCHW would win
    assert _record(opt).changes == {"kept_float32": 4} and all(c[2] for c in calls)  # all timed as channels-last
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, channels_last_wins=True)), strict=True)
    assert _record(opt).changes == {"convolutions": 4, "channels_last": 4}
    code = opt.graph_module.code
    assert "memory_format" not in code and ".contiguous()" not in code  # neither copy
    with torch.no_grad():
        for _ in range(3):
            y = torch.randn_like(x)
            got, want = opt(y), model(y)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            assert got.stride() == want.stride()


def test_without_cuda_graphs_the_pass_notes_and_leaves_the_graph():
    model, x = _blocks(), torch.randn(2, 16, 15, 13)
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, graphs_only=True)), strict=True)
    record = _record(opt)
    assert record.status == "unchanged" and "without CUDA graphs" in record.notes[0]


@pytest.mark.parametrize("form", ["NCHW", "channels-last"])
def test_a_saved_module_loads_and_runs(form, tmp_path):
    """Both forms' graphs (the channels-last one with its ``contiguous(memory_format=...)`` copy) survive save/load."""
    model, x = _blocks(), torch.randn(2, 16, 15, 13)
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, channels_last_wins=form != "NCHW")),
                         strict=True)
    assert ("memory_format" in opt.graph_module.code) == (form != "NCHW")
    fxopt.save(opt, tmp_path / "m")
    loaded = fxopt.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), opt(x), rtol=0, atol=0)


@pytest.mark.parametrize("x_channels_last", [False, True], ids=["x-NCHW", "x-NHWC"])
@pytest.mark.parametrize("epilogue", ["none", "relu", "add_relu"])
def test_the_timed_candidates_run_in_the_convolutions_shape(epilogue, x_channels_last, monkeypatch):
    """What _timed_conv times, run once on the CPU (the device's timer and context and cuDNN's fused calls stubbed):
    each candidate yields the convolution's output shape."""
    from fxopt.passes import tf32x3
    from fxopt.runtime import probe, tf32

    results = []

    def run_once(fns):
        results.extend(fn() for fn in fns)
        return [1.0] * len(fns)

    monkeypatch.setattr(probe, "graph_times_us", run_once)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(tf32x3, "_conv_decisions", {})
    monkeypatch.setattr(tf32x3, "graph_conv", tf32.reference_conv)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    example = torch.empty(1, 24, 9, 9)
    if x_channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    x.meta["tensor_meta"] = torch.fx.passes.shape_prop._extract_tensor_metadata(example)
    conv = tf32x3._Conv(None, x, torch.empty(16, 12, 3, 3), "b", ((2, 2), (1, 1), (1, 1), 2),
                        residual=object() if epilogue == "add_relu" else None, alpha=1.0, relu=epilogue != "none")
    times, errors = tf32x3._timed_conv(torch.device("cpu"), conv)
    forms = ["float32", "channels-last"] if x_channels_last else ["float32", "NCHW", "channels-last"]
    assert list(times) == list(errors) == forms
    assert max(errors.values()) < 1e-6  # the CPU's conv_tf32: float32 throughout
    assert len(results) == len(forms) and all(got.shape == (1, 16, 5, 5) for got in results)
    # the channels-last form's output in x's layout: back in NCHW for an NCHW x, left channels-last for an NHWC one
    assert results[-1].is_contiguous(memory_format=torch.channels_last if x_channels_last else torch.contiguous_format)


def test_the_pass_comes_with_cuda_graphs_and_runs_after_fuse_epilogues():
    assert "tf32x3_convolutions" not in [p.name for p in build_pipeline(None, "auto")]
    assert "tf32x3_convolutions" in fxopt.api.GRAPH_DEFAULT_PASSES
    names = [p.name for p in build_pipeline(None, "auto", enable=["tf32x3_convolutions"])]
    assert names[names.index("fuse_epilogues") + 1] == "tf32x3_convolutions"


# -- on a GPU ---------------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: after fold_batchnorm and fuse_epilogues, cuDNN's conv + bias + ReLU and conv
    + bias + residual + ReLU calls."""

    def __init__(self, c=256, mid=64):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.c2, self.b2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.c3, self.b3 = nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        return torch.relu(self.b3(self.c3(y)) + x)


@pytest.fixture
def tf32_off():
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.mark.cuda
def test_on_cuda_conv_tf32_runs_tf32_and_the_split_gives_float32s_accuracy(tf32_off):
    x = torch.randn(1, 256, 14, 14, device="cuda")
    w = torch.randn(256, 256, 3, 3, device="cuda") / 48
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    want = F.conv2d(x.double(), w.double(), None, 1, 1)

    def err(y):
        return ((y.double() - want).abs().max() / want.abs().max()).item()

    before = (torch._C._get_cudnn_allow_tf32(), torch.backends.cudnn.conv.fp32_precision)
    plain, split = conv_tf32_op(x, w, None, *geometry), conv_tf32_op(_split(x, 1), stacked_conv_weight(w), None, *geometry)
    assert (torch._C._get_cudnn_allow_tf32(), torch.backends.cudnn.conv.fp32_precision) == before
    assert err(plain) > 1e-5  # TF32's 10-bit mantissa: the switch took effect
    assert err(split) < 3e-5 and err(F.conv2d(x, w, None, 1, 1)) < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("forced", [False, "any", "channels-last"], ids=["measured", "forced", "forced-channels-last"])
def test_on_cuda_with_graphs_3xtf32_convolutions_compute_eagers_result(forced, tf32_off, monkeypatch):
    """A ResNet bottleneck at batch 1 (56x56) and the CPU tests' blocks: every convolution timed (a note with both
    times each); forced, all but the depthwise one take 3xTF32, cuDNN's fused calls among them; eager's result at
    float32's tolerance either way."""
    from fxopt.passes import tf32x3

    if forced:
        monkeypatch.setattr(tf32x3, "MIN_GAIN", 1e9)
    if forced == "channels-last":
        monkeypatch.setattr(tf32x3, "FORMS", ("channels-last",))
    for model, x, convs in ((Bottleneck(), torch.randn(1, 256, 56, 56), 3), (_blocks(), torch.randn(1, 16, 30, 30), 4)):
        model = model.eval().cuda()
        x = x.cuda()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
        opt = fxopt.optimize(model, (x,), cuda_graphs=True, strict=True)  # on by default with graphs
        record = _record(opt)
        assert len(record.notes) == convs and all("µs" in n for n in record.notes), record.notes
        if forced:  # every one taken but where cuDNN's TF32 algorithm measured inaccurate
            taken = record.changes.get("convolutions", 0)
            assert taken + sum("inaccurate" in n for n in record.notes) == convs, record.notes
            code = opt.graph_module.code
            assert code.count("torch.ops.fxopt.conv_tf32") == taken
            if forced == "channels-last":
                assert record.changes.get("channels_last", 0) == taken
            if isinstance(model, Bottleneck) and taken == convs:
                assert code.count(", True)") == 3  # every one with cuDNN's ReLU (the last with the residual)
        with torch.no_grad():
            for _ in range(3):
                y = torch.randn_like(x)
                torch.testing.assert_close(opt(y), model(y), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_on_cuda_where_the_process_allows_tf32_the_convolutions_stay():
    flag = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        model, x = Bottleneck().eval().cuda(), torch.randn(1, 256, 28, 28, device="cuda")
        opt = fxopt.optimize(model, (x,), cuda_graphs=True, enable=["tf32x3_convolutions"], strict=True)
        record = _record(opt)
        assert record.status == "unchanged" and "allows TF32" in record.notes[0]
    finally:
        torch.backends.cudnn.allow_tf32 = flag
