import torch
import torch.nn as nn

import fxopt
from fxopt import models
from fxopt.launches import _union_length, static_count


def test_relu_sigmoid_dispatches_two_ops():
    model, inputs = models.get("relu_sigmoid").build()
    count = fxopt.count_launches(model, inputs)
    assert count.dispatched == 2
    assert count.dispatched_by_op == {"relu": 1, "sigmoid": 1}
    assert count.static is None  # a plain module has no graph
    assert count.cuda_kernels is None


def test_linear_dispatches_one_addmm():
    count = fxopt.count_launches(nn.Linear(8, 4), [torch.randn(2, 8)])
    assert count.dispatched_by_op == {"addmm": 1}


def test_views_and_allocations_are_not_counted():
    class Views(nn.Module):
        def forward(self, x):
            y = x.view(2, 8).transpose(0, 1)[3:]
            return torch.empty_like(y), y.unsqueeze(0).detach(), x.size(0)

    assert fxopt.count_launches(Views(), [torch.randn(4, 4)]).dispatched == 0


def test_static_count_on_graph():
    model, inputs = models.get("simple_cnn").build()
    gm = fxopt.capture(model, inputs)
    # conv1, relu, pool, conv2, relu, pool, fc1, relu, fc2; the view is free
    assert static_count(gm) == 9
    assert fxopt.count_launches(gm, inputs).static == 9


def test_static_count_excludes_shape_reads_getitem_and_identities():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)
            self.id = nn.Identity()

        def forward(self, x):
            n = x.size(0)
            parts = torch.split(x, 2)
            y = self.id(self.drop(parts[0])).float()
            return y.relu().view(n // 2, -1)

    gm = fxopt.capture(M().eval(), [torch.randn(4, 3)])
    assert static_count(gm) == 1  # only the relu


def test_optimized_module_static_count():
    model, inputs = models.get("simple_cnn").build()
    opt = fxopt.optimize(model, inputs)
    count = fxopt.count_launches(opt, inputs)
    assert count.static == static_count(opt.graph_module)
    # the optimized module runs its kernels directly; its graph, which calls them as fxopt::fused, is what counts
    assert count.dispatched_by_op == dict(fxopt.launches.dispatched_ops(opt.graph_module, inputs))
    assert count.dispatched < 9  # eager's count: fc1 + relu became one _addmm_activation


def test_busy_time_counts_overlap_once():
    assert _union_length([(0, 10), (5, 15), (20, 25)]) == 20
    assert _union_length([]) == 0


def test_uses_cuda_reads_the_first_parameter_or_buffer_of_any_size():
    """count_launches asks whether a module lives on the GPU; a CPU module with multi-element parameters on a machine
    with a GPU raised "Boolean value of Tensor ... is ambiguous" (found on the H200, 2026-12-01)."""
    from fxopt.launches import _uses_cuda

    assert not _uses_cuda([torch.randn(2)], torch.nn.Linear(4, 4))
    assert not _uses_cuda([], torch.nn.BatchNorm1d(4).requires_grad_(False))
    assert not _uses_cuda([], torch.nn.ReLU())
