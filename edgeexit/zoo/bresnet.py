"""B-ResNet: a small residual network for 28x28 digits with an exit after each of 3 stages.

BranchyNet also evaluated a branchy ResNet; this is a compact version sized for MNIST
(16 -> 32 -> 64 channels, two basic blocks per stage), heavy enough that skipping the
later stages saves far more than the per-call overhead of the runtime.
"""

from __future__ import annotations

import torch
from torch import nn

from ..export.model import EarlyExitModel


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a (projected) skip connection."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.skip(x))


def bresnet(num_classes: int = 10, width: int = 16) -> EarlyExitModel:
    """An untrained B-ResNet as an ``EarlyExitModel`` with three stages and three exits."""
    w1, w2, w3 = width, 2 * width, 4 * width
    stage0 = nn.Sequential(
        nn.Conv2d(1, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(),
        BasicBlock(w1, w1), BasicBlock(w1, w1),
    )  # 28x28
    exit0 = nn.Sequential(
        nn.MaxPool2d(2), nn.Conv2d(w1, w1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(w1 * 7 * 7, num_classes),
    )
    stage1 = nn.Sequential(BasicBlock(w1, w2, stride=2), BasicBlock(w2, w2))  # 14x14
    exit1 = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(w2 * 7 * 7, num_classes))
    stage2 = nn.Sequential(BasicBlock(w2, w3, stride=2), BasicBlock(w3, w3))  # 7x7
    exit2 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes))
    return EarlyExitModel(stages=[stage0, stage1, stage2], exits=[exit0, exit1, exit2])
