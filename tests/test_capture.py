import warnings

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import models


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic_trace cannot take this line
            return x + 1
        return x - 1


def test_capture_annotates_shape_dtype_device():
    model, (x,) = models.get("simple_cnn").build()
    gm = fxopt.capture(model, (x,))
    assert isinstance(gm, torch.fx.GraphModule)
    assert gm.meta["fxopt_capture"].method == "symbolic_trace"
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv1"]
    tm = convs[0].meta["tensor_meta"]
    assert tuple(tm.shape) == (1, 32, 32, 32) and tm.dtype == torch.float32
    assert convs[0].meta["device"] == torch.device("cpu")
    torch.testing.assert_close(gm(x), model(x))


def test_capture_without_inputs_has_no_shapes():
    gm = fxopt.capture(models.ReluSigmoid())
    assert all("tensor_meta" not in n.meta for n in gm.graph.nodes)


def test_capture_error_names_model_line_and_hint():
    with pytest.raises(fxopt.CaptureError) as info:
        fxopt.capture(DataDependent())
    msg = str(info.value)
    assert "DataDependent" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0" in msg  # the failing source line
    assert "concrete_args" in msg and "leaf_modules" in msg and "example_inputs" in msg


class ShapeDependent(nn.Module):
    def forward(self, x):
        if x.shape[0] > 2:  # shape-dependent: symbolic_trace fails, torch.export specializes on the shape
            return x.relu()
        return x.sigmoid()


def test_capture_falls_back_to_export_with_inputs():
    x = torch.randn(4)
    gm = fxopt.capture(ShapeDependent(), (x,))
    info = gm.meta["fxopt_capture"]
    assert info.method == "export"
    assert [a.method for a in info.attempts] == ["symbolic_trace", "export"]
    assert not info.attempts[0].ok and "if x.shape[0] > 2" in info.attempts[0].where
    torch.testing.assert_close(gm(x), x.relu())


def test_capture_error_reports_both_attempts():
    with pytest.raises(fxopt.CaptureError) as info:
        fxopt.capture(DataDependent(), (torch.randn(4),))
    msg = str(info.value)
    assert "symbolic_trace: TraceError" in msg and "export: " in msg


def test_capture_traces_through_transformer_layers_when_asked():
    model, inputs = models.get("transformer_encoder").build()
    gm = fxopt.capture(model, inputs, keep_fast_paths=False)
    assert gm.meta["fxopt_capture"].method == "export"
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "aten.layer_norm.default" in targets and "aten.linear.default" in targets


def test_a_layer_eager_runs_as_one_fused_op_stays_whole():
    """NOTE [Fast paths]: eval-mode TransformerEncoderLayer is one ATen op in eager; fxopt keeps it that way."""
    model, inputs = models.get("transformer_encoder").build()
    gm = fxopt.capture(model, inputs)
    info = gm.meta["fxopt_capture"]
    assert info.method == "symbolic_trace"
    assert info.fast_paths == {"layer": "aten._transformer_encoder_layer_fwd"}
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["layer"]
    assert not model.layer._forward_hooks and not model.layer._forward_pre_hooks  # looked without hooks
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))
    opt = fxopt.optimize(model, inputs)
    assert "kept whole" in opt.summary() and "aten._transformer_encoder_layer_fwd" in opt.summary()


def test_only_composites_on_their_fast_path_stay_whole():
    class Attend(nn.Module):
        def __init__(self, batch_first: bool):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
            self.proj = nn.Linear(32, 32)

        def forward(self, x):
            y, _ = self.mha(x, x, x, need_weights=False)
            return torch.relu(self.proj(y))

    x = torch.randn(2, 8, 32)
    fast = Attend(batch_first=True).eval()
    gm = fxopt.capture(fast, (x,))
    assert gm.meta["fxopt_capture"].fast_paths == {"mha": "aten._native_multi_head_attention"}
    slow = Attend(batch_first=True).train()  # training mode: no fast path, so traced through
    assert fxopt.capture(slow, (x,), allow_export=True).meta["fxopt_capture"].fast_paths == {}
    layer = nn.TransformerEncoderLayer(32, 4, batch_first=False).eval()  # not batch_first: no fast path
    gm = fxopt.capture(layer, (torch.randn(8, 2, 32),))
    assert gm.meta["fxopt_capture"].fast_paths == {}
    assert gm.meta["fxopt_capture"].method == "export"


def test_leaf_modules_keep_a_submodule_opaque():
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DataDependent()

        def forward(self, x):
            return self.inner(x) * 2

    gm = fxopt.capture(Wrap(), leaf_modules=[DataDependent])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["inner"]


def test_capture_rejects_non_modules():
    with pytest.raises(fxopt.CaptureError, match="expects a torch.nn.Module"):
        fxopt.capture(lambda x: x)


def test_capture_does_not_mutate_model():
    model, inputs = models.get("small_resnet").build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxopt.capture(model, inputs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_an_encoder_whose_layers_take_the_fast_path_stays_whole():
    """nn.TransformerEncoder's own forward cannot be traced symbolically; its layers run eager's fused op, so the
    encoder is kept whole (it runs them that way) instead of torch.export decomposing every layer."""

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.encoder(x)).relu()

    model, x = Classifier().eval(), torch.randn(2, 8, 32)
    gm = fxopt.capture(model, (x,))
    info = gm.meta["fxopt_capture"]
    assert info.method == "symbolic_trace (opaque: encoder)"
    assert set(info.fast_paths) == {"encoder.layers.0", "encoder.layers.1"}
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["encoder", "head"]
    opt = fxopt.optimize(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    assert fxopt.capture(model, (x,), keep_fast_paths=False).meta["fxopt_capture"].method == "export"


class _Counts(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.seen = None

    def forward(self, x):
        self.count.add_(1)  # symbolic_trace runs this on the real buffer while tracing
        if self.seen is None:
            self.seen = torch.zeros_like(x)  # a Proxy while tracing, a FakeTensor while exporting
        return x * self.count + self.seen


def test_capture_leaves_the_models_state_as_it_was():
    """NOTE [Model state]: tracing, exporting and annotating run the forward; what they change is undone."""
    model, x = _Counts(), torch.randn(3)
    version = model.count._version
    for methods in (("symbolic_trace",), ("export",)):
        gm = fxopt.capture(model, (x,), methods=methods)
        assert gm.meta["fxopt_capture"].method == methods[0]
        assert float(model.count) == 0.0 and model.count._version == version, methods
        assert model.seen is None, methods


class _Looped(nn.Module):
    """symbolic_trace cannot take ``range(x.shape[1])`` (a Proxy); torch.export can (static shapes)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        out = x
        for _ in range(x.shape[1] // 4):
            out = self.proj(out).relu()
        return out


def test_a_trace_that_leaves_most_weights_opaque_tries_export():
    """NOTE [Mostly opaque]: a transformers model whose embeddings symbolic_trace cannot take used to run as one
    opaque call, optimized not at all, although torch.export captures it whole."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = _Looped(), nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.body(x))

    model, x = Wrapper().eval(), torch.randn(3, 8, 16)
    info = fxopt.capture(model, (x,)).meta["fxopt_capture"]
    assert info.method == "export"
    assert [a.method for a in info.attempts] == ["symbolic_trace", "symbolic_trace (opaque: body)", "export"]
    with torch.no_grad():
        torch.testing.assert_close(fxopt.optimize(model, (x,))(x), model(x))


def test_a_small_opaque_part_keeps_the_partial_trace():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = _Looped(), nn.Linear(16, 4096)  # body: 272 of 69904 weights

        def forward(self, x):
            return self.head(self.body(x))

    model, x = Wrapper().eval(), torch.randn(3, 8, 16)
    assert fxopt.capture(model, (x,)).meta["fxopt_capture"].method == "symbolic_trace (opaque: body)"


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_transformers_models_are_captured_whole_not_as_one_opaque_call(kind):
    """Before NOTE [Mostly opaque], symbolic_trace failed inside transformers' embeddings / mask code, kept the
    whole model opaque and "optimized" nothing; torch.export captures both."""
    transformers = pytest.importorskip("transformers")

    class LastHidden(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).last_hidden_state

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16,
                                         bos_token_id=0, eos_token_id=0, use_cache=False)
        inner = transformers.GPT2Model(config)
    else:
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=64, max_position_embeddings=16)
        inner = transformers.BertModel(config)
    model, ids = LastHidden(inner).eval(), torch.randint(0, 64, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxopt.optimize(model, [ids])
    assert opt.unoptimized_reason is None and opt.capture_info.method == "export"
    assert sum(n.op == "call_module" for n in opt.graph_module.graph.nodes if n.target != "_guards_fn") == 0
    with torch.no_grad():
        torch.testing.assert_close(opt(ids), model(ids), rtol=1e-4, atol=1e-5)
