import json
import subprocess
import sys

import pytest

from fxopt.passes import pass_names
from fxopt.report import main

pytestmark = pytest.mark.usefixtures("no_plots")

FAST = ["--device", "cpu", "--skip", "slow", "--no-trace", "--rounds", "3", "--block-ms", "1"]  # seconds, not minutes


def test_report_on_zoo_model_writes_json_and_markdown(tmp_path, capsys):
    assert main(["relu_sigmoid", *FAST, "--iters", "5", "--warmup", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "remove_dropout" in out and "median µs" in out
    data = json.loads((tmp_path / "relu_sigmoid-cpu.json").read_text())
    assert data["model"] == "relu_sigmoid"
    assert data["environment"]["torch"]
    assert data["systems"]["eager"]["launches"]["dispatched"] == 2
    assert data["systems"]["fxopt"]["latency"]["median_us"] > 0
    assert [p["name"] for p in data["passes"]] == pass_names()
    md = (tmp_path / "relu_sigmoid-cpu.md").read_text()
    assert md.startswith("# relu_sigmoid") and "| pass" in md


def test_report_json_format(tmp_path, capsys):
    assert main(["elementwise_chain", *FAST, "--iters", "3", "--warmup", "1", "--out", str(tmp_path),
                 "--format", "json", "--systems", "eager,fxopt"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "elementwise_chain"


def test_report_model_from_file_and_module(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text("import torch\n"
                 "def make():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), "
                 "(torch.randn(2, 4),)\n"
                 "def bare():\n    return torch.nn.ReLU()\n")
    few = [*FAST, "--iters", "3", "--systems", "eager,fxopt", "--out", str(tmp_path)]
    assert main([f"{f}:make", *few]) == 0
    assert (tmp_path / "mymodel.make-cpu.json").exists()
    assert main([f"{f}:bare", *few, "--shape", "2,3"]) == 0
    assert main(["fxopt.models:SimpleCNN", *few, "--shape", "1,3,32,32"]) == 0
    assert (tmp_path / "fxopt.models_SimpleCNN-cpu.md").exists()


@pytest.mark.parametrize("argv, message", [
    (["no_such_model"], "unknown model 'no_such_model'"),
    (["missing.py:make"], "no such file: missing.py"),
    (["fxopt.nothing_here:make"], "cannot import module 'fxopt.nothing_here'"),
    (["fxopt.models:nope"], "has no callable 'nope'"),
    (["fxopt.models:SimpleCNN"], "pass --shape"),
    (["simple_cnn", "--device", "tpu"], "--device must be cpu or cuda"),
    ([], "name a model"),
    (["simple_cnn", "--skip", "nope"], "--skip: unknown system 'nope'"),
    (["simple_cnn", "--systems", "fxopt,tensorrtt"], "--systems: unknown system 'tensorrtt'"),
    (["simple_cnn", "--skip", "eager"], "eager is the reference"),
    (["simple_cnn", "--models", "relu_sigmoid"], "--models goes with --all"),
    (["simple_cnn", "--all"], "--all reports every zoo model"),
    (["--all", "--models", "relu_sigmoid,nope"], "unknown zoo model(s) 'nope'"),
    (["simple_cnn", "--iters", "0"], "--iters must be at least 1"),
    (["simple_cnn", "--enable", "split_k_linears,fold_batchnorm"], "--enable: 'fold_batchnorm' is not an opt-in pass"),
])
def test_report_usage_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU error")
def test_report_cuda_without_gpu_is_a_clear_error(capsys):
    assert main(["simple_cnn", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_report_module_entry_point_lists_zoo_and_systems():
    done = subprocess.run([sys.executable, "-m", "fxopt.report", "--list"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "simple_cnn" in done.stdout and "transformer_encoder" in done.stdout
    assert "torchscript" in done.stdout and "fxopt_cudagraphs" in done.stdout


MAKE = ("import torch\n"
        "def make():\n    return torch.nn.Sequential(torch.nn.Linear(4, {n}), torch.nn.ReLU()), (torch.randn(2, 4),)\n")


def test_reports_of_two_files_callables_of_the_same_name_do_not_overwrite_each_other(tmp_path, capsys):
    out = tmp_path / "out"
    few = [*FAST, "--iters", "2", "--systems", "eager", "--out", str(out)]
    for folder, stem, n in (("a", "net", 3), ("b", "other", 5), ("c", "net", 7)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{stem}.py").write_text(MAKE.format(n=n))

    assert main([f"{tmp_path}/a/net.py:make", *few]) == 0
    assert main([f"{tmp_path}/b/other.py:make", *few]) == 0
    first = json.loads((out / "net.make-cpu.json").read_text())
    second = json.loads((out / "other.make-cpu.json").read_text())
    assert first["model"] == "net.make" and second["model"] == "other.make"
    assert first["inputs"] == second["inputs"] and first["model_source"] != second["model_source"]
    # the same stem in another folder: written beside it, under a name made from its path, with a note
    assert main([f"{tmp_path}/c/net.py:make", *few]) == 0
    third = list(out.glob("net.make-*-cpu.json"))
    assert len(third) == 1
    data = json.loads(third[0].read_text())
    assert data["model_source"] == f"{tmp_path}/c/net.py:make"
    assert any("net.make-cpu.json holds the report of another model" in n for n in data["notes"])
    assert json.loads((out / "net.make-cpu.json").read_text())["model_source"] == first["model_source"]
    # stable: the same spec gets the same name again, and so does the other one
    assert main([f"{tmp_path}/a/net.py:make", *few]) == 0
    assert main([f"{tmp_path}/c/net.py:make", *few]) == 0
    assert sorted(p.name for p in out.glob("*.json")) == sorted(["net.make-cpu.json", "other.make-cpu.json",
                                                                 third[0].name])


def test_report_enables_opt_in_passes_for_fxopt(tmp_path, capsys):
    """``--enable`` reaches fxopt's systems and the pass table: the opt-in pass is listed in its pipeline place."""
    assert main(["relu_sigmoid", *FAST, "--iters", "3", "--warmup", "1", "--out", str(tmp_path), "--systems",
                 "eager,fxopt", "--enable", "split_k_linears"]) == 0
    data = json.loads((tmp_path / "relu_sigmoid-cpu.json").read_text())
    names = [p["name"] for p in data["passes"]]
    assert data["settings"]["enable"] == ["split_k_linears"]
    assert names.index("split_k_linears") == names.index("fuse_epilogues") + 1


def test_report_passes_choose_layout_to_fxopt(tmp_path, monkeypatch):
    """``--choose-layout`` reaches every optimize() call of the report (NOTE [Layout by measurement]) and its
    settings."""
    import fxopt.api

    seen = []
    real = fxopt.api.optimize

    def spy(*args, **kwargs):
        seen.append(kwargs.get("choose_layout"))
        return real(*args, **kwargs)
    monkeypatch.setattr(fxopt.api, "optimize", spy)
    assert main(["relu_sigmoid", *FAST, "--iters", "3", "--warmup", "1", "--out", str(tmp_path), "--systems",
                 "eager,fxopt", "--choose-layout"]) == 0
    data = json.loads((tmp_path / "relu_sigmoid-cpu.json").read_text())
    assert data["settings"]["choose_layout"] is True
    assert seen and all(seen)
