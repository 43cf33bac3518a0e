"""Programmatic edges into generated kernels in captured graphs (NOTE [Programmatic dependent launch];
runtime/cudagraph/pdl.py). Run on the GPU machine: python -m pytest -m cuda tests/gpu/test_pdl_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.models.decoder import build_step, greedy_generate
from fxopt.runtime.cudagraph import pdl

pytestmark = pytest.mark.cuda


def _hopper() -> bool:
    return torch.cuda.is_available() and pdl.supported(torch.cuda.current_device())


class Chain(nn.Module):
    """GEMM -> LayerNorm + sigmoid (a row kernel) -> exp + 1 over a view of it (an elementwise kernel, launched right
    after) -> GEMM: one edge generated -> generated, made programmatic; the GEMMs' edges stay full."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)
        self.norm = nn.LayerNorm(256)

    def forward(self, x):
        h = torch.sigmoid(self.norm(self.a(x))).view(8, 16, 16)
        return self.b((torch.exp(h) + 1).view(8, 256))


@pytest.mark.parametrize("programmatic", [True, False])
def test_the_graph_gets_programmatic_edges_and_replays_what_eager_computes(programmatic):
    torch.manual_seed(0)
    model = Chain().cuda().eval()
    x = torch.randn(8, 256, device="cuda")
    opt = fxopt.optimize(model, (x,), cuda_graphs=True, graph_options={"programmatic_launch": programmatic})
    with torch.no_grad():
        want = model(x)
        for _ in range(3):
            torch.testing.assert_close(opt(x), want, rtol=1e-4, atol=1e-5)
        for _ in range(20):  # fresh inputs every call: a kernel reading early would see the last call's values
            y = torch.randn(8, 256, device="cuda")
            torch.testing.assert_close(opt(y), model(y), rtol=1e-4, atol=1e-5)
    (entry,) = opt.graph_entries
    assert entry.captured, opt.graph_report()
    kernels = [n.args[0] for n in opt.graph_module.graph.nodes if n.target is torch.ops.fxopt.fused.default]
    if programmatic and _hopper():
        assert entry.programmatic_edges >= 1, (kernels, opt.graph_report())
    else:
        assert entry.programmatic_edges == 0
    assert "programmatic edges" in opt.graph_report()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_decoding_with_programmatic_edges_gives_eagers_tokens():
    steps = [build_step("plain", "small", torch.float32, "cuda") for _ in range(2)]
    ids, pos = torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda")
    opt = fxopt.optimize(steps[0], (ids, pos), cuda_graphs=True)
    assert greedy_generate(opt, ids, 0, 48) == greedy_generate(steps[1], ids, 0, 48)
    (entry,) = opt.graph_entries
    if _hopper():
        assert entry.programmatic_edges > 0, opt.graph_report()
