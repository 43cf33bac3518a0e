"""keep_faster_regions on CUDA (opt-in; run on the GPU machine: python -m pytest -m cuda tests/gpu)."""

import pytest
import torch

import fxopt
from fxopt.models.decoder import build_step, greedy_generate

pytestmark = pytest.mark.cuda


def test_every_region_of_a_decoder_step_is_timed_and_the_tokens_stay_eagers():
    step, eager = (build_step("plain", "small", torch.float32, "cuda") for _ in range(2))
    ids, pos = torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda")
    opt = fxopt.optimize(step, (ids, pos), enable=["keep_faster_regions"])
    record = next(r for r in opt.records if r.name == "keep_faster_regions")
    fused = [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.fxopt.fused.default]
    assert record.changes["regions_timed"] >= 4, record.notes  # rotary, SiLU-mul and the row kernels at least
    assert len(fused) >= record.changes["regions_timed"] - record.changes["eager_kept"]
    assert sum("µs" in n for n in record.notes) == record.changes["regions_timed"], record.notes
    assert greedy_generate(opt, ids, 0, 16) == greedy_generate(eager, ids, 0, 16)
