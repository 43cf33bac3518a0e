"""fold_movements on CUDA (NOTE [Movement maps]): Swin's window partition and reverse as index maps of the row
kernels, against eager, with and without CUDA graphs. Run on the GPU machine: python -m pytest -m cuda."""

from __future__ import annotations

import pytest
import torch

import fxopt
from tests.passes.test_movement import WindowBlock, _copies_left

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shift", [0, 3])
def test_window_maps_on_cuda(shift, dtype):
    torch.manual_seed(0)
    model = WindowBlock(c=96, window=7, shift=shift).to("cuda", dtype).eval()
    x = torch.randn(2, 56, 56, 96, device="cuda", dtype=dtype)
    for graphs in (False, True):
        opt = fxopt.optimize(model, (x,), strict=True, cuda_graphs=graphs)
        assert {r.name: r for r in opt.records}["fold_movements"].changes.get("chains_folded") == 2
        assert _copies_left(opt.graph_module) == []
        with torch.no_grad():
            assert fxopt.verify.compare(opt(x), model(x)) is None
