"""A model fxopt cannot capture, or whose capture it cannot verify, runs unchanged with one warning (CaptureError
under strict=True); fxopt's own failures never reach the caller; the model's state is left as it was
(NOTE [Unoptimized fallback] in api.py, NOTE [Model state] in state.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxopt
import fxopt.api
from fxopt.verify import compare


def _fxopt_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("fxopt:")]


def _tensors_of(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)]


# -- a transformers decode step with a StaticCache (the reported model) ----------------------------------------------
@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    return transformers, config, transformers.LlamaForCausalLM(config).eval()


class Step(nn.Module):
    """One decode step: the cache is a plain Python object on the module, written in place by every call."""

    def __init__(self, model, cache):
        super().__init__()
        self.model, self.cache = model, cache

    def forward(self, ids, pos):
        return self.model(input_ids=ids, cache_position=pos, past_key_values=self.cache, use_cache=True).logits


def _step(llama, initialized: bool) -> Step:
    transformers, config, model = llama
    cache = transformers.StaticCache(config=config, max_cache_len=16)
    if initialized:
        cache.early_initialization(batch_size=1, num_heads=config.num_key_value_heads,
                                   head_dim=config.hidden_size // config.num_attention_heads, dtype=torch.float32,
                                   device="cpu")
    return Step(model, cache)


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_a_lazily_allocated_static_cache_runs_unchanged_with_one_warning(llama):
    """The report: torch.export allocated the cache on fake tensors, which reached verify.compare. Now the cache's
    first-call allocation (Python attributes a graph cannot replay) is found, and the step runs as eager does."""
    step, eager = _step(llama, initialized=False), _step(llama, initialized=False)
    ids, pos = torch.tensor([[3]]), torch.tensor([0])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = fxopt.optimize(step, (ids, pos))
    messages = _fxopt_warnings(record)
    assert len(messages) == 1, messages
    reason = opt.unoptimized_reason
    assert reason is not None and reason in messages[0]
    assert "verifying the captured graph" in reason and "assigns Python attributes" in reason
    assert "cache.layers[0].keys" in reason and "early_initialization" in reason
    # the cache is as it was: still unallocated, nothing fake left on it
    assert all(not layer.is_initialized and layer.keys is None for layer in step.cache.layers)
    assert all(int(layer.cumulative_length) == 0 for layer in step.cache.layers)
    with torch.no_grad():
        for i in range(3):
            p = torch.tensor([i])
            torch.testing.assert_close(opt(ids, p), eager(ids, p), rtol=0, atol=0)
    # calling the optimized module wrote the model's own cache, as calling the model does
    for a, e in zip(_tensors_of(step.cache), _tensors_of(eager.cache)):
        assert torch.equal(a, e)


def test_strict_raises_capture_error_for_the_lazy_cache(llama):
    step = _step(llama, initialized=False)
    with pytest.raises(fxopt.CaptureError, match="assigns Python attributes"):
        fxopt.optimize(step, (torch.tensor([[3]]), torch.tensor([0])), strict=True)
    assert all(not layer.is_initialized for layer in step.cache.layers)


def test_an_allocated_static_cache_optimizes_and_is_left_bit_identical(llama):
    step, eager = _step(llama, initialized=True), _step(llama, initialized=True)
    ids = torch.tensor([[3]])
    before = [(t.clone(), t._version) for t in _tensors_of(step.cache)]
    state_dict = {k: v.clone() for k, v in step.state_dict().items()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = fxopt.optimize(step, (ids, torch.tensor([0])))
    assert opt.unoptimized_reason is None and not _fxopt_warnings(record)
    for t, (saved, version) in zip(_tensors_of(step.cache), before):
        assert torch.equal(t, saved) and t._version == version
    assert step.state_dict().keys() == state_dict.keys()
    assert all(torch.equal(v, state_dict[k]) for k, v in step.state_dict().items())
    # a decode loop through fxopt's graph matches eager's step by step, and writes the model's cache as eager does
    with torch.no_grad():
        for i in range(4):
            got, want = opt(ids, torch.tensor([i])), eager(ids, torch.tensor([i]))
            assert compare(got, want) is None, i
            ids = want.argmax(-1)
    for a, e in zip(_tensors_of(step.cache), _tensors_of(eager.cache)):
        assert compare(a, e) is None


def test_the_decode_step_called_with_keywords(llama):
    step, eager = _step(llama, initialized=True), _step(llama, initialized=True)
    ids, pos = torch.tensor([[5]]), torch.tensor([0])
    opt = fxopt.optimize(step, (ids, pos))
    with torch.no_grad():
        assert compare(opt(ids=ids, pos=pos), eager(ids=ids, pos=pos)) is None
    assert compare(step.cache.layers[0].keys, eager.cache.layers[0].keys) is None


# -- plain modules with state --------------------------------------------------------------------------------------
class Counter(nn.Module):
    """A buffer written in forward (counter += 1 via add_), read by the output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        return self.lin(x).relu() * self.count


def test_a_buffer_written_in_forward_is_left_unchanged_by_optimize():
    model, x = Counter(), torch.randn(2, 4)
    version = model.count._version
    opt = fxopt.optimize(model, (x,))
    assert float(model.count) == 0.0 and model.count._version == version  # fxopt ran it several times
    assert opt.unoptimized_reason is None
    eager = Counter()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        for _ in range(3):  # each call counts once, as eager's does
            assert compare(opt(x), eager(x)) is None
    assert float(model.count) == float(eager.count) == 3.0


class LazyState(nn.Module):
    """Allocates its state on the first call (a Python attribute), then writes it in place."""

    def __init__(self):
        super().__init__()
        self.state = None

    def forward(self, x):
        if self.state is None:
            self.state = torch.zeros_like(x)
        self.state.add_(x)
        return x * 2 + self.state


def test_attributes_assigned_while_tracing_or_exporting_do_not_stay_on_the_model():
    """symbolic_trace assigns a Proxy to ``state``, torch.export a FakeTensor: neither may stay on the model."""
    model, x = LazyState(), torch.randn(3)
    with pytest.warns(RuntimeWarning, match="assigns Python attributes"):
        opt = fxopt.optimize(model, (x,))
    assert model.state is None
    assert "assigns Python attributes (state)" in opt.unoptimized_reason
    with torch.no_grad():  # runs as eager does: allocated at the first real call, accumulated after
        torch.testing.assert_close(opt(x), 3 * x)
        torch.testing.assert_close(opt(x), 4 * x)
    assert model.state is None  # a module attribute: assigned on fxopt's eval copy of the module (state.eval_twin)


# -- fxopt's own failures ------------------------------------------------------------------------------------------
def _boom(*args, **kwargs):
    raise RuntimeError("internal failure injected by the test")


@pytest.mark.parametrize("target, stage", [
    ("capture", "capture"),
    ("compare", "verifying the captured graph"),
    ("run_passes", "passes"),
    ("lower_for_execution", "lowering the optimized graph"),
])
def test_an_internal_error_falls_back_with_a_warning(monkeypatch, target, stage):
    monkeypatch.setattr(fxopt.api, target, _boom)
    model, x = Counter(), torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = fxopt.optimize(model, (x,))
    messages = _fxopt_warnings(record)
    assert len(messages) == 1, messages
    reason = opt.unoptimized_reason
    assert reason.startswith(stage) and "RuntimeError: internal failure injected by the test" in reason
    assert float(model.count) == 0.0
    eager = Counter()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert compare(opt(x), eager(x)) is None


@pytest.mark.parametrize("target, error", [("capture", fxopt.CaptureError), ("compare", fxopt.CaptureError),
                                           ("run_passes", fxopt.PassError)])
def test_strict_raises_the_internal_error_as_fxopts_chained_to_it(monkeypatch, target, error):
    monkeypatch.setattr(fxopt.api, target, _boom)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # strict: symbolic_trace's graph of Counter fails verification
    with pytest.raises(error) as info:
        fxopt.optimize(model, (torch.randn(2, 4),), strict=True)
    assert isinstance(info.value.__cause__, RuntimeError) and "injected" in str(info.value.__cause__)


def test_an_internal_error_at_the_first_call_falls_back_there(monkeypatch):
    monkeypatch.setattr(fxopt.api, "lower_for_execution", _boom)
    model, x = Counter(), torch.randn(2, 4)
    opt = fxopt.optimize(model)  # specializes at the first call
    with pytest.warns(RuntimeWarning, match="lowering the optimized graph"), torch.no_grad():
        out = opt(x)
    eager = Counter()
    eager.load_state_dict(model.state_dict())
    eager.count.zero_()
    with torch.no_grad():
        assert compare(out, eager(x)) is None
    assert float(model.count) == 1.0  # fxopt's runs undone, the call itself counted


def test_compare_reports_fake_tensors_instead_of_raising():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = torch.randn(3)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real) * 2
    mismatch = compare(fake, real)
    assert mismatch is not None and "without data" in mismatch.reason and "graph's" in mismatch.reason
    assert "eager's" in compare(real, fake).reason


class Position(nn.Module):
    """A step counter read before it is written: ``n * 2`` is computed from a buffer but is no constant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        y = x + self.n * 2
        self.n.add_(1)
        return y


def test_state_the_graph_writes_is_not_folded_into_a_constant():
    """fold_constants once folded ``n * 2``: every call after the first returned the first call's value (one
    verification run cannot see it; passes/fold.py ``_written_storages``)."""
    model, eager, x = Position(), Position(), torch.randn(3)
    opt = fxopt.optimize(model, (x,))
    assert opt.unoptimized_reason is None
    with torch.no_grad():
        for _ in range(3):
            assert compare(opt(x), eager(x)) is None


def test_a_model_in_eval_mode_gets_its_own_attributes_assigned_by_the_fallback():
    """An eval-mode model is its own reference (state.eval_twin): the fallback's attribute assignments land on the
    caller's module, as calling the model does; optimize itself still leaves the model as it was."""
    model, x = LazyState().eval(), torch.randn(3)
    with pytest.warns(RuntimeWarning, match="assigns Python attributes"):
        opt = fxopt.optimize(model, (x,))
    assert model.state is None
    with torch.no_grad():
        torch.testing.assert_close(opt(x), 3 * x)
    assert model.state is not None
    torch.testing.assert_close(model.state, x)


class _GrowingCache(nn.Module):
    """A buffer replaced by a longer one on every call (torch.cat): the exported graph fails verification."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("keys", torch.zeros(1, 0, 4), persistent=False)

    def forward(self, x):
        self.keys = torch.cat([self.keys, self.proj(x)], 1)
        return self.keys.sum(1)


def test_a_graph_exported_for_these_inputs_is_not_exported_again_after_it_fails_verification(monkeypatch):
    """Exporting the same arguments again gives the same graph: seconds lost on a language model for nothing."""
    import importlib

    capture_mod = importlib.import_module("fxopt.capture")  # the module, not the function fxopt exports by that name
    exports = []
    real_export = capture_mod._export

    def counting(model, example_inputs):
        exports.append(1)
        return real_export(model, example_inputs)

    monkeypatch.setattr(capture_mod, "_export", counting)
    model, x = _GrowingCache().eval(), torch.randn(1, 1, 4)
    with pytest.warns(RuntimeWarning, match="grows on every call"):
        opt = fxopt.optimize(model, (x,))
    assert opt.unoptimized_reason is not None and "grows on every call" in opt.unoptimized_reason
    assert len(exports) == 1
