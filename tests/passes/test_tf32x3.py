"""tf32x3_linears (NOTE [3xTF32 GEMMs], fxopt/passes/tf32x3.py): the split's arithmetic (exact parts, non-finite
values) in eager and in generated C++, the rewrite on the CPU with a stand-in timer against eager (both forms; the
split in its producer's kernel), what it leaves alone, its place in the pipeline, a saved and loaded module; on a GPU
the generated split through NVRTC, the TF32 switch put back, and the measured and the forced choice inside CUDA
graphs against eager."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.ops.elementwise import tf32_hi
from fxopt.passes import Pass, build_pipeline
from fxopt.passes.tf32x3 import Tf32x3Linears, stacked_weight
from fxopt.runtime.tf32 import mm_tf32_op
from tests.passes.gemm_pipeline import pipeline_with
from tests.passes.test_gemm_layout import Attention, Conv1DAttention, ScaledMlp


def _split_reference(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    hi = torch.where(torch.isfinite(x2), tf32_hi(x2), x2)
    lo = torch.where(torch.isfinite(x2), x2 - hi, torch.zeros_like(x2))
    return torch.cat([hi, lo, hi], 1)


def test_the_parts_are_exact_and_add_up():
    x = torch.randn(1000) * torch.logspace(-30, 30, 1000)
    hi, lo = torch.ops.fxopt.tf32_hi(x), torch.ops.fxopt.tf32_lo(x)
    assert torch.equal(hi + lo, x)
    assert torch.equal(hi.view(torch.int32) & 0x1FFF, torch.zeros(1000, dtype=torch.int32))
    assert (lo.abs() <= x.abs() * 2.0 ** -11).all()  # rounded to the nearest: half a TF32 unit at most
    positive = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 10
    rest = torch.ops.fxopt.tf32_lo(positive)  # of either sign: a truncated split's would all be >= 0 here and add up
    assert (rest > 0).any() and (rest < 0).any() and abs(rest.mean().item()) < 0.02 * rest.abs().mean().item()
    largest = torch.tensor([3.4028234e38, -3.4028234e38])  # rounding up would overflow: truncated, still exact
    assert torch.isfinite(torch.ops.fxopt.tf32_hi(largest)).all()
    assert torch.equal(torch.ops.fxopt.tf32_hi(largest) + torch.ops.fxopt.tf32_lo(largest), largest)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    assert torch.equal(torch.ops.fxopt.tf32_lo(special), torch.zeros(5))
    torch.testing.assert_close(torch.ops.fxopt.tf32_hi(special), special, equal_nan=True)


def test_the_generated_split_computes_the_eager_ops():
    """The op table's C++ (fx_tf32_hi, fx_tf32_lo) against the eager ops, with non-finite values and subnormals."""
    class Split(torch.nn.Module):
        def forward(self, x):
            y = x * 2.0
            return torch.ops.fxopt.tf32_hi(y) * 3.0, torch.ops.fxopt.tf32_lo(y) * 3.0

    x = torch.randn(7, 33) * torch.logspace(-40, 30, 33)
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-42])
    opt = fxopt.optimize(Split(), (x,), strict=True)
    assert "torch.ops.fxopt.fused" in opt.graph_module.code
    for got, want in zip(opt(x), Split()(x)):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def test_the_stacked_weight_times_the_split_is_the_product_to_float32s_accuracy():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 96, generator=g), torch.randn(96, 50, generator=g)
    got = _split_reference(x) @ stacked_weight(w)
    want = x.double() @ w.double()
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6


def test_mm_tf32_on_the_cpu_is_the_float32_product_and_traces():
    x, w, b = torch.randn(5, 12), torch.randn(12, 7), torch.randn(7)
    torch.testing.assert_close(mm_tf32_op(x, w), x @ w)
    torch.testing.assert_close(mm_tf32_op(x, w, b), torch.addmm(b, x, w))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert mm_tf32_op(torch.empty(5, 12), torch.empty(12, 7)).shape == (5, 7)


_USER_TF32 = {  # ways a user sets TF32 before calling the model
    "untouched": "",
    "legacy_off": "torch.backends.cuda.matmul.allow_tf32 = False",
    "legacy_on": "torch.backends.cuda.matmul.allow_tf32 = True",
    "new_api": "torch.backends.cuda.matmul.fp32_precision = 'ieee'",
    "global_new_api": "torch.backends.fp32_precision = 'ieee'",
    "matmul_precision": "torch.set_float32_matmul_precision('high')",
}


@pytest.mark.parametrize("setting", list(_USER_TF32))
def test_mm_tf32_puts_the_tf32_switch_back_as_the_user_set_it(setting):
    """The switch is process-wide, so each setting in a fresh process: after the op, both APIs read as before and
    the legacy getter (what cuBLAS calls) does not raise over mixed APIs."""
    import subprocess
    import sys

    script = f"""
import torch, fxopt
from fxopt.runtime.tf32 import _mm_tf32_cuda
{_USER_TF32[setting]}
m = torch.backends.cuda.matmul
state = lambda: (torch._C._get_cublas_allow_tf32(), m.fp32_precision, torch.get_float32_matmul_precision(),
                 torch.backends.fp32_precision)
before = state()
_mm_tf32_cuda(torch.randn(3, 4), torch.randn(4, 2))
assert state() == before, (state(), before)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


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
    assert code.count("torch.ops.fxopt.mm_tf32") == rows and "torch._C._nn.linear" not in code \
        and "torch.addmm" not in code
    assert "torch.ops.fxopt.tf32_hi" not in code and "torch.where" not in code  # the split: generated kernels
    with torch.no_grad():
        for _ in range(3):
            y = torch.randn_like(x)
            torch.testing.assert_close(opt(y), model(y), atol=1e-4, rtol=1e-4)


def test_gemms_read_by_elementwise_ops_take_the_stacked_form_where_it_wins():
    """ScaledMlp's two GEMMs (their biases moved into the tails): the stacked parts, one batched GEMM, the three
    products added in the tail's kernel, the second split in the first tail's kernel; Attention's GEMMs (a reshape
    and the graph's output read them) are timed side by side only."""
    model, x, calls = ScaledMlp().eval(), torch.randn(2, 9, 64), []
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, calls, stacked_wins=True)), strict=True)
    assert _record(opt).changes == {"gemms": 2, "stacked": 2}
    assert [c[-1] for c in calls] == [True, True]
    code = opt.graph_module.code
    assert code.count("torch.ops.fxopt.mm_tf32") == 2 and code.count(".unbind(0)") == 2
    def kernels(o):
        return o.graph_module.code.count("torch.ops.fxopt.fused.default")

    side = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True)), strict=True)
    plain = fxopt.optimize(model, (x,), passes=pipeline_with(), strict=True)
    # stacked, the first split is a kernel of its own (x is the graph's input) and the second joins the GELU tail's
    # kernel; side by side, each split is a kernel of its own
    assert kernels(opt) == kernels(plain) + 1 and kernels(side) == kernels(plain) + 2
    with torch.no_grad():
        for _ in range(3):
            y = torch.randn_like(x)
            torch.testing.assert_close(opt(y), model(y), atol=1e-4, rtol=1e-4)
    calls = []
    fxopt.optimize(Attention().eval(), (x,), passes=pipeline_with(_pass(True, calls, stacked_wins=True)), strict=True)
    assert [c[-1] for c in calls] == [False, False]  # both read by reshapes or the output: no tail to add in


def test_a_biased_gemm_read_through_a_reshape_stays_side_by_side():
    """Fuzz seed 7800324: a biased Linear whose output is reshaped before its elementwise readers; stacked, its bias
    would be added in the reshape's shape, so only the side-by-side form is timed."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 6)

        def forward(self, x):
            return torch.relu(self.fc(x).reshape(-1, 48)) * 2.0

    model, x, calls = Model().eval(), torch.randn(3, 4, 2, 8), []
    opt = fxopt.optimize(model, (x,), passes=pipeline_with(_pass(True, calls, stacked_wins=True)), strict=True)
    assert [c[-1] for c in calls] == [False] and _record(opt).changes == {"gemms": 1}
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("layout, bias", [("nk", True), ("nk", False), ("kn", True), ("kn", False)])
def test_the_timed_candidates_run_in_the_gemms_shape(layout, bias, monkeypatch):
    """What _timed times, run once on the CPU (the device's timer and context stubbed): each candidate yields the
    GEMM's output shape (the stacked one summed as the tail will). The split is timed as a ``where`` of x with itself
    (its reads and writes, not its values)."""
    import contextlib

    from fxopt.passes import tf32x3
    from fxopt.runtime import probe

    results = []

    def run_once(fns):
        results.extend(fn() for fn in fns)
        return [1.0] * len(fns)

    monkeypatch.setattr(probe, "graph_times_us", run_once)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(tf32x3, "_decisions", {})
    times = tf32x3._timed(torch.device("cpu"), 12, 40, 24, bias, layout, True)
    assert len(times) == 4 and len(results) == 4
    assert all(got.shape == (12, 24) for got in results)


def test_the_pass_is_opt_in_and_runs_first_after_fuse_epilogues():
    assert "tf32x3_linears" not in [p.name for p in build_pipeline(None, "auto")]
    names = [p.name for p in build_pipeline(None, "auto", enable=["split_k_linears", "gemm_weight_layouts",
                                                                     "tf32x3_linears"])]
    position = names.index("fuse_epilogues")
    assert names[position + 1: position + 4] == ["tf32x3_linears", "gemm_weight_layouts", "split_k_linears"]


@pytest.mark.cuda
def test_on_cuda_the_split_and_mm_tf32_give_float32s_accuracy_and_put_the_switch_back():
    class Split(torch.nn.Module):
        def forward(self, x):
            y = x * 2.0
            return torch.ops.fxopt.tf32_hi(y) * 3.0, torch.ops.fxopt.tf32_lo(y) * 3.0

    x = torch.randn(3, 197, 768, device="cuda") * 100
    x.view(-1)[5], x.view(-1)[7] = float("inf"), float("nan")
    opt = fxopt.optimize(Split(), (x,), strict=True)
    for got, want in zip(opt(x), Split()(x)):  # NVRTC's
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    before = (torch._C._get_cublas_allow_tf32(), torch.backends.cuda.matmul.fp32_precision)
    a, w = torch.randn(197, 768, device="cuda"), torch.randn(768, 2304, device="cuda") / 768 ** 0.5
    parts = torch.cat([tf32_hi(a), torch.ops.fxopt.tf32_lo(a), tf32_hi(a)], 1)
    got = mm_tf32_op(parts, stacked_weight(w))
    assert (torch._C._get_cublas_allow_tf32(), torch.backends.cuda.matmul.fp32_precision) == before
    want = a.double() @ w.double()
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 3e-5


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
