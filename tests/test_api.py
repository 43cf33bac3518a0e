import operator
import warnings

import pytest
import torch
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

import fxopt
from fxopt import models
from fxopt.passes import Pass


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_optimize_with_example_inputs_matches_eager():
    model, inputs = models.get("small_resnet").build()
    before = _state(model)
    opt = fxopt.optimize(model, inputs)
    assert isinstance(opt, nn.Module)
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    assert [r.name for r in opt.records] == fxopt.passes.pass_names()
    assert "def forward" in opt.code
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k
    assert model.training is False


def test_optimize_without_inputs_specializes_at_first_call():
    model = models.SimpleCNN().eval()
    opt = fxopt.optimize(model)
    assert opt.specializations == []
    with pytest.raises(RuntimeError, match="has not run yet"):
        opt.graph_module
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    assert len(opt.specializations) == 1


def test_new_batch_size_respecializes_and_cache_is_bounded():
    model = models.ReluSigmoid()
    opt = fxopt.optimize(model, max_specializations=2)
    for batch in (1, 2, 3):
        x = torch.randn(batch, 16)
        torch.testing.assert_close(opt(x), model(x))
    sigs = [s.input_specs[0][0] for s in opt.specializations]
    assert sigs == [torch.Size([2, 16]), torch.Size([3, 16])]  # batch 1 evicted (least recently used)
    opt(torch.randn(2, 16))  # reuse moves batch 2 to the most recent end
    assert opt.specializations[-1].input_specs[0][0] == torch.Size([2, 16])


def test_training_mode_model_is_optimized_for_eval_without_changing_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU())
    model.train()
    opt = fxopt.optimize(model, [torch.randn(2, 4)])
    assert model.training is True
    assert {r.name: r for r in opt.records}["remove_dropout"].changes == {"dropouts_removed": 1}
    x = torch.randn(2, 4)
    torch.testing.assert_close(opt(x), model.eval()(x))


def _break_outputs(gm):
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.sigmoid:
            node.target = torch.tanh
    return PassResult(gm, True)


def _raise(gm):
    raise ValueError("this pass is broken on purpose")


def test_broken_pass_is_rolled_back_with_a_warning():
    model, inputs = models.get("relu_sigmoid").build()
    with pytest.warns(RuntimeWarning, match="'_break_outputs' rolled back: outputs differ from eager"):
        opt = fxopt.optimize(model, inputs, passes=["remove_dropout", _break_outputs, "remove_dead_code"])
    rec = {r.name: r for r in opt.records}
    assert rec["_break_outputs"].status == "rolled back"
    assert "elements differ" in rec["_break_outputs"].error
    assert rec["remove_dead_code"].status == "unchanged"  # the pipeline went on
    torch.testing.assert_close(opt(*inputs), model(*inputs))
    assert any(n.target is torch.sigmoid for n in opt.graph_module.graph.nodes)


def test_raising_pass_is_rolled_back_and_strict_raises():
    model, inputs = models.get("relu_sigmoid").build()
    with pytest.warns(RuntimeWarning, match="ValueError: this pass is broken on purpose"):
        opt = fxopt.optimize(model, inputs, passes=[Pass("explode", _raise)])
    assert opt.records[0].status == "rolled back"
    with pytest.raises(fxopt.PassError, match="'explode'"):
        fxopt.optimize(model, inputs, passes=[Pass("explode", _raise)], strict=True)
    with pytest.raises(fxopt.PassError, match="outputs differ"):
        fxopt.optimize(model, inputs, passes=[_break_outputs], strict=True)


def test_passes_can_be_disabled_by_name_and_unknown_names_fail_fast():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    opt = fxopt.optimize(model, [torch.randn(2, 4)], disable=["remove_dropout"])
    assert {r.name: r for r in opt.records}["remove_dropout"].status == "disabled"
    assert any(n.op == "call_module" and n.target == "1" for n in opt.graph_module.graph.nodes)
    with pytest.raises(ValueError, match="unknown pass 'fuse_everything'"):
        fxopt.optimize(model, passes=["fuse_everything"])


def test_per_pass_record_counts_launches():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Identity(), nn.ReLU())
    opt = fxopt.optimize(model, [torch.randn(2, 4)])
    rec = {r.name: r for r in opt.records}
    # the Identity goes with the Dropout (both return their input: safe before functionalize_inplace)
    assert rec["remove_dropout"].status == "applied"
    assert rec["remove_dropout"].changes == {"dropouts_removed": 1, "identity_modules_removed": 1}
    assert rec["remove_identity"].status == "unchanged"
    assert rec["remove_dead_code"].status == "unchanged"
    assert rec["remove_dropout"].dispatched_before == rec["remove_dropout"].dispatched_after == 2
    assert "remove_dropout" in opt.summary()


def test_inputs_requiring_grad_run_the_original_model():
    model = nn.Linear(3, 2)
    opt = fxopt.optimize(model, [torch.randn(1, 3)])
    x = torch.randn(1, 3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="original model runs instead"):
        y = opt(x)
    y.sum().backward()
    assert x.grad is not None


def test_optimize_rejects_non_modules():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fxopt.optimize(lambda x: x)


def test_cuda_graphs_option_is_a_noop_with_a_note_on_cpu():
    model, inputs = models.get("relu_sigmoid").build()
    opt = fxopt.optimize(model, inputs, cuda_graphs=True)
    assert "CUDA graphs need CUDA tensors" in opt.graph_report()
    assert opt.graph_entries == []
    torch.testing.assert_close(opt(*inputs), model(*inputs))
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        fxopt.optimize(model, inputs, cuda_graphs="always")


@pytest.mark.cuda
def test_cuda_graphs_replay_the_optimized_module():
    model, inputs = models.get("simple_cnn").build(device="cuda")
    opt = fxopt.optimize(model, inputs, cuda_graphs=True)
    for _ in range(3):
        x = torch.randn_like(inputs[0])
        with torch.no_grad():
            torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
    (entry,) = opt.graph_entries
    assert entry.captured and entry.replays >= 2


def test_optimized_module_shares_the_models_weights_and_leaves_them_alone():
    """No second copy of the weights (a deep copy once doubled fxopt's memory), and the caller's parameters keep
    requires_grad and their values."""
    from fxopt import models

    model, (x,) = models.build_any("mlp_block", "cpu")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = fxopt.optimize(model, [x])
    model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    runner = opt.specializations[0].runner
    held = {p.untyped_storage().data_ptr() for p in runner.parameters()}
    assert held and held <= model_storages  # nothing folded in this model: every weight is the caller's own
    assert model.training and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        opt(x)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", fxopt.api.GRAPH_DEFAULT_PASSES)
def test_graph_default_passes_come_with_cuda_graphs_and_can_be_disabled(name):
    """NOTE [Streams under graphs], [3xTF32 under graphs]: on by default only with cuda_graphs (where they measured
    faster)."""
    from fxopt import models

    model, (x,) = models.build_any("small_resnet", "cpu")
    names = lambda opt: [r.name for r in opt.records]  # noqa: E731
    assert name not in names(fxopt.optimize(model, [x]))
    with_graphs = fxopt.optimize(model, [x], cuda_graphs=True)  # a no-op on CPU (notes, or nothing to do)
    (rec,) = [r for r in with_graphs.records if r.name == name]
    assert rec.status == "unchanged"
    off = fxopt.optimize(model, [x], cuda_graphs=True, disable=[name])
    assert name not in [r.name for r in off.records if r.status != "disabled"]


def test_threads_meeting_new_signatures_at_once_get_correct_results():
    import threading

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    opt = fxopt.optimize(model, max_specializations=2)  # specializes at the first call; 3 signatures evict
    errors: list[str] = []

    def worker(batch: int) -> None:
        for _ in range(20):
            x = torch.randn(batch, 8)
            with torch.no_grad():
                why = fxopt.verify.compare(opt(x), model(x))
            if why is not None:
                errors.append(why)

    threads = [threading.Thread(target=worker, args=(1 + i % 3,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_optimize_does_not_import_dynamo():
    """NOTE [Modes without Dynamo]: fxopt's dispatch modes opt out of torch's Dynamo wrapper, whose first call
    imports torch._dynamo (3.6-5.7 s of a fresh process's first optimize on the lent H200s)."""
    import subprocess
    import sys

    code = ("import sys, torch, fxopt\n"
            "from fxopt import models\n"
            "model, inputs = models.get('simple_cnn').build(device=torch.device('cpu'))\n"
            "opt = fxopt.optimize(model, inputs)\n"
            "fxopt.count_launches(opt, inputs)\n"
            "print('dynamo imported:', 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dynamo imported: False" in out.stdout, out.stdout


# -- inputs eager accepts or rejects: the same result or the same error type, never a crash ----------------------------
class _Elementwise(torch.nn.Module):
    """No parameters: on any device eager runs it, so fxopt must too (its kernels read real memory)."""

    def forward(self, x):
        return (x.relu() * 2 + 1).sigmoid()


def test_meta_inputs_after_a_cpu_specialization_run_eagerly():
    """A meta tensor's get_device() is -1 like a CPU tensor's: once it shared the CPU key, a C++ kernel read no
    memory (segfault)."""
    x = torch.randn(4, 8)
    opt = fxopt.optimize(_Elementwise(), (x,))
    out = opt(x.to("meta"))
    assert out.device.type == "meta" and out.shape == (4, 8)
    torch.testing.assert_close(opt(x), _Elementwise()(x))


def test_meta_inputs_first_then_real_ones():
    opt = fxopt.optimize(_Elementwise())
    assert opt(torch.randn(4, 8, device="meta")).device.type == "meta"
    assert not opt.specializations  # nothing was built for meta tensors
    x = torch.randn(4, 8)
    torch.testing.assert_close(opt(x), _Elementwise()(x))
    assert len(opt.specializations) == 1


def test_meta_inputs_on_a_model_with_weights_raise_eagers_error():
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    opt = fxopt.optimize(model, (x,))
    with pytest.raises(RuntimeError) as eager:
        model(x.to("meta"))
    with pytest.raises(type(eager.value)):
        opt(x.to("meta"))


def test_fake_tensors_get_eagers_result():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(4, 8)
    opt = fxopt.optimize(_Elementwise(), (x,))
    with FakeTensorMode() as mode:
        fake = torch.randn(4, 8)
        out = opt(fake)
    assert type(out).__name__ == "FakeTensor" and out.shape == (4, 8)
    torch.testing.assert_close(opt(x), _Elementwise()(x))
    del mode


def test_tensor_subclass_inputs_run_the_original_model():
    class Tagged(torch.Tensor):
        pass

    x = torch.randn(4, 8)
    opt = fxopt.optimize(_Elementwise(), (x,))
    out = opt(x.as_subclass(Tagged))
    assert type(out) is Tagged  # what eager returns: the subclass propagates through torch functions
    torch.testing.assert_close(out.as_subclass(torch.Tensor), _Elementwise()(x))


class _TakesAList(torch.nn.Module):
    def forward(self, xs):
        return xs[0].relu() + xs[1] * 2


class _TakesADict(torch.nn.Module):
    def forward(self, d):
        return d["a"].relu() * d["b"]


def test_nested_inputs_are_specialized_like_flat_ones():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    opt = fxopt.optimize(_TakesAList())
    torch.testing.assert_close(opt([x, y]), _TakesAList()([x, y]))
    torch.testing.assert_close(opt([y, x]), _TakesAList()([y, x]))
    assert len(opt.specializations) == 1  # same structure and shapes: one key
    optd = fxopt.optimize(_TakesADict())
    torch.testing.assert_close(optd({"a": x, "b": y}), _TakesADict()({"a": x, "b": y}))


def test_a_list_where_eager_wants_a_tensor_gets_eagers_error():
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    opt = fxopt.optimize(model, (x,))
    with pytest.raises(TypeError) as eager:
        model([x])
    with pytest.raises(TypeError) as ours:
        opt([x])
    assert str(ours.value) == str(eager.value)  # not "unhashable type: 'list'"


class _WithOptions(torch.nn.Module):
    def forward(self, x, scale=2.0, bias=None):
        y = x.relu() * scale
        return y if bias is None else y + bias


def test_keyword_arguments_bind_like_eager():
    x, b = torch.randn(4, 8), torch.randn(8)
    model = _WithOptions()
    opt = fxopt.optimize(model, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every one of these is optimized
        torch.testing.assert_close(opt(x=x), model(x=x))
        torch.testing.assert_close(opt(x, scale=2.0), model(x))
        assert len(opt.specializations) == 1  # opt(x=x) and opt(x, scale=2.0) are opt(x)
        torch.testing.assert_close(opt(x, bias=b), model(x, bias=b))
        torch.testing.assert_close(opt(x, scale=3.0), model(x, scale=3.0))
    assert len(opt.specializations) == 3
    with pytest.raises(TypeError) as eager:
        model(x, nope=1)
    with pytest.raises(TypeError) as ours:
        opt(x, nope=1)
    assert str(ours.value) == str(eager.value)


def test_keyword_only_arguments_run_the_original_model():
    class KeywordOnly(torch.nn.Module):
        def forward(self, x, *, shift):
            return x.relu() + shift

    x = torch.randn(4, 8)
    model = KeywordOnly()
    opt = fxopt.optimize(model)
    torch.testing.assert_close(opt(x, shift=1.5), model(x, shift=1.5))


def test_a_signature_that_cannot_be_captured_leaves_the_others_optimized(monkeypatch):
    import fxopt.api as api

    model = _Elementwise()
    x = torch.randn(4, 8)
    opt = fxopt.optimize(model, (x,), keep_fast_paths=True)
    opt._captured = None  # the next signature captures anew: make that fail

    def refuse(*args, **kwargs):
        raise fxopt.CaptureError("refused for this test")

    monkeypatch.setattr(api, "capture", refuse)
    y = torch.randn(2, 3, 8)
    with pytest.warns(RuntimeWarning, match=r"inputs float32\[2, 3, 8\].* run the original model.*refused"):
        torch.testing.assert_close(opt(y), model(y))
    assert opt.unoptimized_reason is None
    torch.testing.assert_close(opt(x), model(x))  # the example's specialization still serves
    assert len(opt.specializations) == 1


class _ReadsItsBufferAlone(torch.nn.Module):
    """``cache.sum(1)`` has no traced operand: symbolic_trace evaluates it while tracing and keeps the value."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 8, 4), persistent=False)

    def forward(self, x, pos):
        cache = self.cache
        cache.index_copy_(1, pos, x)
        return cache.sum(1)


def test_a_buffer_expression_frozen_by_symbolic_trace_is_named_and_export_takes_over():
    args = (torch.randn(2, 1, 4), torch.tensor([0]))
    with pytest.raises(fxopt.CaptureError, match="_tensor_constant0: symbolic_trace evaluated an expression"):
        fxopt.optimize(_ReadsItsBufferAlone(), args, strict=True)
    model, ref = _ReadsItsBufferAlone(), _ReadsItsBufferAlone()
    opt = fxopt.optimize(model, args)
    assert opt.unoptimized_reason is None
    for p in (3, 5):
        x = torch.randn(2, 1, 4)
        torch.testing.assert_close(opt(x, torch.tensor([p])), ref(x, torch.tensor([p])))


# -- NOTE [16-bit reference]: a 16-bit result that differs from eager's is judged against a float32 run -----------
class _Cancel(nn.Module):
    """``(x + 256) - 256`` in bfloat16 rounds x to a multiple of 2 (bfloat16's spacing at 256): eager's own answer is
    off the true one (x) by up to 1; the scale is a learned parameter, so the float32 run must upcast it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x):
        return ((x + 256) - 256) * self.scale


def _exact(gm):
    """A more precise rewrite: ``(x + 256) - 256`` -> ``x`` (the true value eager's rounding lost)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is operator.sub:
            node.replace_all_uses_with(node.args[0].args[0])
    gm.graph.eliminate_dead_code()
    return PassResult(gm, True)


def _negate(gm):
    """A wrong rewrite: the result negated."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is operator.mul:
            with gm.graph.inserting_after(node):
                neg = gm.graph.call_function(operator.neg, (node,))
            node.replace_all_uses_with(neg, delete_user_cb=lambda u: u is not neg)
    return PassResult(gm, True)


def test_a_16bit_result_closer_to_float32_than_eager_stands_and_says_why():
    model, x = _Cancel(), torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16) * 3
    assert fxopt.verify.compare(x, model(x)) is not None  # the true answer is beyond bfloat16's tolerance of eager's
    opt = fxopt.optimize(model, (x,), passes=[_exact], strict=True)
    rec = opt.records[0]
    assert rec.status == "applied"
    assert any("as close to a float32 run as eager's" in n for n in rec.notes), rec.notes
    torch.testing.assert_close(opt(x), x)
    assert model.scale.dtype == torch.bfloat16  # the float32 run used its own copy


def test_a_wrong_16bit_result_is_still_rolled_back_with_both_errors():
    model, x = _Cancel(), torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16) * 3
    with pytest.raises(fxopt.PassError, match="against a float32 run, output"):
        fxopt.optimize(model, (x,), passes=[_negate], strict=True)
