"""B-LeNet (BranchyNet): LeNet with one early branch after conv1, for 28x28 digits.

Main path: Conv(1->5, k5, pad 3) -> [branch 1] -> MaxPool2, ReLU, Conv(5->10, k5, pad 3)
-> MaxPool2, ReLU, Conv(10->20, k5, pad 3) -> MaxPool2, ReLU, Linear(720->84) ->
Linear(84->10).  Branch 1: MaxPool2, ReLU, Conv(5->10, k3, pad 1), MaxPool2, ReLU,
Linear(640->10).  Pools round up (``ceil_mode=True``) as in the original, which is what
makes the 640 and 720 come out.
"""

from __future__ import annotations

from torch import nn

from ..export.model import EarlyExitModel


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(2, ceil_mode=True)


def blenet(num_classes: int = 10) -> EarlyExitModel:
    """An untrained B-LeNet as an ``EarlyExitModel`` with two stages and two exits."""
    conv1 = nn.Conv2d(1, 5, 5, padding=3)
    branch1 = nn.Sequential(
        _pool(), nn.ReLU(), nn.Conv2d(5, 10, 3, padding=1), _pool(), nn.ReLU(),
        nn.Flatten(), nn.Linear(640, num_classes),
    )
    trunk = nn.Sequential(
        _pool(), nn.ReLU(), nn.Conv2d(5, 10, 5, padding=3),
        _pool(), nn.ReLU(), nn.Conv2d(10, 20, 5, padding=3),
        _pool(), nn.ReLU(), nn.Flatten(),
    )
    final = nn.Sequential(nn.Linear(720, 84), nn.Linear(84, num_classes))
    return EarlyExitModel(stages=[conv1, trunk], exits=[branch1, final])
