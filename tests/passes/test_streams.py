"""parallel_branches (fxopt/passes/streams.py) and its runtime (fxopt/runtime/streams.py).

CPU tests check the region finding, the rewrite and the runtime's protocol: the graph is annotated on the CPU, its
``meta["device"]`` then claims CUDA, and ``torch.cuda``'s streams and events are replaced by fakes that log what
happens, so the rewritten graph runs on CPU tensors. Tests marked ``cuda`` run it for real (python -m pytest -m cuda).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.passes import parallel_branches
from fxopt.passes import streams as pass_mod
from fxopt.passes.base import _collect
from fxopt.runtime import streams as runtime


class Inception(nn.Module):
    """Four branches from x, concatenated: googlenet's block in miniature."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.b1 = nn.Conv2d(c, 4, 1)
        self.b2a, self.b2b = nn.Conv2d(c, 4, 1), nn.Conv2d(4, 8, 3, padding=1)
        self.b3a, self.b3b = nn.Conv2d(c, 2, 1), nn.Conv2d(2, 4, 3, padding=1)
        self.b4 = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        a = F.relu(self.b1(x))
        b = F.relu(self.b2b(F.relu(self.b2a(x))))
        c = F.relu(self.b3b(F.relu(self.b3a(x))))
        d = F.relu(self.b4(F.max_pool2d(x, 3, 1, 1)))
        return torch.cat([a, b, c, d], 1)


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.i1, self.i2 = Inception(8), Inception(20)

    def forward(self, x):
        return self.i2(self.i1(F.relu(self.stem(x)))).mean((2, 3))


class Nested(nn.Module):
    """inception_v3's InceptionE: a branch that forks again inside (1x3 and 3x1 after a 1x1)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.b1 = nn.Conv2d(c, 4, 1)
        self.b2 = nn.Conv2d(c, 4, 1)
        self.b2_13, self.b2_31 = nn.Conv2d(4, 4, (1, 3), padding=(0, 1)), nn.Conv2d(4, 4, (3, 1), padding=(1, 0))
        self.b3 = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        b2 = F.relu(self.b2(x))
        b2 = torch.cat([self.b2_13(b2), self.b2_31(b2)], 1)
        return torch.cat([self.b1(x), b2, self.b3(x)], 1)


class Heads(nn.Module):
    """Parallel heads that meet only at the output."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(16, 32)
        self.h1, self.h2 = nn.Linear(32, 4), nn.Linear(32, 8)

    def forward(self, x):
        t = torch.relu(self.trunk(x))
        return self.h1(t), torch.sigmoid(self.h2(t))


def _as_cuda(gm):
    """Pretend the graph was annotated on cuda:0 (the rewrite reads only node.meta)."""
    for n in gm.graph.nodes:
        if n.meta.get("device") is not None:
            n.meta["device"] = torch.device("cuda", 0)
    return gm


def _captured(model, *inputs, cuda=True):
    gm = fxopt.capture(model.eval(), inputs)
    return _as_cuda(gm) if cuda else gm


class _FakeCuda:
    """torch.cuda's streams and events as plain objects that log: the runtime reads them through ``torch.cuda.*``
    at call time, so the rewritten graph runs on CPU tensors."""

    def __init__(self):
        self.log: list[str] = []
        self.main = self.Stream(name="main")
        self.current = self.main
        self.events = 0

    def Stream(self, device=None, priority=0, name=None):  # torch.cuda.Stream's spelling
        fake = self

        class _S:
            def __init__(self):
                self.name = name or f"side{sum(1 for k in runtime._side_streams)}"
                self.priority = priority

            def wait_event(self, event):
                fake.log.append(f"{self.name} waits {event.name}")

            def __repr__(self):
                return self.name

        return _S()

    def Event(self):
        fake = self

        class _E:
            name = None

            def record(self, stream):
                fake.events += 1
                self.name = f"e{fake.events}@{stream.name}"
                fake.log.append(f"record {self.name}")

        return _E()

    def set_stream(self, stream):
        self.current = stream
        self.log.append(f"current {stream.name}")


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(runtime, "_side_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", fake.Stream)
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.current)
    monkeypatch.setattr(torch.cuda, "set_stream", fake.set_stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    return fake


def _stream_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in runtime.RUNTIME_FUNCTIONS]


# ---------------------------------------------------------------------------------------------------------------
# finding regions
# ---------------------------------------------------------------------------------------------------------------
def test_finds_the_inception_block_and_keeps_the_heaviest_branch_on_the_callers_stream():
    x = torch.randn(1, 8, 10, 10)
    gm = _captured(Inception(), x)
    (region,) = pass_mod.find_regions(gm)
    assert region.reason is None
    assert region.fork.name == "x" and region.join.target is torch.cat
    assert [b.seed.name for b in region.branches] == ["b1", "b2a", "b3a", "max_pool2d"]
    assert region.main.seed.name == "b2a"  # the 3x3 conv 4 -> 8: most multiply-adds
    assert [b.seed.name for b in region.side] == ["b1", "b3a", "max_pool2d"]
    assert [len(b.nodes) for b in region.side] == [2, 4, 3]


def test_light_branches_and_residuals_are_not_regions():
    class Elementwise(nn.Module):
        def forward(self, x):
            return torch.sin(x) + torch.cos(x)  # two one-kernel branches: not worth a stream

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x) + x)  # the other "branch" is x itself

    assert pass_mod.find_regions(_captured(Elementwise(), torch.randn(4, 4))) == []
    assert pass_mod.find_regions(_captured(Residual(), torch.randn(1, 4, 6, 6))) == []


def test_nested_fork_stays_on_its_enclosing_branch():
    gm = _captured(Nested(), torch.randn(1, 8, 6, 6))
    regions = pass_mod.find_regions(gm)
    outer, inner = regions
    assert outer.reason is None and outer.fork.name == "x" and len(outer.branches) == 3
    assert inner.fork.name == "relu" and inner.reason == pass_mod._OVERLAPS


def test_in_place_op_inside_a_region_blocks_it():
    class InPlace(Inception):
        def forward(self, x):
            a = self.b1(x).relu_()
            b = self.b2b(self.b2a(x))
            return torch.cat([a, b], 1)

    (region,) = pass_mod.find_regions(_captured(InPlace(), torch.randn(1, 8, 6, 6)))
    assert region.reason is not None and "in-place" in region.reason


def test_cpu_graph_is_a_no_op_with_a_note():
    x = torch.randn(1, 8, 10, 10)
    gm = _captured(Inception(), x, cuda=False)
    code = gm.code
    with _collect(pass_mod.PASS_NAME) as log:
        result = parallel_branches(gm)
    assert not result.modified and gm.code == code
    assert any("runs on cpu" in n and "1 fork/join region(s) found" in n for n in log.notes), log.notes


# ---------------------------------------------------------------------------------------------------------------
# the rewrite
# ---------------------------------------------------------------------------------------------------------------
def _check_order(gm):
    """Each side branch is contiguous between its enter/exit; join comes after every exit and before any user of
    a side branch's output; the graph is topologically valid."""
    gm.graph.lint()
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    for join in [n for n in nodes if n.target is runtime.join]:
        fork, *exits = join.args
        for ex in exits:
            enter = ex.args[0]
            assert enter.target is runtime.enter_branch and enter.args[0] is fork
            assert pos[fork] < pos[enter] < pos[ex] < pos[join]
            inside = nodes[pos[enter] + 1:pos[ex]]
            assert inside and all(n.op != "placeholder" and n.target not in runtime.RUNTIME_FUNCTIONS for n in inside)
            for n in inside:  # a value made on the side stream is read on the caller's stream only after the join
                for user in n.users:
                    assert user in inside or user is ex or pos[user] > pos[join], (n, user)
            for out in ex.args[1:]:
                assert out in inside


def test_rewrite_inception_block(fake_cuda):
    x = torch.randn(1, 8, 10, 10)
    model = Inception().eval()
    gm = _captured(model, x)
    with _collect(pass_mod.PASS_NAME) as log:
        result = parallel_branches(gm)
    assert result.modified
    assert dict(log.counts) == {"regions": 1, "side_branches": 3, "nodes_moved": 9}
    _check_order(gm)
    kinds = [n.target.__name__ for n in _stream_nodes(gm)]
    assert kinds == ["fork", "enter_branch", "exit_branch"] * 1 + ["enter_branch", "exit_branch"] * 2 + ["join"]
    join = _stream_nodes(gm)[-1]
    assert [n.name for n in join.kwargs["inputs"]] == ["x"]  # held until the caller's stream has waited
    assert all(n.meta.get("fxopt_from_pass") == "parallel_branches" for n in _stream_nodes(gm))

    where = {}  # the stream each convolution was launched on
    hooks = [gm.get_submodule(name).register_forward_pre_hook(
        lambda m, a, name=name: where.__setitem__(name, str(fake_cuda.current)))
        for name in ("b1", "b2a", "b2b", "b3a", "b3b", "b4")]
    out = gm(x)
    for h in hooks:
        h.remove()  # the graph shares its submodules with the model
    torch.testing.assert_close(out, model(x))
    assert where == {"b1": "side0", "b3a": "side1", "b3b": "side1", "b4": "side2", "b2a": "main", "b2b": "main"}
    assert fake_cuda.current is fake_cuda.main
    assert fake_cuda.log == [
        "record e1@main",
        "side0 waits e1@main", "current side0", "record e2@side0", "current main",
        "side1 waits e1@main", "current side1", "record e3@side1", "current main",
        "side2 waits e1@main", "current side2", "record e4@side2", "current main",
        "main waits e2@side0", "main waits e3@side1", "main waits e4@side2",
    ]
    assert runtime._open_branches() == []


def test_rewrite_two_blocks_parallel_heads_and_nested(fake_cuda):
    for model, x, regions in [(TwoBlocks(), torch.randn(2, 3, 8, 8), 2), (Heads(), torch.randn(3, 16), 1),
                              (Nested(), torch.randn(1, 8, 6, 6), 1)]:
        model.eval()
        gm = _captured(model, x)
        with _collect(pass_mod.PASS_NAME) as log:
            assert parallel_branches(gm).modified
        assert log.counts["regions"] == regions
        _check_order(gm)
        torch.testing.assert_close(gm(x), model(x))
        assert fake_cuda.current is fake_cuda.main


def test_side_streams_are_created_once_per_device_priority_and_index(fake_cuda):
    gm = _captured(TwoBlocks(), torch.randn(1, 3, 8, 8))
    parallel_branches(gm)
    for _ in range(3):
        gm(torch.randn(1, 3, 8, 8))
    assert sorted(runtime._side_streams) == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]


def test_guard_restores_the_callers_stream_after_an_exception_in_a_branch(fake_cuda):
    def broken():
        f = runtime.fork(0)
        runtime.enter_branch(f, 0)
        raise RuntimeError("out of memory in a branch")

    with pytest.raises(RuntimeError, match="out of memory"):
        runtime.guard(broken)()
    assert fake_cuda.current is fake_cuda.main and runtime._open_branches() == []


# ---------------------------------------------------------------------------------------------------------------
# opting in
# ---------------------------------------------------------------------------------------------------------------
def test_opt_in_by_enable_or_by_name_and_not_in_the_default_pipeline():
    assert "parallel_branches" not in fxopt.passes.pass_names()
    assert "parallel_branches" in [p.name for p in fxopt.passes.optional_passes()]
    x = torch.randn(1, 8, 10, 10)
    opt = fxopt.optimize(Inception(), [x], enable=["parallel_branches"])
    rec = opt.records[-1]
    assert rec.name == "parallel_branches" and rec.status == "unchanged"
    assert any("CUDA streams only" in n for n in rec.notes)
    opt = fxopt.optimize(Inception(), [x], passes=["remove_dropout", "parallel_branches"])
    assert [r.name for r in opt.records] == ["remove_dropout", "parallel_branches"]


def test_opt_in_errors():
    with pytest.raises(ValueError, match="not an opt-in pass"):
        fxopt.optimize(Inception(), enable=["fuse_elementwise"])
    with pytest.raises(ValueError, match="must be the last pass"):
        fxopt.optimize(Inception(), passes=["parallel_branches", "remove_dead_code"])


# ---------------------------------------------------------------------------------------------------------------
# GPU (python -m pytest -m cuda)
# ---------------------------------------------------------------------------------------------------------------
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def _fp32(request, monkeypatch):
    """GPU tests compare in true float32 (TF32 off): the rewrite moves kernels, it must not change a bit of them."""
    if "cuda" in request.keywords:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _cuda_model(model, *shape):
    torch.manual_seed(0)
    model = model.cuda().eval()
    return model, torch.randn(*shape, device="cuda")


def _applied(opt):
    rec = {r.name: r for r in opt.records}["parallel_branches"]
    assert rec.status == "applied", (rec.status, rec.error, rec.notes)
    return rec


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_inception_matches_eager(cuda_graphs):
    model, x = _cuda_model(TwoBlocks(), 2, 3, 16, 16)
    opt = fxopt.optimize(model, [x], enable=["parallel_branches"], cuda_graphs=cuda_graphs, strict=True)
    assert _applied(opt).changes["regions"] == 2
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn_like(x)
            torch.testing.assert_close(opt(x), model(x), **TOL)
    if cuda_graphs:
        assert opt.graph_entries and all(e.captured for e in opt.graph_entries), opt.graph_report()


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_callers_own_stream(cuda_graphs):
    model, x = _cuda_model(TwoBlocks(), 1, 3, 16, 16)
    opt = fxopt.optimize(model, [x], enable=["parallel_branches"], cuda_graphs=cuda_graphs, strict=True)
    _applied(opt)
    mine = torch.cuda.Stream()
    with torch.no_grad():
        want = model(x)
        mine.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(mine):
            assert torch.cuda.current_stream() == mine
            outs = [opt(x) for _ in range(5)]
            assert torch.cuda.current_stream() == mine  # the caller's stream is current again after every call
        torch.cuda.current_stream().wait_stream(mine)
    for out in outs:
        torch.testing.assert_close(out, want, **TOL)


@pytest.mark.cuda
def test_cuda_branches_run_on_side_streams(tmp_path):
    """The profiler sees the kernels of one call on the caller's stream and on side streams."""
    model, x = _cuda_model(Inception(), 1, 8, 14, 14)
    opt = fxopt.optimize(model, [x], enable=["parallel_branches"], strict=True)
    _applied(opt)

    def kernel_streams(fn):
        with torch.no_grad():
            fn(x)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn(x)
                torch.cuda.synchronize()
        path = tmp_path / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
        return {e.get("args", {}).get("stream") for e in events if e.get("cat") == "kernel"}

    assert len(kernel_streams(opt)) >= 2
    assert len(kernel_streams(fxopt.optimize(model, [x]))) == 1


@pytest.mark.cuda
def test_cuda_forked_capture_of_the_rewritten_graph():
    """The rewritten graph inside a plain torch.cuda.graph capture: side streams fork from and join the capture."""
    model, x = _cuda_model(Inception(), 1, 8, 14, 14)
    opt = fxopt.optimize(model, [x], enable=["parallel_branches"], strict=True)
    _applied(opt)
    run = opt.specializations[0].run
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        run(static)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = run(static)
    for _ in range(3):
        static.copy_(torch.randn_like(static))
        graph.replay()
        with torch.no_grad():
            torch.testing.assert_close(out, model(static), **TOL)


@pytest.mark.cuda
def test_cuda_outputs_survive_allocator_reuse():
    """Branch outputs read after the join and branch inputs dropped by the caller stay intact while other work
    allocates (NOTE [Stream memory safety])."""
    model, x = _cuda_model(TwoBlocks(), 4, 3, 32, 32)
    opt = fxopt.optimize(model, [x], enable=["parallel_branches"], strict=True)
    _applied(opt)
    with torch.no_grad():
        for i in range(20):
            x = torch.randn(4, 3, 32, 32, device="cuda")
            want = model(x)
            got = opt(x.clone())  # the only reference to the input is the graph's
            junk = [torch.randn(4, 20, 32, 32, device="cuda") for _ in range(4)]  # reuse freed blocks
            torch.testing.assert_close(got, want, **TOL)
            del junk


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_googlenet(cuda_graphs):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    opt = fxopt.optimize(model, [x], enable=["parallel_branches"], cuda_graphs=cuda_graphs)
    assert _applied(opt).changes["regions"] == 9  # the nine inception blocks
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), **TOL)


def test_without_streams_is_the_same_computation_on_one_stream(fake_cuda):
    """What fxopt.save exports: the rewritten graph minus its stream calls (an exported program holds no streams)."""
    x = torch.randn(1, 8, 10, 10)
    model = Inception().eval()
    gm = _captured(model, x)
    assert parallel_branches(gm).modified and _stream_nodes(gm)
    plain = runtime.without_streams(gm)
    assert _stream_nodes(plain) == [] and _stream_nodes(gm)  # the original keeps its streams
    assert "fork" in gm.code and "fork" not in plain.code  # and its own code
    plain.graph.lint()
    before = len(fake_cuda.log)
    torch.testing.assert_close(plain(x), model(x))
    assert len(fake_cuda.log) == before  # no stream or event touched
    torch.export.export(plain, (x,), strict=False)  # and it exports
