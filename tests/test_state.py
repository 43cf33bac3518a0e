"""fxopt/state.py: the snapshot of a model's state that fxopt restores after each of its runs (NOTE [Model state])."""

from __future__ import annotations

import torch
import torch.nn as nn

from fxopt.state import Effects, ModelState, compare_effects


class Holder:
    """A plain Python object holding tensors (as a transformers cache does)."""

    def __init__(self):
        self.layers = [{"k": torch.zeros(2, 3)}, {"k": torch.zeros(2, 3)}]
        self.length = torch.tensor(0)
        self.ready = False


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("steps", torch.zeros(()))
        self.cache = Holder()

    def forward(self, x):
        self.steps.add_(1)
        self.cache.layers[0]["k"].copy_(x)
        self.cache.length += 1
        if not self.cache.ready:
            self.cache.ready, self.cache.extra = True, torch.ones(1)
        return self.lin(x)


def test_a_run_is_undone_bit_for_bit_with_versions():
    model, x = Stateful(), torch.randn(2, 3)
    held = [model.steps, model.cache.layers[0]["k"], model.cache.length]
    versions = [t._version for t in held]
    state = ModelState(model)
    with state.run() as effects:
        model(x)
    assert sorted(effects.written) == ["cache.layers[0]['k']", "cache.length", "steps"]
    assert torch.equal(effects.written["cache.layers[0]['k']"], x)
    assert effects.assigned == ["cache.extra", "cache.ready"]  # the tensor first
    assert not effects.parameters_written
    assert float(model.steps) == 0 and int(model.cache.length) == 0 and not model.cache.ready
    assert not hasattr(model.cache, "extra") and torch.equal(model.cache.layers[0]["k"], torch.zeros(2, 3))
    assert [t._version for t in held] == versions
    assert model.cache.layers[0]["k"] is held[1]  # the same tensor objects, written back


def test_parameters_are_not_copied_and_their_writes_are_reported():
    model = Stateful()
    state = ModelState(model)
    copied = sum(t.numel() * t.element_size() for t in (model.steps, model.cache.length,
                                                       *(layer["k"] for layer in model.cache.layers)))
    assert state.nbytes == copied  # buffers and held tensors, not the Linear's weight and bias
    with torch.no_grad(), state.run() as effects:
        model.lin.weight.mul_(2)
    assert effects.parameters_written == ["lin.weight"]


def test_swapped_submodules_and_list_items_are_put_back():
    model = Stateful()
    lin, first = model.lin, model.cache.layers[0]
    state = ModelState(model)
    with state.run() as effects:
        model.lin = nn.Identity()
        model.cache.layers.append({"k": torch.ones(1)})
        model.cache.layers[0] = {}
    assert "lin" in effects.assigned and "cache.layers" in effects.assigned
    assert model.lin is lin and len(model.cache.layers) == 2 and model.cache.layers[0] is first


def test_effects_compare_written_values_and_assignments():
    a = Effects(written={"cache": torch.ones(3)})
    assert compare_effects(Effects(written={"cache": torch.ones(3)}), a) is None
    assert "cache after the run" in compare_effects(Effects(written={"cache": torch.zeros(3)}), a)
    assert "not written cache" in compare_effects(Effects(), a)
    assert "assigns Python attributes (keys)" in compare_effects(Effects(), Effects(assigned=["keys"]))


def test_inference_tensors_are_restored_by_contents():
    with torch.inference_mode():
        held = torch.zeros(3)
    model = nn.Module()
    model.held = held
    state = ModelState(model)
    with state.run() as effects, torch.inference_mode():
        held.add_(1)
    assert list(effects.written) == ["held"] and torch.equal(held, torch.zeros(3))
