#!/usr/bin/env python
"""Probe: nn.TransformerEncoderLayer at batch 1 as eager's one fused op (its fast path) against a hand-written
decomposition into the few ops fxopt would keep (in-projection GEMM, SDPA on strided views, out-projection GEMM,
add + LayerNorm, the feed-forward GEMMs), each timed as measure_latency times systems (call + synchronize, median).

Whether a decomposing pass could beat the fast path without CUDA graphs: benchmarks/NOTES.md, fifth session.

    python benchmarks/probe_encoder_layer.py [--iters 2000]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from fxopt import models
from fxopt.report.measure import measure_interleaved


def decomposed(layer: torch.nn.TransformerEncoderLayer):
    attn, h = layer.self_attn, layer.self_attn.num_heads
    e = attn.embed_dim
    in_w, in_b = attn.in_proj_weight, attn.in_proj_bias
    out_w, out_b = attn.out_proj.weight, attn.out_proj.bias
    n1, n2, l1, l2 = layer.norm1, layer.norm2, layer.linear1, layer.linear2
    eps = n1.eps
    l1_wt = l1.weight.t()

    def run(x):
        qkv = F.linear(x, in_w, in_b).unflatten(-1, (3, h, e // h)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)
        x1 = F.layer_norm(x + F.linear(a, out_w, out_b), (e,), n1.weight, n1.bias, eps)
        f = torch._addmm_activation(l1.bias, x1.flatten(0, -2), l1_wt).view(*x1.shape[:-1], -1)
        return F.layer_norm(x1 + F.linear(f, l2.weight, l2.bias), (e,), n2.weight, n2.bias, eps)

    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    model, (x,) = models.build_any("transformer_encoder", "cuda")
    layer = model.layer
    with torch.no_grad():
        want = layer(x)
        run = decomposed(layer)
        err = (run(x) - want).abs().max().item()
        fast = lambda x: torch._transformer_encoder_layer_fwd(  # noqa: E731
            x, layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.self_attn.in_proj_weight,
            layer.self_attn.in_proj_bias, layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias, False,
            layer.norm_first, layer.norm1.eps, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight,
            layer.norm2.bias, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias,
            None, None)
        err_fast = (fast(x) - want).abs().max().item()
    r = measure_interleaved({"eager layer(x)": layer, "fast-path op alone": fast, "decomposed": run}, [x],
                            torch.device("cuda"), iters=args.iters)
    print(f"input {tuple(x.shape)}; max abs error decomposed {err:.2e}, fast-path op {err_fast:.2e}")
    for name, p in r.items():
        print(f"  {name:22s} median {p['median_us']:8.1f} µs  min {p['min_us']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
