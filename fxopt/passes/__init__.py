"""The pass pipeline: one ordered list, each step commented. See README.md beside this file for the invariants."""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch.fx as fx

from .attention import decompose_encoder_layers
from .attention_mask import hoist_attention_masks
from .base import Pass, PassLog, PassRecord, PassResult, note, record, run_passes, snapshot, stats, tag
from .cache_writes import write_into_caches
from .cleanup import (collapse_views, fold_shape_checks, functionalize_inplace, remove_dead_code, remove_dropout,
                      remove_identity)
from .depthwise import depthwise_convolutions
from .epilogue import fuse_epilogues
from .fold import batchnorm_as_affine, fold_batchnorm, fold_constants, fold_flag_inputs
from .fuse_elementwise import fuse_elementwise
from .fuse_reductions import fuse_reductions
from .gemm_layout import gemm_weight_layouts
from .gemv import few_row_linears
from .group_norm import decompose_group_norm
from .horizontal import merge_sibling_linears
from .keep_faster import keep_faster_regions
from .layout import convs_in_nchw, to_channels_last
from .matmul_scales import move_scales_past_matmuls
from .movement import fold_movements
from .operand_copies import merge_operand_copies
from .sdpa import rewrite_attention
from .short_attention import short_query_attention
from .split_k import split_k_linears
from .tf32x3 import tf32x3_convolutions, tf32x3_linears
from .streams import parallel_branches
from .user_kernels import apply_user_kernels

# What optimize(passes=...) takes: a pass name, a Pass, or a callable (GraphModule) -> PassResult.
PassSpec = Union[str, Pass, Callable[[fx.GraphModule], Any]]


def default_pipeline(backend: str = "auto") -> list[Pass]:
    """The passes :func:`fxopt.optimize` runs, in order. ``backend`` picks the fused-kernel code generator."""
    return [
        # nn.TransformerEncoderLayer kept whole for its fused op -> GEMMs, SDPA, add + LayerNorm (CUDA: measured).
        Pass("decompose_encoder_layers", decompose_encoder_layers,
             "TransformerEncoderLayer fast path -> GEMMs, SDPA, add + LayerNorm"),
        # Dropout in eval mode is the identity; removing it first lets later passes see conv -> bn -> relu chains.
        Pass("remove_dropout", remove_dropout, "Dropout in eval mode, nn.Identity -> its input"),
        # an input that is None or a bool (attn_mask=None, is_causal=False: timm's defaults) -> the value, which is
        # fixed for the specialization (NOTE [Flag inputs])
        Pass("fold_flag_inputs", fold_flag_inputs, "None and bool inputs -> their values"),
        # x.ndim == 4 -> True, torch._assert(True) -> gone: a shape check must not keep a BatchNorm from folding;
        # sizes of dims other than 0 and arithmetic on them -> numbers (a Swin block's window padding -> 0).
        Pass("fold_shape_checks", fold_shape_checks, "rank queries, non-batch sizes, asserts on them -> constants"),
        # relu_(x), ReLU(inplace=True) on private intermediates -> out-of-place: in-place ops block fusion.
        Pass("functionalize_inplace", functionalize_inplace, "unobservable in-place ops -> out-of-place"),
        # nn.Identity, .contiguous() on contiguous tensors, .to() to the same dtype, x * 1, x + 0, a pad by 0 ...
        Pass("remove_identity", remove_identity, "no-op nodes -> their input"),
        # view -> reshape -> flatten chains -> one reshape (views cost host time at batch 1); an elementwise op
        # between a reshape and its inverse -> the op on the original shape (NOTE [Reshape sandwiches]).
        Pass("collapse_views", collapse_views, "chains of reshape-like views -> one reshape"),
        # Conv/Linear -> BatchNorm in eval mode: one conv with folded weights (module, functional and ATen forms).
        Pass("fold_batchnorm", fold_batchnorm, "BatchNorm -> the preceding Conv/Linear's weights"),
        # BatchNorms left (after a concatenation or a sum, or all of them where the fold was rolled back) -> a
        # per-channel x * scale + shift that fusion joins to its neighbours (NOTE [BatchNorm as an affine]).
        Pass("batchnorm_as_affine", batchnorm_as_affine, "BatchNorms that did not fold -> per-channel affine"),
        # Subgraphs computed only from weights and literals: evaluated once, read as buffers.
        Pass("fold_constants", fold_constants, "constant subgraphs -> buffers"),
        # hand-written attention, softmax(q @ k^T * scale + mask) @ v -> one SDPA call: after folding (constant
        # scales), before fusion claims the softmax
        attention_pass(),
        # a bool attn_mask, converted to an additive float mask inside every SDPA call (three small kernels each),
        # -> converted once per (mask, query dtype) and shared: after rewrite_attention (which writes SDPA calls),
        # before fusion (which joins the conversion with the mask's producer). A constant float mask is stored
        # aligned, so SDPA does not pad it on every call (NOTE [Aligned attention masks]).
        Pass("hoist_attention_masks", hoist_attention_masks, "bool SDPA masks -> one shared float mask each"),
        # SDPA with a few query rows per head against a long key range (a decode step) -> fxopt's short-query
        # attention kernel (CUDA; NOTE [Short-query attention]): after the masks are converted, whose float mask it
        # reads.
        Pass("short_query_attention", short_query_attention(backend, tensor_cores=False),
             "SDPA -> a generated kernel where it measures faster (CUDA)"),
        # slices of one permuted tensor that batched matmuls would each copy (q, k, v of SDPA's math path or of
        # attention as written, batch > 1) -> one copy, sliced as views after (NOTE [One copy for matmul operands]):
        # after short_query_attention, which writes the math path's matmuls.
        Pass("merge_operand_copies", merge_operand_copies, "slices that matmuls would each copy -> one copy"),
        # (x * s) @ y -> (x @ y) * s where the product's readers are fused: the scale joins their kernel instead of
        # running alone (attention kept as written, Swin's shifted windows: NOTE [Scales after matmuls]).
        Pass("move_scales_past_matmuls", move_scales_past_matmuls, "a scaled matmul operand -> the product scaled"),
        # q/k/v (or gate/up) projections of one input -> one GEMM on concatenated weights, a view per output.
        Pass("merge_sibling_linears", merge_sibling_linears, "Linears (convolutions) reading one input -> one GEMM (convolution)"),
        # Linears on a few rows (a decode step's projections) -> fxopt's GEMV kernel where it measures faster than
        # cuBLAS on the device (CUDA; NOTE [Few-row linears]): after the merge, before fuse_epilogues (the GEMV adds
        # its bias itself).
        Pass("few_row_linears", few_row_linears(backend), "few-row Linears -> a generated GEMV where faster (CUDA)"),
        # GroupNorm -> per-group statistics (a row reduction) and an elementwise normalize + affine that the
        # activation after it joins (CUDA: eager runs it as several kernels).
        Pass("decompose_group_norm", decompose_group_norm, "GroupNorm -> statistics + elementwise normalize (CUDA)"),
        # Linear+bias+ReLU/GELU(tanh) -> cuBLASLt epilogue; Conv+bias(+residual)+ReLU -> cuDNN fused conv (CUDA);
        # on CUDA, a Linear's bias before another elementwise tail -> that tail (mm without bias, one kernel less).
        Pass("fuse_epilogues", fuse_epilogues, "activation/residual after GEMM or conv -> part of it"),
        # Convolution-heavy CUDA graphs in channels_last: cuDNN then skips its NCHW<->NHWC transposes.
        Pass("to_channels_last", to_channels_last, "4-D inputs and conv weights -> channels_last (CUDA)"),
        # Float32 convolutions without TF32 (no NHWC kernel in cuDNN) handed a channels-last input or weight -> both
        # in NCHW, the output back in eager's layout (NOTE [Float32 convolutions in NCHW]): after to_channels_last,
        # which leaves such graphs alone; before fusion, whose row kernels can store the NCHW copy directly.
        Pass("convs_in_nchw", convs_in_nchw, "fp32 convs (no TF32) on channels-last values -> NCHW (CUDA)"),
        # What the passes above left unused.
        Pass("remove_dead_code", remove_dead_code, "unused nodes and submodules"),
        # Subgraphs matching a pattern registered with fxopt.register_kernel -> the user's kernel (before fusion,
        # so a user's kernel wins over a generated one).
        Pass("apply_user_kernels", apply_user_kernels, "registered patterns -> the user's kernels"),
        # softmax, log_softmax, LayerNorm, RMSNorm, sum/mean/amax over the last dim, with their elementwise prologue and
        # epilogue (LayerNorm(x + residual)), -> one row-wise generated kernel each. Before elementwise fusion, so
        # the elementwise ops next to a reduction join its kernel.
        Pass("fuse_reductions", fuse_reductions(backend), "last-dim reductions + elementwise neighbours -> one kernel"),
        # A chain of data movement (roll, view, permute, contiguous: Swin's window partition and reverse) between a
        # row kernel and its neighbour -> an index map the row kernel stores or reads through (NOTE [Movement maps]):
        # after fuse_reductions, whose kernels it extends.
        Pass("fold_movements", fold_movements, "copies next to a row kernel -> its index map"),
        # Every maximal chain/DAG of elementwise ops -> one generated kernel (CUDA C++ via NVRTC, or C++).
        Pass("fuse_elementwise", fuse_elementwise(backend), "elementwise groups -> one generated kernel each"),
        # A generated kernel whose one output only feeds dest.index_copy_(dim, index, it) (a decoder's KV cache
        # write) writes into dest itself (NOTE [Writes into a cache]): after the fusions, whose kernels it extends.
        Pass("write_into_caches", write_into_caches, "index_copy_ of a kernel's output -> the kernel writes it"),
    ]


def attention_pass() -> Pass:
    """rewrite_attention as a Pass (default_pipeline runs it after fold_constants)."""
    return Pass("rewrite_attention", rewrite_attention, "hand-written attention -> scaled_dot_product_attention")


def optional_passes(backend: str = "auto") -> list[Pass]:
    """Passes that run only when asked for: ``optimize(..., enable=[name])`` puts them after the pass their ``after``
    names, or else appends them after the pipeline, in this order (or name them in ``passes=``). A pass joins the
    default pipeline when a measurement shows it wins."""
    return [
        # Each fused region timed against the eager ops it replaced (random inputs of its shapes, on its device), and
        # eager's ops put back where they are faster: after the fusions, whose regions it reads (a region that
        # writes into a cache is not timed).
        Pass("keep_faster_regions", keep_faster_regions, "fused regions slower than eager's ops -> eager's ops"),
        # Independent branches (inception blocks, parallel heads) on side CUDA streams, joined with events; also
        # inside CUDA-graph capture. Last: a pass after it could move nodes across its stream switches. Opt-in until
        # the GPU measurement (benchmarks/bench_streams.py, benchmarks/NOTES.md) shows where it wins.
        Pass("parallel_branches", parallel_branches, "independent branches -> side CUDA streams (opt-in)"),
        # A bias-free Linear on a few hundred rows whose output only elementwise ops read -> a batched GEMM over
        # slices of K and the sum of its partial products, which joins those ops' kernel, where it measures faster
        # (CUDA, with CUDA graphs: NOTE [Split-K linears]). Runs after fuse_epilogues, which moves the bias into
        # the tail, and before the fusions. Opt-in until a model-level GPU measurement shows it wins.
        Pass("split_k_linears", split_k_linears(), "few-row Linears -> K split over a batched GEMM where faster "
             "(CUDA, opt-in)", after="fuse_epilogues"),
        # A Linear, addmm or mm on a constant weight -> the same GEMM on its weight in the other layout, where cuBLAS
        # is measured faster with it (CUDA, with CUDA graphs: NOTE [GEMM weight layouts]). After fuse_epilogues,
        # which decides which biases stay, and before split_k_linears. Opt-in until a model-level GPU measurement.
        Pass("gemm_weight_layouts", gemm_weight_layouts(), "GEMMs -> the weight layout measured faster "
             "(CUDA, opt-in)", after="fuse_epilogues"),
        # A float32 GEMM on a constant weight -> three TF32 products in one tensor-core GEMM, x split by a generated
        # kernel, where that measures faster (CUDA, with CUDA graphs: NOTE [3xTF32 GEMMs]); about ten times
        # float32's error, within its tolerance. After fuse_epilogues, before gemm_weight_layouts (inserted last,
        # it lands first after fuse_epilogues). On by default with CUDA graphs (api.GRAPH_DEFAULT_PASSES, NOTE
        # [3xTF32 under graphs]); a no-op without them.
        Pass("tf32x3_linears", tf32x3_linears(), "float32 GEMMs -> 3xTF32 on tensor cores where faster "
             "(CUDA, with CUDA graphs)", after="fuse_epilogues"),
        # A float32 2-D convolution on a constant weight, where the process keeps cuDNN off TF32 -> three TF32
        # products in one convolution over three times the input channels, x split by a generated kernel, where
        # that measures faster (CUDA, with CUDA graphs: NOTE [3xTF32 convolutions]). After fuse_epilogues, whose
        # fused cuDNN calls it keeps, before to_channels_last (which leaves float32 convolutions alone). On by
        # default with CUDA graphs (api.GRAPH_DEFAULT_PASSES, NOTE [3xTF32 under graphs]); a no-op without them.
        Pass("tf32x3_convolutions", tf32x3_convolutions(), "float32 convolutions -> 3xTF32 on tensor cores where "
             "faster (CUDA, with CUDA graphs)", after="fuse_epilogues"),
        # Depthwise convolutions -> fxopt's kernel where it measures faster than cuDNN on the device (CUDA; NOTE
        # [Depthwise convolutions]): after the layout passes, whose layouts it keeps. Opt-in until a GPU run.
        Pass("depthwise_convolutions", depthwise_convolutions(backend),
             "depthwise convolutions -> a generated kernel where faster (CUDA, opt-in)", after="convs_in_nchw"),
        # depthwise_convolutions taking only a convolution with the LayerNorm over its channels after it (ConvNeXt's
        # block: NOTE [Depthwise + LayerNorm]), the other depthwise convolutions left to cuDNN. Opt-in until a GPU run.
        Pass("depthwise_layer_norms", depthwise_convolutions(backend, alone=False),
             "depthwise convolution + LayerNorm -> one generated kernel where faster (CUDA, opt-in)",
             after="convs_in_nchw"),
        # short_query_attention with the tensor-core kernel among its candidates for float16 / bfloat16 long queries
        # (NOTE [Tensor-core tiles for short sequences]), before the default one, which then sees only the SDPA
        # calls this one left. Opt-in until a GPU run has measured it.
        Pass("tensor_core_attention", short_query_attention(backend, tensor_cores=True),
             "SDPA -> a generated kernel, the tensor-core kernel included, where faster (CUDA, opt-in)",
             after="hoist_attention_masks"),
    ]


def build_pipeline(spec: Sequence[PassSpec] | None, backend: str, enable: Sequence[str] = ()) -> list[Pass]:
    """The passes ``optimize(passes=spec, enable=enable)`` runs for ``backend``: the default pipeline when ``spec``
    is None, else ``spec``'s names, Pass objects and callables in order; then the opt-in passes named in ``enable``."""
    default = default_pipeline(backend)
    optional = optional_passes(backend)
    by_name = {p.name: p for p in default + optional}
    pipeline = []
    for item in default if spec is None else spec:
        if isinstance(item, Pass):
            pipeline.append(item)
        elif isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"unknown pass {item!r}; the default pipeline has {[p.name for p in default]}, "
                                 f"the opt-in passes are {[p.name for p in optional]}")
            pipeline.append(by_name[item])
        elif callable(item):
            pipeline.append(Pass(getattr(item, "__name__", repr(item)), item))
        else:
            raise TypeError(f"a pass is a name, a fxopt.passes.Pass or a callable, got {type(item).__name__}")
    for name in enable:
        if name not in {p.name for p in optional}:
            raise ValueError(f"enable: {name!r} is not an opt-in pass; the opt-in passes are "
                             f"{[p.name for p in optional]}")
    present = {p.name for p in pipeline}
    for p in optional:
        if p.name not in enable or p.name in present:
            continue
        names = [q.name for q in pipeline]
        if p.after in names:  # its place in the pipeline (split_k_linears: before the fusions)
            pipeline.insert(names.index(p.after) + 1, p)
        else:
            pipeline.append(p)
    # parallel_branches must be last: a later pass could move nodes across its stream switches
    names = [p.name for p in pipeline]
    if "parallel_branches" in names and names.index("parallel_branches") != len(names) - 1:
        raise ValueError(f"parallel_branches must be the last pass (a pass after it could move nodes across its "
                         f"stream switches); the pipeline is {names}")
    return pipeline


def pass_names(backend: str = "auto") -> list[str]:
    return [p.name for p in default_pipeline(backend)]


__all__ = ["attention_pass", "PassSpec", "batchnorm_as_affine", "build_pipeline", "collapse_views", "convs_in_nchw",
           "default_pipeline", "few_row_linears", "fold_batchnorm",
           "decompose_group_norm", "fold_constants", "fold_flag_inputs", "functionalize_inplace", "merge_operand_copies", "merge_sibling_linears", "move_scales_past_matmuls",
           "fuse_elementwise", "fuse_epilogues", "fuse_reductions", "gemm_weight_layouts", "hoist_attention_masks", "keep_faster_regions",
           "note", "optional_passes", "parallel_branches", "Pass", "pass_names", "PassLog", "PassRecord", "PassResult", "record",
           "remove_dead_code", "remove_dropout", "remove_identity", "rewrite_attention", "run_passes",
           "short_query_attention", "snapshot", "split_k_linears", "tf32x3_convolutions", "tf32x3_linears",
           "stats", "tag", "to_channels_last", "write_into_caches"]
