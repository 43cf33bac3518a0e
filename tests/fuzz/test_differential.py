"""Differential fuzzing: random models from tests/fuzz/model_generator.py, optimized by fxopt, compared with eager.

fxopt may decline to optimize (a pass rolled back by verification, a kernel that did not build), but it must never be
silently wrong or crash where eager works. Each case is checked on its example inputs, on new values of the same
signature, on other memory layouts of the same shapes, at another batch size, and with ``strict=True`` (see
``model_generator.run_case``).

* ``test_fixed_seeds``: a bounded list of seeds from a fixed base (the same cases on every run;
  ``FXOPT_FUZZ_CASES`` sets how many);
* ``test_fresh_seeds``: a few seeds (``FXOPT_FUZZ_FRESH``, default 5) drawn at random on every run, one test per
  seed with the seed in its id (``test_fresh_seeds[seed=123]``). tests/conftest.py draws them once per run and
  prints them in the report header (``fxopt fresh fuzz seeds (drawn at random): ...``) and again at the end of the
  log, with the failing ones and the command that re-runs them.

Re-running a seed from a CI log (pass a seed from the test id, the header or the summary line)::

    FXOPT_FUZZ_SEED=123 python -m pytest tests/fuzz -k fresh            # one seed, as CI ran it
    FXOPT_FUZZ_SEEDS=123,456 python -m pytest tests/fuzz -k fresh       # several
    python tests/fuzz/model_generator.py 123                            # its model listing and pass table

Findings that are known bugs (each has a strict-xfail regression test in test_regressions.py) make a case xfail
instead of fail; when a regression test starts to XPASS, remove its entry from KNOWN_BUGS. Passes rolled back by
verification are not failures (the output is still right), but each is a bug in that pass: they are reported as
``FuzzRollbackWarning`` in the warnings summary.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch


def _load_generator():
    name = "fxopt_fuzz_model_generator"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("model_generator.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve the module by name while the file runs
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()

BASE_SEED = 20_250_000
N_FIXED = int(os.environ.get("FXOPT_FUZZ_CASES", "40"))
N_FRESH = int(os.environ.get("FXOPT_FUZZ_FRESH", "5"))
FIXED_SEEDS = [BASE_SEED + i for i in range(N_FIXED)]


class FuzzRollbackWarning(UserWarning):
    """A pass was rolled back by fxopt's verification on a generated model (a bug in that pass, caught)."""


@dataclasses.dataclass(frozen=True)
class KnownBug:
    """A finding already tracked by a strict-xfail regression test in test_regressions.py."""

    regression_test: str
    reason: str
    kinds: tuple[str, ...] = ("mismatch", "error")
    where: str = ".*"  # regex on Finding.where (which call)
    message: str = ".*"  # regex on Finding.message
    culprit: str | None = None  # regex on the pass(es) whose disabling makes it go away (None: anything, or none)

    def matches(self, f) -> bool:
        return (f.kind in self.kinds and re.search(self.where, f.where) is not None
                and re.search(self.message, f.message, re.S) is not None
                and (self.culprit is None or re.fullmatch(self.culprit, f.culprit or "") is not None))


_ALIAS_PASSES = r"(functionalize_inplace|fuse_elementwise)(\+(functionalize_inplace|fuse_elementwise))?"
_LAYOUT_PASSES = r"(remove_identity|functionalize_inplace|fuse_elementwise)" \
                 r"(\+(remove_identity|functionalize_inplace|fuse_elementwise))?"

KNOWN_BUGS = [
]


def known_bug(f) -> KnownBug | None:
    return next((b for b in KNOWN_BUGS if b.matches(f)), None)


def _fresh_seeds() -> list[int]:
    """The fresh seeds of this run: tests/conftest.py puts them in $FXOPT_FUZZ_SEEDS (drawn at random unless given,
    NOTE [Fresh fuzz seeds]); $FXOPT_FUZZ_SEED names one. Drawn here only if this file runs without that conftest."""
    text = (os.environ.get("FXOPT_FUZZ_SEEDS") or os.environ.get("FXOPT_FUZZ_SEED") or "").strip()
    if text:
        return [int(s) for s in re.split(r"[,\s]+", text) if s]
    return [random.SystemRandom().randrange(2 ** 31) for _ in range(N_FRESH)]


def _check(seed: int) -> list[str]:
    """Run one case; returns the known bugs it hit, fails the test on anything unknown."""
    result = gen.run_case(seed, backend="cpp")
    for name, why in result.rollbacks:
        warnings.warn(f"seed {seed}: pass {name} rolled back: {why.splitlines()[0][:200]}", FuzzRollbackWarning,
                      stacklevel=2)
    for note in result.compile_fallbacks:
        warnings.warn(f"seed {seed}: {note.splitlines()[0][:200]}", FuzzRollbackWarning, stacklevel=2)
    unknown = [f for f in result.findings if known_bug(f) is None]
    assert not unknown, (
        f"fxopt differs from eager on fuzz seed {seed} (re-run: FXOPT_FUZZ_SEED={seed} python -m pytest tests/fuzz "
        f"-k fresh; its listing and pass table: python tests/fuzz/model_generator.py {seed}):\n{result.report()}")
    return sorted({known_bug(f).regression_test for f in result.findings})


@pytest.mark.parametrize("seed", FIXED_SEEDS, ids=lambda s: f"seed={s}")
def test_fixed_seeds(seed):
    known = _check(seed)
    if known:
        pytest.xfail(f"known bugs (see test_regressions.py): {', '.join(known)}")


@pytest.mark.parametrize("seed", _fresh_seeds(), ids=lambda s: f"seed={s}")
def test_fresh_seeds(seed):
    known = _check(seed)
    if known:
        pytest.xfail(f"known bugs (see test_regressions.py): {', '.join(known)}")


def test_generator_is_deterministic():
    a_model, a_inputs, a_desc = gen.generate(BASE_SEED + 7)
    b_model, b_inputs, b_desc = gen.generate(BASE_SEED + 7)
    assert a_desc == b_desc
    for a, b in zip(a_inputs, b_inputs):
        assert a.stride() == b.stride() and torch.equal(a.nan_to_num(), b.nan_to_num())
    with torch.no_grad():
        ya, yb = a_model(*a_inputs), b_model(*b_inputs)
    assert gen.compare_outputs(ya, yb, a_model.output_precision) is None


def test_generator_covers_the_op_vocabulary():
    """The fixed seeds together exercise every family the generator knows (it must not quietly degenerate)."""
    text = "\n".join(gen.generate(s)[2] for s in range(BASE_SEED, BASE_SEED + 150))
    for needle in ["Conv2d", "F.conv2d", "BatchNorm2d", "F.batch_norm", "Linear", "F.linear", "pool[", "softmax",
                   "log_softmax", "layer_norm", "sum[", "amax[", "reshape", "permute", "transpose", "torch.cat",
                   "torch.stack", "cast[", "in-place", "setitem", "Dropout", "Identity", "buffer[", "param[",
                   "where[", "maximum[", "int[", "expand", "force_export", "nan/inf", "(transposed",
                   "(channels_last", "float16", "bfloat16", "float64", "reads the other alias"]:
        assert needle in text, f"no generated model uses {needle!r}"


# Seeds of benchmarks/fuzz_gpu.py's CPU runs of 2026-12-01 (its default dtype mix, up to 24 nodes) that failed before
# their fixes: the static memory estimate raising inside optimize (9900473, 9901000), a verification run on a dense
# copy of an expanded input while the real call got the overlapping tensor (9900137), the dispatched-op count
# raising under the dispatch mode (7701018), the harness comparing after eager wrote into the input (20262231).
_FUZZ_GPU_DTYPES = (torch.float32,) * 4 + (torch.float16,) * 3 + (torch.bfloat16,) * 3 + (torch.float64,)


@pytest.mark.parametrize("seed, max_nodes", [(9900137, 24), (9900473, 24), (9901000, 24), (7701018, 20),
                                             (20262231, 16)])
def test_seeds_found_by_the_cpu_campaign(seed, max_nodes):
    result = gen.run_case(seed, backend="cpp", max_nodes=max_nodes, dtypes=_FUZZ_GPU_DTYPES)
    assert not result.findings, [str(f)[:300] for f in result.findings]
