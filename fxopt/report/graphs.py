"""The graph before and after fxopt's passes, as pictures: networkx graph -> SVG (matplotlib) and Graphviz .dot.

Nodes are coloured by what they are: inputs, fxopt's fused kernels, nodes a pass created (folded convs, GEMMs with
their epilogue), other kernels, and nodes that launch nothing (views, getitem). In the graph *before* the passes,
the nodes that ended up inside a fused kernel share that kernel's colour, and nodes a pass removed are greyed.
Parameters and buffers (``get_attr``) are left out; getitem nodes reading a fused kernel's outputs are merged into
it. The .dot text needs nothing; with pydot and Graphviz's ``dot`` installed it is also rendered to SVG.
"""

from __future__ import annotations

import operator
import shutil
from pathlib import Path
from typing import Any

import networkx as nx
import torch.fx as fx

from .. import ops
from ..runtime.kernel import fused_op

KIND_STYLE: dict[str, tuple[str, str]] = {  # kind -> (fill colour, legend text)
    "input": ("#cfe2ff", "input"),
    "output": ("#e9ecef", "output"),
    "fused": ("#ffa94d", "fxopt fused kernel"),
    "pass": ("#b2f2bb", "created or rewritten by a pass"),
    "op": ("#ffffff", "kernel (unchanged)"),
    "view": ("#f1f3f5", "no launch (view, getitem, shape)"),
    "removed": ("#ced4da", "removed by a pass"),
}
REGION_COLOURS = ["#ffa94d", "#74c0fc", "#f783ac", "#b197fc", "#63e6be", "#ffd43b", "#ff8787", "#a9e34b"]


def _shape(node: fx.Node) -> str:
    tm = node.meta.get("tensor_meta")
    if isinstance(tm, (list, tuple)) and not hasattr(tm, "shape"):  # TensorMetadata is a NamedTuple itself
        tm = next((t for t in tm if hasattr(t, "shape")), None)
    if tm is None or not hasattr(tm, "shape"):
        return ""
    dtype = str(getattr(tm, "dtype", "")).replace("torch.", "")
    return "x".join(str(s) for s in tm.shape) + (f" {dtype}" if dtype and dtype != "float32" else "")


def _op(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(node.target)).__name__
        except AttributeError:
            return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return ops.describe(node)


def _is_fused(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is fused_op


def _label(node: fx.Node, gm: fx.GraphModule, kernels: dict[str, Any]) -> str:
    if _is_fused(node):
        k = kernels.get(node.name)
        names = list(getattr(k, "op_names", []) or [])
        chain = "+".join(dict.fromkeys(names))
        if len(chain) > 28:
            chain = chain[:27] + "…"
        what = f"{chain} ({len(names)} ops)" if names else str(node.args[0])[:28]
        return f"{node.name}\n{what}\n{_shape(node)}".rstrip()
    if node.op in ("placeholder", "output"):
        return f"{node.name}\n{_shape(node)}".rstrip() if node.op == "placeholder" else "output"
    op = _op(node, gm)
    head = node.name if op == node.name else f"{node.name}\n{op[:28]}"
    return f"{head}\n{_shape(node)}".rstrip()


def _kind(node: fx.Node, gm: fx.GraphModule, original: dict[str, Any] | None) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if _is_fused(node):
        return "fused"
    if not ops.launches_kernel(node, gm):
        return "view"
    if node.meta.get("fxopt_from_pass"):
        return "pass"
    if original is not None and original.get(node.name, object()) != (node.op, node.target):
        return "pass"  # new, or rewritten in place (a conv whose module now holds folded BatchNorm weights)
    return "op"


def to_networkx(gm: fx.GraphModule, kernels: dict[str, Any] | None = None,
                regions: dict[str, str] | None = None, removed: set[str] | None = None,
                before: fx.GraphModule | None = None) -> nx.DiGraph:
    """The graph of ``gm`` as a DiGraph: node attributes ``label``, ``kind``, ``colour``, ``region``, ``launches``.

    ``regions`` (node name -> fused node name) and ``removed`` colour a graph before the passes; ``before`` (the
    graph before the passes) marks the nodes of a graph after them that a pass created or rewrote."""
    kernels, regions, removed = kernels or {}, regions or {}, removed or set()
    original = {n.name: (n.op, n.target) for n in before.graph.nodes} if before is not None else None
    g = nx.DiGraph()
    alias: dict[str, str] = {}  # getitem of a fused node -> the fused node
    region_colour = {r: REGION_COLOURS[i % len(REGION_COLOURS)] for i, r in enumerate(dict.fromkeys(regions.values()))}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        if node.target is operator.getitem and node.args and isinstance(node.args[0], fx.Node) and \
                _is_fused(node.args[0]):
            alias[node.name] = node.args[0].name
            continue
        kind = _kind(node, gm, original)
        region = regions.get(node.name)
        colour = KIND_STYLE[kind][0]
        if region is not None:
            colour = region_colour[region]
        elif node.name in removed:
            kind, colour = "removed", KIND_STYLE["removed"][0]
        g.add_node(node.name, label=_label(node, gm, kernels), kind=kind, colour=colour, region=region,
                   launches=kind in ("fused", "pass", "op") or (kind == "removed" and ops.launches_kernel(node, gm)))
        for src in node.all_input_nodes:
            if src.op == "get_attr":
                continue
            src_name = alias.get(src.name, src.name)
            if src_name != node.name:
                g.add_edge(src_name, node.name)
    g.graph["region_colour"] = region_colour
    return g


def _op_names(node: fx.Node, gm: fx.GraphModule) -> set[str]:
    """Names a kernel's ``op_names`` may list for this node: its op-table name (elementwise or row reduction), and,
    for in-place spellings the table refuses (``ReLU(inplace=True)``, ``relu_``), the op's plain name."""
    names = set()
    for normalize in (ops.normalize, ops.normalize_row_reduction):
        try:
            call = normalize(node, gm)
        except Exception:  # noqa: BLE001 -- a node the op table cannot read is simply not fusible
            call = None
        op = getattr(call, "op", None)
        if op is not None:
            names.add(op.name)
    if node.op == "call_module":
        try:
            names.add(type(gm.get_submodule(node.target)).__name__.lower())
        except AttributeError:
            pass
    else:
        names.add(ops.describe(node).rstrip("_"))
    return names


def absorbed_regions(before: fx.GraphModule, after: fx.GraphModule,
                     kernels: dict[str, Any] | None = None) -> tuple[dict[str, str], set[str]]:
    """Which nodes of the graph before the passes ended up in which fused node of the graph after them, and which
    nodes the passes removed otherwise.

    Passes keep the names of the nodes they leave, so a node of ``before`` absent from ``after`` was removed. The
    region of fused node F grows from F's inputs in graph order: a removed node joins it when every tensor it reads
    is an input of F, in the region, or another removed node reached this way (a folded BatchNorm, a dropout: they
    pass through without joining), and its op is one of the ops F's kernel fused (``kernels``: fused node name ->
    kernel). An input of F that another fused kernel G produced stands for G's region."""
    kernels = kernels or {}
    after_names = {n.name for n in after.graph.nodes}
    gone = {n.name for n in before.graph.nodes if n.name not in after_names and n.op != "get_attr"}
    regions: dict[str, str] = {}
    members: dict[str, set[str]] = {}  # fused node -> its region
    before_names = {n.name for n in before.graph.nodes}

    def seeds_of(a: fx.Node, seen: set[str]) -> set[str]:
        """The nodes of ``before`` that after-graph node ``a`` stands for."""
        if a.name in before_names:
            return {a.name}
        if a.name in seen:
            return set()
        seen.add(a.name)
        if a.target is operator.getitem and a.args and isinstance(a.args[0], fx.Node) and _is_fused(a.args[0]):
            return set(members.get(a.args[0].name, ()))
        return set().union(*(seeds_of(i, seen) for i in a.all_input_nodes))

    for node in after.graph.nodes:
        if not _is_fused(node):
            continue
        seen: set[str] = set()
        known: set[str] = set().union(*(seeds_of(a, seen) for a in node.all_input_nodes))
        fused_ops = set(getattr(kernels.get(node.name), "op_names", None) or [])
        region: set[str] = set()
        for n in before.graph.nodes:
            if n.name not in gone or n.name in regions or n.name in known:
                continue
            reads = [i.name for i in n.all_input_nodes if i.op != "get_attr"]
            if not reads or not all(r in known for r in reads):
                continue
            known.add(n.name)
            if not fused_ops or _op_names(n, before) & fused_ops:
                region.add(n.name)
        members[node.name] = region
        regions.update({name: node.name for name in region})
    return regions, gone - set(regions)


def layers(g: nx.DiGraph) -> dict[str, tuple[float, int]]:
    """(x, layer) per node: layers are topological generations (networkx), ordered within a layer by the mean x of
    their predecessors so that edges cross less."""
    pos: dict[str, tuple[float, int]] = {}
    for depth, generation in enumerate(nx.topological_generations(g)):
        def key(n):
            xs = [pos[p][0] for p in g.predecessors(n) if p in pos]
            return sum(xs) / len(xs) if xs else 0.0

        ordered = sorted(generation, key=key)
        for i, n in enumerate(ordered):
            pos[n] = (i - (len(ordered) - 1) / 2, depth)
    return pos


def draw_svg(g: nx.DiGraph, path: Path, title: str) -> Path:
    """Draw ``g`` top to bottom with matplotlib (ImportError when it is missing); the figure grows with the graph."""
    import matplotlib  # noqa: F401 -- ImportError here when it is missing, before any work
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    pos = layers(g)
    depth = max((d for _, d in pos.values()), default=0) + 1
    width = max((sum(1 for _, d in pos.values() if d == level) for level in range(depth)), default=1)
    fig = Figure(figsize=(min(60.0, max(7.0, 2.6 * width)), min(150.0, max(4.0, 1.05 * depth + 1.2))))
    ax = fig.add_subplot()
    ax.set_xlim(-width / 2 - 0.2, width / 2 + 0.2)
    ax.set_ylim(-depth + 0.4, 0.6)
    ax.axis("off")
    ax.set_title(title, fontsize=12, loc="left")
    for src, dst in g.edges:
        (x0, d0), (x1, d1) = pos[src], pos[dst]
        ax.annotate("", xy=(x1, -d1), xytext=(x0, -d0),
                    arrowprops=dict(arrowstyle="-|>", color="#495057", lw=0.8, shrinkA=16, shrinkB=16,
                                    connectionstyle=f"arc3,rad={0.25 if d1 - d0 > 1 else 0.0}"))
    for name, attrs in g.nodes(data=True):
        x, d = pos[name]
        ax.text(x, -d, attrs["label"], ha="center", va="center", fontsize=8, zorder=3,
                bbox=dict(boxstyle="round,pad=0.35", fc=attrs["colour"], ec="#343a40",
                          ls="-" if attrs["launches"] or attrs["kind"] in ("input", "output") else "--", lw=0.8))
    kinds = dict.fromkeys(a["kind"] for _, a in g.nodes(data=True))
    handles = [Patch(fc=KIND_STYLE[k][0], ec="#343a40", label=KIND_STYLE[k][1]) for k in KIND_STYLE if k in kinds]
    if g.graph.get("region_colour"):
        handles.append(Patch(fc=REGION_COLOURS[0], ec="#343a40", label="fused later (one colour per kernel)"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)  # the format from the suffix: .svg in reports
    return path


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: nx.DiGraph, title: str) -> str:
    """Graphviz source for ``g`` (fused regions of a graph before the passes as coloured clusters)."""
    lines = ["digraph fxopt {", "  rankdir=TB;", f"  label={_dot_quote(title)}; labelloc=t; fontsize=16;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    clusters: dict[str, list[str]] = {}
    for name, attrs in g.nodes(data=True):
        style = '"rounded,filled"' if attrs["launches"] or attrs["kind"] in ("input", "output") else \
            '"rounded,filled,dashed"'
        decl = (f"{_dot_quote(name)} [label={_dot_quote(attrs['label'])}, fillcolor=\"{attrs['colour']}\", "
                f"style={style}];")
        if attrs.get("region"):
            clusters.setdefault(attrs["region"], []).append(decl)
        else:
            lines.append("  " + decl)
    for i, (region, decls) in enumerate(clusters.items()):
        colour = g.graph.get("region_colour", {}).get(region, REGION_COLOURS[0])
        lines.append(f"  subgraph cluster_{i} {{ label={_dot_quote('-> ' + region)}; style=dashed; "
                     f"color=\"{colour}\";")
        lines += ["    " + d for d in decls]
        lines.append("  }")
    lines += [f"  {_dot_quote(a)} -> {_dot_quote(b)};" for a, b in g.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(dot_text: str, path: Path) -> Path:
    """Render Graphviz source to SVG with pydot (ImportError without pydot; RuntimeError without ``dot``)."""
    import pydot

    if shutil.which("dot") is None:
        raise RuntimeError("Graphviz's dot program is not installed")
    graphs = pydot.graph_from_dot_data(dot_text)
    if not graphs:
        raise RuntimeError("pydot could not parse the generated .dot text")
    graphs[0].write_svg(str(path))
    return path


def graph_pictures(before: fx.GraphModule | None, after: fx.GraphModule | None, kernels: dict[str, Any],
                   stem: Path, model: str, notes: list[str]) -> dict[str, str]:
    """Write ``stem-graph-{before,after}.{dot,svg}``; returns {kind: path}. Missing matplotlib or pydot/Graphviz
    mean fewer files and a note, never an error."""
    files: dict[str, str] = {}
    graphs = {}
    if after is not None:
        if before is not None:
            regions, removed = absorbed_regions(before, after, kernels)
            graphs["before"] = (to_networkx(before, regions=regions, removed=removed),
                                f"{model}: graph before the passes (colours: nodes fused into one kernel)")
        graphs["after"] = (to_networkx(after, kernels, before=before), f"{model}: graph after the passes")
    have_matplotlib, have_graphviz = True, True
    for which, (g, title) in graphs.items():
        launching = sum(1 for _, a in g.nodes(data=True) if a["launches"] and a["kind"] != "removed")
        title = f"{title}: {g.number_of_nodes()} nodes, {launching} launch kernels"
        dot_text = to_dot(g, title)
        dot_path = stem.with_name(f"{stem.name}-graph-{which}.dot")
        dot_path.write_text(dot_text)
        files[f"graph_{which}_dot"] = str(dot_path)
        if have_matplotlib:
            try:
                files[f"graph_{which}_svg"] = str(draw_svg(g, stem.with_name(f"{stem.name}-graph-{which}.svg"),
                                                            title))
            except ImportError:
                have_matplotlib = False
                notes.append("matplotlib is not installed: the graphs are written as Graphviz .dot text only "
                             "(pip install matplotlib for SVG pictures)")
        if have_graphviz:
            try:
                files[f"graph_{which}_graphviz_svg"] = str(render_dot(
                    dot_text, stem.with_name(f"{stem.name}-graph-{which}-graphviz.svg")))
            except ImportError:
                have_graphviz = False
                notes.append("pydot is not installed: no Graphviz rendering of the graphs (pip install pydot, and "
                             "Graphviz for its dot program)")
            except Exception as e:  # noqa: BLE001 -- an optional rendering: noted, the .dot file stays
                have_graphviz = False
                notes.append(f"Graphviz rendering skipped: {type(e).__name__}: {e}")
    return files


__all__ = ["absorbed_regions", "draw_svg", "graph_pictures", "layers", "render_dot", "to_dot", "to_networkx"]
