"""The op table (fxopt/ops/), op by op: every canonical elementwise op, in one or more spellings, fused with a
second cheap op into one generated C++ kernel and checked against eager on inputs with NaN, +-inf, -0.0 and
negative values; and every spelling of an op mapping to the same canonical op (torch.*, F.*, nn.*, methods,
Python operators, aten.* from torch.export).

The table ``CASES`` is also read by tests/codegen/test_cuda_source.py, which prints the same regions as CUDA C++.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt import ops
from fxopt.launches import dispatched_ops
from fxopt.runtime.kernel import fused_op
from fxopt.verify import compare

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
i32, i64, i16, i8, u8 = torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8
BOOL = torch.bool

FLOATS = (f32, f16, bf16, f64)
INTS = (i32, i64)

SHAPE = (3, 8)
NAN, INF = math.nan, math.inf
# 24 values: NaN, +-inf, -0.0, 0.0, negatives, fractions, halves (round-half-to-even), values past 1 (acos/asin
# domain), large enough to saturate sigmoid/tanh and to overflow exp in float16.
SPECIAL = [NAN, INF, -INF, -0.0, 0.0, -1.5, -0.5, 0.5, 1.0, 2.5, 3.0, -3.0,
           7.25, -7.25, 0.1, -2.0, 20.5, -20.5, 1e-3, 4.0, -1.0, 2.0, 0.75, 1.5]
FINITE = [v for v in SPECIAL if math.isfinite(v)] + [0.3, -0.3, 5.5]
INT_VALUES = [-7, -3, -2, -1, 0, 1, 2, 3, 5, 9, -9, 4, 6, -5, 8, 7, -4, -6, 10, -10, 11, 12, 13, -8]
NONZERO_INT = [v if v != 0 else 3 for v in INT_VALUES]
assert len(SPECIAL) == len(INT_VALUES) == 24


def _roll(values, k):
    return values[k:] + values[:k]


def _tensor(values, dtype, k=0):
    return torch.tensor(_roll(list(values), k)[:24], dtype=torch.float64).to(dtype).reshape(SHAPE)


def make_arg(kind: str, dtype: torch.dtype, k: int) -> torch.Tensor:
    """One input of a case. ``kind``: x (any values), n (nonzero), p (> 0), w (weights in [0, 1]), f (finite),
    e (small non-negative integers: exponents), b (bool, whatever the dtype)."""
    if kind == "b":
        return torch.tensor([(v * (k + 3)) % 3 == 0 for v in range(24)]).reshape(SHAPE)
    if dtype == BOOL:
        return torch.tensor([(v * (k + 2)) % 5 < 2 for v in range(24)]).reshape(SHAPE)
    if not dtype.is_floating_point:
        if kind == "e":
            return _tensor([abs(v) % 4 for v in INT_VALUES], dtype, k)
        if kind == "n":
            return _tensor(NONZERO_INT, dtype, 5 * k)
        values = INT_VALUES if dtype != u8 else [abs(v) for v in INT_VALUES]
        return _tensor(values, dtype, 5 * k)
    if kind == "x":
        return _tensor(SPECIAL, dtype, 7 * k)
    if kind == "f":
        return _tensor(FINITE, dtype, 7 * k)
    if kind == "n":
        return _tensor([v if v != 0 else 2.0 for v in SPECIAL], dtype, 7 * k)
    if kind == "p":
        return _tensor([abs(v) + 0.25 if math.isfinite(v) else 2.0 for v in SPECIAL], dtype, 7 * k)
    if kind == "e":
        return _tensor([(abs(v) % 4) if math.isfinite(v) else 2.0 for v in SPECIAL], dtype, 7 * k)
    if kind == "w":
        return _tensor([(i % 9) / 8 for i in range(24)], dtype, k)
    raise ValueError(kind)


@dataclass(frozen=True)
class Case:
    """One row: an op spelling applied to inputs of ``kinds`` (dtype from the param, ``b`` always bool)."""

    id: str
    canonical: str  # the canonical op (ops.ELEMENTWISE_OPS key) the spelling maps to
    fn: Callable  # called on the inputs inside forward; a nn.Module is registered as a submodule
    kinds: str  # one letter per input (see make_arg)
    dtypes: tuple[torch.dtype, ...]
    module: Callable[[], nn.Module] | None = None  # module spelling: fn is ignored

    def inputs(self, dtype: torch.dtype) -> list[torch.Tensor]:
        return [make_arg(kind, dtype, k) for k, kind in enumerate(self.kinds)]


def C(id, canonical, fn, kinds, dtypes, module=None):
    return Case(id, canonical, fn, kinds, tuple(dtypes), module)


def _rot(*extra):
    """float32 always, plus the float types in ``extra``."""
    return (f32, *extra)


# Each row's dtypes are chosen so that every dtype fxopt supports appears across the table, while keeping the
# number of generated kernels (one C++ compile each, ~0.2 s) bounded.
CASES: list[Case] = [
    # arithmetic
    C("add", "add", operator.add, "xx", FLOATS + INTS + (i16, u8)),
    C("add_alpha", "add", lambda x, y: torch.add(x, y, alpha=2), "xx", (f32, i64)),
    C("add_scalar", "add", lambda x: x + 2.5, "x", (bf16, i32)),
    C("add_method", "add", lambda x, y: x.add(y, alpha=-1), "xx", (f64,)),
    C("sub", "sub", operator.sub, "xx", (bf16, i32)),
    C("sub_alpha", "sub", lambda x, y: torch.sub(x, y, alpha=0.5), "xx", (f16,)),
    C("rsub_tensor", "rsub", torch.rsub, "xx", (f32, i64)),
    C("rsub_scalar", "rsub", lambda x: torch.rsub(x, 2.0), "x", (f16,)),
    C("sub_scalar_left", "sub", lambda x: 3 - x, "x", (f32, i32)),
    C("mul", "mul", operator.mul, "xx", (f32, f16, i32, u8)),
    C("mul_scalar_left", "mul", lambda x: 2 * x, "x", (i64,)),
    C("mul_float_scalar", "mul", lambda x: x * 1.5, "x", (BOOL, i32)),  # int tensor * float -> float
    C("div", "div", operator.truediv, "xx", (f32, f16, f64)),
    C("div_int_to_float", "div", torch.div, "xx", INTS),
    C("div_scalar", "div", lambda x: x / 3.0, "x", (f64, i32)),
    C("floor_divide", "floor_divide", operator.floordiv, "xx", (f32, f16)),
    # integer division by a tensor is never fused (it may hold zeros: eager raises, a kernel would trap)
    C("floor_divide_int", "floor_divide", lambda x: x // 3, "x", INTS),
    C("floor_divide_scalar", "floor_divide", lambda x: x // -3, "x", (f32, i64)),
    C("div_floor", "floor_divide", lambda x, y: torch.div(x, y, rounding_mode="floor"), "xx", (bf16,)),
    C("div_trunc", "trunc_divide", lambda x, y: torch.div(x, y, rounding_mode="trunc"), "xx", (f32, f64)),
    C("div_trunc_int", "trunc_divide", lambda x: torch.div(x, -3, rounding_mode="trunc"), "x", INTS),
    C("remainder", "remainder", operator.mod, "xx", (f32, f16)),
    C("remainder_int", "remainder", lambda x: x % -3, "x", INTS),
    C("remainder_scalar", "remainder", lambda x: torch.remainder(x, -2.5), "x", (f32,)),
    C("remainder_int_scalar", "remainder", lambda x: x % 3, "x", (i32,)),
    C("neg", "neg", operator.neg, "x", (f32, i32)),
    C("neg_method", "neg", lambda x: x.neg(), "x", (bf16, i64)),
    # a rotated read of the input (NOTE [Gathering reads]); its spellings: tests/passes/test_rotary.py
    C("rotate_half", "rotate_half", lambda x: torch.ops.fxopt.rotate_half(x), "x", (f32, bf16)),
    # 3xTF32's split of a float32 GEMM's input (NOTE [3xTF32 GEMMs]); non-finite values: tests/passes/test_tf32x3.py
    C("tf32_hi", "tf32_hi", lambda x: torch.ops.fxopt.tf32_hi(x), "x", (f32,)),
    C("tf32_lo", "tf32_lo", lambda x: torch.ops.fxopt.tf32_lo(x), "x", (f32,)),
    C("abs", "abs", torch.abs, "x", (f32, i32)),
    C("abs_method", "abs", lambda x: x.abs(), "x", (bf16, i64)),
    C("pow_tensor", "pow", torch.pow, "xx", (f32, f16)),
    C("pow_tensor_int", "pow", torch.pow, "xe", INTS),
    C("pow_scalar_2", "pow", lambda x: x ** 2, "x", (bf16, i32)),
    C("pow_scalar_3", "pow", lambda x: x ** 3, "x", (f64, i64)),
    C("pow_scalar_half", "pow", lambda x: torch.pow(x, 0.5), "x", (f32, f64, f16)),
    C("pow_scalar_minus_half", "pow", lambda x: x.pow(-0.5), "x", (f32,)),
    C("pow_scalar_neg", "pow", lambda x: x ** -1.5, "x", (f32,)),
    C("pow_scalar_base", "pow", lambda x: 2 ** x, "x", (f32, f16)),
    C("reciprocal", "reciprocal", torch.reciprocal, "x", (f32, bf16)),
    C("reciprocal_int", "reciprocal", torch.reciprocal, "n", (i32,)),
    C("sign", "sign", torch.sign, "x", (f32, i32)),
    C("lerp_scalar", "lerp", lambda x, y: torch.lerp(x, y, 0.3), "xx", (f32, f16)),
    C("lerp_scalar_high", "lerp", lambda x, y: torch.lerp(x, y, 0.75), "xx", (f64,)),
    C("lerp_tensor", "lerp", torch.lerp, "xxw", (f32, bf16)),
    C("addcmul", "addcmul", lambda x, y, z: torch.addcmul(x, y, z, value=0.5), "xxx", (f32, f16)),
    C("addcmul_int", "addcmul", lambda x, y, z: torch.addcmul(x, y, z, value=2), "xxx", (i64,)),
    C("addcmul_default", "addcmul", torch.addcmul, "xxx", (f64,)),
    C("addcdiv", "addcdiv", lambda x, y, z: torch.addcdiv(x, y, z, value=2.0), "xxx", (f32, bf16)),
    C("minimum", "minimum", torch.minimum, "xx", (f16, i32)),
    C("maximum", "maximum", torch.maximum, "xx", (f32, i64)),
    C("maximum_mixed", "maximum", torch.maximum, "xx", (f64,)),
    # transcendental (float-only helpers; integer inputs promote to float)
    *[C(name, name, getattr(torch, name), "x", (f32, extra) if k % 2 == 0 else (extra,))
      for k, (name, extra) in enumerate( [("sqrt", f16), ("rsqrt", bf16), ("exp", f16), ("exp2", f64), ("log", bf16),
                          ("log2", f16), ("log10", f64), ("log1p", f16), ("expm1", bf16), ("sin", f64),
                          ("cos", f16), ("tan", f64), ("tanh", bf16), ("sigmoid", f16), ("erf", f64),
                          ("erfc", bf16), ("atan", f16), ("asin", f64), ("acos", bf16), ("sinh", f16),
                          ("cosh", f64)])],
    C("sqrt_int", "sqrt", torch.sqrt, "x", (i64,)),
    C("exp_int", "exp", torch.exp, "x", (i32,)),
    C("sigmoid_bool", "sigmoid", torch.sigmoid, "x", (BOOL,)),
    # rounding
    C("floor", "floor", torch.floor, "x", (f32, i32)),
    C("ceil", "ceil", torch.ceil, "x", (bf16, i64)),
    C("round", "round", torch.round, "x", (f32, f16)),
    C("round_int", "round", torch.round, "x", (i32,)),
    C("trunc", "trunc", torch.trunc, "x", (f32, bf16)),
    C("frac", "frac", torch.frac, "x", (f32, f64)),
    # activations
    C("relu", "relu", torch.relu, "x", (f32, f16, bf16, i64)),
    C("relu6", "hardtanh", F.relu6, "x", (f32, f16)),  # relu6 is hardtanh(0, 6) in the op table
    C("relu6_module", "hardtanh", None, "x", (f32,), module=nn.ReLU6),
    C("leaky_relu", "leaky_relu", lambda x: F.leaky_relu(x, 0.2), "x", (f32, bf16)),
    C("leaky_relu_module", "leaky_relu", None, "x", (f64,), module=lambda: nn.LeakyReLU(0.1)),
    C("elu", "elu", lambda x: F.elu(x, alpha=1.3), "x", (f32, f16)),
    C("elu_module", "elu", None, "x", (f32,), module=lambda: nn.ELU(0.5)),
    C("selu", "elu", F.selu, "x", (f32, bf16)),
    C("selu_module", "elu", None, "x", (f64,), module=nn.SELU),
    # gelu on finite inputs: eager's CPU gelu of float32/bfloat16 goes through oneDNN, which gives NaN for +inf
    # where ATen's own formula gives +inf (test_gelu_at_nonfinite_and_huge_values covers those)
    C("gelu", "gelu", F.gelu, "f", (f32, f16)),
    C("gelu_tanh", "gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), "x", (f32, bf16)),
    C("gelu_module", "gelu", None, "f", (f32,), module=nn.GELU),
    C("gelu_tanh_module", "gelu_tanh", None, "x", (f64,), module=lambda: nn.GELU(approximate="tanh")),
    C("silu", "silu", F.silu, "x", (f32, bf16)),
    C("silu_module", "silu", None, "x", (f64,), module=nn.SiLU),
    C("mish", "mish", F.mish, "x", (f32, f16)),
    C("mish_module", "mish", None, "x", (f64,), module=nn.Mish),
    C("hardtanh", "hardtanh", lambda x: F.hardtanh(x, -2.0, 3.0), "x", (f32, bf16)),
    C("hardtanh_module", "hardtanh", None, "x", (f32,), module=nn.Hardtanh),
    C("hardsigmoid", "hardsigmoid", F.hardsigmoid, "x", (f32, f16)),
    C("hardsigmoid_module", "hardsigmoid", None, "x", (f64,), module=nn.Hardsigmoid),
    C("hardswish", "hardswish", F.hardswish, "x", (f32, bf16)),
    C("hardswish_module", "hardswish", None, "x", (f16,), module=nn.Hardswish),
    C("softplus", "softplus", F.softplus, "x", (f32, f16)),
    C("softplus_beta", "softplus", lambda x: F.softplus(x, beta=2.0, threshold=5.0), "x", (f64,)),
    C("softplus_module", "softplus", None, "x", (f32,), module=lambda: nn.Softplus(0.5, 3.0)),
    C("sigmoid_module", "sigmoid", None, "x", (bf16,), module=nn.Sigmoid),
    C("tanh_module", "tanh", None, "x", (f16,), module=nn.Tanh),
    # clamp: scalar bounds, one bound, tensor bounds
    C("clamp", "clamp", lambda x: torch.clamp(x, -1.0, 2.0), "x", (f32, f16)),
    C("clamp_int", "clamp", lambda x: torch.clamp(x, -2, 3), "x", (i32, i64)),
    C("clamp_min_kw", "clamp_min", lambda x: torch.clamp(x, min=0.5), "x", (f32, bf16)),
    C("clamp_max_kw", "clamp_max", lambda x: x.clamp(max=0.5), "x", (f32, i64)),
    C("clamp_min", "clamp_min", lambda x: torch.clamp_min(x, -1.0), "x", (f16,)),
    C("clamp_max", "clamp_max", lambda x: torch.clamp_max(x, 1.0), "x", (f64,)),
    C("clip", "clamp", lambda x: torch.clip(x, -0.5, 0.5), "x", (f32,)),
    C("clamp_tensor", "clamp_tensor", torch.clamp, "xff", (f32, f16)),  # finite bounds
    C("clamp_tensor_nan_bound", "clamp_tensor", torch.clamp, "xxx", (f32,)),
    C("clamp_tensor_int", "clamp_tensor", torch.clamp, "xxx", INTS),
    C("clamp_tensor_min", "clamp_min_tensor", lambda x, lo: torch.clamp(x, min=lo), "xf", (f32, bf16)),
    C("clamp_tensor_max", "clamp_max_tensor", lambda x, hi: torch.clamp(x, max=hi), "xf", (f32,)),
    C("clamp_tensor_min_int", "clamp_min_tensor", lambda x, lo: torch.clamp(x, min=lo), "xx", (i32,)),
    # where
    C("where", "where", torch.where, "bxx", (f32, bf16, i64, BOOL)),
    C("where_scalar", "where", lambda c, x: torch.where(c, x, 0.5), "bx", (f32, bf16)),
    C("where_method", "where", lambda c, x, y: x.where(c, y), "bxx", (f64,)),
    # casts (the source dtype is the param; every cast changes the dtype, so none is an identity)
    C("to_double", "cast", lambda x: x.to(torch.float64), "x", (f32, i32)),
    C("to_dtype_kw", "cast", lambda x: x.to(dtype=torch.float32), "x", (f64, BOOL)),
    C("float", "cast", lambda x: x.float(), "x", (f16, i64)),
    C("half", "cast", lambda x: x.half(), "x", (f32, bf16)),
    C("bfloat16", "cast", lambda x: x.bfloat16(), "x", (f32, f16)),
    # float -> int of NaN/inf is undefined in C++ and implementation-defined in eager: finite inputs
    C("int", "cast", lambda x: x.int(), "f", (f32, f16, i64, BOOL)),
    C("long", "cast", lambda x: x.long(), "f", (bf16, i32)),
    C("bool", "cast", lambda x: x.bool(), "x", (f32, i64)),
    # nan_to_num
    C("nan_to_num", "nan_to_num", torch.nan_to_num, "x", (f32, f16)),
    C("nan_to_num_args", "nan_to_num", lambda x: torch.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-3.0), "x",
      (f32, f16, bf16)),
    C("nan_to_num_method", "nan_to_num", lambda x: x.nan_to_num(posinf=100.0), "x", (f32,)),
    # comparisons
    C("eq", "eq", operator.eq, "xx", (f32, i32, BOOL)),
    C("ne", "ne", operator.ne, "xx", (bf16, i64)),
    C("lt", "lt", operator.lt, "xx", (f32, i32)),
    C("le", "le", torch.le, "xx", (f16, i64)),
    C("gt", "gt", lambda x: x > 0.5, "x", (f32, i32)),
    C("ge", "ge", lambda x: torch.ge(x, -1), "x", (f32, i64)),
    C("eq_scalar", "eq", lambda x: x == 2, "x", (f64, i32)),
    # 0.1 is not a float16/bfloat16 value: eager rounds the scalar to the tensor's dtype before comparing
    C("eq_scalar_inexact", "eq", lambda x: x == 0.1, "x", (f32, f16, bf16)),
    C("lt_scalar_inexact", "lt", lambda x: x < 0.1, "x", (f16,)),
    # logic
    C("logical_and", "logical_and", torch.logical_and, "xx", (f32, BOOL)),
    C("logical_or", "logical_or", torch.logical_or, "xx", (i64, BOOL)),
    C("logical_xor", "logical_xor", torch.logical_xor, "xx", (f16, BOOL)),
    C("logical_not", "logical_not", torch.logical_not, "x", (f32, i64, BOOL)),
    C("isnan", "isnan", torch.isnan, "x", (f32, f16)),
    C("bitwise_and", "bitwise_and", torch.bitwise_and, "xx", (i64, u8, BOOL)),
    C("bitwise_and_operator", "bitwise_and", operator.and_, "xx", (i32, BOOL)),
    C("bitwise_or", "bitwise_or", torch.bitwise_or, "xx", (i8, BOOL)),
    C("bitwise_or_operator", "bitwise_or", operator.or_, "xx", (i64,)),
    C("bitwise_xor", "bitwise_xor", operator.xor, "xx", (i16, BOOL)),
    C("bitwise_and_scalar", "bitwise_and", lambda x: torch.bitwise_and(x, 6), "x", (i32,)),
    C("bitwise_not", "bitwise_not", operator.invert, "x", (i32, u8, BOOL)),
    C("bitwise_not_fn", "bitwise_not", torch.bitwise_not, "x", (i64,)),
]

CASE_BY_ID = {c.id: c for c in CASES}
assert len(CASE_BY_ID) == len(CASES), "duplicate case ids"


def _post_for(dtype: torch.dtype) -> Callable:
    """The second, cheap op valid for the op's output dtype, so each case is a 2-node group. Picked before
    tracing: symbolic_trace cannot branch on a traced dtype."""
    if dtype == torch.bool:
        return operator.invert
    if dtype.is_floating_point:
        return lambda t: t * 2
    return lambda t: t + 1


class _Op1(nn.Module):
    def __init__(self, fn, post):
        super().__init__()
        self.fn = fn
        self.post = post

    def forward(self, x):
        return self.post(self.fn(x))


class _Op2(_Op1):
    def forward(self, x, y):
        return self.post(self.fn(x, y))


class _Op3(_Op1):
    def forward(self, x, y, z):
        return self.post(self.fn(x, y, z))


class _ModuleOp(nn.Module):
    def __init__(self, mod: nn.Module, post):
        super().__init__()
        self.op = mod
        self.post = post

    def forward(self, x):
        return self.post(self.op(x))


def build(case: Case, dtype: torch.dtype) -> tuple[nn.Module, list[torch.Tensor]]:
    """The case's model (op, then a cheap op) and its inputs for ``dtype``."""
    inputs = case.inputs(dtype)
    op = case.module() if case.module is not None else case.fn
    with torch.no_grad():
        out_dtype = op(*inputs).dtype
    post = _post_for(out_dtype)
    if case.module is not None:
        return _ModuleOp(op, post).eval(), inputs
    return {1: _Op1, 2: _Op2, 3: _Op3}[len(case.kinds)](op, post).eval(), inputs


def fused_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fused_op]


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """fxopt.verify.compare (structure, dtype, shape, tolerance by dtype, NaN positions), plus what it lets
    through: infinities exactly where eager has them (with their sign), and the sign of exact zeros."""
    mismatch = compare(actual, expected)
    assert mismatch is None, f"{what}: {mismatch}\nactual:\n{actual}\neager:\n{expected}"
    if isinstance(expected, torch.Tensor) and expected.is_floating_point():
        inf_e = torch.isinf(expected)
        assert torch.equal(torch.isinf(actual), inf_e), f"{what}: inf positions differ\n{actual}\n{expected}"
        assert torch.equal(actual[inf_e], expected[inf_e]), f"{what}: inf signs differ\n{actual}\n{expected}"
        zeros = (expected == 0) & (actual == 0)
        assert torch.equal(torch.signbit(actual[zeros]), torch.signbit(expected[zeros])), (
            f"{what}: sign of zero differs\n{actual}\n{expected}")


def xfail_bug(reason: str):
    return pytest.mark.xfail(strict=True, reason=f"BUG: {reason}")


# Known bugs: (case id, dtype or None for every dtype) -> reason. Strict xfails, so a fix shows up as XPASS.
KNOWN_BUGS: dict[tuple[str, torch.dtype | None], str] = {
}


def _params():
    out = []
    for c in CASES:
        for d in c.dtypes:
            reason = KNOWN_BUGS.get((c.id, d)) or KNOWN_BUGS.get((c.id, None))
            marks = [xfail_bug(reason)] if reason else []
            out.append(pytest.param(c, d, id=f"{c.id}-{str(d).replace('torch.', '')}", marks=marks))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Compiling ~280 kernels one after the other is most of this file's time (one g++ run each). A helper process
# builds the same sources through fxopt's compile_cpp, from the end of the list, into the session's kernel
# cache (FXOPT_CACHE_DIR, set by conftest.py): the tests then find most libraries built. Purely an accelerator:
# without it (or if it fails) every test compiles its own kernel as usual.
# ---------------------------------------------------------------------------------------------------------------
_PREWARM_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_fxopt_test_ops_prewarm", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
mod.prewarm(json.load(open(sys.argv[2])))
"""


def _kernels_without_compiling(case: Case, dtype: torch.dtype) -> list:
    """The kernels fuse_elementwise builds for a case, with the compile step skipped (their source is set)."""
    import importlib

    from fxopt.runtime.kernel import FusedKernel

    fe_mod = importlib.import_module("fxopt.passes.fuse_elementwise")
    model, inputs = build(case, dtype)
    gm = fxopt.capture(model, inputs)
    mp = pytest.MonkeyPatch()
    mp.setattr(FusedKernel, "compile", lambda self: self)
    mp.setattr(fe_mod, "register", lambda k: k, raising=False)
    try:
        fe_mod.fuse_elementwise("cpp")(gm)
    finally:
        mp.undo()
    return list(gm.meta.get("fxopt_kernels", {}).values())


def prewarm(params: list[tuple[str, str]]) -> None:
    """(In the helper process) compile the kernels of ``params`` (case id, dtype name), last first."""
    from fxopt.runtime.cc import compile_cpp

    for case_id, dtype_name in reversed(params):
        try:
            for kernel in _kernels_without_compiling(CASE_BY_ID[case_id], getattr(torch, dtype_name)):
                compile_cpp(kernel.source, name_hint=kernel.name)
        except Exception:  # noqa: BLE001 - known-bug cases fail to lower or compile; their tests say so
            pass


@pytest.fixture(scope="module")
def _prewarm_state():
    state: dict = {}
    yield state
    for proc in state.get("procs", []):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def prewarmed_kernels(request, _prewarm_state, tmp_path_factory):
    if "procs" in _prewarm_state:
        return
    import json
    import os
    import subprocess
    import sys

    selected = [item.callspec.params for item in request.session.items
                if getattr(item, "originalname", None) == "test_op_fuses_and_matches_eager"]
    params = [(p["case"].id, str(p["dtype"]).replace("torch.", "")) for p in selected]
    _prewarm_state["procs"] = []
    if len(params) < 20 or not os.environ.get("FXOPT_CACHE_DIR") or os.environ.get("FXOPT_TEST_PREWARM") == "0":
        return  # a few tests: not worth a process
    # the tests go forward from the start, the helper backwards from the end
    listing = tmp_path_factory.mktemp("prewarm") / "params.json"
    listing.write_text(json.dumps(params))
    _prewarm_state["procs"] = [subprocess.Popen([sys.executable, "-c", _PREWARM_SCRIPT, __file__, str(listing)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                env=dict(os.environ))]


@pytest.mark.parametrize("case,dtype", _params())
def test_op_fuses_and_matches_eager(prewarmed_kernels, case: Case, dtype: torch.dtype):
    model, inputs = build(case, dtype)
    with torch.no_grad():
        expected = model(*inputs)
    opt = fxopt.optimize(model, inputs, backend="cpp", strict=True)
    assert opt.capture_info.method == "symbolic_trace"  # the torch-level spelling is what is tested
    rec = next(r for r in opt.records if r.name == "fuse_elementwise")
    assert rec.status == "applied", (rec.status, rec.notes, opt.code)
    assert rec.changes == {"groups": 1, "nodes_fused": 2}, (rec.changes, opt.code)
    assert len(fused_nodes(opt.graph_module)) == 1, opt.code
    with torch.no_grad():
        actual = opt(*inputs)
        # one launch: the fused kernel, nothing else
        assert dict(dispatched_ops(opt.graph_module, inputs)) == {"fxopt.fused.default": 1}
    assert_same(actual, expected, f"{case.id} {dtype}")
    # the kernel computes the canonical op the table says, then the cheap op
    (kernel,) = opt.kernels.values()
    assert kernel.op_names[0] == case.canonical, kernel.op_names
    assert len(kernel.op_names) == 2


# NOTE [gelu at +inf]: eager's CPU gelu sends contiguous float32/bfloat16 tensors of more than one element to
# oneDNN (when torch.backends.mkldnn is enabled), whose gelu_erf gives NaN for +inf and overflows to inf near the
# float32 maximum; ATen's formula x * 0.5 * (1 + erf(x / sqrt(2))), which eager uses everywhere else (one element,
# float16, float64, oneDNN off, and CUDA), gives +inf and 3e38. fxopt's fx_gelu is that formula on every backend,
# and at -inf both give NaN (-inf * 0). Where eager went through oneDNN, verification rolls a fused gelu back rather
# than return a different value (fuzz seed 61206129, tests/fuzz/test_regressions.py).
GELU_EDGES = [INF, -INF, NAN, -0.0, 0.0, 1e30, -1e30, 3e38, -3e38, 1e4, -1e4, 65504.0, -65504.0, 5.5, -5.5, 9.0,
              -9.0, 20.0, -20.0, 1e-30, 0.5, -0.5, 1.0, -1.0]


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch.backends.mkldnn.flags says it
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).replace("torch.", ""))
def test_gelu_at_nonfinite_and_huge_values(dtype, approximate):
    x = torch.tensor(GELU_EDGES, dtype=torch.float64).to(dtype).reshape(SHAPE)
    model = _Op1(lambda t: F.gelu(t, approximate=approximate), lambda t: t * 2).eval()
    with torch.backends.mkldnn.flags(enabled=False):  # eager = ATen's formula (NOTE [gelu at +inf])
        with torch.no_grad():
            expected = model(x)
        opt = fxopt.optimize(model, [x], backend="cpp", strict=True)
        with torch.no_grad():
            actual = opt(x)
    assert len(fused_nodes(opt.graph_module)) == 1, opt.code
    assert_same(actual, expected, f"gelu({approximate}) {dtype}")
    if approximate == "none":  # the values the fuzz case hit, spelled out
        assert actual[0, 0] == INF and math.isnan(actual[0, 1]) and math.isnan(actual[0, 2])


def test_table_covers_every_canonical_op_and_dtype():
    covered = {c.canonical for c in CASES}
    assert covered == set(ops.ELEMENTWISE_OPS), (set(ops.ELEMENTWISE_OPS) - covered, covered - set(ops.ELEMENTWISE_OPS))
    covered_dtypes = {d for c in CASES for d in c.dtypes}
    assert set(ops.SUPPORTED_DTYPES) <= covered_dtypes, set(ops.SUPPORTED_DTYPES) - covered_dtypes


def test_dropout_in_eval_is_removed_and_its_neighbours_fuse():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return torch.relu(self.drop(x * 3)) + 1

    m = M().train()  # optimize works on an eval copy
    x = make_arg("x", f32, 0)
    opt = fxopt.optimize(m, [x], backend="cpp", strict=True)
    recs = {r.name: r for r in opt.records}
    assert recs["remove_dropout"].changes == {"dropouts_removed": 1}
    assert recs["fuse_elementwise"].changes == {"groups": 1, "nodes_fused": 3}
    with torch.no_grad():
        assert_same(opt(x), m.eval()(x), "dropout")
        assert dict(dispatched_ops(opt.graph_module, [x])) == {"fxopt.fused.default": 1}


def test_functional_dropout_eval_fuses():
    class M(nn.Module):
        def forward(self, x):
            return F.dropout(x.sigmoid(), 0.3, training=False) * 2

    x = make_arg("x", f32, 1)
    opt = fxopt.optimize(M(), [x], backend="cpp", strict=True)
    with torch.no_grad():
        assert_same(opt(x), M()(x), "F.dropout")
    assert len(fused_nodes(opt.graph_module)) == 1


_INT_DIV_BY_ZERO = """
import torch, fxopt
class M(torch.nn.Module):
    def forward(self, x, y):
        return (x {op} y) + 1
x, y = torch.tensor([5, -6, 7]), torch.tensor([2, 3, 4])
opt = fxopt.optimize(M(), [x, y], backend="cpp", strict=True)
assert "fxopt.fused" not in opt.code  # integer division by a tensor is not fused: it may hold zeros
try:
    M()(x, torch.tensor([1, 0, 2]))
except RuntimeError as e:
    print("eager raised:", e)
try:
    opt(x, torch.tensor([1, 0, 2]))
except RuntimeError as e:
    print("fused raised:", e)
"""


@pytest.mark.parametrize("op", ["//", "%"])
def test_integer_division_by_zero_raises_like_eager_instead_of_crashing(op):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _INT_DIV_BY_ZERO.format(op=op)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"the process died (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert "eager raised" in proc.stdout and "fused raised" in proc.stdout, proc.stdout


def test_static_count_of_an_exported_cast_matches_dispatch():
    class M(nn.Module):
        def forward(self, x):
            return x.double() * 2

    x = make_arg("x", f32, 0)
    gm = torch.export.export(M(), (x,), strict=False).module()
    fxopt.annotate(gm, (x,))
    dispatched = sum(dispatched_ops(gm, (x,)).values())
    assert dispatched == 2
    assert fxopt.launches.static_count(gm) == dispatched


# ---------------------------------------------------------------------------------------------------------------
# Spellings -> one canonical op
# ---------------------------------------------------------------------------------------------------------------
# (canonical op, id, spelling): the spelling's own op is the last one it applies; ``s`` is the module (for
# submodule spellings, ``s.mods[id]``), x and y float tensors, b a bool tensor.
SPELLINGS: list[tuple[str, str, Callable, Callable[[], nn.Module] | None]] = [
    ("relu", "torch.relu", lambda s, x, y, b: torch.relu(x), None),
    ("relu", "F.relu", lambda s, x, y, b: F.relu(x), None),
    ("relu", "x.relu()", lambda s, x, y, b: x.relu(), None),
    ("relu", "nn.ReLU", lambda s, x, y, b: s.mods["nn_ReLU"](x), nn.ReLU),
    ("relu", "aten.relu.default", lambda s, x, y, b: torch.ops.aten.relu.default(x), None),
    ("add", "x + y", lambda s, x, y, b: x + y, None),
    ("add", "torch.add", lambda s, x, y, b: torch.add(x, y), None),
    ("add", "x.add(y)", lambda s, x, y, b: x.add(y), None),
    ("add", "x + 2", lambda s, x, y, b: x + 2, None),
    ("add", "2 + x", lambda s, x, y, b: 2 + x, None),
    ("mul", "2 * x", lambda s, x, y, b: 2 * x, None),
    ("mul", "x * y", lambda s, x, y, b: x * y, None),
    ("mul", "torch.mul", lambda s, x, y, b: torch.mul(x, y), None),
    ("mul", "x.multiply(y)", lambda s, x, y, b: x.multiply(y), None),
    ("pow", "x ** 2", lambda s, x, y, b: x ** 2, None),
    ("pow", "torch.pow", lambda s, x, y, b: torch.pow(x, y), None),
    ("pow", "x.pow(3)", lambda s, x, y, b: x.pow(3), None),
    ("neg", "-x", lambda s, x, y, b: -x, None),
    ("neg", "torch.neg", lambda s, x, y, b: torch.neg(x), None),
    ("neg", "torch.negative", lambda s, x, y, b: torch.negative(x), None),
    ("gt", "x > 0", lambda s, x, y, b: x > 0, None),
    ("gt", "torch.gt", lambda s, x, y, b: torch.gt(x, y), None),
    ("gt", "torch.greater", lambda s, x, y, b: torch.greater(x, y), None),
    ("bitwise_not", "~b", lambda s, x, y, b: ~b, None),
    ("bitwise_not", "torch.bitwise_not", lambda s, x, y, b: torch.bitwise_not(b), None),
    ("bitwise_not", "b.bitwise_not()", lambda s, x, y, b: b.bitwise_not(), None),
    ("bitwise_and", "a & b", lambda s, x, y, b: (x > 0) & b, None),
    ("bitwise_and", "torch.bitwise_and", lambda s, x, y, b: torch.bitwise_and(b, x > 0), None),
    ("bitwise_or", "a | b", lambda s, x, y, b: (x > 0) | b, None),
    ("bitwise_xor", "a ^ b", lambda s, x, y, b: (x > 0) ^ b, None),
    ("sigmoid", "torch.sigmoid", lambda s, x, y, b: torch.sigmoid(x), None),
    ("sigmoid", "F.sigmoid", lambda s, x, y, b: F.sigmoid(x), None),
    ("sigmoid", "x.sigmoid()", lambda s, x, y, b: x.sigmoid(), None),
    ("sigmoid", "nn.Sigmoid", lambda s, x, y, b: s.mods["nn_Sigmoid"](x), nn.Sigmoid),
    ("sigmoid", "torch.special.expit", lambda s, x, y, b: torch.special.expit(x), None),
    ("div", "x / y", lambda s, x, y, b: x / y, None),
    ("div", "torch.true_divide", lambda s, x, y, b: torch.true_divide(x, y), None),
    ("div", "x.div(2.0)", lambda s, x, y, b: x.div(2.0), None),
    ("abs", "abs(x)", lambda s, x, y, b: abs(x), None),
    ("abs", "x.abs()", lambda s, x, y, b: x.abs(), None),
    ("abs", "torch.absolute", lambda s, x, y, b: torch.absolute(x), None),
    ("clamp", "x.clamp(-1, 1)", lambda s, x, y, b: x.clamp(-1, 1), None),
    ("clamp", "torch.clip", lambda s, x, y, b: torch.clip(x, -1, 1), None),
    ("clamp", "torch.clamp(min=, max=)", lambda s, x, y, b: torch.clamp(x, min=-1, max=1), None),
    ("cast", "x.double()", lambda s, x, y, b: x.double(), None),
    ("cast", "x.to(float16)", lambda s, x, y, b: x.to(torch.float16), None),
    ("cast", "b.float()", lambda s, x, y, b: b.float(), None),
    ("cast", "x.type(float64)", lambda s, x, y, b: x.type(torch.float64), None),
    ("logical_not", "torch.logical_not", lambda s, x, y, b: torch.logical_not(b), None),
    ("where", "torch.where", lambda s, x, y, b: torch.where(b, x, y), None),
    ("silu", "nn.SiLU", lambda s, x, y, b: s.mods["nn_SiLU"](x), nn.SiLU),
    ("silu", "F.silu", lambda s, x, y, b: F.silu(x), None),
    ("gelu_tanh", "F.gelu(tanh)", lambda s, x, y, b: F.gelu(x, approximate="tanh"), None),
]

SPELLING_BUGS: dict = {}  # all fixed; keep the mechanism for the next one


class _AllSpellings(nn.Module):
    """Every spelling at once, one output each: one capture per method instead of one per spelling."""

    def __init__(self):
        super().__init__()
        self.mods = nn.ModuleDict({sid.replace(".", "_"): factory() for _, sid, _, factory in SPELLINGS if factory})

    def forward(self, x, y, b):
        return tuple(fn(self, x, y, b) for _, _, fn, _ in SPELLINGS)


def _spelling_inputs():
    return make_arg("x", f32, 0), make_arg("x", f32, 1), make_arg("b", BOOL, 0)


@pytest.fixture(scope="module")
def spelled_graphs() -> dict[str, fx.GraphModule]:
    """The module with every spelling, captured both ways and annotated."""
    args = _spelling_inputs()
    traced = fxopt.capture(_AllSpellings().eval(), args)
    assert traced.meta["fxopt_capture"].method == "symbolic_trace"
    exported = torch.export.export(_AllSpellings().eval(), args, strict=False).module()
    fxopt.annotate(exported, args)
    return {"symbolic_trace": traced, "export": exported}


def _output_producers(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (ret,) = out.args
    return list(ret)


def _spelling_params():
    params = []
    for method in ("symbolic_trace", "export"):
        for k, (canonical, sid, _, _) in enumerate(SPELLINGS):
            reason = SPELLING_BUGS.get((method, sid))
            params.append(pytest.param(method, k, canonical, id=f"{method}-{canonical}-{sid}",
                                       marks=[xfail_bug(reason)] if reason else []))
    return params


@pytest.mark.parametrize("method,index,canonical", _spelling_params())
def test_spelling_maps_to_canonical_op(spelled_graphs, method, index, canonical):
    gm = spelled_graphs[method]
    node = _output_producers(gm)[index]
    assert isinstance(node, fx.Node)
    call = ops.match_elementwise(node, gm)
    assert isinstance(call, ops.ElementwiseCall), f"{node.format_node()}: {call}"
    assert call.op.name == canonical, node.format_node()


def test_aten_graph_has_aten_targets(spelled_graphs):
    """The export graph really is ATen-level (so the test above checks aten.* spellings)."""
    targets = {n.target for n in _output_producers(spelled_graphs["export"])}
    assert torch.ops.aten.relu.default in targets
    assert all(isinstance(t, torch._ops.OpOverload) for t in targets)


def test_every_spelling_of_relu_fuses_to_the_same_kernel():
    """torch.relu, F.relu, nn.ReLU(), x.relu(), aten.relu.default and an exported graph all generate the same
    region, hence the same kernel name."""
    x = make_arg("x", f32, 0)
    names = set()
    for canonical, sid, fn, factory in SPELLINGS:
        if canonical != "relu":
            continue

        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.mods = nn.ModuleDict({sid.replace(".", "_"): factory()} if factory else {})

            def forward(self, x):
                return fn(self, x, None, None) * 2

        opt = fxopt.optimize(M(), [x], backend="cpp", strict=True)
        (kernel,) = opt.kernels.values()
        names.add(kernel.name)
        with torch.no_grad():
            assert_same(opt(x), torch.relu(x) * 2, sid)
        if sid == "x.relu()":
            exported = torch.export.export(M(), (x,), strict=False).module()
            assert any(n.target is torch.ops.aten.relu.default for n in exported.graph.nodes)
            opt = fxopt.optimize(exported, [x], backend="cpp", strict=True)
            (kernel,) = opt.kernels.values()
            names.add(kernel.name)
            with torch.no_grad():
                assert_same(opt(x), torch.relu(x) * 2, "exported")
    assert len(names) == 1, names


def test_inplace_spellings_are_not_elementwise_calls():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = nn.ReLU(inplace=True)

        def forward(self, x):
            y = x * 2
            y.add_(1)
            z = F.relu(y, inplace=True)
            return self.r(z)

    x = make_arg("x", f32, 0)
    gm = fxopt.capture(M(), [x])
    calls = {n.name: ops.match_elementwise(n, gm) for n in gm.graph.nodes if n.op.startswith("call")}
    assert calls["mul"].op.name == "mul"
    assert "in-place" in calls["add_"]
    assert "in-place" in calls["relu"]
    assert "in-place" in calls["r"]
    assert [n.name for n in gm.graph.nodes if ops.is_inplace(n, gm)] == ["add_", "relu", "r"]
