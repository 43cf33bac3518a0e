"""Session 13: tf32x3_convolutions forced on the fuzz generator's models with convolutions, strict, against the
pipeline without it (the CPU's conv_tf32 is float32: the rewrite's shapes, groups, spellings and layouts, exactly).
Usage: fuzz_tf32_conv.py FIRST COUNT [FORM]: FORM (NCHW or channels-last, default NCHW) the one the stand-in timer
makes fastest."""
import sys

import torch

import fxopt
from fxopt.passes import Pass
from fxopt.passes.tf32x3 import Tf32x3Convolutions
from tests.fuzz import model_generator as gen
from tests.fuzz.test_gemm_passes_fuzz import _max_diff
from tests.passes.gemm_pipeline import pipeline_with

from fxopt.passes import tf32x3
tf32x3.CONV_MIN_GROUP_CHANNELS = 1  # every float32 convolution, depthwise too
first, count = int(sys.argv[1]), int(sys.argv[2])
form = sys.argv[3] if len(sys.argv) > 3 else "NCHW"
times = {"float32": 10.0, "NCHW": 2.0 if form == "NCHW" else 3.0, "channels-last": 2.0 if form != "NCHW" else 3.0}
errors = {"float32": 1e-7, "NCHW": 1e-7, "channels-last": 1e-7}
n = rewrites = 0
conv_pass = Pass("tf32x3_convolutions", Tf32x3Convolutions(graphs_only=False, devices=("cpu",),
                                                           timer=lambda d, c: (times, errors)))
for seed in range(first, first + count):
    model, inputs, desc = gen.generate(seed, max_nodes=12)
    if "onv" not in desc:
        continue
    n += 1
    try:
        base = fxopt.optimize(model, inputs, passes=pipeline_with())
        opt = fxopt.optimize(model, inputs, passes=pipeline_with(conv_pass), strict=True)
        r = [r for r in opt.records if r.name == "tf32x3_convolutions"][0]
        rewrites += r.changes.get("convolutions", 0)
        assert r.changes.get("convolutions", 0) == r.changes.get("channels_last", 0) or form == "NCHW", r.changes
        for k in range(2):
            fresh = gen.fresh_inputs(model, inputs, seed * 10 + k)
            with torch.no_grad():
                want = model(*fresh)
                mine, theirs = _max_diff(opt(*fresh), want), _max_diff(base(*fresh), want)
            assert mine <= 2 * theirs + 1e-5, f"error {mine} against {theirs}"
    except Exception as e:
        print("FAIL", seed, type(e).__name__, str(e)[:300], "\n", desc, flush=True)
print(f"seeds {first}..{first+count-1}, {form}: {n} models with convolutions, {rewrites} rewrites", flush=True)
