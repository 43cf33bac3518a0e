"""fxopt: a graph-level optimizer for PyTorch inference.

    opt = fxopt.optimize(model, example_inputs)
    opt(*inputs)            # the rewritten GraphModule, checked against eager
    print(opt.summary())    # launches before/after every pass
"""

from .api import OptimizedModule, optimize
from .capture import annotate, capture
from .errors import CaptureError, CompileError, FxoptError, PassError, VerificationError
from .launches import LaunchCount, count_launches
from .passes import stats

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "CompileError", "FxoptError", "LaunchCount", "OptimizedModule", "PassError", "VerificationError",
    "annotate", "capture", "count_launches", "optimize", "stats",
]
