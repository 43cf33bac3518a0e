import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.launches import dispatched_ops
from fxopt.passes import fuse_epilogues


def _apply(model, *inputs):
    gm = fxopt.capture(model.eval(), inputs)
    result = fuse_epilogues(gm)
    result.graph_module.graph.lint()
    return result


@pytest.mark.parametrize("act, shape", [(nn.ReLU(), (3, 8)), (nn.GELU(), (2, 5, 8))])
def test_linear_bias_activation_becomes_one_op(act, shape):
    model = nn.Sequential(nn.Linear(8, 16), act)
    x = torch.randn(shape)
    result = _apply(model, x)
    assert result.modified
    gm = result.graph_module
    assert any(n.target is torch._addmm_activation for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    assert dispatched_ops(gm, [x]) == {"_addmm_activation": 1}


def test_exact_gelu_and_shared_outputs_are_not_fused():
    x = torch.randn(4, 8)
    # on CPU _addmm_activation's GELU is the exact one: the tanh approximation must stay separate
    assert not _apply(nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh")), x).modified

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y), y  # y is needed before the activation

    assert not _apply(Shared(), x).modified
    assert not _apply(nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU()), x).modified


def test_conv_epilogues_are_left_alone_on_cpu_with_a_note():
    model, inputs = fxopt.models.get("small_resnet").build()
    opt = fxopt.optimize(model, inputs)
    rec = {r.name: r for r in opt.records}["fuse_epilogues"]
    assert "conv_relu" not in rec.changes
    note = next(n for n in rec.notes if "convolution(s) on CPU" in n)
    assert "CUDA only" in note and "cuDNN" in note  # says why, and what happens to the activation instead
    assert "fuse_elementwise" in note


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_relu_and_conv_add_relu_on_cuda(dtype):
    model, inputs = fxopt.models.get("small_resnet").build(device="cuda", dtype=dtype)
    opt = fxopt.optimize(model, inputs, strict=True)
    rec = {r.name: r for r in opt.records}["fuse_epilogues"]
    assert rec.changes.get("conv_relu", 0) >= 3 and rec.changes.get("conv_add_relu", 0) == 3
    with torch.no_grad():
        assert fxopt.verify.compare(opt(*inputs), model(*inputs)) is None


def test_channels_last_is_cuda_only_and_needs_enough_convolutions():
    from fxopt.passes import to_channels_last

    model, inputs = fxopt.models.get("small_resnet").build()
    gm = fxopt.capture(model, inputs)
    assert not to_channels_last(gm).modified  # CPU graph: untouched


@pytest.mark.cuda
def test_channels_last_removes_transposes_and_keeps_eager_strides():
    model, inputs = fxopt.models.get("small_resnet").build(device="cuda")
    opt = fxopt.optimize(model, inputs, strict=True)
    rec = {r.name: r for r in opt.records}["to_channels_last"]
    assert rec.status == "applied"
    with torch.no_grad():
        out, ref = opt(*inputs), model(*inputs)
    assert out.stride() == ref.stride()
    kernels = fxopt.count_launches(opt, inputs).cuda_kernels_by_name
    assert not any("nchwToNhwc" in k for k in kernels), kernels
