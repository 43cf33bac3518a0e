"""benchmarks/pdl_probe.py on the CPU: its chain kernels compile with NVRTC for sm_90 (griddepcontrol) and for an
older architecture (the guard), the launch arguments it packs for a stand-in driver, its reference, --help, and the
message without a GPU."""

from __future__ import annotations

import importlib.util
import ctypes
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fxopt.runtime import nvrtc

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "pdl_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("_bench_pdl_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def have_nvrtc():
    ok, why = nvrtc.nvrtc_available()
    if not ok:
        pytest.skip(why)


def test_every_variant_uses_a_known_kernel(probe):
    for name, positions in {**probe.VARIANTS, **probe.RACY}.items():
        for kernel, pdl in positions:
            assert kernel in probe.KERNELS, name
            wait, _ = probe.KERNELS[kernel]
            assert pdl or not wait, f"{name}: a griddepcontrol.wait kernel launched without PDL measures nothing"


def test_source_guards_griddepcontrol(probe):
    plain = probe.kernel_source("k", False, False)
    assert "griddepcontrol" not in plain and "__CUDA_ARCH__" not in plain
    source = probe.kernel_source("k", True, True)
    guard = source.index("#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900")
    wait = source.index("griddepcontrol.wait;")
    trigger = source.index("griddepcontrol.launch_dependents;")
    assert guard < wait < trigger < source.index("#endif") < source.index("y[i] = x[i] * a + b")


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_kernels_compile(probe, have_nvrtc, arch):
    for name, flags in probe.KERNELS.items():
        cubin = nvrtc.compile_cuda(probe.kernel_source(name, *flags), arch=arch, name_hint=f"pdl_{name}")
        assert cubin.startswith(b"\x7fELF"), name
        assert name.encode() in cubin, name
    whole = nvrtc.compile_cuda(probe.chain_source(), arch=arch, name_hint="pdl_chain")
    assert all(name.encode() in whole for name in probe.KERNELS)


def _unpack(address: int) -> tuple:
    slots = (ctypes.c_void_p * 5).from_address(address)
    kinds = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_float, ctypes.c_int64)
    return tuple(kind.from_address(slot).value for kind, slot in zip(kinds, slots))


def test_launch_arguments(probe):
    from cuda.bindings import driver as cu

    seen = []

    def launch_ex(config, fn, params, extra):
        attr = config.attrs[0]
        seen.append(("ex", fn, int(config.hStream), config.gridDimX, config.blockDimX, config.numAttrs, attr.id,
                     attr.value.programmaticStreamSerializationAllowed, _unpack(params)))
        return (cu.CUresult.CUDA_SUCCESS,)

    def launch(fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        seen.append(("plain", fn, stream, gx, bx, _unpack(params)))
        return (cu.CUresult.CUDA_SUCCESS,)

    def check(err, what):
        assert err == cu.CUresult.CUDA_SUCCESS, what

    fake = types.SimpleNamespace(CUlaunchAttribute=cu.CUlaunchAttribute, CUlaunchAttributeID=cu.CUlaunchAttributeID,
                                 CUlaunchConfig=cu.CUlaunchConfig, cuLaunchKernelEx=launch_ex, cuLaunchKernel=launch)
    plain, pdl = (probe.make_launch(fake, check, "fn", flag, 1000) for flag in (False, True))
    plain(7, 0x1000, 0x2000)
    pdl(8, 0x3000, 0x4000)
    pdl(9, 0x5000, 0x6000)
    attribute = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert seen == [("plain", "fn", 7, 4, 256, (0x1000, 0x2000, 1.0, 1.0, 1000)),
                    ("ex", "fn", 8, 4, 256, 1, attribute, 1, (0x3000, 0x4000, 1.0, 1.0, 1000)),
                    ("ex", "fn", 9, 4, 256, 1, attribute, 1, (0x5000, 0x6000, 1.0, 1.0, 1000))]


def test_pdl_unavailable(probe):
    from cuda.bindings import driver as cu

    assert "sm_90" in probe.pdl_unavailable(cu, (8, 9))
    assert probe.pdl_unavailable(cu, (9, 0)) is None
    assert "cuLaunchKernelEx" in probe.pdl_unavailable(types.SimpleNamespace(CUlaunchAttributeID=None), (9, 0))


@pytest.mark.parametrize("kernels", [1, 4, 5])
def test_reference_follows_the_ping_pong(probe, kernels):
    x0 = torch.arange(6, dtype=torch.float32)
    assert torch.equal(probe.reference(x0, kernels, 1), x0 + kernels)
    # replays start from bufs[0]: after an odd chain it holds step K - 1, after an even one step K
    per_replay = kernels if kernels % 2 == 0 else kernels - 1
    assert torch.equal(probe.reference(x0, kernels, 3), x0 + 2 * per_replay + kernels)


def test_help():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--kernels", "--numel", "--rounds", "--replays", "--out", "--racy-control"):
        assert flag in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_no_gpu_message(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "no CUDA GPU" in done.stderr
    assert not list(tmp_path.iterdir())
