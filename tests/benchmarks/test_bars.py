"""benchmarks/bars.py: the newest measured row per (model, config) across sweep results, and the sweep's summary of
issue 18's bars on them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bars():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("_bench_bars", REPO / "benchmarks" / "bars.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(model, config, busy, compile_busy, ratio, stage="done", enable=()):
    return {"model": model, "config": config, "dtype": "float32" if config.endswith("fp32") else "float16",
            "batch": 32 if config.startswith("b32") else 1, "stage": stage, "busy_us_fxopt": busy,
            "busy_us_eager": None if busy is None else 2 * busy, "busy_us_compile": compile_busy, "kernels_fxopt": 10, "kernels_compile": 12,
            "fxopt_graphs_over_compile_ro": ratio, "fxopt_graphs_enable": list(enable), "max_err_fxopt": 1e-6,
            "fxopt_x_eager": 2.0}


def _write(path: Path, date: str, device: str, rows: list[dict], tree: str = "abc1234") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": {"date": date, "device_name": device, "git_describe": tree},
                                "systems": ["eager", "compile", "compile_ro", "fxopt", "fxopt_graphs"],
                                "rows": rows}))


def test_the_newest_measured_row_per_model_counts(bars, tmp_path):
    _write(tmp_path / "a" / "sweep_b1.json", "2026-12-01T10:00", "NVIDIA H100",
           [_row("m1", "b1-fp32", 100, 100, 0.9), _row("m2", "b1-fp32", 50, 100, 0.5)], tree="old")
    _write(tmp_path / "b" / "sweep_b1.json", "2026-12-02T10:00", "NVIDIA H100",
           [_row("m1", "b1-fp32", 90, 100, 0.7), _row("m2", "b1-fp32", None, 100, None, stage="child timed out")],
           tree="new")
    _write(tmp_path / "c" / "other.json", "2026-12-03T10:00", "NVIDIA H100", [])  # no rows: ignored
    (tmp_path / "d.json").write_text("[1, 2]")  # not a sweep result
    rows = bars.latest_rows(bars.sweep_results(str(tmp_path)))
    by_model = {r["model"]: r for r in rows}
    assert by_model["m1"]["_tree"] == "new" and by_model["m1"]["busy_us_fxopt"] == 90
    assert by_model["m2"]["_tree"] == "old"  # the newer row crashed: the older one stays
    summary, _ = bars.sweep_models.summarize(rows)
    assert summary[0][0] == "all" and summary[0][7].startswith("0.70")  # max fxopt+g / r-o at batch 1: m1's new 0.7


def test_opt_in_rows_and_other_devices_can_be_left_out(bars, tmp_path):
    _write(tmp_path / "a.json", "2026-12-01T10:00", "NVIDIA H100", [_row("m1", "b1-fp16", 100, 100, 0.9)])
    _write(tmp_path / "b.json", "2026-12-02T10:00", "NVIDIA H100",
           [_row("m1", "b1-fp16", 80, 100, 0.7, enable=["tensor_core_attention"])])
    _write(tmp_path / "c.json", "2026-12-03T10:00", "NVIDIA H200", [_row("m1", "b1-fp16", 60, 100, 0.6)])
    results = bars.sweep_results(str(tmp_path))
    assert bars.latest_rows(results)[0]["busy_us_fxopt"] == 60
    assert bars.latest_rows(results, device="H100")[0]["busy_us_fxopt"] == 80
    only = bars.latest_rows(results, device="H100", default_only=True)
    assert only[0]["busy_us_fxopt"] == 100
    assert bars.table(bars.latest_rows(results, device="H100"))[0][4] == "tensor_core_attention"
    assert bars.latest_rows(results, configs=("b1-fp32",)) == []


def test_the_command_line_prints_the_bars(bars, tmp_path, capsys):
    _write(tmp_path / "a.json", "2026-12-01T10:00", "NVIDIA H100", [_row("m1", "b32-fp32", 100, 100, 0.9)])
    assert bars.main(["--reports", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| m1" in out and "b32-fp32" in out and "max fxopt+g / r-o (b32)" in out
    assert bars.main(["--reports", str(tmp_path / "none")]) == 1
