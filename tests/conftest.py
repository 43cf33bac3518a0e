"""Shared test helpers. Tests marked `cuda` need a GPU and are skipped without one (run them on the GPU machine
with `python -m pytest -m cuda`)."""

from __future__ import annotations

import pytest
import torch

from fxopt.launches import dispatched_ops


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: python -m pytest -m cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def assert_launches(fn, inputs, expected: int) -> None:
    """fxopt's version of tinygrad's check_schedule: the number of ATen compute ops one call dispatches."""
    ops = dispatched_ops(fn, inputs)
    got = sum(ops.values())
    assert got == expected, f"expected {expected} dispatched ops, got {got}: {dict(ops)}"


@pytest.fixture(autouse=True)
def _isolated_kernel_cache(tmp_path_factory, monkeypatch):
    """Compiled kernels go to a per-session temporary cache, never the user's ~/.cache."""
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fxopt-cache"))


@pytest.fixture(autouse=True, scope="session")
def _native_call_path_ready(tmp_path_factory):
    """Build the compiled call path (runtime/native.py) once, before any test: otherwise it would attach to kernels
    in the middle of the session, and which path a test exercised would depend on timing."""
    import os

    from fxopt.runtime import native

    saved = os.environ.get("FXOPT_CACHE_DIR")
    os.environ["FXOPT_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "fxopt-cache")
    try:
        native.wait(timeout=600)
    finally:
        if saved is None:
            os.environ.pop("FXOPT_CACHE_DIR", None)
        else:
            os.environ["FXOPT_CACHE_DIR"] = saved


@pytest.fixture()
def native_module(_native_call_path_ready):
    """The loaded native extension (runtime/native.py); the test fails, with why, where it did not build."""
    from fxopt.runtime import native

    mod = native.module()
    if mod is None:
        pytest.fail(f"the native call path did not build here: {native.status()}")
    return mod


def pytest_addoption(parser):
    parser.addoption("--python-replay", action="store_true",
                     help="CUDA-graph runners replay through the Python closure unless a test asks for the native "
                          "replay (NOTE [Native graph call]): the GPU suite over the other call path")


def pytest_configure(config):
    if config.getoption("--python-replay", default=False):
        from fxopt.runtime import cudagraph

        cudagraph.NATIVE_REPLAY_DEFAULT = False
