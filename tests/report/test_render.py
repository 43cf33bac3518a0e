"""fxopt/report/render.py: notes are wrapped or shown in full, never cut mid-word; spreads and unstable figures are
visible in the tables, the verdicts and a note."""

import re

import pytest

from fxopt.report import render
from fxopt.report.measure import spread
from fxopt.report.run import Report, _derive

LONG = ("fuse_epilogues: 2 convolution(s) on CPU left as they are: the fused convolutions this pass writes "
        "(conv + ReLU, conv + add + ReLU) are cuDNN's, CUDA only; the activation after a convolution stays its own "
        "op unless fuse_elementwise fuses it with the elementwise ops next to it")


def _words(text):
    return re.findall(r"\S+", text)


def test_wrap_keeps_every_word_whole():
    wrapped = render._wrap(LONG, 40)
    assert all(len(line) <= 40 for line in wrapped.splitlines())
    assert _words(wrapped) == _words(LONG) and "…" not in wrapped
    assert render._wrap(LONG, None) == LONG
    path = "/a/very/long/path/without/any/space/in/it/at/all.py"
    assert render._wrap(f"see {path} now", 20).splitlines() == ["see", path, "now"]


@pytest.mark.parametrize("limit", [5, 12, 30, 61])
def test_short_cuts_only_between_words(limit):
    text = "alpha beta gamma delta epsilon zeta eta theta"
    got = render._short(text, limit)
    kept = got.removesuffix(" …").split()
    assert kept == text.split()[:len(kept)] and kept  # whole words, in order, at least the first
    assert got == text or got.endswith(" …")


def _pass(notes):
    return {"name": "fuse_epilogues", "status": "applied", "static_after": 8, "dispatched_after": 8, "seconds": 0.001,
            "changes": {"linear_activation": 1}, "notes": notes}


def test_pass_notes_are_wrapped_in_the_terminal_and_whole_in_markdown():
    report = {"captured_launches": None, "passes": [_pass([LONG])]}
    text_cell = render.pass_rows(report)[0][-1]
    assert _words(text_cell) == _words("linear_activation=1; " + LONG) and "…" not in text_cell
    assert max(len(line) for line in text_cell.splitlines()) <= 80
    md_cell = render.pass_rows(report, width=None)[0][-1]
    assert md_cell == "linear_activation=1; " + LONG


def _system(name, label, round_medians):
    sp = spread(round_medians)
    return {"name": name, "label": label, "status": "ok", "reason": None, "error": None, "stage": None,
            "first_call_s": 0.1, "latency": {"median_us": sp["median"], "p99_us": max(round_medians),
                                             "round_medians_us": round_medians, "spread": sp},
            "launches": {"dispatched": 9}, "peak_memory_bytes": None, "max_rel_error": 0.0, "info": {}}


def _report(fx_rounds):
    data = {"model": "m", "environment": {"device": "cpu", "cpu_count": 2}, "floor": None, "notes": [],
            "settings": {"unstable_spread": 0.25, "load_average": {"after": [3.5, 2.0, 1.0]}},
            "systems": {"eager": _system("eager", "eager", [100.0, 102.0, 98.0, 101.0, 99.0]),
                        "fxopt": _system("fxopt", "fxopt", fx_rounds)}}
    report = Report(data, target=None, device=None, notes=data["notes"])
    _derive(report)
    return data


def test_a_steady_speedup_is_the_median_of_the_round_ratios():
    data = _report([50.0, 51.0, 49.0, 50.5, 49.5])
    fx = data["systems"]["fxopt"]
    assert fx["x_eager"] == pytest.approx(2.0, rel=0.01) and fx["unstable"] is False
    assert fx["x_eager_spread"]["q1"] <= fx["x_eager"] <= fx["x_eager_spread"]["q3"]
    assert not any(n.startswith("unstable") for n in data["notes"])
    row = render.system_rows(data)[1]
    assert row[0] == "fxopt" and row[5] == f"2.00x ({render._range(fx['x_eager_spread'])})"
    assert re.search(r"fxopt: 2\.00x faster than eager \(rounds [12]\.\d\d-2\.0\dx; 9 -> 9 dispatched ops\)",
                     fx["verdict"])


def test_a_wide_spread_is_marked_unstable_with_a_note():
    data = _report([50.0, 200.0, 45.0, 120.0, 60.0])  # per-round speedups from 0.5x to 2.2x
    fx = data["systems"]["fxopt"]
    assert fx["unstable"] is True and data["systems"]["eager"]["unstable"] is False
    assert fx["x_eager_spread"]["rel_iqr"] > 0.25
    note = next(n for n in data["notes"] if n.startswith("unstable"))
    assert "fxopt (speedup" in note and "load average 3.5 on 2 cores" in note and "over 25%" in note
    assert "unstable, rounds" in fx["verdict"]
    text = render.render_text({**data, "passes": [], "kernels": {}, "verdicts": [fx["verdict"]],
                               "environment": {**data["environment"], "device_name": "cpu", "torch": "x"},
                               "inputs": []})
    assert "fxopt (unstable)" in text and f"note: {note[:40]}" in text
