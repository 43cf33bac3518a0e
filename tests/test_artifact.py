import json
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


def test_round_trip_in_a_fresh_process_without_the_model(saved, tmp_path):
    path, model, inputs = saved
    torch.save([inputs[0], model(*inputs)], tmp_path / "io.pt")
    code = f"""
import torch, fxopt
mod = fxopt.load({str(path)!r})
x, y = torch.load({str(tmp_path / 'io.pt')!r})
assert fxopt.verify.compare(mod(x), y) is None
assert mod(torch.randn(2, 3, 32, 32)).shape == (2, 10)
print("ok", mod.notes)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok []")  # the saved library was used, nothing recompiled


def test_artifact_layout(saved):
    path, _, _ = saved
    m = _manifest(path)
    assert m["format"] == fxopt.artifact.FORMAT and m["torch"] == torch.__version__
    assert len(m["specializations"]) == 2 and m["kernels"]
    for k in m["kernels"]:
        assert (path / k["source"]).read_text().startswith("// fxopt_kernel.h")
        assert (path / k["binary"]).is_file()


def test_unknown_signature_is_a_clear_error(saved):
    path, _, _ = saved
    with pytest.raises(ValueError, match="Optimize the model again"):
        fxopt.load(path)(torch.randn(3, 3, 32, 32))


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
    _, model, inputs = saved
    assert fxopt.verify.compare(mod(*inputs), model(*inputs)) is None


def test_save_refuses_what_it_cannot_save():
    with pytest.raises(TypeError):
        fxopt.save(torch.nn.ReLU(), "x")
    with pytest.raises(fxopt.ArtifactError, match="call the module once"):
        fxopt.save(fxopt.optimize(fxopt.models.ReluSigmoid()), "x")


def test_row_wise_kernels_round_trip_in_a_fresh_process(tmp_path):
    """LayerNorm + residual as one row-wise kernel (codegen/rowwise.py) is saved with its program and library
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
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
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
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
