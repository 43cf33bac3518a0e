"""merge_operand_copies: slices of one permuted tensor that matmuls would each copy -> one copy (NOTE [One copy for
matmul operands])."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxopt
from fxopt.passes import default_pipeline


class _Copies(TorchDispatchMode):
    """Counts the ATen ops a run dispatches."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _clones(fn, *args) -> int:
    with torch.no_grad(), _Copies() as seen:
        fn(*args)
    return seen.ops["aten.clone.default"]


class _Attention(nn.Module):
    """timm's attention as written (``unbind`` or integer indexing of the permuted q/k/v projection)."""

    def __init__(self, channels: int, heads: int, indexed: bool = False, scaled: bool = True):
        super().__init__()
        self.heads, self.indexed, self.scaled = heads, indexed, scaled
        self.scale = (channels // heads) ** -0.5  # a number in the graph, as timm's
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (qkv[0], qkv[1], qkv[2]) if self.indexed else qkv.unbind(0)
        if self.scaled:
            q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def _only_this_pass(model, x):
    opt = fxopt.optimize(model, (x,), passes=["merge_operand_copies"])
    return opt, opt.records[0]


@pytest.mark.parametrize("indexed", [False, True], ids=["unbind", "indexed"])
@pytest.mark.parametrize("scaled", [True, False], ids=["q-scaled", "plain"])
@pytest.mark.parametrize("shape", [(2, 10, 64, 4), (3, 7, 48, 2), (5, 17, 96, 6)], ids=lambda s: "x".join(map(str, s)))
def test_three_copies_become_one_at_batches_above_one(shape, indexed, scaled):
    B, N, C, H = shape
    torch.manual_seed(0)
    model = _Attention(C, H, indexed, scaled).eval()
    x = torch.randn(B, N, C)
    opt, record = _only_this_pass(model, x)
    assert record.status == "applied" and record.changes == {"copies_merged": 1}
    assert _clones(model, x) == 4 and _clones(opt, x) == 2  # q, k, v and the output's reshape -> one and the output
    torch.testing.assert_close(opt(x), model(x))


@pytest.mark.parametrize("batch, heads", [(1, 4), (3, 1)])
def test_batch_dims_that_fold_already_are_left_alone(batch, heads):
    """A batch of one, or one head: the slices' batch dims fold as a view, no matmul copies them."""
    model = _Attention(32, heads).eval()
    x = torch.randn(batch, 10, 32)
    opt, record = _only_this_pass(model, x)
    assert record.status == "unchanged" and _clones(opt, x) == _clones(model, x) <= 1  # the output's reshape


class _OneMatmul(nn.Module):
    """Only q reaches a matmul that copies it; k and v are read otherwise: one copy either way."""

    def forward(self, x):
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        return q @ torch.ones(q.shape[-1], 3), k.sum(), v * 2


def test_slices_that_only_one_matmul_would_copy_are_left_alone():
    x = torch.randn(2, 5, 3, 4, 8)
    opt, record = _only_this_pass(_OneMatmul(), x)
    assert record.status == "unchanged"


class _ReadElsewhere(nn.Module):
    """k also feeds an output: the pass still merges (q and v are copied by their matmuls) and k's reader sees the
    same values from the copy."""

    def forward(self, x):
        q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v, k + 1


def test_a_slice_with_another_reader_reads_the_copy():
    x = torch.randn(2, 5, 3, 4, 8)
    model = _ReadElsewhere()
    opt, record = _only_this_pass(model, x)
    assert record.status == "applied"
    for got, want in zip(opt(x), model(x)):
        torch.testing.assert_close(got, want)


def test_in_the_default_pipeline_after_the_math_path_is_written():
    names = [p.name for p in default_pipeline("cpp")]
    assert names.index("short_query_attention") < names.index("merge_operand_copies") < names.index("fuse_elementwise")


def test_the_default_pipeline_on_attention_kept_as_written():
    """Attention that rewrite_attention keeps as written (its softmax is returned too): the matmuls stay and the pass
    merges their copies, outputs unchanged."""

    class Masked(_Attention):
        def __init__(self):
            super().__init__(32, 2)
            self.register_buffer("bias", torch.randn(1, 2, 6, 6))
            self.register_buffer("mask", torch.randn(3, 1, 6, 6))

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4).unbind(0)
            attn = q @ k.transpose(-2, -1) * 0.25 + self.bias
            attn = (attn.view(-1, 3, 2, N, N) + self.mask.unsqueeze(0)).view(-1, 2, N, N)
            attn = attn.softmax(-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)), attn

    model = Masked().eval()
    x = torch.randn(6, 6, 32)
    opt = fxopt.optimize(model, (x,))
    record = next(r for r in opt.records if r.name == "merge_operand_copies")
    assert record.status == "applied", [(r.name, r.status, r.notes) for r in opt.records]
    for got, want in zip(opt(x), model(x)):
        torch.testing.assert_close(got, want)


class _Written(nn.Module):
    """v is written in place through the permuted tensor's base: the slices must keep sharing its memory."""

    def forward(self, x):
        base = x * 1.5
        q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        base.add_(1)
        return out, v


class _Returned(nn.Module):
    """A slice is returned beside the base it is a view of: after a copy they would no longer alias."""

    def forward(self, x):
        base = x * 1.5
        q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v, v, base


@pytest.mark.parametrize("model", [_Written(), _Returned()], ids=["written-in-place", "returned"])
def test_slices_whose_aliasing_could_be_seen_are_left_alone(model):
    x = torch.randn(2, 5, 3, 4, 8)
    opt, record = _only_this_pass(model, x)
    assert record.status == "unchanged"
    for got, want in zip(opt(x), model(x)):
        torch.testing.assert_close(got, want)


class _FromInputs(nn.Module):
    """The permuted tensor is the model's input itself (a placeholder), beside another input."""

    def forward(self, qkv, other):
        q, k, v = qkv.unbind(0)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v + other


def test_slices_of_an_input():
    qkv = torch.randn(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    other = torch.randn(2, 4, 5, 8)
    opt = fxopt.optimize(_FromInputs(), (qkv, other), passes=["merge_operand_copies"])
    assert opt.records[0].status == "applied"
    torch.testing.assert_close(opt(qkv, other), _FromInputs()(qkv, other))


class _TwoBlocks(nn.Module):
    """Two attention blocks of one structure and shape: one measurement serves both (its cache key is the region's
    code and layouts, with nodes named by position)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _Attention(32, 4), _Attention(32, 4)

    def forward(self, x):
        return self.b(self.a(x))


def _regions(gm):
    from fxopt.passes import operand_copies as oc

    found = []
    for node in gm.graph.nodes:
        slices = oc._slices(node)
        if slices is not None:
            source, readers = slices
            paths = [p for r in readers for p in oc._paths_to_copying_matmuls(gm, r)]
            found.append((source, readers, paths))
    return found


def test_the_timed_regions_compute_the_matmuls_both_ways():
    """What the measurement runs (NOTE [Choosing by measurement]): the ops from the permuted tensor to the two
    matmuls, with one copy first or without; both give the same products, and the code of two blocks is the same."""
    from fxopt.capture import capture
    from fxopt.passes.operand_copies import region_of
    from fxopt.runtime.probe import random_like

    torch.manual_seed(0)
    gm = capture(_TwoBlocks().eval(), (torch.randn(2, 10, 32),))
    regions = _regions(gm)
    assert len(regions) == 2 and all(len(paths) == 3 for _, _, paths in regions)  # q, k, v
    codes = []
    for source, readers, paths in regions:
        (merged, inputs), (own, own_inputs) = (region_of(source, readers, paths, merge) for merge in (True, False))
        assert inputs == own_inputs and inputs[0] is source and len(inputs) == 2  # and the softmax's output
        args = [random_like(n) for n in inputs]
        assert args[0].stride() == source.meta["tensor_meta"].stride
        with torch.no_grad(), _Copies() as seen_merged:
            got = merged(*args)
        with torch.no_grad(), _Copies() as seen_own:
            want = own(*args)
        assert len(got) == 2  # q @ k^T and attn @ v
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert seen_merged.ops["aten.clone.default"] == 1 and seen_own.ops["aten.clone.default"] == 3
        codes.append(own.code)
    assert codes[0] == codes[1]


@pytest.mark.parametrize("times, merged", [((20.0, 10.0), False), ((10.1, 10.0), True)], ids=["own-faster", "tie"])
def test_the_measured_choice_is_kept_and_noted(times, merged, monkeypatch):
    """On CUDA the pass times the region both ways: the matmuls keep their own copies only when those measure faster
    by more than MARGIN, and a note gives both times (the timing itself is replaced here; the CUDA test runs it)."""
    from fxopt.passes import operand_copies

    monkeypatch.setattr(operand_copies, "_measured", lambda *a: times)
    model = _Attention(64, 4).eval()
    x = torch.randn(2, 10, 64)
    opt, record = _only_this_pass(model, x)
    assert record.changes == ({"copies_merged": 1} if merged else {"kept_by_measurement": 1})
    assert record.notes == [f"merge_operand_copies: permute: one copy {times[0]:.1f} µs a call against the matmuls' "
                            f"own copies {times[1]:.1f} µs: {'merged' if merged else 'kept their own'}"]
    assert _clones(opt, x) == (2 if merged else 4)
    torch.testing.assert_close(opt(x), model(x))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(32 * 64, 49, 96, 3), (32, 197, 384, 6)], ids=["swin-b32", "deit-b32"])
def test_on_cuda_each_shape_is_measured(shape):
    """Swin-T's and DeiT-S's attention at batch 32 (as written): each region timed once, a note with both times, and
    the graph is what the note says."""
    B, N, C, H = shape
    model = _Attention(C, H).cuda().eval()
    x = torch.randn(B, N, C, device="cuda")
    opt, record = _only_this_pass(model, x)
    (message,) = [n for n in record.notes if "µs" in n]
    assert record.changes == ({"copies_merged": 1} if message.endswith("merged") else {"kept_by_measurement": 1})
    torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)
