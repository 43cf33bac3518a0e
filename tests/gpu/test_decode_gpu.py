"""Autoregressive decoding with CUDA graphs (issue 19; run on the GPU machine: python -m pytest -m cuda tests/gpu).

The CPU twins are in tests/test_decode.py. One CUDA graph replays every decode step: the position is an input, the
KV cache the caller's own tensors, written in place by the replay.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxopt
from fxopt.models.decoder import build_step, greedy_generate
from fxopt.verify import compare

pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

DEV = "cuda"
MODELS = ["plain", "transformers"]


def _build(model: str, dtype: torch.dtype):
    if model == "transformers":
        pytest.importorskip("transformers")
    return build_step(model, "small", dtype, DEV)


def _optimize(step, **kwargs):
    ids, pos = torch.tensor([[3]], device=DEV), torch.tensor([0], device=DEV)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = fxopt.optimize(step, (ids, pos), **kwargs)
    messages = [str(w.message) for w in record if str(w.message).startswith("fxopt:")]
    assert opt.unoptimized_reason is None and not messages, messages
    return opt, ids


def _logits_along(step, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced: the logits of each step fed ``tokens`` (so every system sees the same inputs), float32."""
    out = []
    positions = torch.arange(len(tokens), device=DEV)
    ids = torch.tensor(tokens, device=DEV).view(-1, 1, 1)
    with torch.no_grad():
        for t in range(len(tokens)):
            out.append(step(ids[t], positions[t:t + 1]).float().clone())
    return torch.cat(out)


@pytest.mark.parametrize("model", MODELS)
def test_cuda_graph_decode_matches_eager_and_writes_the_callers_cache(model):
    step, eager = _build(model, torch.float32), _build(model, torch.float32)
    opt, ids = _optimize(step, cuda_graphs=True)
    assert not any(t.any() for t in step.kv_buffers()), "optimizing left writes in the caller's cache"
    tokens = greedy_generate(opt, ids, 0, 64)
    assert tokens == greedy_generate(eager, ids, 0, 64)
    entries = opt.graph_entries
    assert any(e.captured for e in entries), opt.graph_report()
    assert sum(e.replays or 0 for e in entries) >= 60, opt.graph_report()
    for a, e in zip(step.kv_buffers(), eager.kv_buffers(), strict=True):
        assert compare(a, e) is None
        assert a[:, :, :64].abs().amax(-1).gt(0).all() and not a[:, :, 64:].any()


@pytest.mark.parametrize("model", MODELS)
def test_cuda_graph_decode_after_a_reset_of_the_callers_cache(model):
    step, eager = _build(model, torch.float32), _build(model, torch.float32)
    opt, ids = _optimize(step, cuda_graphs=True)
    greedy_generate(opt, ids, 0, 8)
    for m in (step, eager):
        m.reset_cache()
    first = torch.tensor([[7]], device=DEV)
    assert greedy_generate(opt, first, 0, 16) == greedy_generate(eager, first, 0, 16)


@pytest.mark.parametrize("model", MODELS)
def test_bf16_logits_within_torch_compiles_difference(model):
    """bf16 rounds differently in every fused kernel: fxopt's logits may differ from eager's as much as
    torch.compile's do (or by two bf16 ulps of the logits' size, where compile happens to match closely)."""
    steps = {name: _build(model, torch.bfloat16) for name in ("eager", "fxopt", "compile")}
    opt, ids = _optimize(steps["fxopt"], cuda_graphs=True)
    compiled = torch.compile(steps["compile"], mode="reduce-overhead", fullgraph=True)
    tokens = [3, *greedy_generate(steps["eager"], ids, 0, 31)]
    steps["eager"].reset_cache()
    want = _logits_along(steps["eager"], tokens)
    fx_diff = (_logits_along(opt, tokens) - want).abs().max().item()
    compile_diff = (_logits_along(compiled, tokens) - want).abs().max().item()
    floor = 2 ** -7 * want.abs().max().item()
    assert fx_diff <= max(compile_diff, floor), (fx_diff, compile_diff, floor)


def test_a_growing_cache_with_cuda_graphs_runs_unoptimized_and_decodes_as_eager():
    """A DynamicCache step runs unoptimized (tests/test_decode.py); with cuda_graphs=True the runner still wraps the
    module, and a graph replay of eager's step would attend over the cache as it was at capture time. The decode
    must match eager's all the same (the graph's check replay, or no capture at all)."""
    transformers = pytest.importorskip("transformers")
    from fxopt.models.decoder import PRESETS, TransformersStep, llama_config

    def step():
        torch.manual_seed(0)
        config = llama_config(PRESETS["small"])
        model = transformers.LlamaForCausalLM(config).eval().to(DEV)
        return TransformersStep(model, transformers.DynamicCache(config=config))

    s, eager = step(), step()
    ids = torch.tensor([[3]], device=DEV)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fxopt.optimize(s, (ids, torch.tensor([0], device=DEV)), cuda_graphs=True)
        assert opt.unoptimized_reason is not None
        assert greedy_generate(opt, ids, 0, 32) == greedy_generate(eager, ids, 0, 32), opt.graph_report()
    assert s.cache.get_seq_length() == eager.cache.get_seq_length() == 32
    assert not any(e.captured for e in opt.graph_entries), opt.graph_report()
