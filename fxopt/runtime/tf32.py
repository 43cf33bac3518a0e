"""3xTF32 GEMMs and convolutions at run time (NOTE [3xTF32 GEMMs], NOTE [3xTF32 convolutions] in
fxopt/passes/tf32x3.py): ``fxopt::mm_tf32``, a GEMM (batched for 3-D operands) that cuBLAS may run on TF32 tensor
cores, and ``fxopt::conv_tf32``, a 2-D convolution (with cuDNN's fused bias, residual and ReLU where the graph had
them) that cuDNN may run on TF32 tensor cores, whatever the process's TF32 setting. The split of their input is
elementwise (``fxopt::tf32_hi``, ``fxopt::tf32_lo`` in the op table, fxopt/ops/elementwise.py)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# -- the TF32 switch --------------------------------------------------------------------------------------------
# The switch is process-wide; each op sets it around its one library call and puts it back as it was. torch has two
# APIs for it (``allow_tf32`` and ``fp32_precision``) and raises when they disagree, so the ops set it through the
# call that keeps both in step and restore the new API's value too: the state after is the state before, whichever
# API the user set it with (tests/passes/test_tf32x3.py). Inside a CUDA graph capture the library reads it at
# capture: the replay runs what was captured.
_SWITCHES = {  # library -> (old API's getter, setter, the new API's (backend, op))
    "cublas": ("_get_cublas_allow_tf32", "_set_cublas_allow_tf32", ("cuda", "matmul")),
    "cudnn": ("_get_cudnn_allow_tf32", "_set_cudnn_allow_tf32", ("cuda", "conv")),
}


def _legacy_switch(library: str) -> bool | None:
    """The old API's value; None where the user set the new API so that the old one has no single value (cuDNN's
    conv and RNN precisions apart: its getter raises)."""
    try:
        return getattr(torch._C, _SWITCHES[library][0])()
    except RuntimeError:
        return None


def tf32_allowed(library: str) -> bool:
    """Whether the process lets ``library`` ("cublas" or "cudnn") run float32 work (GEMMs, convolutions) in TF32."""
    legacy = _legacy_switch(library)
    if legacy is not None:
        return legacy
    return torch._C._get_fp32_precision_getter(*_SWITCHES[library][2]) == "tf32"


@contextlib.contextmanager
def _tf32(library: str):
    C = torch._C
    _, set_legacy, precision = _SWITCHES[library]
    old, old_precision = _legacy_switch(library), C._get_fp32_precision_getter(*precision)
    if old is None:  # the new API alone, for this op: the old one would mix them
        C._set_fp32_precision_setter(*precision, "tf32")
    else:
        getattr(C, set_legacy)(True)
    try:
        yield
    finally:
        if old is not None:
            getattr(C, set_legacy)(old)
        C._set_fp32_precision_setter(*precision, old_precision)


_lib = torch.library.Library("fxopt", "FRAGMENT")

# -- fxopt::mm_tf32 ---------------------------------------------------------------------------------------------
_lib.define("mm_tf32(Tensor x, Tensor w, Tensor? bias=None) -> Tensor")


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dim() == 3:  # the stacked parts: a batched GEMM (no bias: the tail adds it)
        return torch.bmm(x, w)
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)


def _mm_tf32_cuda(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    with _tf32("cublas"):
        return _gemm(x, w, bias)


def _mm_tf32_cpu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _gemm(x, w, bias)  # no TF32 on the CPU: the float32 product (the split's three terms, exactly summed)


_lib.impl("mm_tf32", _mm_tf32_cuda, "CUDA")
_lib.impl("mm_tf32", _mm_tf32_cpu, "CPU")


@torch.library.register_fake("fxopt::mm_tf32")
def _mm_tf32_fake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    torch._check(x.dim() == w.dim() and x.dim() in (2, 3) and x.shape[-1] == w.shape[-2]
                 and (x.dim() == 2 or (x.shape[0] == w.shape[0] and bias is None)),
                 lambda: f"fxopt::mm_tf32: x {tuple(x.shape)} @ w {tuple(w.shape)}")
    return x.new_empty((*x.shape[:-1], w.shape[-1]))


mm_tf32_op = torch.ops.fxopt.mm_tf32.default

# -- fxopt::conv_tf32 -------------------------------------------------------------------------------------------
# relu(conv(x, w) + bias + alpha * residual) as the graph had it: F.conv2d (relu False, no residual), cuDNN's fused
# ``cudnn_convolution_relu`` or ``cudnn_convolution_add_relu`` (fuse_epilogues' rewrites) otherwise.
_lib.define("conv_tf32(Tensor x, Tensor w, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
            "Tensor? residual=None, float alpha=1.0, bool relu=False) -> Tensor")


def graph_conv(x, w, bias, stride, padding, dilation, groups, residual=None, alpha=1.0, relu=False):
    """The convolution as the graph had it: F.conv2d, or cuDNN's fused call with ReLU (and residual)."""
    if not relu and residual is None:
        return F.conv2d(x, w, bias, stride, padding, dilation, groups)
    if residual is None:
        return torch.cudnn_convolution_relu(x, w, bias, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(x, w, residual, alpha, bias, stride, padding, dilation, groups)


def reference_conv(x, w, bias, stride, padding, dilation, groups, residual=None, alpha=1.0, relu=False):
    """What ``fxopt::conv_tf32`` computes, in plain ops of any dtype and device: relu(conv + bias + alpha *
    residual). The CPU's implementation (no TF32 and no cuDNN there) and the float64 reference of its accuracy."""
    y = F.conv2d(x, w, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + alpha * residual
    return torch.relu(y) if relu else y


def _conv_tf32_cuda(x, w, bias, stride, padding, dilation, groups, residual=None, alpha=1.0, relu=False):
    with _tf32("cudnn"):
        return graph_conv(x, w, bias, stride, padding, dilation, groups, residual, alpha, relu)


_lib.impl("conv_tf32", _conv_tf32_cuda, "CUDA")
_lib.impl("conv_tf32", reference_conv, "CPU")


@torch.library.register_fake("fxopt::conv_tf32")
def _conv_tf32_fake(x, w, bias, stride, padding, dilation, groups, residual=None, alpha=1.0, relu=False):
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


conv_tf32_op = torch.ops.fxopt.conv_tf32.default
