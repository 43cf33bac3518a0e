"""tf32x3_linears (NOTE [3xTF32 GEMMs], fxopt/passes/tf32x3.py): the split's arithmetic (exact parts, non-finite
values), the split kernel's C++ twin and its checks, the rewrite on the CPU with a stand-in timer against eager, what
it leaves alone, its place in the pipeline, a saved and loaded module; on a GPU the kernel through NVRTC, the TF32
switch put back, and the measured and the forced choice inside CUDA graphs against eager."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.codegen.tf32_split import Tf32SplitProgram
from fxopt.passes import Pass, build_pipeline
from fxopt.passes.tf32x3 import Tf32x3Linears, stacked_weight, tf32_hi
from fxopt.runtime.tf32 import Tf32SplitKernel, mm_tf32_op, tf32_split_kernel
from tests.passes.gemm_pipeline import pipeline_with
from tests.passes.test_gemm_layout import Attention, Conv1DAttention, ScaledMlp


def _split_reference(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    hi = torch.where(torch.isfinite(x2), tf32_hi(x2), x2)
    lo = torch.where(torch.isfinite(x2), x2 - hi, torch.zeros_like(x2))
    return torch.cat([hi, lo, hi], 1)


def test_the_parts_are_exact_and_add_up():
    x = torch.randn(1000) * torch.logspace(-30, 30, 1000)
    hi = tf32_hi(x)
    assert torch.equal(hi + (x - hi), x)
    assert torch.equal(hi.view(torch.int32) & 0x1FFF, torch.zeros(1000, dtype=torch.int32))
    assert ((x - hi).abs() <= x.abs() * 2.0 ** -10).all()


def test_the_stacked_weight_times_the_split_is_the_product_to_float32s_accuracy():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 96, generator=g), torch.randn(96, 50, generator=g)
    got = _split_reference(x) @ stacked_weight(w)
    want = x.double() @ w.double()
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 64), (1, 1), (4, 0, 8)])
def test_the_cpp_kernel_splits_rows_of_any_leading_shape(shape):
    kernel = tf32_split_kernel(Tf32SplitProgram("cpp"), torch.device("cpu"))
    x = torch.randn(shape) * 1e3
    if x.numel():
        x.view(-1)[0], x.view(-1)[-1] = float("inf"), float("nan")
    torch.testing.assert_close(kernel([x])[0], _split_reference(x), equal_nan=True, rtol=0, atol=0)


def test_the_kernel_reads_rows_of_a_view_and_refuses_what_it_cannot_address():
    kernel = tf32_split_kernel(Tf32SplitProgram("cpp"), torch.device("cpu"))
    base = torch.randn(6, 40)
    view = base[:, 4:36]  # rows 40 apart
    torch.testing.assert_close(kernel([view])[0], _split_reference(view), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rows of x must be contiguous"):
        kernel([base.t()])
    with pytest.raises(ValueError, match="not one strided run"):
        kernel([torch.randn(4, 6, 8).transpose(0, 1)])
    with pytest.raises(TypeError, match="dtype torch.float64"):
        kernel([torch.randn(3, 4, dtype=torch.float64)])


def test_mm_tf32_on_the_cpu_is_the_float32_product_and_traces():
    x, w, b = torch.randn(5, 12), torch.randn(12, 7), torch.randn(7)
    torch.testing.assert_close(mm_tf32_op(x, w), x @ w)
    torch.testing.assert_close(mm_tf32_op(x, w, b), torch.addmm(b, x, w))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert mm_tf32_op(torch.empty(5, 12), torch.empty(12, 7)).shape == (5, 7)


def _pass(win: bool, calls: list | None = None, graphs_only=False, stacked_wins=False) -> Pass:
    """A stand-in timer: float32 at 10 µs, 3xTF32 side by side at 5 (``win``) or 20; stacked (where the tail can add
    the products) at 3 when ``stacked_wins``, else 30."""
    def timer(device, M, K, N, bias, layout, stacked):
        if calls is not None:
            calls.append((M, K, N, bias, layout, stacked))
        side = (10.0, 5.0 if win else 20.0)
        return side + ((10.0, 3.0 if stacked_wins else 30.0) if stacked else ())
    return Pass("tf32x3_linears", Tf32x3Linears(graphs_only=graphs_only, devices=("cpu",), timer=timer))


def _record(opt):
    return next(r for r in opt.records if r.name == "tf32x3_linears")


@pytest.mark.parametrize("model, rows", [(Attention(), 2), (Conv1DAttention(), 1), (ScaledMlp(), 2)],
                         ids=["linear+bias", "addmm", "bias-free"])
def test_gemms_that_win_become_the_split_and_a_tf32_gemm_with_eagers_result(model, rows):
    model, x, calls = model.eval(), torch.randn(2, 9, 64), []
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, calls)), strict=True)
    record = _record(opt)
    assert record.changes == {"gemms": rows}, record.notes
    assert len(calls) == rows and all(c[0] == 18 for c in calls)
    code = opt.graph_module.code
    assert code.count("torch.ops.fxopt.mm_tf32") == rows and code.count("fxopt_tf32_split") == rows
    assert "torch._C._nn.linear" not in code and "torch.addmm" not in code
    with torch.no_grad():
        for _ in range(3):
            y = torch.randn_like(x)
            torch.testing.assert_close(opt(y), model(y), atol=1e-4, rtol=1e-4)


def test_gemms_read_by_elementwise_ops_take_the_stacked_form_where_it_wins():
    """ScaledMlp's two GEMMs (their biases moved into the tails): the stacked parts, one batched GEMM, the three
    products added in the tail's kernel (no kernel more than side by side); Attention's q/k/v projection (a reshape
    reads it) is timed side by side only."""
    model, x, calls = ScaledMlp().eval(), torch.randn(2, 9, 64), []
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, calls, stacked_wins=True)), strict=True)
    assert _record(opt).changes == {"gemms": 2, "stacked": 2}
    assert [c[-1] for c in calls] == [True, True]
    code = opt.graph_module.code
    assert code.count("torch.ops.fxopt.mm_tf32") == 2 and code.count(".unbind(0)") == 2
    side = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True)), strict=True)
    assert code.count("torch.ops.fxopt.fused.default") == side.graph_module.code.count("torch.ops.fxopt.fused.default")
    with torch.no_grad():
        for _ in range(3):
            y = torch.randn_like(x)
            torch.testing.assert_close(opt(y), model(y), atol=1e-4, rtol=1e-4)
    calls = []
    fxopt.optimize(Attention().eval(), (x,), passes=pipeline_with(_pass(True, calls, stacked_wins=True)), strict=True)
    assert [c[-1] for c in calls] == [False, False]  # both read by reshapes or the output: no tail to add in


def test_the_cpp_kernel_stacks_the_parts():
    kernel = tf32_split_kernel(Tf32SplitProgram("cpp", "", stacked=True), torch.device("cpu"))
    x = torch.randn(2, 5, 24)
    got = kernel([x])[0]
    assert got.shape == (3, 10, 24)
    torch.testing.assert_close(got.permute(1, 0, 2).reshape(10, 72), _split_reference(x), rtol=0, atol=0)


def test_gemms_that_lose_and_other_dtypes_stay_float32():
    model, x = ScaledMlp().eval(), torch.randn(2, 9, 64)
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(False)), strict=True)
    assert _record(opt).changes == {"kept_float32": 2} and "mm_tf32" not in opt.graph_module.code
    calls = []
    model64, x64 = ScaledMlp().double().eval(), torch.randn(2, 9, 64, dtype=torch.float64)
    opt = fxopt.optimize(model64, (x64,), passes=pipeline_with(_pass(True, calls)), strict=True)
    assert calls == [] and "mm_tf32" not in opt.graph_module.code


def test_without_cuda_graphs_the_pass_notes_and_leaves_the_graph():
    model, x = ScaledMlp().eval(), torch.randn(2, 9, 64)
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, graphs_only=True)), strict=True)
    record = _record(opt)
    assert record.status == "unchanged" and "without CUDA graphs" in record.notes[0]


def test_a_saved_module_loads_and_runs(tmp_path):
    model, x = ScaledMlp().eval(), torch.randn(2, 9, 64)
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True)), strict=True)
    fxopt.save(opt, tmp_path / "m")
    loaded = fxopt.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), opt(x), rtol=0, atol=0)


def test_the_pass_is_opt_in_and_runs_first_after_fuse_epilogues():
    assert "tf32x3_linears" not in [p.name for p in build_pipeline(None, "auto")]
    names = [p.name for p in build_pipeline(None, "auto", enable=["split_k_linears", "gemm_weight_layouts",
                                                                     "tf32x3_linears"])]
    position = names.index("fuse_epilogues")
    assert names[position + 1: position + 4] == ["tf32x3_linears", "gemm_weight_layouts", "split_k_linears"]


@pytest.mark.cuda
def test_on_cuda_the_kernel_splits_and_mm_tf32_puts_the_switch_back():
    kernel = tf32_split_kernel(Tf32SplitProgram("cuda", "cuda:0"), torch.device("cuda:0"))
    x = torch.randn(3, 197, 768, device="cuda") * 100
    x.view(-1)[5], x.view(-1)[7] = float("inf"), float("nan")
    torch.testing.assert_close(kernel([x])[0], _split_reference(x), equal_nan=True, rtol=0, atol=0)
    stacked = tf32_split_kernel(Tf32SplitProgram("cuda", "cuda:0", stacked=True), torch.device("cuda:0"))
    torch.testing.assert_close(stacked([x])[0].permute(1, 0, 2).reshape(-1, 3 * 768), _split_reference(x),
                               equal_nan=True, rtol=0, atol=0)
    before = (torch._C._get_cublas_allow_tf32(), torch.backends.cuda.matmul.fp32_precision)
    a, w = torch.randn(197, 768, device="cuda"), torch.randn(768, 2304, device="cuda") / 768 ** 0.5
    got = mm_tf32_op(kernel([a])[0], stacked_weight(w))
    assert (torch._C._get_cublas_allow_tf32(), torch.backends.cuda.matmul.fp32_precision) == before
    want = a.double() @ w.double()
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 3e-5
    assert isinstance(kernel, Tf32SplitKernel)


@pytest.mark.cuda
@pytest.mark.parametrize("forced", [False, True], ids=["measured", "forced"])
def test_on_cuda_with_graphs_3xtf32_computes_eagers_result(forced, monkeypatch):
    """ViT-B-sized attention and MLP at batch 1 (197 rows): every GEMM timed (notes with both times); forced, all take
    3xTF32; either way eager's result at float32's tolerance."""
    from fxopt.passes import tf32x3

    if forced:
        monkeypatch.setattr(tf32x3, "MIN_GAIN", 1e9)
    for model in (Attention(768, 12), ScaledMlp(768, 3072)):
        model = model.eval().cuda()
        x = torch.randn(1, 197, 768, device="cuda")
        opt = fxopt.optimize(model, (x,), cuda_graphs=True, enable=["tf32x3_linears"], strict=True)
        record = _record(opt)
        assert len(record.notes) == 2 and all("µs" in n for n in record.notes), record.notes
        if forced:
            assert record.changes.get("gemms") == 2
        with torch.no_grad():
            for _ in range(3):
                y = torch.randn_like(x)
                torch.testing.assert_close(opt(y), model(y), atol=1e-4, rtol=1e-4)
