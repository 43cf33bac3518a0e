"""decompose_group_norm: GroupNorm as per-group statistics and an elementwise normalize, the SiLU after it joining:
one row kernel for a contiguous input; for a channels-last one (NOTE [Rows over two dims]) a row kernel of the
statistics alone, reading the input where it is, and an elementwise kernel for the normalize."""

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.passes import Pass, default_pipeline
from fxopt.passes.group_norm import decompose_group_norm

_HERE = frozenset({"cpu"})  # on by default on CUDA only; the tests turn it on for the CPU


def _pipeline():
    return [Pass("decompose_group_norm", functools.partial(decompose_group_norm, devices=_HERE), "")
            if p.name == "decompose_group_norm" else p.name for p in default_pipeline()]


class NormAct(nn.Module):
    def __init__(self, c=32, groups=8, affine=True, functional=False, act=True):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, affine=affine)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)
        self.functional, self.act = functional, act

    def forward(self, x):
        n = self.norm
        y = F.group_norm(x, n.num_groups, n.weight, n.bias, n.eps) if self.functional else n(x)
        return F.silu(y) if self.act else y


def _fused_names(opt):
    return [n.args[0] for n in opt.graph_module.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.fxopt.fused.default]


@pytest.mark.parametrize("shape", [(2, 32, 8, 8), (1, 32, 5), (2, 32, 2, 3, 4)], ids=["4d", "3d", "5d"])
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_and_silu_become_one_generated_kernel(shape, functional, affine):
    torch.manual_seed(0)
    model, x = NormAct(affine=affine, functional=functional).eval(), torch.randn(shape) * 3 + 1
    opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    assert {r.name: r for r in opt.records}["decompose_group_norm"].changes == {"group_norms_decomposed": 1}
    names = _fused_names(opt)
    # the affine weight varies along a row's channels only: a per-element input it would have to be copied to the
    # row's shape, so the affine and the SiLU take an elementwise kernel
    assert len(names) == (2 if affine else 1) and names[0].startswith("fxopt_rows_") and "silu" in names[-1], names
    assert not any("group_norm" in str(n.target) for n in opt.graph_module.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_float16_computes_the_statistics_in_float32():
    torch.manual_seed(0)
    model = NormAct().eval().half()
    x = (torch.randn(2, 32, 8, 8) * 4 + 2).half()
    opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=2e-3, atol=2e-3)


def test_a_residual_after_the_norm_stays_outside_the_tail_but_the_result_matches():
    class NormAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(4, 16)

        def forward(self, x, r):
            return F.silu(self.norm(x) + r)

    model, x, r = NormAdd().eval(), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    opt = fxopt.optimize(model, (x, r), passes=_pipeline(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(opt(x, r), model(x, r), rtol=1e-5, atol=1e-5)


class Decomposed(nn.Module):
    """decompose_group_norm's graph, written out: on CUDA its input is a channels-last convolution output."""

    def forward(self, x):
        n, c, h, w = x.shape
        x4 = x.reshape(n, 8, c // 8, h * w)
        mean = x4.mean((-2, -1), keepdim=True)
        centered = x4 - mean
        rstd = torch.rsqrt((centered * centered).mean((-2, -1), keepdim=True) + 1e-5)
        return F.silu(((x4 - mean) * rstd).reshape(x.shape))


def test_over_a_channels_last_value_the_statistics_kernel_keeps_the_statistics_alone():
    # NOTE [Rows over two dims]: [N, G, C // G, H * W] of a channels-last value is no strided run over the row; the
    # row kernel keeps mean and rstd, and the normalize + SiLU goes to an elementwise kernel, which writes the
    # value's layout
    from fxopt.passes import base
    from fxopt.passes.fuse_reductions import fuse_reductions
    from fxopt.runtime.kernel import KERNELS, fused_op

    model = Decomposed().eval()
    x = (torch.randn(2, 32, 6, 5) * 2 + 1).contiguous(memory_format=torch.channels_last)
    gm = fxopt.capture(model, [x])
    with base._collect("fuse_reductions"):
        gm = fuse_reductions("cpp")(gm).graph_module
    gm.recompile()
    (name,) = [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_op]
    assert [o.level for o in KERNELS[name].program.outputs] == ["rowk", "rowk"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    opt = fxopt.optimize(model, [x], backend="cpp", strict=True)
    with torch.no_grad():
        out, ref = opt(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.stride() == ref.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_the_decomposition_over_a_channels_last_value_keeps_the_statistics_apart(dtype):
    # decompose_group_norm runs before to_channels_last: on CUDA its input is channels-last afterwards. Statistics in
    # float32 of a float16 value: the conversion for the normalize is its own node, so it leaves the row kernel
    from fxopt.capture import annotate
    from fxopt.passes import base
    from fxopt.passes.fuse_reductions import fuse_reductions
    from fxopt.runtime.kernel import KERNELS, fused_op

    torch.manual_seed(0)
    model = NormAct().eval().to(dtype)
    x = (torch.randn(2, 32, 6, 5) * 3 + 1).to(dtype)
    gm = decompose_group_norm(fxopt.capture(model, (x,)), devices=_HERE).graph_module
    x_cl = x.contiguous(memory_format=torch.channels_last)
    annotate(gm, [x_cl])
    with base._collect("fuse_reductions"):
        gm = fuse_reductions("cpp")(gm).graph_module
    gm.recompile()
    (name,) = [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_op]
    assert [o.level for o in KERNELS[name].program.outputs] == ["rowk", "rowk"]
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-5}
    with torch.no_grad():
        torch.testing.assert_close(gm(x_cl), model(x_cl), **tol)


def test_channels_last_input_is_kept_with_a_note():
    model = NormAct(act=False).eval()
    x = torch.randn(2, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(model, (x,), passes=_pipeline())
    record = {r.name: r for r in opt.records}["decompose_group_norm"]
    assert record.status == "unchanged" and any("not contiguous" in n for n in record.notes), record.notes


def test_off_cuda_the_default_pipeline_leaves_group_norm_alone():
    model, x = NormAct().eval(), torch.randn(1, 32, 4, 4)
    opt = fxopt.optimize(model, (x,))
    assert {r.name: r for r in opt.records}["decompose_group_norm"].status == "unchanged"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_cuda_group_norm_and_silu_take_fewer_kernels_than_eager(dtype):
    model = NormAct(c=64, groups=32).to("cuda", dtype).eval()
    x = torch.randn(1, 64, 32, 32, device="cuda", dtype=dtype)
    opt = fxopt.optimize(model, (x,), strict=True)
    assert {r.name: r for r in opt.records}["decompose_group_norm"].changes == {"group_norms_decomposed": 1}
    with torch.no_grad():
        assert fxopt.verify.compare(opt(x), model(x)) is None
    eager, fused = fxopt.count_launches(model, (x,)), fxopt.count_launches(opt, (x,))
    # an affine GroupNorm: the statistics' row kernel, then the normalize + affine + SiLU
    assert fused.cuda_kernels == 2 and fused.cuda_kernels < eager.cuda_kernels, (fused.cuda_kernels_by_name,
                                                                                eager.cuda_kernels_by_name)


# -- property: shapes, groups, affine ----------------------------------------------------------------------------
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), groups=st.integers(1, 4), per_group=st.integers(1, 4),
       spatial=st.lists(st.integers(1, 5), min_size=1, max_size=3), affine=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_decomposed_group_norm_matches_eager_for_any_shape(n, groups, per_group, spatial, affine, seed):
    assume(per_group * math.prod(spatial) > 1)  # eager's GroupNorm refuses one value per group
    torch.manual_seed(seed)
    model = NormAct(c=groups * per_group, groups=groups, affine=affine).eval()
    x = torch.randn(n, groups * per_group, *spatial) * 2 + 0.5
    result = decompose_group_norm(fxopt.capture(model, (x,)), devices=_HERE)
    assert result.modified
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-4, atol=1e-5)


# -- the generated CUDA of both kernels compiles with NVRTC (no GPU needed) ----------------------------------------
def test_the_cuda_source_of_both_kernels_compiles_with_nvrtc():
    from fxopt.codegen import rowwise
    from fxopt.codegen.printer import cuda_source
    from fxopt.runtime import nvrtc
    from fxopt.runtime.kernel import FusedKernel
    from fxopt.runtime.rowwise import RowwiseKernel

    ok, why = nvrtc.nvrtc_available()
    if not ok:
        pytest.skip(f"NVRTC is not available ({why})")
    for dtype in (torch.float32, torch.float16):
        model = NormAct().eval().to(dtype)
        x = torch.randn(2, 32, 6, 6).to(dtype)
        opt = fxopt.optimize(model, (x,), passes=_pipeline(), strict=True, backend="cpp")
        kernels = list(opt.kernels.values())
        assert {type(k) for k in kernels} == {FusedKernel, RowwiseKernel}, kernels
        for k in kernels:
            source = cuda_source(k.region, k.modes) if isinstance(k, FusedKernel) else rowwise.cuda_source(k.program)
            cubin = nvrtc.compile_cuda(source, arch="sm_90", name_hint=k.name)
            assert cubin.startswith(b"\x7fELF")
