"""The opt-in GEMM passes (gemm_weight_layouts, split_k_linears, tf32x3_linears in either form) on the fuzz
generator's random models with Linears:
on the CPU, every candidate rewritten (bounds lowered, a stand-in timer that always prefers the rewrite, each layout
direction), strict, and compared on new inputs with the same pipeline without them (CUDA's bias-in-the-tail rule in
both). A wider campaign of this kind (1200 seeds, 390 models with Linears) found the chained-Linear bug that
test_gemm_layout.py's regression test holds."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.passes import Pass, gemm_layout, split_k, tf32x3
from tests.fuzz import model_generator as gen
from tests.passes.gemm_pipeline import pipeline_with

BASE = 20261207
MODELS = 8  # models with a Linear, from BASE on


def _pipeline(layout_timer=None, split_timer=None, tf32_timer=None):
    extra = []
    if tf32_timer is not None:
        extra.append(Pass("tf32x3_linears", tf32x3.Tf32x3Linears(graphs_only=False, devices=("cpu",),
                                                                  timer=tf32_timer)))
    if layout_timer is not None:
        extra.append(Pass("gemm_weight_layouts", gemm_layout.GemmWeightLayouts(graphs_only=False, devices=("cpu",),
                                                                               timer=layout_timer)))
    if split_timer is not None:
        extra.append(Pass("split_k_linears", split_k.SplitKLinears(graphs_only=False, devices=("cpu",),
                                                                   timer=split_timer)))
    return pipeline_with(*extra)


def _max_diff(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().nan_to_num(0.0, 0.0, 0.0).max().item() if a.numel() else 0.0
    return max([_max_diff(x, y) for x, y in zip(a, b)] + [0.0])


def _seeds_with_linears():
    seeds, seed = [], BASE
    while len(seeds) < MODELS:
        if "inear" in gen.generate(seed, max_nodes=12)[2]:
            seeds.append(seed)
        seed += 1
    return seeds


@pytest.mark.parametrize("seed", _seeds_with_linears())
def test_forced_rewrites_keep_the_pipelines_results(seed, monkeypatch):
    monkeypatch.setattr(split_k, "MIN_K", 1)
    monkeypatch.setattr(gemm_layout, "MIN_ROWS", 1)
    model, inputs, desc = gen.generate(seed, max_nodes=12)
    split = lambda d, M, K, N, dt: (10.0, *[1.0 for _ in split_k._splits(K, dt)])  # noqa: E731
    base = fxopt.optimize(model, inputs, passes=_pipeline())
    to_kn, to_nk = (lambda *a: (10.0, 1.0)), (lambda *a: (1.0, 10.0))
    side = lambda *a: (10.0, 1.0) + ((10.0, 5.0) if a[-1] else ())  # noqa: E731
    stacked = lambda *a: (10.0, 5.0) + ((10.0, 1.0) if a[-1] else ())  # noqa: E731
    # every GEMM to the other layout (F.linear -> addmm/mm, or addmm/mm -> F.linear) then split; or every float32
    # GEMM to 3xTF32, stacked where the tail can add the products or side by side everywhere
    for timers in ((to_kn, split, None), (to_nk, split, None), (None, None, side), (None, None, stacked)):
        opt = fxopt.optimize(model, inputs, passes=_pipeline(*timers), strict=True)
        for k in range(2):
            fresh = gen.fresh_inputs(model, inputs, seed * 10 + k)
            with torch.no_grad():
                want = model(*fresh)
                mine, theirs = _max_diff(opt(*fresh), want), _max_diff(base(*fresh), want)
            assert mine <= 2 * theirs + 1e-5, f"{desc}\nerror {mine} against the pipeline's {theirs}"
