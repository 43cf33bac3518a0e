"""Differential fuzzing, the long run: random models (tests/fuzz/model_generator.py) on the GPU with the CUDA
backend, optimized by fxopt and compared with eager, until ``--cases`` cases or ``--budget-s`` seconds.

    python benchmarks/fuzz_gpu.py --cases 300 --budget-s 400                      # the GPU machine
    python benchmarks/fuzz_gpu.py --device cpu --cases 5 --budget-s 60            # a smoke test anywhere

Each case is checked as in CI (tests/fuzz/test_differential.py): example inputs, new values of the same signature,
other memory layouts, another batch size, strict=True; findings are triaged to the pass whose disabling removes
them and matched against the known bugs (tests/fuzz/test_regressions.py). Writes a JSON summary (cases run,
mismatches and errors with their seeds, rollbacks with pass names and reasons, kernel build failures) to
``$OUT/fuzz_gpu.json``, or ``reports/fuzz_gpu.json`` when $OUT is unset, after every case; prints a summary.
Replay one case with the ``replay`` command printed beside its seed (also in the JSON), e.g.
``python tests/fuzz/model_generator.py SEED --max-nodes 16 --dtypes float32:4,float16:3,bfloat16:3,float64:1 --backend
cuda --device cuda``: the seed alone is not enough, the model also depends on ``--max-nodes`` and ``--dtypes``.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FUZZ_DIR = ROOT / "tests" / "fuzz"


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve the module by name while the file runs
    spec.loader.exec_module(mod)
    return mod


def _known_bugs():
    """test_differential.known_bug, when the test module (and pytest) can be loaded here; else None."""
    try:
        return _load("fxopt_fuzz_test_differential", FUZZ_DIR / "test_differential.py").known_bug
    except Exception:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default=None, help="default: cuda on a CUDA device, else cpp")
    ap.add_argument("--seed", type=int, default=None,
                    help="first seed (default: drawn at random; printed and saved, so any case can be replayed)")
    ap.add_argument("--max-nodes", type=int, default=16)
    ap.add_argument("--dtypes", default="float32:4,float16:3,bfloat16:3,float64:1",
                    help="weighted model dtypes, e.g. float32:4,float16:3")
    ap.add_argument("--no-triage", action="store_true", help="do not re-run failing cases with passes disabled")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/fuzz_gpu.json or reports/fuzz_gpu.json)")
    args = ap.parse_args(argv)

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("fuzz_gpu: CUDA is not available here; use --device cpu for a smoke test", file=sys.stderr)
        return 2
    backend = args.backend or ("cuda" if device.startswith("cuda") else "cpp")
    base = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % (2 ** 31 - 10 ** 6)
    gen = _load("fxopt_fuzz_model_generator", FUZZ_DIR / "model_generator.py")
    dtypes = gen.parse_dtypes(args.dtypes)
    if args.out:
        out_path = Path(args.out)
    else:
        out_path = (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "reports") / "fuzz_gpu.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    known_bug = _known_bugs()
    import fxopt

    summary: dict = {
        "config": {
            "device": device, "backend": backend, "base_seed": base, "cases_requested": args.cases,
            "budget_s": args.budget_s, "max_nodes": args.max_nodes, "dtypes": args.dtypes,
            "torch": torch.__version__, "fxopt": getattr(fxopt, "__version__", "?"),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "known_bugs_matched": known_bug is not None,
        },
        "cases_run": 0, "cases_failed": 0, "cases_failed_unknown": 0, "seconds": 0.0,
        "by_dtype": {}, "capture": {}, "rebatched": 0,
        "findings": [], "rollbacks": [], "rollback_counts": {}, "compile_fallbacks": [], "harness_errors": [],
        "slowest": [],
    }
    by_dtype: collections.Counter = collections.Counter()
    capture: collections.Counter = collections.Counter()
    rollback_counts: collections.Counter = collections.Counter()
    slowest: list[tuple[float, int]] = []

    def write() -> None:
        summary["by_dtype"], summary["capture"] = dict(by_dtype), dict(capture)
        summary["rollback_counts"] = dict(rollback_counts.most_common())
        summary["slowest"] = [{"seed": s, "seconds": round(t, 2)} for t, s in sorted(slowest, reverse=True)[:10]]
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        tmp.replace(out_path)

    print(f"fuzz_gpu: device {device}, backend {backend}, seeds {base}..{base + args.cases - 1}, budget "
          f"{args.budget_s:.0f}s -> {out_path}", flush=True)
    t0 = time.perf_counter()
    for k in range(args.cases):
        elapsed = time.perf_counter() - t0
        if elapsed > args.budget_s:
            print(f"fuzz_gpu: budget spent after {k} cases", flush=True)
            break
        seed = base + k
        triage = not args.no_triage and elapsed < 0.85 * args.budget_s
        try:
            r = gen.run_case(seed, backend=backend, device=device, max_nodes=args.max_nodes, dtypes=dtypes,
                             triage=triage)
        except Exception as e:  # the generator or harness itself: worth fixing, not an fxopt finding
            summary["harness_errors"].append({"seed": seed, "error": f"{type(e).__name__}: {e}",
                                              "traceback": traceback.format_exc(limit=-5)})
            continue
        summary["cases_run"] += 1
        by_dtype[r.dtype] += 1
        capture[r.capture] += 1
        summary["rebatched"] += r.rebatched
        slowest.append((r.seconds, seed))
        unknown = False
        for f in r.findings:
            kb = known_bug(f) if known_bug is not None else None
            unknown |= kb is None
            summary["findings"].append({"seed": seed, "dtype": r.dtype, "kind": f.kind, "where": f.where,
                                        "message": f.message[:2000], "culprit": f.culprit,
                                        "known_bug": kb.regression_test if kb is not None else None,
                                        "replay": r.replay})
        if r.findings:
            summary["cases_failed"] += 1
            summary["cases_failed_unknown"] += unknown
            print(f"  seed {seed} ({r.dtype}): " + "; ".join(
                f"{f.kind} at {f.where}" + (f" [{f.culprit}]" if f.culprit else "") for f in r.findings), flush=True)
        # one entry per pass and case, with its first reason: the same pass rolled back again at another
        # specialization of the case (another batch size) is no second finding
        first_reason: dict[str, str] = {}
        for name, why in r.rollbacks:
            first_reason.setdefault(name, why)
        for name, why in first_reason.items():
            rollback_counts[name] += 1
            summary["rollbacks"].append({"seed": seed, "dtype": r.dtype, "pass": name, "reason": why[:1000],
                                         "specializations": sum(n == name for n, _ in r.rollbacks),
                                         "replay": r.replay})
            print(f"  seed {seed} ({r.dtype}): {name} rolled back: {why.splitlines()[0][:160]}", flush=True)
        for note in r.compile_fallbacks:
            summary["compile_fallbacks"].append({"seed": seed, "note": note[:1000]})
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        write()
        if any(("CUDA error" in f.message or "illegal memory access" in f.message) for f in r.findings):
            # a kernel fault leaves the CUDA context unusable: every later case would fail the same way
            summary["stopped"] = f"CUDA context lost at seed {seed}; re-run from --seed {seed + 1}"
            print(f"fuzz_gpu: {summary['stopped']}", flush=True)
            write()
            break
        if (k + 1) % 25 == 0:
            print(f"  {k + 1} cases, {summary['cases_failed']} failing, {sum(rollback_counts.values())} rollbacks, "
                  f"{summary['seconds']:.0f}s", flush=True)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write()

    print(f"\nfuzz_gpu: {summary['cases_run']} cases in {summary['seconds']:.0f}s on {device} ({backend}); "
          f"dtypes {dict(by_dtype)}; captured by {dict(capture)}; {summary['rebatched']} re-specialized")
    print(f"  failing cases: {summary['cases_failed']} ({summary['cases_failed_unknown']} not known bugs)")
    groups: dict = collections.defaultdict(list)
    for f in summary["findings"]:
        groups[(f["kind"], f["culprit"], f["known_bug"], f["message"].splitlines()[0][:90])].append(f["seed"])
    replay = {f["seed"]: f["replay"] for f in summary["findings"] + summary["rollbacks"]}
    for (kind, culprit, kb, msg), seeds in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"    {len(seeds):3d} x {kind} [{culprit or '?'}] {'(known: ' + kb + ') ' if kb else 'NEW '}{msg} "
              f"seeds {seeds[:6]}\n          replay: {replay[seeds[0]]}")
    print(f"  rollbacks: {dict(rollback_counts.most_common())}")
    reasons: dict = collections.defaultdict(list)
    for rb in summary["rollbacks"]:
        reasons[(rb["pass"], rb["dtype"], rb["reason"][:90])].append(rb["seed"])
    for (name, dt, why), seeds in sorted(reasons.items(), key=lambda kv: -len(kv[1]))[:15]:
        print(f"    {name} ({dt}): {why} seeds {seeds[:5]}\n          replay: {replay[seeds[0]]}")
    if summary["compile_fallbacks"]:
        print(f"  kernel build failures: {len(summary['compile_fallbacks'])} "
              f"(e.g. seed {summary['compile_fallbacks'][0]['seed']}: "
              f"{summary['compile_fallbacks'][0]['note'].splitlines()[0][:120]})")
    if summary["harness_errors"]:
        print(f"  harness errors: {len(summary['harness_errors'])} (see JSON)")
    print(f"  JSON: {out_path}")
    return 1 if summary["cases_failed_unknown"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
