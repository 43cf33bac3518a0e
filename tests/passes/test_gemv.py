"""few_row_linears (NOTE [Few-row linears], fxopt/passes/gemv.py) and its kernel (fxopt/codegen/gemv.py): the C++
twin against F.linear on the CPU, the CUDA source through NVRTC, and on a GPU the kernel against cuBLAS and the
decoder's tokens with the measured choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.codegen.gemv import MAX_ROWS, GemvProgram, cuda_source
from fxopt.models.decoder import build_step, greedy_generate
from fxopt.passes import Pass, default_pipeline
from fxopt.passes.gemv import few_row_linears
from fxopt.runtime import nvrtc
from fxopt.runtime.gemv import gemv_kernel

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _check(x, w, b, device, backend):
    kernel = gemv_kernel(GemvProgram(backend, w.dtype, b is not None, str(device) if backend == "cuda" else ""),
                         device)
    got = kernel([x, w] + ([b] if b is not None else []))[0]
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == want.shape and got.dtype == w.dtype and got.is_contiguous()
    scale = want.abs().max().item() + 1
    torch.testing.assert_close(got.double() / scale, want / scale, atol=TOL[w.dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [((1, 1, 64), 48), ((4, 33), 7), ((2, 1, 768), 130), ((1, 0), 5)],
                         ids=["decode", "odd-K", "two-rows", "K=0"])
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_computes_flinear(shape, dtype, bias):
    (x_shape, n) = shape
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(x_shape, generator=gen).to(dtype)
    w = torch.randn(n, x_shape[-1], generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    _check(x, w, b, torch.device("cpu"), "cpp")


def test_inputs_it_was_not_built_for_are_refused():
    kernel = gemv_kernel(GemvProgram("cpp", torch.float32, False), torch.device("cpu"))
    with pytest.raises(ValueError, match="at most"):
        kernel([torch.randn(MAX_ROWS + 1, 8), torch.randn(3, 8)])
    with pytest.raises(ValueError, match="computes x"):
        kernel([torch.randn(1, 8), torch.randn(3, 9)])
    with pytest.raises(ValueError, match="contiguous"):
        kernel([torch.randn(1, 8), torch.randn(8, 3).t()])


def _pipeline():
    return [Pass(p.name, few_row_linears("cpp", cpu=True)) if p.name == "few_row_linears" else p
            for p in default_pipeline("cpp")]


def test_the_decoder_runs_its_projections_through_the_kernel():
    """Every projection of the 2-layer decoder (merged q/k/v, o, merged gate/up, down) and the LM head: 16 greedy
    tokens equal eager's."""
    step, eager = (build_step("plain", "small", torch.float32, "cpu") for _ in range(2))
    ids = torch.tensor([[3]])
    opt = fxopt.optimize(step, (ids, torch.tensor([0])), passes=_pipeline(), strict=True)
    assert next(r for r in opt.records if r.name == "few_row_linears").changes == {"linears": 4 * 2 + 1}
    assert greedy_generate(opt, ids, 0, 16) == greedy_generate(eager, ids, 0, 16)


def test_many_rows_and_cpu_graphs_by_default_stay_flinear():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    opt = fxopt.optimize(model, (torch.randn(MAX_ROWS + 1, 16),), passes=_pipeline(), strict=True)
    assert next(r for r in opt.records if r.name == "few_row_linears").status == "unchanged"
    opt = fxopt.optimize(model, (torch.randn(1, 16),), backend="cpp")
    assert next(r for r in opt.records if r.name == "few_row_linears").status == "unchanged"
    with_bias = fxopt.optimize(model, (torch.randn(1, 16),), passes=_pipeline(), strict=True)
    assert next(r for r in with_bias.records if r.name == "few_row_linears").changes == {"linears": 2}
    x = torch.randn(1, 16)
    torch.testing.assert_close(with_bias(x), model(x))


NVRTC_OK, NVRTC_WHY = nvrtc.nvrtc_available()


@pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC is not available ({NVRTC_WHY})")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_cuda_source_compiles_with_nvrtc(dtype):
    for bias in (False, True):
        program = GemvProgram("cuda", dtype, bias, "cuda:0")
        assert program.name.encode() in nvrtc.compile_cuda(cuda_source(program), arch="sm_90",
                                                           name_hint=program.name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [((1, 1, 768), 2304), ((3, 100), 33), ((2, 1, 2048), 768), ((1, 4096), 1)],
                         ids=["decode", "odd", "two-rows", "one-output"])
@pytest.mark.parametrize("bias", [False, True])
def test_on_cuda_the_kernel_computes_flinear(shape, dtype, bias):
    (x_shape, n) = shape
    x = torch.randn(x_shape, device="cuda").to(dtype)
    w = torch.randn(n, x_shape[-1], device="cuda").to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    _check(x, w, b, torch.device("cuda", torch.cuda.current_device()), "cuda")
    _check(x[..., 1:], w[:, 1:], b, torch.device("cuda", torch.cuda.current_device()), "cuda")  # unaligned rows


@pytest.mark.cuda
@pytest.mark.parametrize("forced", [False, True], ids=["measured", "forced"])
def test_on_cuda_the_decoder_decodes_eagers_tokens(forced, monkeypatch):
    """Each projection is timed against cuBLAS (a note with both times); forced, all run the GEMV inside the graph."""
    from fxopt.passes import gemv

    if forced:
        monkeypatch.setattr(gemv, "MIN_GAIN", 1e9)
    step, eager = (build_step("plain", "small", torch.float32, "cuda") for _ in range(2))
    ids, pos = torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda")
    opt = fxopt.optimize(step, (ids, pos), cuda_graphs=True, strict=True)
    record = next(r for r in opt.records if r.name == "few_row_linears")
    assert len(record.notes) == 4 * 2 + 1 and all("µs" in n for n in record.notes)
    if forced:
        assert record.changes.get("linears") == 4 * 2 + 1
    assert greedy_generate(opt, ids, 0, 16) == greedy_generate(eager, ids, 0, 16)


def test_an_optimized_module_with_the_kernel_saves_and_loads(tmp_path):
    """The artifact keeps the GEMV's program (a template kernel, like the attention kernel) and loads it back."""
    step, eager = (build_step("plain", "small", torch.float32, "cpu") for _ in range(2))
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    opt = fxopt.optimize(step, (ids, pos), passes=_pipeline(), strict=True)
    fxopt.save(opt, tmp_path / "step")
    assert '"kind": "gemv"' in (tmp_path / "step" / "manifest.json").read_text()
    torch.testing.assert_close(fxopt.load(tmp_path / "step")(ids, pos), eager(ids, pos), atol=1e-5, rtol=1e-5)
