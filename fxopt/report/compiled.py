"""Facts about torch.compile runs that reports and benchmarks record: Dynamo's counters, why Inductor skipped CUDA
graphs, and background work (compile workers, fxopt's native call path) to finish before anything is timed.

Every helper touches ``torch._dynamo`` / ``torch._inductor`` only when the caller already uses torch.compile:
importing them costs seconds, and fxopt itself no longer imports Dynamo on torch 2.13.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


def dynamo_reset() -> None:
    """Forget compiled code and Dynamo's counters (frees compiled graphs and reduce-overhead's CUDA-graph pool).

    NOTE [One Dynamo cache for every system]: the reset drops the cache entries of *every* compiled module, so a
    report that times its systems interleaved resets once before the first compile and once after the last
    measurement, never between two compiled systems (the first would recompile inside the timing)."""
    import torch

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()


def dynamo_counters_clear() -> None:
    """Zero Dynamo's counters without dropping compiled code, so the next compile's graph breaks are its own."""
    from torch._dynamo.utils import counters

    counters.clear()


def dynamo_stats() -> dict[str, Any]:
    """Graphs compiled and graph breaks since the counters were cleared: a torch.compile that fell back to eager
    shows here."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": list(counters["graph_break"])[:5]}


# NOTE [CUDA-graph skip reasons]: when torch.compile(mode="reduce-overhead") cannot put a graph in a CUDA graph
# (CPU tensors, mutated inputs, dynamic shapes, ...), Inductor runs it without one, adds 1 to
# ``counters["inductor"]["cudagraph_skips"]`` and logs "skipping cudagraphs due to <reason>" as a warning. The logger
# moved: torch 2.4-2.x log through the ``perf_hints`` artifact (off by default, so the message is dropped unless
# TORCH_LOGS asks for it), torch 2.13 through the ``cudagraphs`` artifact of torch._inductor.cudagraph_utils
# (``log_cudagraph_skip_and_bump_counter``; torch/_dynamo/backends/cudagraphs.py logs the same text for
# backend="cudagraphs"). A handler attached to those artifact loggers themselves sees the record whether or not it
# propagates; the counter says how many skips there were when a message is missing.
_SKIP_ARTIFACTS = ("__cudagraphs", "__perf_hints")
_SKIP_TEXT = "cudagraph"


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(level=logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 -- a malformed record from torch must not break the run; it is only lost
            return
        if _SKIP_TEXT in msg.lower() and "skip" in msg.lower():
            self.into.append(msg.strip())


def _skip_loggers() -> list[logging.Logger]:
    for name in ("torch._inductor.cudagraph_utils", "torch._inductor.cudagraph_trees",
                 "torch._inductor.output_code", "torch._inductor.compile_fx", "torch._dynamo.backends.cudagraphs"):
        with contextlib.suppress(ImportError):  # a module some torch versions lack: no logger there
            __import__(name)
    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("torch._inductor", "torch._dynamo")) and n.endswith(_SKIP_ARTIFACTS)]
    return [logging.getLogger(n) for n in sorted(names)]


@dataclass
class CudagraphSkips:
    """What :func:`record_cudagraph_skips` saw: the skip count and the messages (first line each, deduplicated)."""

    count: int = 0
    messages: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        reasons = list(dict.fromkeys(m.splitlines()[0].strip()[:300] for m in self.messages))
        return {"cudagraph_skips": self.count, "cudagraph_skip_reasons": reasons}


@contextlib.contextmanager
def record_cudagraph_skips() -> Iterator[CudagraphSkips]:
    """Collect torch.compile's CUDA-graph skips (NOTE [CUDA-graph skip reasons]) while the block runs; the yielded
    object is filled when the block ends. Imports torch._inductor: use only around a torch.compile."""
    from torch._dynamo.utils import counters

    result = CudagraphSkips()
    messages: list[str] = []
    handler = _Collect(messages)
    loggers = _skip_loggers()
    before = counters["inductor"]["cudagraph_skips"]
    saved = []
    for lg in loggers:
        saved.append((lg, lg.level))
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.WARNING:  # the skip is a warning: make sure it reaches the handler
            lg.setLevel(logging.WARNING)
    try:
        yield result
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
        result.count = counters["inductor"]["cudagraph_skips"] - before
        result.messages = messages


def shutdown_compile_workers() -> bool:
    """Stop Inductor's compile-worker processes once compiling is over (they would otherwise stay, and on a small
    machine compete with the timing); True when there were pools to stop. A later compile starts new ones."""
    mod = sys.modules.get("torch._inductor.async_compile")
    stop = getattr(mod, "shutdown_compile_workers", None) if mod is not None else None
    if stop is None or not getattr(mod, "_pool_set", None):
        return False
    stop()
    return True


def finish_native_build(announce: Callable[[str], None] | None = None, timeout: float = 600) -> str:
    """Wait for fxopt's native call path (runtime/native.py) to be built or loaded, so no compiler runs while
    anything is timed and fxopt's kernels are timed on the call path they will keep; returns its status line.
    ``announce`` gets one line when the wait is long (a build, not a load from the disk cache)."""
    from ..runtime import native

    if not native.enabled():
        return native.status()
    t0 = time.perf_counter()
    native.start()
    if native.wait(timeout=1.0) is None and native.status() == "building" and announce is not None:
        announce("fxopt: building the native call path (once per machine and torch version)")
    native.wait(timeout=timeout)
    status = native.status()
    if status == "building":
        log.warning("the native call path was still building after %.0f s: fxopt is timed on the Python call path",
                    time.perf_counter() - t0)
        status = f"still building after {time.perf_counter() - t0:.0f} s (timed on the Python call path)"
    return status
