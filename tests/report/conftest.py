"""Fixtures of the report tests."""

import sys

import pytest


@pytest.fixture
def no_plots(monkeypatch):
    """Reports without matplotlib: its figures cost most of a small report's CPU time (about 0.7 s each), and tests
    that are not about figures need none (test_report.py checks the figures, and the report without them)."""
    for name in list(sys.modules):
        if name.split(".")[0] == "matplotlib":
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
