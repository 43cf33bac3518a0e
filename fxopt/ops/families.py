"""Families of ops the passes and the runtime ask about, beyond the elementwise and row tables: convolutions and
GEMMs (the heavy work), reshapes, dropout, ops that return or alias their input, calls with side effects, ops with
a neutral scalar, what a dispatched ATen op computes, and the torch.nn composites eager runs as one fused op.

Each family is a named set of spellings (call_function targets, call_method names, nn.Module classes) with a query a
pass calls (``ops.is_reshape(node, gm)``); the sets are the ones the passes kept before (issue 17), unchanged.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .classify import DROPOUT_MODULES
from .meta import bind_args, tensor_meta

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------------------------
# Convolutions and GEMMs
# ---------------------------------------------------------------------------------------------------------------
CONV_FUNCTIONS = frozenset({
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.conv1d, torch.conv2d, torch.conv3d, torch.cudnn_convolution_relu, torch.cudnn_convolution_add_relu,
    aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.cudnn_convolution.default, aten.conv_transpose2d.input,
})
# 2-D convolution spellings cuDNN can run in channels_last (aten.convolution may have any rank and the fused cuDNN
# ops any layout: callers check the recorded shape). Used by to_channels_last, with nn.Conv2d.
CONV2D_FUNCTIONS = frozenset({F.conv2d, aten.conv2d.default, aten.convolution.default,
                              torch.cudnn_convolution_relu, torch.cudnn_convolution_add_relu})
GEMM_FUNCTIONS = frozenset({
    F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch._addmm_activation,
    operator.matmul, F.scaled_dot_product_attention, aten.linear.default, aten.mm.default, aten.bmm.default,
    aten.addmm.default, aten.matmul.default, aten._addmm_activation.default, aten.baddbmm.default,
})
GEMM_METHODS = frozenset({"matmul", "mm", "bmm", "addmm", "baddbmm", "__matmul__"})
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
HEAVY_MODULES = (*CONV_MODULES, *CONV_TRANSPOSE_MODULES, nn.Linear, nn.Bilinear, nn.MultiheadAttention)
# The functional convolution each nn.ConvNd calls (by exact module type), taking the module's attributes.
CONV_MODULE_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
# F.linear and its ATen twin: (input, weight, bias=None).
LINEAR_FUNCTIONS = frozenset({F.linear, aten.linear.default})
# ``addmm(bias, x, w)`` with w already [in, out]: transformers' Conv1D (GPT-2) and hand-written layers; fuse_epilogues
# moves a per-channel bias into the tail (NOTE [Bias in the tail])
ADDMM_FUNCTIONS = frozenset({torch.addmm, aten.addmm.default})
MM_FUNCTIONS = frozenset({torch.mm, aten.mm.default})
# F.conv2d and its ATen twin: (input, weight, bias, stride, padding, dilation, groups).
FUNCTIONAL_CONV2D = frozenset({F.conv2d, aten.conv2d.default})
# Functional and ATen convolutions and linears that a BatchNorm after them can fold into:
# {target: (weight argument index, bias argument index, kind)}, kind "conv" or "linear".
WEIGHT_BIAS_FUNCTIONS: dict[Any, tuple[int, int, str]] = {
    F.conv1d: (1, 2, "conv"), F.conv2d: (1, 2, "conv"), F.conv3d: (1, 2, "conv"),
    F.linear: (1, 2, "linear"),
    aten.conv1d.default: (1, 2, "conv"), aten.conv2d.default: (1, 2, "conv"), aten.conv3d.default: (1, 2, "conv"),
    aten.linear.default: (1, 2, "linear"),
}
# GEMMs whose arguments are (bias, input, weight): the reduction is the input's (second argument's) last dim.
WEIGHT_FIRST_GEMMS = frozenset({torch.addmm, torch._addmm_activation, aten.addmm.default,
                                aten._addmm_activation.default, torch.baddbmm, aten.baddbmm.default})


def is_conv_function(target: Any) -> bool:
    """Whether a call_function target is a convolution (any rank, transposed or not, cuDNN's fused ones)."""
    return target in CONV_FUNCTIONS


def is_plain(m: nn.Module, types: type | tuple[type, ...]) -> bool:
    """``isinstance(m, types)`` with that type's own ``forward``: a subclass that overrides it computes something
    else (timm's StdConv2d standardizes its weight, Conv2dSame pads by the input's size, BatchNormAct2d adds an
    activation), so passes that rewrite a module from its weights must not take it for the base."""
    for t in (types if isinstance(types, tuple) else (types,)):
        if isinstance(m, t):
            return type(m).forward is t.forward
    return False


def is_linear_module(m: nn.Module) -> bool:
    return is_plain(m, nn.Linear)


def is_batchnorm_module(m: nn.Module) -> bool:
    """``nn.BatchNorm1d/2d/3d`` (or a subclass keeping their forward)."""
    return is_plain(m, nn.modules.batchnorm._BatchNorm)


def is_conv2d(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node is a 2-D convolution cuDNN may run in channels_last: ``nn.Conv2d`` or a spelling of
    :data:`CONV2D_FUNCTIONS`."""
    if node.op == "call_module":
        return is_plain(gm.get_submodule(node.target), nn.Conv2d)
    return node.op == "call_function" and node.target in CONV2D_FUNCTIONS


def is_heavy(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node is a convolution or a GEMM (a module, a method or a function spelling)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), HEAVY_MODULES)
    if node.op == "call_method":
        return node.target in GEMM_METHODS
    return node.op == "call_function" and (node.target in CONV_FUNCTIONS or node.target in GEMM_FUNCTIONS)


def is_conv_module(m: nn.Module) -> bool:
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (not transposed; a subclass only if it keeps their forward)."""
    return is_plain(m, CONV_MODULES)


def is_conv_transpose_module(m: nn.Module) -> bool:
    return is_plain(m, CONV_TRANSPOSE_MODULES)


def is_linear_function(target: Any) -> bool:
    return target in LINEAR_FUNCTIONS


def is_functional_conv2d(target: Any) -> bool:
    return target in FUNCTIONAL_CONV2D


def weight_bias_args(target: Any) -> tuple[int, int, str] | None:
    """For a functional/ATen convolution or linear, ``(weight index, bias index, kind)``; None otherwise."""
    return WEIGHT_BIAS_FUNCTIONS.get(target)


def is_weight_first_gemm(target: Any) -> bool:
    """Whether a GEMM's arguments are ``(bias, input, weight)`` (addmm, baddbmm, _addmm_activation)."""
    return target in WEIGHT_FIRST_GEMMS


# ---------------------------------------------------------------------------------------------------------------
# Reshapes: views that keep the elements in row-major order and only change the shape
# ---------------------------------------------------------------------------------------------------------------
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
# Reshapes that reinterpret the elements in row-major order: their meaning depends on the memory layout.
ROW_MAJOR_RESHAPE_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten"})
ROW_MAJOR_RESHAPE_FUNCTIONS = frozenset({torch.flatten, torch.reshape, aten.view.default, aten._unsafe_view.default,
                                         aten.reshape.default, aten.flatten.using_ints, aten.unflatten.int})
# Adding or removing size-1 dimensions.
SQUEEZE_METHODS = frozenset({"squeeze", "unsqueeze"})
SQUEEZE_FUNCTIONS = frozenset({torch.squeeze, torch.unsqueeze, aten.unsqueeze.default, aten.squeeze.dim,
                               aten.squeeze.dims, aten.squeeze.default})
RESHAPE_METHODS = ROW_MAJOR_RESHAPE_METHODS | SQUEEZE_METHODS
RESHAPE_FUNCTIONS = ROW_MAJOR_RESHAPE_FUNCTIONS | SQUEEZE_FUNCTIONS
# Reshapes that return a view when the input's layout allows it, and a copy otherwise.
MAY_COPY_RESHAPE_METHODS = frozenset({"reshape", "reshape_as", "flatten"})
MAY_COPY_RESHAPE_FUNCTIONS = frozenset({torch.reshape, torch.flatten, aten.reshape.default, aten.flatten.using_ints})


def is_reshape_module(m: nn.Module) -> bool:
    """``nn.Flatten`` / ``nn.Unflatten``."""
    return isinstance(m, RESHAPE_MODULES)


def is_reshape(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node is a reshape-like view (view, reshape, flatten, unflatten, squeeze, unsqueeze, ...)."""
    if node.op == "call_method":
        return node.target in RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in RESHAPE_FUNCTIONS
    if node.op == "call_module":
        return is_reshape_module(gm.get_submodule(node.target))
    return False


def reads_layout(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node is a reshape whose result depends on its input's memory layout (view, reshape, flatten,
    unflatten and their module spellings; not squeeze/unsqueeze)."""
    if node.op == "call_method":
        return node.target in ROW_MAJOR_RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in ROW_MAJOR_RESHAPE_FUNCTIONS
    if node.op == "call_module":
        return is_reshape_module(gm.get_submodule(node.target))
    return False


# ---------------------------------------------------------------------------------------------------------------
# Data movement: ops whose result holds their input's elements, moved (reshapes, permutes, rolls, copies, slices);
# a chain of them is a fixed index map for given shapes (NOTE [Movement maps] in codegen/rowwise.py)
# ---------------------------------------------------------------------------------------------------------------
MOVEMENT_METHODS = frozenset({*RESHAPE_METHODS, "permute", "transpose", "contiguous", "clone", "roll"})
MOVEMENT_FUNCTIONS = frozenset({torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze,
                                torch.unsqueeze, torch.clone, torch.roll})
# Shape queries a movement chain's arguments may be computed from (``x.shape[0]``, ``x.size(1)``).
SHAPE_QUERY_METHODS = frozenset({"size", "dim"})


def moves_data(node: fx.Node) -> bool:
    """Whether the (torch-level) node only moves its first argument's elements: MOVEMENT_METHODS /
    MOVEMENT_FUNCTIONS, or ``x[slices]``."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in MOVEMENT_METHODS
    if node.op == "call_function":
        if node.target is operator.getitem:
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            return all(isinstance(a, slice) for a in index)
        return node.target in MOVEMENT_FUNCTIONS
    return False


def is_shape_query(node: fx.Node) -> bool:
    """``x.shape``, ``x.size(...)``, ``x.dim()``."""
    return (node.op == "call_function" and node.target is builtins.getattr and len(node.args) == 2
            and node.args[1] == "shape") or (node.op == "call_method" and node.target in SHAPE_QUERY_METHODS)


def view_possible(shape, stride, new_shape) -> bool:
    """Whether a tensor of ``shape`` and ``stride`` has a view of ``new_shape`` (torch's rule, on a meta tensor): what
    ``view`` allows, and where ``reshape``/``flatten`` return a view rather than a copy."""
    try:
        torch.empty_strided(tuple(shape), tuple(stride), device="meta").view(tuple(new_shape))
    except RuntimeError:
        return False
    return True


def may_copy_reshape(node: fx.Node) -> bool:
    """Whether the node (call_method / call_function) is a reshape that copies when its input's layout does not
    allow a view (reshape, flatten, reshape_as; ``view_as`` is a view or an error)."""
    return (node.op == "call_method" and node.target in MAY_COPY_RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in MAY_COPY_RESHAPE_FUNCTIONS)


# ---------------------------------------------------------------------------------------------------------------
# Dropout and identities
# ---------------------------------------------------------------------------------------------------------------
# ATen-level dropout: dropout(input, p, train).
ATEN_DROPOUT_FUNCTIONS = frozenset({aten.dropout.default, torch.dropout})
# Modules that return their input itself (dropout whether or not it is in training mode: callers check).
RETURNS_INPUT_MODULES = (nn.Identity, *DROPOUT_MODULES)
# ATen overloads that return their input itself when dtype, device and layout already match.
SAME_TENSOR_OVERLOADS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.contiguous.default})
# ATen ops whose result is a view of their input, though their schema does not say so.
HIDDEN_ALIAS_OVERLOADS = frozenset({aten._unsafe_view.default, aten.alias.default, aten.lift_fresh.default})


def is_dropout_module(m: nn.Module) -> bool:
    return isinstance(m, DROPOUT_MODULES)


def is_stochastic_depth(target: Any) -> bool:
    """``torchvision.ops.stochastic_depth(input, p, mode, training)`` (torchvision wraps it for fx: a call_function on
    the function itself), known by name so torchvision need not be imported. Like dropout, it returns its input when
    ``training`` is False or ``p`` is 0 (torchvision's ConvNeXt calls it on every block's residual branch)."""
    return (getattr(target, "__module__", None) == "torchvision.ops.stochastic_depth"
            and getattr(target, "__name__", None) == "stochastic_depth")


def is_aten_dropout(target: Any) -> bool:
    """``aten.dropout.default`` / ``torch.dropout``: ``(input, p, train)``."""
    return target in ATEN_DROPOUT_FUNCTIONS


def returns_input_module(m: nn.Module) -> bool:
    """``nn.Identity`` and the dropout modules."""
    return isinstance(m, RETURNS_INPUT_MODULES)


def is_same_tensor_overload(target: Any) -> bool:
    """``aten.to.*`` / ``aten.contiguous``: the input itself when nothing changes."""
    return target in SAME_TENSOR_OVERLOADS


def is_hidden_alias(target: Any) -> bool:
    """ATen ops whose result is a view of their input though their schema does not say so (_unsafe_view, alias,
    lift_fresh)."""
    return target in HIDDEN_ALIAS_OVERLOADS


# ---------------------------------------------------------------------------------------------------------------
# Side effects, neutral scalars, dispatched compute
# ---------------------------------------------------------------------------------------------------------------
# Calls kept even when their result is unused: they check something or talk to the outside world.
SIDE_EFFECT_FUNCTIONS = frozenset({torch._assert, print, aten._assert_async.msg, aten._assert_scalar.default,
                                   aten._assert_tensor_metadata.default})

# (op, neutral scalar, the operand positions that may be the neutral scalar): x + 0, x * 1, x - 0, x / 1
NEUTRAL_SCALARS: dict[Any, tuple[int, tuple[int, ...]]] = {
    operator.add: (0, (0, 1)), torch.add: (0, (1,)), "add": (0, (1,)), aten.add.Tensor: (0, (1,)),
    operator.sub: (0, (1,)), torch.sub: (0, (1,)), "sub": (0, (1,)), aten.sub.Tensor: (0, (1,)),
    operator.mul: (1, (0, 1)), torch.mul: (1, (1,)), "mul": (1, (1,)), aten.mul.Tensor: (1, (1,)),
    operator.truediv: (1, (1,)), torch.div: (1, (1,)), "div": (1, (1,)), aten.div.Tensor: (1, (1,)),
}

# Dispatched ops that allocate or relabel memory but compute nothing.
NOT_COMPUTE_OVERLOADS = frozenset({
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.detach.default,
    aten.lift_fresh.default, aten.alias.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default, aten.is_contiguous.default, aten._assert_tensor_metadata.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten.resize_.default,
})


# Ops (by the names of their spellings: ``reshape``, ``aten.new_zeros``) whose arguments include a shape: a literal
# batch size among them fixes the batch of a traced graph (artifact.py's hint on a failed batch change).
SHAPE_ARGUMENT_OPS = frozenset({"reshape", "view", "expand", "broadcast_to", "unflatten", "new_zeros", "new_ones",
                                "new_empty", "new_full", "zeros", "ones", "empty", "full"})

# Methods that read their second argument's shape and none of its values (``t.expand_as(other)``):
# rewrite_attention's shape-only readers of the scores (NOTE [Masks in several terms] in passes/sdpa.py).
SHAPE_OF_OTHER_METHODS = frozenset({"expand_as", "reshape_as", "view_as"})


def has_side_effect(node: fx.Node) -> bool:
    """Whether the node is a call kept even when its result is unused (asserts, print)."""
    return node.op == "call_function" and node.target in SIDE_EFFECT_FUNCTIONS


def neutral_scalar(target: Any) -> tuple[int, tuple[int, ...]] | None:
    """For add/sub/mul/div spellings, ``(neutral scalar, operand positions it may take)``; None otherwise."""
    return NEUTRAL_SCALARS.get(target)


def is_compute_overload(func: torch._ops.OpOverload) -> bool:
    """Whether a dispatched ATen op computes (not a view, an allocation, a size query or an assert)."""
    return not func.is_view and func not in NOT_COMPUTE_OVERLOADS and not func.__name__.startswith("_assert")


# ---------------------------------------------------------------------------------------------------------------
# torch.nn composites
# ---------------------------------------------------------------------------------------------------------------
# torch.nn modules are leaves for symbolic_trace, which is right for Conv2d or LayerNorm but hides whole blocks
# of ops inside these composites; fxopt traces through them (torch.export takes them when symbolic_trace cannot).
COMPOSITE_MODULES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                     nn.TransformerDecoder, nn.Transformer, nn.MultiheadAttention)
# The fused ATen ops eager runs for a composite in eval mode without grad (its "fast path"; NOTE [Fast paths] in
# capture.py), by overload packet name.
FAST_PATH_OPS = frozenset({"_transformer_encoder_layer_fwd", "_native_multi_head_attention"})


def is_composite_module(m: nn.Module) -> bool:
    """A torch.nn composite (Transformer layers, MultiheadAttention) whose ops fxopt traces through."""
    return isinstance(m, COMPOSITE_MODULES)


# ---------------------------------------------------------------------------------------------------------------
# Attention pieces (fxopt/passes/sdpa.py, attention_mask.py): batched matmuls, swaps of the last two dims, SDPA
# ---------------------------------------------------------------------------------------------------------------
# Matmuls over the last two dims with batch dims in front: ``a @ b`` (a @ b, torch.matmul, x.matmul, bmm), every
# spelling. SDPA replaces ``softmax(q @ k^T * scale) @ v`` when the operands' shapes are [..., L, E] / [..., E, S].
BATCHED_MATMUL_FUNCTIONS = frozenset({operator.matmul, torch.matmul, torch.bmm, aten.matmul.default,
                                      aten.bmm.default})
BATCHED_MATMUL_METHODS = frozenset({"matmul", "__matmul__", "bmm"})
# transpose(x, d0, d1) spellings: (input, dim0, dim1).
TRANSPOSE_FUNCTIONS = frozenset({torch.transpose, aten.transpose.int})
TRANSPOSE_METHODS = frozenset({"transpose", "swapaxes", "swapdims"})


def batched_matmul_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """``(a, b)`` when ``node`` computes ``a @ b`` in any spelling (batched or not), else None."""
    if node.kwargs:
        return None
    if (node.op == "call_function" and node.target in BATCHED_MATMUL_FUNCTIONS
            or node.op == "call_method" and node.target in BATCHED_MATMUL_METHODS) and len(node.args) == 2:
        return node.args[0], node.args[1]
    return None


def last_two_dims_swapped(node: fx.Node) -> fx.Node | None:
    """The input ``x`` when ``node`` is ``x.transpose(-2, -1)`` (any spelling of a transpose or permute that swaps
    exactly the last two dims; dims read against the recorded rank), else None."""
    x = node.args[0] if node.args else None
    tm = tensor_meta(x)
    if tm is None or len(tm.shape) < 2 or node.kwargs:
        return None
    n = len(tm.shape)
    if (node.op == "call_function" and node.target in TRANSPOSE_FUNCTIONS
            or node.op == "call_method" and node.target in TRANSPOSE_METHODS):
        dims = node.args[1:]
        if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
            return None
        return x if sorted(d % n for d in dims) == [n - 2, n - 1] else None
    if (node.op == "call_function" and node.target in (torch.permute, aten.permute.default)
            or node.op == "call_method" and node.target == "permute"):
        perm = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if len(perm) != n or not all(isinstance(d, int) for d in perm):
            return None
        return x if [d % n for d in perm] == [*range(n - 2), n - 1, n - 2] else None
    return None


# scaled_dot_product_attention's spellings (F.scaled_dot_product_attention is torch._C._nn's, the same object; the
# ATen overload comes from torch.export) and their parameters, in order: passes/attention_mask.py rewires their
# attn_mask.
SDPA_FUNCTIONS = frozenset({F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default})
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_args(node: fx.Node) -> dict[str, Any] | str | None:
    """A scaled_dot_product_attention call's arguments by parameter name, defaults filled in; None when ``node`` is
    no such call, a reason string when its arguments do not bind."""
    if node.op != "call_function" or node.target not in SDPA_FUNCTIONS:
        return None
    bound = bind_args(node, SDPA_PARAMS)
    if isinstance(bound, str):
        return bound
    if not all(p in bound for p in SDPA_PARAMS[:3]):
        return "query, key or value missing"
    return {**SDPA_DEFAULTS, **bound}


# Python operators on literals that shape checks use (``x.ndim == 4``, ``not (a < b)``): passes/cleanup.py's
# fold_shape_checks evaluates them once their operands are constants.
LITERAL_OPERATORS = frozenset({operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                               operator.not_, operator.and_, operator.or_, operator.truth})
# Methods that return a tensor's rank: a constant within one shape specialization.
RANK_METHODS = frozenset({"dim", "ndimension"})
# Integer arithmetic that shape code does on sizes (timm's Swin: ``pad_h = (ws - H % ws) % ws``): fold_shape_checks
# evaluates it once its operands are constants.
SIZE_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
                             operator.neg, operator.pow})
SIZE_METHODS = frozenset({"size"})

# Constant padding (``F.pad(x, pads)``, mode "constant"): with every amount 0 eager returns a copy of x, which
# remove_identity drops where the aliasing cannot be seen (timm's Swin pads every window partition by 0 at 224x224).
PAD_FUNCTIONS: dict[Any, tuple[str, ...]] = {
    F.pad: ("input", "pad", "mode", "value"),
    torch.constant_pad_nd: ("input", "pad", "value"),
    aten.constant_pad_nd.default: ("input", "pad", "value"),
    aten.pad.default: ("input", "pad", "mode", "value"),
}


def zero_pad_input(node: Any) -> Any:
    """The input of a constant pad by 0 on every side (``F.pad(x, (0, 0, 0, 0))``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in PAD_FUNCTIONS:
        return None
    bound = bind_args(node, PAD_FUNCTIONS[node.target])
    if isinstance(bound, str):
        return None
    pads, mode = bound.get("pad"), bound.get("mode", "constant")
    if mode not in ("constant", None) or not isinstance(pads, (list, tuple)) or not pads:
        return None
    if any(type(p) is not int or p != 0 for p in pads):
        return None
    src = bound.get("input")
    return src if isinstance(src, fx.Node) else None


# GroupNorm's spellings and their parameters (passes/group_norm.py writes it as row statistics and one elementwise
# normalize + affine step); nn.GroupNorm is the module spelling.
GROUP_NORM_FUNCTIONS: dict[Any, tuple[str, ...]] = {
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    torch.group_norm: ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
    torch.ops.aten.group_norm.default: ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
}


def is_group_norm_module(m: nn.Module) -> bool:
    return is_plain(m, nn.GroupNorm)


# The pieces of hand-written rotate_half (``cat((-x2, x1), -1)`` of the last dim's halves): passes/rotary.py matches
# them and writes the table's ``rotate_half`` (NOTE [Gathering reads] in elementwise.py). Torch-level functions and
# methods (the strings) and their ATen overloads.
CAT_SPELLINGS = frozenset({torch.cat, torch.concat, torch.concatenate, aten.cat.default})
CHUNK_SPELLINGS = frozenset({torch.chunk, aten.chunk.default, "chunk"})
SPLIT_SPELLINGS = frozenset({torch.split, aten.split.Tensor, "split"})
NARROW_SPELLINGS = frozenset({torch.narrow, aten.narrow.default, "narrow"})
UNBIND_SPELLINGS = frozenset({torch.unbind, aten.unbind.int, "unbind"})


def is_call_to(node: Any, spellings: frozenset) -> bool:
    """Whether ``node`` calls one of ``spellings`` (functions for call_function, method names for call_method)."""
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in spellings


# ``dest.index_copy_(dim, index, source)``: passes/cache_writes.py lets the kernel computing ``source`` write it into
# ``dest`` itself (a decoder's KV cache at this step's position).
INDEX_COPY_SPELLINGS = frozenset({"index_copy_", torch.Tensor.index_copy_, aten.index_copy_.default})
