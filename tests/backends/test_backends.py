import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.runtime.kernel import fused_op


def _fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_op]


@pytest.fixture
def user_kernel():
    calls = []

    def pattern(x, y):
        return torch.relu(x + y)

    def add_relu(x, y):
        calls.append((x.shape, y.shape))
        return (x + y).clamp_min(0)

    entry = fxopt.register_kernel(pattern, add_relu)
    yield entry, calls
    fxopt.unregister_kernel(entry)


def test_register_kernel_replaces_every_match_as_one_launch(user_kernel):
    entry, calls = user_kernel

    class M(nn.Module):
        def forward(self, a, b, c):
            return torch.relu(a + b) * torch.relu(b + c)

    inputs = [torch.randn(3, 5) for _ in range(3)]
    model = M()
    opt = fxopt.optimize(model, inputs, strict=True)
    rec = {r.name: r for r in opt.records}["apply_user_kernels"]
    assert rec.changes == {f"matched_{entry.name}": 2}
    calls.clear()
    torch.testing.assert_close(opt(*inputs), model(*inputs))
    assert len(calls) == 2  # the user's kernel really ran, once per match
    ops = fxopt.count_launches(opt, inputs).dispatched_by_op
    assert ops["fxopt.fused.default"] == 2 and sum(ops.values()) == 3  # two user kernels + the mul
    assert any(k is entry for k in opt.kernels.values())


def test_wrong_user_kernel_is_rolled_back():
    def pattern(x):
        return torch.sigmoid(x)

    entry = fxopt.register_kernel(pattern, torch.tanh, name="wrong_sigmoid")
    try:
        model = fxopt.models.ReluSigmoid()
        x = torch.randn(4, 4)
        with pytest.warns(RuntimeWarning, match="apply_user_kernels' rolled back"):
            opt = fxopt.optimize(model, [x])
        torch.testing.assert_close(opt(x), model(x))
    finally:
        fxopt.unregister_kernel(entry)


def test_register_kernel_rejects_duplicates_and_non_callables(user_kernel):
    entry, _ = user_kernel
    with pytest.raises(ValueError, match="already registered"):
        fxopt.register_kernel(entry.pattern, entry.fn, name=entry.name)
    with pytest.raises(TypeError):
        fxopt.register_kernel("relu", torch.relu)


def test_user_pattern_inputs_bind_tensors_not_literals(user_kernel):
    entry, calls = user_kernel

    class M(nn.Module):
        def forward(self, x):
            return torch.relu(x + 0.25)  # matches relu(x + y) only if y could be a literal: it must not

    x = torch.randn(4)
    opt = fxopt.optimize(M(), [x], strict=True)
    assert {r.name: r for r in opt.records}["apply_user_kernels"].status == "unchanged"
    torch.testing.assert_close(opt(x), torch.relu(x + 0.25))


def test_custom_op_is_one_op_for_export():
    model = fxopt.models.ElementwiseChain()
    x = torch.randn(2, 32)
    opt = fxopt.optimize(model, [x], strict=True)
    exported = torch.export.export(opt.graph_module, (x,), strict=False)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fxopt.fused.default) == 1
    torch.testing.assert_close(exported.module()(x), model(x))


def test_torch_compile_backend_by_name_without_import_of_backend_module():
    model = fxopt.models.ElementwiseChain()
    x = torch.randn(2, 64)
    compiled = torch.compile(model, backend="fxopt")
    before = fxopt.stats["fuse_elementwise.groups"]
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    assert fxopt.stats["fuse_elementwise.groups"] - before == 1  # the captured graph went through fusion


def test_inductor_backend_fuses_and_matches():
    model = fxopt.models.ReluSigmoid()
    x = torch.randn(4, 64)
    opt = fxopt.optimize(model, [x], backend="inductor", strict=True)
    (node,) = _fused_nodes(opt.graph_module)
    kernel = opt.kernels[node.name]
    assert kernel.backend == "inductor"
    torch.testing.assert_close(opt(x), model(x))
    y = torch.randn(7, 64)  # a new shape: Inductor compiles again behind the same node
    torch.testing.assert_close(opt(y), model(y))
    assert fxopt.count_launches(opt, [x]).dispatched == 1
