"""A fused region -> a small expression program shared by every target.

A region is a set of elementwise nodes with one iteration space. Lowering gives a straight-line program::

    inputs   in0: float16, in1: float32        (tensors read, one element each)
    v0 = fx_relu(in0)                            float
    v1 = (v0 + in1)                              float
    outputs  v1 -> float16                       (tensors written)

Each statement's C++ expression comes from the op table (:mod:`fxopt.ops`); values carry their compute type
(float16/bfloat16 compute in float). The C++ and CUDA printers only differ in the loop around this program.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx

from .. import ops

# C type that holds each dtype in memory, and the one arithmetic happens in.
STORAGE_CTYPES = {
    torch.float16: "fx_half", torch.bfloat16: "fx_bf16", torch.float32: "float", torch.float64: "double",
    torch.int64: "int64_t", torch.int32: "int32_t", torch.int16: "int16_t", torch.int8: "int8_t",
    torch.uint8: "uint8_t", torch.bool: "bool",
}


# The rounding function per 16-bit type: a value rounded to what eager stores (NOTE [16-bit intermediates]).
ROUNDING = {torch.float16: "fx_round_half", torch.bfloat16: "fx_round_bf16"}


def compute_ctype(dtype: torch.dtype) -> str:
    return STORAGE_CTYPES[ops.compute_dtype(dtype)]


@dataclass
class Stmt:
    var: str
    dtype: torch.dtype  # the compute dtype of the value
    expr: str
    op: str  # canonical op name, for names and reports


@dataclass
class Region:
    """A lowered fused region: what each generated kernel computes per element."""

    name: str
    input_dtypes: list[torch.dtype]
    stmts: list[Stmt]
    outputs: list[tuple[str, torch.dtype]]  # (value, dtype stored)
    ndim: int
    op_names: list[str] = field(default_factory=list)
    # inputs also read rotated along the last dim, as value ``rot<i>`` (NOTE [Gathering reads]): only the strided
    # kernel, which knows each element's last-dim index, computes such a region
    rotated_inputs: tuple[int, ...] = ()
    # every output is written into its destination tensor at one device-side index along this dim instead of a
    # fresh tensor (NOTE [Writes into a cache], passes/cache_writes.py): a strided kernel alone, like rotated reads
    scatter_dim: int | None = None

    @property
    def strided_only(self) -> bool:
        return bool(self.rotated_inputs) or self.scatter_dim is not None

    def signature_text(self) -> str:
        """Everything that determines the generated code, for naming and caching."""
        body = ";".join(f"{s.var}:{s.dtype}={s.expr}" for s in self.stmts)
        scatter = "" if self.scatter_dim is None else f"|into@{self.scatter_dim}"
        return f"{self.input_dtypes}|{body}|{self.outputs}|{self.ndim}|{self.rotated_inputs}{scatter}"


def literal(value: bool | int | float, dtype: torch.dtype) -> str:
    """A Python scalar as a C++ literal of the compute type ``dtype``."""
    ct = compute_ctype(dtype)
    if ct == "bool":
        return "true" if value else "false"
    if ct in ("float", "double"):
        v = float(value)
        suffix = "F" if ct == "float" else "D"
        if math.isnan(v):
            return f"FX_NAN_{suffix}"
        if math.isinf(v):
            return f"FX_INF_{suffix}" if v > 0 else f"(-FX_INF_{suffix})"
        text = repr(v)
        return f"{text}f" if ct == "float" else text
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"non-integer scalar {value} in an integer computation")
    return f"(({ct}){int(value)}LL)"


def convert(expr: str, src: torch.dtype, dst: torch.dtype) -> str:
    """Convert a value between compute types (bool conversion tests for nonzero, as eager's does)."""
    if src == dst:
        return expr
    if dst == torch.bool:
        return f"({expr} != 0)"
    return f"(({STORAGE_CTYPES[dst]})({expr}))"


class RegionBuilder:
    """Lowers a group of fx nodes (topologically ordered) with their external inputs and outputs."""

    def __init__(self, gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Sequence[fx.Node],
                 outputs: Sequence[fx.Node]):
        self.gm = gm
        self.nodes = list(nodes)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.values: dict[fx.Node, tuple[str, torch.dtype]] = {}
        self.stmts: list[Stmt] = []
        self.rotated: set[int] = set()

    def build(self) -> Region:
        input_dtypes = []
        for i, node in enumerate(self.inputs):
            dtype = ops.tensor_meta(node).dtype
            input_dtypes.append(dtype)
            self.values[node] = (f"in{i}", ops.compute_dtype(dtype))
        for n, node in enumerate(self.nodes):
            call = ops.match_elementwise(node, self.gm)
            assert isinstance(call, ops.ElementwiseCall), f"{node.name} was grouped but is not fusible: {call}"
            dtype, expr = self._lower(node, call)
            var = f"v{n}"
            self.stmts.append(Stmt(var, dtype, expr, call.op.name))
            self.values[node] = (var, dtype)
        outs = []
        for node in self.outputs:
            var, _ = self.values[node]
            outs.append((var, ops.tensor_meta(node).dtype))
        op_names = [s.op for s in self.stmts]
        ndim = len(ops.tensor_meta(self.nodes[-1]).shape)
        region = Region("", input_dtypes, self.stmts, outs, ndim, op_names, tuple(sorted(self.rotated)))
        region.name = kernel_name(region)
        return region

    def _operand(self, o: ops.Operand, to: torch.dtype) -> str:
        if isinstance(o, fx.Node):
            var, dtype = self.values[o]
            return convert(var, dtype, to)  # 16-bit values are rounded where computed (NOTE [16-bit intermediates])
        return literal(o, to)

    def _lower(self, node: fx.Node, call: ops.ElementwiseCall) -> tuple[torch.dtype, str]:
        op = call.op
        out_dtype = ops.tensor_meta(node).dtype
        out_ct = ops.compute_dtype(out_dtype)
        if op.gathers:  # NOTE [Gathering reads]: the printer defines rot<i>, input i read rotated
            (x,) = call.operands
            if x not in self.inputs:
                raise ValueError(f"{node.name}: {op.name} reads {getattr(x, 'name', x)} at other indices, so it must "
                                 f"be a kernel input, not a value computed in the kernel")
            i = self.inputs.index(x)
            if ops.tensor_meta(x).dtype != out_dtype or ops.tensor_meta(x).shape[-1] != ops.tensor_meta(node).shape[-1]:
                raise ValueError(f"{node.name}: {op.name} changes its operand's dtype or last dim")
            self.rotated.add(i)
            return out_ct, f"rot{i}"
        if op.compute == "promote":
            operand_ct = ops.compute_dtype(ops.promoted_dtype(call.operands))
        elif op.compute == "bool":
            operand_ct = torch.bool
        else:
            operand_ct = out_ct
        args = [self._operand(o, operand_ct) for o in call.operands]
        if op.name == "where":
            args[0] = self._operand(call.operands[0], torch.bool)
        attrs = {k: literal(v, operand_ct) for k, v in self._attrs(call, out_dtype).items()}
        if op.compute == "promote" and operand_ct == torch.float32:
            promoted = ops.promoted_dtype(call.operands)
            if promoted in ROUNDING:
                # eager compares in the 16-bit type: a Python float or a float32 0-d operand is rounded to it first
                args = [a if isinstance(o, fx.Node) and ops.tensor_meta(o).dtype == promoted
                        else f"{ROUNDING[promoted]}({a})" for o, a in zip(call.operands, args)]
        exponent = call.operands[1] if op.name == "pow" and not isinstance(call.operands[1], fx.Node) else None
        if exponent == 2:
            expr = f"({args[0]} * {args[0]})"  # eager special-cases x ** 2 as a multiply
        elif exponent == 0.5 and out_dtype in (torch.float32, torch.float64):
            expr = f"fx_sqrt({args[0]})"  # and x ** 0.5 as sqrt (sqrt(-0) = -0, sqrt(-inf) = nan); not float16
        elif exponent == -0.5 and out_dtype in (torch.float32, torch.float64):
            expr = f"fx_rsqrt({args[0]})"
        else:
            expr = op.expr.format(*args, **attrs)
        result_ct = torch.bool if op.compute in ("promote", "bool") else out_ct
        expr = convert(expr, result_ct, out_ct)
        if out_dtype in ROUNDING:
            # NOTE [16-bit intermediates]: eager stores every float16/bfloat16 op's result in its type, so the next
            # op reads it rounded. Each such value is rounded here as it is computed (kept in a float register):
            # the kernel then computes what eager computes, not Inductor's float32-between-ops (whose results
            # drift an ulp from eager's and flip comparisons and masks on such a value: tests/fuzz seeds 20261984,
            # 20262122). Two conversions per op, free in a memory-bound kernel.
            expr = f"{ROUNDING[out_dtype]}({expr})"
        return out_ct, expr

    @staticmethod
    def _attrs(call: ops.ElementwiseCall, out_dtype: torch.dtype) -> dict:
        attrs = dict(call.attrs)
        if call.op.name == "nan_to_num":
            info = torch.finfo(out_dtype)
            attrs["posinf"] = info.max if attrs.get("posinf") is None else attrs["posinf"]
            attrs["neginf"] = info.min if attrs.get("neginf") is None else attrs["neginf"]
        return attrs


def kernel_name(region: Region) -> str:
    """``fxopt_relu_sigmoid_1a2b3c4d``: the ops it fuses (first few) and a hash of everything it computes."""
    digest = hashlib.sha256(region.signature_text().encode()).hexdigest()[:8]
    ops_part = "_".join(dict.fromkeys(region.op_names))[:48].rstrip("_")
    return f"fxopt_{ops_part}_{digest}"


def lower_region(gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Sequence[fx.Node],
                 outputs: Sequence[fx.Node]) -> Region:
    return RegionBuilder(gm, nodes, inputs, outputs).build()
