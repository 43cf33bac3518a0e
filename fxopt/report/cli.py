"""The command line: ``python -m fxopt.report MODEL`` and ``python -m fxopt.report --all``."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
from tabulate import tabulate

from .. import models
from ..passes import optional_passes
from .measure import environment, free_memory
from .output import clean, write_report
from .progress import Progress
from .render import render_index, render_markdown, render_text, summarize
from .run import BLOCK_S, ROUNDS, run_report, steps_for
from .systems import GROUPS, SYSTEMS
from .targets import UsageError, resolve_model

DESCRIPTION = ("Optimize a model with fxopt and compare it with eager, TorchScript, torch.compile and TensorRT: "
               "latency, launches, memory, error, the floor, what every pass and fused kernel did.")
EPILOG = f"""systems: {', '.join(SYSTEMS)}; groups: {', '.join(f'{g} ({", ".join(v)})' for g, v in GROUPS.items()
                                                              if g != 'all')}.
examples:
  python -m fxopt.report simple_cnn --device cpu
  python -m fxopt.report simple_cnn --device cpu --skip slow       # no torch.compile / Inductor (fast)
  python -m fxopt.report mypkg.nets:make_model --systems eager,fxopt
  python -m fxopt.report --all --device cuda --out reports/"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fxopt.report", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="zoo name, package.module:callable, or path/to/file.py:callable")
    p.add_argument("--list", action="store_true", help="list the zoo models and the systems, and exit")
    p.add_argument("--all", action="store_true", help="report every zoo model and write DIR/index.md")
    p.add_argument("--models", default=None, help="with --all: only these zoo models (comma-separated)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table", help="what to print")
    p.add_argument("--out", default="reports", help="directory for the report files (default reports/)")
    p.add_argument("--systems", default="all", help="systems to measure, comma-separated names or groups "
                                                    "(default all; eager always runs)")
    p.add_argument("--skip", default="", help="systems or groups to leave out, e.g. --skip slow")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--shape", default=None, help="input shape for a callable that returns a bare model")
    p.add_argument("--iters", type=int, default=100,
                   help="least timed calls per system (median, p99 and spread reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per system before timing")
    p.add_argument("--rounds", type=int, default=ROUNDS,
                   help=f"rounds of interleaved timing: each system runs one block of calls per round, in rotated "
                        f"order (default {ROUNDS})")
    p.add_argument("--block-ms", type=float, default=BLOCK_S * 1e3,
                   help=f"least milliseconds each system's block lasts in a round (default {BLOCK_S * 1e3:.0f})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and ONNX Runtime during the run (default: torch's own choice)")
    p.add_argument("--backend", default="auto", help="fxopt's fused-kernel backend: auto, cuda, cpp, inductor")
    p.add_argument("--enable", default="", help="opt-in passes for fxopt's systems, comma-separated (see "
                   "fxopt.passes.optional_passes(), e.g. split_k_linears,gemm_weight_layouts)")
    p.add_argument("--choose-layout", action="store_true",
                   help="fxopt's systems optimize a convolution network on CUDA in channels-last and in NCHW and keep "
                   "the faster (optimize(..., choose_layout=True))")
    p.add_argument("--recalibrate", action="store_true",
                   help="measure the device's bandwidth and peak rate again instead of using the cached values")
    p.add_argument("--no-trace", action="store_true", help="do not write the Chrome trace")
    return p


def _names(text: str, flag: str) -> list[str]:
    out: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if token in GROUPS:
            out += GROUPS[token]
        elif token in SYSTEMS:
            out.append(token)
        else:
            raise UsageError(f"{flag}: unknown system {token!r}; systems: {', '.join(SYSTEMS)}; groups: "
                             f"{', '.join(GROUPS)}")
    return out


def select_systems(systems: str, skip: str) -> list[str]:
    """The systems ``--systems`` names minus those ``--skip`` names, in the report's order, eager first."""
    wanted, dropped = set(_names(systems, "--systems")), set(_names(skip, "--skip"))
    if "eager" in dropped:
        raise UsageError("--skip: eager is the reference every system is compared with; it always runs")
    return [n for n in SYSTEMS if n == "eager" or (n in wanted and n not in dropped)]


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--shape takes comma-separated integers like 1,3,224,224, got {text!r}") from None


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


def _list() -> None:
    print(tabulate([(e.name, e.description) for e in models.ZOO.values()], ["model", "description"]))
    print()
    print(tabulate([(s.name, s.description, "yes" if s.needs_cuda else "", "yes" if s.slow else "")
                    for s in SYSTEMS.values()], ["system", "what runs", "needs CUDA", "slow"]))


def _report_one(spec: str, device: torch.device, args, systems: list[str], prefix: str = ""):
    target = resolve_model(spec, device, args.batch_size, _parse_shape(args.shape))
    progress = Progress(steps_for(systems) + 1, prefix=prefix or f"{target.name} ")
    try:
        report = run_report(target, device, iters=args.iters, warmup=args.warmup, backend=args.backend,
                            enable=args.enable, choose_layout=args.choose_layout,
                            systems=systems, recalibrate=args.recalibrate, progress=progress, rounds=args.rounds,
                            block_s=args.block_ms / 1e3, threads=args.threads)
        progress.step("writing files")
        json_path, md_path = write_report(report, Path(args.out), trace=not args.no_trace)
    finally:
        progress.close()
    return report, json_path, md_path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.list:
            _list()
            return 0
        if args.models is not None and not args.all:
            raise UsageError("--models goes with --all (to report one model, name it: python -m fxopt.report MODEL)")
        if args.all and args.model:
            raise UsageError("--all reports every zoo model: leave MODEL out, or use --models to pick some")
        if not args.model and not args.all:
            raise UsageError("name a model (see --list), e.g. python -m fxopt.report simple_cnn, or use --all")
        if args.iters < 1 or args.warmup < 0:
            raise UsageError("--iters must be at least 1 and --warmup at least 0")
        if args.rounds < 1 or args.block_ms < 0:
            raise UsageError("--rounds must be at least 1 and --block-ms at least 0")
        if args.threads is not None and args.threads < 1:
            raise UsageError("--threads must be at least 1")
        args.enable = tuple(n.strip() for n in args.enable.split(",") if n.strip())
        optional = [p.name for p in optional_passes()]
        unknown = [n for n in args.enable if n not in optional]
        if unknown:
            raise UsageError(f"--enable: {', '.join(map(repr, unknown))} is not an opt-in pass; they are "
                             f"{', '.join(optional)}")
        systems = select_systems(args.systems, args.skip)
        device = _device(args.device)
        if args.all:
            names = models.names() if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
            unknown = [m for m in names if m not in models.ZOO]
            if unknown or not names:
                raise UsageError(f"--models: unknown zoo model(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                                 f"known: {', '.join(models.names())}")
            return _run_all(names, device, args, systems, argv if argv is not None else sys.argv[1:])
        report, json_path, md_path = _report_one(args.model, device, args, systems)
    except UsageError as e:
        print(f"fxopt.report: error: {e}", file=sys.stderr)
        return 2
    data = report.data
    if args.format == "json":
        print(json.dumps(clean(data), indent=2))
    elif args.format == "markdown":
        print(render_markdown(data))
    else:
        print(render_text(data))
        others = len(data["files"]) - 2
        print(f"\nwrote {json_path} and {md_path}" + (f" and {others} more files in {json_path.parent}" if others
                                                        else ""))
    return 0


def _run_all(names: list[str], device: torch.device, args, systems: list[str], argv: list[str]) -> int:
    out = Path(args.out)
    summaries = []
    failed = 0
    for i, name in enumerate(names, 1):
        try:
            report, _, md_path = _report_one(name, device, args, systems, prefix=f"[{i}/{len(names)}] {name} ")
        except Exception as e:  # noqa: BLE001 -- one model's report crashing must not lose the others
            failed += 1
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"fxopt.report: {name}: the report failed: {msg}", file=sys.stderr)
            traceback.print_exc(limit=6, file=sys.stderr)
            summaries.append({"model": name, "error": msg})
            continue
        summaries.append(summarize(report.data, md_path.name))
        if args.format == "table":
            print(f"== {name}: {md_path}")
            for line in report.data["verdicts"]:
                print(f"   {line}")
        del report
        free_memory(device)
    env = environment(device)
    index_md = render_index(summaries, env, argv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.md").write_text(index_md)
    index = {"schema": "fxopt.report.index/1", "environment": env, "argv": argv, "models": summaries}
    (out / "index.json").write_text(json.dumps(clean(index), indent=2))
    if args.format == "json":
        print(json.dumps(clean(index), indent=2))
    elif args.format == "markdown":
        print(index_md)
    else:
        print(f"\nwrote {out / 'index.md'} ({len(names) - failed} of {len(names)} models reported)")
    return 1 if failed else 0
