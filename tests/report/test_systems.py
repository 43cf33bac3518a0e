"""fxopt/report/systems.py on CPU: the ONNX Runtime system (export, session, error against eager, skipped without
onnxruntime), progress lines around slow first calls, Dynamo's cache kept across compiled systems."""

import dataclasses
import io
import json
import sys

import pytest
import torch

from fxopt import models
from fxopt.report import SYSTEMS, main
from fxopt.report import systems as systems_mod
from fxopt.report.progress import Progress

pytestmark = pytest.mark.usefixtures("no_plots")

FAST = ["--device", "cpu", "--iters", "3", "--warmup", "1", "--rounds", "3", "--block-ms", "0", "--no-trace"]


def _ctx(name="simple_cnn"):
    model, inputs = models.get(name).build(device=torch.device("cpu"), batch_size=1)
    ctx = systems_mod.Context(model, inputs, torch.device("cpu"))
    with torch.no_grad():
        ctx.reference = model(*inputs)
    return ctx


def test_onnxruntime_is_a_system_of_the_report(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["simple_cnn", *FAST, "--systems", "eager,onnxruntime", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "simple_cnn-cpu.json").read_text())
    ort = data["systems"]["onnxruntime"]
    assert ort["status"] == "ok", ort
    assert ort["label"] == "ONNX Runtime" and ort["label"] in ort["verdict"]
    assert isinstance(ort["max_rel_error"], float) and ort["max_rel_error"] < 1e-5
    assert ort["latency"]["median_us"] > 0 and ort["x_eager"] > 0
    # timed in the same rounds as eager, so its speedup is paired round by round
    assert len(ort["latency"]["round_medians_us"]) == len(data["systems"]["eager"]["latency"]["round_medians_us"])
    info = ort["info"]
    assert info["exporter"] == "torch.onnx.export(dynamo=False)" and info["providers"][0] == "CPUExecutionProvider"
    assert info["intra_op_threads"] == torch.get_num_threads() and info["onnx_bytes"] > 0
    assert not any("legacy TorchScript-based ONNX export" in w for w in ort["warnings"])  # chosen on purpose
    assert "ONNX Runtime" in capsys.readouterr().out


def test_onnxruntime_outputs_match_eager_for_several_outputs():
    pytest.importorskip("onnxruntime")

    class TwoOut(torch.nn.Module):
        def forward(self, x, y):
            return torch.relu(x) + y, torch.sigmoid(x * y)

    model, inputs = TwoOut().eval(), (torch.randn(2, 8), torch.randn(2, 8))
    ctx = systems_mod.Context(model, inputs, torch.device("cpu"))
    fn, info = systems_mod.build_onnxruntime(ctx)
    got, want = fn(*inputs), model(*inputs)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w)
    x2 = (torch.randn(2, 8), torch.randn(2, 8))  # new values each call, not the export's
    torch.testing.assert_close(fn(*x2)[0], model(*x2)[0])


def test_onnxruntime_without_the_package_is_skipped_with_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    prepared = systems_mod.prepare_system(SYSTEMS["onnxruntime"], _ctx("relu_sigmoid"))
    assert prepared.entry["status"] == "skipped" and prepared.fn is None
    assert prepared.entry["reason"].startswith("onnxruntime is not installed (pip install onnxruntime")


def _legacy_exporter_gone(monkeypatch):
    real = torch.onnx.export

    def legacy_broken(*args, dynamo=True, **kwargs):
        if not dynamo:
            raise RuntimeError("the TorchScript exporter is gone")
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", legacy_broken)
    return models.get("relu_sigmoid").build(device=torch.device("cpu"), batch_size=1)


def test_onnx_export_without_the_legacy_exporter_needs_onnxscript(monkeypatch):
    model, inputs = _legacy_exporter_gone(monkeypatch)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(RuntimeError, match=r"dynamo=False: RuntimeError: the TorchScript exporter is gone.*"
                                           r"needs onnxscript \(pip install onnxscript\)"):
        systems_mod.export_onnx(model, inputs)


@pytest.mark.slow
def test_onnx_export_falls_back_to_the_dynamo_exporter(monkeypatch):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    model, inputs = _legacy_exporter_gone(monkeypatch)
    data, exporter = systems_mod.export_onnx(model, inputs)
    assert exporter == "torch.onnx.export(dynamo=True)"
    assert [n.op_type for n in onnx.load_from_string(data).graph.node] == ["Relu", "Sigmoid"]


def test_a_slow_first_call_prints_lines_on_stderr_not_in_the_json(tmp_path, monkeypatch, capsys):
    def fake_compile(ctx):
        return ctx.model, {"mode": "default"}

    fake = dataclasses.replace(SYSTEMS["compile"], build=fake_compile, dynamo=False)
    monkeypatch.setitem(systems_mod.SYSTEMS, "compile", fake)
    assert main(["relu_sigmoid", *FAST, "--systems", "eager,compile", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "relu_sigmoid torch.compile: compiling (first call)...\n" in err
    assert "relu_sigmoid torch.compile: compiling (first call): done in " in err
    assert "compiling (first call)" not in (tmp_path / "relu_sigmoid-cpu.json").read_text()


def test_progress_lines_on_a_terminal_keep_the_bar_below_them():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    p = Progress(4, prefix="m ", stream=stream)
    p.step("torch.compile: build")
    with pytest.raises(ValueError):
        with p.slow("torch.compile: compiling (first call)"):
            raise ValueError("boom")
    shown = stream.getvalue()
    assert "m torch.compile: compiling (first call)...\n" in shown
    assert "m torch.compile: compiling (first call): failed after" in shown
    assert shown.rstrip(" ").endswith("torch.compile: build")  # the bar, redrawn after the last line
    quiet = systems_mod.NullProgress()  # run_report called from code: no lines
    quiet.stream = io.StringIO()
    with quiet.slow("x"):
        pass
    assert quiet.stream.getvalue() == ""


def test_building_a_compiled_system_keeps_the_other_ones_code(monkeypatch):
    # NOTE [One Dynamo cache for every system]: the builders clear counters only; a reset happens around the report
    calls = []
    monkeypatch.setattr(systems_mod.compiled_mod, "dynamo_reset", lambda: calls.append("reset"))
    monkeypatch.setattr(systems_mod.compiled_mod, "dynamo_counters_clear", lambda: calls.append("clear"))
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    systems_mod._build_compile(None)(_ctx("relu_sigmoid"))
    systems_mod._build_compile("reduce-overhead")(_ctx("relu_sigmoid"))
    assert calls == ["clear", "clear"]
