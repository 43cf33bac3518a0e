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
