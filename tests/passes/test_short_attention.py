"""short_query_attention (NOTE [Short-query attention], fxopt/passes/short_attention.py) and its kernels
(fxopt/codegen/attention.py): the C++ twin runs the CUDA kernel's algorithm (tiles, online softmax, splits and their
merge) on the CPU against eager's SDPA; the CUDA source compiles with NVRTC; on a GPU, the kernel against SDPA and
the decoder's tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.codegen.attention import FLASH_ROWS, TC_WARPS, THREADS, AttentionProgram, cuda_source, max_rows
from fxopt.models.decoder import build_step, greedy_generate
from fxopt.passes import Pass, default_pipeline
from fxopt.passes.short_attention import short_query_attention
from fxopt.runtime import nvrtc
from fxopt.runtime.attention import attention_kernel

CPU = torch.device("cpu")
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _reference(q, k, v, mask, scale=None, causal=False):
    """Eager's SDPA in float64 on repeated KV heads (what enable_gqa means)."""
    G = q.shape[1] // k.shape[1]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(G, 1),
                                          v.double().repeat_interleave(G, 1), attn_mask=mask, scale=scale,
                                          is_causal=causal)


def _run(q, k, v, mask, *, chunk=None, scale=None, order=(0, 1, 2, 3), backend="cpp", device=CPU, tile=None,
         causal=False, flash=False, warps=0):
    """The attend kernel (``chunk`` None) or partial + combine; ``tile``: query rows a block, in tiles; ``flash``:
    the flash kernel in tiles of ``tile`` rows; ``warps``: the tensor-core kernel (tiles of 16)."""
    D = q.shape[-1]
    kw = dict(dtype=q.dtype, head_dim=D, scale=D ** -0.5 if scale is None else scale,
              rows=tile or q.shape[1] // k.shape[1] * q.shape[2], query_tiles=tile is not None, causal=causal,
              mask="none" if mask is None else "bool" if mask.dtype == torch.bool else "float",
              mask_dtype=None if mask is None else mask.dtype, device=str(device) if backend == "cuda" else "")
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    if chunk is None:
        return attention_kernel(AttentionProgram("attend", backend, out_order=order, flash=flash, warps=warps,
                                                 **kw), device)(inputs)[0]
    part = attention_kernel(AttentionProgram("partial", backend, chunk=chunk, **kw), device)(inputs)[0]
    assert part.shape[4] == math.ceil(k.shape[2] / chunk)
    return attention_kernel(AttentionProgram("combine", backend, out_order=order,
                                             **{**kw, "scale": 0.0, "rows": 1, "query_tiles": False}),
                            device)([part])[0]


CASES = [  # B, Hk, G, Lq, L, D, mask shape (None: no mask; "bool:" prefix: a bool mask)
    (1, 4, 3, 1, 256, 64, (1, 1, 1, 256)),
    (2, 2, 1, 3, 300, 32, "bool:2,1,3,300"),
    (1, 1, 1, 1, 5, 256, None),
    (1, 8, 2, 1, 1000, 96, (1, 16, 1, 1000)),
    (3, 1, 16, 1, 129, 8, (1, 129)),  # mask of rank 2: broadcast over batch, heads and rows
    (1, 2, 1, 2, 1, 16, None),
]


def _case(B, Hk, G, Lq, L, D, mask_spec, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hk * G, Lq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hk, L, D, generator=gen).to(dtype)
    v = torch.randn(B, Hk, L, D, generator=gen).to(dtype)
    mask = None
    if isinstance(mask_spec, str):
        shape = tuple(int(s) for s in mask_spec.split(":")[1].split(","))
        mask = torch.rand(shape, generator=gen) < 0.7
        mask[..., 0] = True  # every row attends somewhere
    elif mask_spec is not None:
        mask = (torch.randn(mask_spec, generator=gen) * 2).to(dtype)
        mask[..., L // 2:] = float("-inf") if L > 1 else 0.0
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])))
@pytest.mark.parametrize("chunk", [None, THREADS, 64], ids=["attend", "split", "split-short"])
def test_the_kernels_compute_eagers_attention(case, dtype, chunk):
    q, k, v, mask = _case(*case, dtype, seed=sum(case[:6]))
    got = _run(q, k, v, mask, chunk=chunk)
    want = _reference(q, k, v, mask)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


TILED = [  # B, Hk, G, Lq, L, D, mask, causal: more query rows per KV head than one block holds
    (1, 3, 1, 37, 37, 32, None, False),
    (2, 2, 2, 20, 20, 16, None, True),  # tiles across the two query heads of a KV head
    (2, 1, 3, 11, 20, 16, "bool:2,1,11,20", False),
    (1, 2, 1, 19, 300, 64, (1, 1, 1, 300), False),  # keys over two tiles of THREADS
    (1, 1, 1, 40, 24, 8, None, True),  # causal with more queries than keys: SDPA's top-left triangle
]


@pytest.mark.parametrize("case", TILED, ids=lambda c: "x".join(map(str, c[:6])) + ("-causal" if c[7] else ""))
@pytest.mark.parametrize("tile, chunk", [(None, None), (8, None), (8, 64)], ids=["whole", "tiles8", "tiles8-split"])
def test_long_queries_in_tiles_and_causal_attention(case, tile, chunk):
    """NOTE [Attention in query tiles] through the C++ twin (which walks every row whatever the tile: the CUDA
    kernel's tiles are emulated in tests/codegen/test_attention_emulation.py): the launch takes any number of rows
    when tiled, and is_causal matches eager's."""
    dtype = torch.float32
    *dims, causal = case
    q, k, v, mask = _case(*dims, dtype, seed=sum(case[:6]))
    rows = dims[2] * dims[3]
    if tile is None and rows > max_rows(dims[5]):
        pytest.skip("more rows than one block holds: tiles only")
    got = _run(q, k, v, mask, chunk=chunk, tile=tile, causal=causal)
    torch.testing.assert_close(got.double(), _reference(q, k, v, mask, causal=causal), atol=TOL[dtype],
                               rtol=TOL[dtype])


def test_strided_inputs_an_explicit_scale_and_the_output_order():
    """q as a slice of a merged projection, k and v transposed views, a mask expanded over heads: read at their
    strides, no copies; the output laid out in the order asked for (eager's flash layout)."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 5, 3, 4, 32, generator=gen)  # [B, Lq, (q, k, v), H, D]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, Lq, D], strided
    mask = torch.randn(1, 1, 5, 5, generator=gen).expand(2, 4, 5, 5)
    got = _run(q, k, v, mask, scale=0.3, order=(0, 2, 1, 3))
    assert got.stride() == (5 * 4 * 32, 32, 4 * 32, 1)
    torch.testing.assert_close(got.double(), _reference(q, k, v, mask, scale=0.3), atol=2e-5, rtol=2e-5)


def test_a_fully_masked_tile_does_not_poison_the_row():
    """The first tile of keys is masked out entirely (exp(-inf - -inf) would be NaN): the online softmax skips it."""
    q, k, v, _ = _case(1, 1, 1, 1, 3 * THREADS, 16, None, torch.float32, seed=1)
    mask = torch.zeros(1, 1, 1, 3 * THREADS)
    mask[..., :THREADS + 7] = float("-inf")
    for chunk in (None, THREADS):
        got = _run(q, k, v, mask, chunk=chunk)
        assert not got.isnan().any()
        torch.testing.assert_close(got.double(), _reference(q, k, v, mask), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v, m: (q[..., :16], k, v, m), "head dims"),
    (lambda q, k, v, m: (q, k[:, :, :7], v, m), "do not share batch"),
    (lambda q, k, v, m: (torch.cat([q] * 2, 2), k, v, m), "built for 3"),
    (lambda q, k, v, m: (q, k, v, torch.zeros(1, 1, 1, 5)), "does not broadcast"),
    (lambda q, k, v, m: (q, k, v, m.double()), "dtype"),
])
def test_inputs_the_kernel_was_not_built_for_are_refused_before_launch(bad, match):
    q, k, v, mask = _case(1, 2, 3, 1, 9, 32, (1, 1, 1, 9), torch.float32, seed=2)
    kernel = attention_kernel(AttentionProgram("attend", "cpp", torch.float32, 32, 32 ** -0.5, "float",
                                               torch.float32, rows=3), CPU)
    with pytest.raises((ValueError, TypeError), match=match):
        kernel(list(bad(q, k, v, mask)))


def _pipeline(**options):
    return [Pass(p.name, short_query_attention("cpp", cpu=True, **options)) if p.name == "short_query_attention"
            else p for p in default_pipeline("cpp")]


def _attention_kernels(opt):
    return [str(n.args[0]) for n in opt.graph_module.graph.nodes
            if n.op == "call_function" and str(n.target) == "fxopt.fused.default"
            and str(n.args[0]).startswith("fxopt_attention_")]


@pytest.mark.parametrize("chunk", [None, 64], ids=["attend", "split"])
def test_the_decoder_decodes_eagers_tokens_through_the_kernel(chunk):
    """The plain decoder (3 query rows per KV head, a static cache, a float mask): every layer's SDPA becomes the
    kernel (two with splits), and 16 greedy tokens equal eager's, with the caches written as eager's."""
    step, eager = (build_step("plain", "small", torch.float32, "cpu") for _ in range(2))
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    opt = fxopt.optimize(step, (ids, pos), passes=_pipeline(chunk=chunk), strict=True)
    record = next(r for r in opt.records if r.name == "short_query_attention")
    layers = len(step.layers)
    assert record.changes["calls"] == layers
    assert len(_attention_kernels(opt)) == layers * (1 if chunk is None else 2)
    assert "scaled_dot_product_attention" not in opt.graph_module.code
    assert greedy_generate(opt, ids, 0, 16) == greedy_generate(eager, ids, 0, 16)


def test_the_default_pipeline_leaves_cpu_attention_to_aten():
    step = build_step("plain", "small", torch.float32, "cpu")
    opt = fxopt.optimize(step, (torch.tensor([[3]]), torch.tensor([0])), backend="cpp")
    assert not _attention_kernels(opt)
    assert next(r for r in opt.records if r.name == "short_query_attention").status == "unchanged"


class _Attention(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs) * 2


@pytest.mark.parametrize("kwargs, q_len, options, why", [
    ({"is_causal": True}, 1, {}, "rewritten"),
    ({"is_causal": True}, 40, {}, "tiled"),  # long queries: tiles of rows (NOTE [Attention in query tiles])
    ({"scale": 0.5, "enable_gqa": True}, 40, {}, "tiled"),
    ({}, 40, {"tiles": False}, None),  # without tiles, long queries are the library kernels' case, without a note
    ({"scale": 0.5, "enable_gqa": True}, 2, {}, "rewritten"),
])
def test_what_it_takes_and_what_it_leaves(kwargs, q_len, options, why):
    q, k, v = torch.randn(1, 4, q_len, 16), torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)
    if not kwargs.get("enable_gqa"):
        k, v = k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)
    model = _Attention(**kwargs).eval()
    opt = fxopt.optimize(model, (q, k, v), passes=_pipeline(**options), strict=True)
    record = next(r for r in opt.records if r.name == "short_query_attention")
    if why in ("rewritten", "tiled"):
        assert record.changes == {"calls": 1, "split": 0, "tiled": int(why == "tiled"), "flash": 0,
                                  "tensor_cores": 0} and _attention_kernels(opt)
    else:
        assert not _attention_kernels(opt)
        assert any(why in n for n in record.notes) if why else not record.notes
    torch.testing.assert_close(opt(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-5)


def test_an_optimized_module_with_the_kernel_saves_and_loads(tmp_path):
    step, eager = (build_step("plain", "small", torch.float32, "cpu") for _ in range(2))
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    opt = fxopt.optimize(step, (ids, pos), passes=_pipeline(chunk=64), strict=True)
    fxopt.save(opt, tmp_path / "step")
    manifest = (tmp_path / "step" / "manifest.json").read_text()
    assert '"kind": "attention"' in manifest
    loaded = fxopt.load(tmp_path / "step")
    torch.testing.assert_close(loaded(ids, pos), eager(ids, pos), atol=1e-5, rtol=1e-5)


NVRTC_OK, NVRTC_WHY = nvrtc.nvrtc_available()


@pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC is not available ({NVRTC_WHY})")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_flash_source_compiles_with_nvrtc(dtype):
    """NOTE [Flash tiles for long queries]: every tile size, head dims with vector and scalar reads, masks, causal."""
    configs = ((64, "float", False), (128, "bool", True), (80, "none", True), (32, "none", False))
    for i, rows in enumerate(FLASH_ROWS):  # each tile size with two of the head dim / mask / causal configurations
        for head_dim, mask, causal in (configs[i % 4], configs[(i + 1 + (dtype == torch.float16)) % 4]):
            mask_dtype = None if mask == "none" else torch.bool if mask == "bool" else dtype
            program = AttentionProgram("attend", "cuda", dtype, head_dim, head_dim ** -0.5, mask, mask_dtype,
                                       device="cuda:0", rows=rows, query_tiles=True, flash=True, causal=causal)
            assert program.threads == 16 * rows // (4 if rows >= 32 else 2)
            assert program.name.encode() in nvrtc.compile_cuda(cuda_source(program), arch="sm_90",
                                                               name_hint=program.name)


@pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC is not available ({NVRTC_WHY})")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("warps", TC_WARPS)
def test_the_tensor_core_source_compiles_with_nvrtc(dtype, warps):
    """NOTE [Tensor-core tiles for short sequences]: mma.sync for both 16-bit types, head dims, masks, causal."""
    for head_dim, mask, causal in ((64, "float", False), (128 if warps == 4 else 32, "bool", True), (16, "none", False)):
        mask_dtype = None if mask == "none" else torch.bool if mask == "bool" else dtype
        program = AttentionProgram("attend", "cuda", dtype, head_dim, head_dim ** -0.5, mask, mask_dtype,
                                   device="cuda:0", rows=16, query_tiles=True, warps=warps, causal=causal)
        assert program.threads == 32 * warps
        assert program.name.encode() in nvrtc.compile_cuda(cuda_source(program), arch="sm_90",
                                                           name_hint=program.name)


def test_a_tensor_core_program_is_a_16_bit_attend_kernel_in_tiles_of_16():
    common = dict(backend="cuda", scale=0.125, device="cuda:0", query_tiles=True, warps=4, rows=16)
    for bad in (dict(dtype=torch.float32, head_dim=64), dict(dtype=torch.float16, head_dim=72),
                dict(dtype=torch.float16, head_dim=256), dict(dtype=torch.float16, head_dim=64, rows=8),
                dict(dtype=torch.float16, head_dim=128, warps=8), dict(dtype=torch.float16, head_dim=64, flash=True),
                dict(dtype=torch.float16, head_dim=64, backend="cpp", device="")):
        with pytest.raises(ValueError, match="tensor-core tiles"):
            AttentionProgram("attend", **{**common, **bad})
    program = AttentionProgram("attend", dtype=torch.bfloat16, head_dim=64, **common)
    assert AttentionProgram.from_json(program.to_json()) == program
    assert program.name != AttentionProgram("attend", dtype=torch.bfloat16, head_dim=64, **{**common, "warps": 8}).name


def test_the_flash_candidates_are_in_the_default_pass():
    """NOTE [Flash tiles for long queries]: the default short_query_attention times the flash kernel's tiles beside
    the others (promoted after the GPU run of 2026-12-07); it is no longer a pass of its own."""
    from fxopt.passes import build_pipeline, optional_passes

    (sqa,) = [p for p in build_pipeline(None, "cuda") if p.name == "short_query_attention"]
    assert sqa.fn.flash is True
    assert "flash_attention" not in [p.name for p in optional_passes("cuda")]
    with pytest.raises(ValueError, match="not an opt-in pass"):
        build_pipeline(None, "cuda", enable=["flash_attention"])


def test_the_tensor_core_candidates_are_opt_in():
    """NOTE [Tensor-core tiles for short sequences]: not in the default pass until a GPU run has measured them; the
    opt-in tensor_core_attention runs them before the default short_query_attention."""
    from fxopt.passes import build_pipeline

    default = build_pipeline(None, "cuda")
    (sqa,) = [p for p in default if p.name == "short_query_attention"]
    assert sqa.fn.tensor_cores is False and "tensor_core_attention" not in [p.name for p in default]
    names = [p.name for p in build_pipeline(None, "cuda", enable=["tensor_core_attention"])]
    assert names.index("hoist_attention_masks") + 1 == names.index("tensor_core_attention") < \
        names.index("short_query_attention")
    (tca,) = [p for p in build_pipeline(None, "cuda", enable=["tensor_core_attention"])
              if p.name == "tensor_core_attention"]
    assert tca.fn.tensor_cores is True and tca.fn.flash is True


def test_a_flash_program_is_an_attend_kernel_in_query_tiles():
    common = dict(backend="cuda", dtype=torch.float32, scale=0.125, device="cuda:0", flash=True)
    with pytest.raises(ValueError, match="flash tiles"):
        AttentionProgram("attend", head_dim=64, rows=16, query_tiles=False, **common)
    with pytest.raises(ValueError, match="flash tiles"):
        AttentionProgram("attend", head_dim=64, rows=12, query_tiles=True, **common)
    with pytest.raises(ValueError, match="flash tiles"):
        AttentionProgram("attend", head_dim=256, rows=16, query_tiles=True, **common)
    program = AttentionProgram("attend", head_dim=64, rows=32, query_tiles=True, **common)
    assert AttentionProgram.from_json(program.to_json()) == program
    assert program.name != AttentionProgram("attend", head_dim=64, rows=16, query_tiles=True,
                                            **{**common, "flash": False}).name


@pytest.mark.skipif(not NVRTC_OK, reason=f"NVRTC is not available ({NVRTC_WHY})")
@pytest.mark.parametrize("kind", ["attend", "partial", "combine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_cuda_source_compiles_with_nvrtc(kind, dtype):
    for head_dim, mask in ((64, "float"), (128, "bool"), (256, "none"), (80, "float")):
        mask_dtype = None if mask == "none" else torch.bool if mask == "bool" else dtype
        program = AttentionProgram(kind, "cuda", dtype, head_dim, head_dim ** -0.5, mask, mask_dtype, chunk=256,
                                   device="cuda:0", rows=3)
        assert program.name.encode() in nvrtc.compile_cuda(cuda_source(program), arch="sm_90",
                                                           name_hint=program.name)


# -- on a GPU --------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])))
@pytest.mark.parametrize("chunk", [None, THREADS, 128], ids=["attend", "split", "split-short"])
def test_on_cuda_the_kernels_compute_eagers_attention(case, dtype, chunk):
    q, k, v, mask = (None if t is None else t.cuda() for t in _case(*case, dtype, seed=sum(case[:6])))
    got = _run(q, k, v, mask, chunk=chunk, backend="cuda", device=torch.device("cuda", torch.cuda.current_device()))
    want = _reference(q, k, v, mask)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("forced", [False, True], ids=["measured", "forced"])
def test_on_cuda_the_decoder_decodes_eagers_tokens(dtype, forced, monkeypatch):
    """Each layer's SDPA is timed against the kernel's candidates (a note with the times); forced (MIN_GAIN
    raised), every layer runs the fastest candidate inside the CUDA graph, and the tokens stay eager's."""
    from fxopt.passes import short_attention

    if forced:
        monkeypatch.setattr(short_attention, "MIN_GAIN", 1e9)
    step, eager = (build_step("plain", "small", dtype, "cuda") for _ in range(2))
    ids, pos = torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda")
    opt = fxopt.optimize(step, (ids, pos), cuda_graphs=True)
    record = next(r for r in opt.records if r.name == "short_query_attention")
    assert sum("µs" in n for n in record.notes) == len(step.layers), record.notes
    if forced:  # the faster candidate: whole (one kernel a layer) or split by 128 keys (two)
        assert len(_attention_kernels(opt)) in (len(step.layers), 2 * len(step.layers))
        assert "scaled_dot_product_attention" not in opt.graph_module.code
    got, want = greedy_generate(opt, ids, 0, 16), greedy_generate(eager, ids, 0, 16)
    if dtype == torch.float32:
        assert got == want
    else:  # bf16: the first tokens agree (later ones may part where eager's own rounding decides)
        assert got[:4] == want[:4]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", TILED, ids=lambda c: "x".join(map(str, c[:6])) + ("-causal" if c[7] else ""))
@pytest.mark.parametrize("tile, chunk", [(16, None), (8, None), (8, 64)], ids=["tiles16", "tiles8", "tiles8-split"])
def test_on_cuda_long_queries_in_tiles_and_causal_attention(case, dtype, tile, chunk):
    *dims, causal = case
    q, k, v, mask = (None if t is None else t.cuda() for t in _case(*dims, dtype, seed=sum(case[:6])))
    got = _run(q, k, v, mask, chunk=chunk, tile=tile, causal=causal, backend="cuda",
               device=torch.device("cuda", torch.cuda.current_device()))
    torch.testing.assert_close(got.double(), _reference(q, k, v, mask, causal=causal), atol=TOL[dtype],
                               rtol=TOL[dtype])


# the tiled cases, DeiT's 197 tokens and Swin's windows with a bias mask
DEVICE_TILED = TILED + [(1, 6, 1, 197, 197, 64, None, False), (2, 3, 1, 49, 49, 32, (2, 3, 49, 49), False)]


def _tiles_on_cuda_match_eager(case, dtype, **kernel):
    *dims, causal = case
    q, k, v, mask = (None if t is None else t.cuda() for t in _case(*dims, dtype, seed=sum(case[:6])))
    got = _run(q, k, v, mask, causal=causal, backend="cuda", device=torch.device("cuda", torch.cuda.current_device()),
               **kernel)
    torch.testing.assert_close(got.double(), _reference(q, k, v, mask, causal=causal), atol=TOL[dtype],
                               rtol=TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", DEVICE_TILED, ids=lambda c: "x".join(map(str, c[:6])) + ("-causal" if c[7] else ""))
@pytest.mark.parametrize("tile", FLASH_ROWS, ids=lambda r: f"flash{r}")
def test_on_cuda_the_flash_kernel_computes_eagers_attention(case, dtype, tile):
    """NOTE [Flash tiles for long queries] on the device: DeiT's 197 tokens, Swin's windows with a bias mask, the
    tiled cases."""
    _tiles_on_cuda_match_eager(case, dtype, tile=tile, flash=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DEVICE_TILED, ids=lambda c: "x".join(map(str, c[:6])) + ("-causal" if c[7] else ""))
@pytest.mark.parametrize("warps", TC_WARPS, ids=lambda w: f"warps{w}")
def test_on_cuda_the_tensor_core_kernel_computes_eagers_attention(case, dtype, warps):
    """NOTE [Tensor-core tiles for short sequences] on the device: the mma.sync fragments as the hardware lays them
    out (the CPU emulation computes them from the layout this kernel assumes)."""
    if case[5] % 16:
        pytest.skip("head dim not a multiple of 16")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("mma.sync m16n8k16 needs sm_80")
    _tiles_on_cuda_match_eager(case, dtype, tile=16, warps=warps)


@pytest.mark.parametrize("masked, scale", [(False, None), (True, 0.3)], ids=["plain", "mask-scale"])
def test_sdpas_math_path_in_the_graph_computes_eagers_attention(masked, scale):
    """NOTE [Attention in query tiles]: where SDPA's math path measures fastest (float32 encoders on CUDA) the call
    becomes matmul, scale, mask add, softmax, matmul in the graph; here the rewrite itself, on the CPU."""
    from fxopt import ops
    from fxopt.passes import short_attention

    class Masked(nn.Module):
        def forward(self, q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale) * 2

    q, k, v = torch.randn(2, 3, 20, 8), torch.randn(2, 3, 24, 8), torch.randn(2, 3, 24, 8)
    mask = torch.randn(2, 1, 20, 24) if masked else None
    model = Masked().eval() if masked else _Attention(scale=scale).eval()
    inputs = (q, k, v, mask) if masked else (q, k, v)
    gm = fxopt.capture(model, inputs)
    (node,) = [n for n in gm.graph.nodes if ops.sdpa_args(n) is not None]
    args = ops.sdpa_args(node)
    program = AttentionProgram("attend", "cuda", torch.float32, 8, scale or 8 ** -0.5,
                               "float" if masked else "none", torch.float32 if masked else None, rows=8,
                               query_tiles=True)
    assert short_attention._math_applies(program, args)
    node.replace_all_uses_with(short_attention._as_math(gm, node, args, program.scale))
    gm.graph.erase_node(node)
    gm.recompile()
    assert "scaled_dot_product_attention" not in gm.code and "softmax" in gm.code
    torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    causal = AttentionProgram("attend", "cuda", torch.float32, 8, 0.3, rows=8, query_tiles=True, causal=True)
    assert not short_attention._math_applies(causal, args)
