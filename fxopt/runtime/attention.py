"""The short-query attention kernels behind ``fxopt::fused``: compiles, plans and launches what
``fxopt/codegen/attention.py`` printed (its docstring describes the algorithm; the pass is
``fxopt/passes/decode_attention.py``).

A plan per input signature checks the shapes against what the program was built for (head dim, dtypes, the number
of query rows per KV head it was built for unless it walks them in tiles, a mask that broadcasts to the scores) before anything launches, and passes
every tensor's four strides, so views (a query sliced out of a merged projection, an expanded mask) need no copy.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..codegen import attention as codegen
from ..codegen.attention import THREADS, AttentionProgram
from .strides import contiguous_strides
from .template import LaunchSpec, TemplateKernel, strides_in_order, template_kernel


class AttentionKernel(TemplateKernel):
    """One generated short-query attention kernel (attend, partial or combine), callable by name through
    ``torch.ops.fxopt.fused``."""

    def __init__(self, program: AttentionProgram, device: torch.device):
        super().__init__(program, device)
        self.op_names = ["scaled_dot_product_attention"] if program.kind != "combine" else ["attention_combine"]

    def cuda_source(self) -> str:
        return codegen.cuda_source(self.program)

    def cpp_source(self) -> str:
        return codegen.cpp_source(self.program)

    # -- shapes ----------------------------------------------------------------------------------------------------
    def _dims(self, shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """(B, Hk, G, Lq, L or splits) from the inputs' shapes, checked against what the program computes; a clear
        error otherwise."""
        p = self.program
        if p.kind == "combine":
            part = tuple(shapes[0])
            if len(part) != 6 or part[5] != p.head_dim + 2:
                raise ValueError(f"{self.name}: partial results of shape {part}, expected [B, Hk, G, Lq, splits, "
                                 f"{p.head_dim + 2}]")
            return part[:5]
        q, k, v = (tuple(s) for s in shapes[:3])
        if len(q) != 4 or len(k) != 4 or len(v) != 4:
            raise ValueError(f"{self.name}: q, k, v of shapes {q}, {k}, {v}; the kernel takes 4-D [B, H, L, D]")
        B, Hq, Lq, D = q
        Hk, L = k[1], k[2]
        if D != p.head_dim or k[3] != D or v[3] != D:
            raise ValueError(f"{self.name}: head dims q {D}, k {k[3]}, v {v[3]}; the kernel was built for "
                             f"{p.head_dim}")
        if k[0] != B or v[0] != B or v[1] != Hk or v[2] != L:
            raise ValueError(f"{self.name}: q {q}, k {k}, v {v} do not share batch, heads and length")
        if Hk == 0 or Hq % Hk:
            raise ValueError(f"{self.name}: {Hq} query heads are not a multiple of {Hk} key/value heads")
        G = Hq // Hk
        if G * Lq != p.rows and not p.query_tiles:
            raise ValueError(f"{self.name}: {G * Lq} query rows per key/value head ({G} query heads per key/value "
                             f"head x {Lq} rows); the kernel was built for {p.rows}")
        if p.has_mask:
            try:
                scores = torch.broadcast_shapes(tuple(shapes[3]), (B, Hq, Lq, L))
            except RuntimeError:
                raise ValueError(f"{self.name}: mask of shape {tuple(shapes[3])} does not broadcast to the scores "
                                 f"{(B, Hq, Lq, L)}") from None
            if len(shapes[3]) > 4 or scores != (B, Hq, Lq, L):
                raise ValueError(f"{self.name}: mask of shape {tuple(shapes[3])} is larger than the scores "
                                 f"{(B, Hq, Lq, L)}")
        return B, Hk, G, Lq, L

    def splits(self, length: int) -> int:
        return max(1, math.ceil(length / self.program.chunk)) if self.program.kind == "partial" else 1

    def _out_shape(self, dims: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        B, Hk, G, Lq, L = dims
        p = self.program
        if p.kind == "partial":
            shape = (B, Hk, G, Lq, self.splits(L), p.head_dim + 2)
            return shape, contiguous_strides(shape)
        shape = (B, Hk * G, Lq, p.head_dim)
        return shape, strides_in_order(shape, p.out_order)

    def fake(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Output metadata for fake-tensor tracing (torch.export, torch.compile)."""
        shape, stride = self._out_shape(self._dims([t.shape for t in inputs]))
        return [inputs[0].new_empty_strided(shape, stride, dtype=self.output_dtypes[0])]

    def launch_spec(self, inputs: Sequence[torch.Tensor]) -> LaunchSpec:
        p = self.program
        dims = self._dims([t.shape for t in inputs])
        B, Hk, G, Lq, L = dims
        shape, stride = self._out_shape(dims)
        if p.kind == "combine":
            rows = B * Hk * G * Lq
            return LaunchSpec([shape], [stride], (B, Hk, G, Lq, L, *stride), (max(1, rows),),
                              min(THREADS, 32 * math.ceil(p.head_dim / 32)), rows)
        if L == 0 and p.kind == "attend" and B * Hk * G * Lq:
            raise ValueError(f"{self.name}: attention over 0 keys")
        strides = [inputs[0].stride(), inputs[1].stride(), inputs[2].stride()]
        if p.has_mask:
            strides.append(inputs[3].expand(B, Hk * G, Lq, L).stride())
        if p.kind == "attend":
            strides.append(stride)
        chunk = p.chunk if p.kind == "partial" else max(1, L)
        args = (B, Hk, G, Lq, L, chunk, *(s for st in strides for s in st))
        grid = (max(1, B * Hk), self.splits(L)) + ((max(1, math.ceil(G * Lq / p.rows)),) if p.query_tiles else ())
        if max(grid[1:]) > 65535 or grid[0] >= 2 ** 31:
            raise ValueError(f"{self.name}: a grid of {grid} blocks (batch x KV heads, key splits, query tiles) is "
                             "beyond CUDA's limits (2^31 - 1, 65535, 65535); use SDPA for these shapes")
        return LaunchSpec([shape], [stride], args, grid, p.threads, B * Hk * G * Lq * (L > 0 or p.kind == "partial"))


def attention_kernel(program: AttentionProgram, device: torch.device) -> AttentionKernel:
    """The registered kernel for ``program`` (the first one built for it), compiled."""
    return template_kernel(AttentionKernel(program, device))
