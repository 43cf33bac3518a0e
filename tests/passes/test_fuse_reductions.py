"""fuse_reductions on the C++ backend: structure (what nodes remain), numerics against eager, dispatched-op counts,
fallbacks with their notes; and NVRTC compilation of the CUDA source of every row-wise kernel built here."""

from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import ops
from fxopt.capture import annotate
from fxopt.codegen import rowwise
from fxopt.launches import dispatched_ops
from fxopt.passes import Pass, base
from fxopt.passes.fuse_reductions import fuse_reductions
from fxopt.runtime import nvrtc
from fxopt.runtime.cc import compiler_info
from fxopt.runtime.kernel import KERNELS, fused_op
from fxopt.runtime.rowwise import RowwiseKernel
from fxopt.verify import compare

pytestmark = pytest.mark.skipif(compiler_info() is None, reason="no C++ compiler")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KINDS = ["softmax", "log_softmax", "layer_norm", "rms_norm", "sum", "mean", "amax"]


# -- helpers -----------------------------------------------------------------------------------------------------
def _fuse(model, inputs, *, export=False, decompose=False, backend="cpp", **options):
    """Capture ``model`` (symbolic_trace, or torch.export for ATen-level graphs), run the pass, collect its notes."""
    model = model.eval()
    if export:
        ep = torch.export.export(model, tuple(inputs))
        if decompose:
            ep = ep.run_decompositions()
        gm = ep.module()
        annotate(gm, inputs)
    else:
        gm = fxopt.capture(model, inputs)
    with base._collect("fuse_reductions") as plog:
        result = fuse_reductions(backend, **options)(gm)
    gm = result.graph_module
    gm.recompile()
    return gm, result, plog


def _assert_matches(gm, model, inputs):
    with torch.no_grad():
        mismatch = compare(gm(*inputs), model(*inputs))
    assert mismatch is None, str(mismatch)


def _fused(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_op]


def _kernels(gm):
    return [KERNELS[n.args[0]] for n in _fused(gm)]


def _reductions_left(gm):
    return [n.name for n in gm.graph.nodes if n.op != "output" and ops.match_row_reduction(n, gm) is not None]


def _dispatched(gm, inputs):
    return dict(dispatched_ops(gm, inputs))


class Kind(nn.Module):
    """Each reduction kind with an elementwise prologue over two inputs and an epilogue that reads the row input."""

    def __init__(self, kind: str, n: int):
        super().__init__()
        self.kind, self.n = kind, n
        self.weight = nn.Parameter(torch.randn(n))
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x, r):
        h = x * 0.5 + r
        if self.kind == "softmax":
            y = torch.softmax(h, -1)
        elif self.kind == "log_softmax":
            y = F.log_softmax(h, dim=-1)
        elif self.kind == "layer_norm":
            y = F.layer_norm(h, (self.n,), self.weight, self.bias)
        elif self.kind == "rms_norm":
            y = F.rms_norm(h, (self.n,), self.weight, 1e-6)
        elif self.kind == "sum":
            y = h.sum(-1, keepdim=True) * 0.1
        elif self.kind == "mean":
            y = h.mean(dim=-1, keepdim=True)
        else:
            y = h.amax(-1, keepdim=True)
        return torch.tanh(y) * 2 - r


class KindBroadcast(nn.Module):
    """Each kind with a broadcast prologue operand (a mask over the last two dims), module or method spellings, and
    keepdim=False reductions with a per-row epilogue operand."""

    def __init__(self, kind: str, s: int, n: int):
        super().__init__()
        self.kind = kind
        self.ln, self.rms = nn.LayerNorm(n), nn.RMSNorm(n, eps=1e-5)
        self.log_softmax = nn.LogSoftmax(dim=-1)
        self.row_scale = nn.Parameter(torch.rand(s) + 0.5)

    def forward(self, x, mask):
        h = x + mask
        if self.kind == "softmax":
            return h.softmax(-1)
        if self.kind == "log_softmax":
            return self.log_softmax(h)
        if self.kind == "layer_norm":
            return self.ln(h)
        if self.kind == "rms_norm":
            return self.rms(h) * 2
        if self.kind == "sum":
            return h.sum(-1) * self.row_scale
        if self.kind == "mean":
            return torch.mean(h, -1) + 1
        return torch.amax(h, dim=-1).relu()


def _inputs(dtype, shape=(2, 3, 40)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)]


# -- every kind: one kernel, numerics ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_kind_with_prologue_and_epilogue_is_one_kernel(kind, dtype):
    model = Kind(kind, 40).to(dtype)
    inputs = _inputs(dtype)
    gm, result, plog = _fuse(model, inputs)
    assert result.modified and plog.counts["groups"] == 1
    assert _reductions_left(gm) == []
    assert [n.op for n in gm.graph.nodes if n.op.startswith("call")] == ["call_function"] * 2  # fused, getitem
    assert _dispatched(gm, inputs) == {"fxopt.fused.default": 1}
    (kernel,) = _kernels(gm)
    assert isinstance(kernel, RowwiseKernel) and kind in kernel.op_names
    assert "mul" in kernel.op_names and "tanh" in kernel.op_names  # prologue and epilogue inside
    _assert_matches(gm, model, inputs)


@pytest.mark.parametrize("kind", KINDS)
def test_kind_with_broadcast_operands_and_keepdim_false(kind):
    model = KindBroadcast(kind, 3, 24)
    inputs = [torch.randn(2, 3, 24), torch.randn(3, 24)]
    gm, result, _ = _fuse(model, inputs)
    assert result.modified and _reductions_left(gm) == []
    assert _dispatched(gm, inputs) == {"fxopt.fused.default": 1}
    _assert_matches(gm, model, inputs)
    other_batch = [torch.randn(5, 3, 24), torch.randn(3, 24)]
    _assert_matches(gm, model, other_batch)


SPELLINGS = {
    "torch.softmax": lambda x: torch.softmax(x, -1),
    "F.softmax(dim=)": lambda x: F.softmax(x, dim=2),
    "x.softmax": lambda x: x.softmax(-1),
    "F.softmax(dtype=)": lambda x: F.softmax(x, -1, dtype=torch.float64),
    "torch.log_softmax": lambda x: torch.log_softmax(x, -1),
    "x.log_softmax": lambda x: x.log_softmax(dim=-1),
    "F.layer_norm": lambda x: F.layer_norm(x, [16]),
    "torch.rms_norm": lambda x: torch.rms_norm(x, [16]),
    "torch.sum": lambda x: torch.sum(x, dim=[-1]),
    "x.sum(dtype=)": lambda x: x.sum(-1, keepdim=True, dtype=torch.float64),
    "x.mean": lambda x: x.mean(2, True),
    "torch.amax": lambda x: torch.amax(x, -1),
    "x.amax": lambda x: x.amax(dim=(2,), keepdim=True),
    "torch.native_layer_norm": lambda x: torch.native_layer_norm(x, [16], None, None, 1e-5)[0],
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling(name):
    class M(nn.Module):
        def forward(self, x):
            return SPELLINGS[name](x)

    x = torch.randn(2, 3, 16)
    gm, result, _ = _fuse(M(), [x])
    assert result.modified and _reductions_left(gm) == []
    assert _dispatched(gm, [x]) == {"fxopt.fused.default": 1}
    _assert_matches(gm, M(), [x])


@pytest.mark.parametrize("module", [nn.Softmax(dim=-1), nn.LogSoftmax(1), nn.LayerNorm(16), nn.RMSNorm(16),
                                    nn.LayerNorm(16, elementwise_affine=False), nn.LayerNorm(16, bias=False),
                                    nn.Softmax()], ids=lambda m: repr(m))
def test_module_spelling(module):
    x = torch.randn(4, 16)  # 2-D: nn.Softmax() without dim is softmax over dim 1, the last
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    gm, result, _ = _fuse(nn.Sequential(module), [x])
    assert result.modified and _reductions_left(gm) == []
    _assert_matches(gm, nn.Sequential(module), [x])


class Chain(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.ln, self.rms = nn.LayerNorm(n), nn.RMSNorm(n)

    def forward(self, x, r):
        a = self.ln(x + r)
        b = torch.softmax(self.rms(a) * 2, -1)
        d = F.log_softmax(b, dim=-1)
        return d.sum(-1), d.mean(-1, keepdim=True), d.amax(-1)


@pytest.mark.parametrize("decompose", [False, True], ids=["export", "export+decompositions"])
def test_aten_spellings_from_export(decompose):
    """ATen-level graphs: layer_norm, rms_norm, softmax.int, ... and after decompositions native_layer_norm (a tuple),
    _softmax, _log_softmax and rms_norm written out as pow/mean/rsqrt. Chained reductions share kernels up to
    max_stages passes over the row."""
    model, inputs = Chain(32), _inputs(torch.float32, (3, 5, 32))
    gm, result, plog = _fuse(model, inputs, export=True, decompose=decompose)
    assert result.modified and _reductions_left(gm) == []
    kernels = _kernels(gm)
    assert plog.counts["reductions"] == 7
    assert all(sum(len(ops.ROW_REDUCTION_OPS[n].stages) for n in k.op_names if n in ops.ROW_REDUCTION_OPS) <= 8
               for k in kernels)
    assert _dispatched(gm, inputs) == {"fxopt.fused.default": len(kernels)}
    _assert_matches(gm, model, inputs)


def test_max_stages_splits_chains():
    model, inputs = Chain(32), _inputs(torch.float32, (3, 5, 32))
    gm, _, plog = _fuse(model, inputs, max_stages=2)
    assert plog.counts["groups"] == 7  # every reduction its own kernel (layer_norm and softmax take 2 passes each)
    _assert_matches(gm, model, inputs)


# -- the transformer cases ---------------------------------------------------------------------------------------
class ResidualNorm(nn.Module):
    def __init__(self, n, reuse=False):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.reuse = reuse

    def forward(self, x, residual):
        h = x + residual
        return (self.norm(h), h) if self.reuse else self.norm(h)


@pytest.mark.parametrize("reuse", [False, True], ids=["ln(x+res)", "ln(x+res) and x+res"])
def test_layer_norm_of_residual_add_is_one_launch(reuse):
    model = ResidualNorm(64, reuse)
    inputs = _inputs(torch.float32, (2, 7, 64))
    gm, _, _ = _fuse(model, inputs)
    assert _dispatched(gm, inputs) == {"fxopt.fused.default": 1}
    (fused,) = _fused(gm)
    assert fused.args[1][:2] == list(gm.graph.find_nodes(op="placeholder"))  # reads x and residual
    assert len(fused.users) == (2 if reuse else 1)  # x + residual is an extra output when used again
    _assert_matches(gm, model, inputs)


class MLP(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.fc1, self.fc2 = nn.Linear(n, 4 * n), nn.Linear(4 * n, n)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def test_mlp_block_layer_norm_becomes_one_kernel():
    model, x = MLP(32), torch.randn(2, 5, 32)
    gm, _, _ = _fuse(model, [x])
    (kernel,) = _kernels(gm)
    assert kernel.op_names == ["layer_norm"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc1", "fc2"]  # linears untouched
    ops_run = _dispatched(gm, [x])
    assert ops_run["fxopt.fused.default"] == 1 and "native_layer_norm" not in ops_run
    _assert_matches(gm, model, [x])


class LlamaRMSNorm(nn.Module):
    """The hand-written RMSNorm of Hugging Face Llama (upcast, variance, rsqrt, downcast, weight)."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)
        self.eps = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_handwritten_rms_norm_is_one_kernel(dtype):
    model, x = LlamaRMSNorm(48).to(dtype), torch.randn(2, 5, 48, dtype=dtype)
    gm, _, _ = _fuse(model, [x])
    assert _dispatched(gm, [x]) == {"fxopt.fused.default": 1}
    (kernel,) = _kernels(gm)
    assert {"pow", "mean", "rsqrt", "mul"} <= set(kernel.op_names)
    _assert_matches(gm, model, [x])


def test_handwritten_layer_norm_two_means_is_one_kernel():
    class M(nn.Module):
        def forward(self, x):
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            return (x - mu) / torch.sqrt(var + 1e-5)

    x = torch.randn(3, 50) * 3 + 1
    gm, _, plog = _fuse(M(), [x])
    assert plog.counts == {"groups": 1, "reductions": 2, "nodes_fused": 8}
    assert _dispatched(gm, [x]) == {"fxopt.fused.default": 1}
    _assert_matches(gm, M(), [x])


def test_attention_softmax_with_mask_and_scale():
    class M(nn.Module):
        def forward(self, q, k, mask):
            scores = q @ k.transpose(-2, -1)
            return torch.softmax(scores * 0.125 + mask, dim=-1)

    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    mask = torch.triu(torch.full((9, 9), float("-inf")), 1)
    gm, _, _ = _fuse(M(), [q, k, mask])
    (kernel,) = _kernels(gm)
    assert kernel.op_names == ["mul", "add", "softmax"]
    assert "_softmax" not in _dispatched(gm, [q, k, mask])
    _assert_matches(gm, M(), [q, k, mask])


# -- row lengths, shapes, reuse ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 1000, 4096])
def test_row_lengths(n):
    for model in (ResidualNorm(n, reuse=True), Kind("softmax", n), Kind("sum", n)):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        inputs = _inputs(torch.float32, (3, 2, n))
        gm, _, _ = _fuse(model, inputs)
        assert _dispatched(gm, inputs) == {"fxopt.fused.default": 1}
        _assert_matches(gm, model, inputs)


def test_kernel_reused_across_row_lengths_and_batches():
    names = set()
    for shape in [(2, 3, 7), (5, 1, 7), (4, 2, 1000)]:
        model, inputs = ResidualNorm(shape[-1]), _inputs(torch.float32, shape)
        gm, _, _ = _fuse(model, inputs)
        names |= {k.name for k in _kernels(gm)}
    assert len(names) == 1  # batch and row length are runtime arguments
    (kernel,) = _kernels(gm)
    # the graph built for (4, 2, 1000) runs other batch shapes of rank 3 without recompiling
    for shape in [(1, 1, 1000), (7, 3, 1000), (0, 2, 1000)]:
        inputs = _inputs(torch.float32, shape)
        _assert_matches(gm, model, inputs)
    assert len(kernel._plans) >= 4 and KERNELS[kernel.name] is kernel


def test_call_time_non_contiguous_and_broadcast_inputs_are_handled():
    model = Kind("layer_norm", 16)
    x, r = _inputs(torch.float32, (3, 4, 16))
    gm, _, _ = _fuse(model, [x, r])
    xt = torch.randn(3, 16, 4).transpose(-1, -2)  # not contiguous along the row: copied before the launch
    _assert_matches(gm, model, [xt, r])
    _assert_matches(gm, model, [x[..., ::1], torch.randn(3, 4, 32)[..., ::2]])
    _assert_matches(gm, model, [torch.randn(1, 4, 16).expand(3, 4, 16), r])  # stride 0 over the batch


def test_kernel_refuses_inputs_it_was_not_built_for():
    model = Kind("sum", 8)
    x, r = _inputs(torch.float32, (2, 8))
    gm, _, _ = _fuse(model, [x, r])
    (kernel,) = _kernels(gm)
    with pytest.raises(TypeError, match="dtype"):
        kernel([x.double(), r.double(), *([] if len(kernel.input_dtypes) == 2 else [r])])
    with pytest.raises(ValueError, match="inputs"):
        kernel([x])
    with pytest.raises(ValueError, match="rank"):
        kernel([torch.randn(2, 2, 8), torch.randn(2, 2, 8)])


def test_nan_and_inf_rows_match_eager():
    class M(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1), torch.log_softmax(x, -1), x.amax(-1), x.sum(-1)

    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[1.0, nan, 2.0], [-inf, -inf, -inf], [inf, 1.0, 2.0], [-inf, 0.0, 1.0]])
    gm, _, _ = _fuse(M(), [x])
    assert len(_fused(gm)) == 4  # reductions that only share an input are separate kernels
    _assert_matches(gm, M(), [x])


def test_fake_tensors_export_and_torch_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = ResidualNorm(32, reuse=True)
    inputs = _inputs(torch.float32, (2, 3, 32))
    gm, _, _ = _fuse(model, inputs)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = gm(torch.empty(5, 4, 32), torch.empty(5, 4, 32))
    assert [tuple(o.shape) for o in out] == [(5, 4, 32), (5, 4, 32)]
    exported = torch.export.export(gm, tuple(inputs))
    assert len([n for n in exported.graph.nodes if n.target is fused_op]) == 1
    compiled = torch.compile(gm, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        assert compare(compiled(*inputs), model(*inputs)) is None


# -- mixed dtypes ------------------------------------------------------------------------------------------------
def test_mixed_dtypes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(24)  # float32 parameters

        def forward(self, x16, r32, b16):
            a = F.layer_norm(x16 + r32, (24,))  # float16 + float32 promotes: a float32 row
            b = self.norm(b16)  # bfloat16 input, float32 weight and bias (mixed-dtype layer norm)
            c = torch.softmax(x16, -1, dtype=torch.float32)  # float16 in, float32 out
            d = F.log_softmax(r32 * 3, -1, dtype=torch.bfloat16)  # narrowing: rounds the input first, as eager
            return a, b, c, d

    inputs = [torch.randn(3, 24).half(), torch.randn(3, 24), torch.randn(3, 24).bfloat16()]
    model = M()
    with torch.no_grad():
        model.norm.weight.normal_()
    gm, _, plog = _fuse(model, inputs)
    assert plog.counts["reductions"] == 4 and _reductions_left(gm) == []
    out = gm(*inputs)
    assert [o.dtype for o in out] == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    _assert_matches(gm, model, inputs)


# -- what stays eager, and why -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fn, reason", [
    (lambda x: torch.softmax(x, 1), "reduces dim 1 of a 3-d tensor, not only the last"),
    (lambda x: x.sum((0, -1)), "not only the last"),
    (lambda x: x.amax(), "reduces dim all"),
    (lambda x: (x > 0).sum(-1), "only floating types"),
    (lambda x: F.layer_norm(x, (3, 8)), "normalized_shape"),
    (lambda x: torch.native_layer_norm(x, [8], None, None, 1e-5)[1] + 1, "mean/rstd outputs are used"),
], ids=["softmax-dim1", "sum-non-trailing-dims", "amax-all", "integer-sum",
        "two-dim-layer-norm", "layer-norm-stats"])
def test_stays_eager_with_a_note(fn, reason):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)

    x = torch.randn(2, 3, 8)
    gm, result, plog = _fuse(M(), [x])
    assert not result.modified and _fused(gm) == []
    assert any(reason in n for n in plog.notes), plog.notes


# -- rows read at their stride (NOTE [Strided rows]) ---------------------------------------------------------------
def _copies_before_launch(gm) -> int:
    """How many inputs the row kernels of ``gm`` copy before launching, over every input signature they ran with
    (the plan's ``fixes``: a copy the kernel makes because it cannot address the input as it is)."""
    return sum(sum(f is not None for f in plan.fixes or []) for k in _kernels(gm) for plan in k._plans.values())


class _PermutedLayerNorm(nn.Module):
    """ConvNeXt's LayerNorm over channels: NCHW permuted so the channels are last, normalized, a GELU after."""

    def __init__(self, c, order):
        super().__init__()
        self.norm, self.order = nn.LayerNorm(c), order

    def forward(self, x):
        return F.gelu(self.norm(x.permute(*self.order)))


@pytest.mark.parametrize("order", [(0, 2, 3, 1), (2, 0, 3, 1), (3, 2, 0, 1), (1, 0, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_along_a_strided_dim_are_read_in_place(order, dtype):
    """A LayerNorm whose rows are not contiguous (a permuted NCHW tensor) is one kernel that reads the rows at their
    stride: no copy runs before it, and the result is eager's."""
    torch.manual_seed(0)
    x = torch.randn(2, 24, 5, 7, dtype=dtype)
    c = x.shape[order[-1]]
    model = _PermutedLayerNorm(c, order).to(dtype)
    nn.init.normal_(model.norm.weight), nn.init.normal_(model.norm.bias)
    gm, result, _ = _fuse(model, [x])
    assert result.modified and len(_fused(gm)) == 1
    _assert_matches(gm, model, [x])
    assert _copies_before_launch(gm) == 0


def test_a_value_broadcast_along_the_row_is_read_with_stride_zero():
    """A kernel built for a per-element operand, called with one value per row (shape [..., 1]: one compiled kernel
    serves every shape of its rank), reads it with stride 0 along the row instead of materializing it."""
    class M(nn.Module):
        def forward(self, x, y):
            return torch.softmax(x * y, -1) + y

    x, y = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    gm, result, _ = _fuse(M(), [x, y])
    (node,) = _fused(gm)
    name = node.args[0]

    class Call(nn.Module):
        def forward(self, a, b):
            return fused_op(name, [a, b])[0]

    y_row = torch.randn(3, 4, 1)
    torch.testing.assert_close(Call()(x, y_row), M()(x, y_row))
    assert _copies_before_launch(gm) == 0


# -- NOTE [Reshapes before a row reduction] ------------------------------------------------------------------------
class _SwinResiduals(nn.Module):
    """timm's Swin block: residual add on [B, H, W, C], reshape to [B, H * W, C], LayerNorm; a second residual add
    on [B, H * W, C] reshaped back before the next LayerNorm. Both adds' results are read again later."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2, self.fc = nn.LayerNorm(c), nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x, a):
        b, h, w, c = x.shape
        x = x + a
        x = x.reshape(b, -1, c)
        x = x + self.fc(self.norm1(x))
        x = x.reshape(b, h, w, c)
        return self.norm2(x), x


@pytest.mark.parametrize("batch", [1, 2])
def test_an_add_before_a_reshape_joins_the_layer_norm_after_it(batch):
    model = _SwinResiduals(16)
    x, a = torch.randn(batch, 4, 6, 16), torch.randn(batch, 4, 6, 16)
    gm, result, plog = _fuse(model, [x, a])
    assert plog.counts["reshapes_sunk"] == 2 and plog.counts["groups"] == 2
    kernels = _kernels(gm)
    assert sorted(k.op_names for k in kernels) == [["add", "layer_norm"], ["add", "layer_norm"]]
    assert not [n for n in gm.graph.nodes if n.target is operator.add]
    _assert_matches(gm, model, [x, a])


def test_a_reshape_sinks_through_a_chain_of_elementwise_ops_once_each():
    """``((y + bias) + x).reshape(...)`` -> LayerNorm: the reshape moves past both adds (the bias add GPUs get after
    fuse_epilogues moves a Linear's bias), one row kernel; a second LayerNorm reading the same sum through a reshape
    of its own does not pull the adds back (each op moves once)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(8))
            self.n1, self.n2 = nn.LayerNorm(8), nn.LayerNorm(8)

        def forward(self, y, x):
            s = (y + self.bias) + x  # [2, 3, 4, 8]
            return self.n1(s.reshape(2, 12, 8)), self.n2(s.reshape(6, 4, 8))

    model, y, x = M(), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    gm, result, plog = _fuse(model, [y, x])
    assert plog.counts["reshapes_sunk"] == 2
    assert sorted(k.op_names for k in _kernels(gm)) == [["add", "add", "layer_norm"], ["layer_norm"]]
    _assert_matches(gm, model, [y, x])


def test_a_reshape_that_would_copy_an_operand_stays_where_it_is():
    """An operand that is not viewable in the reshaped shape (a transposed tensor) would be copied: no rewrite."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x, y):
            return self.norm((x + y.transpose(1, 2)).reshape(-1, 8))

    x, y = torch.randn(2, 3, 4, 8), torch.randn(2, 4, 3, 8)
    gm, result, plog = _fuse(M(), [x, y])
    assert "reshapes_sunk" not in plog.counts
    _assert_matches(gm, M(), [x, y])


def test_in_place_ops_are_not_fused():
    class M(nn.Module):
        def forward(self, x):
            h = x * 2
            h.add_(1)
            return torch.softmax(h, -1)

    x = torch.randn(3, 8)
    gm, result, plog = _fuse(M(), [x])
    assert not result.modified
    assert any("in-place" in n for n in plog.notes)


def test_misaligned_broadcast_of_a_reduced_value_stays_outside():
    class M(nn.Module):
        def forward(self, x):
            return x / x.sum(-1)  # (5, 5) / (5,): divides column j by row j's sum: not row-wise

    x = torch.randn(5, 5)
    gm, _, _ = _fuse(M(), [x])
    assert _dispatched(gm, [x]) == {"fxopt.fused.default": 1, "div": 1}
    _assert_matches(gm, M(), [x])


def test_no_cycle_through_outside_nodes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            a = torch.softmax(x, -1)
            return a * self.fc(a)  # the mul reads the softmax and a value computed from it outside the group

    model, x = M(), torch.randn(3, 8)
    gm, _, _ = _fuse(model, [x])
    assert _dispatched(gm, [x]) == {"fxopt.fused.default": 1, "addmm": 1, "mul": 1}
    _assert_matches(gm, model, [x])


def test_group_reading_a_later_value_is_placed_after_it():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, y):
            a = torch.softmax(x, -1)
            b = self.fc1(a)  # uses the group's output, before the group's last input exists
            t = self.fc2(y)
            return b, a * t  # the mul joins the group and reads t

    model, inputs = M(), [torch.randn(3, 8), torch.randn(3, 8)]
    gm, _, _ = _fuse(model, inputs)
    (kernel,) = _kernels(gm)
    assert kernel.op_names == ["softmax", "mul"]
    gm.graph.lint()
    _assert_matches(gm, model, inputs)


def test_other_backends_are_left_alone():
    gm = fxopt.capture(Kind("softmax", 8).eval(), _inputs(torch.float32, (2, 8)))
    with base._collect("fuse_reductions") as plog:
        assert not fuse_reductions("inductor")(gm).modified
    assert "generates no row-wise kernels" in plog.notes[0]


def test_nothing_to_do_is_reported_unmodified():
    gm = fxopt.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), [torch.randn(2, 4)])
    assert not fuse_reductions("cpp")(gm).modified


# -- rows over several trailing dims: sum/mean/amax with an elementwise prologue ---------------------------------
class SqueezeAfterActivation(nn.Module):
    """An SE block's squeeze (a global average pool) after the activation."""

    def forward(self, x):
        return F.silu(x).mean((2, 3), keepdim=True)


class ChannelAffinePool(nn.Module):
    """``relu(x * s + b)`` with per-channel ``(C, 1, 1)`` operands (per row), reduced over H, W."""

    def __init__(self, c, reduction="sum", keepdim=False):
        super().__init__()
        self.s, self.b = nn.Parameter(torch.randn(c, 1, 1)), nn.Parameter(torch.randn(c, 1, 1))
        self.reduction, self.keepdim = reduction, keepdim

    def forward(self, x):
        h = torch.relu(x * self.s + self.b)
        return getattr(h, self.reduction)((-2, -1), keepdim=self.keepdim) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_activation_then_mean_over_trailing_dims_is_one_kernel(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = (int(v) for v in torch.randint(1, 9, (4,), generator=g))
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    model = SqueezeAfterActivation()
    gm, result, _ = _fuse(model, [x])
    assert result.modified and _reductions_left(gm) == []
    assert _dispatched(gm, [x]) == {"fxopt.fused.default": 1}
    assert fxopt.count_launches(model, [x]).dispatched == 2
    assert fxopt.count_launches(gm, [x]).dispatched == 1
    (kernel,) = _kernels(gm)
    assert kernel.program.row_dims == 2 and kernel.program.ndim == 3
    assert [o.level for o in kernel.program.outputs] == [rowwise.ROWK]
    _assert_matches(gm, model, [x])
    # one kernel for every shape of the rank, and for inputs not dense over the row (copied per call)
    for other in (torch.randn(3, 2, 5, 7).to(dtype), torch.randn(2, 3, 6, 4).to(dtype).transpose(2, 3),
                  torch.randn(1, 4, 1, 1).to(dtype)):
        _assert_matches(gm, model, [other])


@pytest.mark.parametrize("reduction, keepdim", [("sum", False), ("mean", True), ("amax", False)])
def test_per_channel_affine_prologue_and_epilogue_over_trailing_dims(reduction, keepdim):
    model, x = ChannelAffinePool(5, reduction, keepdim), torch.randn(2, 5, 6, 7)
    gm, _, _ = _fuse(model, [x])
    assert _dispatched(gm, [x]) == {"fxopt.fused.default": 1}
    (kernel,) = _kernels(gm)
    assert [i.mode for i in kernel.program.inputs] == ["elem", "row", "row"]
    _assert_matches(gm, model, [x])
    _assert_matches(gm, model, [torch.randn(3, 5, 2, 9)])


def test_three_trailing_dims_of_a_5d_tensor():
    class M(nn.Module):
        def forward(self, x, r):
            return torch.sigmoid(x + r).mean((-3, -2, -1))

    inputs = [torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)]
    gm, _, _ = _fuse(M(), inputs)
    assert _dispatched(gm, inputs) == {"fxopt.fused.default": 1}
    assert _kernels(gm)[0].program.row_dims == 3
    _assert_matches(gm, M(), inputs)


def test_activation_used_elsewhere_becomes_an_extra_output():
    # the prologue's value is needed anyway: the kernel stores it besides the pooled value (as a residual add is
    # stored beside a LayerNorm), one launch instead of two, each value as eager computes it
    class M(nn.Module):
        def forward(self, x):
            y = F.silu(x)
            return y.mean((2, 3), keepdim=True), y * 3

    x = torch.randn(2, 3, 5, 4)
    gm, _, _ = _fuse(M(), [x])
    (kernel,) = _kernels(gm)
    assert [o.level for o in kernel.program.outputs] == [rowwise.ROWK, rowwise.ELEM]
    assert not any(n.target is F.silu for n in gm.graph.nodes)
    _assert_matches(gm, M(), [x])


def test_activation_whose_other_user_feeds_the_reduction_stays_outside():
    # y's other user (an eager reduction over channels) reaches the group: absorbing y would make a cycle
    class M(nn.Module):
        def forward(self, x):
            y = F.silu(x)
            return (y + y.amax(1, keepdim=True)).mean((2, 3))

    x = torch.randn(2, 3, 5, 4)
    gm, _, plog = _fuse(M(), [x])
    assert any(n.target is F.silu for n in gm.graph.nodes)
    assert "amax" in [n.target for n in gm.graph.nodes if n.op == "call_method"]
    assert len(_fused(gm)) == 1 and _kernels(gm)[0].program.op_names == ["add", "mean"]
    assert any("reduces dim 1" in note for note in plog.notes)
    _assert_matches(gm, M(), [x])


@pytest.mark.parametrize("fn, reason", [
    (lambda x: F.silu(x).mean((1, 2)), "not only the last"),
    (lambda x: F.silu(x).mean((1, 3)), "not only the last"),
    (lambda x: F.silu(x).sum(), "reduces dim all"),
], ids=["leading-dims", "gap", "all-dims"])
def test_reductions_over_other_dims_stay_eager(fn, reason):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)

    gm, result, plog = _fuse(M(), [torch.randn(2, 3, 4, 5)])
    assert not result.modified and _fused(gm) == []
    assert any(reason in n for n in plog.notes), plog.notes


def test_operand_broadcast_within_the_row_stays_outside():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5))  # broadcast over H inside each row of H * W

        def forward(self, x):
            return (x * self.w).mean((2, 3))

    model, x = M(), torch.randn(2, 3, 4, 5)
    gm, _, _ = _fuse(model, [x])
    assert _kernels(gm)[0].program.op_names == ["mean"]
    assert any(n.target is operator.mul for n in gm.graph.nodes)
    _assert_matches(gm, model, [x])


def test_rows_over_trailing_dims_save_and_load(tmp_path):
    model, x = ChannelAffinePool(4, "mean", True), torch.randn(2, 4, 3, 5)
    names = fxopt.passes.pass_names("cpp")
    passes = None if "fuse_reductions" in names else (
        names[:names.index("fuse_elementwise")] + [Pass("fuse_reductions", fuse_reductions("cpp"))]
        + names[names.index("fuse_elementwise"):])
    opt = fxopt.optimize(model, [x], backend="cpp", strict=True, passes=passes)
    assert fxopt.count_launches(opt, [x]).dispatched == 1
    fxopt.save(opt, tmp_path / "m.fxopt")
    saved = [json.loads(f.read_text()) for f in (tmp_path / "m.fxopt" / "kernels").glob("*.json")]
    assert [k["program"]["row_dims"] for k in saved if k.get("kind") == "rowwise"] == [2]
    loaded = fxopt.load(tmp_path / "m.fxopt")
    with torch.no_grad():
        assert compare(loaded(x), model(x)) is None


@pytest.mark.skipif(not nvrtc.nvrtc_available()[0], reason="NVRTC not available")
def test_cuda_source_of_rows_over_trailing_dims_compiles_with_nvrtc():
    for model, dtype in [(SqueezeAfterActivation(), torch.float16), (ChannelAffinePool(3), torch.float32)]:
        x = torch.randn(2, 3, 4, 5).to(dtype)
        gm, _, _ = _fuse(model, [x])
        (kernel,) = _kernels(gm)
        cubin = nvrtc.compile_cuda(rowwise.cuda_source(kernel.program), arch="sm_90", name_hint=kernel.name)
        assert kernel.name.encode() in cubin


# -- in the pipeline ---------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d=32, h=2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.h, self.d = h, d

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.h, self.d // self.h)).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax((q @ k.transpose(-2, -1)) * 0.25, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def test_optimize_with_the_pass_before_fuse_elementwise():
    names = fxopt.passes.pass_names("cpp")
    if "fuse_reductions" in names:
        passes = None
    else:  # not wired into the default pipeline yet: insert it before fuse_elementwise
        i = names.index("fuse_elementwise")
        passes = names[:i] + [Pass("fuse_reductions", fuse_reductions("cpp"))] + names[i:]
    model, x = Block(), torch.randn(2, 6, 32)
    # the attention's softmax would become one SDPA call (rewrite_attention): keep it here, where it is the third
    # reduction this test counts
    opt = fxopt.optimize(model, [x], backend="cpp", strict=True, passes=passes, disable=["rewrite_attention"])
    rec = {r.name: r for r in opt.records}["fuse_reductions"]
    assert rec.status == "applied" and rec.changes["reductions"] == 3
    assert rec.dispatched_after < rec.dispatched_before
    with torch.no_grad():
        assert compare(opt(x), model(x)) is None
        x2 = torch.randn(3, 4, 32)
        assert compare(opt(x2), model(x2)) is None


# -- CUDA sources: compiled by NVRTC here, so syntax errors fail without a GPU -----------------------------------
NVRTC_OK, NVRTC_WHY = nvrtc.nvrtc_available()


@pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC not available: {NVRTC_WHY}")
def test_cuda_source_of_every_kernel_compiles_with_nvrtc():
    # the programs of this module's tests (all of them when the module runs), plus a few built here so the test
    # means something on its own; each program prints for CUDA whatever backend it was lowered for
    for model, inputs in [(Kind("layer_norm", 16).double(), _inputs(torch.float64, (2, 16))),
                          (KindBroadcast("sum", 3, 8), [torch.randn(2, 3, 8), torch.randn(3, 8)]),
                          (Chain(16), _inputs(torch.float32, (2, 16))),
                          (Kind("softmax", 1).half(), _inputs(torch.float16, (2, 1))),
                          (SqueezeAfterActivation(), _inputs(torch.float32, (2, 3, 4, 5))),
                          (_SqueezeThenConv(8), [torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)])]:
        _fuse(model, inputs)
    programs = {k.name: k.program for k in KERNELS.values() if isinstance(k, RowwiseKernel)}
    assert len(programs) >= 4
    assert any(o.order is not None for p in programs.values() for o in p.outputs)  # NOTE [Outputs in eager's layout]
    for name, program in sorted(programs.items()):
        cubin = nvrtc.compile_cuda(rowwise.cuda_source(program), arch="sm_90", name_hint=name)
        assert name.encode() in cubin


def _row_programs(cases) -> list:
    """The row programs fusing these (model, inputs) gives, once each (this test's own: KERNELS holds every test's)."""
    programs = {}
    for model, inputs in cases:
        gm, _, _ = _fuse(model, inputs)
        programs.update((k.name, k.program) for k in _kernels(gm) if isinstance(k, RowwiseKernel))
    return list(programs.values())


@pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC not available: {NVRTC_WHY}")
@pytest.mark.parametrize("n, rows", [(384, 197), (7, 64), (1000, 3), (5000, 2)])
def test_cuda_source_specialized_to_a_shape_compiles_with_nvrtc(n, rows):
    # NOTE [Kernels for one shape]: every integer argument a constant, the block fixed; rows in registers or not,
    # a multiple of the block or not, several rows a block
    model, x = KindBroadcast("layer_norm", 3, n), torch.randn(rows, 3, n)
    sq, x2 = SqueezeAfterActivation(), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    programs = _row_programs([(model, [x, torch.randn(3, n)]), (sq, [x2])])
    for program in {p.name: p for p in programs}.values():
        params = rowwise.cuda_int_params(program)
        constants = {p: (rows if p == "rows" else n if p == "n" else 1) for p in params}
        threads = 32 if n <= 32 else min(1024, 1 << (max(n // 8, 32) - 1).bit_length())
        block = (threads, 8 if threads == 32 else 1)
        source = rowwise.cuda_source(program, constants, block)
        name = rowwise.specialized_name(program, constants, block)
        assert name != program.name and f"constexpr int64_t n = {n};" in source
        cubin = nvrtc.compile_cuda(source, arch="sm_90", name_hint=name)
        assert name.encode() in cubin


@pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC not available: {NVRTC_WHY}")
@pytest.mark.parametrize("split", rowwise.CLUSTER_SPLITS)
def test_rows_split_over_a_cluster_compile_with_nvrtc(split):
    # NOTE [Rows split over a cluster]: one stage (sum, max), two dependent stages (LayerNorm, softmax), a float64
    # accumulator, a strided row over H x W with its SiLU stored channels-last; parts that fit the registers or not
    x2 = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    programs = _row_programs([(Kind("layer_norm", 16), _inputs(torch.float32, (2, 16))),
                              (Kind("softmax", 16).half(), _inputs(torch.float16, (2, 16))),
                              (Kind("amax", 16), _inputs(torch.float32, (2, 16))),
                              (Kind("layer_norm", 16).double(), _inputs(torch.float64, (2, 16))),
                              (_SqueezeThenConv(8), [x2])])
    assert any(o.order is not None for p in programs for o in p.outputs)
    for n, threads in [(12544, 512), (40000, 1024)]:  # 40000 / 8 parts do not fit 1024 threads' registers
        for program in programs:
            constants = {p: (32 if p == "rows" else n if p == "n" else 1) for p in rowwise.cuda_int_params(program)}
            source = rowwise.cuda_source(program, constants, (threads, 1), split)
            name = rowwise.specialized_name(program, constants, (threads, 1), split)
            assert f"__cluster_dims__({split}, 1, 1)" in source
            assert name != rowwise.specialized_name(program, constants, (threads, 1))
            stages = sum(isinstance(item, rowwise.RowStage) for item in program.body)
            assert source.count("fxr_cluster_reduce<") == 2 * stages  # the register path and the loop over memory
            cubin = nvrtc.compile_cuda(source, arch="sm_90", name_hint=name)
            assert name.encode() in cubin


def test_rows_split_over_a_cluster_need_one_shape_and_one_row_a_block():
    model, x = Kind("softmax", 8), torch.randn(2, 8)
    _fuse(model, [x, torch.randn(2, 8)])
    program = next(k.program for k in KERNELS.values() if isinstance(k, RowwiseKernel))
    constants = {p: 2 if p == "rows" else 4096 if p == "n" else 1 for p in rowwise.cuda_int_params(program)}
    for args in [({}, (256, 1), 2), (constants, (256, 2), 2), (constants, (256, 1), 3), (constants, None, 2)]:
        with pytest.raises(ValueError, match="split over"):
            rowwise.cuda_source(program, *args)
    assert "cluster" not in rowwise.cuda_source(program) + rowwise.cuda_source(program, constants, (256, 1))


@pytest.mark.parametrize("rows, n, strided, split", [
    (4, 6000, False, 4),    # very few rows: 4 blocks a row (measured 5.66 -> 4.38 µs)
    (16, 100000, False, 8),  # at most 8 (a portable cluster)
    (8, 1500, False, 1),     # too short to split
    (4, 3000, False, 2),     # parts of at least SPLIT_MIN_ELEMENTS: not 4 blocks of 750
    (32, 12544, True, 8),    # EfficientNet-B0's first SE squeeze, strided (measured 19.2 -> 11.4 µs)
    (32, 10240, False, 1),   # a GroupNorm's statistics, contiguous (measured 2.78 one block a row, 5.18 split)
    (96, 3136, True, 1),     # the second squeeze: split, two waves (measured 10.75 -> 12.19)
    (144, 3136, True, 1),    # rows enough
])
def test_split_for_takes_the_measured_cases(rows, n, strided, split):
    from fxopt.runtime.rowwise import split_for

    assert split_for(rows, n, sm_count=132, strided=strided) == split


def test_a_split_launch_runs_one_row_a_block_sized_for_its_part():
    model, x = Kind("layer_norm", 16), torch.randn(2, 16)
    _fuse(model, [x, torch.randn(2, 16)])
    kernel = next(k for k in KERNELS.values() if isinstance(k, RowwiseKernel))
    kernel._sm_count, kernel._max_threads = 132, 1024
    assert kernel._launch_config(32, 10240) == ((1024, 1), 32)
    assert kernel._launch_config(32, 10240, 8) == ((512, 1), 256)  # 1280 elements a block, 4 a thread
    assert kernel._launch_config(3, 300000, 8) == ((1024, 1), 24)


@pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC not available: {NVRTC_WHY}")
@pytest.mark.parametrize("split, lanes", [(1, 8), (1, 32), (8, 32), (2, 16)])
def test_rows_as_columns_compile_with_nvrtc(split, lanes):
    # NOTE [Rows as columns]: a squeeze storing its SiLU channels-last, two dependent stages, a float64 accumulator,
    # a max; rows not a multiple of 32
    x2 = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    programs = _row_programs([(_SqueezeThenConv(8), [x2]),
                              (Kind("layer_norm", 16).double(), _inputs(torch.float64, (2, 16))),
                              (Kind("amax", 16).half(), _inputs(torch.float16, (2, 16)))])
    assert len(programs) >= 3
    for program in programs:
        constants = {p: (40 if p == "rows" else 3136 if p == "n" else 1) for p in rowwise.cuda_int_params(program)}
        source = rowwise.cuda_source(program, constants, (32, lanes), split, columns=True)
        name = rowwise.specialized_name(program, {**constants, "columns": 1}, (32, lanes), split)
        assert "fxc_reduce<by>" in source and ("__cluster_dims__" in source) == (split > 1)
        cubin = nvrtc.compile_cuda(source, arch="sm_90", name_hint=name)
        assert name.encode() in cubin


def test_rows_as_columns_need_one_shape_and_a_block_of_32_lanes():
    model, x = Kind("softmax", 8), torch.randn(2, 8)
    _fuse(model, [x, torch.randn(2, 8)])
    program = next(k.program for k in KERNELS.values() if isinstance(k, RowwiseKernel))
    constants = {p: 2 if p == "rows" else 4096 if p == "n" else 1 for p in rowwise.cuda_int_params(program)}
    for args in [(constants, (16, 8)), (constants, (32, 3)), ({}, (32, 8)), (constants, None)]:
        with pytest.raises(ValueError, match="as columns"):
            rowwise.cuda_source(program, *args, columns=True)


@pytest.mark.parametrize("rows, n, clusters, expected", [
    (32, 12544, True, ((32, 32), 8, 8)),    # EfficientNet-B0's first squeeze: one tile, 8 blocks
    (96, 3136, True, ((32, 32), 24, 8)),    # its second: 3 tiles of 8
    (1152, 49, True, ((32, 8), 36, 1)),     # its last: 36 tiles, too short to split
    (32, 12544, False, ((32, 32), 1, 1)),   # no clusters: one block a tile
    (5000 * 32, 196, True, ((32, 32), 132 * 16, 1)),  # tiles past 16 a SM: the grid strides
])
def test_column_config(rows, n, clusters, expected):
    from fxopt.runtime.rowwise import column_config

    assert column_config(rows, n, 132, clusters) == expected


def test_column_layout_takes_channels_last_rows_only():
    from fxopt.runtime.rowwise import column_layout

    # [N=1, C=96, H x W]: one input strided along the row (C apart), neighbouring channels neighbouring; the SiLU
    # stored channels-last; batch strides per input (N, C), then per ordered output, then its row stride
    assert column_layout(3, 1, [True], [0, 1], [96], [0, 1, 96], 1, 1)
    assert column_layout(3, 2, [True, False], [0, 1, 0, 1], [96], [], 0, 0)  # a per-row bias, no elem output
    assert not column_layout(3, 1, [True], [0, 3136], [1], [], 0, 0)  # NCHW: rows contiguous
    assert not column_layout(3, 1, [True], [0, 1], [96], [], 0, 1)  # an output stored row-major
    assert not column_layout(3, 1, [True], [0, 1], [96], [0, 3136, 1], 1, 1)  # an output not channels-last
    assert not column_layout(2, 1, [True], [1], [0], [], 0, 0)  # nothing strided along the row


def test_specialized_source_checks_its_constants():
    model, x = Kind("softmax", 8), torch.randn(2, 8)
    _fuse(model, [x, torch.randn(2, 8)])
    program = next(k.program for k in KERNELS.values() if isinstance(k, RowwiseKernel))
    with pytest.raises(ValueError, match="no such parameters"):
        rowwise.cuda_source(program, {"rows": 2, "threads": 4}, (32, 8))
    # the generic kernel is unchanged by specializing: the same name, every argument a parameter
    assert f"void {program.name}(" in rowwise.cuda_source(program)
    assert "constexpr int64_t" not in rowwise.cuda_source(program)


# -- a global average pool is a mean over H x W (torchvision's SqueezeExcitation) -----------------------------------
class _PoolSE(nn.Module):
    """torchvision's SqueezeExcitation after a SiLU: the squeeze is ``AdaptiveAvgPool2d(1)`` (or its functional
    spellings), not ``mean((2, 3))``."""

    def __init__(self, spelling="module", c=16):
        super().__init__()
        self.spelling, self.pool = spelling, nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)

    def forward(self, x):
        h = F.silu(x)
        if self.spelling == "module":
            s = self.pool(h)
        elif self.spelling == "functional":
            s = F.adaptive_avg_pool2d(h, (1, 1))
        else:
            s = F.adaptive_avg_pool2d(h, 1)
        return h * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


@pytest.mark.parametrize("spelling", ["module", "functional", "int_size"])
@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_a_global_average_pool_joins_its_producer(spelling, capture):
    model, x = _PoolSE(spelling).eval(), torch.randn(2, 16, 7, 7)
    if capture == "export":
        gm = torch.export.export(model, (x,)).module()
        annotate(gm, (x,))
        opt = fxopt.optimize(gm, (x,), strict=True)
    else:
        opt = fxopt.optimize(model, (x,), strict=True)
    assert {r.name: r for r in opt.records}["fuse_reductions"].changes.get("reductions") == 1
    ran = dispatched_ops(opt, (x,))
    assert not {"silu", "mean", "adaptive_avg_pool2d", "_adaptive_avg_pool2d"} & set(ran), ran
    with torch.no_grad():
        assert compare(opt(x), model(x)) is None


@pytest.mark.parametrize("case", ["no_elementwise_producer", "two_by_two", "channels_last"])
def test_a_pool_stays_atens_where_nothing_joins_it(case):
    """A pool with no elementwise producer, or not global, stays ATen's; over a channels-last input the ReLU and
    the pool are one kernel since NOTE [Rows over strided dims] (H and W one run of stride C)."""
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(2 if case == "two_by_two" else 1)

        def forward(self, x):
            h = self.conv(x) if case == "no_elementwise_producer" else torch.relu(x)
            return self.pool(h).flatten(1) * 2

    x = torch.randn(2, 8, 6, 6)
    if case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    model = Pool().eval()
    opt = fxopt.optimize(model, (x,), strict=True)
    reductions = {r.name: r for r in opt.records}["fuse_reductions"].changes.get("reductions")
    assert reductions == (1 if case == "channels_last" else None)
    with torch.no_grad():
        assert compare(opt(x), model(x)) is None


class _LayerScaleThenPool(nn.Module):
    """ConvNeXt's last block into the global average pool: x + gamma * permute(y), then mean over H x W; the
    permuted branch is channels-last, its H and W one run of stride C."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x, y):
        return (x + self.gamma * y.permute(0, 3, 1, 2)).mean((2, 3))


class _SqueezeExcite(nn.Module):
    def forward(self, x):
        h = F.silu(x)
        return h * torch.sigmoid(h.mean((2, 3), keepdim=True))


@pytest.mark.parametrize("shape", [(2, 16, 7, 7), (1, 24, 5, 3), (3, 8, 1, 6)])
def test_rows_over_strided_dims_join_the_pools_kernel(shape):
    """NOTE [Rows over strided dims]: an operand whose H and W make one strided run is read in place: the layer
    scale, the residual add and the mean are one kernel, no copy."""
    n, c, h, w = shape
    model = _LayerScaleThenPool(c).eval()
    x, y = torch.randn(n, c, h, w), torch.randn(n, h, w, c)
    opt = fxopt.optimize(model, (x, y), backend="cpp", strict=True)
    assert {r.name: r for r in opt.records}["fuse_reductions"].changes == {"groups": 1, "reductions": 1,
                                                                           "nodes_fused": 3}
    assert fxopt.count_launches(opt, (x, y)).dispatched == 1  # eager: mul, add, mean
    torch.testing.assert_close(opt(x, y), model(x, y), rtol=1e-5, atol=1e-6)


class _SqueezeThenConv(nn.Module):
    """An SE block between convolutions: the SiLU output is read by the squeeze and by the gate's multiply."""

    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        h = F.silu(x)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.out(h * g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 7, 7), (1, 24, 5, 3), (3, 8, 1, 6), (1, 8, 6, 1)])
def test_a_squeeze_stores_its_silu_in_eagers_channels_last_layout(shape, dtype):
    """NOTE [Outputs in eager's layout]: the SE block's SiLU is read after the squeeze; the row kernel reads the
    channels-last input in place and stores the SiLU channels-last, as eager does, so SiLU and mean are one kernel
    and the gate's multiply reads what eager's would."""
    model = _SqueezeThenConv(shape[1]).to(dtype)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    gm, result, plog = _fuse(model, [x])
    assert result.modified and plog.counts["reductions"] == 1, plog.notes
    (node,) = _fused(gm)
    kernel = KERNELS[node.args[0]]
    assert [o.order for o in kernel.program.outputs] == [(0, 2, 3, 1), None]
    silu, mean = kernel([x])
    eager = F.silu(x)
    assert silu.stride() == eager.stride() and mean.shape == (shape[0], shape[1], 1, 1)
    torch.testing.assert_close(silu, eager)
    _assert_matches(gm, model, [x])


def test_the_stored_layout_follows_the_calls_shape():
    """The program keeps the dim order, not the strides: a batch of 3 through a kernel built at batch 1 gets
    channels-last outputs of its own shape. A row-major input (another signature: the module specializes on
    strides) gets a kernel of its own, which stores row-major, as eager does; the first kernel still reads it right."""
    model = _SqueezeThenConv(8).eval()
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(model, (x,), backend="cpp", strict=True)
    assert {r.name: r for r in opt.records}["fuse_reductions"].changes.get("reductions") == 1
    (kernel,) = [k for k in opt.kernels.values() if isinstance(k, RowwiseKernel)]
    y = torch.randn(3, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    silu, _ = kernel([y])
    assert silu.stride() == F.silu(y).stride() == (200, 1, 40, 8)
    z = torch.randn(2, 8, 5, 5)
    silu, _ = kernel([z])
    torch.testing.assert_close(silu, F.silu(z))
    with torch.no_grad():
        torch.testing.assert_close(opt(y), model(y), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt(z), model(z), rtol=1e-5, atol=1e-6)
    (row_major,) = [k for k in opt.kernels.values() if isinstance(k, RowwiseKernel)]  # the last signature's
    assert row_major.program.outputs[0].order is None


def test_a_squeeze_artifact_keeps_the_stored_layout(tmp_path, monkeypatch):
    """Saved and loaded into an empty kernel registry: the program's dim order comes back from the JSON, the
    source matches the saved one (so the saved binary is reused) and the SiLU is stored channels-last again."""
    from fxopt.runtime import kernel as kernel_mod

    model = _SqueezeThenConv(8).eval()
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    opt = fxopt.optimize(model, (x,), backend="cpp", strict=True)
    path = fxopt.save(opt, tmp_path / "se")
    monkeypatch.setattr(kernel_mod, "KERNELS", {})
    loaded = fxopt.load(path)
    (name,) = [n for n in loaded.kernel_status if n.startswith("fxopt_rows_")]
    assert loaded.kernel_status[name] == "saved binary reused"
    assert kernel_mod.KERNELS[name].program.outputs[0].order == (0, 2, 3, 1)
    assert kernel_mod.KERNELS[name]([x])[0].stride() == F.silu(x).stride()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, strides, row_dims, order", [
    ((2, 16, 7, 7), (784, 1, 112, 16), 2, (0, 2, 3, 1)),   # channels-last: H x W one run of stride C
    ((1, 16, 7, 7), (784, 1, 112, 16), 2, (0, 2, 3, 1)),   # batch 1 keeps the conventional stride
    ((2, 16, 7, 7), (784, 49, 7, 1), 2, None),             # row-major: stored as before
    ((2, 16, 7, 7), (784, 1, 16, 112), 2, None),           # W outside H: the row is no single run
    ((2, 16, 7, 7), (784, 1, 16, 112), 1, (0, 3, 2, 1)),   # ... but a row of one dim is always one run
    ((4, 6), (1, 4), 1, (1, 0)),                           # a transposed matrix, rows along the outer dim
    ((4, 6), (0, 1), 1, None),                             # broadcast: not dense
    ((4, 6), (12, 2), 1, None),                            # gaps: not dense
])
def test_storable_order(shape, strides, row_dims, order):
    assert rowwise.storable_order(shape, strides, row_dims) == order


@pytest.mark.parametrize("shape, strides, run", [
    ((7, 7), (112, 16), 16), ((7, 7), (7, 1), 1), ((1, 7), (5, 3), 3), ((7, 7), (16, 112), None), ((1, 1), (0, 0), 1)])
def test_one_strided_run(shape, strides, run):
    assert rowwise.one_strided_run(shape, strides) == run


# -- property: per-element outputs keep eager's layout, whatever the input's dim order --------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _ActivationAndPool(nn.Module):
    """An activation read by a pool over the trailing ``k`` dims and by what follows (returned, with its strides)."""

    def __init__(self, k):
        super().__init__()
        self.dims = tuple(range(-k, 0))

    def forward(self, x):
        h = F.silu(x) * 1.5
        return h, h.mean(self.dims, keepdim=True)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.integers(1, 6), min_size=3, max_size=4), k=st.integers(1, 2), data=st.data())
def test_per_element_outputs_keep_eagers_layout_in_any_dim_order(shape, k, data):
    """NOTE [Outputs in eager's layout]: an input laid out in any dim order; the row kernel stores the activation
    with eager's strides where its row is one strided run (else the group keeps a strided operand out, as before),
    and every value is eager's."""
    order = data.draw(st.permutations(range(len(shape))))
    base = torch.randn([shape[d] for d in order])
    x = base.permute([order.index(d) for d in range(len(shape))])  # logical ``shape``, stored in ``order``
    model = _ActivationAndPool(k)
    gm, result, plog = _fuse(model, [x])
    with torch.no_grad():
        (h, m), (h_ref, m_ref) = gm(x), model(x)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-6)
    if result.modified:  # strides of size-1 dims say nothing about the layout
        assert [s for s, n in zip(h.stride(), h.shape) if n > 1] == [
            s for s, n in zip(h_ref.stride(), h_ref.shape) if n > 1]
