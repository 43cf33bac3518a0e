"""The report's content and its failure modes, on CPU: JSON schema, Markdown tables, optional dependencies missing,
a system that fails, ``--all``. Slow systems (torch.compile, Inductor) are skipped to keep these fast."""

import dataclasses
import io
import json
import re
import shutil
import sys
import types

import pytest

from fxopt.passes import pass_names
from fxopt.report import SCHEMA, SYSTEMS, TOP_LEVEL_KEYS, main
from fxopt.report import systems as systems_mod
from fxopt.report.progress import Progress
from fxopt.report.render import verdict

FAST = ["--device", "cpu", "--skip", "slow", "--iters", "3", "--warmup", "1", "--rounds", "3", "--block-ms", "0"]


def _run(tmp_path, model="relu_sigmoid", *extra):
    assert main([model, *FAST, "--out", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / f"{model}-cpu.json").read_text())


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@pytest.mark.usefixtures("no_plots")
def test_json_schema_for_a_zoo_model(tmp_path, capsys):
    data = _run(tmp_path, "simple_cnn")
    assert data["schema"] == SCHEMA
    assert set(TOP_LEVEL_KEYS) <= set(data)
    env = data["environment"]
    for key in ("date", "torch", "device", "device_name", "driver", "python", "fxopt"):
        assert key in env
    assert env["device"] == "cpu" and env["driver"] is None and env["torch"]
    assert data["inputs"] == [{"shape": [1, 3, 32, 32], "dtype": "float32", "device": "cpu"}]
    assert data["settings"]["iters"] == 3 and data["settings"]["systems"][0] == "eager"

    assert list(data["systems"]) == list(SYSTEMS)
    for name, s in data["systems"].items():
        assert s["status"] in ("ok", "failed", "skipped"), name
        assert isinstance(s["verdict"], str) and s["label"] in s["verdict"]
    rounds = data["settings"]["rounds_run"]
    assert rounds == 3 and data["settings"]["timing"].startswith("interleaved")
    for name in ("eager", "torchscript", "fxopt"):
        s = data["systems"][name]
        assert s["status"] == "ok", s
        for key in ("median_us", "p99_us", "min_us", "median_all_us"):
            assert _number(s["latency"][key]) and s["latency"][key] > 0
        assert s["latency"]["calls"] == 3 and len(s["latency"]["round_medians_us"]) == rounds
        assert s["latency"]["median_us"] == sorted(s["latency"]["round_medians_us"])[1]
        assert isinstance(s["unstable"], bool)
        assert _number(s["first_call_s"]) and _number(s["build_s"])
        assert isinstance(s["launches"]["dispatched"], int)
        assert s["launches"]["cuda_kernels"] is None and s["peak_memory_bytes"] is None  # CPU: n/a
        assert _number(s["max_rel_error"]) and s["max_rel_error"] < 1e-4
        assert _number(s["x_eager"]) and s["x_floor"] is None
    for name in ("torchscript", "fxopt"):  # a speedup is the median of the per-round ratios, paired with eager's
        s, e = data["systems"][name], data["systems"]["eager"]
        ratios = sorted(a / b for a, b in zip(e["latency"]["round_medians_us"], s["latency"]["round_medians_us"]))
        assert s["x_eager"] == pytest.approx(ratios[1])
        assert s["x_eager_spread"]["min"] == pytest.approx(ratios[0])
    assert data["systems"]["fxopt"]["launches"]["static"] == 8
    fuse = next(p for p in data["passes"] if p["name"] == "fuse_epilogues")
    assert any("2 convolution(s) on CPU left as they are" in n and "cuDNN's, CUDA only" in n for n in fuse["notes"])
    assert not any("need CUDA and float32" in n for n in fuse["notes"])  # the CUDA wording is for CUDA only
    assert data["settings"]["native_call"].startswith("ready"), data["settings"]["native_call"]
    assert data["environment"]["git_describe"] and data["model_source"] == "zoo:simple_cnn"
    for name in ("compile_reduce_overhead", "fxopt_cudagraphs", "tensorrt"):
        assert data["systems"][name]["status"] == "skipped"
        assert data["systems"][name]["reason"].startswith("needs CUDA")
    for name in ("compile", "fxopt_inductor"):
        assert data["systems"][name]["reason"].startswith("not requested")

    assert [p["name"] for p in data["passes"]] == pass_names()
    for p in data["passes"]:
        assert isinstance(p["static_after"], int) and _number(p["seconds"]) and isinstance(p["changes"], dict)
    assert data["captured_launches"] == {"static": 9, "dispatched": 9}

    floor = data["floor"]
    assert floor["available"] is False and "CUDA" in floor["reason"] and floor["total_us"] is None
    assert floor["launching_nodes"] == 8 and floor["bytes"] > 0
    assert floor["flops"] == 2 * (32 * 3 * 9 * 32 * 32 + 64 * 32 * 9 * 16 * 16 + 4096 * 128 + 128 * 10)

    assert isinstance(data["verdicts"], list) and all(isinstance(v, str) for v in data["verdicts"])
    assert data["files"]["json"] == "simple_cnn-cpu.json" and data["files"]["trace"] == "simple_cnn-cpu-trace.json"
    for name in data["files"].values():
        assert (tmp_path / name).is_file(), name
    trace = json.loads((tmp_path / "simple_cnn-cpu-trace.json").read_text())
    assert trace["traceEvents"]
    assert "def forward" in data["code"]


@pytest.mark.usefixtures("no_plots")
def test_markdown_holds_the_tables(tmp_path, capsys):
    data = _run(tmp_path, "relu_sigmoid")
    md = (tmp_path / "relu_sigmoid-cpu.md").read_text()
    assert md.startswith("# relu_sigmoid: fxopt report")
    for section in ("## Verdict", "## Inference time", "## Systems", "## Floor", "## Passes", "## Fused kernels",
                    "## Optimized graph"):
        assert section in md, section
    assert "| Method" in md and "| Original model" in md and "| TorchScript" in md and "| TensorRT" in md
    assert "| system" in md and "| median µs" in md.replace("  ", " ")
    assert "| pass" in md and "| fuse_elementwise" in md
    kernel = data["kernels"]["fused"]
    assert kernel["ops"] == ["relu", "sigmoid"] and kernel["bytes"] == 2 * 1024 * 4
    assert kernel["name"] in md and "8.0 KiB" in md
    for v in data["verdicts"]:
        assert f"- {v}" in md
    out = capsys.readouterr().out  # the terminal gets the same tables
    assert "median µs" in out and "fuse_elementwise" in out and "fxopt:" in out


def _hide(monkeypatch, *packages):
    """Make ``import package`` (and its submodules) raise ImportError, as if it were not installed."""
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            monkeypatch.setitem(sys.modules, name, None)
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_matplotlib_and_pydot_degrade_to_fewer_files_and_notes(tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, "matplotlib", "pydot")
    data = _run(tmp_path)
    written = {p.name for p in tmp_path.iterdir()}
    assert not any(name.endswith((".png", ".svg")) for name in written), written
    assert {"relu_sigmoid-cpu.json", "relu_sigmoid-cpu.md", "relu_sigmoid-cpu-graph-before.dot",
            "relu_sigmoid-cpu-graph-after.dot"} <= written
    notes = " ".join(data["notes"])
    assert "matplotlib is not installed: no plots" in notes
    assert "matplotlib is not installed: the graphs are written as Graphviz .dot text only" in notes
    assert "pydot is not installed" in notes
    assert "## Notes" in (tmp_path / "relu_sigmoid-cpu.md").read_text()
    dot = (tmp_path / "relu_sigmoid-cpu-graph-after.dot").read_text()
    assert dot.startswith("digraph fxopt {") and "#ffa94d" in dot  # the fused kernel, coloured


def test_pydot_without_graphviz_is_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pydot", types.ModuleType("pydot"))
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "dot" else real_which(name, *a, **k))
    data = _run(tmp_path, "relu_sigmoid", "--systems", "eager,fxopt", "--no-trace")
    assert any("Graphviz's dot program is not installed" in n for n in data["notes"])
    assert "graph_after_dot" in data["files"]


def test_plots_and_graph_pictures_with_matplotlib(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = _run(tmp_path, "small_resnet", "--systems", "eager,fxopt", "--no-trace")
    for kind in ("plot_latency_png", "plot_latency_svg", "plot_passes_png", "plot_passes_svg", "graph_before_svg",
                 "graph_after_svg"):
        path = tmp_path / data["files"][kind]
        assert path.stat().st_size > 1000, kind
    before = (tmp_path / data["files"]["graph_before_svg"]).read_text()
    assert "<svg" in before and "layer1_bn1" in before
    md = (tmp_path / "small_resnet-cpu.md").read_text()
    assert "![latency per system, with the floor](small_resnet-cpu-latency.svg)" in md


@pytest.mark.usefixtures("no_plots")
def test_a_failing_system_gets_a_row_with_its_error(tmp_path, monkeypatch, capsys):
    def boom(ctx):
        raise RuntimeError("torchscript exploded\nsecond line")

    def bad_call(ctx):
        def fn(*args):
            raise ValueError("cannot run this")
        return fn, {}

    monkeypatch.setitem(systems_mod.SYSTEMS, "torchscript", dataclasses.replace(SYSTEMS["torchscript"], build=boom))
    monkeypatch.setitem(systems_mod.SYSTEMS, "fxopt", dataclasses.replace(SYSTEMS["fxopt"], build=bad_call))
    data = _run(tmp_path, "relu_sigmoid")
    ts = data["systems"]["torchscript"]
    assert ts["status"] == "failed" and ts["stage"] == "build"
    assert ts["error"] == "RuntimeError: torchscript exploded" and "Traceback" in ts["traceback"]
    assert ts["latency"] is None and ts["verdict"] == "TorchScript: failed at build: RuntimeError: torchscript exploded"
    fx = data["systems"]["fxopt"]
    assert fx["status"] == "failed" and fx["stage"] == "first call" and "cannot run this" in fx["error"]
    # the analysis optimizes on its own when the fxopt row failed
    assert [p["name"] for p in data["passes"]] == pass_names()
    assert data["systems"]["eager"]["status"] == "ok"
    md = (tmp_path / "relu_sigmoid-cpu.md").read_text()
    assert "failed (build): RuntimeError: torchscript exploded" in md
    assert "TorchScript: failed at build" in capsys.readouterr().out


@pytest.mark.usefixtures("no_plots")
def test_a_system_raising_skip_is_skipped(tmp_path, monkeypatch, capsys):
    def not_here(ctx):
        raise systems_mod.Skip("torch_tensorrt is not installed (pip install torch-tensorrt)")

    fake = dataclasses.replace(SYSTEMS["tensorrt"], build=not_here, needs_cuda=False)
    monkeypatch.setitem(systems_mod.SYSTEMS, "tensorrt", fake)
    assert main(["relu_sigmoid", "--device", "cpu", "--iters", "2", "--systems", "eager,tensorrt", "--no-trace",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "relu_sigmoid-cpu.json").read_text())
    trt = data["systems"]["tensorrt"]
    assert trt["status"] == "skipped" and "not installed" in trt["reason"]
    md = (tmp_path / "relu_sigmoid-cpu.md").read_text()
    assert re.search(r"\| TensorRT +\| -", md) and "torch_tensorrt is not installed" in md


@pytest.mark.usefixtures("no_plots")
def test_all_writes_an_index(tmp_path, capsys):
    assert main(["--all", "--models", "relu_sigmoid,elementwise_chain", *FAST, "--systems", "eager,fxopt",
                 "--no-trace", "--out", str(tmp_path)]) == 0
    index = (tmp_path / "index.md").read_text()
    assert index.startswith("# fxopt reports")
    assert "[relu_sigmoid-cpu.md](relu_sigmoid-cpu.md)" in index
    assert "[elementwise_chain-cpu.md](elementwise_chain-cpu.md)" in index
    assert "| model" in index and "16 -> 1 dispatched ops" in index
    summary = json.loads((tmp_path / "index.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["relu_sigmoid", "elementwise_chain"]
    assert (tmp_path / "elementwise_chain-cpu.json").is_file()
    out = capsys.readouterr().out
    assert "== relu_sigmoid" in out and "wrote" in out and "index.md" in out


def test_progress_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress(4, prefix="m ", stream=stream)
        p.step("eager: latency")
        p.step("fxopt: build")
        p.close()
    shown = tty.getvalue()
    assert "\r" in shown and "[##########..........] 2/4" in shown and "fxopt: build" in shown
    assert pipe.getvalue() == ""


def _entry(name, label, median, **launches):
    return {"name": name, "label": label, "status": "ok", "latency": {"median_us": median},
            "launches": {"cuda_kernels": launches.get("kernels"), "dispatched": launches.get("dispatched")},
            "max_rel_error": 2e-7, "info": {}}


def test_verdict_lines():
    eager = _entry("eager", "eager", 32.0, kernels=12, dispatched=12)
    fx = dict(_entry("fxopt", "fxopt", 10.0, kernels=4, dispatched=4), x_floor=1.84)
    assert verdict(fx, eager) == ("fxopt: 3.20x faster than eager (12 -> 4 GPU kernels), max rel err 2.0e-07, "
                                  "1.8x the floor")
    slow = _entry("torchscript", "TorchScript", 64.0, dispatched=20)
    assert verdict(slow, eager) == "TorchScript: 2.00x slower than eager (12 -> 20 dispatched ops), max rel err 2.0e-07"
    assert verdict(eager, eager).startswith("eager: the reference, 32.0 µs median (12 GPU kernels")
    skipped = {"name": "tensorrt", "label": "TensorRT", "status": "skipped", "reason": "needs CUDA"}
    assert verdict(skipped, eager) == "TensorRT: skipped: needs CUDA"


@pytest.mark.usefixtures("no_plots")
def test_fxopt_with_cuda_graphs_reports_why_no_graph_is_used(tmp_path, monkeypatch, capsys):
    # on CPU the system is skipped ("needs CUDA"); forced on, fxopt ignores the option and the row says why
    forced = dataclasses.replace(SYSTEMS["fxopt_cudagraphs"], needs_cuda=False)
    monkeypatch.setitem(systems_mod.SYSTEMS, "fxopt_cudagraphs", forced)
    assert main(["relu_sigmoid", "--device", "cpu", "--iters", "2", "--systems", "eager,fxopt_cudagraphs",
                 "--no-trace", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "relu_sigmoid-cpu.json").read_text())
    cg = data["systems"]["fxopt_cudagraphs"]
    assert cg["status"] == "ok", cg
    assert "CUDA graphs need CUDA tensors" in cg["info"]["note"] and "CUDA graphs need" in cg["verdict"]


def test_cuda_graph_info_from_the_runner_entries():
    opt = types.SimpleNamespace(graph_entries=[types.SimpleNamespace(
        signature="float32[1, 1024]@cuda:0", status="eager", captured=False, reason="capture failed: X",
        num_nodes=None, pool_bytes=None, replays=0)])
    info = systems_mod._cuda_graph_info(opt)
    assert info["note"] == "CUDA graph not used: capture failed: X"
    assert info["cuda_graphs"][0]["status"] == "eager"
    opt.graph_entries[0].captured = True
    assert "note" not in systems_mod._cuda_graph_info(opt)


def test_cuda_graph_rows_show_each_signature():
    from fxopt.report import render

    report = {"systems": {"fxopt_cudagraphs": {"info": {"cuda_graphs": [
        {"signature": "float32[1, 1024]@cuda:0", "status": "captured", "reason": None, "num_nodes": 3,
         "pool_bytes": 2 << 20, "replays": 12, "replay": "native"},
        {"signature": "float32[3, 1024]@cuda:0", "status": "eager", "reason": "capture failed: X",
         "num_nodes": None, "pool_bytes": None, "replays": 0, "replay": ""}]}}}}
    rows = render.graph_rows(report)
    assert rows == [["float32[1, 1024]@cuda:0", "captured", "3", "2.0 MiB", "12", "native", ""],
                    ["float32[3, 1024]@cuda:0", "eager", "-", "-", "0", "-", "capture failed: X"]]
    assert render.graph_rows({"systems": {}}) == []


@pytest.mark.usefixtures("no_plots")
def test_background_builds_finish_before_anything_is_timed(tmp_path, monkeypatch, capsys):
    from fxopt.report import run as run_mod

    events = []
    real_prepare, real_measure = run_mod.prepare_system, run_mod.measure_interleaved
    real_finish = run_mod.compiled_mod.finish_native_build

    def finish(announce=None, timeout=600):
        events.append("native")
        return real_finish(announce, timeout)

    def prepare(system, ctx, **kw):
        events.append(f"build {system.name}")
        return real_prepare(system, ctx, **kw)

    def measure(systems, *a, **kw):
        events.append(f"time {','.join(systems)}")
        return real_measure(systems, *a, **kw)

    monkeypatch.setattr(run_mod.compiled_mod, "finish_native_build", finish)
    monkeypatch.setattr(run_mod, "prepare_system", prepare)
    monkeypatch.setattr(run_mod, "measure_interleaved", measure)
    data = _run(tmp_path, "relu_sigmoid", "--systems", "eager,fxopt", "--no-trace")
    builds = [e for e in events if e.startswith("build")]
    assert events[0] == "native" and builds[:2] == ["build eager", "build fxopt"]
    # one timing, of every system together, after every build and a second look at the native build
    assert events[-2:] == ["native", "time eager,fxopt"] and events.count("time eager,fxopt") == 1
    assert data["settings"]["native_call"].startswith("ready")


@pytest.mark.usefixtures("no_plots")
def test_a_busy_host_is_noted_when_torch_runs_several_threads(tmp_path, monkeypatch, capsys):
    from fxopt.report import run as run_mod

    monkeypatch.setattr(run_mod, "host_load", lambda: [9.0, 9.0, 9.0])
    monkeypatch.setattr(run_mod.os, "cpu_count", lambda: 2)
    data = _run(tmp_path, "relu_sigmoid", "--systems", "eager,fxopt", "--no-trace", "--threads", "2")
    assert data["settings"]["cpu_threads"] == 2
    busy = [n for n in data["notes"] if n.startswith("the host was busy")]
    assert busy and "load average 9.0 on 2 cores" in busy[0] and "--threads 1" in busy[0]
    data = _run(tmp_path, "relu_sigmoid", "--systems", "eager,fxopt", "--no-trace", "--threads", "1")
    assert data["settings"]["cpu_threads"] == 1 and not any(n.startswith("the host was busy") for n in data["notes"])
