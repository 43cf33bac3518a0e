"""Shared test helpers and markers.

* ``cuda``: needs a GPU; skipped without one (run them on the GPU machine with ``python -m pytest -m cuda``).
* ``slow``: long-running; skipped unless ``--runslow`` is given or ``-m`` names them (``python -m pytest -m slow``).
* Fresh fuzz seeds (tests/fuzz/test_differential.py) are drawn here, once per run, printed in the report header and
  again in the terminal summary, so a failing one can be re-run: ``FXOPT_FUZZ_SEEDS=... python -m pytest tests/fuzz
  -k fresh``.
"""

from __future__ import annotations

import os
import random
import re

import pytest
import torch

from fxopt.launches import dispatched_ops

# NOTE [Fresh fuzz seeds]: the seeds are fixed at configure time and stored in the environment, so the test module
# (which parametrizes over them, one test id per seed), the report header, the terminal summary and any worker
# process started later all see the same list.
FUZZ_SEEDS_ENV = "FXOPT_FUZZ_SEEDS"
FUZZ_SEED_ENV = "FXOPT_FUZZ_SEED"  # one seed: FXOPT_FUZZ_SEED=123 is FXOPT_FUZZ_SEEDS=123


def fresh_fuzz_seeds() -> list[int]:
    """The fresh fuzz seeds of this run: from $FXOPT_FUZZ_SEEDS (comma or space separated) or $FXOPT_FUZZ_SEED."""
    text = (os.environ.get(FUZZ_SEEDS_ENV) or os.environ.get(FUZZ_SEED_ENV) or "").strip()
    try:
        return [int(s) for s in re.split(r"[,\s]+", text) if s]
    except ValueError:
        raise pytest.UsageError(f"${FUZZ_SEEDS_ENV}/${FUZZ_SEED_ENV} must be integers separated by commas, "
                                f"got {text!r}") from None


def _fuzz_rerun_hint(seeds: list[int]) -> str:
    return f"{FUZZ_SEEDS_ENV}={','.join(map(str, seeds))} python -m pytest tests/fuzz -k fresh"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (skipped by default)")
    parser.addoption("--python-replay", action="store_true",
                     help="CUDA-graph runners replay through the Python closure unless a test asks for the native "
                          "replay (NOTE [Native graph call]): the GPU suite over the other call path")


def pytest_configure(config):
    if config.getoption("--python-replay", default=False):
        from fxopt.runtime import cudagraph

        cudagraph.runner.NATIVE_REPLAY_DEFAULT = False  # where CUDAGraphRunner() reads it
    seeds = fresh_fuzz_seeds()
    config._fxopt_fuzz_seeds_given = bool(seeds)
    if not seeds:
        n = int(os.environ.get("FXOPT_FUZZ_FRESH", "5"))
        seeds = [random.SystemRandom().randrange(2**31) for _ in range(n)]
        os.environ[FUZZ_SEEDS_ENV] = ",".join(map(str, seeds))  # NOTE [Fresh fuzz seeds]
    config._fxopt_fuzz_seeds = seeds


def pytest_report_header(config):
    seeds = getattr(config, "_fxopt_fuzz_seeds", [])
    how = f"from ${FUZZ_SEEDS_ENV}" if getattr(config, "_fxopt_fuzz_seeds_given", False) else "drawn at random"
    return [f"fxopt fresh fuzz seeds ({how}): {', '.join(map(str, seeds)) or 'none'}; re-run: "
            f"{_fuzz_rerun_hint(seeds)}"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ran = [r for key in ("passed", "failed", "xfailed", "error") for r in terminalreporter.stats.get(key, [])
           if "test_fresh_seeds[" in getattr(r, "nodeid", "")]
    if not ran:
        return
    failed = sorted({int(m.group(1)) for r in ran if r.outcome != "passed" and not hasattr(r, "wasxfail")
                     for m in [re.search(r"test_fresh_seeds\[seed=(\d+)\]", r.nodeid)] if m})
    seeds = getattr(config, "_fxopt_fuzz_seeds", [])
    terminalreporter.write_sep("-", "fxopt fuzz")
    terminalreporter.write_line(f"fresh fuzz seeds: {', '.join(map(str, seeds))}")
    if failed:
        terminalreporter.write_line(f"FAILED fresh fuzz seeds: {', '.join(map(str, failed))}; re-run: "
                                    f"{_fuzz_rerun_hint(failed)}")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or re.search(r"\bslow\b", config.option.markexpr or "") is not None
    skip_slow = pytest.mark.skip(reason="slow: long-running, skipped by default; run with --runslow or -m slow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: python -m pytest -m cuda)")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("slow") is not None and not run_slow:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)


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

