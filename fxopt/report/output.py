"""The files of a report under ``--out``: MODEL-DEVICE.json and .md, plots, graph pictures, a Chrome trace.

Optional dependencies (matplotlib, pydot + Graphviz) and optional steps that fail mean fewer files and a note in
the report, never a crash: the JSON and the Markdown are always written, last, so they list what was written.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from .render import render_markdown
from .run import Report


def file_stem(model: str, device: str) -> str:
    """``MODEL-DEVICE``: the model's name made safe for a file name, the device type (cpu, cuda)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_") or "model"
    return f"{safe}-{device.split(':')[0]}"


def report_stem(out_dir: Path, data: dict[str, Any]) -> tuple[Path, str | None]:
    """Where the report's files go (``out_dir/MODEL-DEVICE``), and a note when that name was taken.

    MODEL is stable (the same spec gives the same name on every run) and names the model's origin (``model.make``
    for ``model.py:make``). Two files of the same stem in different folders would still share it: when
    ``out_dir`` already holds a report of the same name from another source, this one gets a suffix made from its
    source path instead of overwriting it."""
    device = data["environment"]["device"]
    stem = out_dir / file_stem(data["model"], device)
    source = data.get("model_source")
    existing = stem.with_name(f"{stem.name}.json")
    if not source or not existing.is_file():
        return stem, None
    try:
        other = json.loads(existing.read_text()).get("model_source")
    except (OSError, ValueError, AttributeError):
        return stem, None  # unreadable: not a report this one could be confused with
    if not other or other == source:
        return stem, None
    suffix = hashlib.sha1(source.encode()).hexdigest()[:8]
    unique = out_dir / file_stem(f"{data['model']}-{suffix}", device)
    return unique, (f"{existing.name} holds the report of another model of the same name ({other}): this one "
                    f"({source}) is written as {unique.name}.json")


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats as strings ("inf", "nan"), tuples as lists, anything else unknown as str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def write_report(report: Report, out_dir: Path, *, trace: bool = True) -> tuple[Path, Path]:
    """Write every file of ``report`` into ``out_dir``; returns the JSON and Markdown paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report.data
    stem, taken = report_stem(out_dir, data)
    notes: list[str] = data["notes"]
    if taken:
        notes.append(taken)
    files: dict[str, str] = {}

    from . import plots

    try:
        for kind, paths in plots.write_plots(data, stem).items():
            for p in paths:
                files[f"{kind}_{p.rsplit('.', 1)[-1]}"] = p
    except ImportError:
        notes.append("matplotlib is not installed: no plots (pip install matplotlib, or fxopt[plots])")
    except Exception as e:  # noqa: BLE001 -- an optional file: noted, the report goes on
        notes.append(f"plotting failed: {type(e).__name__}: {e}")

    from .graphs import graph_pictures

    try:
        files.update(graph_pictures(report.before, report.after, (report.opt.specializations[-1].kernels
                                                                  if report.after is not None else {}),
                                    stem, data["model"], notes))
    except Exception as e:  # noqa: BLE001 -- an optional file: noted, the report goes on
        notes.append(f"drawing the graphs failed: {type(e).__name__}: {e}")

    if trace and report.opt is not None:
        from .trace import chrome_trace

        try:
            files["trace"] = str(chrome_trace(report.opt, report.target.inputs, report.device,
                                              stem.with_name(f"{stem.name}-trace.json")))
        except Exception as e:  # noqa: BLE001 -- an optional file: noted, the report goes on
            notes.append(f"the Chrome trace failed: {type(e).__name__}: {e}")

    json_path, md_path = stem.with_name(f"{stem.name}.json"), stem.with_name(f"{stem.name}.md")
    files = {"json": str(json_path), "markdown": str(md_path), **files}
    data["files"] = {kind: Path(p).name for kind, p in files.items()}
    md_path.write_text(render_markdown(data))
    json_path.write_text(json.dumps(clean(data), indent=2))
    return json_path, md_path
