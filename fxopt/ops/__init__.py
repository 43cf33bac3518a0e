"""The op vocabulary: every spelling of each op fxopt understands, mapped to one canonical op.

The same op reaches a graph in many spellings: ``nn.ReLU`` (call_module), ``F.relu`` / ``torch.relu``
(call_function), ``x.relu()`` (call_method), ``aten.relu.default`` (torch.export graphs). torch.fx's
NormalizeOperators does not merge them; this table does. It is the one place an op is described:

* elementwise ops: the scalar C++ expression (shared by the C++ and CUDA printers, see
  ``fxopt/codegen/include/fxopt_kernel.h`` for the helpers it calls), how the compute type is chosen,
  and the support check, via :func:`match_elementwise`;
* ops that launch no kernel (views, shape reads, identities), via :func:`launches_kernel`;
* in-place spellings, which are never fused (:func:`is_inplace`);
* the families of ops passes ask about (convolutions, GEMMs, reshapes, dropout, side effects, ...), via
  queries such as :func:`is_reshape` and :func:`is_heavy`.

One module per job: ``meta`` (recorded tensor metadata, dtypes, argument binding), ``elementwise`` (the elementwise
table and its spellings), ``rows`` (row reductions), ``classify`` (launches, views, aliasing, in-place, names) and
``families`` (the op families above). This package re-exports their public names: ``ops.X`` is the way to ask.
A module outside the package keeps no set of op spellings of its own (tests/test_op_table_home.py).

Dtypes come from ``node.meta["tensor_meta"]`` (recorded by running eager), so type promotion is exactly eager's.
"""

from __future__ import annotations

from .meta import (  # noqa: F401
    Operand, bind_args, FLOAT_DTYPES, INT_DTYPES, SUPPORTED_DTYPES, tensor_meta, meta_tensor, set_tensor_meta,
    set_strided_meta, compute_dtype, promoted_dtype
)
from .elementwise import (  # noqa: F401
    ElementwiseOp, ElementwiseCall, ELEMENTWISE_OPS, ADD, SUB, RSUB, MUL, DIV, FLOOR_DIVIDE, TRUNC_DIVIDE,
    REMAINDER, NEG, ABS, POW, RECIPROCAL, SIGN, LERP, ADDCMUL, ADDCDIV, MINIMUM, MAXIMUM, RELU, CONDITION_OPERANDS,
    Normalizer, OPS, CAST_METHODS, ROTATE_HALF, normalize, match_elementwise, rotate_half
)
from .rows import (  # noqa: F401
    RowReductionOp, RowReductionCall, ROW_REDUCTION_OPS, RowNormalizer, normalize_row_reduction, row_reduction_meta,
    match_row_reduction
)
from .classify import (  # noqa: F401
    VIEW_METHODS, VIEW_FUNCTIONS, SHAPE_METHODS, SHAPE_FUNCTIONS, DROPOUT_MODULES, DROPOUT_FUNCTIONS,
    IDENTITY_MODULES, IDENTITY_CAST_METHODS, launches_kernel, is_identity_copy, is_view_like, may_alias_input,
    is_inplace, alias_root, memory_key, inplace_writers, describe, known_op_names
)
from .families import (  # noqa: F401
    CONV_FUNCTIONS, CONV2D_FUNCTIONS, GEMM_FUNCTIONS, GEMM_METHODS, HEAVY_MODULES, WEIGHT_FIRST_GEMMS,
    is_conv_function, is_conv2d, is_heavy, is_weight_first_gemm, RESHAPE_MODULES, ROW_MAJOR_RESHAPE_METHODS,
    ROW_MAJOR_RESHAPE_FUNCTIONS, SQUEEZE_METHODS, SQUEEZE_FUNCTIONS, RESHAPE_METHODS, RESHAPE_FUNCTIONS,
    MAY_COPY_RESHAPE_METHODS, MAY_COPY_RESHAPE_FUNCTIONS, is_reshape_module, is_reshape, reads_layout,
    may_copy_reshape, view_possible, ATEN_DROPOUT_FUNCTIONS, RETURNS_INPUT_MODULES, SAME_TENSOR_OVERLOADS, HIDDEN_ALIAS_OVERLOADS,
    is_dropout_module, is_aten_dropout, is_stochastic_depth, returns_input_module, is_same_tensor_overload, is_hidden_alias,
    SIDE_EFFECT_FUNCTIONS, NEUTRAL_SCALARS, NOT_COMPUTE_OVERLOADS, has_side_effect, neutral_scalar,
    is_compute_overload, COMPOSITE_MODULES, FAST_PATH_OPS, is_composite_module, CONV_MODULES, LITERAL_OPERATORS, RANK_METHODS,
    GROUP_NORM_FUNCTIONS, is_group_norm_module,
    CONV_TRANSPOSE_MODULES, CONV_MODULE_FUNCTIONS, LINEAR_FUNCTIONS, FUNCTIONAL_CONV2D, WEIGHT_BIAS_FUNCTIONS,
    is_conv_module, is_conv_transpose_module, is_plain, is_linear_module, is_batchnorm_module, is_linear_function, is_functional_conv2d, weight_bias_args,
    SHAPE_ARGUMENT_OPS, SHAPE_OF_OTHER_METHODS, SDPA_FUNCTIONS, SDPA_PARAMS, sdpa_args, CAT_SPELLINGS, CHUNK_SPELLINGS, SPLIT_SPELLINGS,
    NARROW_SPELLINGS, UNBIND_SPELLINGS, is_call_to, INDEX_COPY_SPELLINGS, SIZE_ARITHMETIC, SIZE_METHODS, PAD_FUNCTIONS, zero_pad_input,
    ADDMM_FUNCTIONS, MM_FUNCTIONS, MOVEMENT_METHODS, MOVEMENT_FUNCTIONS, SHAPE_QUERY_METHODS, moves_data, is_shape_query
)
