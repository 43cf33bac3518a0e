"""rotate_half (rotary position embeddings) as one rotated read of a fused kernel's input: NOTE [Gathering reads]
in fxopt/ops/elementwise.py, fxopt/passes/rotary.py."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxopt
from fxopt import ops
from fxopt.passes.rotary import match_rotate_half


def chunk_form(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def slice_form(x):  # transformers' rotate_half
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def narrow_form(x):
    h = x.shape[-1] // 2
    return torch.cat((torch.neg(x.narrow(-1, h, h)), x.narrow(-1, 0, h)), dim=x.dim() - 1)


def split_form(x):
    x1, x2 = torch.split(x, x.shape[-1] // 2, dim=-1)
    return torch.cat([-x2, x1], -1)


FORMS = {"chunk": chunk_form, "slice": slice_form, "narrow": narrow_form, "split": split_form}


class Rotary(nn.Module):
    """q * cos + rotate_half(q) * sin, as Llama's apply_rotary_pos_emb."""

    def __init__(self, form):
        super().__init__()
        self.form = FORMS[form]

    def forward(self, q, cos, sin):
        return q * cos + self.form(q) * sin


def _fused_kernels(opt):
    return [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.fxopt.fused.default]


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape, generator=g).to(dtype)
    cos = torch.randn(shape[-1], generator=g).to(dtype)
    sin = torch.randn(shape[-1], generator=g).to(dtype)
    return q, cos, sin


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_spelling_becomes_one_kernel_equal_to_eager(form):
    model = Rotary(form).eval()
    args = _inputs((2, 4, 3, 16))
    opt = fxopt.optimize(model, args, backend="cpp", strict=True)
    (fused,) = _fused_kernels(opt)
    assert "rotate_half" in fused.args[0]
    assert not any(n.target in (torch.cat, operator.neg) for n in opt.graph_module.graph.nodes)
    assert torch.equal(opt(*args), model(*args))  # the same ops in the same order: bitwise


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_rotary_matches_eager_bitwise(dtype):
    model = Rotary("slice").eval()
    args = _inputs((1, 8, 64), dtype)
    opt = fxopt.optimize(model, args, backend="cpp", strict=True)
    assert len(_fused_kernels(opt)) == 1
    assert torch.equal(opt(*args), model(*args))


def test_a_strided_view_operand_is_read_with_its_strides():
    """q as the view of a projection's output that the decoder feeds it: a narrow of a wider row."""

    class M(nn.Module):
        def forward(self, qkv, cos, sin):
            q = qkv.narrow(-1, 0, 32).view(1, 2, 16)
            return q * cos + slice_form(q) * sin

    qkv, cos, sin = torch.randn(1, 64), torch.randn(16), torch.randn(16)
    opt = fxopt.optimize(M().eval(), (qkv, cos, sin), backend="cpp", strict=True)
    assert len(_fused_kernels(opt)) == 1
    assert torch.equal(opt(qkv, cos, sin), M()(qkv, cos, sin))


def test_an_operand_computed_in_the_kernel_stays_a_separate_kernel():
    """rotate_half reads its operand at other indices: a value computed in the same kernel cannot be, so its
    producer is a kernel of its own and the rotation joins the one after it."""

    class M(nn.Module):
        def forward(self, x, cos, sin):
            q = torch.relu(x) * 2
            return q * cos + chunk_form(q) * sin

    args = _inputs((3, 8))
    opt = fxopt.optimize(M().eval(), args, backend="cpp", strict=True)
    assert len(_fused_kernels(opt)) == 2
    torch.testing.assert_close(opt(*args), M()(*args))


@pytest.mark.parametrize("why,fn", [
    ("cat of the halves in order", lambda x: torch.cat((x[..., 4:], x[..., :4]), -1)),
    ("halves of two tensors", lambda x: torch.cat((-(x * 2)[..., 4:], x[..., :4]), -1)),
    ("not the last dim", lambda x: torch.cat((-x[:, 2:], x[:, :2]), 1)),
    ("uneven pieces", lambda x: torch.cat((-x[..., 5:], x[..., :5]), -1)),
])
def test_near_misses_are_not_matched(why, fn):
    x = torch.randn(4, 8)
    gm = fx.symbolic_trace(lambda x: fn(x))
    from fxopt.capture import annotate

    annotate(gm, (x,))
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert cats and all(match_rotate_half(c, gm) is None for c in cats), why


def test_the_op_is_in_the_table_and_eager_is_the_pattern():
    x = torch.randn(2, 3, 8)
    assert torch.equal(torch.ops.fxopt.rotate_half(x), chunk_form(x))
    assert ops.ROTATE_HALF.gathers and ops.OPS["rotate_half"] is ops.ROTATE_HALF


def test_the_decoder_runs_its_rotary_as_one_kernel_per_projection():
    from fxopt.models.decoder import build_step, greedy_generate

    step, eager = (build_step("plain", "small", torch.float32, "cpu") for _ in range(2))
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    opt = fxopt.optimize(step, (ids, pos), backend="cpp")
    # q and k per layer; the key's kernel also writes it into the cache (write_into_caches: fxopt::fused_into)
    into = [n.args[0] for n in opt.graph_module.graph.nodes if n.target is torch.ops.fxopt.fused_into.default]
    names = [n.args[0] for n in _fused_kernels(opt)] + into
    assert sum("rotate_half" in name for name in names) == 2 * step.cfg.layers, names
    assert len(into) == step.cfg.layers and all("rotate_half" in name for name in into), into
    assert not any(n.target is torch.cat for n in opt.graph_module.graph.nodes)
    assert greedy_generate(opt, ids, 0, 16) == greedy_generate(eager, ids, 0, 16)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), half=st.integers(1, 12),
       form=st.sampled_from(sorted(FORMS)), broadcast_table=st.booleans(), seed=st.integers(0, 2**16))
def test_rotary_matches_eager_for_any_shape(lead, half, form, broadcast_table, seed):
    shape = (*lead, 2 * half)
    q, cos, sin = _inputs(shape, seed=seed)
    if not broadcast_table:  # tables as large as q (per-position rows), not broadcast
        cos, sin = cos.expand(shape).contiguous() + 0.5, sin.expand(shape).contiguous() - 0.5
    model = Rotary(form).eval()
    opt = fxopt.optimize(model, (q, cos, sin), backend="cpp", strict=True)
    assert len(_fused_kernels(opt)) == 1
    assert torch.equal(opt(q, cos, sin), model(q, cos, sin))


def test_the_cuda_source_compiles_with_nvrtc():
    from fxopt.codegen.printer import cuda_source
    from fxopt.runtime import nvrtc

    ok, why = nvrtc.nvrtc_available()
    if not ok:
        pytest.skip(f"NVRTC is not available ({why})")
    for dtype in (torch.float32, torch.bfloat16):
        args = _inputs((1, 4, 64), dtype)
        opt = fxopt.optimize(Rotary("slice").eval(), args, backend="cpp", strict=True)
        (kernel,) = opt.kernels.values()
        assert kernel.region.rotated_inputs == (0,)
        source = cuda_source(kernel.region, kernel.modes)
        assert "_flat(" not in source and "_strided(" in source and "rot0" in source
        assert nvrtc.compile_cuda(source, arch="sm_90", name_hint=kernel.name).startswith(b"\x7fELF")


def test_a_slice_bound_that_is_not_a_known_size_is_not_matched():
    """x[..., :n] with n read from a tensor's batch dim: its value is not fixed, so no match."""

    def f(x, y):
        n = y.shape[0]
        return torch.cat((-x[..., n:], x[..., :n]), -1)

    gm = fx.symbolic_trace(f)
    from fxopt.capture import annotate

    annotate(gm, (torch.randn(2, 8), torch.randn(4, 3)))
    (cat,) = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert match_rotate_half(cat, gm) is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_on_cuda_rotary_is_one_kernel_equal_to_eager(dtype):
    args = tuple(t.cuda() for t in _inputs((2, 8, 3, 64), dtype))
    model = Rotary("slice").eval()
    opt = fxopt.optimize(model, args, strict=True)
    assert len(_fused_kernels(opt)) == 1
    with torch.no_grad():
        if dtype == torch.float32:  # NVRTC contracts q * cos + r * sin into a fused multiply-add: an ulp apart
            torch.testing.assert_close(opt(*args), model(*args), rtol=1e-6, atol=1e-6)
        else:  # each 16-bit op's result rounded as eager stores it (NOTE [16-bit intermediates]): bitwise
            assert torch.equal(opt(*args), model(*args))
    eager, fused = fxopt.count_launches(model, args), fxopt.count_launches(opt, args)
    assert fused.cuda_kernels == 1 < eager.cuda_kernels, (fused, eager)


def test_a_saved_rotary_kernel_loads_from_its_library_in_a_fresh_process(tmp_path):
    """The region's rotated reads are part of what an artifact saves: the loaded kernel is the saved one (no
    recompilation note) and computes eager's result."""
    import subprocess
    import sys

    model, args = Rotary("slice").eval(), _inputs((2, 4, 3, 16))
    opt = fxopt.optimize(model, args, backend="cpp", strict=True)
    path = fxopt.save(opt, tmp_path / "rotary")
    torch.save([args, model(*args)], tmp_path / "io.pt")
    code = f"""
import torch, fxopt
mod = fxopt.load({str(path)!r})
args, want = torch.load({str(tmp_path / 'io.pt')!r})
assert torch.equal(mod(*args), want)
print("ok", mod.notes)
"""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok []"), done.stdout
