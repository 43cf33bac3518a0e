"""The Ray Serve tests (tests/serve/test_ray.py) say in the terminal summary how many of them ran, and what the
replica-kill test measured, so that a CI log shows they ran rather than skipped."""

from __future__ import annotations

import sys

RAY_TESTS = "test_ray.py::test_ray_serve"  # the node ids of the tests that start Ray Serve


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    reports = [(outcome, r) for outcome in ("passed", "failed", "error", "skipped")
               for r in terminalreporter.stats.get(outcome, [])
               if RAY_TESTS in getattr(r, "nodeid", "") and (r.when == "call" or outcome != "passed")]
    if not reports:
        return
    ray = sys.modules.get("ray")
    counts = {o: len({r.nodeid for oo, r in reports if oo == o}) for o in ("passed", "failed", "error", "skipped")}
    terminalreporter.write_sep("-", "fxopt Ray Serve")
    terminalreporter.write_line(f"ray {getattr(ray, '__version__', 'not imported')}: "
                                + ", ".join(f"{n} {o}" for o, n in counts.items()))
    for _, r in reports:
        for key, value in r.user_properties:
            if key == "fxopt_ray":
                terminalreporter.write_line(f"{r.nodeid.split('::')[-1]}: {value}")
