"""The depthwise convolution kernel behind ``fxopt::fused``: plans and launches what ``fxopt/codegen/depthwise.py``
printed (its docstring describes the kernel; the pass is ``fxopt/passes/depthwise.py``).

A plan per input signature checks what the program was built for before anything launches: a 4-D input dense in
the program's layout, the weight in the order the kernel reads it (float32), a float32 bias of one value per channel;
with a LayerNorm after the convolution (NOTE [Depthwise + LayerNorm]), the channel count it was built for and its
float32 weight and bias."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..codegen import depthwise as codegen
from ..codegen.depthwise import THREADS, DepthwiseProgram
from .strides import dense_in_order
from .template import LaunchSpec, TemplateKernel, strides_in_order, template_kernel

_ORDER = {"nchw": (0, 1, 2, 3), "nhwc": (0, 2, 3, 1)}  # the dims from outermost to innermost in memory


def dense_in(shape: tuple[int, ...], stride: Sequence[int], layout: str) -> bool:
    """Whether a 4-D tensor of ``shape`` and ``stride`` is dense in ``layout``'s order."""
    return dense_in_order(shape, stride, _ORDER[layout][::-1])


def weight_for(program: DepthwiseProgram, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """A Conv2d's ``[C, 1, KH, KW]`` weight as the kernel reads it: float32, ``[KH, KW, C]`` (NHWC) or ``[C, KH, KW]``
    (NCHW), contiguous; times ``scale`` (``[C]``, a BatchNorm's, NOTE [Depthwise epilogues]) in float32 if given."""
    w = weight.detach()[:, 0].float()
    if scale is not None:
        w = w * scale.detach().float().reshape(-1, 1, 1)
    return (w.permute(1, 2, 0) if program.layout == "nhwc" else w).contiguous()


class DepthwiseKernel(TemplateKernel):
    """``conv2d(x, w, bias, groups=C)`` with one channel per group: inputs ``(x, w[, bias])`` (``w`` as
    :func:`weight_for` gives it), the output dense in the input's layout (eager's). With ``program.norm_channels``,
    inputs ``(x, w, bias, ln_weight, ln_bias)`` and the output ``layer_norm(conv.permute(0, 2, 3, 1))`` stored as
    the convolution's NHWC output (its permute is the LayerNorm's value)."""

    op_names = ["conv2d"]

    def cuda_source(self) -> str:
        return codegen.cuda_source(self.program)

    def cpp_source(self) -> str:
        return codegen.cpp_source(self.program)

    def _shape(self, inputs: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(the output's shape, its strides), with the inputs checked against the program; a clear error otherwise."""
        p = self.program
        x, w = inputs[0], inputs[1]
        if x.dim() != 4:
            raise ValueError(f"{self.name}: input of shape {tuple(x.shape)}; the kernel takes [N, C, H, W]")
        N, C, H, W = x.shape
        want_w = (p.kernel[0], p.kernel[1], C) if p.layout == "nhwc" else (C, p.kernel[0], p.kernel[1])
        if tuple(w.shape) != want_w or not w.is_contiguous():  # dtypes: check_inputs (runtime/kernel.py)
            raise ValueError(f"{self.name}: weight of shape {tuple(w.shape)} (contiguous: {w.is_contiguous()}); the "
                             f"kernel reads a contiguous {want_w} for {C} channels ({p.layout}): "
                             f"runtime.depthwise.weight_for")
        if p.bias and tuple(inputs[2].shape) != (C,):
            raise ValueError(f"{self.name}: bias of shape {tuple(inputs[2].shape)} for {C} channels")
        if p.norm_channels:
            if C != p.norm_channels:
                raise ValueError(f"{self.name}: an input of {C} channels; the kernel was built for "
                                 f"{p.norm_channels} (NOTE [Depthwise + LayerNorm])")
            if any(tuple(t.shape) != (C,) or not t.is_contiguous() for t in inputs[3:5]):
                raise ValueError(f"{self.name}: LayerNorm weight and bias of shapes {[tuple(t.shape) for t in inputs[3:5]]}"
                                 f"; the kernel reads {C} contiguous values each")
        if not dense_in(tuple(x.shape), x.stride(), p.layout):
            raise ValueError(f"{self.name}: input of strides {x.stride()} is not dense {p.layout.upper()} "
                             f"{tuple(x.shape)}; the kernel was built for that layout")
        OH, OW = p.out_size(H, W)
        if OH < 1 or OW < 1:
            raise ValueError(f"{self.name}: a {H}x{W} input is smaller than the {p.kernel} kernel with padding "
                             f"{p.padding} and dilation {p.dilation}")
        shape = (N, C, OH, OW)
        return shape, strides_in_order(shape, _ORDER[p.layout])

    def fake(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Output metadata for fake-tensor tracing (torch.export, torch.compile)."""
        shape, stride = self._shape(inputs)
        return [inputs[0].new_empty_strided(shape, stride, dtype=self.output_dtypes[0])]

    def launch_spec(self, inputs: Sequence[torch.Tensor]) -> LaunchSpec:
        shape, stride = self._shape(inputs)
        N, C, OH, OW = shape
        H, W = inputs[0].shape[2:]
        p = self.program
        if p.norm_channels:  # a segment per cols pixels of one output row (NOTE [Depthwise + LayerNorm])
            threads = p.segments * p.segment_warps * 32
            blocks = math.ceil(N * OH * math.ceil(OW / p.cols) / p.segments)
        else:
            threads = THREADS
            items = N * C * OH * math.ceil(OW / p.cols)  # an upper bound: the NHWC vector path takes fewer
            blocks = math.ceil(items / THREADS)
        if blocks >= 2 ** 31:
            raise ValueError(f"{self.name}: {blocks} blocks are beyond CUDA's grid limit; use F.conv2d for this shape")
        return LaunchSpec([shape], [stride], (N, C, H, W, OH, OW), (max(1, blocks),), threads, N * C * OH * OW)


def depthwise_kernel(program: DepthwiseProgram, device: torch.device) -> DepthwiseKernel:
    """The registered kernel for ``program`` (the first one built for it), compiled."""
    return template_kernel(DepthwiseKernel(program, device))
