"""What eager does and what fxopt does, for each misuse a new user tried (issue 16): a markdown table.

    python benchmarks/misuse_table.py        # CPU; a few seconds per row
"""

from __future__ import annotations

import tempfile
import warnings

import torch
import torch.nn as nn

import fxopt


def outcome(fn) -> str:
    """The result's type and device, or the exception's type and first line; warnings by their first words."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            r = fn()
            text = describe(r)
        except BaseException as e:  # noqa: BLE001 -- the table reports whatever happens
            text = f"raises {type(e).__name__}: {str(e).splitlines()[0][:70]}"
    fx_warnings = [str(w.message)[:60] for w in caught if "fxopt" in str(w.message)]
    return text + (f" (warns: {fx_warnings[0]}...)" if fx_warnings else "")


def describe(r) -> str:
    if isinstance(r, torch.Tensor):
        grad = f", grad_fn {type(r.grad_fn).__name__}" if r.grad_fn is not None else ""
        return f"{type(r).__name__} on {r.device}{grad}"
    if isinstance(r, str):
        return r
    return type(r).__name__


class Elementwise(nn.Module):
    def forward(self, x):
        return (x.relu() * 2 + 1).sigmoid()


class TakesAList(nn.Module):
    def forward(self, xs):
        return xs[0].relu() + xs[1]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        m[1].running_var.uniform_(0.5, 2.0)
    return m


def llama_rows() -> list:
    """The reported model: a transformers LlamaForCausalLM decode step with a StaticCache (tiny random config)."""
    try:
        import transformers
    except ImportError:
        return [("Llama StaticCache decode step", "(transformers not installed)", "")]

    class Step(nn.Module):
        def __init__(self, model, cache):
            super().__init__()
            self.model, self.cache = model, cache

        def forward(self, ids, pos):
            return self.model(input_ids=ids, cache_position=pos, past_key_values=self.cache, use_cache=True).logits

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    rows = []
    for allocated in (False, True):
        def step():
            cache = transformers.StaticCache(config=config, max_cache_len=16)
            if allocated:
                cache.early_initialization(batch_size=1, num_heads=config.num_key_value_heads,
                                           head_dim=config.hidden_size // config.num_attention_heads,
                                           dtype=torch.float32, device="cpu")
            return Step(model, cache)

        ids, pos = torch.tensor([[3]]), torch.tensor([0])

        def eager(s=step()):
            with torch.no_grad():
                return s(ids, pos)

        def ours(s=step()):
            before = {k: v.clone() for k, v in vars(s.cache.layers[0]).items() if isinstance(v, torch.Tensor)}
            opt = fxopt.optimize(s, (ids, pos))
            after = {k: v for k, v in vars(s.cache.layers[0]).items() if isinstance(v, torch.Tensor)}
            same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
            with torch.no_grad():
                out = opt(ids, pos)
            how = "unoptimized" if opt.unoptimized_reason else "optimized"
            return f"{how}; cache unchanged by optimize: {same}; logits {tuple(out.shape)}"

        what = "allocated" if allocated else "lazily allocated"
        rows.append((f"Llama decode step, StaticCache {what}", outcome(eager), outcome(ours)))
    return rows


def main() -> None:
    x = torch.randn(4, 8)
    rows = []

    def row(what, eager, ours):
        rows.append((what, outcome(eager), outcome(ours)))

    m = mlp()
    opt = fxopt.optimize(m, (x,))
    row("output in grad mode: `.grad_fn`", lambda: m(x), lambda: opt(x))

    def backward(f):
        def run():
            f(x).sum().backward()
            return f"backward ran; gradients of {sum(p.grad is not None for p in m.parameters())} of " \
                   f"{len(list(m.parameters()))} parameters"
        return run

    m.zero_grad(set_to_none=True)
    eager_bw = outcome(backward(m))
    m.zero_grad(set_to_none=True)
    rows.append(("`opt(x).sum().backward()`", eager_bw, outcome(backward(opt))))
    m.zero_grad(set_to_none=True)

    def after_load():
        other = mlp()
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.5)
        m.load_state_dict(other.state_dict())
        with torch.no_grad():
            diff = (opt(x) - m(x)).abs().max().item()
        return f"max abs difference from the model {diff:.1e}"

    rows.append(("`load_state_dict` after optimize, same signature", "new weights' results", outcome(after_load)))

    def after_double():
        m.double()
        with torch.no_grad():
            diff = (opt(x.double()) - m(x.double())).abs().max().item()
        m.float()
        return f"max abs difference from the model {diff:.1e}"

    rows.append(("`model.double()` after optimize", "float64 results", outcome(after_double)))

    e = Elementwise()
    oe = fxopt.optimize(e, (x,))
    row("meta tensor after a CPU specialization", lambda: e(x.to("meta")), lambda: oe(x.to("meta")))
    row("meta tensor as the first call", lambda: e(x.to("meta")), lambda: fxopt.optimize(Elementwise())(x.to("meta")))
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        fake = torch.randn(4, 8)
    row("FakeTensor input", lambda: e(fake), lambda: oe(fake))

    class Tagged(torch.Tensor):
        pass

    row("tensor subclass input", lambda: e(x.as_subclass(Tagged)), lambda: oe(x.as_subclass(Tagged)))
    lin = nn.Linear(8, 4).eval()
    ol = fxopt.optimize(lin, (x,))
    row("a list where a tensor is expected", lambda: lin([x]), lambda: ol([x]))
    tl = TakesAList()
    row("a model that takes a list", lambda: tl([x, x]), lambda: fxopt.optimize(TakesAList())([x, x]))
    row("keyword argument `opt(input=x)`", lambda: lin(input=x), lambda: ol(input=x))
    row("unknown keyword", lambda: lin(x, nope=1), lambda: ol(x, nope=1))
    row("wrong dtype (float64 into float32 weights)", lambda: lin(x.double()), lambda: ol(x.double()))
    with tempfile.TemporaryDirectory() as d:
        big = torch.randn(8, 8)
        fxopt.save(fxopt.optimize(mlp(), (big,)), f"{d}/m.fxopt")
        loaded = fxopt.load(f"{d}/m.fxopt")
        with torch.no_grad():
            row("artifact saved at batch 8, called at batch 3", lambda: mlp()(torch.randn(3, 8)),
                lambda: loaded(torch.randn(3, 8)))
            row("artifact called with 5 features instead of 8", lambda: mlp()(torch.randn(3, 5)),
                lambda: loaded(torch.randn(3, 5)))
    rows += llama_rows()
    print("| misuse | eager | fxopt |")
    print("|---|---|---|")
    for what, a, b in rows:
        print(f"| {what} | {a} | {b} |")


if __name__ == "__main__":
    main()
