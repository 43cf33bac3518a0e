"""decompose_encoder_layers: a TransformerEncoderLayer kept whole for its fast path becomes GEMMs, SDPA and
add + LayerNorm, with the eager layer's results; the cases it cannot write keep the layer and say why."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.passes import decompose_encoder_layers
from fxopt.passes.base import _collect

ANY_DEVICE = frozenset({"cpu", "cuda"})  # the pass runs on CUDA graphs only by default (measured): tested on CPU here


class Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _layer_calls(gm) -> int:
    return sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.TransformerEncoderLayer)
               for n in gm.graph.nodes)


def _traced(model, x):
    """``model`` with the layer as a leaf, annotated as fxopt annotates it (shape of every value)."""
    from fxopt.capture import capture

    return capture(model, (x,), leaf_modules=(nn.TransformerEncoderLayer,))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", nn.GELU()], ids=["relu", "gelu", "GELU"])
def test_decomposed_layer_matches_eager(norm_first, batch_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=batch_first, norm_first=norm_first,
                                       activation=activation).eval()
    model = Wrap(layer)
    x = torch.randn(2, 5, 32)
    gm = _traced(model, x)
    assert _layer_calls(gm) == 1
    result = decompose_encoder_layers(gm, ANY_DEVICE)
    assert result.modified and _layer_calls(result.graph_module) == 0
    targets = {n.target for n in result.graph_module.graph.nodes}
    assert F.scaled_dot_product_attention in targets and F.layer_norm in targets
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-5)


def test_layer_without_biases_matches_eager():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True, bias=False).eval()
    x = torch.randn(1, 7, 16)
    gm = _traced(Wrap(layer), x)
    assert decompose_encoder_layers(gm, ANY_DEVICE).modified
    with torch.no_grad():
        torch.testing.assert_close(gm(x), layer(x), rtol=1e-5, atol=1e-5)


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True).eval()

    def forward(self, x):
        return self.layer(x, is_causal=False)


@pytest.mark.parametrize("case", ["keyword", "hook", "activation", "gelu_tanh"])
def test_layers_it_cannot_write_stay_whole_with_a_reason(case):
    activation = {"activation": torch.tanh, "gelu_tanh": nn.GELU(approximate="tanh")}.get(case, "relu")
    model = Masked().eval() if case == "keyword" else Wrap(nn.TransformerEncoderLayer(
        16, 2, dim_feedforward=24, batch_first=True, activation=activation)).eval()
    if case == "hook":
        model.layer.linear1.register_forward_hook(lambda m, i, o: None)
    x = torch.randn(1, 7, 16)
    gm = _traced(model, x)
    with _collect("decompose_encoder_layers") as log:
        result = decompose_encoder_layers(gm, ANY_DEVICE)
    assert not result.modified and _layer_calls(gm) == 1
    reason = {"keyword": "called with a mask", "hook": "hooks", "activation": "neither ReLU nor exact GELU",
              "gelu_tanh": "different GELUs"}[case]
    assert any(reason in n for n in log.notes), log.notes


def test_on_cpu_the_layer_becomes_eagers_fused_op_called_directly(monkeypatch):
    """Measured: on the CPU the fused op beats the decomposition (benchmarks/NOTES.md, fifth session). The pass calls
    it directly (no Python checks of ``forward`` per call), the one treatment of the layer."""
    from collections import Counter

    from fxopt.models import build_any

    model, inputs = build_any("transformer_encoder")
    opt = fxopt.optimize(model, inputs)
    gm = opt.graph_module
    assert _layer_calls(gm) == 0
    assert [n.target for n in gm.graph.nodes].count(torch._transformer_encoder_layer_fwd) == 1
    record = {r.name: r for r in opt.records}["decompose_encoder_layers"]
    assert any("eager's fused op called directly on cpu" in n for n in record.notes), record.notes
    forward, calls = nn.TransformerEncoderLayer.forward, Counter()

    def counting(self, *args, **kwargs):
        calls["forward"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(nn.TransformerEncoderLayer, "forward", counting)
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=0, atol=0)
    assert calls["forward"] == 1  # the model's; fxopt called the op
    out = opt(*inputs)  # grad mode: no autograd history, one rule for every graph (NOTE [Inference only])
    torch.testing.assert_close(out, model(*inputs).detach())


@pytest.mark.parametrize("make, reason", [
    (lambda: nn.TransformerEncoderLayer(12, 3, dim_feedforward=16, batch_first=True), "odd number of heads"),
    (lambda: nn.TransformerEncoderLayer(16, 4, dim_feedforward=16), "batch_first=False"),
], ids=["odd_heads", "seq_first"])
def test_on_cpu_a_layer_off_eagers_fast_path_stays_whole_and_says_why(make, reason):
    model = nn.Sequential(make()).eval()
    x = torch.randn(2, 5, model[0].self_attn.embed_dim)
    opt = fxopt.optimize(model, (x,), keep_fast_paths=True)
    notes = [n for r in opt.records for n in r.notes]
    if _layer_calls(opt.graph_module) == 1:  # kept whole by capture and by the pass
        assert any(reason in n for n in notes), notes
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


@pytest.mark.cuda
def test_optimize_decomposes_the_zoo_layer_on_cuda_and_leaves_the_model_alone():
    from fxopt.models import build_any

    model, inputs = build_any("transformer_encoder", "cuda")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fxopt.optimize(model, inputs)
    gm = opt.graph_module
    assert _layer_calls(gm) == 0
    # the layer's attention is SDPA, unless short_query_attention measured its own kernel or SDPA's math faster
    replaced = {r.name: r for r in opt.records}["short_query_attention"].changes
    assert any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes) or replaced, opt.records
    graphs = fxopt.optimize(model, inputs, cuda_graphs=True)
    with torch.no_grad():
        want = model(*inputs)
        torch.testing.assert_close(opt(*inputs), want, rtol=1e-5, atol=1e-5)
        for _ in range(3):
            torch.testing.assert_close(graphs(*inputs), want, rtol=1e-5, atol=1e-5)
    assert graphs.graph_entries[0].captured, graphs.graph_report()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.layer, nn.TransformerEncoderLayer)  # the user's model still holds its layer


def test_decomposed_layer_through_the_pipeline_saves_and_loads(tmp_path):
    """The whole pipeline after the decomposition (as on CUDA): add + LayerNorm fused, the ReLU in the first GEMM's
    epilogue; the result exports, loads and matches eager."""
    import functools

    from fxopt.models import build_any
    from fxopt.passes import Pass, default_pipeline

    model, inputs = build_any("transformer_encoder")
    first = Pass("decompose_encoder_layers", functools.partial(decompose_encoder_layers, devices=ANY_DEVICE), "")
    passes = [first] + [p.name for p in default_pipeline() if p.name != "decompose_encoder_layers"]  # by name:
    # optimize builds them for the backend it picks
    opt = fxopt.optimize(model, inputs, passes=passes)
    targets = [n.target for n in opt.graph_module.graph.nodes]
    assert F.scaled_dot_product_attention in targets and torch._addmm_activation in targets
    assert F.layer_norm not in targets  # both add + LayerNorm pairs became row kernels
    fxopt.save(opt, tmp_path / "layer.fxopt")
    loaded = fxopt.load(tmp_path / "layer.fxopt")
    with torch.no_grad():
        want = model(*inputs)
        torch.testing.assert_close(opt(*inputs), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(*inputs), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# rewrite_attention: hand-written attention (timm, transformers) -> one F.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------------------------
import math  # noqa: E402
import operator  # noqa: E402


class TimmAttention(nn.Module):
    """timm's Attention: qkv Linear, heads, ``q @ k.transpose(-2, -1) * scale``, softmax, ``@ v``, proj."""

    def __init__(self, dim=64, heads=4, spelling="mul", mask=False, softmax_dim=-1, also_return_attn=False,
                 mask_mul=False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.spelling, self.use_mask, self.softmax_dim = spelling, mask, softmax_dim
        self.also_return_attn, self.mask_mul = also_return_attn, mask_mul
        self.softmax = nn.Softmax(dim=softmax_dim)  # the "module" spelling: timm's Swin WindowAttention

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.spelling == "mul":
            attn = q @ k.transpose(-2, -1) * self.scale
        elif self.spelling == "sqrt":
            attn = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        else:  # "pre" and "module": q * scale before the matmul (Swin)
            attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn * mask if self.mask_mul else attn + mask
        if self.spelling == "sqrt":
            attn = F.softmax(attn, dim=self.softmax_dim)
        elif self.spelling == "module":
            attn = self.softmax(attn)
        else:
            attn = attn.softmax(dim=self.softmax_dim)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        out = self.proj(out)
        return (out, attn) if self.also_return_attn else out


def _sdpa_and_softmax(gm):
    sdpa = sum(n.op == "call_function" and n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    softmax = sum("softmax" in str(n.target) for n in gm.graph.nodes
                  if n.op in ("call_function", "call_method", "call_module"))
    return sdpa, softmax


def _optimize(model, inputs, **kw):
    """fxopt.optimize with rewrite_attention after fold_constants (where it joins the default pipeline)."""
    from fxopt.passes import attention_pass, pass_names

    names = pass_names()
    if "rewrite_attention" not in names:
        i = names.index("fold_constants") + 1
        kw["passes"] = names[:i] + [attention_pass()] + names[i:]
    return fxopt.optimize(model, inputs, **kw)


def _attention_record(opt):
    return {r.name: r for r in opt.records}["rewrite_attention"]


@pytest.mark.parametrize("spelling", ["mul", "sqrt", "pre", "module"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_timm_attention_becomes_sdpa(spelling, with_mask):
    torch.manual_seed(0)
    model = TimmAttention(spelling=spelling).eval()
    x = torch.randn(2, 10, 64)
    inputs = (x, torch.randn(1, 1, 10, 10)) if with_mask else (x,)
    opt = _optimize(model, inputs, strict=True)
    assert _sdpa_and_softmax(opt.graph_module) == (1, 0)
    assert _attention_record(opt).changes.get("attention_to_sdpa") == 1
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_timm_attention_float16_on_cpu():
    torch.manual_seed(0)
    model = TimmAttention().eval().half()
    x, mask = torch.randn(2, 10, 64, dtype=torch.float16), torch.randn(2, 1, 10, 10, dtype=torch.float16)
    opt = _optimize(model, (x, mask), strict=True)
    assert _sdpa_and_softmax(opt.graph_module) == (1, 0)
    with torch.no_grad():
        torch.testing.assert_close(opt(x, mask), model(x, mask), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("case", [dict(also_return_attn=True), dict(softmax_dim=-2), dict(mask_mul=True)],
                         ids=["softmax-returned", "softmax-dim-2", "multiplicative-mask"])
def test_attention_it_cannot_rewrite_stays(case):
    torch.manual_seed(0)
    model = TimmAttention(**case).eval()
    inputs = (torch.randn(2, 10, 64), torch.rand(1, 1, 10, 10))
    opt = _optimize(model, inputs, strict=True)
    assert _sdpa_and_softmax(opt.graph_module)[0] == 0
    record = _attention_record(opt)
    assert "attention_to_sdpa" not in record.changes and record.notes, record
    with torch.no_grad():
        got, want = opt(*inputs), model(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_rewrite_attention_on_torch_level_and_aten_graphs(method):
    from fxopt.capture import capture
    from fxopt.passes import rewrite_attention

    torch.manual_seed(0)
    model = TimmAttention().eval()
    x, mask = torch.randn(2, 10, 64), torch.randn(2, 1, 1, 10)
    gm = capture(model, (x, mask), methods=(method,))
    assert _sdpa_and_softmax(gm) == (0, 1)
    with _collect("rewrite_attention") as log:
        result = rewrite_attention(gm)
    assert result.modified and log.counts["attention_to_sdpa"] == 1
    assert _sdpa_and_softmax(result.graph_module) == (1, 0)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x, mask), model(x, mask), rtol=1e-5, atol=1e-5)


class ShiftedWindowAttention(nn.Module):
    """timm's Swin WindowAttention in a shifted block: q scaled, a relative-position bias and a window mask added
    through ``view(-1, nW, H, N, N)`` (NOTE [Masks in several terms])."""

    def __init__(self, windows=4, heads=2, tokens=9, dim=16, term_from_q=False):
        super().__init__()
        self.windows, self.heads, self.term_from_q = windows, heads, term_from_q
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn(heads, tokens, tokens))
        self.register_buffer("mask", torch.randn(windows, tokens, tokens))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * 0.25) @ k.transpose(-2, -1)
        attn = attn + self.bias_table.unsqueeze(0)
        if self.term_from_q:
            attn = attn + q.sum(-1, keepdim=True)
        attn = attn.view(-1, self.windows, self.heads, N, N) + self.mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.heads, N, N).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("batch", [1, 3])
def test_a_mask_in_two_terms_becomes_sdpas_mask(batch):
    """The bias and the window mask (which reads the scores' shape) sum into SDPA's mask; no matmul or softmax left;
    other batch sizes than the example's give eager's outputs too."""
    torch.manual_seed(0)
    model = ShiftedWindowAttention().eval()
    x = torch.randn(4 * batch, 9, 16)
    opt = _optimize(model, (x,), strict=True)
    assert _attention_record(opt).changes.get("attention_to_sdpa") == 1
    assert _sdpa_and_softmax(opt.graph_module) == (1, 0)
    assert not any(n.target in (operator.matmul, torch.matmul) for n in opt.graph_module.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
        other = torch.randn(8 * batch, 9, 16)
        torch.testing.assert_close(opt(other), model(other), rtol=1e-5, atol=1e-5)


def test_a_term_computed_from_q_is_not_a_mask():
    torch.manual_seed(0)
    model = ShiftedWindowAttention(term_from_q=True).eval()
    x = torch.randn(4, 9, 16)
    opt = _optimize(model, (x,), strict=True)
    record = _attention_record(opt)
    assert "attention_to_sdpa" not in record.changes
    assert any("computed from q, k or v" in n for n in record.notes), record.notes
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_math_path_adds_the_terms_one_by_one():
    """short_query_attention's math path (CUDA, where it measures fastest) on SDPA with a summed mask: the scores get
    each term, the sum is left unread (NOTE [Masks in several terms])."""
    from fxopt.ops import sdpa_args
    from fxopt.passes.short_attention import _as_math

    torch.manual_seed(0)
    model = ShiftedWindowAttention().eval()
    x = torch.randn(8, 9, 16)
    gm = _optimize(model, (x,), strict=True).graph_module
    node = next(n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention)
    args = sdpa_args(node)
    mask = args["attn_mask"]
    out = _as_math(gm, node, args, args["scale"])
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    assert not mask.users  # the sum is not read: dead code
    adds = [n for n in gm.graph.nodes if n.target is operator.add and n.meta.get("fxopt_from_pass") == "short_query_attention"]
    assert len(adds) == 2
    gm.graph.eliminate_dead_code()
    gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


class CosineAttention(nn.Module):
    """SwinV2's attention: cosine scores times a per-head logit scale ``[H, 1, 1]`` from a parameter, plus a bias
    (NOTE [Per-matrix scales]); ``varying`` makes the scale vary along the keys, which is no per-matrix scale."""

    def __init__(self, heads=2, tokens=9, dim=16, varying=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        shape = (heads, 1, tokens) if varying else (heads, 1, 1)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(shape) + 1))
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        attn = (attn + 16 * torch.sigmoid(self.bias).unsqueeze(0)).softmax(-1)
        return (attn @ v).transpose(1, 2).reshape(B, N, C)


def test_a_per_head_scale_moves_onto_q():
    torch.manual_seed(0)
    model = CosineAttention().eval()
    x = torch.randn(3, 9, 16)
    opt = _optimize(model, (x,), strict=True)
    assert _attention_record(opt).changes.get("attention_to_sdpa") == 1
    assert _sdpa_and_softmax(opt.graph_module) == (1, 0)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_scale_that_varies_along_the_keys_is_kept():
    torch.manual_seed(0)
    model = CosineAttention(varying=True).eval()
    x = torch.randn(3, 9, 16)
    opt = _optimize(model, (x,), strict=True)
    assert "attention_to_sdpa" not in _attention_record(opt).changes
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
