"""Timing, memory and environment facts for reports: median of many synchronized calls after warm-up."""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import io
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_sync = sync  # the name benchmarks/ used


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """Median, p99 and min of ``samples`` (microseconds), and how many there were."""
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered),
        "p99_us": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "min_us": ordered[0],
        "calls": len(ordered),
    }


def measure_latency(fn: Callable[..., Any], inputs: Sequence[Any], device: torch.device, *, warmup: int = 10,
                    iters: int = 100, min_seconds: float = 0.0) -> dict[str, float]:
    """End-to-end latency of ``fn(*inputs)`` in microseconds: each call timed on the host with a device sync
    after it, so it includes launch overhead (the thing fxopt removes). Returns median, p99, min, and count."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        sync(device)
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < max(1, iters) or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            fn(*inputs)
            sync(device)
            samples.append((time.perf_counter() - t0) * 1e6)
    return percentiles(samples)


# NOTE [Interleaved timing]: systems timed one after the other on a shared or drifting host are not comparable (the
# 2-core CPU machines gave fxopt 0.67x to 1.52x of eager over five runs of the same report; the lent GPU machines
# drift by up to 2x within a minute). So every figure of a report is timed in rounds: in round r each system runs one
# block of calls, the order rotated by r (each system takes every position as often as the others), every block of a
# system lasting about as long as the others' (``min_block_s``), Python's garbage collector off meanwhile. A burst
# of load then slows one round of every system instead of all of one system.
# The figures are medians over the rounds: a system's latency is the median of its per-round medians, and a speedup
# (eager over a system) the median of the per-round ratios, which are paired: both medians of a round were taken
# within a few blocks of each other. On a loaded host the calls of one system are bimodal (a call whose threads were
# descheduled takes 10-100x longer), and the median over all calls jumps between the modes with the share of slow
# calls; the per-round ratio cancels what a round's load did to both. p99 and min are over all calls. The spread is
# the interquartile range over the rounds (of the medians, or of the ratios for a speedup); a figure whose spread is
# wider than UNSTABLE_SPREAD of it is marked unstable: its median alone would claim more than the machine can tell.
UNSTABLE_SPREAD = 0.25
BLOCK_OVERRUN = 10
MIN_ROUNDS = 3  # rounds run whatever the time budget: fewer give no spread worth the name


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values`` (inclusive method; one value: itself thrice)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    q1, q2, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return q1, q2, q3


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, extremes and relative interquartile range (IQR over the median) of per-round figures."""
    q1, q2, q3 = quartiles(values)
    return {"median": q2, "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "rel_iqr": (q3 - q1) / q2 if q2 else float("inf")}


def round_ratios(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, float] | None:
    """The speedup of ``other`` over ``reference`` round by round (reference's round median over other's), as
    :func:`spread` gives it; None unless both were timed in the same rounds by :func:`measure_interleaved`."""
    a, b = reference.get("round_medians_us"), other.get("round_medians_us")
    if not a or not b or len(a) != len(b) or not all(b):
        return None
    return spread([x / y for x, y in zip(a, b)])


def rotated(names: Sequence[str], r: int) -> list[str]:
    """Round ``r``'s order: ``names`` rotated left by ``r``."""
    k = r % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def measure_interleaved(systems: dict[str, Callable[..., Any]], inputs: Sequence[Any], device: torch.device, *,
                        warmup: int = 20, iters: int = 300, rounds: int = 10, min_block_s: float = 0.0,
                        max_seconds: float | None = None,
                        failures: dict[str, BaseException] | None = None) -> dict[str, dict[str, Any]]:
    """Time several systems in ``rounds`` rounds, each system one block per round in rotated order (NOTE
    [Interleaved timing]); every call is timed on the host with a device sync after it, as in
    :func:`measure_latency`. A block has at least ``iters / rounds`` calls (so each system gets at least ``iters``)
    and lasts at least ``min_block_s`` seconds (the call count from the warm-up's timing).

    Returns {name: percentiles, where ``median_us`` is the median of the per-round medians and ``median_all_us``
    the median over all calls, + ``rounds``, ``block_calls``, ``round_medians_us`` and ``spread`` (of the per-round
    medians, :func:`spread`)}; :func:`round_ratios` turns two of them into a ratio with its spread. A block that
    runs ``BLOCK_OVERRUN`` times longer than planned ends early (fewer calls than ``iters`` then); once the rounds
    have taken ``max_seconds``, no new round starts after the third (``rounds`` says how many ran). A system that
    raises stops the measurement, unless ``failures`` is given: it then gets the exception, the system is left out
    of the result and the others go on."""
    names = list(systems)
    rounds = max(1, rounds)
    least = max(1, math.ceil(iters / rounds))
    samples: dict[str, list[float]] = {name: [] for name in names}
    per_round: dict[str, list[float]] = {name: [] for name in names}
    block: dict[str, int] = {}
    limit: dict[str, float] = {}
    live = list(names)

    def failed(name: str, e: Exception) -> None:
        if failures is None:
            raise e
        failures[name] = e
        live.remove(name)

    with torch.no_grad():
        for name in names:
            fn = systems[name]
            try:
                for _ in range(warmup):
                    fn(*inputs)
                sync(device)
                t0 = time.perf_counter()  # a few more calls say how long one takes: the block's length in calls
                probe = max(1, min(5, least))
                for _ in range(probe):
                    fn(*inputs)
                    sync(device)
                each = (time.perf_counter() - t0) / probe
            except Exception as e:  # noqa: BLE001 -- re-raised by failed() unless the caller collects failures
                failed(name, e)
                continue
            block[name] = max(least, min(100_000, math.ceil(min_block_s / each) if each > 0 else least))
            # a block whose calls turn slow (a loaded host) ends after BLOCK_OVERRUN times its planned time
            limit[name] = BLOCK_OVERRUN * max(min_block_s, block[name] * each, 1e-3)
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        began_rounds = time.perf_counter()
        done = 0
        try:
            for r in range(rounds):
                if max_seconds is not None and r >= MIN_ROUNDS and time.perf_counter() - began_rounds > max_seconds:
                    break
                done += 1
                for name in rotated([n for n in names if n in live], r):
                    fn, out = systems[name], samples[name]
                    start = len(out)
                    try:
                        began = time.perf_counter()
                        for _ in range(block[name]):
                            t0 = time.perf_counter()
                            fn(*inputs)
                            sync(device)
                            t1 = time.perf_counter()
                            out.append((t1 - t0) * 1e6)
                            if t1 - began > limit[name]:
                                break
                    except Exception as e:  # noqa: BLE001 -- re-raised by failed() unless failures are collected
                        failed(name, e)
                        continue
                    per_round[name].append(statistics.median(out[start:]))
        finally:
            if was_enabled:
                gc.enable()
    result = {}
    for name in live:
        stats = percentiles(samples[name])
        stats.update(median_all_us=stats["median_us"], median_us=statistics.median(per_round[name]), rounds=done,
                     block_calls=block[name], round_medians_us=per_round[name], spread=spread(per_round[name]))
        result[name] = stats
    return result


_KINETO_LINE = re.compile(r"^(STAGE|USDT):\S+ \S+ \d+:\d+ \S+\.cpp:\d+\] ")


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Keep Kineto's ``STAGE:`` / ``USDT:`` lines, which it writes straight to file descriptor 2 on every profile,
    out of the terminal; anything else written to stderr meanwhile is passed on."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr is not a file (captured): nothing to do
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            text = held.read().decode(errors="replace")
            rest = "".join(line for line in text.splitlines(keepends=True) if not _KINETO_LINE.match(line))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


def free_memory(device: torch.device) -> None:
    """Drop what earlier measurements left behind, so the next system's memory numbers are its own (CUDA only:
    off CUDA no memory is measured, and a full collection costs a few hundred ms once torch is imported)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def allocated_bytes(device: torch.device) -> int | None:
    """Bytes held by tensors on ``device`` now (CUDA caching allocator); None off CUDA (not tracked)."""
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.memory_allocated(device)


def forward_peak_bytes(fn: Callable[..., Any], inputs: Sequence[Any], device: torch.device) -> int | None:
    """Peak extra device memory of one call of ``fn`` (activations, workspaces, outputs) over what was allocated
    before it; None off CUDA: the CPU allocator keeps no statistics (tracemalloc does not see torch's)."""
    if device.type != "cuda":
        return None
    free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        out = fn(*inputs)
        sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return max(0, int(peak))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version as nvidia-smi prints it (e.g. 550.54.15); None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    first = done.stdout.strip().splitlines()
    return first[0].strip() if done.returncode == 0 and first else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    """``git -C <the fxopt checkout> ARGS``'s output, or None outside a git checkout (or without git).

    ``--no-optional-locks``: ``describe --dirty`` refreshes the index's stat cache and would write it back when it
    can lock it; several people and scripts share a checkout, and a report must never take the index lock from
    someone's ``git commit``."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _git_commit() -> str | None:
    """The commit of the fxopt checkout the report ran from (None outside a git checkout)."""
    return _git("rev-parse", "HEAD")


def git_describe() -> str | None:
    """``git describe --always --dirty`` of the fxopt checkout: the commit, and ``-dirty`` when the working tree
    differs from it (the figures then came from code no commit holds). None outside a git checkout. Every report and
    benchmark JSON records it through :func:`environment`."""
    return _git("describe", "--always", "--dirty")


def host_load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): load above the core count means other
    processes competed with the timing."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, driver, torch version, date: stamped on every report."""
    from .. import __version__ as fxopt_version

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "fxopt": fxopt_version,
        "fxopt_commit": _git_commit(),
        "git_describe": git_describe(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "device": str(device),
        "device_name": _cpu_name(),
        "driver": None,
        "cuda": torch.version.cuda,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": host_load(),
        "packages": {name: _version(name) for name in
                     ("tabulate", "networkx", "matplotlib", "pydot", "numpy", "torch_tensorrt", "nvidia-cuda-nvrtc", "cuda-bindings",
                      "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", device_memory_bytes=props.total_memory)
        env["driver"] = _nvidia_driver()
        get_driver = getattr(torch._C, "_cuda_getDriverVersion", None)
        try:
            env["cuda_driver_api"] = get_driver() if get_driver is not None else None
        except Exception:  # noqa: BLE001 -- informational only
            env["cuda_driver_api"] = None
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["cudnn"] = torch.backends.cudnn.version()
    return env
