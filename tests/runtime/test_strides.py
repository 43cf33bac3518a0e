"""fxopt/runtime/strides.py against eager: the strides an elementwise op's output gets, on random layouts."""

from __future__ import annotations

import random

import torch

from fxopt.runtime.strides import (coalesce, copy_strides, divider32, fits_index32, iterator_strides, replay,
                                   vector_inner)


def _random_tensor(rng: random.Random, shape: list[int]) -> torch.Tensor:
    t = torch.randn(shape)
    kind = rng.choice(["contiguous", "channels_last", "transposed", "permuted", "stepped", "offset"])
    if kind == "channels_last" and len(shape) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif kind == "transposed" and len(shape) >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif kind == "permuted":
        p = list(range(len(shape)))
        rng.shuffle(p)
        t = t.permute(p).contiguous().permute([p.index(i) for i in range(len(shape))])
    elif kind == "stepped" and shape:
        t = torch.randn(shape[:-1] + [2 * shape[-1]])[..., ::2]
    elif kind == "offset" and shape:
        t = torch.randn(shape[:-1] + [shape[-1] + 1])[..., 1:]
    return t


def _operands(rng: random.Random, shape: list[int], k: int) -> list:
    ops = []
    for _ in range(k):
        s = list(shape)
        if rng.random() < 0.4:  # broadcast along some dimensions, or fewer dimensions
            s = [1 if rng.random() < 0.5 else d for d in s]
            if rng.random() < 0.3:
                s = s[rng.randint(0, len(s)):]
        ops.append(_random_tensor(rng, s) if s else torch.randn(()))
    return ops


def test_iterator_strides_match_eager_on_random_layouts():
    rng = random.Random(20261201)
    checked = 0
    for _ in range(3000):
        shape = [rng.choice([1, 1, 2, 3, 4]) for _ in range(rng.randint(1, 4))]
        ops = _operands(rng, shape, rng.randint(1, 3))
        if rng.random() < 0.2:
            ops.append(2.5)  # a Python number: a 0-dim operand
        tensors = [o for o in ops if isinstance(o, torch.Tensor)]
        try:
            if len(ops) == 1:
                out = torch.abs(ops[0])
            elif len(ops) == 2:
                out = torch.add(*ops) if isinstance(ops[0], torch.Tensor) else torch.add(ops[1], ops[0])
            else:
                a, b = ops[1], ops[2]
                out = torch.where(ops[0] > 0, a, b) if isinstance(ops[0], torch.Tensor) else None
        except RuntimeError:
            continue
        if out is None or out.numel() == 0 or not tensors:
            continue
        layouts = [((), ()) if not isinstance(o, torch.Tensor) else (tuple(o.shape), o.stride()) for o in ops]
        if len(ops) == 2 and not isinstance(ops[0], torch.Tensor):
            layouts = layouts[::-1]
        if len(ops) == 3:  # where's condition is a comparison's result: its own layout first
            cond = ops[0] > 0
            layouts[0] = (tuple(cond.shape), cond.stride())
        assert iterator_strides(layouts, out.shape) == out.stride(), (layouts, out.shape, out.stride())
        checked += 1
    assert checked > 2000


def test_a_cast_keeps_dense_strides_and_suggests_a_format_otherwise():
    rng = random.Random(7)
    for _ in range(500):
        shape = [rng.choice([1, 2, 3]) for _ in range(4)]
        t = _random_tensor(rng, shape)
        assert copy_strides(tuple(t.shape), t.stride()) == t.to(torch.float64).stride(), (t.shape, t.stride())


def test_replay_follows_eager_op_by_op():
    """Fuzz seed 9900997: a broadcast buffer minus a channels_last tensor has strides (9, 3, 9, 1); the abs after
    it is contiguous. Neither is what 'follow the full-size input' says."""
    c = torch.randn(3, 1, 3)
    x = torch.randn(4, 3, 1, 3).contiguous(memory_format=torch.channels_last)
    program = ((("sub", (("in", 0), ("in", 1))), ("abs", (("step", 0),)), ("add", (("step", 1), ("scalar",)))),
               (("step", 0), ("step", 2)))
    got = replay(program, [(tuple(c.shape), c.stride()), (tuple(x.shape), x.stride())])
    d = c - x
    assert got == [d.stride(), (d.abs() + 1).stride()] == [(9, 3, 9, 1), (9, 3, 3, 1)]


# -- NOTE [Strided iteration]: coalesce, fits_index32 ------------------------------------------------------------


def _offsets(sizes, strides_per_tensor):
    """Each element's offsets (one per tensor), walked row-major over ``sizes``, as the strided kernel does."""
    out = []
    for flat in range(int(torch.tensor(sizes).prod())):
        rem, offs = flat, [0] * len(strides_per_tensor)
        for d in range(len(sizes) - 1, -1, -1):
            idx, rem = rem % sizes[d], rem // sizes[d]
            for t, st in enumerate(strides_per_tensor):
                offs[t] += idx * st[d]
        out.append(tuple(offs))
    return out


def _dense_in(shape, order):
    """Dense strides for ``shape`` with dims laid out in ``order`` (innermost last)."""
    strides, acc = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = acc
        acc *= shape[d]
    return tuple(strides)


def _random_case(rng: random.Random):
    """A shape, the strides of 1-3 inputs (dense in a random dim order, some dims broadcast, some with gaps) and
    of one output (dense in a random order)."""
    rank = rng.randint(1, 5)
    shape = tuple(rng.choice([1, 1, 2, 3, 4]) for _ in range(rank))
    tensors = []
    for _ in range(rng.randint(1, 3)):
        st = list(_dense_in(shape, rng.sample(range(rank), rank)))
        if rng.random() < 0.3:
            st = [2 * s for s in st]  # every other element of a bigger buffer
        st = [0 if rng.random() < 0.3 else s for s in st]  # broadcast dims
        tensors.append(tuple(st))
    out_stride = _dense_in(shape, list(range(rank)) if rng.random() < 0.5 else rng.sample(range(rank), rank))
    return shape, tensors + [out_stride], out_stride


def test_coalesce_walks_the_same_elements_in_fewer_dims():
    """Every element is visited once with the same offsets in every tensor: the set of offset tuples is unchanged
    (the output's offsets name the element). Random shapes, permutations, broadcasts and output orders."""
    rng = random.Random(20261206)
    for _ in range(400):
        shape, strides, out_stride = _random_case(rng)
        sizes, merged = coalesce(shape, strides, out_stride)
        assert len(sizes) == len(shape) and all(len(st) == len(shape) for st in merged)
        want, got = _offsets(shape, strides), _offsets(sizes, merged)
        assert sorted(want) == sorted(got), (shape, strides, out_stride, sizes, merged)
        assert sum(s != 1 for s in sizes) <= sum(s != 1 for s in shape)


def test_coalesce_merges_a_bias_broadcast_and_keeps_a_permuted_read_apart():
    # bias [384] over a contiguous [1, 56, 56, 384]: two dims, the bias's strides (0, 1)
    shape = (1, 56, 56, 384)
    dense = (56 * 56 * 384, 56 * 384, 384, 1)
    sizes, (bias, x, out) = coalesce(shape, [(0, 0, 0, 1), dense, dense], dense)
    assert sizes == (1, 1, 3136, 384) and bias == (0, 0, 0, 1) and x == out == (0, 0, 384, 1)
    # channels_last input and output: one dim, walked in memory order
    cl = torch.empty(2, 8, 5, 7).to(memory_format=torch.channels_last).stride()
    sizes, (a, out) = coalesce((2, 8, 5, 7), [cl, cl], cl)
    assert sizes == (1, 1, 1, 560) and a == out == (0, 0, 0, 1)
    # a transposed read into a contiguous output stays two dims
    sizes, (t, out) = coalesce((6, 4), [(1, 6), (4, 1)], (4, 1))
    assert sizes == (6, 4) and t == (1, 6) and out == (4, 1)


def test_fits_index32_at_the_limit():
    assert fits_index32((2 ** 31 - 1,), [(1,)])
    assert not fits_index32((2 ** 31,), [(1,)])
    assert not fits_index32((2, 2 ** 30 + 1), [(2 ** 30 + 1, 1)])  # numel over
    assert not fits_index32((4, 8), [(1, 0), (2 ** 30, 1)])  # an offset over: 3 * 2**30 + 7
    assert fits_index32((4, 8), [(0, 1), (8, 1)])


def test_divider32_divides_every_31_bit_number():
    """The magic-number division the 32-bit strided loop does (``(umulhi(n, magic) + n) >> shift``), in Python, at
    the edges and on random numbers, against ``//``."""
    rng = random.Random(7)
    divisors = [1, 2, 3, 7, 49, 384, 3136, 2 ** 16 + 1, 2 ** 30, 2 ** 31 - 1] + [rng.randrange(1, 2 ** 31)
                                                                               for _ in range(200)]
    for d in divisors:
        packed = divider32(d)
        magic, shift = packed & 0xFFFFFFFF, packed >> 32
        for n in [0, 1, d - 1, d, d + 1, 2 ** 31 - 1] + [rng.randrange(0, 2 ** 31) for _ in range(200)]:
            if not 0 <= n < 2 ** 31:
                continue
            assert (((n * magic) >> 32) + n) >> shift == n // d, (d, n)


def test_vector_inner_wants_a_dense_or_broadcast_inner_dim_of_whole_vectors():
    dense = (384, 1)
    assert vector_inner((3136, 384), [(0, 1), dense, dense], 1, 4)  # bias, input, output
    assert not vector_inner((3136, 382), [(0, 1), (382, 1), (382, 1)], 1, 4)  # 382 is no multiple of 4
    assert not vector_inner((3136, 384), [(1, 3136), dense, dense], 1, 4)  # a transposed read
    assert not vector_inner((3136, 384), [dense, (384, 0)], 1, 4)  # an output broadcast along the inner dim
    assert not vector_inner((6, 384), [(386, 1), dense], 1, 4)  # rows of a dense input start unaligned
    assert vector_inner((6, 384), [(386, 0), dense], 1, 4)  # ... unless it is read broadcast
    assert not vector_inner((3136, 384), [dense, dense], 1, 1)


def test_the_size_arguments_of_a_cache_write():
    """NOTE [Writes into a cache]: 32-bit where every element of every destination is in reach, with each size's
    divider."""
    from fxopt.runtime.kernel import into_sizes

    shape, value, dest = (1, 4, 1, 8), (32, 8, 8, 1), (1, 4, 16, 8)
    sizes = into_sizes(shape, (value, (512, 128, 8, 1)), ((dest, (512, 128, 8, 1)),))
    assert sizes == (1, *shape, *(divider32(s) for s in shape))
    big = (1, 4, 2 ** 28, 8)  # the destination's last rows are out of 32-bit reach
    big_stride = (2 ** 33, 2 ** 31, 8, 1)
    assert into_sizes(shape, (value, big_stride), ((big, big_stride),)) == (0, *shape, 0, 0, 0, 0)
    # one destination out of reach is enough (a key cache and a value cache written by one kernel)
    assert into_sizes(shape, (value, (512, 128, 8, 1), big_stride),
                      ((dest, (512, 128, 8, 1)), (big, big_stride))) == (0, *shape, 0, 0, 0, 0)
