"""The strides eager gives the output of an elementwise op, without running it (NOTE [Output layout]).

Eager's elementwise ops allocate their output through TensorIterator: a fast path when every operand has the
result's shape and they are all contiguous, all channels_last, or all dense with the same strides; otherwise the
dimensions are ordered by the operands' strides (the first operand that tells two dimensions apart decides; a
broadcast dimension tells nothing) and the output is dense in that order. :func:`iterator_strides` is that rule,
ported from ATen's ``TensorIteratorBase::compute_fast_setup_type`` and ``reorder_dimensions``; tests/runtime/
test_strides.py checks it against eager on random layouts. A fused kernel replays it op by op over its group
(:func:`replay`), the way eager computes the group, because later ops can depend on the layout (a ``.view``, the
layout ``torch.stack`` picks). Running the ops on meta tensors would say the same, but a process's first meta op
imports torch._dynamo (0.9 s on the dev box).
"""

from __future__ import annotations

from typing import Sequence

import torch

Layout = tuple[tuple[int, ...], tuple[int, ...]]  # (sizes, strides)

# Ops whose Python-scalar operands are not TensorIterator operands (the scalar is an argument of the kernel).
_SCALAR_IS_ATTRIBUTE = frozenset({"pow"})


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    out, acc = [0] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        out[d] = acc
        acc *= max(shape[d], 1)
    return tuple(out)


def dense_in_order(shape: Sequence[int], stride: Sequence[int], order: Sequence[int]) -> bool:
    """Whether the elements lie without gaps or overlap with the dims of ``order`` from innermost to outermost (dims
    of size 1 may have any stride)."""
    acc = 1
    for d in order:
        if shape[d] != 1:
            if stride[d] != acc:
                return False
            acc *= shape[d]
    return True


def _is_contiguous(shape, stride) -> bool:
    return dense_in_order(shape, stride, range(len(shape) - 1, -1, -1))


def _is_channels_last(shape, stride) -> bool:
    return len(shape) == 4 and dense_in_order(shape, stride, (1, 3, 2, 0))


def is_non_overlapping_and_dense(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Elements in some dimension order, without gaps or overlap (what empty_like keeps as it is)."""
    if any(s == 0 for s in shape):
        return True
    return dense_in_order(shape, stride, sorted(range(len(shape)), key=lambda d: stride[d]))


def channels_last_strides(shape) -> tuple[int, ...]:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c)


def iterator_strides(operands: Sequence[Layout], shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of an elementwise op's output of ``shape`` over ``operands`` (sizes, strides) in TensorIterator's
    order (0-dim operands included: Python scalars become them)."""
    shape = tuple(shape)
    ndim = len(shape)
    if ndim == 0:
        return ()
    if operands and all(tuple(s) == shape for s, _ in operands):
        if all(_is_contiguous(s, st) for s, st in operands):
            return contiguous_strides(shape)
        if ndim == 4 and all(_is_channels_last(s, st) for s, st in operands):
            return channels_last_strides(shape)
        if all(is_non_overlapping_and_dense(s, st) for s, st in operands):
            last = tuple(operands[-1][1])
            if all(tuple(st) == last for _, st in operands):
                return last
    expanded = []
    for s, st in operands:  # strides over the result's dimensions; 0 where the operand is broadcast
        off = ndim - len(s)
        full = [0] * ndim
        for i in range(len(s)):
            full[off + i] = 0 if (s[i] == 1 and shape[off + i] != 1) else st[i]
        expanded.append(full)

    def should_swap(d0: int, d1: int) -> int:
        for full in expanded:
            s0, s1 = full[d0], full[d1]
            if s0 == 0 or s1 == 0:
                continue
            if s0 < s1:
                return -1
            if s0 > s1:
                return 1
            if shape[d0] > shape[d1]:  # equal strides: the smaller dimension goes first
                return 1
        return 0

    perm = list(range(ndim - 1, -1, -1))  # fastest-moving first
    for i in range(1, ndim):  # insertion sort that tolerates ambiguous comparisons, as ATen's
        dim1 = i
        for dim0 in range(i - 1, -1, -1):
            c = should_swap(perm[dim0], perm[dim1])
            if c > 0:
                perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
                dim1 = dim0
            elif c < 0:
                break
    if perm == list(range(ndim - 1, -1, -1)):
        return contiguous_strides(shape)
    out, acc = [0] * ndim, 1
    for d in perm:
        out[d] = acc
        acc *= shape[d]
    return tuple(out)


def copy_strides(shape: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """A cast's output (``empty_like`` with preserve_format): the input's strides when it is dense, else
    channels_last or contiguous."""
    if is_non_overlapping_and_dense(shape, stride):
        return tuple(stride)
    if len(shape) == 4 and is_channels_last_ish(shape, stride):
        return channels_last_strides(shape)
    return contiguous_strides(shape)


def is_channels_last_ish(shape, stride) -> bool:
    """c10's is_channels_last_strides_2d (what suggest_memory_format asks), ported."""
    lowest = 0
    if stride[1] == 0:
        return False
    for d in (1, 3, 2, 0):
        if shape[d] == 0 or stride[d] < lowest:
            return False
        if d == 0 and lowest == stride[1]:
            return False
        lowest = stride[d] * (shape[d] if shape[d] > 1 else 1)
    return True


# A layout program (what fuse_elementwise records per kernel, JSON-able): steps ``(op, operands)`` in eager's order,
# each operand ``["in", i]`` (kernel input i), ``["step", k]`` (an earlier step's result) or ``["scalar"]`` (a
# Python number), and the output references.
LayoutProgram = tuple[tuple[tuple[str, tuple[tuple, ...]], ...], tuple[tuple, ...]]


def replay(program: LayoutProgram, inputs: Sequence[Layout]) -> list[tuple[int, ...]]:
    """The strides eager gives each output of a fused group, for inputs of these sizes and strides."""
    steps, outputs = program
    results: list[Layout] = []

    def layout(ref) -> Layout | None:
        if ref[0] == "in":
            return inputs[ref[1]]
        if ref[0] == "step":
            return results[ref[1]]
        return None

    for op, refs in steps:
        operands = []
        for ref in refs:
            got = layout(ref)
            if got is None:
                if op not in _SCALAR_IS_ATTRIBUTE:
                    operands.append(((), ()))  # a Python number: a 0-dim operand
            else:
                operands.append(got)
        shape = tuple(torch.broadcast_shapes(*[torch.Size(s) for s, _ in operands])) if operands else ()
        if op == "cast" and len(operands) == 1:
            results.append((shape, copy_strides(*operands[0])))
        else:
            results.append((shape, iterator_strides(operands, shape)))
    return [layout(ref)[1] for ref in outputs]


# NOTE [Strided iteration]
# A generated kernel's strided entry point walks the elements in the order of its (sizes, strides) arguments and
# decomposes each element's number into one index per dim: a division and a remainder per dim. With 64-bit
# numbers and sizes known only at run time that is a software routine of tens of instructions per dim, which made
# a broadcast bias add over [1, 56, 56, 384] 2.5x slower than Inductor's kernel on an H100 (ConvNeXt-T's 18
# bias + GELU kernels: 96 µs against 38; benchmarks/NOTES.md). So the host hands the kernel as few dims as the
# tensors allow, as TensorIterator does: dims ordered by the output's strides (outermost first), size-1 dims
# dropped, neighbours merged where every tensor steps through them as through one dim; the bias add becomes
# [3136, 384] with the bias's strides (0, 1): one remainder. The kernel keeps its rank (its argument list is
# fixed); the merged shape is padded in front with size-1 dims, which the kernel skips, and where every offset
# fits, it computes them in 32-bit arithmetic (``index32``), several times cheaper than 64-bit on NVIDIA GPUs, with
# the divisions as multiply-highs by magic numbers the host computes (``divider32``). Where the inner dim is dense or
# broadcast in every tensor (a bias, a layer scale, a residual: ``vector_inner``), a thread takes 16 bytes of it at a
# time (``index32 == 2``): one decomposition per vector, vector loads and stores, the broadcast value loaded once.
# The order of the walk does not change what is computed: every element is visited once and each tensor's offset
# comes from the same index. Rotated reads and writes into a cache (NOTE [Gathering reads], NOTE [Writes into a
# cache]) need the real last dim and the cache's dim: their kernels get the sizes and strides as they are.


def coalesce(shape: Sequence[int], strides: Sequence[Sequence[int]], out_stride: Sequence[int]
             ) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """NOTE [Strided iteration]: ``shape`` and each tensor's ``strides`` (broadcast: 0) as few dims as walk the
    same elements, padded in front to ``len(shape)`` with size-1, stride-0 dims. Dims are taken in the order of
    ``out_stride`` (largest first, ties in their order), so that a dense output is walked in memory order."""
    rank = len(shape)
    order = sorted(range(rank), key=lambda d: -out_stride[d])  # stable: equal strides keep their order
    dims: list[list] = []  # [size, [stride of each tensor]], outermost first
    for d in order:
        if shape[d] == 1:
            continue
        st = [s[d] for s in strides]
        if dims and all(prev == cur * shape[d] for prev, cur in zip(dims[-1][1], st)):
            dims[-1] = [dims[-1][0] * shape[d], st]
        else:
            dims.append([shape[d], st])
    pad = rank - len(dims)
    sizes = (1,) * pad + tuple(size for size, _ in dims)
    return sizes, [(0,) * pad + tuple(st[t] for _, st in dims) for t in range(len(strides))]


def divider32(divisor: int) -> int:
    """NOTE [Strided iteration]: ``divisor``'s magic number for 32-bit division by multiplication, as ATen's
    IntDivider<unsigned int> (Granlund and Montgomery): ``q = (umulhi(n, magic) + n) >> shift`` for every
    ``n < 2**31``, packed as ``magic | shift << 32``. ``divisor`` in [1, 2**31)."""
    if not 1 <= divisor < 2 ** 31:
        raise ValueError(f"divider32: divisor {divisor} out of range")
    shift = next(s for s in range(32) if (1 << s) >= divisor)
    magic = ((1 << 32) * ((1 << shift) - divisor)) // divisor + 1
    assert magic < 2 ** 32
    return magic | shift << 32


def fits_index32(sizes: Sequence[int], strides: Sequence[Sequence[int]]) -> bool:
    """Every element number and every tensor's offset below 2**31 (NOTE [Strided iteration])."""
    limit = 2 ** 31
    numel = 1
    for size in sizes:
        numel *= size
    if numel >= limit:
        return False
    return all(s >= 0 for st in strides for s in st) and all(
        sum((size - 1) * s for size, s in zip(sizes, st)) < limit for st in strides)


def vector_inner(sizes: Sequence[int], strides: Sequence[Sequence[int]], n_outputs: int, vec: int) -> bool:
    """Whether the strided kernel may take ``vec`` elements of the inner dim at a time (NOTE [Strided iteration]):
    its size a multiple of ``vec``; every tensor dense (stride 1) or broadcast (stride 0) along it, the outputs
    dense; a dense tensor's other strides multiples of ``vec``, so each vector starts aligned when its tensor
    does (the kernel checks the pointers)."""
    if vec <= 1 or not sizes or sizes[-1] % vec:
        return False
    for t, st in enumerate(strides):
        inner = st[-1]
        if inner not in (0, 1) or (t >= len(strides) - n_outputs and inner != 1):
            return False
        if inner == 1 and any(s % vec for size, s in zip(sizes[:-1], st[:-1]) if size != 1):
            return False
    return True
