"""Interleaved timing (NOTE [Interleaved timing] in fxopt/report/measure.py) and the commit stamp, on CPU with fake
systems and a fake clock: the order of the rounds, the figures, drift cancelling, the time budget, failures."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxopt.report import measure

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    """perf_counter for measure.py: only the fake systems move it (by their cost times the host's load now)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(measure.time, "perf_counter", c)
    return c


def system(clock, cost_us, log=None, name=None, load=lambda t: 1.0):
    def fn(*args):
        if log is not None:
            log.append(name)
        clock.now += cost_us * 1e-6 * load(clock.now)

    return fn


def test_rounds_rotate_the_order_and_give_every_system_its_calls(clock):
    log = []
    systems = {n: system(clock, 100, log, n) for n in "abc"}
    out = measure.measure_interleaved(systems, (), CPU, warmup=2, iters=30, rounds=6)
    # after the warm-up (2 + 5 probe calls each), round r runs blocks in the order rotated left by r
    timed = log[3 * 7:]
    blocks = [timed[i] for i in range(0, len(timed), 5)]
    assert blocks == list("abc" "bca" "cab" "abc" "bca" "cab")
    assert all(timed[i:i + 5] == [timed[i]] * 5 for i in range(0, len(timed), 5))  # whole blocks
    for name in "abc":
        st = out[name]
        assert st["calls"] == 30 and st["rounds"] == 6 and st["block_calls"] == 5
        assert st["round_medians_us"] == pytest.approx([100.0] * 6)
        assert st["median_us"] == pytest.approx(100.0) and st["spread"]["rel_iqr"] == pytest.approx(0.0)


def test_block_length_follows_min_block_s(clock):
    systems = {"fast": system(clock, 10), "slow": system(clock, 1000)}
    out = measure.measure_interleaved(systems, (), CPU, warmup=1, iters=3, rounds=3, min_block_s=0.01)
    assert 1000 <= out["fast"]["block_calls"] <= 1001 and 10 <= out["slow"]["block_calls"] <= 11  # 10 ms each
    assert out["fast"]["calls"] == 3 * out["fast"]["block_calls"]


def test_interleaving_cancels_drift_that_one_after_the_other_does_not(clock):
    # the host gets 3x slower over the measurement: B costs 2x A at every moment
    def load(t):
        return 1.0 + 2.0 * min(1.0, t / 0.2)

    a, b = system(clock, 100, load=load), system(clock, 200, load=load)
    inter = measure.measure_interleaved({"a": a, "b": b}, (), CPU, warmup=1, iters=200, rounds=20)
    ratio = measure.round_ratios(inter["b"], inter["a"])
    assert ratio["median"] == pytest.approx(2.0, rel=0.05)
    assert ratio["q3"] - ratio["q1"] < 0.2
    clock.now = 0.0
    first = measure.measure_latency(a, (), CPU, warmup=1, iters=500)
    second = measure.measure_latency(b, (), CPU, warmup=1, iters=500)
    assert abs(second["median_us"] / first["median_us"] - 2.0) > 0.5  # sequential timing gets the ratio wrong


def test_the_median_is_over_rounds_and_a_burst_widens_the_spread(clock):
    state = {"round_calls": 0}

    def noisy(*args):  # every call of the third round is 5x slower (after the 5 calls that size the blocks)
        state["round_calls"] += 1
        clock.now += (500 if 5 + 2 * 10 < state["round_calls"] <= 5 + 3 * 10 else 100) * 1e-6

    out = measure.measure_interleaved({"x": noisy}, (), CPU, warmup=0, iters=50, rounds=5)
    st = out["x"]
    assert st["round_medians_us"] == pytest.approx([100.0, 100.0, 500.0, 100.0, 100.0])
    assert st["median_us"] == pytest.approx(100.0)  # the median of the rounds' medians ignores one bad round
    assert st["spread"]["max"] == pytest.approx(500.0) and st["spread"]["min"] == pytest.approx(100.0)


def test_a_block_that_overruns_its_time_ends_early(clock):
    state = {"n": 0}

    def stalls(*args):  # fast while the blocks are sized, then every call 100x slower
        state["n"] += 1
        clock.now += (100 if state["n"] <= 5 else 15_000) * 1e-6

    out = measure.measure_interleaved({"x": stalls}, (), CPU, warmup=0, iters=50, rounds=3)
    # planned: 17 calls (50 / 3 rounds) of 100 µs = 1.7 ms; allowed BLOCK_OVERRUN x that = 17 ms; at 15 ms a call
    # each block ends after its second call instead of running 17 x 15 ms
    assert measure.BLOCK_OVERRUN == 10
    assert out["x"]["calls"] == 3 * 2 and out["x"]["rounds"] == 3 and out["x"]["block_calls"] == 17


def test_spread_and_round_ratios():
    sp = measure.spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (sp["q1"], sp["median"], sp["q3"], sp["min"], sp["max"]) == (2.0, 3.0, 4.0, 1.0, 5.0)
    assert sp["rel_iqr"] == pytest.approx(2.0 / 3.0)
    assert measure.spread([7.0])["rel_iqr"] == 0.0
    r = measure.round_ratios({"round_medians_us": [200.0, 400.0, 300.0]}, {"round_medians_us": [100.0, 100.0, 200.0]})
    assert r["median"] == pytest.approx(2.0) and r["min"] == pytest.approx(1.5) and r["max"] == pytest.approx(4.0)
    assert measure.round_ratios({"round_medians_us": [1.0]}, {"round_medians_us": [1.0, 2.0]}) is None
    assert measure.round_ratios({"median_us": 3.0}, {"round_medians_us": [1.0]}) is None
    assert measure.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_time_budget_stops_new_rounds_after_the_minimum(clock):
    out = measure.measure_interleaved({"x": system(clock, 1000)}, (), CPU, warmup=0, iters=10, rounds=50,
                                      max_seconds=0.0)
    assert out["x"]["rounds"] == measure.MIN_ROUNDS and len(out["x"]["round_medians_us"]) == measure.MIN_ROUNDS


def test_a_system_that_raises_is_collected_and_the_others_go_on(clock):
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        clock.now += 1e-4
        if calls["n"] > 12:
            raise RuntimeError("broke in round 2")

    good = system(clock, 100)
    failures = {}
    out = measure.measure_interleaved({"flaky": flaky, "good": good}, (), CPU, warmup=1, iters=20, rounds=4,
                                      failures=failures)
    assert set(out) == {"good"} and len(out["good"]["round_medians_us"]) == 4
    assert str(failures["flaky"]) == "broke in round 2"
    with pytest.raises(RuntimeError, match="broke"):
        calls["n"] = 0
        measure.measure_interleaved({"flaky": flaky}, (), CPU, warmup=1, iters=20, rounds=4)


def test_git_describe_is_what_git_says_and_in_every_environment():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    want = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    assert measure.git_describe() == want and want
    env = measure.environment(CPU)
    assert env["git_describe"] == want
    short = want.removesuffix("-dirty").rsplit("-g", 1)[-1]  # "TAG-N-gHASH" where a tag exists, else "HASH"
    assert env["fxopt_commit"].startswith(short)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmarks_import_on_cpu_and_time_interleaved(clock):
    cudagraphs = _load_script("bench_cudagraphs")
    assert cudagraphs.measure_interleaved is measure.measure_interleaved
    fusion = _load_script("bench_fusion")
    assert callable(fusion.time_interleaved) and callable(fusion.prepare_system)
    sweep = _load_script("sweep_torchvision")
    row = sweep.time_interleaved({"eager": system(clock, 300), "fxopt": system(clock, 100)}, [], CPU)
    assert row["latency_eager_us"] == pytest.approx(300.0) and row["latency_fxopt_us"] == pytest.approx(100.0)
    assert row["fxopt_x_eager"] == pytest.approx(3.0) and row["fxopt_x_eager_iqr"] == pytest.approx([3.0, 3.0])
