"""Folding passes: BatchNorm into the preceding Conv/Linear, and constant subgraphs evaluated once.

fold_batchnorm, before::

    conv = self.conv(x);  bn = self.bn(conv)              # two kernels (three with the conv's bias add)

after::

    conv = self.conv_bn_folded(x)                         # one conv with w' = w * g / sqrt(v + eps), b' = ...

Both module spellings (symbolic_trace graphs) and functional/ATen spellings (torch.export graphs, whose weights are
``get_attr`` nodes) are handled. New weights are new tensors registered on the GraphModule; the original modules
and parameters, which the reference model shares, are never changed.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from .. import ops
from ..runtime.strides import copy_strides, iterator_strides
from .base import new_attr, note, record, tag
from .fuse_elementwise import mutated_values

aten = torch.ops.aten
PASS_NAME_AFFINE = "batchnorm_as_affine"


def get_attr(gm: fx.GraphModule, target: str) -> Any:
    """What a ``get_attr`` node with this dotted ``target`` reads from ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def constant_tensor(gm: fx.GraphModule, v: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node (or a dotted attribute path) reads from ``gm``; None for anything else."""
    if isinstance(v, fx.Node) and v.op == "get_attr":
        v = v.target
    if not isinstance(v, str):
        return None
    value = get_attr(gm, v)
    return value if isinstance(value, torch.Tensor) else None


def _const(gm: fx.GraphModule, a: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node (a parameter, buffer or constant), None for None, else raises."""
    if a is None:
        return None
    if isinstance(a, fx.Node) and a.op == "get_attr":
        return get_attr(gm, a.target)
    raise _NotConstant


class _NotConstant(Exception):
    pass


# -- what a producer (conv or linear) looks like, in any spelling ---------------------------------------------------
@dataclass
class _Producer:
    kind: str  # "conv" | "conv_transpose" | "linear"
    weight: torch.Tensor
    bias: torch.Tensor | None
    replace: Callable[[fx.GraphModule, torch.Tensor, torch.Tensor], None]  # installs the folded weight and bias


def _module_producer(gm: fx.GraphModule, node: fx.Node) -> _Producer | None:
    m = gm.get_submodule(node.target)
    if ops.is_conv_module(m):
        kind = "conv"
    elif ops.is_conv_transpose_module(m):
        kind = "conv_transpose"
    elif ops.is_linear_module(m):
        kind = "linear"
    else:
        return None

    def replace(gm: fx.GraphModule, w: torch.Tensor, b: torch.Tensor) -> None:
        folded = copy.copy(m)  # shallow: new parameter dict below, the shared module is untouched
        folded._parameters = dict(m._parameters)
        folded.weight = nn.Parameter(w, requires_grad=False)
        folded.bias = nn.Parameter(b, requires_grad=False)
        node.target = new_attr(gm, f"{node.target}_bn_folded", folded)

    return _Producer(kind, m.weight, m.bias, replace)


def _function_producer(gm: fx.GraphModule, node: fx.Node) -> _Producer | None:
    spec = ops.weight_bias_args(node.target)  # functional / ATen: (weight index, bias index, kind)
    if node.target is aten.convolution.default and len(node.args) > 6 and node.args[6] is False:
        spec = (1, 2, "conv")
    if spec is None:
        return None
    wi, bi, kind = spec
    args = list(node.args) + [None] * (bi + 1 - len(node.args))
    if "bias" in node.kwargs:
        args[bi] = node.kwargs["bias"]
    try:
        w, b = _const(gm, args[wi]), _const(gm, args[bi])
    except _NotConstant:
        return None

    def replace(gm: fx.GraphModule, w: torch.Tensor, b: torch.Tensor) -> None:
        graph = gm.graph
        with graph.inserting_before(node):
            w_node = tag(graph.get_attr(new_attr(gm, f"{node.name}_weight_bn_folded", w)), "fold_batchnorm")
            b_node = tag(graph.get_attr(new_attr(gm, f"{node.name}_bias_bn_folded", b)), "fold_batchnorm")
        new_args = list(node.args) + [None] * (bi + 1 - len(node.args))
        new_args[wi], new_args[bi] = w_node, b_node
        node.args = tuple(new_args)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}

    return _Producer(kind, w, b, replace)


# -- what a BatchNorm looks like, in any spelling -------------------------------------------------------------------
@dataclass
class _BatchNorm:
    input: fx.Node
    result: fx.Node  # the node whose uses become the producer's (the getitem for tuple-returning ATen forms)
    nodes: list[fx.Node]  # everything to erase
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _batchnorm(gm: fx.GraphModule, node: fx.Node) -> _BatchNorm | str | None:
    """The node as an eval-mode BatchNorm, a reason it cannot fold, or None if it is no BatchNorm at all."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if not ops.is_batchnorm_module(m):
            return None
        if m.training or m.running_mean is None:
            return "BatchNorm in training mode or without running statistics"
        return _BatchNorm(node.args[0], node, [node], m.running_mean, m.running_var, m.weight, m.bias, m.eps)
    if node.op != "call_function":
        return None
    try:
        if node.target is F.batch_norm:
            a = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                         node.args))
            a.update(node.kwargs)
            if a.get("training", False):
                return "F.batch_norm(training=True)"
            return _BatchNorm(a["input"], node, [node], _const(gm, a["running_mean"]), _const(gm, a["running_var"]),
                              _const(gm, a.get("weight")), _const(gm, a.get("bias")), a.get("eps", 1e-5))
        if node.target is aten.batch_norm.default:
            x, w, b, mean, var, training, _, eps = node.args[:8]
            if training:
                return "batch_norm(training=True)"
            return _BatchNorm(x, node, [node], _const(gm, mean), _const(gm, var), _const(gm, w), _const(gm, b), eps)
        if node.target is aten._native_batch_norm_legit_no_training.default:
            x, w, b, mean, var, _, eps = node.args[:7]
            users = list(node.users)
            if not all(u.target is operator.getitem for u in users) or any(u.args[1] != 0 for u in users):
                return "BatchNorm statistics outputs are used"
            if len(users) != 1:
                return None
            return _BatchNorm(x, users[0], [users[0], node], _const(gm, mean), _const(gm, var), _const(gm, w),
                              _const(gm, b), eps)
    except _NotConstant:
        return "BatchNorm parameters are not constants of the model"
    return None


def fold_batchnorm(gm: fx.GraphModule) -> PassResult:
    """Fold every eval-mode BatchNorm into the Conv/Linear that feeds it (when that conv has no other user)."""
    folded = 0
    for node in list(gm.graph.nodes):
        bn = _batchnorm(gm, node)
        if bn is None:
            continue
        if isinstance(bn, str):
            note(f"fold_batchnorm: {node.name} kept: {bn}")
            continue
        src = bn.input
        producer = None
        if isinstance(src, fx.Node):
            if src.op == "call_module":
                producer = _module_producer(gm, src)
            elif src.op == "call_function":
                producer = _function_producer(gm, src)
        if producer is None:
            continue  # BatchNorm after something else (a pooling, an add): nothing to fold into
        if len(src.users) != 1:
            note(f"fold_batchnorm: {node.name} kept: its input {src.name} has other users, which need the "
                 f"unnormalized value")
            continue
        if producer.kind == "linear" and len(ops.tensor_meta(src).shape) != 2:
            note(f"fold_batchnorm: {node.name} kept: BatchNorm1d over a 3-D Linear output normalizes dim 1, not "
                 f"the features")
            continue
        if producer.weight.dtype in (torch.float16, torch.bfloat16) \
                and not _fold_saves_a_launch(gm, bn.result, _relu_fuses(producer, src), producer.kind == "conv"):
            note(f"fold_batchnorm: {node.name} kept: folded into {producer.weight.dtype} weights, w * scale would be "
                 f"rounded again for no launch saved (its readers are elementwise; NOTE [16-bit folds]); it runs as "
                 f"a float32 affine in their kernel")
            continue
        w, b = _fold_weights(producer, bn)
        producer.replace(gm, w, b)
        bn.result.replace_all_uses_with(src)
        for n in bn.nodes:
            gm.graph.erase_node(n)
        folded += 1
    if folded:
        gm.delete_all_unused_submodules()
        gm.recompile()
        record(batchnorms_folded=folded)
    return PassResult(gm, folded > 0)


# NOTE [16-bit folds]: folding a BatchNorm into float16 or bfloat16 weights rounds ``w * scale`` once more, an error
# eager's float16 run does not have (it rounds the convolution's output, then the BatchNorm's, which computes in
# float32). On random-weight timm MobileNetV3-L in float16 (CPU, four inputs) the logits' error against float32 was
# 1.03-1.63 times eager's own with every BatchNorm folded, 0.75-1.34 times with none; over 8 inputs on an H100, the
# largest error 1.19 times eager's largest on torchvision MobileNetV3-L and 1.13 on timm EfficientNet-B0 with every
# BatchNorm folded, 1.01 and 1.05 with the rule below (reports/2026-12-07-h100-s15-4587b1d/call0/fp16_err.txt). The fold
# buys a launch only where cuDNN then fuses the convolution's epilogue (a ReLU, or a residual add and a ReLU:
# fuse_epilogues) or where a reader is not elementwise (the affine would be a kernel of its own). Where every reader is
# another elementwise op (SiLU, hardswish, GELU, an add without a ReLU after it; a ReLU too where fuse_epilogues keeps
# it apart: a convolution off CUDA, in bfloat16, or grouped in float16), the BatchNorm stays: batchnorm_as_affine makes
# it a float32 ``x * scale + shift`` that the elementwise fusion puts in those readers' kernel, as many launches as the
# fold and eager's rounding. Float32 and float64 weights always fold (the rounding is far below their tolerance).
def _relu_fuses(producer: _Producer, node: fx.Node) -> bool:
    """Whether fuse_epilogues would take a ReLU after the folded ``producer`` (its output ``node``) into it: a Linear
    (``_addmm_activation``), or a convolution cuDNN fuses with its ReLU."""
    if producer.kind == "linear":
        return True
    if producer.kind != "conv" or producer.weight.dim() != 4:
        return False
    from .epilogue import cudnn_fuses_conv_relu  # here: epilogue.py imports this module

    x = ops.tensor_meta(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    grouped = x is None or len(x.shape) != 4 or x.shape[1] != producer.weight.shape[1]
    return cudnn_fuses_conv_relu(node.meta.get("device"), producer.weight.dtype, grouped)


def _fold_saves_a_launch(gm: fx.GraphModule, result: fx.Node, relu_fuses: bool, conv: bool) -> bool:
    """NOTE [16-bit folds]: whether folding the BatchNorm whose output is ``result`` saves a kernel launch
    (``relu_fuses``: whether the producer takes a ReLU after it into one call; ``conv``: it is a convolution, which
    takes a residual add and a ReLU too)."""
    for reader in result.users:
        call = ops.match_elementwise(reader, gm)
        if isinstance(call, str):
            return True  # not elementwise: the affine would run alone
        if not relu_fuses:
            continue
        if call.op.name == "relu":
            return True  # cuDNN's convolution + bias + ReLU
        if conv and call.op.name == "add" and len(reader.users) == 1:
            after = ops.match_elementwise(next(iter(reader.users)), gm)
            if not isinstance(after, str) and after.op.name == "relu":
                return True  # cuDNN's convolution + bias + residual add + ReLU
    return False


# NOTE [BatchNorm as an affine]: a BatchNorm that does not fold (its input is a concatenation or a sum, as in
# DenseNet's pre-activation blocks; a convolution read elsewhere too; or fold_batchnorm rolled back) runs in eval
# mode as ATen's kernel, and the activation after it as another. In eval mode it is a per-channel affine,
# ``x * scale + shift`` with ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale`` computed once,
# which the elementwise fusion joins to its neighbours (the ReLU after it: one kernel for two). For 16-bit inputs
# the affine runs in float32 and rounds once, as ATen's BatchNorm does (``x.float() * scale + shift``, then back to
# the input's dtype). That is also why a rolled-back fold can still lose its kernels: folded into 16-bit weights,
# ``w * scale`` is rounded again, and on random-weight MobileNetV3-L in float16 the logits' error against float32
# doubled (0.0174 against eager's 0.0076, H100; 0.0066 against 0.0027 on the CPU), past the 16-bit check's factor 2
# (NOTE [16-bit reference]).
def batchnorm_as_affine(gm: fx.GraphModule) -> PassResult:
    """NOTE [BatchNorm as an affine]: every eval-mode BatchNorm left in the graph -> ``x * scale + shift``."""
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        bn = _batchnorm(gm, node)
        if not isinstance(bn, _BatchNorm) or not isinstance(bn.input, fx.Node):
            continue
        x = ops.meta_tensor(bn.input)
        if x is None or not x.is_floating_point() or x.dim() < 2 or x.shape[1] != bn.mean.shape[0]:
            continue
        hi = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean, var = bn.mean.detach().to(hi), bn.var.detach().to(hi)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(hi)
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().to(hi)
        per_channel = (x.shape[1],) + (1,) * (x.dim() - 2)
        scale, shift = scale.reshape(per_channel), shift.reshape(per_channel)
        # the strides each new node gets, as eager computes them for these ops (runtime/strides.py)
        cast = x.dtype != hi
        in_stride = copy_strides(tuple(x.shape), x.stride()) if cast else x.stride()
        out_stride = iterator_strides([(tuple(x.shape), in_stride), (per_channel, scale.stride())], tuple(x.shape))
        with graph.inserting_before(bn.result):
            value = bn.input
            if cast:
                value = tag(graph.call_method("to", (value, hi)), PASS_NAME_AFFINE)
                ops.set_strided_meta(value, bn.input, in_stride, hi)
            s = tag(graph.get_attr(new_attr(gm, f"{node.name}_scale", scale)), PASS_NAME_AFFINE)
            t = tag(graph.get_attr(new_attr(gm, f"{node.name}_shift", shift)), PASS_NAME_AFFINE)
            for a, v in ((s, scale), (t, shift)):
                ops.set_tensor_meta(a, v, v.device)
            value = tag(graph.call_function(operator.mul, (value, s)), PASS_NAME_AFFINE)
            ops.set_strided_meta(value, bn.input, out_stride, hi)
            value = tag(graph.call_function(operator.add, (value, t)), PASS_NAME_AFFINE)
            ops.set_strided_meta(value, bn.input, out_stride, hi)
            if cast:
                value = tag(graph.call_method("to", (value, x.dtype)), PASS_NAME_AFFINE)
                ops.set_strided_meta(value, bn.input, copy_strides(tuple(x.shape), out_stride), x.dtype)
        bn.result.replace_all_uses_with(value)
        for n in bn.nodes:
            graph.erase_node(n)
        done += 1
    if done:
        gm.delete_all_unused_submodules()
        graph.lint()
        gm.recompile()
        record(batchnorms_as_affine=done)
    return PassResult(gm, done > 0)


def _fold_weights(producer: _Producer, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's own folding formulas, computed in float32 (or float64) and cast back to the weight's dtype."""
    dtype = producer.weight.dtype
    hi = torch.float64 if dtype == torch.float64 else torch.float32

    def up(t):
        return None if t is None else t.detach().to(hi)

    channels = bn.mean.shape[0]
    weight = up(bn.weight) if bn.weight is not None else torch.ones(channels, dtype=hi, device=bn.mean.device)
    bias = up(bn.bias) if bn.bias is not None else torch.zeros(channels, dtype=hi, device=bn.mean.device)
    if producer.kind == "linear":
        w, b = fuse_linear_bn_weights(up(producer.weight), up(producer.bias), up(bn.mean), up(bn.var), bn.eps,
                                      weight, bias)
    else:
        w, b = fuse_conv_bn_weights(up(producer.weight), up(producer.bias), up(bn.mean), up(bn.var), bn.eps,
                                    weight, bias, transpose=producer.kind == "conv_transpose")
    return w.detach().to(dtype), b.detach().to(dtype)


# -- constant folding -------------------------------------------------------------------------------------------
_NONDETERMINISTIC = ("rand", "normal", "bernoulli", "multinomial", "dropout", "empty", "poisson", "exponential")


def _foldable(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if ops.is_inplace(node, gm):
        return False
    name = ops.describe(node).lower()
    if any(word in name for word in _NONDETERMINISTIC):
        return False
    if node.op == "call_module" and not isinstance(gm.get_submodule(node.target), nn.Module):
        return False
    return node.meta.get("has_tensor", True) is not False


def _written_storages(gm: fx.GraphModule) -> set[int]:
    """Storages of the graph's tensors that an in-place op of the graph writes (through views): state such as a
    step counter or a KV cache, which changes from call to call."""
    written: set[int] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" or not ops.is_inplace(node, gm) or not node.args:
            continue
        target = node.kwargs.get("out", node.args[0])
        while isinstance(target, fx.Node) and target.op != "get_attr" and ops.may_alias_input(target, gm):
            target = target.args[0] if target.args else None
        if isinstance(target, fx.Node) and target.op == "get_attr":
            value = get_attr(gm, target.target)
            if isinstance(value, torch.Tensor):
                written.add(value.untyped_storage().data_ptr())
    return written


def fold_flag_inputs(gm: fx.GraphModule) -> PassResult:
    """NOTE [Flag inputs]: an input that is None or a bool in the example (an optional ``attn_mask=None`` or
    ``is_causal=False`` of timm's forward, traced as a placeholder with its default) is that value in every call this
    graph serves: a specialization is keyed by the value of each non-tensor argument (``inputs.input_signature``), and
    a trailing default the call leaves out is the default. Its readers get the value itself, so passes see
    ``attn_mask=None`` rather than a graph input they cannot inspect. The placeholder stays (the call's arity)."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or "input_value" not in node.meta or not node.users:
            continue
        value = node.meta["input_value"]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
        done += 1
        record(inputs=1)
    if done:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, done > 0)


# NOTE [Tensors from literals]: a tensor made from literals alone (``torch.arange(seq_len)`` once the sizes are
# folded, NOTE [Folded sizes]; ``torch.ones(4)``; ``torch.tensor([...])``) is a constant like a weight, and so is
# everything computed from it and the weights: transformers' GPT-2 builds its position ids, their embedding and its
# causal mask's padding checks that way on every call (about ten small kernels of its 141). Random and
# uninitialized tensors are not constants (_NONDETERMINISTIC), and neither is what the example run did not record
# as a tensor.
def fold_constants(gm: fx.GraphModule) -> PassResult:
    """Evaluate, once, every subgraph computed only from parameters, buffers and literals; its users read the
    result as a buffer. Only subgraphs that launch a kernel are folded (a bare view of a weight stays). A tensor
    the graph writes in place is not a constant: folding ``n * 2`` of a step counter ``n.add_(1)`` gave every later
    call the first call's value, and the check against eager (one run) cannot see it."""
    written = _written_storages(gm)
    mutated = mutated_values(gm)  # a tensor made here and then written in place is no constant either
    constant: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_attr(gm, node.target)
            constant[node] = not (isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in written)
        elif _foldable(node, gm) and node not in mutated:
            inputs = node.all_input_nodes
            if inputs:
                constant[node] = all(constant.get(a, False) for a in inputs)
            else:  # NOTE [Tensors from literals]
                constant[node] = ops.tensor_meta(node) is not None
        else:
            constant[node] = False
    # the frontier: constant nodes with a non-constant user, whose cone computes something
    frontier = [n for n in gm.graph.nodes if constant[n] and n.op != "get_attr"
                and any(not constant.get(u, False) for u in n.users) and _cone_launches(n, gm)]
    if not frontier:
        return PassResult(gm, False)
    values = _evaluate_constants(gm, constant)
    for node in frontier:
        value = values[node]
        if not isinstance(value, torch.Tensor):
            continue
        with gm.graph.inserting_before(node):
            attr = tag(gm.graph.get_attr(new_attr(gm, f"{node.name}_folded", value.detach().clone())),
                       "fold_constants")
        attr.meta.update({k: node.meta[k] for k in ("tensor_meta", "device", "has_tensor") if k in node.meta})
        node.replace_all_uses_with(attr)
    folded = 0
    for node in reversed(list(gm.graph.nodes)):  # the constant subgraphs are now unused
        if constant.get(node) and node.op != "get_attr" and not node.users:
            gm.graph.erase_node(node)
            folded += 1
    gm.delete_all_unused_submodules()
    gm.recompile()
    record(constant_nodes_folded=folded, constants_created=len(frontier))
    return PassResult(gm, True)


def _cone_launches(node: fx.Node, gm: fx.GraphModule) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n.op == "get_attr":
            continue
        seen.add(n)
        if ops.launches_kernel(n, gm):
            return True
        stack.extend(n.all_input_nodes)
    return False


def _evaluate_constants(gm: fx.GraphModule, constant: dict[fx.Node, bool]) -> dict[fx.Node, Any]:
    """Run the constant nodes (in graph order) with torch.fx's Interpreter machinery."""
    interp = fx.Interpreter(gm)
    values: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if not constant.get(node):
                continue
            interp.env = values
            values[node] = interp.run_node(node)
    return values
