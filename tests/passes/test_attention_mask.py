"""hoist_attention_masks: SDPA calls sharing a bool mask read one additive float mask, converted once per query dtype
(``where(mask, 0, -inf)`` in the query's dtype, as eager converts it inside every call), with eager's results bit for
bit; the calls it cannot hand over stay, with a note."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import ops
from fxopt.capture import annotate, capture
from fxopt.launches import dispatched_ops
from fxopt.passes import attention_mask, hoist_attention_masks
from fxopt.passes.base import _collect

EXACT = dict(rtol=0, atol=0, equal_nan=True)  # NOTE [Exact bool-mask conversion]: the same bits as eager


class Layers(nn.Module):
    """``layers`` attention layers over one bool mask built from a position compare, as fxopt/models/decoder.py
    builds it; ``dtypes`` gives each layer's query dtype (a cast before it), None for the input's."""

    def __init__(self, layers=3, dim=16, heads=2, seq=8, dtypes=None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.dtypes = dtypes or [None] * layers
        self.register_buffer("positions", torch.arange(seq), persistent=False)

    def forward(self, x, pos):
        b, s, d = x.shape
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for qkv, dtype in zip(self.qkv, self.dtypes):
            q, k, v = qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            if dtype is not None:
                q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, d).to(x.dtype)
        return x


def _inputs(dtype=torch.float32, seq=8, pos=3):
    torch.manual_seed(0)
    return torch.randn(1, seq, 16, dtype=dtype), torch.tensor([pos])


def _sdpa_masks(gm: fx.GraphModule) -> list:
    """The attn_mask argument of every SDPA call (None where there is none)."""
    return [args["attn_mask"] for n in gm.graph.nodes if isinstance(args := ops.sdpa_args(n), dict)]


def _record(opt):
    return {r.name: r for r in opt.records}["hoist_attention_masks"]


def _run_pass(gm):
    with _collect("hoist_attention_masks") as log:
        result = hoist_attention_masks(gm)
    return result, log


# -- through fxopt.optimize ----------------------------------------------------------------------------------------
def test_layers_sharing_a_bool_mask_convert_it_once():
    torch.manual_seed(0)
    model, inputs = Layers().eval(), _inputs()
    opt = fxopt.optimize(model, inputs, strict=True)
    assert _record(opt).changes == {"masks_hoisted": 3, "mask_conversions": 1}
    masks = _sdpa_masks(opt.graph_module)
    assert len(masks) == 3 and len(set(masks)) == 1  # the three calls read one float mask
    assert ops.tensor_meta(masks[0]).dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), **EXACT)
    # eager converts inside each call (scalar_tensor + where); the compare, where and cast are one generated kernel
    eager_ops = dispatched_ops(model, inputs)
    assert eager_ops["where"] == 3 and eager_ops["le"] == 1
    assert not {"where", "scalar_tensor", "le", "_to_copy"} & set(dispatched_ops(opt, inputs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_query_dtypes(dtype):
    torch.manual_seed(0)
    model, inputs = Layers().eval().to(dtype), _inputs(dtype)
    opt = fxopt.optimize(model, inputs, strict=True)
    assert _record(opt).changes == {"masks_hoisted": 3, "mask_conversions": 1}
    assert {ops.tensor_meta(m).dtype for m in _sdpa_masks(opt.graph_module)} == {dtype}
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), **EXACT)


class MaskInput(nn.Module):
    """Two SDPA calls over a mask given as an input."""

    def forward(self, q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(a, k, v, mask)  # positional attn_mask


def test_a_fully_masked_row_gives_what_eager_gives():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.rand(1, 1, 4, 6) < 0.6
    mask[..., 0, :] = True
    mask[..., 2, :] = False  # row 2 attends to nothing
    inputs = (q, k, v, mask)
    model = MaskInput().eval()
    opt = fxopt.optimize(model, inputs, strict=True)
    assert _record(opt).changes == {"masks_hoisted": 2, "mask_conversions": 1}
    with torch.no_grad():
        got, want = opt(*inputs), model(*inputs)
    torch.testing.assert_close(got, want, **EXACT)


def test_query_dtypes_sharing_one_mask_get_one_conversion_each():
    torch.manual_seed(0)
    model = Layers(layers=4, dtypes=[torch.float16, torch.float32, torch.float16, torch.float32]).eval()
    inputs = _inputs()
    opt = fxopt.optimize(model, inputs, strict=True)
    assert _record(opt).changes == {"masks_hoisted": 4, "mask_conversions": 2}
    masks = _sdpa_masks(opt.graph_module)
    assert masks[0] is masks[2] and masks[1] is masks[3] and masks[0] is not masks[1]
    assert [ops.tensor_meta(m).dtype for m in masks] == [torch.float16, torch.float32] * 2
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), **EXACT)


def test_the_decoder_converts_its_mask_once_and_decodes_as_eager():
    from fxopt.models.decoder import build_step, greedy_generate

    step = build_step("plain", "small", torch.float32, "cpu")
    eager = build_step("plain", "small", torch.float32, "cpu")
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    opt = fxopt.optimize(step, (ids, pos), strict=True)
    layers = step.cfg.layers
    assert _record(opt).changes == {"masks_hoisted": layers, "mask_conversions": 1}
    masks = _sdpa_masks(opt.graph_module)
    assert len(masks) == layers and len(set(masks)) == 1
    assert not {"where", "scalar_tensor"} & set(dispatched_ops(opt, (ids, pos)))
    step.reset_cache()
    assert greedy_generate(opt, ids, 0, 8) == greedy_generate(eager, ids, 0, 8)


# -- the pass alone ------------------------------------------------------------------------------------------------
def test_the_pass_alone_on_a_traced_graph():
    torch.manual_seed(0)
    model, inputs = Layers().eval(), _inputs()
    gm = capture(model, inputs, methods=("symbolic_trace",))
    assert {ops.tensor_meta(m).dtype for m in _sdpa_masks(gm)} == {torch.bool}
    result, log = _run_pass(gm)
    assert result.modified and log.counts == {"masks_hoisted": 3, "mask_conversions": 1} and not log.notes
    gm = result.graph_module
    gm.graph.lint()
    created = [n for n in gm.graph.nodes if n.meta.get("fxopt_from_pass") == "hoist_attention_masks"]
    assert [n.target for n in created] == [torch.where, "to", "view"]  # converted before the view: see below
    annotate(gm, inputs)
    where, cast, view = created
    # the compare, the where and the cast are one elementwise chain the fusion pass accepts
    assert where.args[0].target == "le" and not isinstance(ops.match_elementwise(where.args[0], gm), str)
    for node in (where, cast):
        call = ops.match_elementwise(node, gm)
        assert not isinstance(call, str), call
    assert ops.match_elementwise(where, gm).op.name == "where"
    assert ops.match_elementwise(cast, gm).op.name == "cast"
    assert set(_sdpa_masks(gm)) == {view} and ops.tensor_meta(view).dtype == torch.float32
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"
                and ops.tensor_meta(n).dtype == torch.bool]  # the bool view, unread, is gone
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), **EXACT)


def test_aten_graph_from_torch_export():
    torch.manual_seed(0)
    model, inputs = Layers().eval().half(), _inputs(torch.float16)
    gm = capture(model, inputs, methods=("export",))
    assert any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
    result, log = _run_pass(gm)
    assert result.modified and log.counts == {"masks_hoisted": 3, "mask_conversions": 1}
    gm = result.graph_module
    created = [n.target for n in gm.graph.nodes if n.meta.get("fxopt_from_pass") == "hoist_attention_masks"]
    assert created == [torch.ops.aten.where.Scalar, torch.ops.aten.to.dtype, torch.ops.aten.view.default]
    annotate(gm, inputs)
    assert {ops.tensor_meta(m).dtype for m in _sdpa_masks(gm)} == {torch.float16}
    assert all(not isinstance(ops.match_elementwise(n, gm), str) for n in gm.graph.nodes
               if n.target in (torch.ops.aten.where.Scalar, torch.ops.aten.to.dtype))
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), **EXACT)


def test_a_mask_given_as_input_is_converted_before_the_first_call():
    torch.manual_seed(0)
    inputs = (torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), torch.rand(2, 1, 3, 5) < 0.7)
    gm = capture(MaskInput().eval(), inputs, methods=("symbolic_trace",))
    result, log = _run_pass(gm)
    assert result.modified and log.counts == {"masks_hoisted": 2, "mask_conversions": 1}
    nodes = list(result.graph_module.graph.nodes)
    first_sdpa = next(i for i, n in enumerate(nodes) if isinstance(ops.sdpa_args(n), dict))
    assert [n.op for n in nodes[:4]] == ["placeholder"] * 4  # the graph's inputs stay at the top
    assert [n.target for n in nodes[first_sdpa - 2:first_sdpa]] == [torch.where, "to"]
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs), MaskInput()(*inputs), **EXACT)


# -- what it leaves alone ------------------------------------------------------------------------------------------
def test_float_masks_and_calls_without_one_are_left_alone():
    class Float(nn.Module):
        def forward(self, q, k, v, bias):
            return F.scaled_dot_product_attention(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), k, v)

    inputs = (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 1, 3, 5))
    result, log = _run_pass(capture(Float().eval(), inputs, methods=("symbolic_trace",)))
    assert not result.modified and not log.counts and not log.notes


def test_is_causal_with_a_mask_is_left_to_raise():
    """torch raises on ``is_causal=True`` with a mask: the pass does not turn that into something that runs."""
    inputs = (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.rand(1, 1, 3, 5) < 0.5)
    gm = capture(MaskInput().eval(), inputs, methods=("symbolic_trace",))
    for n in gm.graph.nodes:
        if isinstance(ops.sdpa_args(n), dict):
            n.update_kwarg("is_causal", True)
    result, log = _run_pass(gm)
    assert not result.modified and len(log.notes) == 2 and all("is_causal=True" in m for m in log.notes)


def test_a_mask_written_in_place_between_its_readers_is_left_alone():
    class Flip(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("positions", torch.arange(5), persistent=False)

        def forward(self, q, k, v, pos):
            mask = (self.positions <= pos).view(1, 1, 1, -1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            mask.logical_not_()  # the second call reads the other half
            return F.scaled_dot_product_attention(a, k, v, attn_mask=mask)

    model = Flip().eval()
    inputs = (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.tensor([2]))
    result, log = _run_pass(capture(model, inputs, methods=("symbolic_trace",)))
    assert not result.modified and any("logical_not_" in m and "in place" in m for m in log.notes), log.notes


def test_off_the_cpu_a_probe_decides(monkeypatch):
    """Off the CPU the pass probes eager's conversion on the device (NOTE [Exact bool-mask conversion]). Run here
    with the CPU treated as such a device: the probe agrees, or, told it differs (cuDNN's finite fill), the calls
    keep their bool mask with a note."""
    torch.manual_seed(0)
    model, inputs = Layers().eval(), _inputs()
    monkeypatch.setattr(attention_mask, "_EXACT_BY_SOURCE", frozenset())
    calls = []
    real_probe = attention_mask._probe
    monkeypatch.setattr(attention_mask, "_probe", lambda *a, **kw: calls.append(a) or real_probe(*a, **kw))
    result, log = _run_pass(capture(model, inputs, methods=("symbolic_trace",)))
    assert result.modified and log.counts["masks_hoisted"] == 3
    assert len(calls) == 1  # the three layers have the same shapes: one probe
    monkeypatch.setattr(attention_mask, "_probe", lambda *a, **kw: "differs")
    result, log = _run_pass(capture(model, inputs, methods=("symbolic_trace",)))
    assert not result.modified and len(log.notes) == 3 and all("differs" in m for m in log.notes)


def test_the_probe_finds_a_finite_fill():
    """The probe's all-False mask tells a -inf fill (eager's on the CPU) from a finite one (cuDNN's -65504 up to
    torch 2.10): with a finite fill a fully masked row attends uniformly instead of giving 0."""
    tms = [fx.passes.shape_prop._extract_tensor_metadata(t) for t in
           (torch.empty(1, 2, 3, 4), torch.empty(1, 2, 5, 4), torch.empty(1, 2, 5, 4), torch.empty(1, 1, 1, 5).bool())]
    assert attention_mask._probe(tms, torch.device("cpu"), scale=None, enable_gqa=False) == float("-inf")
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    none = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    finite = torch.where(none, 0.0, -65504.0)
    assert not torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=none),
                           F.scaled_dot_product_attention(q, k, v, attn_mask=finite))


def test_where_eager_fills_finitely_the_probe_picks_that_fill(monkeypatch):
    """An SDPA that converts bool masks with cuDNN's -65504 (torch 2.5-2.10 on the H100): the probe finds that fill,
    and the hoisted conversion uses it, so the results stay eager's bit for bit, fully masked rows included."""
    real = F.scaled_dot_product_attention

    def cudnn_like(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, 0.0, -65504.0).to(q.dtype)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", cudnn_like)
    tms = [fx.passes.shape_prop._extract_tensor_metadata(t) for t in
           (torch.empty(1, 2, 3, 4), torch.empty(1, 2, 5, 4), torch.empty(1, 2, 5, 4), torch.empty(1, 1, 1, 5).bool())]
    assert attention_mask._probe(tms, torch.device("cpu"), scale=None, enable_gqa=False) == -65504.0


def test_the_pipeline_runs_it_after_rewrite_attention_and_before_fusion():
    names = fxopt.passes.pass_names()
    i = names.index("hoist_attention_masks")
    assert names[i - 1] == "rewrite_attention" and i < names.index("fuse_elementwise")


def test_the_cuda_source_of_the_conversion_kernel_compiles_with_nvrtc():
    from fxopt.codegen.printer import cuda_source
    from fxopt.runtime import nvrtc
    from fxopt.runtime.kernel import FusedKernel

    ok, why = nvrtc.nvrtc_available()
    if not ok:
        pytest.skip(f"NVRTC is not available ({why})")
    model, inputs = Layers().eval().half(), _inputs(torch.float16)
    opt = fxopt.optimize(model, inputs, strict=True, backend="cpp")
    kernels = [k for k in opt.kernels.values() if isinstance(k, FusedKernel) and "where" in k.name]
    assert len(kernels) == 1
    source = cuda_source(kernels[0].region, kernels[0].modes)
    assert nvrtc.compile_cuda(source, arch="sm_90", name_hint=kernels[0].name).startswith(b"\x7fELF")


# -- property: heads, lengths, mask shapes and values ---------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Stack(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, q, k, v, mask):
        for _ in range(self.n):
            q = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return q


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), q_len=st.integers(1, 5), kv_len=st.integers(1, 9),
       head_dim=st.sampled_from([4, 8]), calls=st.integers(1, 3), mask_dims=st.sampled_from(["LS", "11LS", "B1LS",
       "BHLS", "111S"]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2 ** 16))
def test_hoisted_masks_match_eager_for_any_shape(batch, heads, q_len, kv_len, head_dim, calls, mask_dims, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(batch, heads, kv_len, head_dim, generator=g).to(dtype) for _ in range(2))
    sizes = {"B": batch, "H": heads, "L": q_len, "S": kv_len, "1": 1}
    mask = torch.rand([sizes[c] for c in mask_dims], generator=g) < 0.5
    mask[..., torch.randint(kv_len, (), generator=g)] = True  # at least one True per row
    inputs = (q, k, v, mask)
    model = Stack(calls).eval()
    result, log = _run_pass(capture(model, inputs, methods=("symbolic_trace",)))
    assert result.modified and log.counts == {"masks_hoisted": calls, "mask_conversions": 1}
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs), model(*inputs), **EXACT)


# -- NOTE [Aligned attention masks] ------------------------------------------------------------------------------
class _BiasAttention(nn.Module):
    """Swin's window attention after fxopt folds its relative position bias: SDPA with a constant float mask whose
    rows (49 keys) are not a multiple of 8 elements apart."""

    def __init__(self, heads=3, n=49):
        super().__init__()
        self.register_buffer("bias", torch.randn(1, heads, n, n))

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)


def test_a_constant_float_mask_is_stored_aligned_for_sdpa():
    model = _BiasAttention().eval()
    q, k, v = (torch.randn(2, 3, 49, 16) for _ in range(3))
    gm = capture(model, [q, k, v])
    assert attention_mask._align_constant_masks(gm, device_types=("cpu",)) == 1
    gm.recompile()
    (sdpa,) = [n for n in gm.graph.nodes if ops.sdpa_args(n) is not None]
    mask = getattr(gm, ops.sdpa_args(sdpa)["attn_mask"].target)
    assert mask.shape == model.bias.shape and torch.equal(mask, model.bias)
    assert mask.stride() == (3 * 49 * 64, 49 * 64, 64, 1)  # every stride but the last a multiple of 16
    torch.testing.assert_close(gm(q, k, v), model(q, k, v))
    assert attention_mask._align_constant_masks(gm, device_types=("cpu",)) == 0  # aligned already


@pytest.mark.cuda
def test_sdpa_with_a_constant_mask_pads_nothing_per_call_on_cuda():
    model = _BiasAttention().cuda().eval()
    q, k, v = (torch.randn(64, 3, 49, 32, device="cuda") for _ in range(3))
    # SDPA's path (short_query_attention may time its own kernels or SDPA's math faster here and replace the call)
    opt = fxopt.optimize(model, (q, k, v), strict=True, disable=["short_query_attention"])
    assert {r.name: r for r in opt.records}["hoist_attention_masks"].changes.get("masks_aligned") == 1
    with torch.no_grad():
        assert fxopt.verify.compare(opt(q, k, v), model(q, k, v)) is None
    eager, ours = fxopt.count_launches(model, (q, k, v)), fxopt.count_launches(opt, (q, k, v))
    assert ours.cuda_kernels < eager.cuda_kernels, (ours.cuda_kernels_by_name, eager.cuda_kernels_by_name)
