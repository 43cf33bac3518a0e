"""Plots of a report, as PNG and SVG: latency per system with the floor drawn in, launches after each pass.

Needs matplotlib (the ``plots`` extra); :func:`write_plots` raises ImportError without it, and the caller notes it.
Figures are built with ``matplotlib.figure.Figure`` directly, so nothing touches pyplot's global state or backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .render import fmt_us, requested


def _save(fig, stem: Path) -> list[str]:
    paths = []
    for ext in ("png", "svg"):
        path = stem.with_name(f"{stem.name}.{ext}")
        fig.savefig(path, format=ext, dpi=120 if ext == "png" else None)
        paths.append(str(path))
    return paths


def latency_plot(report: dict[str, Any], stem: Path) -> list[str]:
    """Median latency per system (bars), p99 (whiskers, clipped and labelled when far off), the floor (a line);
    failed and skipped systems keep their row with the reason."""
    import matplotlib  # noqa: F401 -- ImportError here when it is missing
    from matplotlib.figure import Figure

    systems = [s for s in report["systems"].values() if requested(s)]
    systems.reverse()  # first system at the top
    fig = Figure(figsize=(10, 1.6 + 0.55 * len(systems)))
    ax = fig.add_subplot()
    ok = [s for s in systems if s["status"] == "ok" and s.get("latency")]
    floor = (report.get("floor") or {}).get("total_us")
    right = 1.8 * max([s["latency"]["median_us"] for s in ok] + [floor or 0.0, 1e-3])
    for i, s in enumerate(systems):
        if s["status"] == "ok" and s.get("latency"):
            lat = s["latency"]
            colour = "#f76707" if s["name"].startswith("fxopt") else "#4c6ef5" if s["name"] != "eager" else "#868e96"
            whisker = min(lat["p99_us"], right * 0.98) - lat["median_us"]
            ax.barh(i, lat["median_us"], color=colour, height=0.6, xerr=[[0], [max(0.0, whisker)]], capsize=3,
                    ecolor="#343a40")
            extra = f", {s['x_eager']:.2f}x eager" if s.get("x_eager") is not None and s["name"] != "eager" else ""
            if lat["p99_us"] > right * 0.98:
                extra += f", p99 {fmt_us(lat['p99_us'])} (off scale)"
            ax.text(lat["median_us"], i + 0.36, f" {fmt_us(lat['median_us'])}{extra}", va="bottom", ha="left",
                    fontsize=9)
        else:
            why = s["reason"] if s["status"] == "skipped" else f"failed: {s['error']}"
            ax.text(0, i, f" {why[:100]}", va="center", ha="left", fontsize=9, color="#868e96", style="italic")
    ax.set_yticks(range(len(systems)), [s["label"] for s in systems], fontsize=10)
    ax.set_ylim(-0.6, len(systems) - 0.1)
    if floor:
        ax.axvline(floor, color="#c92a2a", ls="--", lw=1.2, label=f"floor {fmt_us(floor)}")
        ax.legend(loc="lower right", fontsize=9)
    ax.set_xlim(0, right)
    ax.set_xlabel("latency per forward (µs): bar = median, whisker = p99", fontsize=10)
    env = report["environment"]
    ax.set_title(f"{report['model']} on {env['device_name']} ({env['device']}): latency per system", fontsize=12)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, stem)


def passes_plot(report: dict[str, Any], stem: Path) -> list[str]:
    """Static launches and dispatched ops after each pass (rolled-back passes marked)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    passes = report["passes"]
    start = report.get("captured_launches") or {}
    names = ["captured"] + [p["name"] for p in passes]
    static = [start.get("static")] + [p["static_after"] for p in passes]
    dispatched = [start.get("dispatched")] + [p["dispatched_after"] for p in passes]
    fig = Figure(figsize=(max(8.0, 0.75 * len(names) + 2), 4.8))
    ax = fig.add_subplot()
    xs = list(range(len(names)))
    series = ((static, "static launches (graph nodes that launch)", {"marker": "o", "ms": 11, "mfc": "none", "mew": 2},
               "#f76707"),
              (dispatched, "dispatched ATen ops", {"marker": "s", "ms": 5}, "#4c6ef5"))
    for values, label, style, colour in series:
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="-", drawstyle="steps-post", color=colour, alpha=0.6,
                    label=label, **style)
    for x, v in enumerate(static):  # the count wherever it changes
        if v is not None and (x == 0 or v != static[x - 1]):
            ax.annotate(str(v), (x, v), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=9)
    rolled = [i + 1 for i, p in enumerate(passes) if p["status"] == "rolled back"]
    for x in rolled:
        ax.axvline(x, color="#c92a2a", ls=":", lw=1)
    if rolled:
        ax.plot([], [], ls=":", color="#c92a2a", label="rolled back")
    ax.set_xticks(xs, names, rotation=35, ha="right", fontsize=9)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1.15 * max([v for v in static + dispatched if v is not None] + [1]))
    ax.set_ylabel("launches per forward", fontsize=10)
    ax.set_title(f"{report['model']}: launches after each pass", fontsize=12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return _save(fig, stem)


def write_plots(report: dict[str, Any], stem: Path) -> dict[str, list[str]]:
    """Both plots for one report; ImportError when matplotlib is missing."""
    import matplotlib  # noqa: F401 -- fail early, before any file is written

    files = {"plot_latency": latency_plot(report, stem.with_name(f"{stem.name}-latency"))}
    if report["passes"]:
        files["plot_passes"] = passes_plot(report, stem.with_name(f"{stem.name}-passes"))
    return files
