"""Attention with a few query rows per head -> fxopt's short-query attention kernel (CUDA); long queries in tiles of
rows where that kernel measures faster than SDPA's (NOTE [Attention in query tiles]).

Before (a decode step: 3 query rows per KV head against a static cache of 256 keys)::

    sdpa = torch._C._nn.scaled_dot_product_attention(view, k_cache, v_cache, attn_mask=mask)

After::

    fused = torch.ops.fxopt.fused.default('fxopt_attention_attend_1a2b3c4d', [view, k_cache, v_cache, mask])
    getitem = fused[0]

or, when one block per KV head would leave most of the GPU idle on a long cache, a partial kernel over splits of the
keys and a combine kernel (flash-decoding): ``fused[0]`` is then ``[B, Hk, G, Lq, splits, D + 2]`` float32 partial
results, merged by the second kernel into the output.

NOTE [Short-query attention]: SDPA's library kernels (cuDNN's and FlashAttention's) tile the queries for tensor
cores; a decode step has one query row per head, so they run a mostly idle tile and, for cuDNN, a memset before
it: 12 calls a step of the 12-layer decoder preset were 80 µs of its 510 (7.5 µs each with the memset, H100,
reports/2026-12-06-h100-decode-5df2246). The generated kernel (codegen/attention.py) holds all query rows of one KV
head in one block and reads each key and value once. Taken where every query row of a KV head fits one block
(``G * Lq <= max_rows(D)``: 16, or 8 above a head dim of 128; G the query heads per KV head), the head dim is at most 256, q, k and v share a float dtype,
there is no dropout and no causal flag, and the scale is a number; the mask (none, additive float, or bool) is
read at its own strides, broadcast dims included. The output gets the strides eager's call gave it. On CUDA each
signature is timed against SDPA on the device (NOTE [Choosing by measurement], runtime/probe.py) and rewritten
only where the kernel takes at most ``MIN_GAIN`` of SDPA's time; the note per call says both times.

Splits: ``min(ceil(L / MIN_KEYS_PER_SPLIT), ceil(SMs / (B * Hk)))`` blocks per KV head; one split is the single
"attend" kernel. On CUDA, splits of ``SMALL_CHUNK`` keys are a second candidate: at 3 query rows x 256 keys the whole
kernel took 9.2 µs against cuDNN's 8.4 (H100, bf16; reports/2026-12-06-h100-s6-de87d03), with four blocks for the
whole GPU. The measurement picks the fastest candidate, and SDPA where none is faster.

NOTE [Attention in query tiles]: with more query rows per KV head than a block holds (an encoder's, a prefill's),
the same kernel runs one block per tile of ``rows`` of them (grid z), each tile reading all its keys. SDPA's float32
kernel is the memory-efficient one, tiled 64 query rows by 64 keys for one head: a batch-1 ViT's 197 tokens x 6
heads are 24 blocks for 132 SMs, 28 µs a call on an H100 where the arithmetic is about 1 µs (DeiT-S, 12 calls, 338 of
its 1130 µs: reports/2026-12-06-h100-s7-92b51af, kt_deit_fp32.txt). Tiles of 16, 8 and 4 rows are timed against
SDPA and the fastest taken where it beats SDPA. Measured (H100, reports/2026-12-07-h100-s10-fb9446a): DeiT-S 18.2
µs (tiles of 8) against SDPA's 28.3, BERT's 128 tokens with a key mask 13.0 (of 4) against 17.6, GPT-2 causal 11.5
(of 4) against 15.8; float16 (FlashAttention, 6.5-7.8 µs), batch 32 and Swin's windows stay SDPA. SDPA's own math
path (two matmuls around a softmax) measured faster still at 197 tokens in float32 (DeiT-S 16.4, ViT-B 19.2 against
29.1), so for float32 long queries (no causal flag, a float mask or none, one query head per KV head) it is timed
too, as torch ops, and where it wins the call becomes those ops in the graph, for the fusion passes after this one
to join the scale, mask and softmax into one row kernel (not yet measured in a model). ``is_causal`` (query row i
reads keys 0..i, SDPA's top-left triangle) is a condition on the key index, and a block stops at its last row's keys.
The flash kernel (NOTE [Flash tiles for long queries], codegen/attention.py: FlashAttention's loop on CUDA cores,
both products register-tiled) is timed beside them in tiles of 8, 16 and 32 rows where the head dim is at most 128
(H100, 2026-12-07: taken for Swin-T's 49-token windows, 17.0 -> 12.8 µs a call against SDPA, model busy 1036 -> 995
µs; DeiT-S's 197 tokens stay SDPA's, 24.8 against 16-18 µs; ``flash=False`` leaves it out). In float16 and
bfloat16 on sm_80 and later the tensor-core kernel is timed too (NOTE [Tensor-core tiles for short sequences],
codegen/attention.py: mma.sync tiles of 16 query rows, the keys split over 4 or 8 warps), where SDPA is
FlashAttention's kernel in tiles of 128 rows: few blocks at batch 1. Opt-in (``enable=["tensor_core_attention"]``)
until a GPU run has measured it.
On the CPU the pass leaves long queries alone (``cpu=True``, tests, rewrites them with the C++ twin, which walks
every row).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops
from ..codegen.attention import (FLASH_MAX_HEAD_DIM, FLASH_ROWS, MAX_HEAD_DIM, TC_ROWS, THREADS, AttentionProgram,
                                 max_rows, tc_warps)
from ..runtime.attention import attention_kernel
from ..runtime.kernel import fused_op
from .base import note, record, tag
from .sdpa import mask_terms

PASS_NAME = "short_query_attention"
MIN_KEYS_PER_SPLIT = 256
SMALL_CHUNK = 128  # the second candidate on CUDA: splits of 128 keys (more blocks on a short cache)
MIN_GAIN = 0.9  # the kernel's time at most this fraction of SDPA's
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class ShortQueryAttention:
    """The pass for ``backend``: graphs on CUDA by default; ``cpu=True`` also rewrites CPU graphs with the C++ twin
    (tests: the same algorithm, checked against eager). ``chunk``: keys per split (default: the rule above).
    ``tiles=False``: long queries stay SDPA without a measurement (NOTE [Attention in query tiles]); ``flash=True``:
    the flash kernel's tiles among the candidates for long queries (NOTE [Flash tiles for long queries],
    codegen/attention.py; ``flash=False`` leaves them out); ``tensor_cores=True``: the mma.sync kernel's tiles too
    for float16 and bfloat16 (NOTE [Tensor-core tiles for short sequences]; the default pipeline's pass leaves them
    out, the opt-in ``tensor_core_attention`` includes them, until a GPU run has measured them)."""

    def __init__(self, backend: str, *, cpu: bool = False, chunk: int | None = None, tiles: bool = True,
                 flash: bool = True, tensor_cores: bool = True):
        self.backend = backend
        self.cpu = cpu
        self.chunk = chunk
        self.tiles = tiles
        self.flash = flash
        self.tensor_cores = tensor_cores

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        kernels = gm.meta.setdefault("fxopt_kernels", {})
        done = 0
        for node in list(gm.graph.nodes):
            args = ops.sdpa_args(node)
            if args is None:
                continue
            where = f"{PASS_NAME}: {node.name}"
            if isinstance(args, str):
                note(f"{where} stays SDPA ({args})")
                continue
            plan = self._program(node, args)
            if isinstance(plan, str):
                if plan:
                    note(f"{where} stays SDPA ({plan})")
                continue
            candidates, device = plan
            try:
                options = [[attention_kernel(p, device) for p in programs] for programs in candidates]
            except Exception as e:  # noqa: BLE001 -- the SDPA call stays
                note(f"{where} stays SDPA (the kernel did not build: {type(e).__name__}: {e})")
                continue
            inputs = [args["query"], args["key"], args["value"]] + ([args["attn_mask"]] if candidates[0][0].has_mask
                                                                    else [])
            built = options[0]
            if device.type == "cuda":
                math = _math_applies(candidates[0][0], args)
                math_scale = candidates[0][0].scale if math else None
                try:
                    *mine, library = _timed(options, [ops.tensor_meta(i) for i in inputs], args, device, math_scale)
                except Exception as e:  # noqa: BLE001 -- out of memory, a capture refused: the SDPA call stays
                    note(f"{where} stays SDPA (timing it failed: {type(e).__name__}: {e})")
                    continue
                math_us = mine.pop() if math else float("inf")
                best = min(range(len(options)), key=mine.__getitem__)
                built = options[best]
                times = ", ".join(f"{_describe(o)} {t:.2f}" for o, t in zip(options, mine)) + (
                    f", SDPA's math path {math_us:.2f}" if math else "")
                if math_us < mine[best] and math_us <= MIN_GAIN * library:
                    note(f"{where} -> SDPA's math path (µs: {times}; SDPA {library:.2f})")
                    node.replace_all_uses_with(_as_math(gm, node, args, candidates[0][0].scale))
                    gm.graph.erase_node(node)
                    record(calls=1, math=1)
                    done += 1
                    continue
                if mine[best] > MIN_GAIN * library:
                    note(f"{where} stays SDPA ({library:.2f} µs; the kernel: {times})")
                    continue
                note(f"{where} -> the short-query kernel, {_describe(built)} (µs: {times}; SDPA {library:.2f})")
            value: fx.Node | None = None
            with gm.graph.inserting_before(node):
                for kernel in built:
                    fused = tag(gm.graph.create_node("call_function", fused_op,
                                                     (kernel.name, inputs if value is None else [value]),
                                                     name="fused_attention"), PASS_NAME)
                    fused.meta["fxopt_kernel"] = kernel.name
                    kernels[fused.name] = kernel
                    value = tag(gm.graph.call_function(operator.getitem, (fused, 0)), PASS_NAME)
            value.meta.update({m: node.meta[m] for m in ("tensor_meta", "device", "has_tensor") if m in node.meta})
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
            record(calls=1, split=int(len(built) > 1), tiled=int(built[0].program.query_tiles),
                   flash=int(built[0].program.flash), tensor_cores=int(built[0].program.warps > 0))
            done += 1
        if done:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, done > 0)

    def _program(self, node: fx.Node, args: dict) -> tuple[list[list[AttentionProgram]], torch.device] | str:
        """The candidate program lists (attend, or partial + combine) for one SDPA call, the rule's first, or why
        not ("" when the call is simply not short: no note)."""
        device = node.meta.get("device")
        if device is None:
            return "no device recorded"
        device = torch.device(device)
        if not (device.type == "cuda" and self.backend == "cuda") and not (device.type == "cpu" and self.cpu):
            return ""
        tms = [ops.tensor_meta(args[p]) if isinstance(args[p], fx.Node) else None for p in ("query", "key", "value")]
        out = ops.tensor_meta(node)
        if any(tm is None for tm in tms) or out is None:
            return "no recorded shapes"
        q, k, v = tms
        if len(q.shape) != 4 or len(k.shape) != 4 or len(v.shape) != 4:
            return ""  # other ranks: not a decoder's [B, H, L, D]
        B, Hq, Lq, D = q.shape
        Hk, L = k.shape[1], k.shape[2]
        G = Hq // Hk if Hk and Hq % Hk == 0 else 0
        if not G:
            return ""
        tiled = G * Lq > max_rows(D)  # NOTE [Attention in query tiles]
        if tiled and not self.tiles:
            return ""
        if args["dropout_p"]:
            return "dropout"
        if G > 1 and args["enable_gqa"] is not True:
            return "query heads differ from key heads without enable_gqa"
        if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
            return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
        if not 1 <= D <= MAX_HEAD_DIM or k.shape[3] != D or v.shape[3] != D or k.shape[0] != B or v.shape[0] != B \
                or tuple(v.shape[1:3]) != (Hk, L) or L == 0:
            return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        scale = args["scale"]
        if scale is None:
            scale = 1.0 / math.sqrt(D)
        elif not isinstance(scale, (int, float)):
            return "the scale is not a number"
        mask, mask_dtype = "none", None
        if args["attn_mask"] is not None:
            mtm = ops.tensor_meta(args["attn_mask"]) if isinstance(args["attn_mask"], fx.Node) else None
            if mtm is None or len(mtm.shape) > 4:
                return "the mask is not a recorded tensor of rank <= 4"
            try:
                if torch.broadcast_shapes(tuple(mtm.shape), (B, Hq, Lq, L)) != (B, Hq, Lq, L):
                    return f"mask {tuple(mtm.shape)} larger than the scores"
            except RuntimeError:
                return f"mask {tuple(mtm.shape)} does not broadcast to the scores"
            if mtm.dtype == torch.bool:
                mask, mask_dtype = "bool", torch.bool
            elif mtm.dtype == q.dtype:
                mask, mask_dtype = "float", mtm.dtype
            else:
                return f"mask dtype {mtm.dtype} for {q.dtype} queries"
        order = tuple(sorted(range(4), key=lambda d: (-out.stride[d], d)))
        splits = self._splits(device, B * Hk, L)
        common = dict(backend=self.backend if device.type == "cuda" else "cpp", dtype=q.dtype, head_dim=D,
                      scale=float(scale), device=str(device) if device.type == "cuda" else "", rows=G * Lq)
        causal = bool(args["is_causal"])
        if tiled:
            tiles = (max_rows(D), max_rows(D) // 2, max_rows(D) // 4) if device.type == "cuda" else (max_rows(D),)
            flash = FLASH_ROWS if device.type == "cuda" and D <= FLASH_MAX_HEAD_DIM and self.flash else ()
            candidates = [[AttentionProgram("attend", mask=mask, mask_dtype=mask_dtype, out_order=order, causal=causal,
                                            query_tiles=True, flash=f, **{**common, "rows": rows})]
                          for f, rows in [(False, r) for r in tiles] + [(True, r) for r in flash]]
            candidates += [[AttentionProgram("attend", mask=mask, mask_dtype=mask_dtype, out_order=order,
                                             causal=causal, query_tiles=True, warps=w, **{**common, "rows": TC_ROWS})]
                           for w in self._tensor_core_warps(device, q.dtype, D)]
            return candidates, device
        def split_by(chunk: int) -> list[AttentionProgram]:
            return [AttentionProgram("partial", mask=mask, mask_dtype=mask_dtype, chunk=chunk, causal=causal, **common),
                    AttentionProgram("combine", out_order=order, **{**common, "scale": 0.0, "rows": 1})]

        if splits == 1:
            candidates = [[AttentionProgram("attend", mask=mask, mask_dtype=mask_dtype, out_order=order, causal=causal,
                                            **common)]]
        else:
            candidates = [split_by(THREADS * math.ceil(math.ceil(L / splits) / THREADS) if self.chunk is None
                                   else self.chunk)]
        if device.type == "cuda" and self.chunk is None and L > SMALL_CHUNK and \
                candidates[0][0].chunk != SMALL_CHUNK:
            candidates.append(split_by(SMALL_CHUNK))  # more blocks for a short cache: the measurement decides
        return candidates, device

    def _tensor_core_warps(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[int, ...]:
        """The warp counts of the tensor-core kernel to time for these long queries (NOTE [Tensor-core tiles for
        short sequences]): codegen's ``tc_warps`` on sm_80 or later."""
        if not (self.tensor_cores and device.type == "cuda" and tc_warps(dtype, head_dim)):
            return ()
        return tc_warps(dtype, head_dim) if torch.cuda.get_device_capability(device) >= (8, 0) else ()

    def _splits(self, device: torch.device, blocks: int, length: int) -> int:
        if self.chunk is not None:
            return max(1, math.ceil(length / self.chunk))
        if device.type != "cuda":
            return 1
        from ..runtime.driver import sm_count

        return max(1, min(math.ceil(length / MIN_KEYS_PER_SPLIT), math.ceil(sm_count(device.index) / blocks)))


_decisions: dict[tuple, tuple[float, ...]] = {}  # what _timed measured, by everything it depends on


def _describe(kernels: list) -> str:
    if kernels[0].program.warps:
        return f"tensor-core tiles, {kernels[0].program.warps} warps"
    if kernels[0].program.flash:
        return f"flash tiles of {kernels[0].program.rows} rows"
    if kernels[0].program.query_tiles:
        return f"tiles of {kernels[0].program.rows} rows"
    return "whole" if len(kernels) == 1 else f"split by {kernels[0].program.chunk}"


def _math_applies(program: AttentionProgram, args: dict) -> bool:
    """Whether SDPA's math path (two matmuls around a softmax) is a candidate: float32 long queries, one query head
    per KV head, no causal flag, a float mask or none (NOTE [Attention in query tiles])."""
    return (program.query_tiles and program.dtype == torch.float32 and not program.causal
            and program.mask in ("none", "float") and not args["enable_gqa"])


def _as_math(gm: fx.GraphModule, node: fx.Node, args: dict, scale: float) -> fx.Node:
    """``softmax(q @ k^T * scale [+ mask], -1) @ v`` in place of the SDPA ``node``: ops the fusion passes after this
    one see (the scale, mask and softmax join one row kernel). Returns the output node."""
    graph = gm.graph
    with graph.inserting_before(node):
        keys = tag(graph.call_method("transpose", (args["key"], -2, -1)), PASS_NAME)
        scores = tag(graph.call_function(torch.matmul, (args["query"], keys)), PASS_NAME)
        scores = tag(graph.call_function(operator.mul, (scores, scale)), PASS_NAME)
        mask = args["attn_mask"]
        if mask is not None:
            for term in mask_terms(mask):  # a sum rewrite_attention wrote: each term (NOTE [Masks in several terms])
                scores = tag(graph.call_function(operator.add, (scores, term)), PASS_NAME)
        weights = tag(graph.call_function(F.softmax, (scores,), {"dim": -1}), PASS_NAME)
        return tag(graph.call_function(torch.matmul, (weights, args["value"])), PASS_NAME)


def _timed(options: list[list], tms: list, args: dict, device: torch.device,
           math_scale: float | None = None) -> tuple[float, ...]:
    """(each option's µs, ..., SDPA's µs[, its math path's µs at ``math_scale``]) for inputs of the recorded metadata
    ``tms`` (random values in the recorded layouts), measured once per process and signature (NOTE [Choosing by
    measurement], runtime/probe.py). An option is the kernels one call runs in turn."""
    key = (str(device), tuple(tuple(k.name for k in kernels) for kernels in options),
           tuple((tuple(tm.shape), tuple(tm.stride), tm.dtype) for tm in tms), args["scale"], args["enable_gqa"],
           math_scale)
    if key not in _decisions:
        from ..runtime.probe import graph_times_us

        gen = torch.Generator(device=device).manual_seed(0)

        def tensor(tm):
            extent = 1 + sum((n - 1) * st for n, st in zip(tm.shape, tm.stride)) if all(tm.shape) else 0
            if tm.dtype == torch.bool:
                storage = torch.rand(extent, generator=gen, device=device) < 0.9
            else:
                storage = torch.randn(extent, generator=gen, device=device).to(tm.dtype)
            return storage.as_strided(tuple(tm.shape), tuple(tm.stride))

        with torch.no_grad(), torch.cuda.device(device):
            inputs = [tensor(tm) for tm in tms]
            mask = inputs[3] if len(inputs) > 3 else None

            def run(kernels):
                def ours():
                    value = inputs
                    for k in kernels:
                        value = k(value)
                    return value
                return ours

            def library():
                return F.scaled_dot_product_attention(*inputs[:3], attn_mask=mask, scale=args["scale"],
                                                      enable_gqa=bool(args["enable_gqa"]))

            def math_path():
                scores = torch.matmul(inputs[0], inputs[1].transpose(-2, -1)) * math_scale
                return torch.softmax(scores if mask is None else scores + mask, -1) @ inputs[2]

            _decisions[key] = tuple(graph_times_us([run(kernels) for kernels in options] + [library]
                                                   + ([math_path] if math_scale is not None else [])))
    return _decisions[key]


def short_query_attention(backend: str, **options) -> ShortQueryAttention:
    """The short-query attention pass for ``backend`` (it rewrites graphs on CUDA with backend ``"cuda"``)."""
    return ShortQueryAttention(backend, **options)
