import operator

import pytest

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.passes.cleanup import fold_shape_checks, remove_dead_code, remove_dropout, remove_identity


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _captured(model, *inputs):
    return fxopt.capture(model.eval(), inputs)


def stochastic_depth(input, p, mode, training=True):
    """A stand-in for torchvision.ops.stochastic_depth (which torchvision wraps for fx the same way), named as it."""
    if not training or p == 0.0:
        return input
    keep = torch.empty([input.shape[0]] + [1] * (input.dim() - 1)).bernoulli_(1 - p)
    return input * keep / (1 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


def test_torchvisions_stochastic_depth_in_eval_mode_is_removed():
    """torchvision's ConvNeXt: ``layer_scale * block(x)``, stochastic depth, ``+ x``; in eval mode the stochastic depth
    returns its input, so the residual add joins the layer scale's kernel."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(4, 1, 1))

        def forward(self, x):
            y = stochastic_depth(self.scale * x.relu(), 0.1, "row", self.training)
            return y + x, stochastic_depth(x, 0.0, "row", True)

    def calls(gm):
        return [n for n in gm.graph.nodes if n.op == "call_function"
                and getattr(n.target, "__name__", "") == "stochastic_depth"]

    model, x = Block().eval(), torch.randn(2, 4, 3, 3)
    gm = _captured(model, x)
    assert len(calls(gm)) == 2
    result = remove_dropout(gm)
    assert result.modified and calls(result.graph_module) == []
    for got, want in zip(result.graph_module(x), model(x)):
        torch.testing.assert_close(got, want)
    opt = fxopt.optimize(model, (x,), strict=True)
    fused = [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.fxopt.fused.default]
    assert len(fused) == 1 and not [n for n in opt.graph_module.graph.nodes if n.target is operator.add]
    with torch.no_grad():
        for got, want in zip(opt(x), model(x)):
            torch.testing.assert_close(got, want)


def test_remove_dropout_every_spelling():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.3)

        def forward(self, x):
            x = self.drop(x)
            x = F.dropout(x, 0.2, training=self.training)
            return x.relu()

    x = torch.randn(3, 4)
    gm = _captured(M(), x)
    result = remove_dropout(gm)
    assert result.modified
    assert _targets(result.graph_module) == ["relu"]
    torch.testing.assert_close(result.graph_module(x), x.relu())
    assert not remove_dropout(result.graph_module).modified  # truthful: nothing left to do


def test_remove_dropout_keeps_training_dropout():
    class M(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, training=True)

    gm = _captured(M(), torch.randn(4))
    assert not remove_dropout(gm).modified


def test_remove_identity_removes_noops_only():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.id = nn.Identity()

        def forward(self, x, i):
            a = self.id(x).contiguous().float() * 1
            b = a + 0
            c = x.t().contiguous()  # a real copy: kept
            d = i * 1.0  # int -> float promotion: kept
            return b.relu(), c, d

    x, i = torch.randn(3, 4), torch.arange(4)
    gm = _captured(M(), x, i)
    result = remove_identity(gm)
    assert result.modified
    gm = result.graph_module
    targets = _targets(gm)
    assert "contiguous" in targets and "float" not in targets and "id" not in targets
    assert targets.count(operator.mul) == 1  # only the promoting i * 1.0 remains
    assert operator.add not in targets
    out = gm(x, i)
    torch.testing.assert_close(out[0], x.relu())
    assert out[2].dtype == torch.float32


def test_remove_identity_keeps_noop_feeding_inplace_op():
    class M(nn.Module):
        def forward(self, x):
            y = x * 1
            y.add_(1)  # must not write into x
            return x, y

    x = torch.randn(4)
    gm = _captured(M(), x.clone())
    result = remove_identity(gm)
    assert not result.modified
    out_x, out_y = result.graph_module(x.clone())
    torch.testing.assert_close(out_x, x)


def test_remove_identity_does_not_make_an_output_alias_an_input():
    class M(nn.Module):
        def forward(self, x):
            return x * 1

    gm = _captured(M(), torch.randn(4))
    assert not remove_identity(gm).modified


def test_remove_dead_code_keeps_inplace_and_asserts():
    class M(nn.Module):
        def forward(self, x):
            unused = x.exp()  # noqa: F841
            x.relu_()  # result unused, but it mutates x
            return x

    x = torch.randn(5)
    gm = _captured(M(), x.clone())
    result = remove_dead_code(gm)
    assert result.modified
    assert _targets(result.graph_module) == ["relu_"]
    torch.testing.assert_close(result.graph_module(x.clone()), x.relu())
    assert not remove_dead_code(result.graph_module).modified


def test_collapse_views_makes_one_reshape_and_drops_round_trips():
    from fxopt.passes import collapse_views

    class M(nn.Module):
        def forward(self, x):
            a = x.view(2, 12).unsqueeze(0).flatten(1).reshape(4, 6)  # 4 views -> 1 reshape
            b = x.view(24).view(2, 3, 4)  # back to x's own shape: x itself
            c = x.view(6, 4)  # a single view: kept as it is
            return a.relu(), b + 1, c * 2

    x = torch.randn(2, 3, 4)
    gm = _captured(M(), x)
    result = collapse_views(gm)
    assert result.modified
    gm = result.graph_module
    targets = _targets(gm)
    assert targets.count("reshape") == 1 and targets.count("view") == 1
    assert "unsqueeze" not in targets and "flatten" not in targets
    for got, want in zip(gm(x), M()(x)):
        torch.testing.assert_close(got, want)
    assert not collapse_views(gm).modified


class _WindowMask(nn.Module):
    """timm's shifted-window attention: the window mask added through a reshape and back, then softmax."""

    def __init__(self, windows, heads, n):
        super().__init__()
        self.windows, self.heads, self.n = windows, heads, n
        self.register_buffer("mask", torch.randn(windows, n, n))
        self.bias = nn.Parameter(torch.randn(1, heads, n, n))

    def forward(self, q, k):
        attn = q @ k.transpose(-2, -1) + self.bias  # the scores and the relative position bias
        attn = attn.view(-1, self.windows, self.heads, self.n, self.n) + self.mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.heads, self.n, self.n)
        return attn.softmax(-1)


@pytest.mark.parametrize("batch", [1, 3])
def test_an_op_between_a_reshape_and_its_inverse_runs_on_the_original_shape(batch):
    """NOTE [Reshape sandwiches]: the mask add moves to the scores' own shape and its operand takes the reshape, with
    the shape read from the scores' matmul, so the softmax's row kernel takes both adds."""
    from fxopt.passes import collapse_views

    model = _WindowMask(4, 3, 5)
    q, k = torch.randn(batch * 4, 3, 5, 8), torch.randn(batch * 4, 3, 5, 8)
    gm = _captured(model, q, k)
    result = collapse_views(gm)
    assert result.modified
    gm = result.graph_module
    scores_bias, masked = [n for n in gm.graph.nodes if n.target is operator.add]
    assert masked.args[0] is scores_bias  # the scores themselves, not a view of them
    assert all(u.target == "softmax" for u in masked.users)  # no reshape back after it
    assert set(scores_bias.users) == {masked}  # its shape is read from the matmul, not from it
    torch.testing.assert_close(gm(q, k), model(q, k))
    opt = fxopt.optimize(model, (q, k), strict=True)
    (fused,) = [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.fxopt.fused.default]
    assert fxopt.runtime.kernel.KERNELS[fused.args[0]].op_names == ["add", "add", "softmax"]
    torch.testing.assert_close(opt(q, k), model(q, k))


def test_a_reshape_that_does_not_return_to_the_input_shape_is_left_alone():
    """``(x.view(s) + m).view(t)`` with ``t`` not x's shape (here ``m`` also broadcasts the result larger): no
    elementwise op on x's own shape computes it."""
    from fxopt.passes import collapse_views

    class M(nn.Module):
        def forward(self, x, m):
            return (x.view(2, 1, 6) + m).view(2, 6, 6)

    x, m = torch.randn(2, 6), torch.randn(2, 6, 1)
    gm = _captured(M(), x, m)
    collapse_views(gm)
    torch.testing.assert_close(gm(x, m), M()(x, m))
    assert any(n.target is operator.add and n.args[0].target == "view" for n in gm.graph.nodes)


def test_dead_code_releases_tensors_no_node_reads():
    """A pass that swaps a weight for a new copy (to_channels_last after fold_batchnorm) leaves the old tensor on
    the module; remove_dead_code drops it, so the optimized module does not hold both."""
    from fxopt.passes.base import new_attr
    from fxopt.passes.cleanup import remove_dead_code

    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1

    gm = torch.fx.symbolic_trace(M())
    old = new_attr(gm, "w", torch.ones(4))
    (x,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    add = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_before(add):
        w_old = gm.graph.get_attr(old)
        w_new = gm.graph.get_attr(new_attr(gm, "w_copy", torch.full((4,), 2.0)))
    add.args = (x, w_new)  # w_old is now read by nobody
    gm.recompile()
    assert w_old.users == {}
    result = remove_dead_code(gm)
    assert result.modified and not hasattr(result.graph_module, old)
    torch.testing.assert_close(result.graph_module(torch.zeros(4)), torch.full((4,), 2.0))


def test_weights_replaced_by_channels_last_twins_are_released(monkeypatch):
    """fold_batchnorm then to_channels_last: the module ends up holding one new copy of each conv weight (the
    channels_last twin), not the folded NCHW one as well (bench_memory.py: resnet18 held +85 MiB, now ~+43)."""
    from fxopt import models
    from fxopt.passes import layout

    # the layout pass only runs for CUDA tensor-core convolutions: let it run on this CPU graph
    monkeypatch.setattr(layout, "_is_4d_float_cuda", lambda n: True)
    monkeypatch.setattr(layout, "_tensor_core_conv", lambda n: True)
    monkeypatch.setattr(layout, "MIN_CONVS", 1)
    model, (x,) = models.build_any("small_resnet", "cpu")
    ours = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    opt = fxopt.optimize(model, [x], strict=True)
    assert next(r for r in opt.records if r.name == "to_channels_last").status == "applied"

    def new_bytes(module):
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [*module.parameters(), *module.buffers()]}
        return sum(b for p, b in storages.items() if p not in ours)

    spec = opt.specializations[0]
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    assert new_bytes(spec.graph_module) == new_bytes(spec.runner) <= weights


def test_a_module_read_only_for_some_tensors_is_released():
    """After fuse_epilogues (cudnn_convolution_relu reads the folded conv's bias) and to_channels_last (its weight
    is a root twin), the folded conv was never called and still held its NCHW weight: +42 MiB for ResNet-18 on the
    H200. The bias read moves to a root attribute holding the same tensor, and the module goes."""
    from fxopt.passes.base import new_attr
    from fxopt.passes.cleanup import remove_dead_code

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    gm = torch.fx.symbolic_trace(M())
    bias = gm.lin.bias
    call = next(n for n in gm.graph.nodes if n.op == "call_module")
    with gm.graph.inserting_before(call):
        w = gm.graph.get_attr(new_attr(gm, "w_twin", torch.eye(4)))
        b = gm.graph.get_attr("lin.bias")
        lin = gm.graph.call_function(F.linear, (call.args[0], w, b))
    call.replace_all_uses_with(lin)
    gm.graph.erase_node(call)
    gm.recompile()
    result = remove_dead_code(gm)
    out = result.graph_module
    assert result.modified and not hasattr(out, "lin")
    read = [n.target for n in out.graph.nodes if n.op == "get_attr"]
    assert "lin.bias" not in read
    hoisted = getattr(out, next(t for t in read if t.startswith("lin_bias")))
    assert hoisted.data_ptr() == bias.data_ptr()  # the same tensor, not a copy
    x = torch.randn(2, 4)
    torch.testing.assert_close(out(x), x + bias.detach())


def test_a_module_that_still_runs_keeps_its_tensors():
    from fxopt.passes.cleanup import remove_dead_code

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) + self.lin.bias

    gm = torch.fx.symbolic_trace(M())
    out = remove_dead_code(gm).graph_module
    assert hasattr(out, "lin") and "lin.bias" in [n.target for n in out.graph.nodes if n.op == "get_attr"]


# -- timm's BatchNormAct2d: a rank assert, an Identity dropout and an in-place activation --------------------------
class _BatchNormAct(nn.BatchNorm2d):
    """What timm writes (timm/layers/norm_act.py): assert on the rank, F.batch_norm, drop (Identity), act_."""

    def __init__(self, c):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.SiLU(inplace=True)

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        torch._assert(x.dim() >= 2, "expected at least 2 dims")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(self.drop(x))


def _conv_bn_act():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _BatchNormAct(8)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


def test_rank_checks_fold_and_the_identity_goes_so_the_batchnorm_folds():
    model, x = _conv_bn_act(), torch.randn(2, 3, 6, 6)
    opt = fxopt.optimize(model, (x,), strict=True)
    changes = {r.name: r.changes for r in opt.records}
    assert changes["remove_dropout"] == {"identity_modules_removed": 1}
    assert changes["fold_shape_checks"]["asserts_removed"] == 2
    assert changes["functionalize_inplace"] == {"inplace_rewritten": 1}
    assert changes["fold_batchnorm"] == {"batchnorms_folded": 1}
    targets = [n.target for n in opt.graph_module.graph.nodes]
    assert torch._assert not in targets and "dim" not in targets
    assert not [n for n in opt.graph_module.graph.nodes if n.args[1:2] == ("ndim",)]
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_shape_checks_leaves_the_batch_and_unknowns_alone():
    """The batch size stays a node (an artifact keeps its batch dynamic); an assert on it is not removed."""

    class Sized(nn.Module):
        def forward(self, x):
            torch._assert(x.shape[0] == 2, "batch 2")
            return x.reshape(x.shape[0], -1) * x.dim()

    gm = fxopt.capture(Sized(), (torch.randn(2, 3, 4),))
    result = fold_shape_checks(gm)
    gm = result.graph_module
    gm.graph.lint()
    assert torch._assert in [n.target for n in gm.graph.nodes]
    assert not any(n.op == "call_method" and n.target == "dim" for n in gm.graph.nodes)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(gm(x), x.reshape(2, -1) * 3)


class _WindowPad(nn.Module):
    """timm's Swin before a window partition: pad H and W up to a multiple of the window, from ``x.shape``."""

    def __init__(self, window=7):
        super().__init__()
        self.window = window

    def forward(self, x):
        B, H, W, C = x.shape
        pad_h = (self.window - H % self.window) % self.window
        pad_w = (self.window - x.size(2) % self.window) % self.window
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        return x.view(B, -1, self.window, x.size()[-1]) * 2


@pytest.mark.parametrize("size, pads_left", [(14, 0), (12, 1)])
def test_sizes_fold_and_a_pad_by_zero_goes(size, pads_left):
    """NOTE [Folded sizes]: H, W and C fold with the arithmetic on them; a pad of 0 on every side is dropped (eager
    copies); one that pads stays. B (dim 0) stays a graph value."""
    model, x = _WindowPad().eval(), torch.randn(2, size, size, 3)
    opt = fxopt.optimize(model, (x,), strict=True)
    nodes = list(opt.graph_module.graph.nodes)
    assert sum(n.target is F.pad for n in nodes) == pads_left
    assert not any(n.target is operator.mod for n in nodes)  # the padding arithmetic is gone
    assert any(n.target is operator.getitem and n.args[1] == 0 for n in nodes)  # the batch is still read
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    if pads_left == 0:
        assert {r.name: r.changes for r in opt.records}["remove_identity"].get("identities_removed") == 1


def test_with_sizes_folded_a_saved_module_keeps_its_batch_dynamic(tmp_path):
    model, x = _WindowPad().eval(), torch.randn(2, 14, 14, 3)
    opt = fxopt.optimize(model, (x,), strict=True)
    fxopt.save(opt, tmp_path / "window.fxopt")
    loaded = fxopt.load(tmp_path / "window.fxopt")
    for batch in (1, 3, 5):
        y = torch.randn(batch, 14, 14, 3)
        torch.testing.assert_close(loaded(y), model(y))


def test_a_pad_by_zero_stays_where_its_copy_is_observable():
    class Out(nn.Module):
        def forward(self, x):
            return F.pad(x, (0, 0))  # returning x itself would alias the output with the input

    class Written(nn.Module):
        def forward(self, x):
            y = F.pad(x * 2, [0, 0, 0, 0])
            y.add_(1)
            return y, x * 2

    for model in (Out(), Written()):
        x = torch.randn(3, 4)
        gm = fxopt.capture(model, (x,))
        fold_shape_checks(gm)
        result = remove_identity(gm)
        assert any(n.target is F.pad for n in result.graph_module.graph.nodes), model


def test_an_aten_constant_pad_by_zero_goes():
    from fxopt.capture import annotate

    class M(nn.Module):
        def forward(self, x):
            return F.pad(torch.relu(x), (0, 0, 0, 0)) * 3

    x = torch.randn(2, 5, 6)
    gm = torch.export.export(M(), (x,)).module()
    annotate(gm, (x,))
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and "pad" in str(n.target)]
    assert pads, gm.code
    result = remove_identity(gm)
    assert result.modified and not [n for n in result.graph_module.graph.nodes
                                    if n.op == "call_function" and "pad" in str(n.target)]
    torch.testing.assert_close(result.graph_module(x), M()(x))


def test_a_batchnorm_subclass_with_its_own_forward_is_not_folded_as_a_batchnorm():
    """Kept opaque (leaf_modules), the subclass is no plain BatchNorm: its forward also applies the activation.
    Folding it as one (what fold_batchnorm did before ops.is_plain) gave wrong results, which verification caught."""
    from fxopt.passes import fold_batchnorm

    model, x = _conv_bn_act(), torch.randn(2, 3, 6, 6)
    gm = fxopt.capture(model, (x,), leaf_modules=[_BatchNormAct])
    assert not fold_batchnorm(gm).modified
    opt = fxopt.optimize(model, (x,), strict=True, leaf_modules=[_BatchNormAct])  # strict: a rollback raises
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
