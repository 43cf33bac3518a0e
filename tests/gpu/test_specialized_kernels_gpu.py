"""Kernels compiled for one shape (NOTE [Kernels for one shape] in codegen/rowwise.py), row kernels and strided
elementwise ones, against the generic kernel and eager: rows that fit the registers or not, multiples of the block or
not, strided rows, several rows a block; broadcast, permuted, odd and misaligned elementwise operands; the first
SPECIALIZED_SHAPES shapes only; a compile error falls back to the generic kernel. Run on the GPU machine:
python -m pytest -m cuda."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.codegen import rowwise as codegen
from fxopt.passes import base
from fxopt.passes.fuse_elementwise import fuse_elementwise
from fxopt.passes.fuse_reductions import fuse_reductions
from fxopt.runtime import kernel as kernel_module
from fxopt.runtime import rowwise
from fxopt.runtime.kernel import KERNELS, fused_op
from fxopt.verify import compare

pytestmark = pytest.mark.cuda
DEVICE = "cuda"


class AddNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x, r, b):
        h = x + b + r
        return h, self.norm(h)


class SoftmaxMax(nn.Module):
    def forward(self, x, r, b):
        h = x * 0.5 + r - b
        return torch.softmax(h, -1), h.amax(-1)


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)


def _one_kernel(model, inputs, name="fuse_reductions", make_pass=fuse_reductions):
    """The model captured and run through one fusion pass, which must give one kernel: (graph, kernel)."""
    gm = fxopt.capture(model.eval(), inputs)
    with base._collect(name):
        gm = make_pass("cuda")(gm).graph_module
    gm.recompile()
    (kernel_name,) = [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_op]
    return gm, KERNELS[kernel_name]


def _kernel_inputs(gm, kernel, inputs):
    """What ``gm`` hands its row kernel."""
    seen = []

    def record(xs):
        seen.append(list(xs))
        return kernel(xs)

    KERNELS[kernel.name] = record
    try:
        with torch.no_grad():
            gm(*inputs)
    finally:
        KERNELS[kernel.name] = kernel
    return seen[0]


def _run(kernel, xs, specialize):
    """A fresh copy of ``kernel`` (its own plans and call path), run on ``xs`` specialized or generic."""
    fresh = rowwise.RowwiseKernel(kernel.program, kernel.device).compile()
    old, kernel_module.SPECIALIZE = kernel_module.SPECIALIZE, specialize
    try:
        out = fresh(xs)
        torch.cuda.synchronize()
    finally:
        kernel_module.SPECIALIZE = old
    return fresh, out


SHAPES = [(1, 197, 384), (2, 7, 768), (3, 5, 1000), (1, 4, 96), (2, 3, 4100), (5, 33, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("model_type", [AddNorm, SoftmaxMax])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_specialized_kernel_matches_the_generic_one(model_type, shape, dtype):
    n = shape[-1]
    model = (model_type(n) if model_type is AddNorm else model_type()).to(DEVICE, dtype)
    inputs = [_randn(*shape, dtype=dtype, seed=1), _randn(*shape, dtype=dtype, seed=2), _randn(n, dtype=dtype, seed=3)]
    gm, kernel = _one_kernel(model, inputs)
    xs = _kernel_inputs(gm, kernel, inputs)
    plain, generic = _run(kernel, xs, specialize=False)
    fresh, special = _run(kernel, xs, specialize=True)
    assert not plain._specializations
    assert len(fresh._specializations) == 1 and None not in fresh._specializations.values()
    for g, s in zip(generic, special):
        torch.testing.assert_close(s, g, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6)
    with torch.no_grad():
        assert compare(gm(*inputs), model(*inputs)) is None


def test_strided_rows_and_outputs_in_eager_layout_specialized():
    # the SE squeeze over a channels-last input: rows C apart, the SiLU stored channels-last
    class Squeeze(nn.Module):
        def forward(self, x):
            h = F.silu(x)
            return h, h.mean((2, 3), keepdim=True)

    model = Squeeze()
    x = _randn(2, 48, 14, 14).contiguous(memory_format=torch.channels_last)
    gm, kernel = _one_kernel(model, [x])
    xs = _kernel_inputs(gm, kernel, [x])
    _, generic = _run(kernel, xs, specialize=False)
    fresh, special = _run(kernel, xs, specialize=True)
    assert len(fresh._specializations) == 1 and None not in fresh._specializations.values()
    for g, s in zip(generic, special):
        assert s.stride() == g.stride()
        torch.testing.assert_close(s, g, rtol=1e-6, atol=1e-6)


def test_only_the_first_shapes_are_specialized(monkeypatch):
    monkeypatch.setattr(kernel_module, "SPECIALIZED_SHAPES", 3)
    model = AddNorm(64).to(DEVICE)
    inputs = [_randn(1, 64), _randn(1, 64), _randn(64)]
    gm, kernel = _one_kernel(model, inputs)
    fresh = rowwise.RowwiseKernel(kernel.program, kernel.device).compile()
    xs = _kernel_inputs(gm, kernel, inputs)
    for rows in range(1, kernel_module.SPECIALIZED_SHAPES + 3):
        ys = [x.expand(rows, *x.shape[1:]).contiguous() if x.dim() == 2 else x for x in xs]
        torch.testing.assert_close(fresh(ys)[1], kernel(ys)[1])
    assert len(fresh._specializations) == kernel_module.SPECIALIZED_SHAPES


def test_a_specialization_that_does_not_compile_falls_back_to_the_generic_kernel(monkeypatch, caplog):
    model = AddNorm(96).to(DEVICE)
    inputs = [_randn(3, 96), _randn(3, 96), _randn(96)]
    gm, kernel = _one_kernel(model, inputs)
    xs = _kernel_inputs(gm, kernel, inputs)
    broken = codegen.cuda_source

    def source(program, constants=None, block=None, split=1):
        text = broken(program, constants, block, split)
        return text + "\nthis does not compile;\n" if constants else text

    monkeypatch.setattr(rowwise, "cuda_source", source)
    with caplog.at_level(logging.WARNING, logger="fxopt.runtime.kernel"):
        fresh, out = _run(kernel, xs, specialize=True)
    assert list(fresh._specializations.values()) == [None]
    assert "the generic kernel runs" in caplog.text
    for a, b in zip(out, kernel(xs)):
        torch.testing.assert_close(a, b)


# -- rows split over a cluster (NOTE [Rows split over a cluster]): few long rows, sm_90 and later ---------------------
CLUSTERS = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
needs_clusters = pytest.mark.skipif(not CLUSTERS, reason="thread block clusters need sm_90 or later")


def _splits(kernel):
    return sorted(plan.split for plan in kernel._plans.values())


@needs_clusters
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("model_type", [AddNorm, SoftmaxMax])
@pytest.mark.parametrize("shape", [(1, 16, 10240), (1, 4, 6000), (2, 1, 50000), (1, 3, 70001)], ids=str)
def test_rows_split_over_a_cluster_match_eager_and_the_generic_kernel(model_type, shape, dtype):
    n = shape[-1]
    model = (model_type(n) if model_type is AddNorm else model_type()).to(DEVICE, dtype)
    inputs = [_randn(*shape, dtype=dtype, seed=1), _randn(*shape, dtype=dtype, seed=2), _randn(n, dtype=dtype, seed=3)]
    gm, kernel = _one_kernel(model, inputs)
    xs = _kernel_inputs(gm, kernel, inputs)
    plain, generic = _run(kernel, xs, specialize=False)
    fresh, split = _run(kernel, xs, specialize=True)
    assert _splits(plain) == [1] and _splits(fresh)[0] > 1
    again = fresh(xs)
    for g, s, a in zip(generic, split, again):
        assert torch.equal(s, a)  # the partials combine in one order: the same bits every call
        torch.testing.assert_close(s, g, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    with torch.no_grad():
        assert compare(gm(*inputs), model(*inputs)) is None


class GroupNormSiLU(nn.Module):
    def __init__(self, c, groups=32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        return F.silu(self.norm(x)) + x


class SqueezeGate(nn.Module):
    def forward(self, x):
        h = F.silu(x)
        return h * torch.sigmoid(h.mean((2, 3), keepdim=True))


@needs_clusters
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["group_norm_few_groups", "se_squeeze_channels_last"])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_few_row_models_run_split_rows_through_optimize(case, dtype, cuda_graphs):
    if case == "group_norm_few_groups":  # 8 groups: 8 rows of 40960
        model, x = GroupNormSiLU(320, groups=8).to(DEVICE, dtype), _randn(1, 320, 32, 32, dtype=dtype)
    else:  # EfficientNet-B0's first squeeze: 32 rows of 12544, C apart
        model = SqueezeGate()
        x = _randn(1, 32, 112, 112, dtype=dtype).contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(model.eval(), [x], cuda_graphs=cuda_graphs)
    for _ in range(3):
        with torch.no_grad():
            assert compare(opt(x), model(x)) is None
    kernels = [KERNELS[n.args[0]] for n in opt.graph_module.graph.nodes
               if n.op == "call_function" and n.target is fused_op]
    splits = [p.split for k in kernels if isinstance(k, rowwise.RowwiseKernel) for p in k._plans.values()]
    assert splits and max(splits) > 1


@needs_clusters
def test_split_rows_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(rowwise, "SPLIT_ROWS", False)
    model = AddNorm(10240).to(DEVICE)
    inputs = [_randn(1, 32, 10240), _randn(1, 32, 10240), _randn(10240)]
    gm, kernel = _one_kernel(model, inputs)
    fresh, out = _run(kernel, _kernel_inputs(gm, kernel, inputs), specialize=True)
    assert _splits(fresh) == [1] and len(fresh._specializations) == 1


# -- rows as columns (NOTE [Rows as columns]; opt-in): channels-last squeezes, 32 channels a block ------------------
class SqueezeKeep(nn.Module):
    def forward(self, x, b):
        h = F.silu(x + b)
        return h, h.mean((2, 3), keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("model_type", [SqueezeKeep, SqueezeGate])
@pytest.mark.parametrize("shape", [(1, 32, 112, 112), (1, 96, 56, 56), (1, 40, 28, 28), (2, 1152, 7, 7)], ids=str)
def test_rows_as_columns_match_eager_and_the_generic_kernel(model_type, shape, dtype, monkeypatch):
    monkeypatch.setattr(rowwise, "COLUMN_ROWS", True)
    x = _randn(*shape, dtype=dtype, seed=1).contiguous(memory_format=torch.channels_last)
    inputs = [x, _randn(1, shape[1], 1, 1, dtype=dtype, seed=2)] if model_type is SqueezeKeep else [x]
    model = model_type()
    gm, kernel = _one_kernel(model, inputs)
    xs = _kernel_inputs(gm, kernel, inputs)
    plain, generic = _run(kernel, xs, specialize=False)
    fresh, columns = _run(kernel, xs, specialize=True)
    (plan,) = fresh._plans.values()
    assert plan.columns and None not in fresh._specializations.values()
    again = fresh(xs)
    for g, c, a in zip(generic, columns, again):
        assert c.stride() == g.stride()
        assert torch.equal(c, a)  # one order of combining: the same bits every call
        torch.testing.assert_close(c, g, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-5)
    with torch.no_grad():
        assert compare(gm(*inputs), model(*inputs)) is None


# -- the strided elementwise kernel (codegen/printer.py cuda_strided_source) ----------------------------------------
class BiasGelu(nn.Module):
    def forward(self, x, b):
        return F.gelu(x + b)


class ScaleResidual(nn.Module):
    def forward(self, x, g, r):
        return r + g * x


def _strided_case(case):
    """(model, inputs) of a strided elementwise case; built in the test, since collection has no GPU in CI."""
    f16 = torch.float16
    if case == "bias_gelu_fp16_vector":
        return BiasGelu(), [_randn(1, 14, 14, 384, dtype=f16), _randn(384, dtype=f16)]
    if case == "bias_gelu_fp32_odd_inner":
        return BiasGelu(), [_randn(3, 5, 37), _randn(37)]
    if case == "scale_residual_permuted":
        cl = _randn(1, 48, 10, 12, dtype=f16).contiguous(memory_format=torch.channels_last)
        return ScaleResidual(), [_randn(1, 10, 12, 48, dtype=f16), _randn(48, dtype=f16), cl.permute(0, 2, 3, 1)]
    assert case == "misaligned_view"
    return BiasGelu(), [_randn(2 * 64 * 8 + 1, dtype=f16)[1:].view(2, 64, 8), _randn(8, dtype=f16)]


@pytest.mark.parametrize("case", ["bias_gelu_fp16_vector", "bias_gelu_fp32_odd_inner", "scale_residual_permuted",
                                  "misaligned_view"])
def test_specialized_strided_kernel_matches_the_generic_one(case, monkeypatch):
    from fxopt.runtime.kernel import FusedKernel

    monkeypatch.setattr(kernel_module, "SPECIALIZE_STRIDED", True)

    model, inputs = _strided_case(case)
    gm, kernel = _one_kernel(model, inputs, "fuse_elementwise", fuse_elementwise)
    xs = _kernel_inputs(gm, kernel, inputs)
    outs = {}
    for specialize in (False, True):
        fresh = FusedKernel(kernel.region, kernel.modes, "cuda", kernel.device, layout=kernel.layout).compile()
        old, kernel_module.SPECIALIZE = kernel_module.SPECIALIZE, specialize
        try:
            outs[specialize] = fresh(xs)
            torch.cuda.synchronize()
        finally:
            kernel_module.SPECIALIZE = old
        (plan,) = fresh._plans.values()
        assert plan.path == "strided"
        assert len(fresh._specializations) == int(specialize)
        assert None not in fresh._specializations.values()
    for g, s in zip(outs[False], outs[True]):
        assert s.stride() == g.stride()
        torch.testing.assert_close(s, g, rtol=0, atol=0)
    with torch.no_grad():
        assert compare(gm(*inputs), model(*inputs)) is None
