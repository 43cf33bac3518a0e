"""benchmarks/sweep_models.py on the CPU: the model list, one child's row, the whole sweep through child processes,
and the summary of issue 18's bars."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "sweep_models.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("_bench_sweep_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_list_needs_neither_timm_nor_torchvision():
    done = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in ("timm/convnext_tiny", "tv/resnet50", "bert_base", "gpt2", "diffusion_block", "bert_tiny"):
        assert any(line.split()[:1] == [name] for line in lines), name
    assert "b1-fp32, b1-fp16, b32-fp32" in done.stdout


def test_issue_models_come_first(sweep):
    first = [n.split("/")[-1] for n in sweep.DEFAULT_MODELS[:6]]
    assert first == ["convnext_tiny", "deit_small_patch16_224", "swin_tiny_patch4_window7_224", "efficientnet_b0",
                     "mobilenetv3_large_100", "resnet50"]
    assert not {"bert_tiny", "gpt2_tiny", "diffusion_block_small"} & set(sweep.DEFAULT_MODELS)


def test_one_child_row_on_cpu(sweep, monkeypatch):
    monkeypatch.setenv("FXOPT_SWEEP_ENABLE", "split_k_linears")  # an opt-in pass, named in the row
    monkeypatch.setenv("FXOPT_SWEEP_CHOOSE_LAYOUT", "1")  # and the layout choice (nothing to choose on the CPU)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        with torch.random.fork_rng():
            row = sweep.run_child("diffusion_block_small", "b1-fp32", torch.device("cpu"), ("eager", "fxopt"),
                                  timing={"rounds": 2, "block": 2, "warmup": 1})
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert row["stage"] == "done" and "error" not in row, row.get("traceback")
    assert row["fxopt_capture"] == "symbolic_trace" and row["fxopt_unoptimized"] is None
    assert row["max_err_fxopt"] < 1e-4 and sweep.fxopt_ok(row) is True
    assert row["fxopt_rolled_back"] == [] and row["fxopt_enable"] == ["split_k_linears"]
    assert row["fxopt_choose_layout"] is True
    for key in ("latency_eager_us", "latency_fxopt_us", "fxopt_x_eager", "fxopt_optimize_s", "ops_eager", "ops_fxopt"):
        assert row[key] is not None and row[key] > 0, key
    assert row["kernels_eager"] is None and row["busy_us_fxopt"] is None  # no GPU: not measured
    assert "compile" not in row["systems"] and "latency_compile_us" not in row


def test_sweep_runs_children_writes_json_and_markdown_and_resumes(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--models", "diffusion_block_small", "--configs", "b1-fp32",
           "--systems", "eager,fxopt", "--rounds", "2", "--block", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd + ["--prewarm-jobs", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "sweep_models.json").read_text())
    (row,) = result["rows"]
    assert row["model"] == "diffusion_block_small" and row["config"] == "b1-fp32" and "error" not in row, row
    assert row["max_err_fxopt"] < 1e-4 and row["systems"] == ["eager", "fxopt"]
    assert result["environment"]["device"] == "cpu" and result["skipped_for_time"] == []
    md = (tmp_path / "sweep_models.md").read_text()
    assert "| diffusion_block_small | b1-fp32" in md and "Issue 18's bars" in md
    assert (tmp_path / "sweep_models_logs" / "diffusion_block_small__b1-fp32.log").exists()
    # the prewarm built the child once before the timed run (NOTE [Prewarmed compiler caches])
    assert [b.split(" (")[0] for b in result["prewarm"]["built"]] == ["diffusion_block_small b1-fp32"], result
    assert "build fxopt" in (tmp_path / "sweep_models_logs" / "prewarm__diffusion_block_small__b1-fp32.log").read_text()
    # a resumed run keeps the row and starts no child for it
    again = subprocess.run(cmd + ["--resume", str(tmp_path / "sweep_models.json")], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(timeout" not in again.stdout
    assert json.loads((tmp_path / "sweep_models.json").read_text())["rows"] == [row]


def test_a_child_that_dies_is_a_row_with_its_error_and_log(sweep, tmp_path):
    args = sweep.argparse.Namespace(device="cpu", systems="eager", rounds=None, block=None)
    row = sweep.run_in_child("diffusion_block_small", "no-such-config", args, 120, str(tmp_path / "child.log"))
    assert row["model"] == "diffusion_block_small" and row["error"] == "child exited with 1 (stage: start)"
    assert "KeyError: 'no-such-config'" in row["log_tail"] and row["child_s"] > 0


def test_a_float16_row_measures_errors_on_more_inputs(sweep):
    """16-bit rows: every system's error against float32 on the example and FP16_MORE_INPUTS more inputs; the
    largest is at least the example's."""
    with torch.random.fork_rng():
        row = sweep.run_child("diffusion_block_small", "b1-fp16", torch.device("cpu"), ("eager", "fxopt"),
                              timing={"rounds": 1, "block": 1, "warmup": 1})
    assert row["stage"] == "done" and "error" not in row, row.get("traceback")
    assert row["err_inputs"] == sweep.FP16_MORE_INPUTS + 1
    for key in ("eager", "fxopt"):
        assert row[f"max_err_fp32ref_worst_{key}"] >= row[f"max_err_fp32ref_{key}"] > 0
    assert sweep.fp16_worst_ratio(row) == row["max_err_fp32ref_worst_fxopt"] / row["max_err_fp32ref_worst_eager"]
    for key in ("eager", "fxopt"):
        errs = row[f"errs_fp32ref_{key}"]
        assert len(errs) == row["err_inputs"] and errs[0] == row[f"max_err_fp32ref_{key}"]
        assert max(errs) == row[f"max_err_fp32ref_worst_{key}"]
    mean, low, high = sweep.fp16_paired_ratio(row)
    assert low <= mean <= high
    # NOTE [Eager's own spread]: eager in channels-last on the same inputs (the block's input is 4-D)
    spread = row["errs_fp32ref_eager_cl"]
    assert len(spread) == row["err_inputs"] and min(spread) > 0
    assert sweep.fp16_paired_ratio(row, "eager_cl") is not None


def test_the_paired_ratio_and_its_interval(sweep):
    """NOTE [Paired error ratios]: the geometric mean of per-input ratios; its interval excludes 1 only where the
    ratios lean one way."""
    same = {"errs_fp32ref_eager": [1.0, 2.0, 4.0, 3.0] * 4, "errs_fp32ref_fxopt": [1.0, 2.0, 4.0, 3.0] * 4}
    assert sweep.fp16_paired_ratio(same) == (1.0, 1.0, 1.0)
    noisy = {"errs_fp32ref_eager": [1.0] * 16, "errs_fp32ref_fxopt": [0.9, 1.1] * 8}
    mean, low, high = sweep.fp16_paired_ratio(noisy)
    assert low < 1.0 < high and abs(mean - (0.99) ** 0.5) < 1e-9
    above = {"errs_fp32ref_eager": [1.0] * 16, "errs_fp32ref_fxopt": [1.1, 1.2] * 8}
    assert sweep.fp16_paired_ratio(above)[1] > 1.0
    table, notes = sweep.summarize([{"model": "m", "config": "b1-fp16", "batch": 1, "dtype": "float16", **above}])
    assert any("systematically above" in n and "m b1-fp16" in n for n in notes)
    spread = {**above, "errs_fp32ref_eager_cl": [0.9] * 16}  # NOTE [Eager's own spread]
    table, notes = sweep.summarize([{"model": "m", "config": "b1-fp16", "batch": 1, "dtype": "float16", **spread}])
    assert any("m b1-fp16 (1.15x [" in n and "; eager in channels-last 0.90x [0.90, 0.90])" in n for n in notes), notes
    assert sweep.fp16_paired_ratio({"errs_fp32ref_eager": [1.0], "errs_fp32ref_fxopt": [0.0]}) is None


def test_other_inputs_keep_shapes_dtypes_and_integer_ranges(sweep):
    ids, mask, x = torch.randint(5, 9, (2, 7)), torch.ones(2, 7, dtype=torch.long), torch.randn(2, 3)
    a, b = sweep._other_inputs((ids, mask, x, None), 1), sweep._other_inputs((ids, mask, x, None), 2)
    assert [t.shape for t in a[:3]] == [ids.shape, mask.shape, x.shape] and a[3] is None
    assert [t.dtype for t in a[:3]] == [ids.dtype, mask.dtype, x.dtype]
    assert int(a[0].min()) >= 5 and int(a[0].max()) <= 8 and bool((a[1] == 1).all())
    assert not torch.equal(a[2], x) and not torch.equal(a[2], b[2])


def test_summary_counts_the_bars(sweep):
    rows = [
        {"model": "a", "config": "b1-fp32", "batch": 1, "dtype": "float32", "max_err_fxopt": 1e-6,
         "busy_us_eager": 100.0, "busy_us_compile": 80.0, "busy_us_fxopt": 60.0, "kernels_compile": 30,
         "kernels_fxopt": 20, "fxopt_graphs_over_compile_ro": 0.5, "fxopt_x_eager": 1.5},
        {"model": "b", "config": "b1-fp32", "batch": 1, "dtype": "float32", "max_err_fxopt": 1e-3,
         "busy_us_eager": 100.0, "busy_us_compile": 100.0, "busy_us_fxopt": 120.0, "kernels_compile": 30,
         "kernels_fxopt": 40, "fxopt_graphs_over_compile_ro": 0.8, "fxopt_x_eager": 0.9},
        {"model": "a", "config": "b1-fp16", "batch": 1, "dtype": "float16", "max_err_fp32ref_fxopt": 3e-3,
         "max_err_fp32ref_eager": 2e-3, "max_err_fp32ref_worst_fxopt": 6e-3, "max_err_fp32ref_worst_eager": 4e-3,
         "err_inputs": 8},
        {"model": "a", "config": "b32-fp32", "batch": 32, "dtype": "float32", "fxopt_graphs_over_compile_ro": 1.1},
    ]
    assert [sweep.fxopt_ok(r) for r in rows] == [True, False, True, None]
    table, notes = sweep.summarize(rows)
    everything = dict(zip(sweep.SUMMARY_HEAD, table[0]))
    assert everything["rows"] == "all" and everything["measured"] == 4
    assert everything["fxopt err ok"] == "2/3"
    assert everything["fxopt busy > eager"] == "1/2"
    assert everything["median busy fxopt / Inductor"] == "0.97"  # of 0.75 and 1.2
    assert everything["max busy fxopt / Inductor"] == "1.20 (b)"
    assert everything["kernels fxopt <= Inductor"] == "1/2"
    assert everything["max fxopt+g / r-o (b1)"] == "0.80 (b)"
    assert everything["max fxopt+g / r-o (b32)"] == "1.10 (a)"
    assert everything["fxopt slower than eager"] == "1/2"
    assert any(n.startswith("fxopt GPU busy above eager's: b b1-fp32") for n in notes)
    assert sweep.table_rows(rows)[2][3] == "3.0e-03 / 2.0e-03; worst of 8: 1.50x"
    assert "fxopt's 16-bit error above eager's own (largest over the row's inputs): a b1-fp16 (1.50x)" in notes


def test_notes_keep_one_per_decision_and_count_the_repeats(sweep):
    _distinct_notes = sweep._distinct_notes
    notes = ["tf32x3_linears: blocks_0_qkv stays float32 (197x384 @ 384x1152: 11.7 µs, 12.6)",
             "tf32x3_linears: blocks_1_qkv stays float32 (197x384 @ 384x1152: 11.7 µs, 12.6)",
             "tf32x3_linears: linear -> 3xTF32 stacked (197x384 @ 384x384: 9.2 µs)",
             "few_row_linears: head -> GEMV (1x384 @ 1000x384^T: 2.6 µs)"]
    assert _distinct_notes(notes) == [notes[0], notes[2], notes[3],
                                      "(and 1 notes that repeat one above for another node)"]
    assert _distinct_notes(notes[2:]) == notes[2:]
    assert len(_distinct_notes([f"p: n{i} differs {i}" for i in range(100)], limit=60)) == 60
