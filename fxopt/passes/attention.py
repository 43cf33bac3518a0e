"""nn.TransformerEncoderLayer kept whole (its fast path, NOTE [Fast paths] in capture.py) -> the few ops it computes,
or its fused op called directly: the one place fxopt treats the layer.

In eval mode without grad, eager runs the layer as one fused ATen op, ``_transformer_encoder_layer_fwd``, which
launches about thirteen kernels, each through ATen's dispatcher. fxopt used to keep that op (tracing through the
layer gave two dozen ops and views, slower). This pass writes the layer as the ops a hand-written inference layer
would use instead, so the passes after it fuse them: the in-projection GEMM, the heads as strided views of its
output, ``F.scaled_dot_product_attention``, the out-projection GEMM, add + LayerNorm (one row kernel after
fuse_reductions), the feed-forward GEMMs with the activation in the first one's epilogue (fuse_epilogues).

Before (``self.layer`` is the TransformerEncoderLayer)::

    layer = self.layer(x)

After (batch_first, norm_first=False; LayerNorm(x + residual) later becomes one generated kernel)::

    linear = torch._C._nn.linear(x, layer_self_attn_in_proj_weight, layer_self_attn_in_proj_bias)
    unflatten = linear.unflatten(-1, (3, 4, 64));  permute = unflatten.permute(2, 0, 3, 1, 4)
    unbind = permute.unbind(0);  getitem = unbind[0];  getitem_1 = unbind[1];  getitem_2 = unbind[2]
    scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(getitem, getitem_1, getitem_2)
    ...
    layer_norm_1 = torch.nn.functional.layer_norm(add_1, (256,), layer_norm2_weight, layer_norm2_bias, 1e-05)

Off the devices where the decomposition is measured to win (the CPU), the layer becomes the one fused op its
forward would call, ``torch._transformer_encoder_layer_fwd``, with its weights as graph attributes: the Python
checks of ``forward`` are skipped (61 against 130 µs per call on the CPU here, tiny input). The checks that could
change between calls are fxopt's own rules: the graph runs without autograd (NOTE [Inference only] in grad.py),
and inputs of another type or layout take the reference path (fxopt/inputs.py).

Only where the decomposition computes what the layer's forward does in eval mode: a 3-D input, no mask (the layer
is called with its input alone), the packed in-projection with a bias, no bias_k/bias_v or zero attention,
ReLU or GELU. Every other case keeps the layer and says why in the report. Dropout is the identity in eval mode,
which ``optimize`` runs in; the verification after the pass compares against eager.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .base import note, record, tag

PASS_NAME = "decompose_encoder_layers"

# Where the decomposition is measured to win (benchmarks/NOTES.md, fifth session; zoo layer 1x32x256, interleaved):
# on the H200 without CUDA graphs 372.9 µs against 413.9 kept whole, with graphs 81.5 against 84.8; on the CPU it
# loses (435 against 409 µs: there the fused op's one dispatch saves more than fewer kernels do).
DEVICES = frozenset({"cuda"})


def decompose_encoder_layers(gm: fx.GraphModule, devices: frozenset[str] = DEVICES) -> PassResult:
    """Each nn.TransformerEncoderLayer leaf called on its input alone, on a device in ``devices``, -> its ops
    (module docstring)."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, nn.TransformerEncoderLayer):
            continue
        device = node.meta.get("device")
        device_type = getattr(device, "type", device)
        why = _unsupported(layer, node)
        fused = device_type not in devices
        if fused and why is None:
            why = _off_fast_path(layer)
        if why is not None:
            note(f"{node.target}: kept whole ({why})")
            continue
        if fused:
            note(f"{node.target}: eager's fused op called directly on {device_type} (measured faster there than "
                 "the decomposition)")
        with gm.graph.inserting_before(node):
            emit = _emit_fused if fused else _emit
            out = emit(gm.graph, node.target, layer, node.args[0])
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.recompile()
        record(encoder_layers_decomposed=done)
    return PassResult(gm, done > 0)


def _activation(layer: nn.TransformerEncoderLayer):
    """(function, kwargs) for the layer's activation, or None when it is neither ReLU nor GELU."""
    act = layer.activation
    if act is F.relu or type(act) is nn.ReLU:
        return F.relu, {}
    # Not nn.GELU(approximate="tanh"): eager's fast path computes the exact GELU for it, its slow path the tanh one.
    if act is F.gelu or (type(act) is nn.GELU and act.approximate == "none"):
        return F.gelu, {}
    return None


def _unsupported(layer: nn.TransformerEncoderLayer, node: fx.Node) -> str | None:
    attn = layer.self_attn
    meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
    if len(node.args) != 1 or node.kwargs:
        return "called with a mask or other arguments"
    if layer.training:
        return "training mode"
    if meta is None or len(meta.shape) != 3:
        return "the input is not 3-D (batch, sequence, features)"
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        return "separate q/k/v projection weights"
    if attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    if _activation(layer) is None:
        return (f"activation {layer.activation!r} is neither ReLU nor exact GELU (for nn.GELU(approximate='tanh'), "
                "eager's fast path and its slow path compute different GELUs)")
    if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
        return "hooks on the layer or its submodules"
    return None


def _off_fast_path(layer: nn.TransformerEncoderLayer) -> str | None:
    """Why ``forward`` would not call the fused op, for the conditions that cannot change between calls (torch's
    ``TransformerEncoderLayer.forward``), else None."""
    attn = layer.self_attn
    if not attn.batch_first:
        return "batch_first=False: eager's forward does not take its fused op"
    if attn.in_proj_bias is None:
        return "no in-projection bias: eager's forward does not take its fused op"
    if layer.norm1.eps != layer.norm2.eps:
        return "the two LayerNorms differ in eps: eager's forward does not take its fused op"
    if attn.num_heads % 2:
        return "an odd number of heads: eager's forward does not take its fused op"
    if not layer.activation_relu_or_gelu:
        return "the activation is not ReLU or GELU: eager's forward does not take its fused op"
    return None


def _emit_fused(graph: fx.Graph, target: str, layer: nn.TransformerEncoderLayer, x: fx.Node) -> fx.Node:
    """``torch._transformer_encoder_layer_fwd`` on input ``x``, as the layer's eval-mode forward calls it."""
    attn = layer.self_attn
    weights = [tag(graph.get_attr(f"{target}.{path}"), PASS_NAME) for path in (
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "linear1.weight", "linear1.bias",
        "linear2.weight", "linear2.bias")]
    in_w, in_b, out_w, out_b, *rest = weights
    return tag(graph.call_function(torch._transformer_encoder_layer_fwd, (
        x, attn.embed_dim, attn.num_heads, in_w, in_b, out_w, out_b, layer.activation_relu_or_gelu == 2,
        layer.norm_first, layer.norm1.eps, *rest, None, None)), PASS_NAME)


def _emit(graph: fx.Graph, target: str, layer: nn.TransformerEncoderLayer, x: fx.Node) -> fx.Node:
    """The layer's eval-mode forward as graph nodes on input ``x``; returns the output node."""
    attn = layer.self_attn
    heads, embed = attn.num_heads, attn.embed_dim

    def attr(path: str, value) -> fx.Node | None:
        return None if value is None else tag(graph.get_attr(f"{target}.{path}"), PASS_NAME)

    def fn(f, *args, **kwargs) -> fx.Node:
        return tag(graph.call_function(f, args, kwargs), PASS_NAME)

    def method(name, *args) -> fx.Node:
        return tag(graph.call_method(name, args), PASS_NAME)

    def linear(v: fx.Node, path: str, module: nn.Linear) -> fx.Node:
        return fn(F.linear, v, attr(f"{path}.weight", module.weight), attr(f"{path}.bias", module.bias))

    def norm(v: fx.Node, path: str, module: nn.LayerNorm) -> fx.Node:
        return fn(F.layer_norm, v, tuple(module.normalized_shape), attr(f"{path}.weight", module.weight),
                  attr(f"{path}.bias", module.bias), module.eps)

    def self_attention(v: fx.Node) -> fx.Node:
        qkv = fn(F.linear, v, attr("self_attn.in_proj_weight", attn.in_proj_weight),
                 attr("self_attn.in_proj_bias", attn.in_proj_bias))
        qkv = method("unflatten", qkv, -1, (3, heads, embed // heads))
        # (batch, seq, 3, heads, dim) or (seq, batch, ...) -> (3, batch, heads, seq, dim): SDPA's layout, as views
        qkv = method("permute", qkv, *((2, 0, 3, 1, 4) if layer.self_attn.batch_first else (2, 1, 3, 0, 4)))
        heads_qkv = method("unbind", qkv, 0)  # one view op for the three (tuple indexing costs no dispatch)
        q, k, v = (fn(operator.getitem, heads_qkv, i) for i in range(3))
        a = fn(F.scaled_dot_product_attention, q, k, v)
        # (batch, heads, seq, dim) -> (batch, seq, heads * dim), or (seq, batch, ...)
        a = method("permute", a, *((0, 2, 1, 3) if layer.self_attn.batch_first else (2, 0, 1, 3)))
        return fn(F.linear, method("flatten", a, -2), attr("self_attn.out_proj.weight", attn.out_proj.weight),
                  attr("self_attn.out_proj.bias", attn.out_proj.bias))

    act, act_kwargs = _activation(layer)

    def feed_forward(v: fx.Node) -> fx.Node:
        return linear(fn(act, linear(v, "linear1", layer.linear1), **act_kwargs), "linear2", layer.linear2)

    if layer.norm_first:
        x = fn(operator.add, x, self_attention(norm(x, "norm1", layer.norm1)))
        return fn(operator.add, x, feed_forward(norm(x, "norm2", layer.norm2)))
    x = norm(fn(operator.add, x, self_attention(x)), "norm1", layer.norm1)
    return norm(fn(operator.add, x, feed_forward(x)), "norm2", layer.norm2)
