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


def test_the_decoders_keys_and_values_are_written_by_the_keys_rotary_kernels():
    """The key's rotary kernel writes the key into its cache, and the value (a view of the merged projection, no
    kernel of its own) joins it (NOTE [Sibling cache writes]): no index_copy_ left, one launch per layer."""
    step, plain, eager = (build_step("plain", "small", torch.float32, "cpu") for _ in range(3))
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    opt = fxopt.optimize(step, (ids, pos), strict=True)
    base = fxopt.optimize(plain, (ids, pos), disable=["write_into_caches"], strict=True)
    layers = step.cfg.layers
    assert _records(opt).changes == {"cache_writes": layers, "sibling_writes_joined": layers}
    assert _ops(opt).count("index_copy_") == 0 and _ops(base).count("index_copy_") == 2 * layers
    intos = [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.fxopt.fused_into.default]
    assert len(intos) == layers and all(len(n.args[2]) == 2 for n in intos)
    assert greedy_generate(opt, ids, 0, 16) == greedy_generate(eager, ids, 0, 16) == greedy_generate(base, ids, 0, 16)
    for a, b in zip(step.kv_buffers(), plain.kv_buffers()):  # the same values as the two-kernel graph wrote
        assert torch.equal(a, b)


class TwoCaches(nn.Module):
    """Two plain copies into two caches at one index (no kernel computes either value); ``between``: what runs
    between the two writes."""

    def __init__(self, between=None):
        super().__init__()
        self.register_buffer("a", torch.zeros(2, 8, 4), persistent=False)
        self.register_buffer("b", torch.zeros(2, 8, 4), persistent=False)
        self.between = between

    def forward(self, x, y, pos, pos2):
        a, b = self.a, self.b
        a.index_copy_(1, pos, x)
        one = x.new_ones(())  # a traced operand: symbolic_trace reads a lone buffer as a constant
        seen = (a * one).sum() if self.between == "read" else x.sum()
        b.index_copy_(1, pos2 if self.between == "other index" else pos, y)
        return (a * one).sum(1) + (b * one * 2).sum(1) + seen


@pytest.mark.parametrize("between, joined", [(None, True), ("read", False), ("other index", False)])
def test_copies_into_caches_at_one_index_join_one_kernel(between, joined):
    """NOTE [Sibling cache writes]: two copies at the same index node become one kernel writing both caches; a read
    of the first cache between them, or another index, keeps them apart (a note says why for the read)."""
    model, ref = TwoCaches(between).eval(), TwoCaches(between).eval()
    args = (torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.tensor([1]), torch.tensor([5]))
    opt = fxopt.optimize(model, args, backend="cpp", strict=True)
    record = _records(opt)
    intos = [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.fxopt.fused_into.default]
    if joined:
        assert record.changes == {"sibling_writes_joined": 1} and len(intos) == 1 and len(intos[0].args[2]) == 2
        assert "index_copy_" not in _ops(opt)
    else:
        assert not intos and _ops(opt).count("index_copy_") == 2
        if between == "read":
            assert any("reads the first destination" in n for n in record.notes), record.notes
    for p, p2 in ((3, 4), (7, 0), (3, 3)):
        x, y = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
        torch.testing.assert_close(opt(x, y, torch.tensor([p]), torch.tensor([p2])),
                                   ref(x, y, torch.tensor([p]), torch.tensor([p2])))
    assert torch.equal(model.a, ref.a) and torch.equal(model.b, ref.b)


def test_the_cuda_source_compiles_with_nvrtc():
    from fxopt.codegen.printer import cuda_source
    from fxopt.runtime import nvrtc

    ok, why = nvrtc.nvrtc_available()
    if not ok:
        pytest.skip(f"NVRTC is not available ({why})")
    opt = fxopt.optimize(Cached().eval(), (torch.randn(2, 1, 4), torch.tensor([0])), backend="cpp",
                         strict=True)
    joined = fxopt.optimize(TwoCaches().eval(), (torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.tensor([1]),
                                                 torch.tensor([1])), backend="cpp", strict=True)
    for k in [k for o in (opt, joined) for k in o.kernels.values() if k.region.scatter_dim is not None]:
        source = cuda_source(k.region, k.modes)
        assert "p_index" in source and "__trap()" in source and "_flat(" not in source
        assert nvrtc.compile_cuda(source, arch="sm_90", name_hint=k.name).startswith(b"\x7fELF")


@pytest.mark.cuda
def test_on_cuda_with_graphs_the_decoder_decodes_eagers_tokens():
    step, eager = (build_step("plain", "small", torch.float32, "cuda") for _ in range(2))
    ids, pos = torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda")
    opt = fxopt.optimize(step, (ids, pos), cuda_graphs=True)
    assert _records(opt).changes == {"cache_writes": step.cfg.layers, "sibling_writes_joined": step.cfg.layers}
    assert greedy_generate(opt, ids, 0, 48) == greedy_generate(eager, ids, 0, 48)
    (entry,) = opt.graph_entries
    assert entry.captured, opt.graph_report()
