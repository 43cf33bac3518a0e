import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.launches import dispatched_ops
from fxopt.models import _randomize_batchnorm
from fxopt.passes import batchnorm_as_affine, fold_batchnorm, fold_constants


def _bn_model(module: nn.Module) -> nn.Module:
    return _randomize_batchnorm(module, torch.Generator().manual_seed(0)).eval()


def _run_pass(pass_fn, model, *inputs):
    gm = fxopt.capture(model, inputs)
    result = pass_fn(gm)
    gm = result.graph_module
    gm.graph.lint()
    return result.modified, gm


def _has(gm, cls):
    return any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls) for n in gm.graph.nodes)


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), (2, 3, 9)),
    (nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), (2, 3, 9, 9)),
    (nn.Conv2d(4, 8, 3, groups=2, padding=1), nn.BatchNorm2d(8), (1, 4, 6, 6)),
    (nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), (1, 2, 5, 5, 5)),
    (nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4), (1, 3, 5, 5)),
    (nn.Linear(6, 4), nn.BatchNorm1d(4), (3, 6)),
])
def test_fold_batchnorm_module_forms(conv, bn, shape):
    model = _bn_model(nn.Sequential(conv, bn))
    x = torch.randn(shape)
    modified, gm = _run_pass(fold_batchnorm, model, x)
    assert modified
    assert not _has(gm, nn.modules.batchnorm._BatchNorm)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    assert sum(dispatched_ops(gm, [x]).values()) == 1  # the conv (with its bias) alone


def test_fold_batchnorm_functional_form():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)
            self.gamma = nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x):
            y = F.conv2d(x, self.w, None, padding=1)
            return F.batch_norm(y, self.mean, self.var, self.gamma, None, training=False, eps=1e-3)

    model, x = M().eval(), torch.randn(2, 3, 6, 6)
    modified, gm = _run_pass(fold_batchnorm, model, x)
    assert modified and not any(n.target is F.batch_norm for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_aten_form_from_export():
    class Branchy(nn.Module):  # shape-dependent control flow: captured by torch.export
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.shape[0] > 1:
                return self.bn(self.conv(x))
            return x

    model, x = _bn_model(Branchy()), torch.randn(2, 3, 7, 7)
    opt = fxopt.optimize(model, [x], strict=True)
    assert opt.capture_info.method == "export"
    rec = {r.name: r for r in opt.records}["fold_batchnorm"]
    assert rec.changes == {"batchnorms_folded": 1}
    assert not any("batch_norm" in str(n.target) for n in opt.graph_module.graph.nodes)
    torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)


def test_bn_whose_conv_has_another_user_is_kept():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # y is needed unnormalized

    model, x = _bn_model(M()), torch.randn(1, 3, 6, 6)
    modified, gm = _run_pass(fold_batchnorm, model, x)
    assert not modified and _has(gm, nn.BatchNorm2d)
    opt = fxopt.optimize(model, [x])
    notes = {r.name: r for r in opt.records}["fold_batchnorm"].notes
    assert any("other users" in n for n in notes)
    torch.testing.assert_close(opt(x), model(x))


def test_bn_in_training_mode_and_bn_after_pooling_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.train()
    x = torch.randn(2, 3, 6, 6)
    gm = fxopt.capture(model, [x])
    assert not fold_batchnorm(gm).modified
    pooled = _bn_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4)))
    modified, _ = _run_pass(fold_batchnorm, pooled, x)
    assert not modified


def test_bn1d_after_3d_linear_output_is_kept():
    model = _bn_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(5)))  # BN1d over (N, 5, 4) normalizes dim 1
    x = torch.randn(2, 5, 4)
    modified, _ = _run_pass(fold_batchnorm, model, x)
    assert not modified


def test_fold_batchnorm_does_not_change_the_users_model():
    model = _bn_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 5, 5)
    fxopt.optimize(model, [x])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_small_resnet_folds_every_batchnorm():
    model, inputs = fxopt.models.get("small_resnet").build()
    opt = fxopt.optimize(model, inputs, strict=True)
    rec = {r.name: r for r in opt.records}
    assert rec["fold_batchnorm"].changes == {"batchnorms_folded": 9}
    counts = dispatched_ops(opt, inputs)
    assert "native_batch_norm" not in counts and "_native_batch_norm_legit_no_training" not in counts
    torch.testing.assert_close(opt(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_fold_constants_evaluates_weight_only_subgraphs_once():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))
            self.scale = nn.Parameter(torch.tensor(3.0))

        def forward(self, x):
            w = (self.w * self.scale).t().softmax(-1)  # depends on parameters only
            noise = torch.rand_like(self.w).sum() * 0  # random: must not be folded, though it reads a parameter
            return x @ w + noise

    model, x = M().eval(), torch.randn(2, 8)
    modified, gm = _run_pass(fold_constants, model, x)
    assert modified
    called = [n.target for n in gm.graph.nodes if n.op in ("call_method", "call_function")]
    assert "softmax" not in called and torch.rand_like in called
    torch.testing.assert_close(gm(x), model(x))


def test_fold_constants_leaves_plain_views_of_weights_and_is_truthful():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w.t()

    modified, gm = _run_pass(fold_constants, M().eval(), torch.randn(2, 4))
    assert not modified


def test_a_parameter_only_branch_is_computed_once_and_follows_weight_changes():
    """A diffusion block's time embedding (an MLP on a parameter) depends on parameters only: fold_constants computes
    it at optimize time, so no call runs its GEMMs; a later write into those parameters rebuilds the module (NOTE
    [Frozen weights]), so the folded value never goes stale."""
    import warnings

    class TimeEmbedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Parameter(torch.randn(1, 16))
            self.emb = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8))
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + self.emb(self.t)[:, :, None, None]

    torch.manual_seed(0)
    model, x = TimeEmbedded().eval(), torch.randn(2, 8, 8, 8)
    opt = fxopt.optimize(model, (x,))
    modules = {n.target for n in opt.graph_module.graph.nodes if n.op == "call_module"}
    assert modules == {"conv"}  # the embedding MLP is gone from the graph
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        model.emb[2].bias.add_(1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            torch.testing.assert_close(opt(x), model(x))


# -- NOTE [Tensors from literals] ---------------------------------------------------------------------------------
class _Positions(nn.Module):
    """transformers' way: position ids from arange over the (folded) sequence length, their embedding, and a mask
    built from them; a random tensor and a tensor written in place beside them."""

    def __init__(self):
        super().__init__()
        self.wpe = nn.Embedding(16, 8)

    def forward(self, x):
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        causal = torch.ones(x.shape[1], x.shape[1]).tril().bool()
        noise = torch.rand(x.shape[1]) * 0  # random: never folded, even times zero
        acc = torch.zeros(x.shape[-1])
        acc.add_(x.sum((0, 1)))  # written in place: not a constant
        scores = (x @ x.transpose(1, 2)).masked_fill(~causal, -1e4)
        return scores.softmax(-1) @ (x + self.wpe(pos)) + noise.unsqueeze(-1) + acc


def test_tensors_made_from_literals_and_what_follows_them_are_folded():
    model, x = _Positions().eval(), torch.randn(2, 6, 8)
    opt = fxopt.optimize(model, (x,), strict=True)
    rec = {r.name: r for r in opt.records}["fold_constants"]
    assert rec.status == "applied" and rec.changes["constants_created"] >= 2  # the position embedding, the mask
    targets = {str(n.target) for n in opt.graph_module.graph.nodes if n.op in ("call_function", "call_method")}
    assert not any(name in t for t in targets for name in ("arange", "tril", "embedding"))
    assert any("rand" in t for t in targets) and any("zeros" in t for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        x2 = torch.randn(2, 6, 8)  # the in-place accumulator starts from zero on every call
        torch.testing.assert_close(opt(x2), model(x2))


# -- NOTE [BatchNorm as an affine] -------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    """DenseNet's pre-activation: BatchNorm + ReLU over a concatenation (nothing to fold into), then a conv."""

    def __init__(self, c=4, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), bn(2 * c)

    def forward(self, x):
        return torch.relu(self.bn(torch.cat([x, self.conv(x)], 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_batchnorm_after_a_concatenation_becomes_an_affine_that_joins_the_relu(dtype, channels_last):
    model = _bn_model(_DenseLayer()).to(dtype)
    x = torch.randn(2, 4, 5, 6).to(dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fxopt.optimize(model, (x,), strict=True)
    assert {r.name: r for r in opt.records}["batchnorm_as_affine"].changes == {"batchnorms_as_affine": 1}
    ran = dispatched_ops(opt, (x,))
    assert "native_batch_norm" not in ran and "batch_norm" not in ran and "relu" not in ran, ran
    with torch.no_grad():
        out, ref = opt(x), model(x)
    assert out.dtype == dtype and out.stride() == ref.stride()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # float32 arithmetic, one rounding, as ATen's BatchNorm: within one rounding of eager's
        torch.testing.assert_close(out, ref, rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=1e-3)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the user's model is untouched


@pytest.mark.parametrize("shape", [(3, 6), (3, 6, 5)])
def test_a_batchnorm1d_after_a_sum_becomes_an_affine(shape):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x, y):
            return self.bn(x + y)

    model, x, y = _bn_model(M()), torch.randn(shape), torch.randn(shape)
    opt = fxopt.optimize(model, (x, y), strict=True)
    assert {r.name: r for r in opt.records}["batchnorm_as_affine"].status == "applied"
    torch.testing.assert_close(opt(x, y), model(x, y), rtol=1e-5, atol=1e-5)


def test_batchnorms_without_running_statistics_or_in_training_stay():
    for model in (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)).train(),
                  nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4, track_running_stats=False)).eval()):
        modified, _ = _run_pass(batchnorm_as_affine, model, torch.randn(2, 4, 3, 3))
        assert not modified


def test_where_the_fold_does_not_run_every_batchnorm_becomes_an_affine():
    """fold_batchnorm disabled, as where it is rolled back (NOTE [16-bit reference]): conv -> BN -> ReLU keeps its
    BatchNorm out of the weights, and the BatchNorm still costs no kernel of its own."""
    model = _bn_model(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU()))
    x = torch.randn(2, 3, 7, 7)
    opt = fxopt.optimize(model, (x,), disable=["fold_batchnorm"], strict=True)
    assert {r.name: r for r in opt.records}["batchnorm_as_affine"].changes == {"batchnorms_as_affine": 1}
    assert set(dispatched_ops(opt, (x,))) == {"convolution"}
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_aten_spelling_from_export_becomes_an_affine():
    class Branchy(nn.Module):  # shape-dependent control flow: captured by torch.export
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.shape[0] > 1:
                return torch.relu(self.bn(x * 2))
            return x

    model, x = _bn_model(Branchy()), torch.randn(2, 4, 5, 5)
    opt = fxopt.optimize(model, [x], strict=True)
    assert opt.capture_info.method == "export"
    assert {r.name: r for r in opt.records}["batchnorm_as_affine"].status == "applied"
    assert not any("batch_norm" in str(n.target) for n in opt.graph_module.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


class _ConvBnThen(nn.Module):
    """conv -> BatchNorm -> ``then`` (the BatchNorm's readers decide whether a 16-bit fold saves a launch)."""

    def __init__(self, then: str):
        super().__init__()
        self.conv, self.bn, self.next = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.then = then

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.then == "silu":
            return F.silu(y)
        if self.then == "hardswish_and_gelu":  # two elementwise readers
            return F.hardswish(y) * F.gelu(y)
        if self.then == "add":
            return y + 1.0
        if self.then == "relu":
            return torch.relu(y)
        if self.then == "add_relu":
            return torch.relu(y + x.repeat(1, 2, 1, 1))
        if self.then == "conv":
            return self.next(y)
        return y  # "output": the graph's output reads it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("then, folds_16bit", [("silu", False), ("hardswish_and_gelu", False), ("add", False),
                                               ("relu", False), ("add_relu", False), ("conv", True), ("output", True)])
def test_a_16bit_batchnorm_folds_only_where_that_saves_a_launch(then, folds_16bit, dtype):
    """NOTE [16-bit folds]: folded into 16-bit weights, ``w * scale`` is rounded again; the fold happens where it
    saves a launch (a reader that is not elementwise; on CUDA also cuDNN's conv + ReLU: the next test), not where
    the BatchNorm's readers are elementwise ops whose kernel takes it as a float32 affine. Float32 always folds."""
    model = _bn_model(_ConvBnThen(then)).to(dtype)
    x = torch.randn(1, 4, 6, 6, dtype=dtype)
    folds = folds_16bit or dtype == torch.float32
    modified, gm = _run_pass(fold_batchnorm, model, x)
    assert modified == folds and _has(gm, nn.BatchNorm2d) != folds
    opt = fxopt.optimize(model, [x])
    records = {r.name: r for r in opt.records}
    assert records["fold_batchnorm"].status == ("applied" if folds else "unchanged"), opt.summary()
    if not folds:
        assert any("NOTE [16-bit folds]" in n for n in records["fold_batchnorm"].notes)
        assert records["batchnorm_as_affine"].changes == {"batchnorms_as_affine": 1}
    expected = model(x)
    torch.testing.assert_close(opt(x), expected, **({} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}))


@pytest.mark.parametrize("then, groups, dtype, folds", [
    ("relu", 1, torch.float16, True),  # cudnn_convolution_relu
    ("add_relu", 1, torch.float16, True),  # cudnn_convolution_add_relu
    ("relu", 4, torch.float16, False),  # NOTE [Grouped convolutions keep their ReLU apart]
    ("relu", 1, torch.bfloat16, False),  # bfloat16 never takes the fused call
    ("silu", 1, torch.float16, False),
], ids=str)
def test_on_a_cuda_graph_a_16bit_batchnorm_before_a_relu_folds_where_cudnn_fuses_them(then, groups, dtype, folds,
                                                                                        monkeypatch):
    """NOTE [16-bit folds] on a graph recorded on CUDA (device metadata set, cuDNN said available: the rule is read
    from the graph; nothing runs): before a ReLU the fold saves a launch exactly where fuse_epilogues would write
    the convolution with its bias and ReLU as one cuDNN call (epilogue.cudnn_fuses_conv_relu)."""
    model = _ConvBnThen(then)
    model.conv = nn.Conv2d(4, 8, 3, padding=1, groups=groups)
    model = _bn_model(model).to(dtype)
    x = torch.randn(1, 4, 6, 6, dtype=dtype)
    gm = fxopt.capture(model, [x])
    for n in gm.graph.nodes:
        n.meta["device"] = torch.device("cuda", 0)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    assert fold_batchnorm(gm).modified == folds
