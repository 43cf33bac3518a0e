"""A Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing) of one optimized forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .measure import quiet_profiler, sync


def chrome_trace(fn: Callable[..., Any], inputs: Sequence[Any], device: torch.device, path: Path, *,
                 warmup: int = 3) -> Path:
    """Profile one call of ``fn`` after ``warmup`` calls (CPU activity, and CUDA on a GPU) and export the trace."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        sync(device)
        with quiet_profiler(), profile(activities=activities, record_shapes=True) as prof:
            with record_function("fxopt forward"):
                fn(*inputs)
            sync(device)
        prof.export_chrome_trace(str(path))
    return path
