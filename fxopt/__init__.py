"""fxopt: a graph-level optimizer for PyTorch inference.

    opt = fxopt.optimize(model, example_inputs)
    opt(*inputs)            # the rewritten GraphModule, checked against eager
    print(opt.summary())    # launches before/after every pass
"""

__version__ = "0.1.0"  # before the imports: submodules read it

import importlib
from typing import TYPE_CHECKING

from .api import OptimizedModule, optimize
from .artifact import ArtifactError, load, save
from .backends.user import register_kernel, unregister_kernel
from .capture import annotate, capture
from .errors import CaptureError, CompileError, FxoptError, InferenceOnlyError, PassError, VerificationError
from .launches import LaunchCount, count_launches
from .passes import stats
from . import passes, verify  # noqa: E402, F401  (loaded by the api anyway; named here as attributes)

# The users of the api load on first use (PEP 562): `import fxopt` does not import serving, the model zoo or the
# report, so `fxopt.serve.DynamicBatcher` and `fxopt.models.get(...)` import their subpackage when first touched.
_LAZY_SUBPACKAGES = ("models", "report", "serve")

if TYPE_CHECKING:  # for type checkers and editors only
    from . import models, report, serve  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")  # the import also sets it as an attribute of fxopt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))


__all__ = [
    "ArtifactError", "load", "save",
    "CaptureError", "CompileError", "FxoptError", "InferenceOnlyError", "LaunchCount", "OptimizedModule", "PassError",
    "VerificationError",
    "annotate", "capture", "count_launches", "optimize", "register_kernel", "stats", "unregister_kernel",
]
