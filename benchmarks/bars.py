#!/usr/bin/env python
"""Issue 18's bars on the latest figure per model: every sweep_models.py result under reports/, the newest row of
each (model, config), summarized with the sweep's own rules (``sweep_models.summarize``), each row with the run it
came from. What benchmarks/NOTES.md quotes as "the latest figure per model", computed instead of copied by hand.

    python benchmarks/bars.py [--reports reports] [--default-only] [--device H100] [--configs b1-fp16,...]

A row counts where its stage is "done" and it timed fxopt (a row that crashed or timed out does not replace an
older one). ``--default-only`` leaves out rows built with opt-in passes (``FXOPT_SWEEP_ENABLE``) or the layout
choice; by default they count and the table names what they enabled. Runs on another device (``--device``, a
substring of the device name) are left out: ratios from different cards do not compare.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep_models  # noqa: E402

HEAD = ["model", "config", "date", "tree", "enabled", "busy fxopt / Inductor", "kernels fxopt / Inductor",
        "fxopt+g / r-o", "fp16 paired ratio", "run"]


def sweep_results(root: str) -> list[tuple[str, dict]]:
    """(path, result) for every JSON under ``root`` that sweep_models.py wrote (a dict with rows and systems)."""
    found = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True)):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list) and "systems" in data:
            found.append((path, data))
    return found


def _enabled(row: dict) -> str:
    parts = list(row.get("fxopt_graphs_enable") or row.get("fxopt_enable") or [])
    if row.get("fxopt_choose_layout"):
        parts.append("choose_layout")
    return ",".join(parts)


def latest_rows(results: list[tuple[str, dict]], *, default_only: bool = False, device: str = "",
                configs: tuple[str, ...] = ()) -> list[dict]:
    """The newest measured row per (model, config), each with ``_run`` (its file), ``_date`` and ``_tree``."""
    best: dict[tuple[str, str], dict] = {}
    for path, data in results:
        env = data.get("environment") or {}
        if device and device.lower() not in str(env.get("device_name", "")).lower():
            continue
        for row in data["rows"]:
            if row.get("stage") != "done" or row.get("busy_us_fxopt") is None and row.get("latency_fxopt_us") is None:
                continue
            if configs and row.get("config") not in configs:
                continue
            if default_only and _enabled(row):
                continue
            key = (row.get("model"), row.get("config"))
            date = str(env.get("date", ""))
            if key not in best or date >= best[key]["_date"]:
                best[key] = {**row, "_run": os.path.relpath(path), "_date": date, "_tree": env.get("git_describe", "")}
    return [best[k] for k in sorted(best, key=lambda k: (str(k[1]), str(k[0])))]


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


def table(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        paired = sweep_models.fp16_paired_ratio(r) if r.get("dtype") != "float32" else None
        out.append([r.get("model"), r.get("config"), r["_date"][:16], r["_tree"], _enabled(r),
                    _ratio(r.get("busy_us_fxopt"), r.get("busy_us_compile")),
                    f"{r['kernels_fxopt']} / {r['kernels_compile']}" if r.get("kernels_fxopt") is not None
                    and r.get("kernels_compile") is not None else "",
                    f"{r['fxopt_graphs_over_compile_ro']:.2f}" if r.get("fxopt_graphs_over_compile_ro") else "",
                    f"{paired[0]:.2f} [{paired[1]:.2f}, {paired[2]:.2f}]" if paired else "", r["_run"]])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reports", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "reports"))
    ap.add_argument("--default-only", action="store_true", help="leave out rows built with opt-in passes")
    ap.add_argument("--device", default="", help="only runs whose device name contains this (e.g. H100)")
    ap.add_argument("--configs", default="", help="comma-separated configs (default: all)")
    args = ap.parse_args(argv)
    rows = latest_rows(sweep_results(args.reports), default_only=args.default_only, device=args.device,
                       configs=tuple(c for c in args.configs.split(",") if c))
    if not rows:
        print(f"no measured sweep rows under {args.reports}")
        return 1
    print(f"# Issue 18's bars on the latest row per model ({len(rows)} rows)\n")
    print(tabulate(table(rows), HEAD, tablefmt="github", disable_numparse=True))
    summary, notes = sweep_models.summarize(rows)
    print("\n" + tabulate(summary, sweep_models.SUMMARY_HEAD, tablefmt="github", disable_numparse=True))
    for n in notes:
        print(f"- {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
