"""LeNet-5 variants for MNIST (28×28 grey inputs).

``lenet5`` is the Caffe "LeNet" from the Caffe MNIST example, the network the ADMM / progressive
pruning papers (Zhang et al. 2018; Ye et al. 2018) and Han et al. (2015, "LeNet-5", 431K) report
on: conv 1→20 k5 → maxpool 2 → conv 20→50 k5 → maxpool 2 → fc 800→500 → ReLU → fc 500→10.
As in Caffe there is no nonlinearity after the convolutions. 431,080 parameters.

``lenet5_classic`` is the LeCun et al. (1998) shape with modern choices (ReLU, max-pool, padding 2
so 28×28 inputs give the original 32×32 geometry): conv 6 k5 → pool → conv 16 k5 → pool →
fc 120 → fc 84 → fc 10. 61,706 parameters.

Layer names (``conv1``, ``conv2``, ``fc1``…) are stable because masks and checkpoints are keyed by
parameter name.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet5", "LeNet5Classic", "lenet5", "lenet5_classic"]


class LeNet5(nn.Module):
    """Caffe LeNet (the pruning papers' "LeNet-5"); see the module docstring."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)  # 28 -> 24
        self.pool1 = nn.MaxPool2d(2)                            # 24 -> 12
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)           # 12 -> 8
        self.pool2 = nn.MaxPool2d(2)                            # 8 -> 4: 50*4*4 = 800
        self.fc1 = nn.Linear(800, 500)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


class LeNet5Classic(nn.Module):
    """LeCun et al. (1998) LeNet-5 shape with ReLU and max-pooling; see the module docstring."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)  # 28 -> 28
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)                      # 14 -> 10
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc3(self.relu(self.fc2(x)))


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """Caffe LeNet-5 (431,080 parameters for 10 classes)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels)


def lenet5_classic(num_classes: int = 10, in_channels: int = 1) -> LeNet5Classic:
    """Classic LeNet-5 (61,706 parameters for 10 classes)."""
    return LeNet5Classic(num_classes=num_classes, in_channels=in_channels)
