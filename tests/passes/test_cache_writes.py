"""write_into_caches (in the default pipeline since the H100 measurement, benchmarks/NOTES.md): a kernel whose result only feeds ``dest.index_copy_`` writes it into ``dest`` itself
(NOTE [Writes into a cache], fxopt/passes/cache_writes.py)."""

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.models.decoder import build_step, greedy_generate


class Cached(nn.Module):
    """A value computed elementwise, written into a buffer at a position tensor along dim 1."""

    def __init__(self, share=False, read_cache=False):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 8, 4), persistent=False)
        self.share, self.read_cache = share, read_cache

    def forward(self, x, pos):
        cache = self.cache
        v = torch.sigmoid(x) * 2 - 1 if not self.read_cache else cache.narrow(1, 0, 1) * 2 + x
        cache.index_copy_(1, pos, v)
        out = (cache * x.new_ones(())).sum(1)  # with a traced operand: symbolic_trace reads a lone buffer as a constant
        return out + v.sum() if self.share else out


def _records(opt):
    return next(r for r in opt.records if r.name == "write_into_caches")


def _ops(opt):
    return [str(n.target) for n in opt.graph_module.graph.nodes if n.op in ("call_function", "call_method")]


def test_the_kernel_writes_into_the_users_buffer_at_the_device_index():
    model, ref = Cached().eval(), Cached().eval()
    x = torch.randn(2, 1, 4)
    opt = fxopt.optimize(model, (x, torch.tensor([0])), backend="cpp", strict=True)
    assert _records(opt).changes == {"cache_writes": 1}
    assert "fxopt.fused_into.default" in _ops(opt) and "index_copy_" not in _ops(opt)
    for p in (3, 5, 3):
        y = torch.randn(2, 1, 4)
        torch.testing.assert_close(opt(y, torch.tensor([p])), ref(y, torch.tensor([p])))
    assert torch.equal(model.cache, ref.cache)  # the caller's buffer received every write, as eager's did


def test_an_index_out_of_range_is_eagers_index_error():
    model = Cached().eval()
    x = torch.randn(2, 1, 4)
    opt = fxopt.optimize(model, (x, torch.tensor([0])), backend="cpp", strict=True)
    with pytest.raises(IndexError, match="out of range"):
        opt(x, torch.tensor([8]))


@pytest.mark.parametrize("kwargs", [{"share": True}, {"read_cache": True}], ids=["value read elsewhere",
                                                                              "value read from the cache"])
def test_what_it_leaves_alone(kwargs):
    """A value also read elsewhere stays an index_copy_, with a note; one computed from the cache itself is not
    even fused (an in-place op writes what it reads: fuse_elementwise's note), so it is no candidate."""
    model, ref = Cached(**kwargs).eval(), Cached(**kwargs).eval()
    x = torch.randn(2, 1, 4)
    opt = fxopt.optimize(model, (x, torch.tensor([1])), backend="cpp", strict=True)
    record = _records(opt)
    assert record.status == "unchanged" and "fxopt.fused_into.default" not in _ops(opt)
    if kwargs.get("share"):
        assert any("also read elsewhere" in n for n in record.notes), record.notes
    torch.testing.assert_close(opt(x, torch.tensor([2])), ref(x, torch.tensor([2])))


def test_the_decoders_keys_are_written_by_their_rotary_kernels():
    step, plain, eager = (build_step("plain", "small", torch.float32, "cpu") for _ in range(3))
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    opt = fxopt.optimize(step, (ids, pos), strict=True)
    base = fxopt.optimize(plain, (ids, pos), disable=["write_into_caches"], strict=True)
    layers = step.cfg.layers
    assert _records(opt).changes == {"cache_writes": layers}  # the keys; the values are views of the GEMM's output
    assert _ops(opt).count("index_copy_") == layers == _ops(base).count("index_copy_") - layers
    assert greedy_generate(opt, ids, 0, 16) == greedy_generate(eager, ids, 0, 16) == greedy_generate(base, ids, 0, 16)
    for a, b in zip(step.kv_buffers(), plain.kv_buffers()):  # the same values as the two-kernel graph wrote
        assert torch.equal(a, b)


def test_the_cuda_source_compiles_with_nvrtc():
    from fxopt.codegen.printer import cuda_source
    from fxopt.runtime import nvrtc

    ok, why = nvrtc.nvrtc_available()
    if not ok:
        pytest.skip(f"NVRTC is not available ({why})")
    opt = fxopt.optimize(Cached().eval(), (torch.randn(2, 1, 4), torch.tensor([0])), backend="cpp",
                         strict=True)
    (kernel,) = [k for k in opt.kernels.values() if k.region.scatter_dim is not None]
    source = cuda_source(kernel.region, kernel.modes)
    assert "p_index" in source and "__trap()" in source and "_flat(" not in source
    assert nvrtc.compile_cuda(source, arch="sm_90", name_hint=kernel.name).startswith(b"\x7fELF")


@pytest.mark.cuda
def test_on_cuda_with_graphs_the_decoder_decodes_eagers_tokens():
    step, eager = (build_step("plain", "small", torch.float32, "cuda") for _ in range(2))
    ids, pos = torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda")
    opt = fxopt.optimize(step, (ids, pos), cuda_graphs=True)
    assert _records(opt).changes == {"cache_writes": step.cfg.layers}
    assert greedy_generate(opt, ids, 0, 48) == greedy_generate(eager, ids, 0, 48)
    (entry,) = opt.graph_entries
    assert entry.captured, opt.graph_report()
