"""Report data -> terminal tables, Markdown, one-line verdicts, and the index page of ``--all``."""

from __future__ import annotations

import math
import textwrap
from typing import Any

from tabulate import tabulate


# -- numbers -----------------------------------------------------------------------------------------------------
def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1e3:
        return f"{us / 1e3:.2f} ms"
    return f"{us:.1f} µs"


def _num(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _short(text: str | None, limit: int) -> str:
    """``text`` on one line, cut after the last whole word that fits in ``limit`` characters (then "…"); a first
    word longer than ``limit`` is kept whole. For names and lists; notes are wrapped or shown in full instead."""
    if not text:
        return ""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    if cut <= 0:
        cut = text.find(" ")
        return text if cut < 0 else text[:cut] + " …"
    return text[:cut].rstrip(" ,;:") + " …"


def _wrap(text: str | None, width: int | None) -> str:
    """A note in full: on one line (``width`` None, for Markdown), or wrapped into lines of at most ``width``
    characters at spaces (a word longer than that gets a line of its own, whole)."""
    if not text:
        return ""
    text = " ".join(str(text).split())
    if width is None:
        return text
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False))


def _median(entry: dict[str, Any]) -> float | None:
    lat = entry.get("latency")
    return lat.get("median_us") if lat else None


def _launch(entry: dict[str, Any], key: str) -> Any:
    ln = entry.get("launches")
    return ln.get(key) if ln else None


# -- verdicts ------------------------------------------------------------------------------------------------------
def verdict(entry: dict[str, Any], eager: dict[str, Any] | None) -> str:
    """One line: how a system compares with eager, e.g.
    ``fxopt: 3.20x faster than eager (12 -> 4 GPU kernels), max rel err 2.0e-07, 1.8x the floor``."""
    label = entry["label"]
    if entry["status"] == "skipped":
        return f"{label}: skipped: {entry['reason']}"
    if entry["status"] == "failed":
        return f"{label}: failed at {entry['stage']}: {_short(entry['error'], 200)}"
    median = _median(entry)
    if entry["name"] == "eager" or eager is None or _median(eager) is None:
        counts = []
        if _launch(entry, "cuda_kernels") is not None:
            counts.append(f"{_launch(entry, 'cuda_kernels')} GPU kernels")
        if _launch(entry, "dispatched") is not None:
            counts.append(f"{_launch(entry, 'dispatched')} dispatched ops")
        line = f"{label}: the reference, {fmt_us(median)} median"
        if counts:
            line += f" ({', '.join(counts)} per forward)"
    else:
        ratio = entry["x_eager"] if entry.get("x_eager") else _median(eager) / median
        details = []
        if abs(ratio - 1) < 0.02:
            line = f"{label}: as fast as eager"
            details.append(f"{ratio:.2f}x")
        elif ratio > 1:
            line = f"{label}: {ratio:.2f}x faster than eager"
        else:
            line = f"{label}: {1 / ratio:.2f}x slower than eager"
        if entry.get("x_eager_spread"):
            details.append(f"{'unstable, ' if entry.get('unstable') else ''}rounds {_range(entry['x_eager_spread'])}")
        for key, what in (("cuda_kernels", "GPU kernels"), ("dispatched", "dispatched ops")):
            before, after = _launch(eager, key), _launch(entry, key)
            if before is not None and after is not None:
                details.append(f"{before} -> {after} {what}")
                break
        if details:
            line += f" ({'; '.join(details)})"
        err = entry.get("max_rel_error")
        if err is not None:
            line += f", max rel err {err:.1e}" if isinstance(err, float) else f", max rel err {err}"
    if entry.get("x_floor") is not None:
        line += f", {entry['x_floor']:.1f}x the floor"
    note = entry.get("info", {}).get("note")
    if note:
        line += f" [{_wrap(note, None)}]"
    return line


def _range(sp: dict[str, Any]) -> str:
    """A speedup's spread as its interquartile range over the rounds, e.g. ``1.15-1.30x``."""
    return f"{sp['q1']:.2f}-{sp['q3']:.2f}x"


def unstable_note(report: dict[str, Any]) -> str | None:
    """The note under a report whose figures are unstable (NOTE [Interleaved timing] in measure.py), or None."""
    settings = report.get("settings") or {}
    limit = settings.get("unstable_spread")
    shaky = [s for s in report["systems"].values() if s.get("unstable")]
    if not shaky or limit is None:
        return None
    parts = []
    for s in shaky:
        sp = s.get("x_eager_spread") or (s.get("latency") or {}).get("spread") or {}
        what = (f"speedup {_range(sp)} over the rounds" if s.get("x_eager_spread") else
                f"latency {sp.get('q1', 0):.1f}-{sp.get('q3', 0):.1f} µs over the rounds")
        parts.append(f"{s['label']} ({what}, interquartile range {sp.get('rel_iqr', 0):.0%} of the median)")
    env = report.get("environment") or {}
    load = ((settings.get("load_average") or {}).get("after") or [None])[0]
    host = f" (load average {load} on {env.get('cpu_count')} cores)" if load is not None else ""
    return (f"unstable: {'; '.join(parts)}: a spread over {limit:.0%} means this machine{host} was too noisy while "
            f"timing to tell these apart; the medians are shown, but rerun with more --rounds or on a quieter machine "
            f"before quoting them")


# -- tables --------------------------------------------------------------------------------------------------------
SYSTEM_HEAD = ["system", "first call s", "median µs", "rounds IQR µs", "p99 µs", "vs eager (rounds IQR)", "x floor",
               "launch calls", "GPU kernels", "dispatched ops", "GPU busy µs", "peak mem", "max rel err", "note"]
UNSTABLE = " (unstable)"  # after a system's label when its figure's spread is too wide (see the note)
PASS_HEAD = ["pass", "status", "static launches", "dispatched ops", "ms", "what changed"]
KERNEL_HEAD = ["node", "kernel", "ops fused", "bytes moved", "floor µs", "GPU µs", "GB/s", "of peak BW"]
GRAPH_HEAD = ["signature", "status", "graph nodes", "pool gained", "replays", "replay", "reason"]


NOT_REQUESTED = "not requested"


def requested(entry: dict[str, Any]) -> bool:
    return not (entry["status"] == "skipped" and str(entry["reason"]).startswith(NOT_REQUESTED))


def _not_requested_line(report: dict[str, Any]) -> list[str]:
    left_out = [s["label"] for s in report["systems"].values() if not requested(s)]
    return [f"not measured ({NOT_REQUESTED}): {', '.join(left_out)}"] if left_out else []


def _x_eager(s: dict[str, Any]) -> str:
    if s.get("x_eager") is None:
        return "-"
    text = f"{s['x_eager']:.2f}x"
    return text + f" ({_range(s['x_eager_spread'])})" if s.get("x_eager_spread") else text


def _iqr_us(lat: dict[str, Any]) -> str:
    sp = lat.get("spread")
    return f"{sp['q1']:.1f}-{sp['q3']:.1f}" if sp else "-"


def system_rows(report: dict[str, Any], note_width: int | None = 60) -> list[list[Any]]:
    """One row per requested system; notes wrapped at ``note_width`` characters (None: in full, for Markdown)."""
    rows = []
    for s in report["systems"].values():
        if not requested(s):
            continue
        if s["status"] != "ok":
            why = s["reason"] if s["status"] == "skipped" else f"failed ({s['stage']}): {s['error']}"
            rows.append([s["label"], *["-"] * (len(SYSTEM_HEAD) - 2), _wrap(why, note_width)])
            continue
        lat = s["latency"]
        err = s.get("max_rel_error")
        rows.append([
            s["label"] + (UNSTABLE if s.get("unstable") else ""), _num(s.get("first_call_s"), ".3f"),
            _num(lat["median_us"]), _iqr_us(lat), _num(lat["p99_us"]), _x_eager(s),
            _num(s.get("x_floor"), ".1f") + "x" if s.get("x_floor") is not None else "-",
            _num(_launch(s, "cuda_launch_calls"), "d"), _num(_launch(s, "cuda_kernels"), "d"),
            _num(_launch(s, "dispatched"), "d"), _num(_launch(s, "gpu_busy_us")),
            _bytes(s.get("peak_memory_bytes")) if s.get("peak_memory_bytes") is not None else "n/a",
            (f"{err:.1e}" if isinstance(err, float) and math.isfinite(err) else _num(err)),
            _wrap(s.get("info", {}).get("note"), note_width)])
    return rows


def pass_rows(report: dict[str, Any], width: int | None = 80) -> list[list[Any]]:
    """One row per pass; what it changed and its notes wrapped at ``width`` characters (None: in full)."""
    rows = []
    start = report.get("captured_launches")
    if start:
        rows.append(["(captured)", "", _num(start.get("static"), "d"), _num(start.get("dispatched"), "d"), "", ""])
    for r in report["passes"]:
        what = ", ".join(f"{k}={v}" for k, v in r["changes"].items())
        if r.get("error"):
            what = f"rolled back: {r['error']}"
        if r.get("notes"):
            what = "; ".join([what] + list(r["notes"])) if what else "; ".join(r["notes"])
        rows.append([r["name"], r["status"], _num(r["static_after"], "d"), _num(r["dispatched_after"], "d"),
                     f"{r['seconds'] * 1e3:.1f}", _wrap(what, width)])
    return rows


def kernel_rows(report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for node, k in report["kernels"].items():
        ops = k.get("ops") or []
        frac = k.get("fraction_of_peak_bandwidth")
        rows.append([node, _short(k["name"], 40), _short(" ".join(ops), 60) + f" ({len(ops)})", _bytes(k.get("bytes")),
                     _num(k.get("floor_us"), ".2f"), _num(k.get("gpu_us"), ".2f"), _num(k.get("achieved_gbps")),
                     f"{frac:.0%}" if frac is not None else "-"])
    return rows


def graph_rows(report: dict[str, Any], width: int | None = 80) -> list[list[Any]]:
    """fxopt + CUDA graphs, per input signature: captured or not, graph nodes, pool memory, which replay path."""
    system = report.get("systems", {}).get("fxopt_cudagraphs") or {}
    return [[e.get("signature"), e.get("status"), _num(e.get("num_nodes"), "d"), _bytes(e.get("pool_bytes")),
             _num(e.get("replays"), "d"), e.get("replay") or "-", _wrap(e.get("reason"), width)]
            for e in (system.get("info") or {}).get("cuda_graphs", [])]


def floor_lines(report: dict[str, Any]) -> list[str]:
    f = report.get("floor")
    if not f:
        return ["floor: n/a"]
    if not f["available"]:
        return [f"floor: n/a ({f['reason']}); fxopt's graph moves {_bytes(f.get('bytes'))} and does "
                f"{(f.get('flops') or 0) / 1e9:.3f} GFLOP in {f.get('launching_nodes')} launching nodes"]
    lim = f["limits"]
    return [f"floor: {fmt_us(f['total_us'])} = roofline {fmt_us(f['roofline_us'])} (sum over "
            f"{f['launching_nodes']} kernels of max(bytes / {lim['bandwidth_gbps']:.0f} GB/s, flops / "
            f"{lim['peak_tflops']:.1f} TFLOP/s)) + launch {fmt_us(f['launch_us'])} ({f['kernels']} kernels x "
            f"{lim['graph_node_us']:.2f} µs per CUDA-graph node); limits {lim['source']}, measured {lim['measured']}"]


def _inputs(report: dict[str, Any]) -> str:
    return ", ".join(f"{i.get('dtype', '')}{i.get('shape', i.get('value'))}" for i in report.get("inputs", []))


def _header(report: dict[str, Any]) -> str:
    env = report["environment"]
    cap = report.get("capture") or {}
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    return (f"{report['model']} on {env['device_name']} ({env['device']}{driver}), torch {env['torch']}, "
            f"inputs {_inputs(report)}, captured by {cap.get('method', '?')}, backend {report.get('backend')}")


FIGURE_TITLES = {
    "plot_latency_svg": "latency per system, with the floor", "plot_latency_png": "latency per system (PNG)",
    "plot_passes_svg": "launches after each pass", "plot_passes_png": "launches after each pass (PNG)",
    "graph_before_svg": "graph before the passes", "graph_after_svg": "graph after the passes",
    "graph_before_graphviz_svg": "graph before the passes (Graphviz)",
    "graph_after_graphviz_svg": "graph after the passes (Graphviz)",
    "graph_before_dot": "graph before the passes (Graphviz source)",
    "graph_after_dot": "graph after the passes (Graphviz source)",
    "trace": "Chrome trace of one optimized forward (open in https://ui.perfetto.dev)",
}


def _timing_line(report: dict[str, Any]) -> list[str]:
    settings = report.get("settings") or {}
    if settings.get("rounds") is None:
        return []
    load = (settings.get("load_average") or {}).get("after")
    cores = (report.get("environment") or {}).get("cpu_count")
    busy = f"; load average {load[0]} on {cores} cores" if load else ""
    return [_wrap(f"timing: {_timing_words(settings)}{busy}", 120)]


def render_text(report: dict[str, Any], fmt: str = "simple") -> str:
    lines = [_header(report), "", tabulate(system_rows(report), SYSTEM_HEAD, tablefmt=fmt, disable_numparse=True),
             *_not_requested_line(report), *_timing_line(report), "", *report.get("verdicts", []), "",
             *floor_lines(report), "",
             tabulate(pass_rows(report), PASS_HEAD, tablefmt=fmt, disable_numparse=True)]
    if report["kernels"]:
        lines += ["", tabulate(kernel_rows(report), KERNEL_HEAD, tablefmt=fmt, disable_numparse=True)]
    if graphs := graph_rows(report):
        lines += ["", tabulate(graphs, GRAPH_HEAD, tablefmt=fmt, disable_numparse=True)]
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


_WRITEUP = [("Original model", "eager"), ("TorchScript", "torchscript"), ("TensorRT", "tensorrt")]


def _writeup_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for method, name in _WRITEUP:
        s = report["systems"].get(name)
        if s is None:
            continue
        if s["status"] == "ok":
            rows.append([method, f"{s['latency']['median_us'] / 1e6:.6f}", fmt_us(s["latency"]["median_us"])])
        else:
            rows.append([method, "-", s["reason"] if s["status"] == "skipped" else f"failed: {_short(s['error'], 80)}"])
    return rows


def _md_escape(rows: list[list[Any]]) -> list[list[Any]]:
    return [[str(c).replace("|", "\\|") for c in row] for row in rows]


def _timing_words(settings: dict[str, Any]) -> str:
    """How the latencies were taken, in words, from the report's settings."""
    if settings.get("rounds") is None:  # a report of schema 2: one system after the other
        return f"median of {settings['iters']} synchronized calls after {settings['warmup']} warm-up calls"
    return (f"{settings['rounds']} interleaved rounds, each system one block of at least "
            f"{settings.get('block_s', 0) * 1e3:.0f} ms of synchronized calls per round, at least {settings['iters']} "
            f"calls per system after {settings['warmup']} warm-up calls; latency: the median of the per-round "
            f"medians; speedup: the median of the per-round ratios")


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    def md(rows, head):
        return tabulate(_md_escape(rows), head, tablefmt="github", disable_numparse=True)

    commit = (f" · fxopt {env['git_describe']}" if env.get("git_describe") else
              f" · fxopt {env['fxopt_commit'][:10]}" if env.get("fxopt_commit") else "")
    parts = [
        f"# {report['model']}: fxopt report\n",
        f"{env['date']} · {env['device_name']} ({env['device']}"
        + (f", driver {env['driver']}" if env.get("driver") else "") + f") · torch {env['torch']}{commit} · "
        f"backend `{report.get('backend')}` · optimized in {_num(report.get('optimize_seconds'), '.2f')} s\n",
        f"Inputs {_inputs(report)}; captured by {(report.get('capture') or {}).get('method', '?')}."
        + (f" {report['description']}." if report.get("description") else "") + "\n",
        "## Verdict\n", "\n".join(f"- {v}" for v in report.get("verdicts", [])) + "\n",
        "## Inference time\n",
        f"The table the write-up ends with, filled in ({_timing_words(report['settings'])}):\n",
        md(_writeup_rows(report), ["Method", "Inference time (s)", "median"]) + "\n",
        "## Systems\n",
        "Same run, same inputs. *first call*: build (capture + compile) and the first forward (compiled kernels are "
        "cached on disk by fxopt and Inductor, so a repeated run starts faster); *launch calls*: "
        "kernel-launch API calls on the CPU per forward; *GPU kernels* and *GPU busy* from torch.profiler; "
        "*dispatched ops*: ATen ops one forward dispatches; *peak mem*: extra device memory during one forward; "
        "*x floor*: median latency over the floor below. The systems were timed together, interleaved: "
        f"{_timing_words(report['settings'])}. *rounds IQR*: the interquartile range of a system's per-round medians; "
        "*vs eager*: eager's median over the system's, with the interquartile range of the per-round ratios; "
        "*(unstable)*: that range is wider than "
        f"{(report['settings'].get('unstable_spread') or 0):.0%} of the figure (see the notes).\n",
        md(system_rows(report, note_width=None), SYSTEM_HEAD) + "\n",
        *[line + "\n" for line in _not_requested_line(report)],
        "## Floor\n", "\n".join(floor_lines(report)) + "\n",
    ]
    floor = report.get("floor") or {}
    nodes = [n for n in floor.get("nodes", []) if n.get("floor_us") is not None]
    if nodes:
        top = sorted(nodes, key=lambda n: -n["floor_us"])[:10]
        parts.append(md([[n["node"], n["op"], _bytes(n["bytes"]), f"{n['flops'] / 1e6:.2f}", f"{n['floor_us']:.2f}",
                          n["bound"]] for n in top],
                        ["node", "op", "bytes", "MFLOP", "floor µs", "bound"]) + "\n")
    parts += ["## Passes\n", "Static launches and dispatched ops after each pass, what it changed, its time.\n",
              md(pass_rows(report, width=None), PASS_HEAD) + "\n"]
    parts.append("## Fused kernels\n")
    if report["kernels"]:
        parts.append(md(kernel_rows(report), KERNEL_HEAD) + "\n")
    else:
        parts.append("fxopt fused no kernels for this model.\n")
    if graphs := graph_rows(report, width=None):
        parts += ["## CUDA graphs\n", "fxopt + CUDA graphs, per input signature: *pool gained*: device memory the "
                  "graphs' pool grew by at capture; *replay*: the compiled (native) call or the Python one, and why.\n",
                  md(graphs, GRAPH_HEAD) + "\n"]
    files = report.get("files") or {}
    figures = [(k, f) for k, f in files.items() if f.endswith(".svg") and k.startswith(("plot", "graph"))]
    if figures:
        parts.append("## Figures\n")
        parts += [f"![{FIGURE_TITLES.get(k, k)}]({f})\n" for k, f in figures]
    others = [(k, f) for k, f in files.items() if (k, f) not in figures and k not in ("json", "markdown")]
    if others:
        parts.append("## Files\n")
        parts.append("\n".join(f"- {FIGURE_TITLES.get(k, k)}: [{f}]({f})" for k, f in others) + "\n")
    if report.get("notes"):
        parts += ["## Notes\n", "\n".join(f"- {n}" for n in report["notes"]) + "\n"]
    if report.get("code"):
        parts += ["## Optimized graph\n", "```python\n" + report["code"].strip() + "\n```\n"]
    return "\n".join(parts)


# -- the index of --all --------------------------------------------------------------------------------------------
INDEX_HEAD = ["model", "best system", "best vs eager", "fxopt vs eager", "fxopt vs torch.compile",
              "kernels eager -> fxopt", "fxopt x floor", "report"]


def index_row(summary: dict[str, Any]) -> list[str]:
    if summary.get("error"):
        return [summary["model"], "-", "-", "-", "-", "-", "-", f"failed: {_short(summary['error'], 100)}"]

    def x(v):
        return f"{v:.2f}x" if v is not None else "-"

    return [summary["model"], summary.get("best") or "-", x(summary.get("best_x_eager")),
            x(summary.get("fxopt_x_eager")), x(summary.get("fxopt_x_compile")), summary.get("kernels") or "-",
            f"{summary['fxopt_x_floor']:.1f}x" if summary.get("fxopt_x_floor") is not None else "-",
            f"[{summary['markdown']}]({summary['markdown']})" if summary.get("markdown") else "-"]


def _paired(reference: dict[str, Any], other: dict[str, Any]) -> float:
    """reference's latency over other's: the median of the per-round ratios when both were timed in the same rounds
    (NOTE [Interleaved timing]), else the ratio of the medians."""
    from .measure import round_ratios

    sp = round_ratios(reference, other)
    return sp["median"] if sp else reference["median_us"] / other["median_us"]


def summarize(report: dict[str, Any], markdown_name: str | None) -> dict[str, Any]:
    """The index page's row for one model's report."""
    systems = report["systems"]
    ok = {n: s for n, s in systems.items() if s["status"] == "ok" and s.get("latency")}
    best = min(ok.values(), key=lambda s: s["latency"]["median_us"]) if ok else None
    fx, comp, eager = ok.get("fxopt"), ok.get("compile"), ok.get("eager")
    kernels = None
    if eager and fx:
        for key, what in (("cuda_kernels", "GPU kernels"), ("dispatched", "dispatched ops")):
            if _launch(eager, key) is not None and _launch(fx, key) is not None:
                kernels = f"{_launch(eager, key)} -> {_launch(fx, key)} {what}"
                break
    return {
        "model": report["model"], "device": report["environment"]["device"], "markdown": markdown_name,
        "best": best["label"] if best else None, "best_x_eager": best.get("x_eager") if best else None,
        "fxopt_x_eager": fx.get("x_eager") if fx else None,
        "fxopt_x_compile": _paired(comp["latency"], fx["latency"]) if fx and comp else None,
        "fxopt_x_floor": fx.get("x_floor") if fx else None, "kernels": kernels,
        "medians_us": {n: s["latency"]["median_us"] for n, s in ok.items()},
    }


def render_index(summaries: list[dict[str, Any]], environment: dict[str, Any], argv: list[str]) -> str:
    rows = [index_row(s) for s in summaries]
    return "\n".join([
        "# fxopt reports\n",
        f"{environment['date']} · {environment['device_name']} ({environment['device']}) · torch "
        f"{environment['torch']}\n",
        f"`python -m fxopt.report {' '.join(argv)}`\n",
        "*best vs eager*, *fxopt vs eager*: eager's median latency over the system's (above 1: faster); "
        "*fxopt vs torch.compile*: torch.compile's median over fxopt's; *x floor*: fxopt's median over the floor.\n",
        tabulate(_md_escape(rows), INDEX_HEAD, tablefmt="github", disable_numparse=True), ""])
