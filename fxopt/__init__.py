"""fxopt: a graph-level optimizer for PyTorch inference.

    opt = fxopt.optimize(model, example_inputs)
    opt(*inputs)            # the rewritten GraphModule, checked against eager
    print(opt.summary())    # launches before/after every pass
"""

__version__ = "0.1.0"  # before the imports: submodules read it

from .api import OptimizedModule, optimize
from .artifact import ArtifactError, load, save
from .backends.user import register_kernel, unregister_kernel
from .capture import annotate, capture
from .errors import CaptureError, CompileError, FxoptError, InferenceOnlyError, PassError, VerificationError
from .launches import LaunchCount, count_launches
from .passes import stats
from . import models, passes, serve, verify  # noqa: E402, F401  (subpackages as attributes: fxopt.models.get(...))


__all__ = [
    "ArtifactError", "load", "save",
    "CaptureError", "CompileError", "FxoptError", "InferenceOnlyError", "LaunchCount", "OptimizedModule", "PassError",
    "VerificationError",
    "annotate", "capture", "count_launches", "optimize", "register_kernel", "stats", "unregister_kernel",
]
