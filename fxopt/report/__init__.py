"""``python -m fxopt.report MODEL``: what each pass and each system does to a model, at a glance.

MODEL is a zoo name (``--list``), ``package.module:callable`` or ``path/to/file.py:callable``. The callable
returns a model, or ``(model, example_inputs)``; a bare model needs ``--shape``. ``--all`` reports the whole zoo and
writes an index page.

Modules: ``cli`` (arguments, ``--all``), ``targets`` (MODEL -> model and inputs), ``systems`` (eager, TorchScript,
torch.compile, fxopt, fxopt + CUDA graphs, fxopt with Inductor, ONNX Runtime, TensorRT: build each and call it once),
``measure`` (interleaved timing with its spread, memory, environment and ``git describe``), ``compiled`` (Dynamo's
counters, CUDA-graph skip reasons, background builds finished before timing), ``floor`` (bytes and flops per kernel,
the device's measured limits, the floor),
``run`` (one model's report as data), ``render`` (tables, Markdown, verdicts, index), ``output`` (the files),
``plots``, ``graphs``, ``trace`` (optional pictures and the Chrome trace), ``progress`` (the progress bar).
"""

from __future__ import annotations

import logging
import os

from .cli import main, select_systems
from .output import write_report
from .render import render_markdown, render_text, verdict
from .run import SCHEMA, TOP_LEVEL_KEYS, Report, run_report
from .systems import SYSTEMS, System
from .targets import Target, UsageError, resolve_model


def build_report(target: Target, device, *, iters: int, warmup: int, backend: str = "auto",
                 systems=None) -> dict:
    """One model's report as plain data (what MODEL-DEVICE.json holds)."""
    return run_report(target, device, iters=iters, warmup=warmup, backend=backend, systems=systems).data


__all__ = ["SCHEMA", "SYSTEMS", "TOP_LEVEL_KEYS", "Report", "System", "Target", "UsageError", "build_report", "main",
           "render_markdown", "render_text", "resolve_model", "run_report", "select_systems", "verdict",
           "write_report"]

if os.environ.get("FXOPT_REPORT_DEBUG"):
    logging.basicConfig(level=logging.INFO)
