"""Session 13: where does tf32x3_convolutions' 1e-04 on ResNet-50 come from? The optimized module's error against
eager replayed as a CUDA graph, run directly (graph_module, no graph), and with conv_tf32's TF32 switch disabled (the
split in float32); the TF32 flags after; per-stage error of the direct run."""
import torch

import fxopt
from benchmarks.sweep_models import MODELS
from fxopt.runtime import tf32

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
model, args = MODELS["tv/resnet50"].build(1, torch.device("cuda"))
with torch.no_grad():
    ref = model(*args)
    ref64 = model.double()(*(a.double() for a in args)).float()
    model.float()


def err(y, r=ref):
    return ((y - r).abs().max() / r.abs().max()).item()


opt = fxopt.optimize(model, args, cuda_graphs=True, enable=["tf32x3_convolutions"])
spec = opt.specialization_for(args)
with torch.no_grad():
    replay = opt(*args)
    direct = spec.graph_module(*args)
    direct = direct if isinstance(direct, torch.Tensor) else direct[0]
    print("flags after", torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, flush=True)
    print(f"eager vs float64 {err(ref, ref64):.1e}; replay vs eager {err(replay):.1e} vs float64 {err(replay, ref64):.1e}; "
          f"direct vs eager {err(direct):.1e}; replay vs direct {err(replay, direct):.1e}", flush=True)
    off = fxopt.optimize(model, args, cuda_graphs=True)
    print(f"off replay vs eager {err(off(*args)):.1e} vs float64 {err(off(*args), ref64):.1e}", flush=True)
    tf32._tf32 = lambda library: __import__("contextlib").nullcontext()  # the split's three products in float32
    direct32 = spec.graph_module(*args)
    direct32 = direct32 if isinstance(direct32, torch.Tensor) else direct32[0]
    print(f"direct, conv_tf32 in float32: vs eager {err(direct32):.1e}", flush=True)
print(sum(1 for n in spec.graph_module.graph.nodes if "conv_tf32" in str(n.target)), "conv_tf32 nodes")
