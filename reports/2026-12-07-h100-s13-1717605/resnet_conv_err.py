"""Session 13: each conv_tf32 node of ResNet-50 (tf32x3_convolutions) on the model's real activations: its error
against a float64 convolution of the same input, beside float32's, and the input's statistics."""
import torch
import torch.fx as fx
import torch.nn.functional as F

import fxopt
from benchmarks.sweep_models import MODELS
from fxopt.runtime.tf32 import conv_tf32_op

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
model, args = MODELS["tv/resnet50"].build(1, torch.device("cuda"))
opt = fxopt.optimize(model, args, cuda_graphs=True, enable=["tf32x3_convolutions"])
gm = opt.specialization_for(args).graph_module


class Probe(fx.Interpreter):
    def call_function(self, target, a, kw):
        out = super().call_function(target, a, kw)
        if target is conv_tf32_op:
            x3, w3, b, stride, pad, dil, g = a[:7]
            relu = a[9] if len(a) > 9 else False
            C3 = x3.shape[1]
            per = C3 // g // 3
            xs = x3.view(x3.shape[0], g, 3, per, *x3.shape[2:])
            x = (xs[:, :, 0] + xs[:, :, 1]).reshape(x3.shape[0], g * per, *x3.shape[2:])
            w = w3[:, :per] + w3[:, 2 * per:]
            def f(xx, ww, bb):
                y = F.conv2d(xx, ww, bb, stride, pad, dil, g)
                return torch.relu(y) if relu else y
            want = f(x.double(), w.double(), None if b is None else b.double())
            fp32 = f(x, w, b)
            s = want.abs().max()
            e3, e32 = ((out.double() - want).abs().max() / s).item(), ((fp32.double() - want).abs().max() / s).item()
            d3, d32 = out.double() - want, fp32.double() - want  # signed: a bias shows as a mean near the max
            bias3, bias32 = (d3.mean() / d3.abs().mean()).item(), (d32.mean() / d32.abs().mean()).item()
            print(f"{tuple(x.shape)} {tuple(w.shape)} s{stride[0]} 3xTF32 {e3:.1e} fp32 {e32:.1e} ratio {e3 / max(e32, 1e-12):6.1f} "
                  f"mean/mean-abs error 3xTF32 {bias3:+.2f} fp32 {bias32:+.2f} "
                  f"x: max {x.abs().max().item():.2e} mean {x.mean().item():.2e} zeros {(x == 0).float().mean().item():.2f}; "
                  f"w max {w.abs().max().item():.1e}; b max {0 if b is None else b.abs().max().item():.1e}; y max {s.item():.2e}", flush=True)
        return out


with torch.no_grad():
    Probe(gm).run(*args)
