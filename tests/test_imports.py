"""`import fxopt` stays light: serving, the model zoo's users, drawing and plotting load on first use (issue 17).

Each check runs in a fresh interpreter: this test process has long since imported everything.
"""

from __future__ import annotations

import subprocess
import sys

# Modules `import fxopt` must not load; they are imported when a subpackage or function that needs them is first used.
HEAVY = ("fxopt.serve", "fxopt.serve.batcher", "fxopt.serve.ray_deployment", "fxopt.report", "ray", "networkx",
         "matplotlib")


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_fxopt_loads_no_serving_drawing_or_plotting():
    code = (f"import sys, fxopt; heavy = {HEAVY!r};"
            " print(sorted(m for m in sys.modules if m in heavy or m.startswith(tuple(h + '.' for h in heavy))))")
    assert _python(code) == "[]"


def test_lazy_subpackages_resolve_on_first_access():
    code = ("import sys, fxopt; assert 'fxopt.serve' not in sys.modules;"
            " assert {'models', 'report', 'serve'} <= set(dir(fxopt));"
            " from fxopt.serve.batcher import DynamicBatcher;"
            " assert fxopt.serve.DynamicBatcher is DynamicBatcher and fxopt.serve.HTTPClient;"
            " assert callable(fxopt.models.get) and fxopt.models.get('relu_sigmoid');"
            " from fxopt import report; assert report is fxopt.report and callable(report.run_report);"
            " assert 'ray' not in sys.modules;"
            " print('ok')")
    assert _python(code) == "ok"


def test_unknown_attribute_is_still_an_attribute_error():
    code = ("import fxopt\ntry:\n    fxopt.no_such_thing\nexcept AttributeError as e:\n    print(e)")
    assert _python(code) == "module 'fxopt' has no attribute 'no_such_thing'"
