"""The model zoo: named models with example-input factories, for tests, benchmarks and the report.

>>> from fxopt import models
>>> entry = models.get("simple_cnn")
>>> model, inputs = entry.build(device="cpu")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class SimpleCNN(nn.Module):
    """The case study of shared/reference/ (section 4), exactly its layers: 3x32x32 -> 10 classes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 64 * 8 * 8)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x


class ReluSigmoid(nn.Module):
    """The kernel-fusion example of shared/reference/ (section 3.1): sigmoid(relu(x)), two launches eagerly."""

    def forward(self, x):
        return torch.sigmoid(torch.relu(x))


class ElementwiseChain(nn.Module):
    """A 16-op elementwise chain in several spellings (functions, methods, operators)."""

    def forward(self, x):
        y = x * 1.5
        y = y + 0.25
        y = torch.relu(y)
        y = y.sigmoid()
        y = y - 0.5
        y = torch.tanh(y)
        y = y * y
        y = F.gelu(y)
        y = y.exp()
        y = torch.log1p(y)
        y = F.silu(y)
        y = -y
        y = torch.abs(y)
        y = y.sqrt()
        y = torch.clamp(y, 0.0, 2.0)
        y = y / 3.0
        return y


class MLPBlock(nn.Module):
    """Pre-norm transformer MLP: x + fc2(gelu(fc1(layer_norm(x))))."""

    def __init__(self, dim: int = 512, hidden: int = 2048):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class MLPStack(nn.Module):
    """Four MLP blocks, the measured 'MLP block' row of shared/DESIGN.md (1x16x512)."""

    def __init__(self, dim: int = 512, depth: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(*[MLPBlock(dim, 4 * dim) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class TransformerEncoder(nn.Module):
    """One nn.TransformerEncoderLayer (d_model 256, 4 heads, batch_first), as in shared/DESIGN.md.

    In eval mode without grad, eager runs the layer as one fused op (its fast path), so fxopt keeps it whole
    (NOTE [Fast paths] in capture.py); with ``keep_fast_paths=False``, symbolic_trace cannot take it (its forward
    inspects tensors to pick that path) and fxopt captures it through the torch.export fallback.
    """

    def __init__(self, d_model: int = 256, nhead: int = 4):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=4 * d_model, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A small ResNet-style net (BatchNorm, residual adds, in-place ReLU), 3x32x32 -> 10 classes."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine parameters, so folding them is really tested."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
    return model


@dataclass(frozen=True)
class ZooEntry:
    """A named model: how to build it and what inputs it takes (shape per batch size)."""

    name: str
    description: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch dimension

    def build(self, device: str | torch.device = "cpu", batch_size: int = 1, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """The model (eval mode, seeded weights) and one example input batch on ``device``."""
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model = _randomize_batchnorm(self.factory(), g).eval().to(device=device, dtype=dtype)
        return model, self.inputs(device, batch_size, dtype, seed)

    def inputs(self, device: str | torch.device = "cpu", batch_size: int = 1, dtype: torch.dtype = torch.float32,
               seed: int = 1) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((batch_size, *self.input_shape), generator=g).to(device=device, dtype=dtype)
        return (x,)


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in ZOO:
        raise ValueError(f"zoo model {entry.name!r} is already registered")
    ZOO[entry.name] = entry
    return entry


register(ZooEntry("simple_cnn", "SimpleCNN from the reference write-up: 2 conv + 2 pool + 2 linear, 3x32x32",
                  SimpleCNN, (3, 32, 32)))
register(ZooEntry("relu_sigmoid", "sigmoid(relu(x)), the write-up's fusion example, 1x1024", ReluSigmoid,
                  (1024,)))
register(ZooEntry("elementwise_chain", "a 16-op elementwise chain, 1x1024", ElementwiseChain, (1024,)))
register(ZooEntry("mlp_block", "4 pre-norm MLP blocks (LayerNorm, Linear, GELU, Linear, residual), 1x16x512",
                  MLPStack, (16, 512)))
register(ZooEntry("transformer_encoder", "nn.TransformerEncoderLayer d=256, 4 heads, 1x32 tokens",
                  TransformerEncoder, (32, 256)))
register(ZooEntry("small_resnet", "a small ResNet-style net with BatchNorm and residual adds, 3x32x32",
                  SmallResNet, (3, 32, 32)))


def get(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"no zoo model named {name!r}; known: {', '.join(sorted(ZOO))}") from None


def names() -> list[str]:
    return list(ZOO)


def build_any(name: str, device: str | torch.device = "cpu", batch_size: int = 1):
    """(model, inputs) for a zoo name, or a torchvision classification model with random weights (BatchNorm
    statistics randomized as for the zoo) and a batch of 224x224 images: what the benchmarks compare on."""
    if name in ZOO:
        return get(name).build(device=device, batch_size=batch_size)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval().to(device)
    _randomize_batchnorm(model, torch.Generator().manual_seed(0))
    return model, (torch.randn(batch_size, 3, 224, 224, device=device),)
