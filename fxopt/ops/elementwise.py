"""The elementwise table: each canonical elementwise op with its scalar C++ expression (shared by the C++ and CUDA
printers; ``fxopt/codegen/include/fxopt_kernel.h`` holds the helpers it calls), every spelling of it mapped to it
(:func:`normalize`), and the support check a fusion pass asks (:func:`match_elementwise`)."""

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

from .meta import FLOAT_DTYPES, SUPPORTED_DTYPES, Operand, bind_args, compute_dtype, tensor_meta

aten = torch.ops.aten


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
    gathers: bool = False  # reads its operand at another index of the last dim (NOTE [Gathering reads])


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

# NOTE [Gathering reads]: rotate_half(x) = cat((-x2, x1), -1) with x1, x2 = x.chunk(2, -1), the rotation of rotary
# position embeddings (Llama, GPT-NeoX, Mistral, Qwen: ``q * cos + rotate_half(q) * sin``). Its element j is
# -x[..., j + D/2] for j < D/2 and x[..., j - D/2] after: not a function of x's element j, but a read of x at another
# index of the last dim, which a generated kernel can do itself. So the op is in the table, as ``fxopt::rotate_half``
# (passes/rotary.py rewrites the chunk/slice + neg + cat spellings to it), and a fused kernel reads its operand
# rotated: rotary becomes one kernel instead of chunk + neg + cat + an elementwise kernel. Two rules make that
# possible: the operand must be a kernel input, read from memory (fuse_elementwise never groups the op with its
# operand's producer), and only the strided kernel, which knows each element's last-dim index, computes it
# (codegen/printer.py). The eager op (CompositeImplicitAutograd) is the chunk + neg + cat it replaces.
ROTATE_HALF = _op("rotate_half", 1, "{0}", floating_only=True, gathers=True)
_library = torch.library.Library("fxopt", "FRAGMENT")
_library.define("rotate_half(Tensor self) -> Tensor")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The second half of the last dim negated, then the first: ``cat((-x2, x1), -1)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


_library.impl("rotate_half", rotate_half, "CompositeImplicitAutograd")

# NOTE [3xTF32 GEMMs] (passes/tf32x3.py): a float32 GEMM's input split into its TF32 part and the remainder, so
# that three TF32 products give float32's accuracy; elementwise, so the split joins the kernel that produces the
# input. Eager: the same bit operations as torch ops.
TF32_HI = _op("tf32_hi", 1, "fx_tf32_hi({0})", floating_only=True)
TF32_LO = _op("tf32_lo", 1, "fx_tf32_lo({0})", floating_only=True)
_library.define("tf32_hi(Tensor self) -> Tensor")
_library.define("tf32_lo(Tensor self) -> Tensor")


def tf32_hi(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to the nearest TF32 value (ties to even; truncated where rounding up would overflow), a
    non-finite value as it is. Rounded, not truncated: the remainder then has either sign, and its error does not
    add up through a network (NOTE [3xTF32 GEMMs])."""
    u = x.contiguous().view(torch.int32).view(x.shape)
    nearest = ((u + (0xFFF + ((u >> 13) & 1))) & ~0x1FFF).view(torch.float32)
    hi = torch.where(torch.isfinite(nearest), nearest, (u & ~0x1FFF).view(torch.float32))
    return torch.where(torch.isfinite(x), hi, x)


def tf32_lo(x: torch.Tensor) -> torch.Tensor:
    """``x - tf32_hi(x)``, exact in float32 (0 for a non-finite value)."""
    return torch.where(torch.isfinite(x), x - tf32_hi(x), torch.zeros_like(x))


_library.impl("tf32_hi", tf32_hi, "CompositeImplicitAutograd")
_library.impl("tf32_lo", tf32_lo, "CompositeImplicitAutograd")

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


def _standard(op: ElementwiseOp, params: tuple[str, ...], defaults: dict[str, Any] | None = None,
              fixed: dict[str, Any] | None = None, check: Callable[[dict], str | None] | None = None) -> Normalizer:
    """Normalizer for a spelling whose first ``op.arity`` parameters are the operands, the rest attributes."""
    defaults = defaults or {}
    fixed = fixed or {}

    def normalize(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
        bound = bind_args(node, params)
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
    bound = bind_args(node, ("input", "other", "rounding_mode"))
    if isinstance(bound, str):
        return bound
    mode = bound.get("rounding_mode")
    op = {None: OPS["div"], "floor": OPS["floor_divide"], "trunc": OPS["trunc_divide"]}.get(mode)
    if op is None:
        return f"unknown rounding_mode={mode!r}"
    return ElementwiseCall(op, [bound["input"], bound["other"]], {})


def _check_rotate_half(bound: dict) -> str | None:
    x = bound["self"]
    tm = tensor_meta(x) if isinstance(x, fx.Node) else None
    if tm is None or len(tm.shape) == 0 or tm.shape[-1] % 2:
        return "rotate_half of a tensor without an even last dim"
    return None


_spell(_standard(ROTATE_HALF, ("self",), check=_check_rotate_half), torch.ops.fxopt.rotate_half.default,
       torch.ops.fxopt.rotate_half)

_spell(_standard(TF32_HI, ("self",)), torch.ops.fxopt.tf32_hi.default, torch.ops.fxopt.tf32_hi)
_spell(_standard(TF32_LO, ("self",)), torch.ops.fxopt.tf32_lo.default, torch.ops.fxopt.tf32_lo)

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
    bound = bind_args(node, ("input", "condition", "other"))
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
    bound = bind_args(node, ("input", "approximate"))
    if isinstance(bound, str):
        return bound
    approximate = bound.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        return f"gelu(approximate={approximate!r})"
    return ElementwiseCall(OPS["gelu" if approximate == "none" else "gelu_tanh"], [bound["input"]], {})


_spell(_normalize_gelu, F.gelu, aten.gelu.default)


def _normalize_clamp(node: fx.Node, gm: fx.GraphModule) -> ElementwiseCall | str:
    bound = bind_args(node, ("input", "min", "max"))
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
CAST_METHODS = ("to", "type", "float", "half", "bfloat16", "double", "int", "long", "short", "bool", "byte", "char")


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


_spell(_normalize_cast, *CAST_METHODS, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout,
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


def method_names() -> frozenset[str]:
    """Every ``call_method`` name the elementwise table has a spelling for (``"relu"``, ``"add"``, ``"to"``, ...)."""
    return frozenset(_METHOD_SPELLINGS)
