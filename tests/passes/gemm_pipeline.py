"""The default pipeline on the CPU with CUDA's bias-in-the-tail rule (fuse_epilogues leaves the GEMMs before an
elementwise tail bias-free, as on a GPU), and given passes right after fuse_epilogues, where the opt-in GEMM passes
run: for their CPU tests (tests/passes/test_split_k.py, test_gemm_layout.py, tests/fuzz/test_gemm_passes_fuzz.py)."""

from __future__ import annotations

from fxopt.passes import Pass, default_pipeline
from fxopt.passes.epilogue import fuse_epilogues


def pipeline_with(*extra: Pass) -> list[Pass]:
    out = []
    for p in default_pipeline("cpp"):
        if p.name == "fuse_epilogues":
            out += [Pass(p.name, lambda gm: fuse_epilogues(gm, frozenset({"cpu", "cuda"}))), *extra]
        else:
            out.append(p)
    return out
