import json
import operator
import subprocess
import sys

import pytest
import torch

import fxopt
from fxopt.runtime import kernel as kernel_mod


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, inputs = fxopt.models.get("small_resnet").build()
    opt = fxopt.optimize(model, inputs)
    opt(torch.randn(2, 3, 32, 32))  # a second signature
    path = fxopt.save(opt, tmp_path_factory.mktemp("art") / "resnet")
    return path, model, inputs


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _batches(model, sizes, shape, seed=0):
    """Inputs of each batch size and eager's outputs for them."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn((b, *shape), generator=g) for b in sizes]
    with torch.no_grad():
        return [(x, model(x)) for x in xs]


def test_round_trip_in_a_fresh_process_without_the_model(saved, tmp_path):
    """Saved at batch 1 and 2, the artifact serves batch 3 and 17 too, from the saved libraries (nothing compiled
    anew), and matches eager there."""
    path, model, inputs = saved
    torch.save([inputs[0], model(*inputs), _batches(model, [3, 17], (3, 32, 32))], tmp_path / "io.pt")
    code = f"""
import torch, fxopt
mod = fxopt.load({str(path)!r})
x, y, more = torch.load({str(tmp_path / 'io.pt')!r})
assert fxopt.verify.compare(mod(x), y) is None
assert mod(torch.randn(2, 3, 32, 32)).shape == (2, 10)
for x, y in more:
    assert fxopt.verify.compare(mod(x), y) is None, x.shape
print("ok", mod.notes)
"""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok []")  # the saved library was used, nothing recompiled


def test_artifact_layout(saved):
    path, _, _ = saved
    m = _manifest(path)
    assert m["format"] == fxopt.artifact.FORMAT and m["torch"] == torch.__version__
    assert len(m["specializations"]) == 2 and m["kernels"] and m["devices"] == ["cpu"]
    # both signatures (batch 1 and 2) export with a dynamic batch; batch 1 from an example of batch 2 (NOTE [Dynamic
    # batch]: torch.export makes a size-1 example dim the constant 1), checked against eager at batch 1 all the same
    first, second = (s["batch"] for s in m["specializations"])
    assert first == {"dim": 0, "inputs": [0], "min": 1, "max": None, "checked": [1, 2, 3], "export_batch": 2}
    assert second["min"] == 1 and second["export_batch"] == 2 and 1 in second["checked"]
    assert all(s["note"] is None for s in m["specializations"])
    for k in m["kernels"]:
        assert (path / k["source"]).read_text().startswith("// fxopt_kernel.h")
        assert (path / k["binary"]).is_file()


def test_unknown_signature_is_a_clear_error(saved):
    """Another batch size is served; another image size (fixed in the exported program) or an empty batch is
    refused with what the artifact accepts and how to get an artifact for these inputs."""
    path, _, _ = saved
    mod = fxopt.load(path)
    for x in (torch.randn(3, 3, 16, 16), torch.randn(0, 3, 32, 32), torch.randn(2, 3, 32, 32, dtype=torch.float64)):
        with pytest.raises(ValueError) as info:
            mod(x)
        text = str(info.value)
        assert f"does not accept the inputs {str(x.dtype)[6:]}{list(x.shape)}@cpu" in text
        assert "It accepts: float32[B, 3, 32, 32]@cpu, B from 1 on (program_0.pt2)" in text
        assert "optimize the model for these inputs too" in text and "fxopt.save" in text


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_corrupted_file_is_refused(saved, tmp_path):
    path = _copy(saved[0], tmp_path)
    program = path / "program_0.pt2"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(fxopt.ArtifactError, match="program_0.pt2 is missing or corrupted"):
        fxopt.load(path)


def test_other_torch_version_and_format_are_refused(saved, tmp_path):
    path = _copy(saved[0], tmp_path)
    m = _manifest(path)
    m["torch"] = "1.13.0"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(fxopt.ArtifactError, match="torch 1.13.0"):
        fxopt.load(path)
    m["format"] = "fxopt-artifact/99"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(fxopt.ArtifactError, match="artifact format"):
        fxopt.load(path)
    with pytest.raises(fxopt.ArtifactError, match="no manifest"):
        fxopt.load(tmp_path)


def test_binary_for_another_platform_is_rebuilt_from_source(saved, tmp_path, monkeypatch):
    path = _copy(saved[0], tmp_path)
    m = _manifest(path)
    for k in m["kernels"]:
        k["platform"] = "SomeOS-riscv64-other-compiler"
    (path / "manifest.json").write_text(json.dumps(m))
    for k in m["kernels"]:  # as in a fresh process: the kernels are not loaded yet
        monkeypatch.delitem(kernel_mod.KERNELS, k["name"], raising=False)
    mod = fxopt.load(path)
    assert mod.notes and all("compiled anew from source" in n for n in mod.notes)
    assert mod.summary().count("compiled anew: built on SomeOS-riscv64-other-compiler") == len(m["kernels"])
    _, model, inputs = saved
    assert fxopt.verify.compare(mod(*inputs), model(*inputs)) is None


def test_save_refuses_what_it_cannot_save():
    with pytest.raises(TypeError):
        fxopt.save(torch.nn.ReLU(), "x")
    with pytest.raises(fxopt.ArtifactError, match="call the module once"):
        fxopt.save(fxopt.optimize(fxopt.models.ReluSigmoid()), "x")


def test_row_wise_kernels_round_trip_in_a_fresh_process(tmp_path):
    """LayerNorm + residual as one row-wise kernel (runtime/rowwise.py) is saved with its program and library
    and runs in a fresh process from the saved library (it once refused to save: 'only generated kernels')."""
    model, inputs = fxopt.models.get("mlp_block").build()
    opt = fxopt.optimize(model, inputs)
    kinds = {type(k).__name__ for k in opt.kernels.values()}
    assert "RowwiseKernel" in kinds
    path = fxopt.save(opt, tmp_path / "mlp")
    entries = _manifest(path)["kernels"]
    assert {e["kind"] for e in entries} >= {"rowwise"} and all("binary" in e for e in entries)
    torch.save([inputs[0], model(*inputs)], tmp_path / "io.pt")
    code = f"""
import torch, fxopt
mod = fxopt.load({str(path)!r})
x, y = torch.load({str(tmp_path / 'io.pt')!r})
assert fxopt.verify.compare(mod(x), y) is None
print("ok", mod.notes)
"""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok []")


class _Layouts(torch.nn.Module):
    """Eager makes (c - x).abs() contiguous for a channels_last x; the stack and view after it need that."""

    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.randn(3, 1, 3))

    def forward(self, x):
        h = (self.c - x).abs().sqrt()
        return torch.stack([x.abs() + 1, h], dim=3).view(-1), h


def test_a_channels_last_signature_round_trips_with_eager_output_strides(tmp_path):
    """The saved signature keeps its strides (a channels_last specialization was refused by its own artifact: the
    loader rebuilt contiguous examples), and each elementwise kernel's layout program is saved with it, so the
    loaded kernels give eager's output strides (NOTE [Output layout]); without it the view in the model fails."""
    model = _Layouts().eval()
    x = torch.randn(4, 3, 1, 3).to(memory_format=torch.channels_last)
    opt = fxopt.optimize(model, [x], backend="cpp", strict=True)
    path = fxopt.save(opt, tmp_path / "layouts")
    entries = [e for e in _manifest(path)["kernels"] if e["kind"] == "elementwise"]
    assert entries and all(e["layout"] for e in entries)
    assert _manifest(path)["specializations"][0]["signature"][0]["stride"] == list(x.stride())
    with torch.no_grad():
        torch.save([x, model(x)], tmp_path / "io.pt")
    code = f"""
import torch, fxopt
mod = fxopt.load({str(path)!r})
x, y = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    out = mod(x)
assert fxopt.verify.compare(out, y) is None
assert out[1].stride() == y[1].stride(), (out[1].stride(), y[1].stride())
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


class _Mixed(torch.nn.Module):
    """Conv + BatchNorm (folded into the conv), an elementwise chain broadcasting against a (1, C, 1, 1) buffer, and
    LayerNorm and softmax over rows (row-wise kernels)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.register_buffer("scale", torch.rand(1, 8, 1, 1) + 0.5)
        self.norm = torch.nn.LayerNorm(64)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)) * self.scale + 0.1)
        h = self.norm(h.flatten(2))
        return torch.softmax(h * 2.0, dim=-1) - 0.5


def test_saved_at_batch_8_serves_batch_3_1_and_17_in_a_fresh_process(tmp_path):
    """The user's report: an artifact saved after batch 8 refused batch 3. The program is exported with a dynamic
    batch, the generated kernels (elementwise and row-wise, from the saved libraries) plan each new size at run
    time, and every batch matches eager; summary() says so."""
    model = _Mixed().eval()
    opt = fxopt.optimize(model, _batches(model, [8], (3, 8, 8))[0][:1])
    assert any(r.name == "fold_batchnorm" and r.changes for r in opt.records)
    assert {type(k).__name__ for k in opt.kernels.values()} == {"FusedKernel", "RowwiseKernel"}
    path = fxopt.save(opt, tmp_path / "mixed")
    (spec,) = _manifest(path)["specializations"]
    assert spec["batch"] == {"dim": 0, "inputs": [0], "min": 1, "max": None, "checked": [1, 8, 9], "export_batch": 8}
    torch.save(_batches(model, [3, 1, 17, 8], (3, 8, 8), seed=1), tmp_path / "io.pt")
    code = f"""
import torch, fxopt
mod = fxopt.load({str(path)!r})
with torch.no_grad():
    for x, y in torch.load({str(tmp_path / 'io.pt')!r}):
        assert fxopt.verify.compare(mod(x), y) is None, x.shape
print(mod.summary())
print("notes", mod.notes)
"""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "float32[B, 3, 8, 8]@cpu, B from 1 on" in out and "dynamic dim 0: 1..inf (saved at 8)" in out
    assert out.count("saved binary reused") == len(opt.kernels) and "notes []" in out
    assert f"with torch {torch.__version__}" in out and "device: cpu" in out


class _PerSampleTable(torch.nn.Module):
    """A buffer with one row per sample of batch 8: the graph fixes the batch size (eager fails at batch 3 too)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(8, 16))

    def forward(self, x):
        return torch.sigmoid(x + self.table) * 2.0


def test_a_graph_that_fixes_its_batch_is_saved_static_and_refuses_other_batches(tmp_path):
    model = _PerSampleTable().eval()
    x = torch.randn(8, 16)
    path = fxopt.save(fxopt.optimize(model, [x]), tmp_path / "table")
    (spec,) = _manifest(path)["specializations"]
    assert spec["batch"] is None
    assert "exported for this signature alone (batch 8)" in spec["note"]
    assert "the graph fixes the batch size to 8" in spec["note"]
    mod = fxopt.load(path)
    assert fxopt.verify.compare(mod(x), model(x)) is None
    with pytest.raises(ValueError) as info:
        mod(torch.randn(3, 16))
    text = str(info.value)
    assert text.startswith("this fxopt artifact does not accept the inputs float32[3, 16]@cpu. It accepts: "
                           "float32[8, 16]@cpu (program_0.pt2: exported for this signature alone (batch 8)")
    assert "optimize the model for these inputs too" in text
    summary = mod.summary()
    assert f"fxopt artifact {path} (fxopt-artifact/1)" in summary and f"by fxopt {fxopt.__version__}" in summary
    row = next(line for line in summary.splitlines() if line.startswith("program_0.pt2"))
    assert "float32[8, 16]@cpu" in row and "static" in row
    assert f"note: program_0.pt2: {spec['note']}" in summary
    (kernel,) = _manifest(path)["kernels"]
    assert kernel["name"] in summary and "already loaded in this process" in summary  # optimize compiled it here


class _SqueezeBatch(torch.nn.Module):
    """x.squeeze(0) is a no-op at batch >= 2 and drops the batch at 1: what torch.export's 0/1 specialization
    assumes away."""

    def forward(self, x):
        return torch.relu(x.squeeze(0) * 2.0 + 1.0)


def test_a_program_wrong_at_batch_1_serves_batch_2_on(tmp_path):
    model = _SqueezeBatch()
    path = fxopt.save(fxopt.optimize(model, [torch.randn(8, 16)]), tmp_path / "squeeze")
    (spec,) = _manifest(path)["specializations"]
    assert spec["batch"]["min"] == 2 and 1 not in spec["batch"]["checked"]
    assert "serves batch sizes from 2 on: at batch 1 output: shape (1, 16) != eager's (16,)" in spec["note"]
    mod = fxopt.load(path)
    x = torch.randn(3, 16)
    assert fxopt.verify.compare(mod(x), model(x)) is None
    with pytest.raises(ValueError, match=r"It accepts: float32\[B, 16\]@cpu, B from 2 on"):
        mod(torch.randn(1, 16))


def _bake_batch_size(gm):
    """A pass that specializes on its signature (as passes may): reads of ``x.shape[i]`` become the literal."""
    from torch.fx.passes.infra.pass_base import PassResult

    reads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem
             and isinstance(n.args[0], torch.fx.Node) and n.args[0].target is getattr]
    for n in reads:
        n.replace_all_uses_with(n.args[0].args[0].meta["tensor_meta"].shape[n.args[1]])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, bool(reads))


class _ScaleByBatch(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x * x.shape[0])


def test_a_graph_that_bakes_the_batch_without_a_guard_is_caught_and_saved_static(tmp_path):
    """torch.export keeps this graph dynamic (the batch is a literal, no guard), but it is wrong at other batches:
    the check against the model catches it before anything is saved as dynamic."""
    model = _ScaleByBatch()
    opt = fxopt.optimize(model, [torch.randn(8, 16)], passes=[_bake_batch_size, "fuse_elementwise"])
    assert "shape" not in opt.code  # x * 8 in one fused kernel
    path = fxopt.save(opt, tmp_path / "baked")
    (spec,) = _manifest(path)["specializations"]
    assert spec["batch"] is None
    assert "differs from the model at batch 1: output: " in spec["note"] and "(and at batch 9)" in spec["note"]
    with pytest.raises(ValueError, match=r"It accepts: float32\[8, 16\]@cpu \(program_0.pt2: exported for this"):
        fxopt.load(path)(torch.randn(3, 16))


def test_loaded_outputs_follow_the_autograd_rule(tmp_path):
    """NOTE [Inference only]: a loaded artifact has no original model; under grad mode its outputs never carry a
    partial history, and a backward pass that reaches them raises InferenceOnlyError."""
    from fxopt.errors import InferenceOnlyError

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    fxopt.save(fxopt.optimize(model, (x,)), tmp_path / "m.fxopt")
    loaded = fxopt.load(tmp_path / "m.fxopt")
    with torch.no_grad():
        plain = loaded(x)
    assert plain.grad_fn is None
    xg = x.clone().requires_grad_()
    out = loaded(xg)
    torch.testing.assert_close(out.detach(), model(x).detach())
    with pytest.raises(InferenceOnlyError, match="fxopt"):
        out.sum().backward()
    assert xg.grad is None


def test_saving_leaves_the_models_state_as_it_was(tmp_path):
    """NOTE [Model state]: fxopt.save exports and checks the graph by running it; a model whose forward writes a
    buffer must not see those runs."""

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return self.fc(x).relu()

    model = Counter().eval()
    x = torch.randn(4, 8)
    opt = fxopt.optimize(model, (x,))
    before = model.calls.clone()
    fxopt.save(opt, tmp_path / "c.fxopt")
    assert torch.equal(model.calls, before)
