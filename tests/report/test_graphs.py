"""Pictures of the graph before and after the passes: which nodes were fused, removed, rewritten; .dot text."""

import sys

import pytest
import torch

import fxopt
from fxopt import models
from fxopt.report import graphs


@pytest.fixture(scope="module")
def resnet():
    model, inputs = models.get("small_resnet").build()
    opt = fxopt.optimize(model, inputs)
    spec = opt.specializations[-1]
    return opt._captured, spec.graph_module, spec.kernels


def test_nodes_fused_into_a_kernel_and_nodes_removed(resnet):
    before, after, kernels = resnet
    regions, removed = graphs.absorbed_regions(before, after, kernels)
    # each residual add and the ReLU after it went into one fused kernel, the last with the global average pool
    # after it (a row kernel); the BatchNorms were folded away
    assert regions == {"add": "fused", "layer1_relu_1": "fused", "add_1": "fused_1", "layer2_relu_1": "fused_1",
                       "add_2": "fused_rows", "layer3_relu_1": "fused_rows", "pool": "fused_rows"}
    assert {"stem_1", "layer1_bn1", "layer1_bn2", "layer3_downsample_1"} <= removed
    assert not removed & set(regions)


def test_networkx_graph_kinds_and_labels(resnet):
    before, after, kernels = resnet
    g = graphs.to_networkx(after, kernels, before=before)
    assert g.nodes["x"]["kind"] == "input" and g.nodes["output"]["kind"] == "output"
    assert g.nodes["fused"]["kind"] == "fused" and "add+relu (2 ops)" in g.nodes["fused"]["label"]
    assert g.nodes["stem_0"]["kind"] == "pass"  # its conv now holds the folded BatchNorm
    assert g.nodes["fused_rows"]["kind"] == "fused" and g.nodes["flatten"]["kind"] == "view"
    assert "1x16x32x32" in g.nodes["fused"]["label"]
    assert not any(n.endswith("weight") for n in g.nodes)  # parameters are left out
    assert not any(n.startswith("getitem") for n in g.nodes)  # merged into their fused node
    assert g.has_edge("fused", "layer2_conv1")
    launching = sum(1 for _, a in g.nodes(data=True) if a["launches"])
    assert launching == fxopt.count_launches(after, models.get("small_resnet").inputs()).static


def test_layers_are_topological(resnet):
    _, after, kernels = resnet
    g = graphs.to_networkx(after, kernels)
    pos = graphs.layers(g)
    assert all(pos[a][1] < pos[b][1] for a, b in g.edges)


def test_dot_text_clusters_fused_regions(resnet):
    before, after, kernels = resnet
    regions, removed = graphs.absorbed_regions(before, after, kernels)
    dot = graphs.to_dot(graphs.to_networkx(before, regions=regions, removed=removed), 'a "quoted" title')
    assert dot.startswith("digraph fxopt {") and dot.rstrip().endswith("}")
    assert dot.count("subgraph cluster_") == 3 and 'label="-> fused_1"' in dot
    assert 'a \\"quoted\\" title' in dot
    assert '"layer1_conv1" -> "layer1_bn1";' in dot


def test_graph_pictures_without_matplotlib_write_dot_and_a_note(resnet, tmp_path, monkeypatch):
    before, after, kernels = resnet
    for name in [n for n in sys.modules if n.split(".")[0] in ("matplotlib", "pydot")] + ["matplotlib", "pydot"]:
        monkeypatch.setitem(sys.modules, name, None)
    notes = []
    files = graphs.graph_pictures(before, after, kernels, tmp_path / "m-cpu", "m", notes)
    assert set(files) == {"graph_before_dot", "graph_after_dot"}
    assert (tmp_path / "m-cpu-graph-after.dot").is_file()
    assert len(notes) == 2 and "matplotlib is not installed" in notes[0] and "pydot is not installed" in notes[1]


def test_draw_svg(resnet, tmp_path):
    pytest.importorskip("matplotlib")
    _, after, kernels = resnet
    path = graphs.draw_svg(graphs.to_networkx(after, kernels), tmp_path / "g.svg", "title")
    text = path.read_text()
    assert "<svg" in text and "fused_rows" in text


def test_a_graph_without_fused_nodes():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    regions, removed = graphs.absorbed_regions(gm, gm)
    assert regions == {} and removed == set()
    assert graphs.to_networkx(gm).number_of_nodes() == 3
