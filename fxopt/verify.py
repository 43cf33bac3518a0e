"""Compare an optimized module's outputs with eager's: structure, shape, dtype, then values, tolerance by dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

# (relative, absolute) tolerance per dtype. Fused kernels round every float16/bfloat16 result as eager stores it
# (NOTE [16-bit intermediates] in codegen/region.py), but their float32 math functions are not ATen's and eager on
# the CPU rounds Python scalars to 16 bits first: results can differ from eager by a unit in the last place.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its memory layout: strides, and the overlap of an expanded tensor (``clone`` makes
    an expanded tensor dense, and an in-place op that eager refuses on the caller's tensor then succeeds on the
    copy: a verification run must see what the real call will see; fuzz seed 9900137)."""
    if t.is_contiguous() or t.numel() == 0 or t.layout != torch.strided:
        return t.clone()
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.as_strided((span,), (1,), t.storage_offset()).clone().as_strided(t.shape, t.stride(), 0)


@dataclass
class Mismatch:
    """Where two outputs differ: the output's path in the pytree and what differs."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"output{self.path}: {self.reason}"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max(max|expected|, tiny), NaNs where both are NaN ignored; inf if NaNs differ."""
    a, e = actual.detach().double(), expected.detach().double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        return float("inf")
    a, e = a[~nan_e], e[~nan_e]
    if a.numel() == 0:
        return 0.0
    finite = torch.isfinite(e)
    if not torch.equal(a[~finite], e[~finite]):
        return float("inf")
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


# NOTE [TF32]: cuDNN runs float32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32), and matmuls when
# torch.backends.cuda.matmul.allow_tf32 is set: a 10-bit mantissa, so eager itself is only good to about 1e-3, and
# any rewrite that changes the weights (BatchNorm folding) or the kernel cuDNN picks moves results by that much.
# Graphs with such ops on CUDA are compared at this tolerance instead (see tf32_in_use).
TF32_TOLERANCE = (2e-3, 1e-4)

_CONV_NAMES = ("conv", "cudnn_convolution")
_MATMUL_NAMES = ("linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "einsum", "scaled_dot_product", "_addmm")


def tf32_in_use(gm) -> bool:
    """Whether a graph runs float32 convolutions or matmuls that torch's settings let use TF32 on CUDA."""
    from . import ops

    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    if not (cudnn_tf32 or matmul_tf32):
        return False
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        device = n.meta.get("device")
        tm = ops.tensor_meta(n)
        if device is None or device.type != "cuda" or tm is None or tm.dtype != torch.float32:
            continue
        name = (type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else ops.describe(n)).lower()
        if cudnn_tf32 and any(k in name for k in _CONV_NAMES):
            return True
        if matmul_tf32 and any(k in name for k in _MATMUL_NAMES + ("multiheadattention",)):
            return True
    return False


# NOTE [Computed precision]: an output is only as accurate as the least precise floating type it was computed in.
# A float16 chain widened to float32 at the end, or a bfloat16 conv whose output is cast up, is eager-accurate to
# float16 (bfloat16) only; a rewrite that changes rounding inside that chain (a fused kernel's float32 math
# functions, BatchNorm folded into bfloat16 weights) moves the result by that much. Such outputs are compared at
# the tolerance of that type, not of the output's dtype (which once rolled those passes back: tests/fuzz/
# test_regressions.py). Only ops count, not inputs or weights: a float16 input cast up is exact.
_PRECISION = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}


def _less_precise(a: torch.dtype | None, b: torch.dtype | None) -> torch.dtype | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if _PRECISION[a] <= _PRECISION[b] else b


def computed_precision(gm) -> list[torch.dtype | None] | None:
    """Per flattened graph output: the least precise floating dtype an op on its way computed in (NOTE [Computed
    precision]); None where no op produced a float, and None overall for a graph without an output node."""
    from . import ops

    least: dict[Any, torch.dtype | None] = {}
    for n in gm.graph.nodes:
        worst = None
        for i in n.all_input_nodes:
            worst = _less_precise(worst, least.get(i))
        if n.op in ("call_function", "call_method", "call_module"):
            dtype = getattr(ops.tensor_meta(n), "dtype", None)
            if dtype in _PRECISION:
                worst = _less_precise(worst, dtype)
        least[n] = worst
        if n.op == "output":
            return [least.get(leaf) if hasattr(leaf, "op") else None for leaf in pytree.tree_leaves(n.args[0])]
    return None


def compare(actual: Any, expected: Any, *, rtol: float | None = None, atol: float | None = None,
            tf32: bool = False, precision: list[torch.dtype | None] | None = None) -> Mismatch | None:
    """The first mismatch between two output pytrees, or None when they match within tolerance.

    ``tf32``: float32 outputs come from TF32 convolutions or matmuls (NOTE [TF32]); compare them at TF32's tolerance.
    ``precision``: per flattened output, the least precise type it was computed in (:func:`computed_precision`);
    an output computed in a less precise type than its own is compared at that type's tolerance.
    """
    flat_a, spec_a = pytree.tree_flatten(actual)
    flat_e, spec_e = pytree.tree_flatten(expected)
    if spec_a != spec_e:
        return Mismatch("", f"output structure differs: {spec_a} vs eager's {spec_e}")
    if precision is not None and len(precision) != len(flat_e):
        precision = None  # the graph's outputs do not line up with these: no adjustment
    for i, (a, e) in enumerate(zip(flat_a, flat_e)):
        path = f"[{i}]" if len(flat_e) > 1 else ""
        if isinstance(e, torch.Tensor):
            r, t = rtol, atol
            if tf32 and e.dtype == torch.float32 and r is None and t is None:
                r, t = TF32_TOLERANCE
            least = precision[i] if precision is not None else None
            if (least is not None and e.dtype in _PRECISION and _PRECISION[least] < _PRECISION[e.dtype]
                    and rtol is None and atol is None):
                lr, la = TOLERANCES[least]
                r, t = max(r or 0.0, lr), max(t or 0.0, la)
            m = _compare_tensors(a, e, r, t)
            if m is not None:
                return Mismatch(path, m)
        elif a != e and not (isinstance(e, float) and e != e and a != a):
            return Mismatch(path, f"{a!r} != eager's {e!r}")
    return None


def _without_data(t: torch.Tensor) -> bool:
    """A tensor with no values to compare: torch.export's fake tensors, meta tensors."""
    return isinstance(t, FakeTensor) or t.device.type == "meta"


def _compare_tensors(a: Any, e: torch.Tensor, rtol: float | None, atol: float | None) -> str | None:
    if not isinstance(a, torch.Tensor):
        return f"got {type(a).__name__}, eager returned a tensor"
    # NOTE [Model state] in state.py: fake tensors once leaked from torch.export into a model's cache, and from there
    # into eager's outputs; comparing them raised DataDependentOutputException. Say so instead.
    for side, t in (("the graph's", a), ("eager's", e)):
        if _without_data(t):
            return f"{side} output is a {type(t).__name__} on {t.device} without data, not a computed value"
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} != eager's {tuple(e.shape)}"
    if a.dtype != e.dtype:
        return f"dtype {a.dtype} != eager's {e.dtype}"
    if a.device != e.device:
        return f"device {a.device} != eager's {e.device}"
    if not e.is_floating_point() and not e.is_complex():
        if not torch.equal(a, e):
            bad = (a != e).sum().item()
            return f"{bad} of {e.numel()} elements differ (exact dtype {e.dtype})"
        return None
    default_rtol, default_atol = TOLERANCES.get(e.dtype, (1e-4, 1e-5))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    a64, e64 = a.detach().double(), e.detach().double()
    nan_a, nan_e = torch.isnan(a64), torch.isnan(e64)
    if not torch.equal(nan_a, nan_e):
        # Which side has the NaN, and what the other computed there: the two have different causes.
        only_here, only_eager = nan_a & ~nan_e, nan_e & ~nan_a
        parts = []
        if only_here.any():
            at = tuple(only_here.nonzero()[0].tolist())
            parts.append(f"NaN at {int(only_here.sum())} positions where eager has none (first at {at}, where eager "
                         f"has {e64[at].item():g})")
        if only_eager.any():
            at = tuple(only_eager.nonzero()[0].tolist())
            parts.append(f"eager has NaN at {int(only_eager.sum())} positions where this has none (first at {at}, "
                         f"where this has {a64[at].item():g})")
        return "; ".join(parts)
    # Tolerance relative to the tensor's scale, not elementwise: fused arithmetic may differ by rounding
    # on elements near zero that result from cancellation.
    scale = e64[torch.isfinite(e64)].abs().max().item() if torch.isfinite(e64).any() else 0.0
    ok = torch.isclose(a64, e64, rtol=rtol, atol=atol + rtol * scale, equal_nan=True)
    if not bool(ok.all()):
        diff = (a64 - e64).abs()
        diff[torch.isnan(diff)] = 0
        return (f"{int((~ok).sum())} of {e.numel()} elements differ; max abs error {diff.max().item():.3g}, "
                f"relative {relative_error(a, e):.3g} (rtol {rtol}, atol {atol}, dtype {e.dtype})")
    return None


# NOTE [16-bit reference]: eager's float16 or bfloat16 output is itself a rounded answer; a pass that computes the
# same value with other roundings (batchnorm folded into the convolution's weights; a fused kernel keeping a value
# in float32) may differ from it by more than the dtype's tolerance while being as close to the true value.
# MobileNetV3-L in float16 lost fold_batchnorm that way (H100, 2026-12-06: 1.4% of the logits' scale from eager's
# float16, against a 1% tolerance; eager's own float16 error against float32 is 0.95%). So where a 16-bit output
# fails the comparison with eager, the judge is a float32 run of the same graph: the pass stands if its error
# against that run is at most REFERENCE_FACTOR times eager's 16-bit error against it (the bar issue 18 sets for
# float16 results), for every floating output.
REFERENCE_FACTOR = 2.0


def is_16bit(outputs: Any) -> bool:
    """Some floating output of the pytree is float16 or bfloat16."""
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16)
               for t in pytree.tree_leaves(outputs))


def upcast(tree: Any) -> Any:
    """The pytree with float16/bfloat16 tensors as float32 (other leaves as they are)."""
    return pytree.tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.float16,
                                                                                             torch.bfloat16) else t,
                           tree)


def against_reference(actual: Any, eager: Any, reference: Any) -> tuple[bool, str]:
    """NOTE [16-bit reference]: whether ``actual`` is within REFERENCE_FACTOR of ``eager``'s error against the float32
    ``reference``, output by output, and the errors that decided it."""
    flat_a, flat_e, flat_r = (pytree.tree_leaves(t) for t in (actual, eager, reference))
    if not len(flat_a) == len(flat_e) == len(flat_r):
        return False, "the float32 run's outputs do not line up with eager's"
    worst = ""
    for i, (a, e, r) in enumerate(zip(flat_a, flat_e, flat_r)):
        if not (isinstance(e, torch.Tensor) and e.is_floating_point() and isinstance(a, torch.Tensor)
                and isinstance(r, torch.Tensor) and r.shape == e.shape):
            continue
        err_a, err_e = relative_error(a.float(), r.float()), relative_error(e.float(), r.float())
        verdict = f"output [{i}]: {err_a:.3g} against float32, eager's {e.dtype} {err_e:.3g}"
        if not err_a <= REFERENCE_FACTOR * err_e:
            return False, verdict
        worst = worst or verdict
    return True, worst


def max_relative_error(actual: Any, expected: Any) -> float:
    """Largest :func:`relative_error` over the floating outputs of two pytrees (0 if there are none)."""
    worst = 0.0
    for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected)):
        if isinstance(e, torch.Tensor) and e.is_floating_point() and isinstance(a, torch.Tensor):
            worst = max(worst, relative_error(a, e))
    return worst
