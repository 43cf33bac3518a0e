"""The policy of kernels compiled for one shape (NOTE [Kernels for one shape], runtime/kernel.py
``specialized_launcher``), on the CPU with a stand-in for loading the module: the first SPECIALIZED_SHAPES shapes
of a kernel get one, later ones and failed ones run the generic kernel (None), a failure is logged and not retried,
and the switch turns it off. The kernels themselves: tests/gpu/test_specialized_kernels_gpu.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("cuda.bindings", reason="cuda-bindings is not installed (pip install 'fxopt[cuda]')")

from fxopt.runtime import driver, nvrtc  # noqa: E402 -- after the skip
from fxopt.runtime import kernel as kernel_module  # noqa: E402


class _Module:
    def function(self, name):
        return SimpleNamespace(launcher=lambda types: ("launcher", name, tuple(types)))


@pytest.fixture
def loads(monkeypatch):
    """The sources load_cuda was asked to compile (nothing is compiled)."""
    seen: list[tuple[str, str]] = []

    def load_cuda(source, *, device_index, name_hint="kernel", cubin=None):
        seen.append((source, name_hint))
        return _Module(), b"\x7fELF"

    monkeypatch.setattr(driver, "load_cuda", load_cuda)
    monkeypatch.setattr(nvrtc, "nvrtc_available", lambda: (True, "libnvrtc.so"))
    monkeypatch.setattr(kernel_module, "SPECIALIZE", True)
    return seen


def _kernel():
    return SimpleNamespace(name="k", device=torch.device("cuda", 0), _specializations={})


def test_each_shape_is_compiled_once(loads):
    k = _kernel()
    build = lambda: ("source", "k_s1")  # noqa: E731
    first = kernel_module.specialized_launcher(k, ("shape", 1), build, ["ptr", "i64"])
    again = kernel_module.specialized_launcher(k, ("shape", 1), build, ["ptr", "i64"])
    assert first == again == ("launcher", "k_s1", ("ptr", "i64"))
    assert loads == [("source", "k_s1")]


def test_only_the_first_shapes_get_a_kernel(loads, monkeypatch):
    monkeypatch.setattr(kernel_module, "SPECIALIZED_SHAPES", 3)
    k = _kernel()
    got = [kernel_module.specialized_launcher(k, i, lambda i=i: ("src", f"k_s{i}"), ["i64"]) for i in range(5)]
    assert [g is not None for g in got] == [True, True, True, False, False]
    assert len(loads) == 3
    # a shape that has its kernel keeps it past the limit
    assert kernel_module.specialized_launcher(k, 1, lambda: ("src", "other"), ["i64"]) == got[1]


def test_a_failure_is_logged_cached_and_not_retried(loads, caplog):
    k = _kernel()
    calls = []

    def build():
        calls.append(1)
        raise ValueError("zip() argument 2 is shorter than argument 1")

    with caplog.at_level(logging.WARNING, logger="fxopt.runtime.kernel"):
        assert kernel_module.specialized_launcher(k, "s", build, ["i64"]) is None
        assert kernel_module.specialized_launcher(k, "s", build, ["i64"]) is None
    assert calls == [1] and k._specializations == {"s": None}
    assert "no kernel for shape s" in caplog.text and "the generic kernel runs" in caplog.text


def test_the_switch_turns_it_off(loads, monkeypatch):
    monkeypatch.setattr(kernel_module, "SPECIALIZE", False)
    k = _kernel()
    assert kernel_module.specialized_launcher(k, "s", lambda: ("src", "k_s"), ["i64"]) is None
    assert loads == [] and k._specializations == {}


def test_without_nvrtc_the_generic_kernels_run_quietly(loads, monkeypatch, caplog):
    # a saved artifact loaded where NVRTC is missing has its generic binaries: no compile is tried, nothing warned
    monkeypatch.setattr(nvrtc, "nvrtc_available", lambda: (False, "libnvrtc.so not found"))
    k = _kernel()
    with caplog.at_level(logging.WARNING, logger="fxopt.runtime.kernel"):
        assert kernel_module.specialized_launcher(k, "s", lambda: ("src", "k_s"), ["i64"]) is None
    assert loads == [] and caplog.text == ""
