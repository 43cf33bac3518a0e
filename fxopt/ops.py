"""The op vocabulary: every spelling of each op fxopt understands, mapped to one canonical op.

The same op reaches a graph in many spellings: ``nn.ReLU`` (call_module), ``F.relu`` / ``torch.relu``
(call_function), ``x.relu()`` (call_method), ``aten.relu.default`` (torch.export graphs). torch.fx's
NormalizeOperators does not merge them; this table does. It is the one place an op is described:

* elementwise ops: the scalar C++ expression (shared by the C++ and CUDA printers, see
  ``fxopt/codegen/include/fxopt_kernel.h`` for the helpers it calls), how the compute type is chosen,
  and the support check, via :func:`match_elementwise`;
* ops that launch no kernel (views, shape reads, identities), via :func:`launches_kernel`;
* in-place spellings, which are never fused (:func:`is_inplace`).

Dtypes come from ``node.meta["tensor_meta"]`` (recorded by running eager), so type promotion is exactly eager's.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten

Operand = Union[fx.Node, int, float, bool]


@dataclass(frozen=True)
class ElementwiseOp:
    """A canonical elementwise op.

    ``expr`` is a format string over operands ``{0}``, ``{1}``, ... and attributes ``{name}``; operands arrive
    already converted to the compute type. ``compute`` picks that type:

    * ``"out"``: the compute type of the node's output dtype (float16/bfloat16 compute in float32);
    * ``"promote"``: the promoted type of the operands (comparisons, whose output is bool);
    * ``"bool"``: operands are tested for truth (logical ops).
    """

    name: str
    arity: int
    expr: str
    compute: str = "out"
    attrs: tuple[str, ...] = ()
    floating_only: bool = False  # the C helper has no integer version


@dataclass
class ElementwiseCall:
    """One node, normalized: which op, its operands (nodes or Python scalars) and attribute values."""

    op: ElementwiseOp
    operands: list[Operand]
    attrs: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Canonical elementwise ops. Keep the list grouped as PyTorch documents them.
# ---------------------------------------------------------------------------------------------------------------
ELEMENTWISE_OPS: dict[str, ElementwiseOp] = {}


def _op(name: str, arity: int, expr: str, **kw) -> ElementwiseOp:
    op = ElementwiseOp(name, arity, expr, **kw)
    ELEMENTWISE_OPS[name] = op
    return op


# arithmetic
ADD = _op("add", 2, "({0} + {alpha} * {1})", attrs=("alpha",))
SUB = _op("sub", 2, "({0} - {alpha} * {1})", attrs=("alpha",))
RSUB = _op("rsub", 2, "({1} - {alpha} * {0})", attrs=("alpha",))
MUL = _op("mul", 2, "({0} * {1})")
DIV = _op("div", 2, "({0} / {1})")
FLOOR_DIVIDE = _op("floor_divide", 2, "fx_floordiv({0}, {1})")
TRUNC_DIVIDE = _op("trunc_divide", 2, "fx_truncdiv({0}, {1})")
REMAINDER = _op("remainder", 2, "fx_remainder({0}, {1})")
NEG = _op("neg", 1, "(-{0})")
ABS = _op("abs", 1, "fx_abs({0})")
POW = _op("pow", 2, "fx_pow({0}, {1})")
RECIPROCAL = _op("reciprocal", 1, "(1 / {0})", floating_only=True)
SIGN = _op("sign", 1, "fx_sign({0})")
LERP = _op("lerp", 3, "fx_lerp({0}, {1}, {2})", floating_only=True)
ADDCMUL = _op("addcmul", 3, "({0} + {value} * {1} * {2})", attrs=("value",))
ADDCDIV = _op("addcdiv", 3, "({0} + {value} * ({1} / {2}))", attrs=("value",), floating_only=True)
MINIMUM = _op("minimum", 2, "fx_minimum({0}, {1})")
MAXIMUM = _op("maximum", 2, "fx_maximum({0}, {1})")
# transcendental (float only: eager promotes integer inputs to float, visible in the output dtype)
for _name, _expr in [
    ("sqrt", "fx_sqrt({0})"), ("rsqrt", "fx_rsqrt({0})"), ("exp", "fx_exp({0})"), ("exp2", "fx_exp2({0})"),
    ("log", "fx_log({0})"), ("log2", "fx_log2({0})"), ("log10", "fx_log10({0})"), ("log1p", "fx_log1p({0})"),
    ("expm1", "fx_expm1({0})"), ("sin", "fx_sin({0})"), ("cos", "fx_cos({0})"), ("tan", "fx_tan({0})"),
    ("tanh", "fx_tanh({0})"), ("sigmoid", "fx_sigmoid({0})"), ("erf", "fx_erf({0})"), ("erfc", "fx_erfc({0})"),
    ("atan", "fx_atan({0})"), ("asin", "fx_asin({0})"), ("acos", "fx_acos({0})"), ("sinh", "fx_sinh({0})"),
    ("cosh", "fx_cosh({0})"),
]:
    _op(_name, 1, _expr, floating_only=True)
# rounding (identity on integers, which fx_* overloads handle)
for _name in ("floor", "ceil", "round", "trunc", "frac"):
    _op(_name, 1, f"fx_{_name}({{0}})")
# activations
RELU = _op("relu", 1, "fx_relu({0})")
_op("leaky_relu", 1, "fx_leaky_relu({0}, {negative_slope})", attrs=("negative_slope",), floating_only=True)
_op("elu", 1, "fx_elu({0}, {alpha}, {scale}, {input_scale})", attrs=("alpha", "scale", "input_scale"),
    floating_only=True)
_op("gelu", 1, "fx_gelu({0})", floating_only=True)
_op("gelu_tanh", 1, "fx_gelu_tanh({0})", floating_only=True)
_op("silu", 1, "fx_silu({0})", floating_only=True)
_op("mish", 1, "fx_mish({0})", floating_only=True)
_op("hardtanh", 1, "fx_clamp({0}, {min_val}, {max_val})", attrs=("min_val", "max_val"))
_op("hardsigmoid", 1, "fx_hardsigmoid({0})", floating_only=True)
_op("hardswish", 1, "fx_hardswish({0})", floating_only=True)
_op("softplus", 1, "fx_softplus({0}, {beta}, {threshold})", attrs=("beta", "threshold"), floating_only=True)
_op("clamp", 1, "fx_clamp({0}, {min}, {max})", attrs=("min", "max"))
_op("clamp_min", 1, "fx_clamp_min({0}, {min})", attrs=("min",))
_op("clamp_max", 1, "fx_clamp_max({0}, {max})", attrs=("max",))
_op("clamp_tensor", 3, "fx_clamp_max(fx_clamp_min({0}, {1}), {2})")
_op("clamp_min_tensor", 2, "fx_clamp_min({0}, {1})")
_op("clamp_max_tensor", 2, "fx_clamp_max({0}, {1})")
_op("where", 3, "({0} ? {1} : {2})")
_op("cast", 1, "{0}")  # the conversion itself happens when the operand is converted to the output type
_op("nan_to_num", 1, "fx_nan_to_num({0}, {nan}, {posinf}, {neginf})", attrs=("nan", "posinf", "neginf"),
    floating_only=True)
# comparisons and logic
for _name, _sym in [("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">=")]:
    _op(_name, 2, f"({{0}} {_sym} {{1}})", compute="promote")
_op("logical_and", 2, "({0} && {1})", compute="bool")
_op("logical_or", 2, "({0} || {1})", compute="bool")
_op("logical_xor", 2, "({0} != {1})", compute="bool")
_op("logical_not", 1, "(!{0})", compute="bool")
_op("isnan", 1, "fx_isnan({0})", compute="promote")
_op("bitwise_and", 2, "({0} & {1})")
_op("bitwise_or", 2, "({0} | {1})")
_op("bitwise_xor", 2, "({0} ^ {1})")
_op("bitwise_not", 1, "fx_bitwise_not({0})")
del _name, _expr

# The fixed cases where the ``where``/comparison condition operand must be bool, and the operands
# that are tested for truth rather than converted; used by the codegen.
CONDITION_OPERANDS = {"where": (0,)}


# ---------------------------------------------------------------------------------------------------------------
# Spellings -> canonical op
# ---------------------------------------------------------------------------------------------------------------
Normalizer = Callable[[fx.Node, fx.GraphModule], Union[ElementwiseCall, str]]
_FUNCTION_SPELLINGS: dict[Any, Normalizer] = {}  # call_function targets (torch.*, F.*, operator.*, aten.*)
_METHOD_SPELLINGS: dict[str, Normalizer] = {}  # call_method names
_MODULE_SPELLINGS: dict[type, Callable[[nn.Module, fx.Node], Union[ElementwiseCall, str]]] = {}


def _bind(node: fx.Node, params: tuple[str, ...]) -> dict[str, Any] | str:
    """Map a node's args/kwargs onto parameter names; a reason string if they do not fit."""
    if len(node.args) > len(params):
        return f"{len(node.args)} positional arguments, expected at most {len(params)}"
    bound = dict(zip(params, node.args))
    for k, v in node.kwargs.items():
        if k not in params:
            return f"unsupported keyword argument {k}={v!r}"
        if k in bound:
            return f"argument {k} given twice"
        bound[k] = v
    return bound


def _standard(op: ElementwiseOp, params: tuple[str, ...], defaults: dict[str, Any] | None = None,
              fixed: dict[str, Any] | None = None, check: Callable[[dict], str | None] | None = None) -> Normalizer:
    """Normalizer for a spelling whose first ``op.arity`` parameters are the operands, the rest attributes."""
    defaults = defaults or {}
    fixed = fixed or {}

    def normalize(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
        bound = _bind(node, params)
        if isinstance(bound, str):
            return bound
        for k, v in defaults.items():
            bound.setdefault(k, v)
        if bound.get("inplace"):
            return "in-place (inplace=True)"
        if check is not None and (reason := check(bound)):
            return reason
        operands = []
        for p in params[: op.arity]:
            if p not in bound:
                return f"missing operand {p}"
            operands.append(bound[p])
        attrs = {a: bound.get(a, fixed.get(a)) for a in op.attrs}
        attrs.update({k: v for k, v in fixed.items() if k in op.attrs})
        return ElementwiseCall(op, operands, attrs)

    return normalize


def _spell(normalizer: Normalizer, *targets: Any) -> None:
    for t in targets:
        if isinstance(t, str):
            _METHOD_SPELLINGS[t] = normalizer
        else:
            _FUNCTION_SPELLINGS[t] = normalizer


def _module(cls: type, fn: Callable[[nn.Module, fx.Node], Union[ElementwiseCall, str]]) -> None:
    _MODULE_SPELLINGS[cls] = fn


def _mod(op: ElementwiseOp, **attr_getters: Callable[[nn.Module], Any]):
    """Module spelling: the node's single argument is the operand, attributes read off the module."""

    def normalize(m: nn.Module, node: fx.Node) -> ElementwiseCall | str:
        if getattr(m, "inplace", False):
            return f"in-place module ({type(m).__name__}(inplace=True))"
        if len(node.args) != 1 or node.kwargs:
            return "unexpected module call arguments"
        return ElementwiseCall(op, [node.args[0]], {k: g(m) for k, g in attr_getters.items()})

    return normalize


OPS = ELEMENTWISE_OPS
_ALPHA = {"alpha": 1}

# binary arithmetic
_spell(_standard(OPS["add"], ("input", "other", "alpha"), _ALPHA), torch.add, operator.add, "add",
       aten.add.Tensor, aten.add.Scalar)
_spell(_standard(OPS["sub"], ("input", "other", "alpha"), _ALPHA), torch.sub, torch.subtract, operator.sub, "sub",
       "subtract", aten.sub.Tensor, aten.sub.Scalar)
_spell(_standard(OPS["rsub"], ("input", "other", "alpha"), _ALPHA), torch.rsub, aten.rsub.Scalar, aten.rsub.Tensor)
_spell(_standard(OPS["mul"], ("input", "other")), torch.mul, torch.multiply, operator.mul, "mul", "multiply",
       aten.mul.Tensor, aten.mul.Scalar)
_spell(_standard(OPS["floor_divide"], ("input", "other")), torch.floor_divide, operator.floordiv, "floor_divide",
       aten.floor_divide.default, aten.floor_divide.Scalar)
_spell(_standard(OPS["remainder"], ("input", "other")), torch.remainder, operator.mod, "remainder",
       aten.remainder.Tensor, aten.remainder.Scalar)
_spell(_standard(OPS["pow"], ("input", "exponent")), torch.pow, operator.pow, "pow", aten.pow.Tensor_Tensor,
       aten.pow.Tensor_Scalar, aten.pow.Scalar)
_spell(_standard(OPS["minimum"], ("input", "other")), torch.minimum, "minimum", aten.minimum.default)
_spell(_standard(OPS["maximum"], ("input", "other")), torch.maximum, "maximum", aten.maximum.default)
_spell(_standard(OPS["lerp"], ("input", "end", "weight")), torch.lerp, "lerp", aten.lerp.Scalar, aten.lerp.Tensor)
_spell(_standard(OPS["addcmul"], ("input", "tensor1", "tensor2", "value"), {"value": 1}), torch.addcmul, "addcmul",
       aten.addcmul.default)
_spell(_standard(OPS["addcdiv"], ("input", "tensor1", "tensor2", "value"), {"value": 1}), torch.addcdiv, "addcdiv",
       aten.addcdiv.default)


def _normalize_div(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
    bound = _bind(node, ("input", "other", "rounding_mode"))
    if isinstance(bound, str):
        return bound
    mode = bound.get("rounding_mode")
    op = {None: OPS["div"], "floor": OPS["floor_divide"], "trunc": OPS["trunc_divide"]}.get(mode)
    if op is None:
        return f"unknown rounding_mode={mode!r}"
    return ElementwiseCall(op, [bound["input"], bound["other"]], {})


_spell(_normalize_div, torch.div, torch.divide, torch.true_divide, operator.truediv, "div", "divide", "true_divide",
       aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.div.Scalar_mode, aten.true_divide.Tensor)

# unary math: torch.X, Tensor.X, aten.X.default
_UNARY = ["neg", "abs", "sqrt", "rsqrt", "exp", "exp2", "log", "log2", "log10", "log1p", "expm1", "sin", "cos", "tan",
          "tanh", "sigmoid", "erf", "erfc", "atan", "asin", "acos", "sinh", "cosh", "floor", "ceil", "trunc", "frac",
          "reciprocal", "sign", "relu", "logical_not", "isnan", "bitwise_not"]
for _name in _UNARY:
    _targets: list[Any] = [_name, getattr(aten, _name).default]
    if hasattr(torch, _name):
        _targets.append(getattr(torch, _name))
    _spell(_standard(OPS[_name], ("input",)), *_targets)
_spell(_standard(OPS["neg"], ("input",)), operator.neg, torch.negative, "negative")
_spell(_standard(OPS["abs"], ("input",)), builtins.abs, operator.abs, torch.absolute, "absolute",
       aten.absolute.default)
# ATen alias overloads that torch.export(strict=False) keeps
_spell(_standard(OPS["mul"], ("input", "other")), aten.multiply.Tensor)
_spell(_standard(OPS["neg"], ("input",)), aten.negative.default)
_spell(_standard(OPS["gt"], ("input", "other")), aten.greater.Tensor)
_spell(_standard(OPS["sigmoid"], ("input",)), aten.special_expit.default)
for _alias, _canonical in [("__and__", "bitwise_and"), ("__or__", "bitwise_or"), ("__xor__", "bitwise_xor")]:
    _spell(_standard(OPS[_canonical], ("input", "other")), getattr(aten, _alias).Tensor, getattr(aten, _alias).Scalar)
_spell(_standard(OPS["bitwise_not"], ("input",)), operator.invert)
_spell(_standard(OPS["sigmoid"], ("input",)), F.sigmoid, torch.special.expit)
_spell(_standard(OPS["tanh"], ("input",)), F.tanh)
_spell(_standard(OPS["relu"], ("input", "inplace"), {"inplace": False}), F.relu)
_spell(_standard(OPS["round"], ("input", "decimals"), {"decimals": 0},
                 check=lambda b: None if b["decimals"] == 0 else "round(decimals != 0)"),
       torch.round, "round", aten.round.default)
_spell(_standard(OPS["nan_to_num"], ("input", "nan", "posinf", "neginf"), {"nan": 0.0}),
       torch.nan_to_num, "nan_to_num", aten.nan_to_num.default)

# comparisons and logic
for _name, _pyop in [("eq", operator.eq), ("ne", operator.ne), ("lt", operator.lt), ("le", operator.le),
                     ("gt", operator.gt), ("ge", operator.ge)]:
    _norm = _standard(OPS[_name], ("input", "other"))
    _spell(_norm, _pyop, getattr(torch, _name), _name, getattr(aten, _name).Tensor, getattr(aten, _name).Scalar)
_spell(_standard(OPS["ne"], ("input", "other")), torch.not_equal)
_spell(_standard(OPS["gt"], ("input", "other")), torch.greater)
_spell(_standard(OPS["ge"], ("input", "other")), torch.greater_equal)
_spell(_standard(OPS["lt"], ("input", "other")), torch.less)
_spell(_standard(OPS["le"], ("input", "other")), torch.less_equal)
for _name in ("logical_and", "logical_or", "logical_xor"):
    _spell(_standard(OPS[_name], ("input", "other")), getattr(torch, _name), _name, getattr(aten, _name).default)
for _name, _pyop in [("bitwise_and", operator.and_), ("bitwise_or", operator.or_), ("bitwise_xor", operator.xor)]:
    _spell(_standard(OPS[_name], ("input", "other")), _pyop, getattr(torch, _name), _name,
           getattr(aten, _name).Tensor, getattr(aten, _name).Scalar)
def _normalize_where_method(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
    """``x.where(condition, y)``: the tensor the method is called on is the value where condition holds."""
    bound = _bind(node, ("input", "condition", "other"))
    if isinstance(bound, str):
        return bound
    if "condition" not in bound or "other" not in bound:
        return "where() without condition and other"
    return ElementwiseCall(OPS["where"], [bound["condition"], bound["input"], bound["other"]], {})


_spell(_normalize_where_method, "where")
_spell(_standard(OPS["where"], ("condition", "input", "other")), torch.where, aten.where.self,
       aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)

# activations (functional and aten)
_spell(_standard(OPS["hardtanh"], ("input", "inplace"), {"inplace": False}, fixed={"min_val": 0.0, "max_val": 6.0}),
       F.relu6)
_spell(_standard(OPS["leaky_relu"], ("input", "negative_slope", "inplace"), {"negative_slope": 0.01, "inplace": False}),
       F.leaky_relu, aten.leaky_relu.default)
_spell(_standard(OPS["elu"], ("input", "alpha", "inplace"), {"alpha": 1.0, "inplace": False},
                 fixed={"scale": 1.0, "input_scale": 1.0}), F.elu)
_spell(_standard(OPS["elu"], ("input", "alpha", "scale", "input_scale"), {"alpha": 1.0, "scale": 1.0,
                                                                            "input_scale": 1.0}), aten.elu.default)
_SELU = {"alpha": 1.6732632423543772848170429916717, "scale": 1.0507009873554804934193349852946, "input_scale": 1.0}
_spell(_standard(OPS["elu"], ("input", "inplace"), {"inplace": False}, fixed=_SELU), F.selu, torch.selu,
       aten.selu.default)
_spell(_standard(OPS["silu"], ("input", "inplace"), {"inplace": False}), F.silu, aten.silu.default)
_spell(_standard(OPS["mish"], ("input", "inplace"), {"inplace": False}), F.mish, aten.mish.default)
_spell(_standard(OPS["hardsigmoid"], ("input", "inplace"), {"inplace": False}), F.hardsigmoid,
       aten.hardsigmoid.default)
_spell(_standard(OPS["hardswish"], ("input", "inplace"), {"inplace": False}), F.hardswish, aten.hardswish.default)
_spell(_standard(OPS["hardtanh"], ("input", "min_val", "max_val", "inplace"),
                 {"min_val": -1.0, "max_val": 1.0, "inplace": False}), F.hardtanh, aten.hardtanh.default)
_spell(_standard(OPS["softplus"], ("input", "beta", "threshold"), {"beta": 1.0, "threshold": 20.0}), F.softplus,
       aten.softplus.default)


def _normalize_gelu(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
    bound = _bind(node, ("input", "approximate"))
    if isinstance(bound, str):
        return bound
    approximate = bound.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        return f"gelu(approximate={approximate!r})"
    return ElementwiseCall(OPS["gelu" if approximate == "none" else "gelu_tanh"], [bound["input"]], {})


_spell(_normalize_gelu, F.gelu, aten.gelu.default)


def _normalize_clamp(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
    bound = _bind(node, ("input", "min", "max"))
    if isinstance(bound, str):
        return bound
    lo, hi = bound.get("min"), bound.get("max")
    if isinstance(lo, fx.Node) and hi is None:
        return ElementwiseCall(OPS["clamp_min_tensor"], [bound["input"], lo], {})
    if isinstance(hi, fx.Node) and lo is None:
        return ElementwiseCall(OPS["clamp_max_tensor"], [bound["input"], hi], {})
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        # tensor bounds: operands; a missing bound becomes +-inf
        lo = -math.inf if lo is None else lo
        hi = math.inf if hi is None else hi
        return ElementwiseCall(OPS["clamp_tensor"], [bound["input"], lo, hi], {})
    if lo is None and hi is None:
        return "clamp with neither min nor max"
    if hi is None:
        return ElementwiseCall(OPS["clamp_min"], [bound["input"]], {"min": lo})
    if lo is None:
        return ElementwiseCall(OPS["clamp_max"], [bound["input"]], {"max": hi})
    return ElementwiseCall(OPS["clamp"], [bound["input"]], {"min": lo, "max": hi})


_spell(_normalize_clamp, torch.clamp, torch.clip, "clamp", "clip", aten.clamp.default, aten.clamp.Tensor,
       aten.clip.default)
_spell(_standard(OPS["clamp_min"], ("input", "min")), torch.clamp_min, "clamp_min", aten.clamp_min.default)
_spell(_standard(OPS["clamp_max"], ("input", "max")), torch.clamp_max, "clamp_max", aten.clamp_max.default)
_spell(_standard(OPS["clamp_min_tensor"], ("input", "min")), aten.clamp_min.Tensor)
_spell(_standard(OPS["clamp_max_tensor"], ("input", "max")), aten.clamp_max.Tensor)

# casts: the target dtype is read from the node's recorded output dtype, so every spelling of .to() agrees
_CAST_METHODS = ("to", "type", "float", "half", "bfloat16", "double", "int", "long", "short", "bool", "byte", "char")


def _normalize_cast(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
    src = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if not isinstance(src, fx.Node):
        return "cast of a non-tensor"
    src_dev, out_dev = src.meta.get("device"), node.meta.get("device")
    if src_dev is None or out_dev is None or src_dev != out_dev:
        return "cast that changes device"
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return "cast that changes memory_format"
    if node.target == "type" and not node.args[1:] and not node.kwargs:
        return "Tensor.type() without a dtype returns a string"
    return ElementwiseCall(OPS["cast"], [src], {})


_spell(_normalize_cast, *_CAST_METHODS, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
       aten.to.device, torch.ops.prims.convert_element_type.default)


# modules
_module(nn.ReLU, _mod(OPS["relu"]))
_module(nn.ReLU6, _mod(OPS["hardtanh"], min_val=lambda m: 0.0, max_val=lambda m: 6.0))
_module(nn.Sigmoid, _mod(OPS["sigmoid"]))
_module(nn.Tanh, _mod(OPS["tanh"]))
_module(nn.SiLU, _mod(OPS["silu"]))
_module(nn.Mish, _mod(OPS["mish"]))
_module(nn.Hardsigmoid, _mod(OPS["hardsigmoid"]))
_module(nn.Hardswish, _mod(OPS["hardswish"]))
_module(nn.LeakyReLU, _mod(OPS["leaky_relu"], negative_slope=lambda m: m.negative_slope))
_module(nn.ELU, _mod(OPS["elu"], alpha=lambda m: m.alpha, scale=lambda m: 1.0, input_scale=lambda m: 1.0))
_module(nn.SELU, _mod(OPS["elu"], **{k: (lambda m, v=v: v) for k, v in _SELU.items()}))
_module(nn.Hardtanh, _mod(OPS["hardtanh"], min_val=lambda m: m.min_val, max_val=lambda m: m.max_val))
_module(nn.Softplus, _mod(OPS["softplus"], beta=lambda m: m.beta, threshold=lambda m: m.threshold))


def _module_gelu(m: nn.Module, node: fx.Node) -> ElementwiseCall | str:
    if m.approximate not in ("none", "tanh"):
        return f"GELU(approximate={m.approximate!r})"
    return ElementwiseCall(OPS["gelu" if m.approximate == "none" else "gelu_tanh"], [node.args[0]], {})


_module(nn.GELU, _module_gelu)


def _unsupported(node: fx.Node, gm: fx.GraphModule) -> str:
    return "not an elementwise op fxopt knows"


def normalize(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
    """The node as a canonical elementwise call, or the reason it is not one (spelling-level only: dtypes and
    devices are checked by :func:`match_elementwise`)."""
    if node.op == "call_function":
        return _FUNCTION_SPELLINGS.get(node.target, _unsupported)(node, gm)
    if node.op == "call_method":
        if node.target.endswith("_") and not node.target.endswith("__"):
            return f"in-place method .{node.target}()"
        return _METHOD_SPELLINGS.get(node.target, _unsupported)(node, gm)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        fn = _MODULE_SPELLINGS.get(type(m))
        return fn(m, node) if fn is not None else f"module {type(m).__name__} is not elementwise"
    return f"{node.op} node"


# ---------------------------------------------------------------------------------------------------------------
# Dtype support
# ---------------------------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
SUPPORTED_DTYPES = FLOAT_DTYPES + INT_DTYPES + (torch.bool,)


def tensor_meta(node: Any):
    """The recorded TensorMetadata of a node's result, or None (not a node, not annotated, not a tensor)."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    return tm if hasattr(tm, "dtype") else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type arithmetic happens in: float16/bfloat16 load and store in their type, compute in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def promoted_dtype(operands: list[Operand]) -> torch.dtype:
    """torch's type promotion over one or two operands (tensors or Python scalars), from recorded dtypes and ranks."""

    def probe(o):
        tm = tensor_meta(o)
        if tm is None:
            return o  # a Python scalar
        return torch.empty((0,) * len(tm.shape), dtype=tm.dtype)  # rank matters: 0-d tensors promote like scalars

    probes = [probe(o) for o in operands]
    if len(probes) == 1:
        return probes[0].dtype
    assert len(probes) == 2, "promote-typed ops are unary or binary"
    return torch.result_type(*probes) if isinstance(probes[0], torch.Tensor) else torch.result_type(probes[1], probes[0])


_INTEGER_DIVISIONS = frozenset({"floor_divide", "trunc_divide", "remainder"})


def match_elementwise(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
    """The node as a fusible elementwise call, or why it cannot be fused (kept as data for the report)."""
    call = normalize(node, gm)
    if isinstance(call, str):
        return call
    tm = tensor_meta(node)
    if tm is None:
        return "no tensor shape/dtype recorded (run capture with example inputs)"
    if tm.dtype not in SUPPORTED_DTYPES:
        return f"output dtype {tm.dtype} not supported"
    device = node.meta.get("device")
    for o in call.operands:
        if isinstance(o, fx.Node):
            otm = tensor_meta(o)
            if otm is None:
                return f"operand {o.name} is not a tensor (a symbolic size?)"
            if otm.dtype not in SUPPORTED_DTYPES:
                return f"operand dtype {otm.dtype} not supported"
            if o.meta.get("device") != device:
                return f"operand {o.name} on {o.meta.get('device')}, result on {device}"
        elif not isinstance(o, (bool, int, float)):
            return f"operand of type {type(o).__name__}"
    for k, v in call.attrs.items():
        if v is None and call.op.name == "nan_to_num":
            continue  # posinf/neginf default to the dtype's extremes, filled in by the lowering
        if not isinstance(v, (bool, int, float)):
            return f"attribute {k}={v!r} is not a Python number"
    if call.op.name in _INTEGER_DIVISIONS and compute_dtype(tm.dtype) not in FLOAT_DTYPES:
        divisor = call.operands[1]
        if isinstance(divisor, fx.Node):
            # eager raises ZeroDivisionError on a zero divisor; a kernel would trap (SIGFPE) or return garbage
            return f"integer {call.op.name} by a tensor that may hold zeros"
        if divisor == 0:
            return f"integer {call.op.name} by zero"
    if call.op.floating_only and compute_dtype(tm.dtype) not in FLOAT_DTYPES and call.op.compute == "out":
        return f"{call.op.name} on {tm.dtype}"
    return call


# ---------------------------------------------------------------------------------------------------------------
# Ops that launch no kernel
# ---------------------------------------------------------------------------------------------------------------
VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "expand", "expand_as", "narrow", "select", "unbind", "split", "chunk", "detach", "movedim",
    "unfold", "as_strided", "diagonal", "swapaxes", "mT", "real",
})
VIEW_FUNCTIONS = frozenset({
    torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, torch.t,
    torch.narrow, torch.select, torch.unbind, torch.split, torch.chunk, torch.detach, torch.movedim,
    torch.swapaxes, torch.diagonal, torch.as_strided,
})
SHAPE_METHODS = frozenset({"size", "dim", "numel", "stride", "ndimension", "nelement", "get_device", "is_contiguous",
                           "element_size"})
SHAPE_FUNCTIONS = frozenset({builtins.getattr, builtins.len, torch.numel, torch.is_tensor, builtins.isinstance})
IDENTITY_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                    nn.AlphaDropout)
# ATen ops in exported graphs that check rather than compute
_ATEN_NO_KERNEL_PREFIXES = ("_assert", "sym_", "_guards")
IDENTITY_CAST_METHODS = frozenset(_CAST_METHODS)


def _is_basic_index(idx: Any) -> bool:
    """Integer/slice/None/Ellipsis indexing is a view; indexing with tensors or lists gathers (a kernel)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


def launches_kernel(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether a node, run eagerly, launches (at least) one kernel: the static launch count counts these.

    Not counted: placeholders, attributes, outputs, views and reshapes, shape reads, getitem on tuples and basic
    indexing, identities (Dropout in eval, nn.Identity, casts to the same dtype), and nodes whose result is not
    a tensor (Python arithmetic on sizes).
    """
    if node.op in ("placeholder", "get_attr", "output"):
        return False
    if node.meta.get("has_tensor") is False:
        return False  # annotated, and the result holds no tensor (a size, a Python number)
    target = node.target
    if node.op == "call_module":
        m = gm.get_submodule(target)
        # torch.export's input-guard module checks shapes on the host
        return not isinstance(m, IDENTITY_MODULES) and type(m).__name__ != "GuardsFn"
    if node.op == "call_method":
        if target in VIEW_METHODS or target in SHAPE_METHODS:
            return False
        if target == "contiguous" or target in IDENTITY_CAST_METHODS:
            return not _is_identity_copy(node)
        return True
    # call_function
    if target is operator.getitem:
        src = node.args[0]
        return tensor_meta(src) is not None and not _is_basic_index(node.args[1])
    if target in VIEW_FUNCTIONS or target in SHAPE_FUNCTIONS:
        return False
    if target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return bool(training)  # F.dropout(training=False) returns its input
    if isinstance(target, torch._ops.OpOverload):
        if target in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default):
            return not _is_identity_copy(node)  # their schema may alias, but a real cast copies
        if target.is_view or target.__name__.startswith(_ATEN_NO_KERNEL_PREFIXES):
            return False
        return True
    return True


def _is_identity_copy(node: fx.Node) -> bool:
    """A .to()/.contiguous()/.float()... that returns its input unchanged (same dtype, device and layout)."""
    src = node.args[0] if node.args else None
    tm_in, tm_out = tensor_meta(src), tensor_meta(node)
    if tm_in is None or tm_out is None:
        return False
    if node.target == aten._to_copy.default:
        return False  # _to_copy always copies
    return (tm_in.dtype == tm_out.dtype and tuple(tm_in.stride) == tuple(tm_out.stride)
            and src.meta.get("device") == node.meta.get("device")
            and not node.kwargs.get("copy", False))


def is_view_like(node: fx.Node) -> bool:
    """Whether the node's result shares its first argument's memory (views, reshapes, basic indexing, detach)."""
    t = node.target
    if node.op == "call_method":
        return t in VIEW_METHODS
    if node.op != "call_function":
        return False
    if t is operator.getitem:
        return tensor_meta(node.args[0]) is not None and _is_basic_index(node.args[1])
    if t is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in _VIEW_ATTRIBUTES
    if isinstance(t, torch._ops.OpOverload):
        return t.is_view
    return t in VIEW_FUNCTIONS


# Tensor attributes that are views of the tensor (x.T.mul_(3) writes into x).
_VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


def may_alias_input(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    """Whether the node's result may be its first argument's memory: views, and ops that return their input itself
    when there is nothing to do (``.contiguous()``, ``.to()``/``.float()`` to the same dtype, ``nn.Identity``,
    dropout in eval), and in-place ops (``y = x.add_(1)``: ``y`` is ``x``). A write into the result is a write into
    the input."""
    if is_view_like(node):
        return True
    if node.op in ("call_method", "call_function") or (node.op == "call_module" and gm is not None):
        if is_inplace(node, gm):
            return True
    if node.op == "call_method":
        return node.target == "contiguous" or node.target in _CAST_METHODS
    if node.op == "call_module" and gm is not None:
        return isinstance(gm.get_submodule(node.target), IDENTITY_MODULES)
    if node.op == "call_function":
        return node.target in (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.contiguous.default,
                               F.dropout, aten.dropout.default, torch.Tensor.contiguous)
    return False


def is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node writes into one of its inputs (``add_``, ``relu_``, ``inplace=True``, mutable ATen ops)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        if node.kwargs.get("inplace") or node.kwargs.get("out") is not None:
            return True
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target._schema.is_mutable
        if node.target in _INPLACE_OPERATORS:
            return True
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return False  # operator.and_ / or_ / not_ end in "_" but compute a new value
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__") and name != "__getitem__"
    return False


# Augmented assignment on tensors (x += y) writes into x.
_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                                operator.ilshift, operator.irshift, operator.imatmul})


def describe(node: fx.Node) -> str:
    """Short human name of a node's op, for reports: ``relu``, ``conv2d``, ``add``."""
    if node.op == "call_module":
        return node.target
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


# ---- row-wise reductions (fuse_reductions) ----
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
        bound = _bind(node, params)
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
        bound = _bind(node, params)
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
        bound = _bind(node, params)
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


def _row_module_softmax(name: str):
    def normalize(m: nn.Module, node: fx.Node) -> RowReductionCall | str:
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return "unexpected module call arguments"
        return RowReductionCall(ROW_REDUCTION_OPS[name], node.args[0], m.dim)

    return normalize


def _row_module_norm(m: nn.Module, node: fx.Node) -> RowReductionCall | str:
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


_ROW_MODULE_SPELLINGS[nn.Softmax] = _row_module_softmax("softmax")
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
        return None if mod_fn is None else mod_fn(gm.get_submodule(node.target), node)
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
