"""ResNet-18 for CIFAR (He et al. 2016), the variant used across the pruning literature.

Differences from the ImageNet ResNet-18: a 3×3 stride-1 stem convolution with 64 channels and no
max-pool (32×32 inputs keep 32×32 feature maps in stage 1). Stages of BasicBlocks ``[2, 2, 2, 2]``
with 64/128/256/512 channels, stride 2 at the start of stages 2–4; shortcuts that change shape are
option B (1×1 convolution + BatchNorm), the rest are identities. Global average pool, fc to
``num_classes``. 11,173,962 parameters for 10 classes (the widely used kuangliu/pytorch-cifar model).

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``fc``) so pruning configs written for torchvision ResNets match.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunekit.core.errors import ModelError

__all__ = ["BasicBlock", "ResNetCIFAR", "resnet18_cifar"]


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection (option-B projection when shapes change)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetCIFAR(nn.Module):
    """CIFAR-style ResNet of BasicBlocks; ``blocks`` per stage, ``widths`` per stage."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), widths: Sequence[int] = (64, 128, 256, 512),
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ModelError(f"blocks {tuple(blocks)} and widths {tuple(widths)} must have the same length")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, w, stride if j == 0 else 1))
                in_planes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    """ResNet-18, CIFAR variant (11,173,962 parameters for 10 classes)."""
    return ResNetCIFAR((2, 2, 2, 2), (64, 128, 256, 512), num_classes=num_classes, in_channels=in_channels)
