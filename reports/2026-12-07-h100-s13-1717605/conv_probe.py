"""Session 13: float32 convolutions on an H100 at batch 1 (ResNet-50, diffusion shapes): float32 (TF32 off), one TF32
convolution in NCHW and NHWC, and 3xTF32 (the split as a where kernel + the TF32 convolution over 3C channels) in NCHW
and in NHWC (the split writing NHWC, the output back to NCHW). µs per call in CUDA graphs, median of 7."""
import torch
import torch.nn.functional as F

from fxopt.passes.tf32x3 import stacked_conv_weight
from fxopt.runtime.probe import graph_times_us
from fxopt.runtime.tf32 import conv_tf32_op

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
SHAPES = [((1, 64, 56, 56), (64, 64, 3, 3), 1, 1), ((1, 256, 56, 56), (64, 256, 1, 1), 1, 0),
          ((1, 64, 56, 56), (256, 64, 1, 1), 1, 0), ((1, 128, 28, 28), (128, 128, 3, 3), 1, 1),
          ((1, 256, 14, 14), (256, 256, 3, 3), 1, 1), ((1, 1024, 14, 14), (256, 1024, 1, 1), 1, 0),
          ((1, 512, 7, 7), (512, 512, 3, 3), 1, 1), ((1, 2048, 7, 7), (512, 2048, 1, 1), 1, 0),
          ((1, 512, 7, 7), (2048, 512, 1, 1), 1, 0), ((1, 3, 224, 224), (64, 3, 7, 7), 2, 3),
          ((1, 320, 32, 32), (320, 320, 3, 3), 1, 1), ((1, 16, 112, 112), (64, 16, 1, 1), 1, 0)]
print(torch.cuda.get_device_name(), torch.__version__)
print(f"{'x':18s} {'w':18s} {'fp32':>7s} {'tf32':>7s} {'tf32 cl':>7s} {'3x nchw':>7s} {'3x nhwc':>7s}")
for xs, ws, stride, pad in SHAPES:
    x = torch.randn(xs, device="cuda")
    w = torch.randn(ws, device="cuda") / (ws[1] * ws[2] * ws[3]) ** 0.5
    b = torch.randn(ws[0], device="cuda")
    N, C, H, W = xs
    w3 = stacked_conv_weight(w)
    w3cl = w3.contiguous(memory_format=torch.channels_last)
    xcl, wcl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    sel = torch.tensor([False, True, False], device="cuda")
    xr = x.view(N, 1, C, H, W)
    xp = x.permute(0, 2, 3, 1).unflatten(-1, (1, C))  # [N, H, W, 1, C], strided
    g = [stride, stride], [pad, pad], [1, 1], 1
    fns = [lambda: F.conv2d(x, w, b, stride, pad),
           lambda: conv_tf32_op(x, w, b, *g),
           lambda: conv_tf32_op(xcl, wcl, b, *g),
           lambda: conv_tf32_op(torch.where(sel.view(3, 1, 1, 1), xr, xr).view(N, 3 * C, H, W), w3, b, *g),
           lambda: conv_tf32_op(torch.where(sel.view(3, 1), xp, xp).reshape(N, H, W, 3 * C).permute(0, 3, 1, 2), w3cl, b,
                                *g).contiguous()]
    t = graph_times_us(fns)
    y0 = F.conv2d(x.double(), w.double(), b.double(), stride, pad)
    from fxopt.ops.elementwise import tf32_hi, tf32_lo
    real = [fns[0], fns[1], fns[2], lambda: conv_tf32_op(torch.where(sel.view(3, 1, 1, 1), tf32_lo(xr), tf32_hi(xr)).view(N, 3 * C, H, W), w3, b, *g),
            lambda: conv_tf32_op(torch.where(sel.view(3, 1), tf32_lo(xp), tf32_hi(xp)).reshape(N, H, W, 3 * C).permute(0, 3, 1, 2), w3cl, b, *g)]
    errs = [((f() - y0).abs().max() / y0.abs().max()).item() for f in real]
    print(f"{str(xs):18s} {str(ws):18s} " + " ".join(f"{v:7.2f}" for v in t) + "  err " + " ".join(f"{e:.0e}" for e in errs),
          flush=True)
