"""fxopt/runtime/strides.py against eager: the strides an elementwise op's output gets, on random layouts."""

from __future__ import annotations

import random

import torch

from fxopt.runtime.strides import copy_strides, iterator_strides, replay


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
