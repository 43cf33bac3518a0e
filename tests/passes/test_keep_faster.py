"""keep_faster_regions (opt-in): eager's ops put back where they time faster than the fused kernel."""

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.passes import keep_faster


class Block(nn.Module):
    """An elementwise chain and a LayerNorm with its residual add: one kernel each on the C++ backend."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x, r):
        h = torch.sigmoid(x) * 2 + 1
        return self.norm(h.view(4, 16) + r), torch.relu(x) - 0.5


def _args():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, generator=g), torch.randn(4, 16, generator=g)


def _fused(opt):
    return [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.fxopt.fused.default]


@pytest.mark.parametrize("eager_wins", [True, False])
def test_the_faster_side_is_kept_and_the_notes_say_why(monkeypatch, eager_wins):
    times = (10.0, 5.0) if eager_wins else (5.0, 10.0)  # (kernel, eager) µs
    monkeypatch.setattr(keep_faster, "_time_pair", lambda fused, eager, args: (fused(), eager(), times)[-1])
    model, args = Block().eval(), _args()
    base = fxopt.optimize(model, args, backend="cpp")
    opt = fxopt.optimize(model, args, backend="cpp", enable=["keep_faster_regions"])
    assert len(_fused(base)) >= 2
    assert not [r.name for r in opt.records if r.status == "rolled back"], opt.records
    assert any("rows" in n.args[0] for n in _fused(base))  # the row kernel's region is timed too
    assert len(_fused(opt)) == (0 if eager_wins else len(_fused(base)))
    for got, want in zip(opt(*args), model(*args)):
        torch.testing.assert_close(got, want)
    record = next(r for r in opt.records if r.name == "keep_faster_regions")
    assert record.changes["regions_timed"] == len(_fused(base))
    assert record.changes["eager_kept"] == (len(_fused(base)) if eager_wins else 0)
    word = "eager's ops kept" if eager_wins else "kept:"
    assert all(word in n for n in record.notes), record.notes


def test_real_timing_keeps_outputs_equal_either_way():
    """No stand-in: whatever the 2-core machine's timings decide, the result is eager's."""
    model, args = Block().eval(), _args()
    opt = fxopt.optimize(model, args, backend="cpp", enable=["keep_faster_regions"])
    for got, want in zip(opt(*args), model(*args)):
        torch.testing.assert_close(got, want)
    record = next(r for r in opt.records if r.name == "keep_faster_regions")
    assert record.changes["regions_timed"] >= 2 and len(record.notes) == record.changes["regions_timed"]


def test_it_is_opt_in_and_before_parallel_branches():
    from fxopt.passes import build_pipeline, pass_names

    assert "keep_faster_regions" not in pass_names()
    names = [p.name for p in build_pipeline(None, "auto", enable=["keep_faster_regions", "parallel_branches"])]
    assert names[-2:] == ["keep_faster_regions", "parallel_branches"]


def test_random_inputs_keep_the_recorded_layout():
    from fxopt.capture import capture
    from fxopt.runtime.probe import random_like

    x = torch.randn(4, 6).t()
    gm = capture(nn.ReLU(), (x,))
    (node,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    t = random_like(node)
    assert t.shape == x.shape and t.stride() == x.stride() and t.dtype == x.dtype
