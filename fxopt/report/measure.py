"""Timing and environment facts for reports: median of many synchronized calls after warm-up."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[..., Any], inputs: Sequence[Any], device: torch.device, *, warmup: int = 10,
                    iters: int = 100, min_seconds: float = 0.0) -> dict[str, float]:
    """End-to-end latency of ``fn(*inputs)`` in microseconds: each call timed on the host with a device sync
    after it, so it includes launch overhead (the thing fxopt removes). Returns median, p99, min, and count."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        _sync(device)
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < iters or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            fn(*inputs)
            _sync(device)
            samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return {
        "median_us": statistics.median(samples),
        "p99_us": samples[min(len(samples) - 1, int(0.99 * len(samples)))],
        "min_us": samples[0],
        "calls": len(samples),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, driver, torch version, date: stamped on every report."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
        try:
            env["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:  # driver query is informational only
            env["driver"] = None
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env
