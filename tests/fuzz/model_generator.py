"""A random model generator for differential testing of fxopt (in the spirit of NNSmith).

``generate(seed)`` builds a random DAG of PyTorch ops with valid shapes and returns ``(model, inputs, description)``:
convolutions (+ eval-mode BatchNorm with random running statistics, + ReLU, in-place or not), Linear layers,
pooling, elementwise unary and binary ops (with broadcasting), ops with Python scalars, reductions over a
dimension (sum/mean/amax/max, softmax, log_softmax, LayerNorm, RMSNorm), reshapes, permutes, slices and expands,
concatenation and stacking, dtype casts (16-bit round trips, float64), integer islands, Dropout in eval mode,
identities, constant buffers and parameters, and in-place ops on intermediates (also through views and through
ops that return their input itself). Every op is spelled in one of its several forms (module, ``F.*``/``torch.*``
function, tensor method, operator), since fxopt's passes must recognise them all. Model dtypes are mostly float32,
some float64, float16 and bfloat16 (parameters sometimes kept in float32, with casts around them); some inputs come
in other memory layouts (transposed, channels_last, expanded, strided); elementwise-only models sometimes get
NaN/inf in an input.

The model is built NNSmith-style with concrete values: each candidate op is run eagerly on the values built so
far and kept only if it runs and its result is finite and of moderate magnitude (so float16/bfloat16 chains do
not overflow in eager where fxopt's float32 compute would not). The model stores the DAG as a plain list of
``(op, input_indices, params)`` steps and its ``forward`` replays it, so ``torch.fx.symbolic_trace`` sees the
ops themselves. A few models deliberately defeat symbolic_trace (``force_export``) so capture falls back to
``torch.export`` and the passes see ATen-level graphs. ``FuzzModel.describe()`` lists the DAG.

``run_case(seed, ...)`` is the differential check shared by ``tests/fuzz/test_differential.py`` and
``benchmarks/fuzz_gpu.py``: optimize, compare with eager (each output at the tolerance of the lowest precision it
was computed in) on the example inputs, new values of the same signature, other memory layouts and another batch
size, check that no input was written, optimize again with ``strict=True``, and blame each finding on the pass
whose disabling removes it. It returns a :class:`CaseResult` with findings, rollbacks and kernel build failures.

Reproduce one case from its seed (the model also depends on ``--max-nodes`` and the dtype weights: a case from
benchmarks/fuzz_gpu.py needs its run's values, which its summary and JSON print as a ready ``replay`` command)::

    python tests/fuzz/model_generator.py 1234            # describe, optimize, compare, print the pass table
    python tests/fuzz/model_generator.py 1234 --disable remove_identity
    python tests/fuzz/model_generator.py 1234 --backend cuda --device cuda
    python tests/fuzz/model_generator.py 1234 --max-nodes 24 --dtypes float32:4,float16:3,bfloat16:3,float64:1

This file is loaded by path (``importlib``, registered in ``sys.modules`` first), not imported as a package.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import time
import traceback
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# How often each model dtype is drawn by default.
DEFAULT_DTYPES = (torch.float32,) * 11 + (torch.float64,) * 3 + (torch.float16,) * 3 + (torch.bfloat16,) * 3
MAX_NUMEL = 6144  # no value is larger: keeps every case fast
# Largest magnitude a generated value may have, by dtype (eager must never overflow where fxopt's float32
# compute of a float16 chain would not: the two are allowed to differ there, see fxopt/verify.py).
MAGNITUDE_LIMIT = {torch.float16: 2e3, torch.bfloat16: 2e3, torch.float32: 1e5, torch.float64: 1e6}


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------------------
# Op implementations. Each is ``fn(model, xs, p) -> value``: ``xs`` the input values, ``p`` the step's params
# (plain Python data: numbers, strings, tuples, dtypes, slices). Spelling variants are selected by ``p["s"]``.
# Only the selected variant runs (it is traced), so every entry is a lambda.
# ---------------------------------------------------------------------------------------------------------------
def _mod(m: "FuzzModel", p: dict) -> nn.Module:
    return m.mods[p["mod"]]


def _attr(m: "FuzzModel", name: str) -> torch.Tensor:
    return getattr(m, name)


UNARY: dict[str, dict[str, Callable[[Any, dict], Any]]] = {
    "relu": {"F.relu": lambda x, p: F.relu(x), "torch.relu": lambda x, p: torch.relu(x),
             "x.relu": lambda x, p: x.relu()},
    "gelu": {"F.gelu": lambda x, p: F.gelu(x), "F.gelu_tanh": lambda x, p: F.gelu(x, approximate="tanh")},
    "silu": {"F.silu": lambda x, p: F.silu(x)},
    "sigmoid": {"torch.sigmoid": lambda x, p: torch.sigmoid(x), "x.sigmoid": lambda x, p: x.sigmoid(),
                "F.sigmoid": lambda x, p: F.sigmoid(x)},
    "tanh": {"torch.tanh": lambda x, p: torch.tanh(x), "x.tanh": lambda x, p: x.tanh()},
    "exp": {"torch.exp": lambda x, p: torch.exp(x), "x.exp": lambda x, p: x.exp()},  # input clamped first
    "expm1": {"torch.expm1": lambda x, p: torch.expm1(x)},  # input clamped first
    "abs": {"torch.abs": lambda x, p: torch.abs(x), "x.abs": lambda x, p: x.abs(), "abs": lambda x, p: abs(x)},
    "neg": {"torch.neg": lambda x, p: torch.neg(x), "-x": lambda x, p: -x, "x.neg": lambda x, p: x.neg()},
    "hardswish": {"F.hardswish": lambda x, p: F.hardswish(x)},
    "hardsigmoid": {"F.hardsigmoid": lambda x, p: F.hardsigmoid(x)},
    "leaky_relu": {"F.leaky_relu": lambda x, p: F.leaky_relu(x, p["slope"])},
    "relu6": {"F.relu6": lambda x, p: F.relu6(x)},
    "hardtanh": {"F.hardtanh": lambda x, p: F.hardtanh(x, p["lo"], p["hi"])},
    "elu": {"F.elu": lambda x, p: F.elu(x, p["alpha"]), "F.selu": lambda x, p: F.selu(x)},
    "softplus": {"F.softplus": lambda x, p: F.softplus(x, p["beta"], p["threshold"])},
    "mish": {"F.mish": lambda x, p: F.mish(x)},
    "clamp": {"torch.clamp": lambda x, p: torch.clamp(x, p["lo"], p["hi"]),
              "x.clamp_min": lambda x, p: x.clamp(min=p["lo"]), "x.clamp_max": lambda x, p: x.clamp(max=p["hi"]),
              "torch.clip": lambda x, p: torch.clip(x, p["lo"], p["hi"])},
    "sin": {"torch.sin": lambda x, p: torch.sin(x)},
    "cos": {"x.cos": lambda x, p: x.cos()},
    "erf": {"torch.erf": lambda x, p: torch.erf(x)},
    "atan": {"torch.atan": lambda x, p: torch.atan(x)},
    "sqrt": {"torch.sqrt": lambda x, p: torch.sqrt(x), "x.sqrt": lambda x, p: x.sqrt()},  # on abs(x) + 1
    "rsqrt": {"torch.rsqrt": lambda x, p: torch.rsqrt(x)},  # on abs(x) + 1
    "log": {"torch.log": lambda x, p: torch.log(x), "x.log": lambda x, p: x.log()},  # on abs(x) + 1
    "log1p": {"torch.log1p": lambda x, p: torch.log1p(x)},  # on abs(x)
    "reciprocal": {"torch.reciprocal": lambda x, p: torch.reciprocal(x)},  # on abs(x) + 1
    "square": {"x*x": lambda x, p: x * x, "x**2": lambda x, p: x ** 2, "x.pow": lambda x, p: x.pow(2)},
    "nan_to_num": {"torch.nan_to_num": lambda x, p: torch.nan_to_num(x),
                   "x.nan_to_num": lambda x, p: x.nan_to_num(nan=0.5, posinf=2.0, neginf=-2.0)},
    # discontinuous: only where rounding differences cannot flip them (float32/float64 models)
    "floor": {"torch.floor": lambda x, p: torch.floor(x)},
    "round": {"x.round": lambda x, p: x.round()},
    "sign": {"torch.sign": lambda x, p: torch.sign(x)},
}
UNARY_MODULES: dict[str, Callable[[dict], nn.Module]] = {
    "relu": lambda p: nn.ReLU(), "gelu": lambda p: nn.GELU(p.get("approximate", "none")), "silu": lambda p: nn.SiLU(),
    "sigmoid": lambda p: nn.Sigmoid(), "tanh": lambda p: nn.Tanh(), "hardswish": lambda p: nn.Hardswish(),
    "hardsigmoid": lambda p: nn.Hardsigmoid(), "leaky_relu": lambda p: nn.LeakyReLU(p["slope"]),
    "relu6": lambda p: nn.ReLU6(), "hardtanh": lambda p: nn.Hardtanh(p["lo"], p["hi"]),
    "elu": lambda p: nn.ELU(p["alpha"]), "softplus": lambda p: nn.Softplus(p["beta"], p["threshold"]),
    "mish": lambda p: nn.Mish(),
}
# Inputs each unary op needs: "clamp" (exp: a clamp before it), "pos1" (abs(x) + 1 before it), "pos" (abs(x)).
UNARY_GUARD = {"exp": "clamp", "expm1": "clamp", "sqrt": "pos1", "rsqrt": "pos1", "log": "pos1", "reciprocal": "pos1",
               "log1p": "pos"}
DISCONTINUOUS = {"floor", "round", "sign"}

BINARY: dict[str, dict[str, Callable[[Any, Any, dict], Any]]] = {
    "add": {"a+b": lambda a, b, p: a + b, "torch.add": lambda a, b, p: torch.add(a, b),
            "torch.add(alpha)": lambda a, b, p: torch.add(a, b, alpha=p["alpha"]), "a.add": lambda a, b, p: a.add(b)},
    "sub": {"a-b": lambda a, b, p: a - b, "torch.sub(alpha)": lambda a, b, p: torch.sub(a, b, alpha=p["alpha"]),
            "a.sub": lambda a, b, p: a.sub(b)},
    "mul": {"a*b": lambda a, b, p: a * b, "torch.mul": lambda a, b, p: torch.mul(a, b),
            "a.mul": lambda a, b, p: a.mul(b)},
    "div": {"a/(|b|+1)": lambda a, b, p: a / (b.abs() + 1),
            "torch.div": lambda a, b, p: torch.div(a, torch.abs(b) + 1)},
    "maximum": {"torch.maximum": lambda a, b, p: torch.maximum(a, b), "a.maximum": lambda a, b, p: a.maximum(b),
                "torch.max": lambda a, b, p: torch.max(a, b)},
    "minimum": {"torch.minimum": lambda a, b, p: torch.minimum(a, b), "torch.min": lambda a, b, p: torch.min(a, b)},
    "mask": {"a*(b>0).to": lambda a, b, p: a * (b > 0).to(p["dt"]),
             "a*(b<0).float": lambda a, b, p: a * (b < 0).float()},
    "lerp": {"torch.lerp": lambda a, b, p: torch.lerp(a, b, p["w"])},
}


def _where(m, xs, p):
    c, a, b = xs
    if p["s"] == "c>0":
        return torch.where(c > 0, a, b)
    if p["s"] == "c<t":
        return torch.where(c < p["t"], a, b)
    return torch.where(c >= 0, a, p["scalar"])  # a Python scalar branch


SCALAR: dict[str, Callable[[Any, Any], Any]] = {
    "x+s": lambda x, s: x + s, "s+x": lambda x, s: s + x, "x-s": lambda x, s: x - s, "s-x": lambda x, s: s - x,
    "x*s": lambda x, s: x * s, "s*x": lambda x, s: s * x, "x/s": lambda x, s: x / s,
    "torch.add": lambda x, s: torch.add(x, s), "torch.mul": lambda x, s: torch.mul(x, s),
    "x.mul": lambda x, s: x.mul(s), "x.sub": lambda x, s: x.sub(s), "torch.rsub": lambda x, s: torch.rsub(x, s),
    "x.div": lambda x, s: x.div(s),
}


def _reduce(m, xs, p):
    x, s, d, k = xs[0], p["s"], p.get("dim", -1), p.get("keepdim", False)
    table = {
        "torch.sum": lambda: torch.sum(x, d, keepdim=k), "x.sum": lambda: x.sum(dim=d, keepdim=k),
        "torch.sum(tuple)": lambda: torch.sum(x, (d,), keepdim=k),
        "x.mean": lambda: x.mean(d, keepdim=k), "torch.mean": lambda: torch.mean(x, dim=d, keepdim=k),
        "torch.amax": lambda: torch.amax(x, d, keepdim=k), "x.amax": lambda: x.amax(dim=d, keepdim=k),
        "torch.max(dim)[0]": lambda: torch.max(x, d, keepdim=k)[0], "x.max(dim).values": lambda: x.max(d).values,
        "F.softmax": lambda: F.softmax(x, dim=d), "x.softmax": lambda: x.softmax(d),
        "torch.softmax": lambda: torch.softmax(x, d),
        "F.log_softmax": lambda: F.log_softmax(x, dim=d), "x.log_softmax": lambda: x.log_softmax(d),
        "module": lambda: _mod(m, p)(x),
        "F.layer_norm": lambda: F.layer_norm(x, (x.shape[-1],) if p.get("dynamic") else p["shape"],
                                             _attr(m, p["w"]) if p.get("w") else None,
                                             _attr(m, p["b"]) if p.get("b") else None, p["eps"]),
    }
    return table[s]()


def _reshape(m, xs, p):
    x, s = xs[0], p["s"]
    table = {
        "x.view": lambda: x.view(*p["shape"]), "x.reshape": lambda: x.reshape(p["shape"]),
        "torch.reshape": lambda: torch.reshape(x, p["shape"]),
        "x.view(x.size(0), ...)": lambda: x.view(x.size(0), *p["shape"][1:]),
        "x.reshape(x.shape[0], -1)": lambda: x.reshape(x.shape[0], -1),
        "x.flatten": lambda: x.flatten(p["start"]), "torch.flatten": lambda: torch.flatten(x, p["start"], p["end"]),
        "nn.Flatten": lambda: _mod(m, p)(x),
        "x.permute": lambda: x.permute(*p["perm"]), "torch.permute": lambda: torch.permute(x, p["perm"]),
        "x.transpose": lambda: x.transpose(p["i"], p["j"]),
        "torch.transpose": lambda: torch.transpose(x, p["i"], p["j"]),
        "x.t": lambda: x.t(),
        "x.unsqueeze": lambda: x.unsqueeze(p["d"]), "torch.unsqueeze": lambda: torch.unsqueeze(x, p["d"]),
        "x.squeeze": lambda: x.squeeze(p["d"]),
        "x.contiguous": lambda: x.contiguous(),
    }
    return table[s]()


def _cat(m, xs, p):
    s = p["s"]
    if s == "torch.cat":
        return torch.cat(list(xs), dim=p["dim"])
    if s == "torch.cat(tuple)":
        return torch.cat(tuple(xs), p["dim"])
    if s == "torch.concat":
        return torch.concat(list(xs), dim=p["dim"])
    return torch.stack(list(xs), dim=p["dim"])


def _cast(m, xs, p):
    x, s, dt = xs[0], p["s"], p.get("dt")
    table = {
        "x.to": lambda: x.to(dt), "x.to(dtype=)": lambda: x.to(dtype=dt), "x.type": lambda: x.type(dt),
        "x.float": lambda: x.float(), "x.double": lambda: x.double(), "x.half": lambda: x.half(),
        "x.bfloat16": lambda: x.bfloat16(), "x.to(x.dtype)": lambda: x.to(x.dtype),
    }
    return table[s]()


def _identity(m, xs, p):
    x, s = xs[0], p["s"]
    table = {
        "module": lambda: _mod(m, p)(x),
        "F.dropout": lambda: F.dropout(x, p["p"], training=False),
        "F.dropout(self.training)": lambda: F.dropout(x, p=p["p"], training=m.training),
        "torch.dropout": lambda: torch.dropout(x, p["p"], False),
        "x.clone": lambda: x.clone(), "x.detach": lambda: x.detach(), "x.contiguous": lambda: x.contiguous(),
    }
    return table[s]()


def _inplace(m, xs, p):
    x, s = xs[0], p["s"]
    if s == "x.add_(y)":
        return x.add_(xs[1])
    if s == "x.mul_(y)":
        return x.mul_(xs[1])
    if s == "setitem":
        x[p["idx"]] = p["v"]
        return x
    table = {
        "x.add_": lambda: x.add_(p["v"]), "x.mul_": lambda: x.mul_(p["v"]), "x.sub_": lambda: x.sub_(p["v"]),
        "x.relu_": lambda: x.relu_(), "torch.relu_": lambda: torch.relu_(x),
        "F.relu(inplace)": lambda: F.relu(x, inplace=True), "x.clamp_": lambda: x.clamp_(p["lo"], p["hi"]),
        "x.sigmoid_": lambda: x.sigmoid_(), "x.tanh_": lambda: x.tanh_(),
        "F.leaky_relu(inplace)": lambda: F.leaky_relu(x, 0.1, inplace=True),
        "F.hardtanh(inplace)": lambda: F.hardtanh(x, -1.0, 1.0, inplace=True),
        "F.silu(inplace)": lambda: F.silu(x, inplace=True), "module": lambda: _mod(m, p)(x),
    }
    return table[s]()


def _scalar(m, xs, p):
    return SCALAR[p["s"]](xs[0], p["v"])


def _pow(m, xs, p):
    return xs[0] ** p["e"] if p["s"] == "x**e" else torch.pow(xs[0], p["e"])


def _module(m, xs, p):
    return _mod(m, p)(xs[0])


def _fconv(m, xs, p):
    w = _attr(m, p["w"])
    b = _attr(m, p["b"]) if p.get("b") else None
    return F.conv2d(xs[0], w, b, p["stride"], p["padding"], p["dilation"], p["groups"])


def _flinear(m, xs, p):
    return F.linear(xs[0], _attr(m, p["w"]), _attr(m, p["b"]) if p.get("b") else None)


def _fbn(m, xs, p):
    return F.batch_norm(xs[0], _attr(m, p["mean"]), _attr(m, p["var"]), _attr(m, p["w"]) if p.get("w") else None,
                        _attr(m, p["b"]) if p.get("b") else None, False, 0.1, p["eps"])


def _pool(m, xs, p):
    x, s = xs[0], p["s"]
    table = {
        "module": lambda: _mod(m, p)(x),
        "F.max_pool2d": lambda: F.max_pool2d(x, p["k"], p["stride"], p["pad"]),
        "F.avg_pool2d": lambda: F.avg_pool2d(x, p["k"], p["stride"], p["pad"]),
        "F.adaptive_avg_pool2d": lambda: F.adaptive_avg_pool2d(x, p["out"]),
        "x.mean((2,3))": lambda: x.mean((2, 3), keepdim=True),
        "F.max_pool1d": lambda: F.max_pool1d(x, p["k"], p["stride"], p["pad"]),
    }
    return table[s]()


def _const(m, xs, p):
    x, c, s = xs[0], _attr(m, p["buf"]), p["s"]
    table = {
        "x+c": lambda: x + c, "x*c": lambda: x * c, "c-x": lambda: c - x, "torch.mul(x,c)": lambda: torch.mul(x, c),
        "x*sigmoid(c)": lambda: x * torch.sigmoid(c),  # a constant subgraph: fold_constants
        "x+(c*0.5+1)": lambda: x + (c * 0.5 + 1),
        "x*c.exp()": lambda: x * c.clamp(-2, 2).exp(),
    }
    return table[s]()


def _int_island(m, xs, p):
    """Float -> integer arithmetic -> float: integer kernels (floor division, remainder) inside a fused group."""
    x = xs[0]
    i = torch.round(x * p["scale"]).to(p["it"])
    s = p["s"]
    if s == "floordiv":
        i = i // p["k"]
    elif s == "remainder":
        i = i % p["k"]
    elif s == "torch.remainder":
        i = torch.remainder(i, p["k"])
    elif s == "mul_add":
        i = i * p["k"] + 1
    elif s == "clamp_min":
        i = i.clamp(min=p["k"] - 5)
    elif s == "abs_neg":
        i = -torch.abs(i)
    elif s == "cmp":
        i = (i > p["k"] - 3) & (i < p["k"] + 3)
    return i.to(p["dt"]) / p["scale"]


def _slice(m, xs, p):
    x, s = xs[0], p["s"]
    table = {
        "x[:, a:b]": lambda: x[:, p["a"]:p["b"]], "x[..., ::2]": lambda: x[..., ::2],
        "x.narrow": lambda: x.narrow(p["d"], p["a"], p["n"]), "x.select": lambda: x.select(p["d"], p["a"]),
        "x.chunk[0]": lambda: x.chunk(2, p["d"])[0], "x.split[-1]": lambda: torch.split(x, 1, p["d"])[-1],
        "x.unbind[0]": lambda: x.unbind(p["d"])[0],
        "x.expand": lambda: x.expand(*p["shape"]),
    }
    return table[s]()


IMPLS: dict[str, Callable[[Any, list, dict], Any]] = {
    "unary": lambda m, xs, p: _mod(m, p)(xs[0]) if p["s"] == "module" else UNARY[p["f"]][p["s"]](xs[0], p),
    "binary": lambda m, xs, p: BINARY[p["f"]][p["s"]](xs[0], xs[1], p),
    "where": _where, "scalar": _scalar, "pow": _pow, "reduce": _reduce, "reshape": _reshape, "cat": _cat,
    "cast": _cast, "identity": _identity, "inplace": _inplace, "module": _module, "fconv": _fconv,
    "flinear": _flinear, "fbn": _fbn, "pool": _pool, "const": _const, "int": _int_island, "slice": _slice,
}
INPLACE_OPS = {"inplace"}


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class FuzzModel(nn.Module):
    """A generated model: ``steps`` is the DAG, replayed by ``forward``. Value ``i`` is input ``i`` for
    ``i < n_inputs``, else the result of step ``i - n_inputs``."""

    def __init__(self, n_inputs: int):
        super().__init__()
        self.n_inputs = n_inputs
        self.mods = nn.ModuleDict()
        self.steps: list[tuple[str, tuple[int, ...], dict]] = []
        self.notes: list[str] = []  # the description line of each step
        self.outputs: list[int] = []
        self.force_export = False
        self.seed: int | None = None
        self.dtype = torch.float32
        self.input_batched: list[bool] = []
        self.input_layouts: list[str] = []
        self.output_precision: list[torch.dtype] = []
        self.output_tf32: list[tuple[str, ...]] = []  # "conv"/"matmul" float32 ops each output depends on
        self.nan_inputs = False

    def replay(self, xs: Sequence[Any]) -> Any:
        vals = list(xs)
        for op, ins, p in self.steps:
            vals.append(IMPLS[op](self, [vals[i] for i in ins], p))
        outs = [vals[i] for i in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _check_trace(self, x: Any) -> None:
        if self.force_export:
            # Python control flow on a shape: symbolic_trace cannot follow it, torch.export (static shapes) can.
            if x.shape[0] < 0:
                raise ValueError("negative batch")

    def describe(self) -> str:
        """The DAG as a listing: one line per value, with the op, its spelling, params, dtype and shape."""
        head = f"FuzzModel seed={self.seed} dtype={_short(self.dtype)}"
        if self.force_export:
            head += " force_export (symbolic_trace fails: captured by torch.export)"
        if self.nan_inputs:
            head += " nan/inf in inputs"
        ret = ", ".join(f"%{i}" + (f" (computed in {_short(p)})" if p != self._dtype_of_output(k) else "")
                        for k, (i, p) in enumerate(zip(self.outputs, self.output_precision or
                                                       [None] * len(self.outputs))))
        lines = [head, *self.notes, f"return {ret}"]
        return "\n".join(lines)

    def _dtype_of_output(self, k: int) -> torch.dtype | None:
        note = self.notes[self.outputs[k]] if self.outputs[k] < len(self.notes) else ""
        for d in FLOAT_DTYPES:
            if f"-> {_short(d)}[" in note:
                return d
        return None


class FuzzModel1(FuzzModel):
    def forward(self, x0):
        self._check_trace(x0)
        return self.replay((x0,))


class FuzzModel2(FuzzModel):
    def forward(self, x0, x1):
        self._check_trace(x0)
        return self.replay((x0, x1))


class FuzzModel3(FuzzModel):
    def forward(self, x0, x1, x2):
        self._check_trace(x0)
        return self.replay((x0, x1, x2))


_MODEL_CLASSES = {1: FuzzModel1, 2: FuzzModel2, 3: FuzzModel3}


# ---------------------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------------------
class _Reject(Exception):
    pass


def _fmt_param(v: Any) -> str:
    if isinstance(v, torch.dtype):
        return _short(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, slice):
        return f"{'' if v.start is None else v.start}:{'' if v.stop is None else v.stop}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_fmt_param(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


class _Builder:
    def __init__(self, seed: int, max_nodes: int, dtypes: Sequence[torch.dtype]):
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_nodes = max_nodes
        self.dtype: torch.dtype = self.rng.choice(list(dtypes))
        self.param_dtype = torch.float64 if self.dtype == torch.float64 else (
            self.dtype if self.rng.random() < 0.5 else torch.float32)  # low precision: sometimes keep params fp32
        self.elementwise_only = self.rng.random() < 0.15
        self.nan_inputs = self.elementwise_only and self.rng.random() < 0.5
        self.vals: list[torch.Tensor] = []
        self.uses: list[int] = []
        self.prec: list[torch.dtype] = []  # the lowest precision each value was computed in
        self.counter = 0
        self.model: FuzzModel | None = None
        self.protected: set[int] = set()  # storages of inputs, parameters and buffers: never written

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.randn(tuple(shape), dtype=torch.float64) * scale
        return t.to(dtype or self.dtype)

    def _limit(self, dtype: torch.dtype) -> float:
        return MAGNITUDE_LIMIT.get(dtype, 1e5)

    def _ok(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0 or t.numel() > MAX_NUMEL:
            return False
        if t.dim() == 0 or t.dim() > 5:
            return False
        t64 = t.detach().double()
        finite = torch.isfinite(t64)
        if not self.nan_inputs and not bool(finite.all()):
            return False
        if bool(finite.any()) and float(t64[finite].abs().max()) > self._limit(t.dtype):
            return False
        return True

    def pick(self, pred: Callable[[torch.Tensor], bool] = lambda t: True, avoid: Sequence[int] = ()) -> int | None:
        """A value index: often the latest (chains), often one nobody uses yet (fewer dead ends), else any."""
        cands = [i for i, t in enumerate(self.vals) if pred(t) and i not in avoid]
        if not cands:
            return None
        r = self.rng.random()
        if r < 0.45 and cands[-1] == len(self.vals) - 1:
            return cands[-1]
        unused = [i for i in cands if self.uses[i] == 0 and i >= self.model.n_inputs]
        if r < 0.75 and unused:
            return self.rng.choice(unused)
        return self.rng.choice(cands)

    def add(self, op: str, ins: Sequence[int], p: dict, *, label: str | None = None,
            modules: dict[str, nn.Module] | None = None, params: dict[str, torch.Tensor] | None = None,
            buffers: dict[str, torch.Tensor] | None = None, check: bool = True) -> int:
        """Run the step eagerly on the current values; keep it (and return its value index) or raise _Reject."""
        m = self.model
        modules, params, buffers = modules or {}, params or {}, buffers or {}
        for k, mod in modules.items():
            mod.eval()
            for prm in mod.parameters():
                prm.requires_grad_(False)
            m.mods[k] = mod
        for k, t in params.items():
            m.register_parameter(k, nn.Parameter(t, requires_grad=False))
        for k, t in buffers.items():
            m.register_buffer(k, t)

        def undo():
            for k in modules:
                del m.mods[k]
            for k in list(params) + list(buffers):
                delattr(m, k)

        xs = [self.vals[i] for i in ins]
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if op in INPLACE_OPS:
                    trial = IMPLS[op](m, [x.clone() for x in xs], p)  # try on copies first
                    if check and not self._ok(trial):
                        raise _Reject("bad value")
                out = IMPLS[op](m, xs, p)
        except _Reject:
            undo()
            raise
        except Exception as e:  # an invalid combination of shapes/params: try something else
            undo()
            raise _Reject(f"{type(e).__name__}: {e}") from e
        if check and not self._ok(out):
            undo()
            raise _Reject("bad value")
        for prm in list(params.values()) + list(buffers.values()):
            self.protected.add(prm.untyped_storage().data_ptr())
        for mod in modules.values():
            for t in list(mod.parameters()) + list(mod.buffers()):
                self.protected.add(t.untyped_storage().data_ptr())
        idx = len(self.vals)
        m.steps.append((op, tuple(ins), p))
        self.vals.append(out)
        self.uses.append(0)
        self.prec.append(lowest_precision([out.dtype] + [self.prec[i] for i in ins]))
        tf32 = set().union(*[self.tf32[i] for i in ins]) if ins else set()
        mod = m.mods[p["mod"]] if op == "module" else None
        if out.dtype == torch.float32:  # on CUDA, float32 convs (and matmuls, if enabled) may run in TF32
            if op == "fconv" or isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                tf32.add("conv")
            elif op == "flinear" or isinstance(mod, nn.Linear):
                tf32.add("matmul")
        self.tf32.append(tf32)
        if op in INPLACE_OPS:  # every alias of the written tensor now holds a value of this precision
            ptr = out.untyped_storage().data_ptr()
            for j, v in enumerate(self.vals):
                if v.untyped_storage().data_ptr() == ptr:
                    self.prec[j] = lowest_precision([self.prec[j], self.prec[idx]])
                    self.tf32[j] |= tf32
        for i in ins:
            self.uses[i] += 1
        shown = {k: v for k, v in p.items() if k not in ("s", "mod", "f")}
        desc = label or (p.get("f", op) + (f"[{p['s']}]" if "s" in p else ""))
        extra = ", ".join(f"{k}={_fmt_param(v)}" for k, v in shown.items())
        mods_txt = "; ".join(f"{k}={mod!r}".replace("\n", " ") for k, mod in modules.items())
        m.notes.append(f"%{idx} = {desc}({', '.join(f'%{i}' for i in ins)}{', ' + extra if extra else ''})"
                       f"{'  ' + mods_txt if mods_txt else ''}  -> {_short(out.dtype)}{list(out.shape)}")
        return idx

    def attempt(self, fn: Callable[[], Any]) -> bool:
        n_steps = len(self.model.steps)
        try:
            fn()
            return True
        except _Reject:
            return len(self.model.steps) > n_steps  # a multi-step block that got partway counts

    # -- inputs ----------------------------------------------------------------------------------------------------
    def make_inputs(self) -> list[torch.Tensor]:
        rng = self.rng
        n = rng.choice([1, 1, 2, 2, 3])
        rank = rng.choice([2, 3, 4, 4])
        b = rng.randint(1, 4)
        if rank == 4:
            shape = [b, rng.randint(1, 8), rng.randint(1, 9), rng.randint(1, 9)]
        elif rank == 3:
            shape = [b, rng.randint(1, 8), rng.randint(1, 16)]
        else:
            shape = [b, rng.randint(1, 24)]
        shapes, batched = [shape], [True]
        for _ in range(n - 1):
            r = rng.random()
            if r < 0.4:
                s = list(shape)  # the same shape
            elif r < 0.7:
                s = [1 if (i > 0 and rng.random() < 0.4) else d for i, d in enumerate(shape)]  # broadcastable
            elif r < 0.85:
                s = list(shape[-rng.randint(1, rank - 1):]) if rank > 1 else list(shape)  # trailing dims
            else:
                r2 = rng.choice([2, 3, 4])
                s = [b] + [rng.randint(1, 8) for _ in range(r2 - 1)]  # unrelated
            shapes.append(s)
            # dim 0 is the batch where the input is full rank with the batch size there (the "unrelated" ones too)
            batched.append(len(s) >= 2 and s[0] == b and (len(s) == rank or r >= 0.85))
        self.input_batched = batched
        self.input_shapes = shapes
        self.input_layouts = [rng.choice(LAYOUTS) if rng.random() < 0.25 else "contiguous" for _ in shapes]
        return [self.randn(*s) for s in shapes]

    # -- op categories ---------------------------------------------------------------------------------------------
    def op_unary(self) -> None:
        rng = self.rng
        x = self.pick()
        names = [f for f in UNARY if f != "nan_to_num" or self.nan_inputs]
        if self.dtype in LOW_PRECISION or self.vals[x].dtype in LOW_PRECISION or self.nan_inputs:
            names = [f for f in names if f not in DISCONTINUOUS]
        f = rng.choice(names)
        if f in DISCONTINUOUS and rng.random() < 0.6:
            f = "relu"
        p: dict[str, Any] = {"f": f}
        if f == "leaky_relu":
            p["slope"] = rng.choice([0.01, 0.1, 0.2])
        if f in ("hardtanh", "clamp"):
            lo = round(rng.uniform(-2, 0), 2)
            p["lo"], p["hi"] = lo, round(lo + rng.uniform(0.2, 3), 2)
            if f == "clamp" and rng.random() < 0.3:
                p["lo"], p["hi"] = int(math.floor(lo)), int(math.ceil(p["hi"]))  # integer bounds
        if f == "elu":
            p["alpha"] = rng.choice([1.0, 0.5])
        if f == "softplus":
            p["beta"], p["threshold"] = rng.choice([1.0, 2.0]), rng.choice([20.0, 2.0])
        if f == "gelu" and rng.random() < 0.3:
            p["approximate"] = "tanh"
        spellings = list(UNARY[f])
        if f in UNARY_MODULES:
            spellings.append("module")
        s = rng.choice(spellings)
        p["s"] = s
        guard = UNARY_GUARD.get(f)
        if guard == "clamp":
            bound = 3.0 if self.dtype in LOW_PRECISION else 6.0
            x = self.add("unary", [x], {"f": "clamp", "s": "torch.clamp", "lo": -bound, "hi": bound})
        elif guard in ("pos", "pos1"):
            x = self.add("unary", [x], {"f": "abs", "s": rng.choice(list(UNARY["abs"]))})
            if guard == "pos1":
                x = self.add("scalar", [x], {"s": "x+s", "v": 1.0})
        mods = {}
        if s == "module":
            p["mod"] = self._name("act")
            mods[p["mod"]] = UNARY_MODULES[f](p)
        self.add("unary", [x], p, modules=mods, label=f"{f}[{s}]")

    def _partner(self, a: int) -> int:
        """A value whose shape broadcasts with value a's to a result no larger than MAX_NUMEL."""
        sa = tuple(self.vals[a].shape)

        def fits(t):
            try:
                out = torch.broadcast_shapes(sa, tuple(t.shape))
            except RuntimeError:
                return False
            n = 1
            for d in out:
                n *= d
            return n <= MAX_NUMEL and len(out) <= 5

        same = [i for i, t in enumerate(self.vals) if tuple(t.shape) == sa and i != a]
        r = self.rng.random()
        if same and r < 0.5:
            return self.rng.choice(same)
        b = self.pick(fits, avoid=(a,))
        if b is None or r > 0.95:
            return a
        return b

    def op_binary(self) -> None:
        rng = self.rng
        a = self.pick()
        b = self._partner(a)
        if rng.random() < 0.5:
            a, b = b, a
        if rng.random() < 0.12:
            c = self._partner(a)
            s = rng.choice(["c>0", "c<t", "scalar"])
            p = {"s": s, "t": round(rng.uniform(-1, 1), 2), "scalar": rng.choice([0.0, 1.5, -2])}
            if s == "scalar":
                p = {"s": s, "scalar": p["scalar"]}
                self.add("where", [c, a], p, label=f"where[c>=0 ? a : {p['scalar']}]")
                return
            self.add("where", [c, a, b], p, label=f"where[{s}]")
            return
        f = rng.choice(list(BINARY))
        s = rng.choice(list(BINARY[f]))
        p: dict[str, Any] = {"f": f, "s": s}
        if "alpha" in s:
            p["alpha"] = rng.choice([2, 0.5, -1])
        if f == "mask":
            p["dt"] = self.vals[a].dtype
        if f == "lerp":
            p["w"] = rng.choice([0.25, 0.75, 0.5])
        self.add("binary", [a, b], p, label=f"{f}[{s}]")

    def op_scalar(self) -> None:
        rng = self.rng
        x = self.pick()
        r = rng.random()
        if r < 0.15:  # no-op arithmetic: remove_identity
            s, v = rng.choice([("x+s", 0), ("x*s", 1), ("x-s", 0), ("x/s", 1), ("x+s", 0.0), ("x*s", 1.0),
                               ("s*x", 1), ("s+x", 0)])
        elif r < 0.3:  # powers
            e = rng.choice([2, 3, 0.5, -1, 1.5, 2.0])
            if e not in (2, 3, 2.0):
                x = self.add("unary", [x], {"f": "abs", "s": "torch.abs"})
                x = self.add("scalar", [x], {"s": "x+s", "v": 1})
            self.add("pow", [x], {"s": rng.choice(["x**e", "torch.pow"]), "e": e}, label="pow")
            return
        else:
            s = rng.choice(list(SCALAR))
            v = rng.choice([2, -1, 3, 0.5, -1.5, 0.25, 1.75, -3])
        self.add("scalar", [x], {"s": s, "v": v}, label=f"scalar[{s}]")

    def _act_after(self, x: int, relu_only: bool = False) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.25:
            return self._relu_module(x, inplace=True)
        if r < 0.45:
            return self.add("inplace", [x], {"s": rng.choice(["F.relu(inplace)", "x.relu_", "torch.relu_"])},
                            label="relu (in place)") if self._writable(x) else self._relu_module(x, inplace=False)
        if r < 0.75 or relu_only:
            return self.add("unary", [x], {"f": "relu", "s": rng.choice(list(UNARY["relu"]))}, label="relu")
        f = rng.choice(["gelu", "silu", "sigmoid", "hardswish", "tanh"])
        return self.add("unary", [x], {"f": f, "s": rng.choice(list(UNARY[f]))}, label=f)

    def _relu_module(self, x: int, inplace: bool) -> int:
        name = self._name("relu")
        return self.add("module", [x], {"mod": name}, modules={name: nn.ReLU(inplace=inplace)},
                        label=f"ReLU(inplace={inplace})")

    def _to_param_dtype(self, x: int) -> tuple[int, torch.dtype | None]:
        """Cast value x to the parameter dtype if it differs; returns the new index and the dtype to cast back to."""
        dt = self.vals[x].dtype
        if dt == self.param_dtype:
            return x, None
        s = {torch.float32: "x.float", torch.float64: "x.double", torch.float16: "x.half",
             torch.bfloat16: "x.bfloat16"}[self.param_dtype]
        return self.add("cast", [x], {"s": s}, label=f"cast[{s}]"), dt

    def _cast_back(self, x: int, dt: torch.dtype | None) -> int:
        if dt is None:
            return x
        return self.add("cast", [x], {"s": "x.to", "dt": dt}, label="cast[x.to]")

    def op_conv(self) -> None:
        rng = self.rng
        x = self.pick(lambda t: t.dim() == 4 and t.shape[1] <= 16)
        if x is None:
            raise _Reject("no 4-d value")
        x, back = self._to_param_dtype(x)
        t = self.vals[x]
        cin = t.shape[1]
        k = rng.choice([1, 3, 3])
        stride = rng.choice([1, 1, 2])
        dilation = 2 if (k == 3 and rng.random() < 0.1) else 1
        padding = rng.choice([0, dilation * (k // 2)]) if k > 1 else 0
        groups = cin if (cin > 1 and rng.random() < 0.2) else 1
        cout = groups * rng.randint(1, 2) if groups > 1 else rng.randint(1, 8)
        bias = rng.random() < 0.7
        if rng.random() < 0.75:
            padding_mode = "reflect" if (padding and rng.random() < 0.1) else "zeros"
            conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias, padding_mode).to(self.param_dtype)
            name = self._name("conv")
            y = self.add("module", [x], {"mod": name}, modules={name: conv}, label="Conv2d")
        else:
            w = self.randn(cout, cin // groups, k, k, scale=1 / math.sqrt(cin // groups * k * k),
                           dtype=self.param_dtype)
            pw, pb = self._name("conv_w"), self._name("conv_b") if bias else None
            params = {pw: w}
            if pb:
                params[pb] = self.randn(cout, scale=0.3, dtype=self.param_dtype)
            y = self.add("fconv", [x], {"w": pw, "b": pb, "stride": stride, "padding": padding, "dilation": dilation,
                                        "groups": groups}, params=params, label="F.conv2d")
        if rng.random() < 0.55:
            y = self._batchnorm(y, cout, 2)
        if rng.random() < 0.5:
            y = self._act_after(y)
        self._cast_back(y, back)

    def _batchnorm(self, y: int, c: int, dims: int) -> int:
        rng = self.rng
        pd = self.param_dtype
        mean, var = self.randn(c, scale=0.5, dtype=pd), (torch.rand(c, dtype=torch.float64) * 1.5 + 0.5).to(pd)
        weight, bias = (self.randn(c, scale=0.5) + 1).to(pd), self.randn(c, scale=0.5, dtype=pd)
        eps = rng.choice([1e-5, 1e-3])
        if rng.random() < 0.7:
            affine = rng.random() < 0.85
            track = rng.random() < 0.93
            bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(c, eps=eps, affine=affine,
                                                                   track_running_stats=track).to(pd)
            with torch.no_grad():
                if track:
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                if affine:
                    bn.weight.copy_(weight)
                    bn.bias.copy_(bias)
            name = self._name("bn")
            return self.add("module", [y], {"mod": name}, modules={name: bn}, label=type(bn).__name__)
        names = {k: self._name(f"bn_{k}") for k in ("mean", "var", "w", "b")}
        return self.add("fbn", [y], {**names, "eps": eps},
                        buffers={names["mean"]: mean, names["var"]: var, names["w"]: weight, names["b"]: bias},
                        label="F.batch_norm")

    def op_linear(self) -> None:
        rng = self.rng
        x = self.pick(lambda t: t.shape[-1] <= 64)
        if x is None:
            raise _Reject("no value")
        x, back = self._to_param_dtype(x)
        t = self.vals[x]
        fin, fout = t.shape[-1], rng.randint(1, 16)
        bias = rng.random() < 0.8
        if rng.random() < 0.75:
            lin = nn.Linear(fin, fout, bias=bias).to(self.param_dtype)
            name = self._name("fc")
            y = self.add("module", [x], {"mod": name}, modules={name: lin}, label="Linear")
        else:
            pw, pb = self._name("fc_w"), self._name("fc_b") if bias else None
            params = {pw: self.randn(fout, fin, scale=1 / math.sqrt(fin), dtype=self.param_dtype)}
            if pb:
                params[pb] = self.randn(fout, scale=0.3, dtype=self.param_dtype)
            y = self.add("flinear", [x], {"w": pw, "b": pb}, params=params, label="F.linear")
        if t.dim() == 2 and rng.random() < 0.3:
            y = self._batchnorm(y, fout, 1)
        r = rng.random()
        if r < 0.35:
            y = self._act_after(y, relu_only=True)
        elif r < 0.6:
            s = rng.choice(["F.gelu", "module", "F.gelu_tanh"])
            p = {"f": "gelu", "s": s}
            mods = {}
            if s == "module":
                p["mod"] = self._name("gelu")
                mods[p["mod"]] = nn.GELU()
            y = self.add("unary", [y], p, modules=mods, label=f"gelu[{s}]")
        self._cast_back(y, back)

    def op_pool(self) -> None:
        rng = self.rng
        x = self.pick(lambda t: t.dim() in (3, 4))
        if x is None:
            raise _Reject("no 3-d/4-d value")
        if self.vals[x].dim() == 3:
            k = rng.choice([2, 3])
            self.add("pool", [x], {"s": "F.max_pool1d", "k": k, "stride": rng.choice([1, 2]), "pad": k // 2},
                     label="max_pool1d")
            return
        choice = rng.choice(["max2", "max3", "avg2", "avg3", "adaptive", "F.max", "F.avg", "F.adaptive", "mean"])
        mods, p = {}, {}
        if choice in ("max2", "max3", "avg2", "avg3", "adaptive"):
            if choice == "max2":
                mod = nn.MaxPool2d(2, 2, ceil_mode=rng.random() < 0.2)
            elif choice == "max3":
                mod = nn.MaxPool2d(3, rng.choice([1, 2]), 1)
            elif choice == "avg2":
                mod = nn.AvgPool2d(2)
            elif choice == "avg3":
                mod = nn.AvgPool2d(3, 1, 1, count_include_pad=rng.random() < 0.5)
            else:
                mod = nn.AdaptiveAvgPool2d(rng.choice([1, (2, 2), (1, 3)]))
            p = {"s": "module", "mod": self._name("pool")}
            mods[p["mod"]] = mod
        elif choice == "F.max":
            p = {"s": "F.max_pool2d", "k": 2, "stride": 2, "pad": 0}
        elif choice == "F.avg":
            p = {"s": "F.avg_pool2d", "k": 3, "stride": 1, "pad": 1}
        elif choice == "F.adaptive":
            p = {"s": "F.adaptive_avg_pool2d", "out": rng.choice([1, 2])}
        else:
            p = {"s": "x.mean((2,3))"}
        self.add("pool", [x], p, modules=mods, label=f"pool[{choice}]")

    def op_reduce(self) -> None:
        rng = self.rng
        x = self.pick(lambda t: t.dim() >= 2)
        if x is None:
            raise _Reject("no value")
        t = self.vals[x]
        dim = -1 if rng.random() < 0.8 else rng.randint(1, t.dim() - 1)
        kind = rng.choice(["sum", "mean", "amax", "max", "softmax", "softmax", "log_softmax", "layer_norm",
                           "layer_norm"])
        p: dict[str, Any] = {"dim": dim, "keepdim": rng.random() < 0.4}
        mods, params = {}, {}
        if kind == "sum":
            p["s"] = rng.choice(["torch.sum", "x.sum", "torch.sum(tuple)"])
        elif kind == "mean":
            p["s"] = rng.choice(["x.mean", "torch.mean"])
        elif kind == "amax":
            p["s"] = rng.choice(["torch.amax", "x.amax"])
        elif kind == "max":
            p["s"] = rng.choice(["torch.max(dim)[0]", "x.max(dim).values"])
            if p["s"] == "x.max(dim).values":
                p["keepdim"] = False
        elif kind in ("softmax", "log_softmax"):
            del p["keepdim"]
            choices = ["F.softmax", "x.softmax", "torch.softmax", "module"] if kind == "softmax" else \
                ["F.log_softmax", "x.log_softmax", "module"]
            p["s"] = rng.choice(choices)
            if p["s"] == "module":
                p["mod"] = self._name(kind)
                mods[p["mod"]] = (nn.Softmax if kind == "softmax" else nn.LogSoftmax)(dim=dim)
        else:
            p = {"dim": -1}
            n = t.shape[-1]
            eps = rng.choice([1e-5, 1e-6, 1e-3])
            r = rng.random()
            if r < 0.5:
                affine = rng.random() < 0.8
                ln = nn.LayerNorm(n, eps=eps, elementwise_affine=affine, bias=rng.random() < 0.8).to(t.dtype)
                if affine:
                    with torch.no_grad():
                        ln.weight.copy_(self.randn(n, scale=0.5, dtype=t.dtype) + 1)
                        if ln.bias is not None:
                            ln.bias.copy_(self.randn(n, scale=0.5, dtype=t.dtype))
                p = {"s": "module", "mod": self._name("ln")}
                mods[p["mod"]] = ln
            elif r < 0.6 and hasattr(nn, "RMSNorm"):
                p = {"s": "module", "mod": self._name("rms")}
                mods[p["mod"]] = nn.RMSNorm(n, eps=rng.choice([None, 1e-5])).to(t.dtype)
                kind = "rms_norm"
            else:
                pw = self._name("ln_w") if rng.random() < 0.7 else None
                pb = self._name("ln_b") if rng.random() < 0.7 else None
                if pw:
                    params[pw] = self.randn(n, scale=0.5, dtype=t.dtype) + 1
                if pb:
                    params[pb] = self.randn(n, scale=0.5, dtype=t.dtype)
                p = {"s": "F.layer_norm", "shape": (n,), "w": pw, "b": pb, "eps": eps,
                     "dynamic": rng.random() < 0.2}
        self.add("reduce", [x], p, modules=mods, params=params, label=f"{kind}[{p['s']}]")

    def op_reshape(self) -> None:
        rng = self.rng
        x = self.pick()
        t = self.vals[x]
        shape, r = list(t.shape), t.dim()
        options = ["unsqueeze"]
        if r >= 3:
            options += ["flatten", "merge", "permute", "transpose"]
        if r >= 2:
            options += ["split", "flatten_view", "transpose"]
        if any(d == 1 for d in shape[1:]):
            options.append("squeeze")
        if r == 2:
            options.append("t")
        kind = rng.choice(options)
        if kind == "unsqueeze":
            if r >= 5:
                raise _Reject("rank")
            d = rng.randint(1, r)
            self.add("reshape", [x], {"s": rng.choice(["x.unsqueeze", "torch.unsqueeze"]), "d": d}, label="unsqueeze")
        elif kind == "squeeze":
            d = rng.choice([i for i in range(1, r) if shape[i] == 1])
            self.add("reshape", [x], {"s": "x.squeeze", "d": d}, label="squeeze")
        elif kind == "flatten":
            s = rng.choice(["x.flatten", "torch.flatten", "nn.Flatten"])
            start = rng.randint(1, r - 2)
            end = rng.randint(start + 1, r - 1)
            p: dict[str, Any] = {"s": s, "start": start, "end": end if s == "torch.flatten" else -1}
            mods = {}
            if s == "nn.Flatten":
                p = {"s": s, "mod": self._name("flatten")}
                mods[p["mod"]] = nn.Flatten()
            self.add("reshape", [x], p, modules=mods, label="flatten")
        elif kind in ("merge", "split", "flatten_view"):
            if kind == "merge":
                i = rng.randint(1, r - 2)
                new = shape[:i] + [shape[i] * shape[i + 1]] + shape[i + 2:]
            elif kind == "split":
                i = rng.randint(1, r - 1)
                divs = [a for a in range(2, shape[i]) if shape[i] % a == 0]
                if not divs or r >= 5:
                    new = shape[:i] + [1, shape[i]] + shape[i + 1:] if r < 5 else shape
                else:
                    a = rng.choice(divs)
                    new = shape[:i] + [a, shape[i] // a] + shape[i + 1:]
            else:
                new = [shape[0], math.prod(shape[1:])]
            new[0] = -1
            s = rng.choice(["x.view", "x.reshape", "torch.reshape", "x.view(x.size(0), ...)"])
            if kind == "flatten_view" and rng.random() < 0.4:
                s = "x.reshape(x.shape[0], -1)"
            self.add("reshape", [x], {"s": s, "shape": tuple(new)}, label="reshape")
        elif kind == "permute":
            perm = [0] + rng.sample(range(1, r), r - 1)
            if rng.random() < 0.1:
                perm = rng.sample(range(r), r)
            y = self.add("reshape", [x], {"s": rng.choice(["x.permute", "torch.permute"]), "perm": tuple(perm)},
                         label="permute")
            if rng.random() < 0.5:
                self.add("reshape", [y], {"s": "x.contiguous"}, label="contiguous")
        elif kind == "transpose":
            i, j = rng.sample(range(1, r), 2) if r >= 3 else (0, 1)
            y = self.add("reshape", [x], {"s": rng.choice(["x.transpose", "torch.transpose"]), "i": i, "j": j},
                         label="transpose")
            if rng.random() < 0.4:
                self.add("reshape", [y], {"s": "x.contiguous"}, label="contiguous")
        else:
            self.add("reshape", [x], {"s": "x.t"}, label="t")

    def op_cat(self) -> None:
        rng = self.rng
        a = self.pick()
        ta = self.vals[a]
        r = ta.dim()
        dim = rng.randint(1, r - 1) if (r > 1 and rng.random() < 0.85) else 0
        s = rng.choice(["torch.cat", "torch.cat", "torch.cat(tuple)", "torch.concat", "torch.stack"])
        if s == "torch.stack":
            dim = rng.randint(1, r) if r < 5 else 1
            pred = lambda t: t.shape == ta.shape  # noqa: E731
        else:
            pred = lambda t: t.dim() == r and all(t.shape[i] == ta.shape[i] for i in range(r) if i != dim)  # noqa
        others = [i for i, t in enumerate(self.vals) if pred(t)]
        n = rng.choice([2, 2, 3])
        ins = [a] + [rng.choice(others) for _ in range(n - 1)]
        rng.shuffle(ins)
        self.add("cat", ins, {"s": s, "dim": dim}, label=s)

    def op_cast(self) -> None:
        rng = self.rng
        x = self.pick()
        dt = self.vals[x].dtype
        r = rng.random()
        if r < 0.4:  # round trip through a 16-bit type (or float64)
            low = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.float32])
            s = rng.choice(["x.to", "x.to(dtype=)", "x.type",
                            {torch.float16: "x.half", torch.bfloat16: "x.bfloat16", torch.float64: "x.double",
                             torch.float32: "x.float"}[low]])
            y = self.add("cast", [x], {"s": s, "dt": low} if s in _CAST_WITH_DT else {"s": s}, label=f"cast[{s}]")
            self.add("cast", [y], {"s": "x.to", "dt": dt}, label="cast[x.to]")
        elif r < 0.65:  # identity casts
            s = rng.choice(["x.to(x.dtype)", "x.to", {torch.float32: "x.float", torch.float64: "x.double",
                                                      torch.float16: "x.half", torch.bfloat16: "x.bfloat16"}[dt]])
            self.add("cast", [x], {"s": s, "dt": dt} if s == "x.to" else {"s": s}, label=f"cast[{s}] (same dtype)")
        else:  # change the dtype of the flow
            new = rng.choice([d for d in FLOAT_DTYPES if d != dt])
            if self.dtype not in LOW_PRECISION and new in LOW_PRECISION and rng.random() < 0.7:
                new = torch.float64
            self.add("cast", [x], {"s": "x.to", "dt": new}, label="cast[x.to]")

    def op_identity(self) -> None:
        rng = self.rng
        x = self.pick()
        t = self.vals[x]
        s = rng.choice(["dropout", "dropout2d", "identity", "F.dropout", "F.dropout(self.training)", "torch.dropout",
                        "x.clone", "x.detach", "x.contiguous"])
        mods, p = {}, {"s": s, "p": rng.choice([0.1, 0.5])}
        if s in ("dropout", "dropout2d", "identity"):
            name = self._name(s)
            mods[name] = nn.Identity() if s == "identity" else (
                nn.Dropout2d(p["p"]) if (s == "dropout2d" and t.dim() == 4) else nn.Dropout(p["p"]))
            p = {"s": "module", "mod": name}
        elif s in ("x.clone", "x.detach", "x.contiguous"):
            p = {"s": s}
        self.add("identity", [x], p, modules=mods, label=s)

    def _writable(self, i: int) -> bool:
        """Whether an in-place write into value i is allowed: its memory belongs to no input, parameter or buffer.
        (Writes through views of intermediates are allowed: eager defines them and fxopt must keep them.)"""
        if i < self.model.n_inputs:
            return False
        t = self.vals[i]
        if t.untyped_storage().data_ptr() in self.protected:
            return False
        # overlapping memory (expanded values) cannot be written
        return t.dim() == 0 or all(st != 0 for st, sz in zip(t.stride(), t.shape) if sz > 1)

    def op_inplace(self) -> None:
        rng = self.rng
        # prefer values that are not views: the common "fresh intermediate" case
        fresh = [i for i in range(len(self.vals)) if self._writable(i) and self.vals[i]._base is None]
        views = [i for i in range(len(self.vals)) if self._writable(i) and self.vals[i]._base is not None]
        if not fresh and not views:
            raise _Reject("nothing writable")
        x = rng.choice(fresh) if fresh and (not views or rng.random() < 0.85) else rng.choice(views)
        t = self.vals[x]
        s = rng.choice(["x.add_", "x.mul_", "x.sub_", "x.relu_", "torch.relu_", "F.relu(inplace)", "x.clamp_",
                        "x.sigmoid_", "x.tanh_", "F.leaky_relu(inplace)", "F.hardtanh(inplace)", "F.silu(inplace)",
                        "module", "x.add_(y)", "x.mul_(y)", "setitem"])
        p: dict[str, Any] = {"s": s}
        mods = {}
        ins = [x]
        if s in ("x.add_", "x.mul_", "x.sub_"):
            p["v"] = rng.choice([1, 0.5, -2, 1.5])
        elif s == "x.clamp_":
            p["lo"], p["hi"] = rng.choice([(-1.0, 0.5), (-1.0, 2.0), (-4.0, 4.0)])
        elif s == "module":
            name = self._name("act_inplace")
            mods[name] = rng.choice([nn.ReLU(inplace=True), nn.Hardswish(inplace=True), nn.ReLU6(inplace=True),
                                     nn.LeakyReLU(0.2, inplace=True), nn.SiLU(inplace=True)])
            p["mod"] = name
        elif s in ("x.add_(y)", "x.mul_(y)"):
            y = self.pick(lambda u: _broadcasts_to(u.shape, t.shape))
            if y is None:
                raise _Reject("no operand")
            ins.append(y)
        elif s == "setitem":
            d = rng.randint(0, t.dim() - 1)
            idx = tuple([slice(None)] * d + [slice(0, max(1, t.shape[d] // 2))])
            p["idx"], p["v"] = idx, rng.choice([0.0, 0.5, -1.0])
        label = f"in-place {s}" + (f" {mods[p['mod']]!r}" if mods else "")
        self.add("inplace", ins, p, modules=mods, label=label)

    def op_const(self) -> None:
        rng = self.rng
        x = self.pick()
        t = self.vals[x]
        r = t.dim()
        shape_kind = rng.choice(["last", "channel", "full", "scalar"])
        if shape_kind == "last":
            shape = (t.shape[-1],)
        elif shape_kind == "channel" and r >= 2:
            shape = tuple([t.shape[1]] + [1] * (r - 2))
        elif shape_kind == "scalar":
            shape = ()
        else:
            shape = tuple(t.shape[1:]) or (1,)
        s = rng.choice(["x+c", "x*c", "c-x", "torch.mul(x,c)", "x*sigmoid(c)", "x+(c*0.5+1)", "x*c.exp()"])
        name = self._name("c")
        value = self.randn(*shape, scale=0.5, dtype=t.dtype)
        if rng.random() < 0.3:
            self.add("const", [x], {"s": s, "buf": name}, params={name: value}, label=f"param[{s}]")
        else:
            self.add("const", [x], {"s": s, "buf": name}, buffers={name: value}, label=f"buffer[{s}]")

    def op_int(self) -> None:
        """An integer island: round(x * scale) as an integer, integer arithmetic, back to float."""
        rng = self.rng
        if self.dtype in LOW_PRECISION or self.nan_inputs:
            raise _Reject("integer rounding of a 16-bit chain could flip (fused chains are not rounded)")
        x = self.pick(lambda t: t.dtype in (torch.float32, torch.float64))
        if x is None:
            raise _Reject("no value")
        p = {"s": rng.choice(["floordiv", "remainder", "torch.remainder", "mul_add", "clamp_min", "abs_neg", "cmp"]),
             "scale": rng.choice([4, 8]), "it": rng.choice([torch.int32, torch.int64]), "k": rng.choice([3, -2, 5]),
             "dt": self.vals[x].dtype}
        self.add("int", [x], p, label=f"int[{p['s']}]")

    def op_slice(self) -> None:
        rng = self.rng
        x = self.pick(lambda t: t.dim() >= 2)
        if x is None:
            raise _Reject("no value")
        t = self.vals[x]
        r = t.dim()
        d = rng.randint(1, r - 1)
        s = rng.choice(["x[:, a:b]", "x[..., ::2]", "x.narrow", "x.select", "x.chunk[0]", "x.split[-1]",
                        "x.unbind[0]", "x.expand", "x.expand"])
        p: dict[str, Any] = {"s": s}
        if s == "x[:, a:b]":
            a = rng.randint(0, t.shape[1] - 1)
            p["a"], p["b"] = a, rng.randint(a + 1, t.shape[1])
        elif s in ("x.narrow", "x.select"):
            a = rng.randint(0, t.shape[d] - 1)
            p.update(d=d, a=a, n=rng.randint(1, t.shape[d] - a))
            if s == "x.select":
                del p["n"]
        elif s in ("x.chunk[0]", "x.split[-1]", "x.unbind[0]"):
            p["d"] = d
        elif s == "x.expand":
            ones = [i for i in range(1, r) if t.shape[i] == 1]
            if not ones:
                raise _Reject("nothing to expand")
            shape = list(t.shape)
            shape[rng.choice(ones)] = rng.randint(2, 6)
            shape[0] = -1
            p["shape"] = tuple(shape)
        self.add("slice", [x], p, label=s)

    def op_alias_write(self) -> None:
        """An alias that eager returns as the same tensor (Identity, Dropout, .contiguous(), same-dtype .to()) or
        a view, a write into one of the two, and a read of the other: the write must be seen through both."""
        rng = self.rng
        a = self.pick(lambda t: True)
        kind = rng.choice(["identity", "dropout", "contiguous", "same_cast", "view", "detach", "noop_arith",
                           "noop_arith"])
        if kind == "noop_arith":
            # b = a * 1 is a new tensor in eager (a may be an input): a write into b, or through a view of b,
            # must not reach a
            s, v = rng.choice([("x*s", 1), ("x+s", 0), ("x-s", 0), ("x/s", 1), ("s*x", 1)])
            b = self.add("scalar", [a], {"s": s, "v": v}, label=f"scalar[{s}] (no-op)")
            tb = self.vals[b]
            writer = b
            if rng.random() < 0.6:
                writer = self.add("reshape", [b], {"s": "x.view", "shape": (-1,)}, label="view") \
                    if tb.is_contiguous() else self.add("reshape", [b], {"s": "x.unsqueeze", "d": 1}, label="unsqueeze")
            self.add("inplace", [writer], {"s": rng.choice(["x.add_", "x.mul_"]), "v": rng.choice([1, -2])},
                     label="in-place write")
            reader = rng.choice([a, b])
            self.add("binary", [b, a] if reader == b else [a, b], {"f": "add", "s": "a+b"},
                     label="add (reads both)")
            return
        if not self._writable(a):
            a = self.add("unary", [a], {"f": "relu", "s": "torch.relu"}, label="relu")
        t = self.vals[a]
        if kind in ("identity", "dropout"):
            name = self._name(kind)
            b = self.add("identity", [a], {"s": "module", "mod": name},
                         modules={name: nn.Identity() if kind == "identity" else nn.Dropout(0.3)}, label=kind)
        elif kind == "contiguous":
            b = self.add("identity", [a], {"s": "x.contiguous"}, label="x.contiguous")
        elif kind == "same_cast":
            b = self.add("cast", [a], {"s": "x.to", "dt": t.dtype}, label="cast[x.to] (same dtype)")
        elif kind == "view":
            b = self.add("reshape", [a], {"s": "x.reshape", "shape": (-1,) + tuple(t.shape[1:])}, label="reshape")
        else:
            b = self.add("identity", [a], {"s": "x.detach"}, label="x.detach")
        writer, reader = (a, b) if rng.random() < 0.5 else (b, a)
        if not self._writable(writer):
            raise _Reject("not writable")
        s = rng.choice(["x.add_", "x.mul_", "x.clamp_wide", "x.relu_", "module", "x.sigmoid_"])
        p: dict[str, Any] = {"s": s}
        mods = {}
        if s in ("x.add_", "x.mul_"):
            p["v"] = rng.choice([1, 0.5, -2])
        elif s == "x.clamp_wide":  # a write that changes nothing for typical inputs: verification cannot see it
            p = {"s": "x.clamp_", "lo": -4.0, "hi": 4.0}
        elif s == "module":
            p["mod"] = self._name("relu_inplace")
            mods[p["mod"]] = nn.ReLU(inplace=True)
        self.add("inplace", [writer], p, modules=mods, label=f"in-place {p['s']}")
        f = rng.choice(["sigmoid", "tanh", "neg", "abs"])
        self.add("unary", [reader], {"f": f, "s": next(iter(UNARY[f]))}, label=f"{f} (reads the other alias)")

    # -- the whole model -------------------------------------------------------------------------------------------
    def build(self) -> tuple[FuzzModel, list[torch.Tensor]]:
        rng = self.rng
        inputs = self.make_inputs()
        if self.nan_inputs:
            inject_nonfinite(inputs[rng.randrange(len(inputs))], rng)
        inputs = [with_layout(t, lay) for t, lay in zip(inputs, self.input_layouts)]
        self.model = _MODEL_CLASSES[len(inputs)](len(inputs)).eval()  # eval: what Dropout/self.training do
        self.model.seed, self.model.dtype = self.seed, self.dtype
        self.model.input_batched = list(self.input_batched)
        self.model.input_layouts = list(self.input_layouts)
        self.model.nan_inputs = self.nan_inputs
        self.model.force_export = (not self.elementwise_only) and rng.random() < 0.1
        self.vals = list(inputs)
        self.uses = [0] * len(inputs)
        self.prec = [t.dtype for t in inputs]
        self.tf32 = [set() for _ in inputs]
        for i, t in enumerate(inputs):
            self.protected.add(t.untyped_storage().data_ptr())
            layout = self.input_layouts[i]
            self.model.notes.append(f"%{i} = input  -> {_short(t.dtype)}{list(t.shape)}"
                                    + (f" ({layout}, strides {t.stride()})" if layout != "contiguous" else ""))
        categories = [(self.op_unary, 20), (self.op_binary, 18), (self.op_scalar, 8), (self.op_cast, 5),
                      (self.op_identity, 4), (self.op_inplace, 6), (self.op_const, 4), (self.op_int, 2),
                      (self.op_alias_write, 3)]
        if not self.elementwise_only:
            categories += [(self.op_conv, 10), (self.op_linear, 7), (self.op_pool, 5), (self.op_reduce, 9),
                           (self.op_reshape, 9), (self.op_cat, 5), (self.op_slice, 5)]
        fns, weights = zip(*categories)
        target = rng.randint(max(2, self.max_nodes // 2), self.max_nodes)
        tries = 0
        while len(self.model.steps) < target and tries < 20 * self.max_nodes:
            tries += 1
            self.attempt(rng.choices(fns, weights)[0])
        if not self.model.steps:
            self.add("unary", [0], {"f": "relu", "s": "torch.relu"}, label="relu", check=False)
        n = len(self.vals)
        outputs = [n - 1]
        if rng.random() < 0.4 and n - 1 > self.model.n_inputs:
            unused = [i for i in range(self.model.n_inputs, n - 1) if self.uses[i] == 0]
            outputs.append(rng.choice(unused) if unused and rng.random() < 0.7
                           else rng.randrange(self.model.n_inputs, n - 1))
        self.model.outputs = outputs
        self.model.output_precision = [self.prec[i] for i in outputs]
        self.model.output_tf32 = [tuple(sorted(self.tf32[i])) for i in outputs]
        return self.model, inputs


_CAST_WITH_DT = ("x.to", "x.to(dtype=)", "x.type")


LAYOUTS = ("transposed", "channels_last", "expanded", "sliced")


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (or, for "expanded", values broadcast along dim 1) in another memory layout: what a
    caller may pass in place of a contiguous tensor of the same shape and dtype (the same input signature)."""
    if layout == "contiguous" or t.dim() < 2:
        return t.contiguous()
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "expanded":
        return t[:, :1].expand(t.shape)
    if layout == "sliced":  # every other element of a twice-as-long last dim
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    raise ValueError(layout)


_PRECISION_RANK = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}


def lowest_precision(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    return min(dtypes, key=lambda d: _PRECISION_RANK.get(d, 4))


def _tf32_enabled(kinds: Sequence[str]) -> bool:
    return ("conv" in kinds and torch.backends.cudnn.allow_tf32) or (
        "matmul" in kinds and torch.backends.cuda.matmul.allow_tf32)


def compare_outputs(actual: Any, expected: Any, precisions: Sequence[torch.dtype],
                    tf32: Sequence[Sequence[str]] = ()) -> Any:
    """fxopt.verify.compare, each output with the tolerance of the lowest precision it was computed in (a float32
    output of a float16 computation gets float16's tolerance: fused 16-bit chains are not rounded step by step,
    see fxopt/verify.py), and TF32's for float32 outputs of CUDA convolutions/matmuls that torch lets run in TF32
    (``tf32``: per output, the kinds of float32 ops it depends on). None, or the first Mismatch."""
    from fxopt import verify
    from fxopt.verify import TOLERANCES, Mismatch, compare

    tf32_tol = getattr(verify, "TF32_TOLERANCE", (2e-3, 1e-4))

    multi = isinstance(expected, tuple)
    exp = list(expected) if multi else [expected]
    if multi != isinstance(actual, tuple) or (multi and len(actual) != len(exp)):
        return compare(actual, expected)
    act = list(actual) if multi else [actual]
    for k, (a, e) in enumerate(zip(act, exp)):
        rtol = atol = None
        if k < len(precisions) and isinstance(e, torch.Tensor) and e.is_floating_point():
            own = TOLERANCES.get(e.dtype, (1e-4, 1e-5))
            low = TOLERANCES.get(precisions[k], own)
            rtol, atol = max(own[0], low[0]), max(own[1], low[1])
            if (e.is_cuda and k < len(tf32) and _tf32_enabled(tf32[k])
                    and precisions[k] in (torch.float32, torch.float64)):
                rtol, atol = max(rtol, tf32_tol[0]), max(atol, tf32_tol[1])
        m = compare(a, e, rtol=rtol, atol=atol)
        if m is not None:
            return Mismatch(f"[{k}]" if multi else "", m.reason)
    return None


def _broadcasts_to(src: Sequence[int], dst: Sequence[int]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(tuple(src), tuple(dst))) == tuple(dst)
    except RuntimeError:
        return False


def generate(seed: int, max_nodes: int = 12, device: str | torch.device = "cpu",
             dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES) -> tuple[FuzzModel, tuple[torch.Tensor, ...], str]:
    """A random model, its example inputs, and a readable listing of its DAG. Deterministic in ``seed`` (the global
    RNGs are left as they were). The model is in eval mode, its parameters do not require grad."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        builder = _Builder(seed, max_nodes, dtypes)
        model, inputs = builder.build()
    model.eval()
    if torch.device(device).type != "cpu":
        model.to(device)
        # .to(device) makes non-dense layouts contiguous: lay the values out again on the device
        inputs = [with_layout(t.contiguous().to(device), lay) for t, lay in zip(inputs, model.input_layouts)]
    return model, tuple(inputs), model.describe()


def inject_nonfinite(t: torch.Tensor, rng: random.Random) -> None:
    """Write NaN/inf/-inf into one to three elements of a contiguous tensor."""
    flat = t.view(-1)
    for v in rng.sample([math.nan, math.inf, -math.inf, math.nan], rng.randint(1, 3)):
        flat[rng.randrange(flat.numel())] = v


def fresh_inputs(model: FuzzModel, inputs: Sequence[torch.Tensor], seed: int, *, batch: int | None = None,
                 scale: float = 1.0, layouts: Sequence[str] | None = None) -> tuple[torch.Tensor, ...]:
    """New random inputs like ``inputs``: the same shapes (dim 0 of batched inputs set to ``batch`` if given),
    dtypes and devices, in the model's input layouts (or ``layouts``), NaN/inf where the model's inputs have them."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    layouts = list(layouts) if layouts is not None else list(getattr(model, "input_layouts", ())) or \
        ["contiguous"] * len(inputs)
    out = []
    for t, batched in zip(inputs, model.input_batched):
        shape = list(t.shape)
        if batch is not None and batched:
            shape[0] = batch
        out.append((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(t.dtype))
    if model.nan_inputs:
        inject_nonfinite(out[rng.randrange(len(out))], rng)
    return tuple(with_layout(t.to(src.device), lay) for t, lay, src in zip(out, layouts, inputs))


def other_batch(model: FuzzModel, inputs: Sequence[torch.Tensor], seed: int) -> int | None:
    """A batch size other than the inputs' for a re-specialization, or None if the model has no batch dim."""
    if not any(model.input_batched):
        return None
    b = inputs[0].shape[0]
    return random.Random(seed).choice([x for x in (1, 2, 3, 5) if x != b])


# ---------------------------------------------------------------------------------------------------------------
# The differential check
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Finding:
    """One way fxopt went wrong on a case: a ``mismatch`` with eager (silently wrong), an ``error`` (fxopt raised
    where eager did not) or ``strict`` (strict=True disagrees with the rollbacks). ``where`` names the call;
    ``culprit`` is the pass whose disabling makes it go away, when :func:`run_case` triaged it."""

    kind: str
    where: str
    message: str
    culprit: str | None = None

    def __str__(self) -> str:
        blame = ""
        if self.culprit:
            blame = f" [goes away with disable={self.culprit.split('+')}]"
        return f"{self.kind.upper()} at {self.where}: {self.message}{blame}"


@dataclasses.dataclass
class CaseResult:
    """What one generated case did under fxopt. ``failed`` (a bug: fxopt silently wrong, or crashing) is set by
    findings; ``rollbacks`` are passes that broke numerics and were caught by verification (not wrong results,
    but each is a bug in that pass); ``compile_fallbacks`` are fused groups whose generated kernel did not build."""

    seed: int
    description: str = ""
    dtype: str = ""
    backend: str = ""
    findings: list[Finding] = dataclasses.field(default_factory=list)
    rollbacks: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (pass, reason), every specialization
    first_rollbacks: list[str] = dataclasses.field(default_factory=list)  # passes rolled back for the example inputs
    compile_fallbacks: list[str] = dataclasses.field(default_factory=list)
    strict_error: str | None = None
    applied_passes: list[str] = dataclasses.field(default_factory=list)  # applied or rolled back, any specialization
    rebatched: bool = False
    capture: str = ""
    seconds: float = 0.0
    summary: str = ""
    replay: str = ""  # the command that re-runs this case (replay_command)

    @property
    def failed(self) -> bool:
        return bool(self.findings)

    def report(self) -> str:
        lines = [f"fuzz case seed={self.seed} ({self.dtype}, backend {self.backend}, captured by {self.capture})"]
        lines += [f"  {f}" for f in self.findings]
        lines += [f"  rolled back: {p}: {r}" for p, r in self.rollbacks]
        lines += [f"  kernel fallback: {n.splitlines()[0]}" for n in self.compile_fallbacks]
        if self.strict_error:
            lines.append(f"  strict=True raised: {self.strict_error}")
        lines.append(self.description)
        if self.summary:
            lines.append(self.summary)
        lines.append(f"reproduce: {self.replay or f'python tests/fuzz/model_generator.py {self.seed}'}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["findings"] = [dataclasses.asdict(f) for f in self.findings]
        d.pop("summary")
        return d


def _first_line(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + "..."


def _collect_records(opt: Any, result: CaseResult) -> None:
    for spec in opt.specializations:
        for r in spec.records:
            if r.status in ("applied", "rolled back") and r.name not in result.applied_passes:
                result.applied_passes.append(r.name)
            if r.status == "rolled back":
                entry = (r.name, r.error or "")
                if entry not in result.rollbacks:
                    result.rollbacks.append(entry)
            for n in r.notes:
                if "kept as PyTorch ops" in n and n not in result.compile_fallbacks:
                    result.compile_fallbacks.append(n)


def _layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its exact memory layout (strides, offset, overlap of an expanded tensor): a copy of its
    storage seen through the same view."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage().clone(), t.storage_offset(), t.size(), t.stride())


def run_case(seed: int, *, backend: str = "cpp", device: str = "cpu", max_nodes: int = 12,
             dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES, strict: bool = True, more_calls: bool = True,
             disable: Sequence[str] = (), triage: bool = True, summary: bool = False) -> CaseResult:
    """Generate case ``seed``, optimize it, compare with eager, and optimize it again with ``strict=True``.

    The optimized module is called on: the example inputs (twice); new values of the same signature (what
    verification, which only ran the example inputs, cannot vouch for); the same shapes in other memory layouts
    (strides are not part of the signature); another batch size (a re-specialization), where eager accepts it;
    and the example inputs again. With ``triage``, each finding is blamed on the pass whose disabling makes it go
    away. Never raises for what fxopt does: everything is in the result."""
    import fxopt

    t0 = time.perf_counter()
    model, inputs, desc = generate(seed, max_nodes=max_nodes, device=device, dtypes=dtypes)
    result = CaseResult(seed, desc, _short(model.dtype), backend,
                        replay=replay_command(seed, max_nodes=max_nodes, dtypes=dtypes, backend=backend,
                                              device=str(device)))
    with torch.no_grad():
        expected = model(*inputs)

    originals = [t.clone() for t in inputs]

    def inputs_changed(label: str, args: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> None:
        for i, (t, t0) in enumerate(zip(args, before)):
            if not torch.equal(t.nan_to_num(), t0.nan_to_num()):  # eager never writes into the generated inputs
                result.findings.append(Finding("mismatch", label, f"input {i} was modified in place"))
                with torch.no_grad():
                    t.copy_(t0)  # restore it for the checks that follow

    def check(label: str, opt: Any, args: Sequence[torch.Tensor], want: Any = None) -> bool:
        eager_args = None
        if want is None:
            # eager runs on copies with the same memory layout: in another layout a view may replace a copy
            # (flatten of a contiguous tensor), and the model then writes into its input, as fxopt must too
            eager_args = [_layout_copy(t) for t in args]
            try:
                with torch.no_grad():
                    want = model(*eager_args)
            except Exception:
                return False  # eager refuses these inputs (no free batch dimension): nothing to compare
        before = [t.clone() for t in args]
        try:
            with torch.no_grad():
                got = opt(*args)
        except Exception as e:
            result.findings.append(Finding("error", label, f"{_first_line(e)}\n{traceback.format_exc(limit=-3)}"))
            return False
        finally:
            if eager_args is None:
                inputs_changed(label, args, before)
            else:  # the inputs after the call: as eager left its copies (untouched, or written the same way)
                for i, (t, e) in enumerate(zip(args, eager_args)):
                    if not torch.equal(t.nan_to_num(), e.nan_to_num()):
                        result.findings.append(Finding("mismatch", label, f"input {i} after the call differs from "
                                                                          f"eager's (an in-place write lost or added)"))
        m = compare_outputs(got, want, model.output_precision, model.output_tf32)
        if m is not None:
            shapes = ", ".join(f"{_short(t.dtype)}{list(t.shape)} strides {t.stride()}" for t in args)
            result.findings.append(Finding("mismatch", label, f"{m} (inputs: {shapes})"))
        return True

    opt = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rollbacks are read from the records
        try:
            opt = fxopt.optimize(model, inputs, backend=backend, disable=disable)
            info = opt.capture_info
            result.capture = info.method if info is not None else "?"
            result.first_rollbacks = [r.name for r in opt.records if r.status == "rolled back"]
        except Exception as e:
            result.findings.append(Finding("error", "optimize", f"{_first_line(e)}\n{traceback.format_exc(limit=-3)}"))
        inputs_changed("optimize (example inputs)", inputs, originals)
        if opt is not None:
            check("example inputs", opt, inputs, expected)
            check("example inputs, second call", opt, inputs, expected)
        if opt is not None and more_calls and not result.findings:
            check("new values, same signature", opt, fresh_inputs(model, inputs, seed + 1))
            if model.dtype in (torch.float32, torch.float64) and not model.nan_inputs:
                check("new values x4, same signature", opt, fresh_inputs(model, inputs, seed + 2, scale=4.0))
            rng = random.Random(seed + 3)
            layouts = [rng.choice(LAYOUTS) if lay == "contiguous" else "contiguous" for lay in model.input_layouts]
            check(f"same shapes, layouts {layouts}", opt, fresh_inputs(model, inputs, seed + 3, layouts=layouts))
            b2 = other_batch(model, inputs, seed)
            if b2 is not None:
                result.rebatched = check(f"batch {b2} (re-specialized)", opt,
                                         fresh_inputs(model, inputs, seed + 4, batch=b2))
                if result.rebatched:
                    check("example inputs after re-specializing", opt, inputs, expected)
        if opt is not None:
            _collect_records(opt, result)
            if summary:
                try:
                    result.summary = opt.summary()
                except Exception as e:  # the report itself failing is worth knowing, not fatal here
                    result.summary = f"(summary failed: {_first_line(e)})"
        if strict and opt is not None:
            try:
                try:
                    sopt = fxopt.optimize(model, inputs, backend=backend, strict=True, disable=disable)
                finally:
                    inputs_changed("strict=True optimize (example inputs)", inputs, originals)
                check("strict=True, example inputs", sopt, inputs, expected)
            except fxopt.PassError as e:
                result.strict_error = _first_line(e)
            except Exception as e:
                result.strict_error = _first_line(e)
                result.findings.append(Finding("error", "strict=True optimize", result.strict_error))
            if bool(result.strict_error) != bool(result.first_rollbacks) and not any(
                    f.where == "strict=True optimize" for f in result.findings):
                result.findings.append(Finding(
                    "strict", "strict=True optimize",
                    f"strict=True {'raised ' + str(result.strict_error) if result.strict_error else 'did not raise'}"
                    f" but the non-strict run rolled back {result.first_rollbacks or 'nothing'}"))
    if triage and result.findings:
        _triage(result, seed, backend=backend, device=device, max_nodes=max_nodes, dtypes=dtypes, disable=disable)
    result.seconds = time.perf_counter() - t0
    return result


def _triage(result: CaseResult, seed: int, **kw: Any) -> None:
    """Blame each finding on the pass(es) whose disabling makes it go away: one pass, else a pair. Only passes that
    changed the graph (applied or rolled back in some specialization) are candidates."""
    import itertools

    from fxopt.passes import pass_names

    key = lambda f: (f.kind, f.where)  # noqa: E731
    open_ = {key(f) for f in result.findings}
    try:
        names = [n for n in pass_names(kw["backend"]) if n not in kw["disable"]]
    except Exception:
        return
    try:  # findings that stay with every pass disabled are no pass's (capture, the runtime)
        bare = run_case(seed, triage=False, **dict(kw, disable=tuple(kw["disable"]) + tuple(names)))
        open_ -= {key(f) for f in bare.findings}
        applied = [n for n in names if n in bare.applied_passes or n in result.applied_passes]
    except Exception:
        applied = list(names)
    for combo in itertools.chain(itertools.combinations(applied, 1), itertools.combinations(applied, 2)):
        if not open_:
            break
        try:
            again = run_case(seed, triage=False, **dict(kw, disable=tuple(kw["disable"]) + combo))
        except Exception:
            continue
        gone = open_ - {key(f) for f in again.findings}
        for f in result.findings:
            if key(f) in gone and f.culprit is None:
                f.culprit = "+".join(combo)
        open_ -= gone


def parse_dtypes(text: str) -> tuple[torch.dtype, ...]:
    """``float32:4,float16:3`` -> a weighted tuple for ``generate`` (the weight is how often each is drawn)."""
    out: list[torch.dtype] = []
    for item in text.split(","):
        name, _, weight = item.strip().partition(":")
        dtype = getattr(torch, name, None)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"unknown model dtype {name!r} in {text!r}; expected one of "
                             f"{', '.join(_short(d) for d in FLOAT_DTYPES)}")
        out += [dtype] * int(weight or 1)
    return tuple(out)


def format_dtypes(dtypes: Sequence[torch.dtype]) -> str:
    """The inverse of :func:`parse_dtypes` (order of first appearance kept: it decides which model is drawn)."""
    counts: dict[torch.dtype, int] = {}
    for d in dtypes:
        counts[d] = counts.get(d, 0) + 1
    if list(dtypes) != [d for d, n in counts.items() for _ in range(n)]:
        raise ValueError("dtypes must be grouped (all float32s, then all float16s, ...) to be written as weights")
    return ",".join(f"{_short(d)}:{n}" for d, n in counts.items())


def replay_command(seed: int, *, max_nodes: int, dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES,
                   backend: str = "cpp", device: str = "cpu") -> str:
    """The command that regenerates and re-checks case ``seed``: the seed alone is not enough, the model also
    depends on ``max_nodes`` and the dtype weights."""
    cmd = f"python tests/fuzz/model_generator.py {seed} --max-nodes {max_nodes}"
    if tuple(dtypes) != DEFAULT_DTYPES:
        cmd += f" --dtypes {format_dtypes(dtypes)}"
    if (backend, device) != ("cpp", "cpu"):
        cmd += f" --backend {backend} --device {device}"
    return cmd


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate fuzz case(s) from seeds, optimize, compare with eager.")
    ap.add_argument("seeds", type=int, nargs="+")
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-nodes", type=int, default=12,
                    help="as the run that found the seed used it (tests: 12; benchmarks/fuzz_gpu.py: its --max-nodes)")
    ap.add_argument("--dtypes", default=None,
                    help="weighted model dtypes as the run that found the seed drew them, e.g. float32:4,float16:3 "
                         f"(default: {format_dtypes(DEFAULT_DTYPES)})")
    ap.add_argument("--describe-only", action="store_true")
    ap.add_argument("--disable", action="append", default=[], help="a pass to switch off (repeatable)")
    args = ap.parse_args(argv)
    dtypes = parse_dtypes(args.dtypes) if args.dtypes else DEFAULT_DTYPES
    bad = 0
    for seed in args.seeds:
        if args.describe_only:
            print(generate(seed, args.max_nodes, args.device, dtypes=dtypes)[2])
            continue
        r = run_case(seed, backend=args.backend, device=args.device, max_nodes=args.max_nodes, dtypes=dtypes,
                     summary=True, disable=tuple(args.disable))
        print(r.report())
        print(f"-> {'FAILED' if r.failed else 'ok'} in {r.seconds:.2f}s\n")
        bad += r.failed
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(_main())
