"""NVTX ranges named for graph nodes (runtime/nvtx.py, NOTE [NVTX ranges]): off by default and then absent from the
runner; on, one balanced range per launching node in execution order, and one per CUDA-graph replay.

The NVTX tests record what the runner pushes by replacing ``torch.cuda.nvtx.range_push`` / ``range_pop`` (and
taking the NVTX kind of range, which a CPU build of torch would not); the profiler test uses what a CPU build
really emits, ``torch.profiler`` ranges.
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.launches import static_count
from fxopt.models import build_any
from fxopt.ops import launches_kernel
from fxopt.runtime import nvtx as nvtx_mod
from fxopt.runtime.cudagraph import CUDAGraphRunner, _Entry
from fxopt.runtime.lower import lower_for_execution
from fxopt.runtime.nvtx import nvtx, range_name


@pytest.fixture(autouse=True)
def _switch_off(monkeypatch):
    """Every test starts with the switch as a user who never touched it has it, and leaves it so."""
    monkeypatch.delenv(nvtx_mod.ENV, raising=False)
    monkeypatch.setattr(nvtx_mod, "_override", None)


class Recorder:
    """Stands in for torch.cuda.nvtx's range_push / range_pop: records every call, returns NVTX's depths."""

    def __init__(self):
        self.events: list[tuple[str, str | None]] = []
        self.depth = 0

    def push(self, msg):
        self.events.append(("push", msg))
        self.depth += 1
        return self.depth - 1

    def pop(self):
        self.events.append(("pop", None))
        self.depth -= 1
        return self.depth

    @property
    def pushed(self) -> list[str]:
        return [m for kind, m in self.events if kind == "push"]

    def assert_balanced(self) -> None:
        depth = 0
        for kind, _ in self.events:
            depth += 1 if kind == "push" else -1
            assert depth >= 0, f"a pop without its push: {self.events}"
        assert depth == 0 and self.depth == 0, f"{depth} ranges left open: {self.events}"


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(nvtx_mod, "range_kind", lambda: "nvtx")
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", rec.push)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", rec.pop)
    return rec


def launching_names(gm):
    return [range_name(n, gm) for n in gm.graph.nodes if launches_kernel(n, gm)]


# -- the switch --------------------------------------------------------------------------------------------------------
def test_switch_is_off_by_default_and_reads_the_environment(monkeypatch):
    assert not nvtx_mod.enabled()
    for value, on in [("1", True), ("true", True), ("ON", True), ("0", False), ("off", False), ("", False)]:
        monkeypatch.setenv("FXOPT_NVTX", value)
        assert nvtx_mod.enabled() is on, value
    monkeypatch.setenv("FXOPT_NVTX", "2")
    with pytest.raises(ValueError, match=r"FXOPT_NVTX='2'.*expected 1 .* or 0"):
        nvtx_mod.enabled()


def test_api_is_a_setter_and_a_context_manager(monkeypatch):
    nvtx(True)
    assert nvtx_mod.enabled()
    with nvtx(False):
        assert not nvtx_mod.enabled()
        with nvtx():
            assert nvtx_mod.enabled()
        assert not nvtx_mod.enabled()
    assert nvtx_mod.enabled()  # the setter's True again
    monkeypatch.setenv("FXOPT_NVTX", "1")
    nvtx(False)
    assert not nvtx_mod.enabled()  # the API wins over the environment
    nvtx(None)
    assert nvtx_mod.enabled()  # None: the environment decides again
    with pytest.raises(TypeError, match="True, False or None"):
        nvtx(1)


# -- off ---------------------------------------------------------------------------------------------------------------
def test_off_pushes_nothing_and_leaves_the_runner_unchanged(recorder, monkeypatch):
    model, inputs = build_any("small_resnet")
    opt = fxopt.optimize(model, inputs)
    gm, runner = opt._last.graph_module, opt._last.runner
    code = runner.code
    assert "nvtx" not in code and "fxopt_nvtx_ranges" not in runner.meta
    with torch.no_grad():
        opt(*inputs)
    assert recorder.events == []
    monkeypatch.setenv("FXOPT_NVTX", "0")
    assert lower_for_execution(gm).code == code
    with nvtx():
        on = lower_for_execution(gm)
    assert on.code != code and "nvtx_" in on.code
    assert lower_for_execution(gm).code == code  # the context ended: off again, the same runner as before
    assert recorder.events == []  # lowering itself pushes nothing


# -- on ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["small_resnet", "mlp_block", "transformer_encoder"])
def test_ranges_are_the_launching_nodes_in_execution_order(recorder, name):
    model, inputs = build_any(name)
    with nvtx():
        opt = fxopt.optimize(model, inputs)
    recorder.events.clear()  # what optimizing ran (it may run the runner to check it)
    gm, runner = opt._last.graph_module, opt._last.runner
    expected = launching_names(gm)
    assert len(expected) == static_count(gm) > 0
    assert runner.meta["fxopt_nvtx_ranges"] == expected
    with torch.no_grad():
        got, want = opt(*inputs), model(*inputs)
    torch.testing.assert_close(got, want)  # the ranges change no result
    assert recorder.pushed == expected
    assert recorder.events == [e for n in expected for e in (("push", n), ("pop", None))]  # one each, not nested
    with torch.no_grad():
        opt(*inputs)
    assert recorder.pushed == expected * 2


def test_names_say_module_op_and_kernel(recorder):
    model, inputs = build_any("small_resnet")
    with nvtx():
        opt = fxopt.optimize(model, inputs)
    names = opt._last.runner.meta["fxopt_nvtx_ranges"]
    # BatchNorm folded into stem.0 (the node now calls a new module): the name is still the model's path
    assert names[:2] == ["stem.0 (Conv2d)", "stem.2 (ReLU)"]
    assert names[-1] == "fc (Linear)"
    kernels = [n for n in names if n.endswith("[fxopt kernel]")]
    assert len(kernels) == 3  # the residual add + ReLU of each block, the last with the global average pool
    assert names[-2] == kernels[-1] and "_rows_add_relu_mean_" in kernels[-1]
    for n in kernels:
        node_name, kernel = re.fullmatch(r"(fused(?:_\d|_rows)?) \((\w+)\) \[fxopt kernel\]", n).groups()
        assert opt.kernels[node_name].name == kernel and "add_relu" in kernel  # opt.kernels: by node name
    assert len(set(names)) == len(names)  # every node its own name: module paths, fused, fused_1, fused_rows
    assert "fused_1 (" in opt._last.runner.code and "'fused_1 (" in opt._last.runner.code  # visible in its code


class Shaped(nn.Module):
    """symbolic_trace cannot take the branch on a shape; torch.export can, and records module stack and source."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[0] > 0:
            y = y * 2
        z = torch.sigmoid(y).mean((2, 3))  # one row kernel with its prologue (fuse_reductions)
        z = torch.cumsum(z, 1)  # no fusion takes it: a launching node of its own
        return torch.relu(self.lin(z) + 1)


def test_exported_nodes_are_named_from_module_stack_and_source_line(recorder):
    model, x = Shaped().eval(), torch.randn(1, 3, 8, 8)
    with nvtx():
        opt = fxopt.optimize(model, (x,))
    recorder.events.clear()  # what optimizing ran (it may run the runner to check it)
    assert opt.capture_info.method == "export"
    lines, start = inspect.getsourcelines(Shaped.forward)
    line = {key: start + i for i, text in enumerate(lines) for key in ("self.conv(x)", "cumsum(", "self.lin(z)")
            if key in text}
    names = opt._last.runner.meta["fxopt_nvtx_ranges"]
    assert f"conv (conv2d) @ test_nvtx.py:{line['self.conv(x)']}" in names  # not torch's conv.py frame
    assert f"lin (linear) @ test_nvtx.py:{line['self.lin(z)']}" in names
    assert f"cumsum (cumsum) @ test_nvtx.py:{line['cumsum(']}" in names  # no submodule: the node's name
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    assert recorder.pushed == names == launching_names(opt._last.graph_module)


class Boom(nn.Module):
    fail = False  # on the class: fxopt runs a copy of the model's module tree

    def forward(self, x):
        if Boom.fail:
            raise RuntimeError("boom")
        return x * 3


class WithLeafAndMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.boom = Boom()

    def forward(self, x):
        return self.boom(self.fc(x).cumsum(1)).sigmoid()


def test_module_and_method_nodes_get_ranges_and_stay_balanced_when_a_node_raises(recorder):
    model, x = WithLeafAndMethod().eval(), torch.randn(2, 8)
    with nvtx():
        opt = fxopt.optimize(model, (x,), leaf_modules=[Boom])
    recorder.events.clear()  # what optimizing ran (it may run the runner to check it)
    gm, runner = opt._last.graph_module, opt._last.runner
    assert [n.op for n in gm.graph.nodes if launches_kernel(n, gm)] == ["call_module", "call_method", "call_module",
                                                                       "call_method"]
    names = runner.meta["fxopt_nvtx_ranges"]
    assert names == ["fc (Linear)", "cumsum (cumsum)", "boom (Boom)", "sigmoid (sigmoid)"]
    assert "self.boom" in runner.code  # the leaf is still called as the module it is
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    assert recorder.pushed == names
    recorder.assert_balanced()

    recorder.events.clear()
    Boom.fail = True
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
            opt(x)
    finally:
        Boom.fail = False
    assert recorder.pushed == names[:3]  # the leaf raised inside its own range ...
    recorder.assert_balanced()  # ... which was closed on the way out

    recorder.events.clear()
    with torch.no_grad(), pytest.raises(RuntimeError):
        runner(torch.randn(2, 8, dtype=torch.float64))  # the first node, a GEMM, refuses float64 with float32 weights
    assert recorder.pushed == names[:1]
    recorder.assert_balanced()


# -- what a CPU build of torch emits -----------------------------------------------------------------------------------
@pytest.mark.skipif(nvtx_mod.range_kind() != "record_function", reason="a CUDA build emits NVTX ranges instead")
def test_profiler_trace_shows_node_ranges_around_their_ops(tmp_path):
    model, inputs = build_any("small_resnet")
    with nvtx():
        opt = fxopt.optimize(model, inputs)
    names = opt._last.runner.meta["fxopt_nvtx_ranges"]
    with torch.no_grad():
        opt(*inputs)  # warm
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt(*inputs)
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    ranges = sorted((e for e in events if e["name"] in names), key=lambda e: e["ts"])
    assert [e["name"] for e in ranges] == names  # every node once, in execution order
    convs = sorted((e for e in events if e["name"] == "aten::conv2d"), key=lambda e: e["ts"])
    conv_ranges = [e for e in ranges if "(Conv2d)" in e["name"]]
    assert len(convs) == len(conv_ranges) > 0
    for op, rng in zip(convs, conv_ranges):  # each convolution sits inside its node's range
        assert rng["ts"] <= op["ts"] and op["ts"] + op["dur"] <= rng["ts"] + rng["dur"], (rng["name"], op, rng)


# -- CUDA-graph replays ------------------------------------------------------------------------------------------------
def _captured_entry() -> _Entry:
    entry = _Entry(("key",), "float32[1, 8]@cuda:0", 0, None)
    entry.status = "captured"
    return entry


def test_each_graph_replay_runs_in_one_range_named_for_its_signature(recorder, monkeypatch):
    calls = []

    def replay(args):
        calls.append(list(recorder.events))  # what was open while the graph launched
        return "out"

    replay.native = ["the native call"]  # what tests of the native graph call read from the closure
    monkeypatch.setattr(CUDAGraphRunner, "_replay_closure", lambda self, entry, b, args=(): replay)
    runner = CUDAGraphRunner(lambda x: x)
    assert runner._closure(_captured_entry(), None) is replay  # off: the closure itself
    with nvtx():
        run = runner._closure(_captured_entry(), None)
    assert run is not replay and run.native is replay.native
    assert run(("x",)) == "out" and run(("x",)) == "out"
    name = "CUDA graph replay: float32[1, 8]@cuda:0"
    assert calls[0] == [("push", name)]
    assert recorder.events == [("push", name), ("pop", None)] * 2


# -- on a GPU ----------------------------------------------------------------------------------------------------------
GPU_TOL = dict(rtol=1e-3, atol=1e-3)  # TF32 convolutions and matmuls, as tests/gpu compare


@pytest.mark.cuda
def test_nvtx_ranges_on_cuda_with_graphs(recorder):
    model, inputs = build_any("small_resnet", device="cuda")
    with torch.no_grad():
        want = model(*inputs)
    with nvtx():  # on while the runner is lowered (optimize) and while the replay is set up (the first call)
        opt = fxopt.optimize(model, inputs, cuda_graphs=True)
        with torch.no_grad():  # the capture: warm-up, capture and its check run the node ranges
            torch.testing.assert_close(opt(*inputs), want, **GPU_TOL)
    names = opt._last.runner.meta["fxopt_nvtx_ranges"]
    assert names == launching_names(opt._last.graph_module)
    recorder.assert_balanced()
    assert set(recorder.pushed) >= set(names)
    recorder.events.clear()
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(opt(*inputs), want, **GPU_TOL)
    (entry,) = opt._graphs.entries()
    assert entry.captured, entry.reason
    assert recorder.pushed == [f"CUDA graph replay: {entry.signature}"] * 3  # replays emit no node ranges


@pytest.mark.cuda
def test_real_nvtx_calls_run_on_a_cuda_build():
    assert nvtx_mod.range_kind() == "nvtx"
    model, inputs = build_any("small_resnet", device="cuda")
    with nvtx():
        opt = fxopt.optimize(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(opt(*inputs), model(*inputs), **GPU_TOL)
