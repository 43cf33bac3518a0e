"""``python -m fxopt.report MODEL``: optimize a model and show what every pass did, launches and latency.

MODEL is a zoo name (``--list``), ``package.module:callable`` or ``path/to/file.py:callable``. The callable
returns a model, or ``(model, example_inputs)``; a bare model needs ``--shape``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from .. import models
from ..api import optimize
from ..launches import count_launches
from ..verify import max_relative_error
from .measure import environment, measure_latency


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


@dataclass
class Target:
    name: str
    model: torch.nn.Module
    inputs: tuple


def resolve_model(spec: str, device: torch.device, batch_size: int, shape: tuple[int, ...] | None) -> Target:
    """A zoo name, ``pkg.mod:callable`` or ``path/file.py:callable`` -> the model and its inputs on ``device``."""
    if spec in models.ZOO:
        model, inputs = models.get(spec).build(device=device, batch_size=batch_size)
        return Target(spec, model, inputs)
    if ":" not in spec:
        raise UsageError(f"unknown model {spec!r}: not a zoo model (see --list) and not 'module:callable' or "
                         f"'file.py:callable'")
    where, attr = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"no such file: {where}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"importing {where} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"cannot import module {where!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UsageError(f"{where} has no callable {attr!r}")
    made = fn()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, inputs = made
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    elif isinstance(made, torch.nn.Module):
        if shape is None:
            raise UsageError(f"{spec} returned a model without example inputs: pass --shape, e.g. --shape 1,3,224,224")
        model, inputs = made, (torch.randn(shape),)
    else:
        raise UsageError(f"{spec} returned {type(made).__name__}; expected an nn.Module or (module, inputs)")
    model = model.eval().to(device)
    inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    return Target(attr if where.endswith(".py") else spec, model, inputs)


def build_report(target: Target, device: torch.device, *, iters: int, warmup: int,
                 backend: str = "auto") -> dict[str, Any]:
    """Optimize ``target`` and measure it: every number of the report, as plain data."""
    model, inputs = target.model, target.inputs
    opt = optimize(model, inputs, backend=backend)
    spec = opt.specializations[-1]
    with torch.no_grad():
        ref = model(*inputs)
        out = opt(*inputs)
    eager_launches = count_launches(model, inputs)
    opt_launches = count_launches(opt, inputs)
    eager_lat = measure_latency(model, inputs, device, warmup=warmup, iters=iters)
    opt_lat = measure_latency(opt, inputs, device, warmup=warmup, iters=iters)
    capture = opt.capture_info
    return {
        "model": target.name,
        "environment": environment(device),
        "capture": {"method": capture.method,
                    "attempts": [a.__dict__ for a in capture.attempts]} if capture else None,
        "backend": spec.backend,
        "optimize_seconds": spec.seconds,
        "passes": [r.as_dict() for r in spec.records],
        "kernels": {name: {"ops": getattr(k, "op_names", None), "backend": getattr(k, "backend", None)}
                    for name, k in spec.kernels.items()},
        "systems": {
            "eager": {"latency": eager_lat, "launches": eager_launches.as_dict()},
            "fxopt": {"latency": opt_lat, "launches": opt_launches.as_dict(),
                      "max_rel_error": max_relative_error(out, ref)},
        },
        "code": opt.code,
    }


def _pass_rows(report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for r in report["passes"]:
        what = ", ".join(f"{k}={v}" for k, v in r["changes"].items())
        if r.get("error"):
            what = f"rolled back: {r['error']}"
        rows.append([r["name"], r["status"], r["static_after"], r["dispatched_after"], f"{r['seconds'] * 1e3:.1f}",
                     what])
    return rows


def _system_rows(report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    eager_med = report["systems"]["eager"]["latency"]["median_us"]
    for name, s in report["systems"].items():
        lat, ln = s["latency"], s["launches"]
        rows.append([name, f"{lat['median_us']:.1f}", f"{lat['p99_us']:.1f}", f"{eager_med / lat['median_us']:.2f}x",
                     ln["dispatched"], ln.get("cuda_kernels") if ln.get("cuda_kernels") is not None else "-",
                     f"{s['max_rel_error']:.1e}" if "max_rel_error" in s else "-"])
    return rows


_PASS_HEAD = ["pass", "status", "static launches", "dispatched ops", "ms", "what changed"]
_SYSTEM_HEAD = ["system", "median µs", "p99 µs", "speedup", "dispatched ops", "GPU kernels", "max rel err"]


def render_text(report: dict[str, Any], fmt: str = "simple") -> str:
    env = report["environment"]
    lines = [f"{report['model']} on {env['device_name']} ({env['device']}), torch {env['torch']}, "
             f"captured by {report['capture']['method'] if report['capture'] else '?'}, backend {report['backend']}",
             "", tabulate(_pass_rows(report), _PASS_HEAD, tablefmt=fmt), "",
             tabulate(_system_rows(report), _SYSTEM_HEAD, tablefmt=fmt)]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    head = (f"# {report['model']}: fxopt report\n\n{env['date']} · {env['device_name']} ({env['device']}) · "
            f"torch {env['torch']} · backend `{report['backend']}` · optimized in "
            f"{report['optimize_seconds']:.2f} s\n\n")
    return (head + "## Passes\n\n" + tabulate(_pass_rows(report), _PASS_HEAD, tablefmt="github") +
            "\n\n## Systems\n\n" + tabulate(_system_rows(report), _SYSTEM_HEAD, tablefmt="github") +
            "\n\n## Optimized graph\n\n```python\n" + report["code"].strip() + "\n```\n")


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['model'].replace(':', '_').replace('/', '_')}-{report['environment']['device'].split(':')[0]}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--shape takes comma-separated integers like 1,3,224,224, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxopt.report", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="zoo name, package.module:callable, or path/to/file.py:callable")
    parser.add_argument("--list", action="store_true", help="list the zoo models and exit")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    parser.add_argument("--out", default="reports", help="directory for MODEL-DEVICE.json and .md (default reports/)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--shape", default=None, help="input shape for a callable that returns a bare model")
    parser.add_argument("--iters", type=int, default=100, help="timed calls per system (median reported)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--backend", default="auto", help="fused-kernel backend: auto, cuda, cpp, inductor")
    args = parser.parse_args(argv)
    try:
        if args.list:
            print(tabulate([(e.name, e.description) for e in models.ZOO.values()], ["model", "description"]))
            return 0
        if not args.model:
            raise UsageError("name a model (see --list), e.g. python -m fxopt.report simple_cnn")
        device = _device(args.device)
        target = resolve_model(args.model, device, args.batch_size, _parse_shape(args.shape))
        report = build_report(target, device, iters=args.iters, warmup=args.warmup, backend=args.backend)
    except UsageError as e:
        print(f"fxopt.report: error: {e}", file=sys.stderr)
        return 2
    json_path, md_path = write_report(report, Path(args.out))
    if args.format == "json":
        print(json.dumps(report, indent=2, default=str))
    elif args.format == "markdown":
        print(render_markdown(report))
    else:
        print(render_text(report))
        print(f"\nwrote {json_path} and {md_path}")
    return 0


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"--device must be cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise UsageError(f"--device {name} asked for, but CUDA is not available ({why}); use --device cpu, or "
                         f"install a CUDA build of torch on a machine with a GPU")
    return torch.device(name)


if os.environ.get("FXOPT_REPORT_DEBUG"):
    import logging

    logging.basicConfig(level=logging.INFO)
