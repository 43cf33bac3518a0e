"""Row reductions: reductions over a tensor's last dimension (softmax, log_softmax, LayerNorm, RMSNorm, sum, mean,
amax), each described as the passes over a row that compute it, every spelling of them mapped to one canonical op
(:func:`normalize_row_reduction`), and the support check fuse_reductions asks (:func:`match_row_reduction`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .meta import FLOAT_DTYPES, bind_args, compute_dtype, tensor_meta

aten = torch.ops.aten

# Reductions over the last dimension, each described as the passes over a row that compute it. A stage is
# ``(combine, element, finish)``: every element of the row contributes ``element`` (a C++ expression over the
# element ``{x}`` and the results ``{r0}``, ``{r1}``... of earlier stages), combined by ``"sum"`` or ``"max"`` into
# ``{acc}``; ``finish`` turns ``{acc}`` into the stage's per-row result (``{n}`` is the row length, ``{eps}`` an
# attribute). ``result`` is the per-element output (softmax, norms), or None when the op's value is the last stage's
# per-row result (sum, mean, amax: the reduced shape). ``optional`` lists optional tensor operands (affine weight,
# bias; shape ``(row length,)``) and how each applies to the result ``{y}``. Used by fxopt/codegen/rowwise.py.


@dataclass(frozen=True)
class RowReductionOp:
    name: str
    stages: tuple[tuple[str, str, str], ...]
    result: str | None = None
    optional: tuple[tuple[str, str], ...] = ()

    @property
    def reduces_shape(self) -> bool:
        """True when the result has the reduced shape (one value per row), False when it has the input's."""
        return self.result is None


@dataclass
class RowReductionCall:
    """One reduction node, normalized. ``operands`` holds the optional tensor operands present, as nodes or, for
    module spellings, the parameter's qualified name in the GraphModule. After :func:`match_row_reduction`,
    ``dim`` is the last dimension (non-negative) and ``attrs["eps"]`` a float where the op has one."""

    op: RowReductionOp
    input: fx.Node
    dim: Any
    keepdim: bool = False
    operands: dict[str, Union[fx.Node, str]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    tuple_output: bool = False  # the value is element 0 of a tuple (native_layer_norm, _fused_rms_norm)


ROW_REDUCTION_OPS: dict[str, RowReductionOp] = {}


def _row_op(name: str, stages: tuple[tuple[str, str, str], ...], result: str | None = None,
            optional: tuple[tuple[str, str], ...] = ()) -> RowReductionOp:
    op = RowReductionOp(name, stages, result, optional)
    ROW_REDUCTION_OPS[name] = op
    return op


# max-subtracted softmax; log_softmax as x - max - log(sum(exp(x - max))), as eager computes them
_row_op("softmax", (("max", "{x}", "{acc}"), ("sum", "fx_exp({x} - {r0})", "{acc}")),
        "(fx_exp({x} - {r0}) / {r1})")
_row_op("log_softmax", (("max", "{x}", "{acc}"), ("sum", "fx_exp({x} - {r0})", "fx_log({acc})")),
        "(({x} - {r0}) - {r1})")
# two-pass mean and biased variance; rstd = 1 / sqrt(var + eps)
_row_op("layer_norm", (("sum", "{x}", "({acc} / {n})"),
                       ("sum", "(({x} - {r0}) * ({x} - {r0}))", "fx_rsqrt({acc} / {n} + {eps})")),
        "(({x} - {r0}) * {r1})", (("weight", "({y} * {weight})"), ("bias", "({y} + {bias})")))
_row_op("rms_norm", (("sum", "({x} * {x})", "fx_rsqrt({acc} / {n} + {eps})"),), "({x} * {r0})",
        (("weight", "({y} * {weight})"),))
_row_op("sum", (("sum", "{x}", "{acc}"),))
_row_op("mean", (("sum", "{x}", "({acc} / {n})"),))
_row_op("amax", (("max", "{x}", "{acc}"),))  # NaN-propagating, as eager's amax

RowNormalizer = Callable[[fx.Node, fx.GraphModule], Union[RowReductionCall, str]]
_ROW_FUNCTION_SPELLINGS: dict[Any, RowNormalizer] = {}
_ROW_METHOD_SPELLINGS: dict[str, RowNormalizer] = {}
_ROW_MODULE_SPELLINGS: dict[type, Callable[[nn.Module, fx.Node], Union[RowReductionCall, str]]] = {}
_ALL_DIMS = object()  # marker: the spelling reduces every dimension (sum(x), amax(x, dim=()))


def _row_spell(normalizer: RowNormalizer, *targets: Any) -> None:
    for t in targets:
        if isinstance(t, str):
            _ROW_METHOD_SPELLINGS[t] = normalizer
        else:
            _ROW_FUNCTION_SPELLINGS[t] = normalizer


def _row_input(bound: dict) -> fx.Node | str:
    x = bound.get("input")
    return x if isinstance(x, fx.Node) else "input is not a graph value"


def _softmax_like(name: str, params: tuple[str, ...]) -> RowNormalizer:
    def normalize(node: fx.Node, gm: fx.GraphModule) -> RowReductionCall | str:
        bound = bind_args(node, params)
        if isinstance(bound, str):
            return bound
        x = _row_input(bound)
        if isinstance(x, str):
            return x
        # dtype= / half_to_float: the output dtype is read from the recorded meta, the input converted to it
        return RowReductionCall(ROW_REDUCTION_OPS[name], x, bound.get("dim"))

    return normalize


def _norm_like(name: str, params: tuple[str, ...], tuple_output: bool = False) -> RowNormalizer:
    op = ROW_REDUCTION_OPS[name]

    def normalize(node: fx.Node, gm: fx.GraphModule) -> RowReductionCall | str:
        bound = bind_args(node, params)
        if isinstance(bound, str):
            return bound
        x = _row_input(bound)
        if isinstance(x, str):
            return x
        shape = bound.get("normalized_shape")
        if isinstance(shape, int):
            shape = (shape,)
        if not isinstance(shape, (list, tuple)) or len(shape) != 1:
            return f"normalized_shape={shape!r} is not one (last) dimension"
        operands = {k: bound[k] for k, _ in op.optional if bound.get(k) is not None}
        default_eps = 1e-5 if name == "layer_norm" else None
        call = RowReductionCall(op, x, -1, operands=operands, attrs={"eps": bound.get("eps", default_eps)},
                                tuple_output=tuple_output)
        call.attrs["normalized_shape"] = tuple(shape)
        return call

    return normalize


def _sum_like(name: str, params: tuple[str, ...], default_dim: Any = None) -> RowNormalizer:
    def normalize(node: fx.Node, gm: fx.GraphModule) -> RowReductionCall | str:
        bound = bind_args(node, params)
        if isinstance(bound, str):
            return bound
        x = _row_input(bound)
        if isinstance(x, str):
            return x
        dim = bound.get("dim", default_dim)
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            dim = _ALL_DIMS
        return RowReductionCall(ROW_REDUCTION_OPS[name], x, dim, bool(bound.get("keepdim", False)))

    return normalize


for _name in ("softmax", "log_softmax"):
    _row_spell(_softmax_like(_name, ("input", "dim", "dtype")), _name, getattr(torch, _name),
               getattr(torch.special, _name), getattr(aten, _name).int)
    _row_spell(_softmax_like(_name, ("input", "dim", "_stacklevel", "dtype")), getattr(F, _name))
    _row_spell(_softmax_like(_name, ("input", "dim", "half_to_float")), getattr(aten, f"_{_name}").default)
_row_spell(_norm_like("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable")),
           F.layer_norm, torch.layer_norm, aten.layer_norm.default)
_row_spell(_norm_like("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps"), tuple_output=True),
           torch.native_layer_norm, aten.native_layer_norm.default)
if hasattr(torch, "rms_norm"):
    _row_spell(_norm_like("rms_norm", ("input", "normalized_shape", "weight", "eps")), torch.rms_norm)
if hasattr(F, "rms_norm"):
    _row_spell(_norm_like("rms_norm", ("input", "normalized_shape", "weight", "eps")), F.rms_norm)
if hasattr(aten, "rms_norm"):
    _row_spell(_norm_like("rms_norm", ("input", "normalized_shape", "weight", "eps")), aten.rms_norm.default)
if hasattr(aten, "_fused_rms_norm"):
    _row_spell(_norm_like("rms_norm", ("input", "normalized_shape", "weight", "eps"), tuple_output=True),
               aten._fused_rms_norm.default)
for _name in ("sum", "mean"):
    _row_spell(_sum_like(_name, ("input", "dim", "keepdim", "dtype")), getattr(torch, _name), _name,
               getattr(aten, _name).dim_IntList if _name == "sum" else aten.mean.dim, getattr(aten, _name).default)
_row_spell(_sum_like("amax", ("input", "dim", "keepdim"), default_dim=()), torch.amax, "amax", aten.amax.default)
del _name


# A global average pool, ``adaptive_avg_pool2d(x, 1)`` of [N, C, H, W] (torchvision's SqueezeExcitation and its
# classifiers' pooling), is ``x.mean((-2, -1), keepdim=True)``: the same row reduction, so its elementwise producer
# (the SiLU before an SE squeeze) can join its kernel. ``attrs["pooling"]`` marks the spelling: fuse_reductions
# keeps ATen's pooling kernel where nothing would join it. Other output sizes are no row reduction.
def _is_one_by_one(size: Any) -> bool:
    return size == 1 or (isinstance(size, (list, tuple)) and len(size) == 2 and all(s == 1 for s in size))


def _pool_as_mean(x: fx.Node, output_size: Any) -> RowReductionCall | str:
    if not _is_one_by_one(output_size):
        return f"adaptive_avg_pool2d to {output_size!r}, not 1x1"
    tm = tensor_meta(x)
    if tm is None or len(tm.shape) != 4:
        return "adaptive_avg_pool2d of no [N, C, H, W] tensor"
    return RowReductionCall(ROW_REDUCTION_OPS["mean"], x, (-2, -1), True, attrs={"pooling": True})


def _global_average_pool(params: tuple[str, ...]) -> RowNormalizer:
    def normalize(node: fx.Node, gm: fx.GraphModule) -> RowReductionCall | str:
        bound = bind_args(node, params)
        if isinstance(bound, str):
            return bound
        x = _row_input(bound)
        if isinstance(x, str):
            return x
        return _pool_as_mean(x, bound.get("output_size"))

    return normalize


_row_spell(_global_average_pool(("input", "output_size")), F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d,
           aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)


def _row_module_softmax(name: str):
    def normalize(m: nn.Module, node: fx.Node, gm: fx.GraphModule) -> RowReductionCall | str:
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return "unexpected module call arguments"
        return RowReductionCall(ROW_REDUCTION_OPS[name], node.args[0], m.dim)

    return normalize


def _row_module_norm(m: nn.Module, node: fx.Node, gm: fx.GraphModule) -> RowReductionCall | str:
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return "unexpected module call arguments"
    is_ln = isinstance(m, nn.LayerNorm)
    op = ROW_REDUCTION_OPS["layer_norm" if is_ln else "rms_norm"]
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        return f"normalized_shape={shape} is not one (last) dimension"
    operands: dict[str, Union[fx.Node, str]] = {}
    for k, _ in op.optional:
        if getattr(m, k, None) is not None:
            operands[k] = f"{node.target}.{k}"  # the parameter, by qualified name: the pass reads it with get_attr
    call = RowReductionCall(op, node.args[0], -1, operands=operands, attrs={"eps": m.eps})
    call.attrs["normalized_shape"] = shape
    return call


def _row_module_global_average_pool(m: nn.Module, node: fx.Node, gm: fx.GraphModule) -> RowReductionCall | str:
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return "unexpected module call arguments"
    return _pool_as_mean(node.args[0], m.output_size)


_ROW_MODULE_SPELLINGS[nn.Softmax] = _row_module_softmax("softmax")
_ROW_MODULE_SPELLINGS[nn.AdaptiveAvgPool2d] = _row_module_global_average_pool
_ROW_MODULE_SPELLINGS[nn.LogSoftmax] = _row_module_softmax("log_softmax")
_ROW_MODULE_SPELLINGS[nn.LayerNorm] = _row_module_norm
if hasattr(nn, "RMSNorm"):
    _ROW_MODULE_SPELLINGS[nn.RMSNorm] = _row_module_norm


def normalize_row_reduction(node: fx.Node, gm: fx.GraphModule) -> RowReductionCall | str | None:
    """The node as a canonical row reduction (spelling only), the reason a reduction spelling does not fit, or None
    when the node is no spelling of a row reduction at all."""
    if node.op == "call_function":
        fn = _ROW_FUNCTION_SPELLINGS.get(node.target)
    elif node.op == "call_method":
        fn = _ROW_METHOD_SPELLINGS.get(node.target)
    elif node.op == "call_module":
        mod_fn = _ROW_MODULE_SPELLINGS.get(type(gm.get_submodule(node.target)))
        return None if mod_fn is None else mod_fn(gm.get_submodule(node.target), node, gm)
    else:
        return None
    return None if fn is None else fn(node, gm)


def _row_operand_meta(operand: Union[fx.Node, str], gm: fx.GraphModule) -> tuple[Any, Any, Any] | str:
    """(shape, dtype, device) of an optional operand: a graph value or a parameter's qualified name."""
    if isinstance(operand, str):
        try:
            t = gm.get_parameter(operand)
        except AttributeError:
            try:
                t = gm.get_buffer(operand)
            except AttributeError:
                return f"{operand} is not a parameter or buffer"
        return tuple(t.shape), t.dtype, t.device
    tm = tensor_meta(operand)
    if tm is None:
        return f"operand {getattr(operand, 'name', operand)!r} is not a recorded tensor"
    return tuple(tm.shape), tm.dtype, operand.meta.get("device")


def row_reduction_meta(node: fx.Node):
    """The recorded TensorMetadata of a row reduction's value (element 0 for tuple-returning spellings)."""
    tm = node.meta.get("tensor_meta")
    if not hasattr(tm, "dtype") and isinstance(tm, (tuple, list)):  # TensorMetadata itself is a NamedTuple
        tm = tm[0] if tm else None
    return tm if hasattr(tm, "dtype") else None


def match_row_reduction(node: fx.Node, gm: fx.GraphModule) -> RowReductionCall | str | None:
    """The node as a fusible reduction over its input's last dimension; a reason string when it is a reduction that
    cannot be fused (a non-last dim, an integer dtype, ...); None when it is not a row reduction at all."""
    call = normalize_row_reduction(node, gm)
    if call is None or isinstance(call, str):
        return call
    tm_in, tm_out = tensor_meta(call.input), row_reduction_meta(node)
    if tm_in is None or tm_out is None:
        return "no tensor shape/dtype recorded (run capture with example inputs)"
    if tm_in.dtype not in FLOAT_DTYPES or tm_out.dtype not in FLOAT_DTYPES:
        return f"{call.op.name} of {tm_in.dtype} -> {tm_out.dtype}: only floating types are fused"
    ndim = len(tm_in.shape)
    if ndim == 0:
        return f"{call.op.name} of a 0-d tensor"
    dim = call.dim
    if call.op.name in ("softmax", "log_softmax") and dim is None:
        dim = 0 if ndim in (0, 1, 3) else 1  # the legacy implicit dim of softmax(x) without dim
    if dim is _ALL_DIMS:
        dims = tuple(range(ndim))
    elif isinstance(dim, int) and not isinstance(dim, bool):
        dims = (dim,)
    elif isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
        dims = tuple(dim)
    else:
        return f"dim={dim!r} is not a constant"
    if any(not -ndim <= d < ndim for d in dims):
        return f"dim={dims} out of range for a {ndim}-d tensor"
    if sorted({d % ndim for d in dims}) != [ndim - 1]:
        return f"reduces dim {dim if dim is not _ALL_DIMS else 'all'} of a {ndim}-d tensor, not only the last"
    call.dim = ndim - 1
    n = tm_in.shape[-1]
    if "normalized_shape" in call.attrs and tuple(call.attrs["normalized_shape"]) != (n,):
        return f"normalized_shape={call.attrs['normalized_shape']} does not match the last dimension {n}"
    device = call.input.meta.get("device")
    for k, operand in call.operands.items():
        meta = _row_operand_meta(operand, gm)
        if isinstance(meta, str):
            return meta
        shape, dtype, dev = meta
        if shape != (n,):
            return f"{k} of shape {shape}, expected ({n},)"
        if dtype not in FLOAT_DTYPES:
            return f"{k} of dtype {dtype}"
        if dev != device:
            return f"{k} on {dev}, input on {device}"
    if "eps" in call.attrs:
        eps = call.attrs["eps"]
        if eps is None:  # rms_norm's default: the epsilon of the type it computes in
            eps = torch.finfo(compute_dtype(tm_in.dtype)).eps
        if not isinstance(eps, (int, float)) or isinstance(eps, bool):
            return f"eps={eps!r} is not a constant"
        call.attrs["eps"] = float(eps)
    return call


def method_names() -> frozenset[str]:
    """Every ``call_method`` name the row-reduction table has a spelling for (``"sum"``, ``"mean"``, ...)."""
    return frozenset(_ROW_METHOD_SPELLINGS)
