"""Row kernels compiled for one shape (NOTE [Kernels for one shape] in codegen/rowwise.py) against the generic kernel
and eager: the same results for shapes whose rows fit the registers or not, multiples of the block or not, strided
rows, several rows a block; the first SPECIALIZED_SHAPES shapes only; a compile error falls back to the generic
kernel. Run on the GPU machine: python -m pytest -m cuda."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.codegen import rowwise as codegen
from fxopt.passes import base
from fxopt.passes.fuse_reductions import fuse_reductions
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


def _row_kernel(model, inputs):
    gm = fxopt.capture(model.eval(), inputs)
    with base._collect("fuse_reductions"):
        gm = fuse_reductions("cuda")(gm).graph_module
    gm.recompile()
    (name,) = [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_op]
    return gm, KERNELS[name]


def _run(gm, kernel, inputs, specialize):
    """gm's outputs with the kernel's plans made afresh, specialized or generic."""
    kernel._plans.clear()
    old, rowwise.SPECIALIZE = rowwise.SPECIALIZE, specialize
    try:
        with torch.no_grad():
            out = gm(*inputs)
        torch.cuda.synchronize()
    finally:
        rowwise.SPECIALIZE = old
        kernel._plans.clear()
    return out


SHAPES = [(1, 197, 384), (2, 7, 768), (3, 5, 1000), (1, 4, 96), (2, 3, 4100), (5, 33, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("model_type", [AddNorm, SoftmaxMax])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_specialized_kernel_matches_the_generic_one(model_type, shape, dtype):
    n = shape[-1]
    model = (model_type(n) if model_type is AddNorm else model_type()).to(DEVICE, dtype)
    inputs = [_randn(*shape, dtype=dtype, seed=1), _randn(*shape, dtype=dtype, seed=2), _randn(n, dtype=dtype, seed=3)]
    gm, kernel = _row_kernel(model, inputs)
    kernel._specializations.clear()
    generic = _run(gm, kernel, inputs, specialize=False)
    special = _run(gm, kernel, inputs, specialize=True)
    assert len(kernel._specializations) == 1 and None not in kernel._specializations.values()
    for g, s in zip(generic, special):
        torch.testing.assert_close(s, g, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6)
    with torch.no_grad():
        assert compare(special, model(*inputs)) is None


def test_strided_rows_and_outputs_in_eager_layout_specialized():
    # the SE squeeze over a channels-last input: rows C apart, the SiLU stored channels-last
    class Squeeze(nn.Module):
        def forward(self, x):
            h = F.silu(x)
            return h, h.mean((2, 3), keepdim=True)

    model = Squeeze()
    x = _randn(2, 48, 14, 14).contiguous(memory_format=torch.channels_last)
    gm, kernel = _row_kernel(model, [x])
    kernel._specializations.clear()
    generic = _run(gm, kernel, [x], specialize=False)
    special = _run(gm, kernel, [x], specialize=True)
    assert len(kernel._specializations) == 1
    for g, s in zip(generic, special):
        assert s.stride() == g.stride()
        torch.testing.assert_close(s, g, rtol=1e-6, atol=1e-6)


def test_only_the_first_shapes_are_specialized():
    model = AddNorm(64).to(DEVICE)
    gm = None
    for rows in range(1, rowwise.SPECIALIZED_SHAPES + 3):
        inputs = [_randn(rows, 64, seed=rows), _randn(rows, 64), _randn(64)]
        if gm is None:
            gm, kernel = _row_kernel(model, inputs)
            kernel._specializations.clear()
            kernel._plans.clear()
        with torch.no_grad():
            assert compare(gm(*inputs), model(*inputs)) is None
    assert len(kernel._specializations) == rowwise.SPECIALIZED_SHAPES


def test_a_specialization_that_does_not_compile_falls_back_to_the_generic_kernel(monkeypatch, caplog):
    model = AddNorm(96).to(DEVICE)
    inputs = [_randn(3, 96), _randn(3, 96), _randn(96)]
    gm, kernel = _row_kernel(model, inputs)
    kernel._specializations.clear()
    kernel._plans.clear()
    broken = codegen.cuda_source

    def source(program, constants=None, block=None):
        text = broken(program, constants, block)
        return text + "\nthis does not compile;\n" if constants else text

    monkeypatch.setattr(rowwise, "cuda_source", source)
    with caplog.at_level(logging.WARNING, logger="fxopt.runtime.rowwise"):
        with torch.no_grad():
            assert compare(gm(*inputs), model(*inputs)) is None
    assert list(kernel._specializations.values()) == [None]
    assert "the generic kernel runs" in caplog.text
