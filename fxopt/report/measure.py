"""Timing, memory and environment facts for reports: median of many synchronized calls after warm-up."""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import io
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


def measure_interleaved(systems: dict[str, Callable[..., Any]], inputs: Sequence[Any], device: torch.device, *,
                        warmup: int = 20, iters: int = 300, rounds: int = 10) -> dict[str, dict[str, float]]:
    """``measure_latency`` for several systems at once, in ``rounds`` alternating blocks of ``iters / rounds``
    calls each, so a host that drifts while they are measured (the lent GPU machines do, by up to 2x within a
    minute) moves every system alike and their ratios stay fair. Returns {name: percentiles}."""
    samples: dict[str, list[float]] = {name: [] for name in systems}
    per_round = max(1, iters // rounds)
    with torch.no_grad():
        for fn in systems.values():
            for _ in range(warmup):
                fn(*inputs)
        sync(device)
        for _ in range(rounds):
            for name, fn in systems.items():
                out = samples[name]
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn(*inputs)
                    sync(device)
                    out.append((time.perf_counter() - t0) * 1e6)
    return {name: percentiles(v) for name, v in samples.items()}


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


def _git_commit() -> str | None:
    """The commit of the fxopt checkout the report ran from (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, driver, torch version, date: stamped on every report."""
    from .. import __version__ as fxopt_version

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "fxopt": fxopt_version,
        "fxopt_commit": _git_commit(),
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
        "packages": {name: _version(name) for name in
                     ("tabulate", "networkx", "matplotlib", "pydot", "torch_tensorrt", "nvidia-cuda-nvrtc")},
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
