"""Parameter counts and a FLOPs estimate per stage, from a batch-1 forward with hooks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def count_parameters(modules: Iterable[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _module_flops(module: nn.Module, output: torch.Tensor) -> int:
    # Multiply-adds count as 2 FLOPs; element-wise layers as one per output element.
    if isinstance(module, nn.modules.conv._ConvNd):
        per_output = module.in_channels // module.groups
        for k in module.kernel_size:
            per_output *= k
        return 2 * output.numel() * per_output
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    return output.numel()


class FlopCounter:
    """Sums the estimated FLOPs of every leaf module run inside the context."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.total = 0
        self._handles = []
        for root in modules:
            for m in root.modules():
                if next(m.children(), None) is None:  # leaves only
                    self._handles.append(m.register_forward_hook(self._hook))

    def _hook(self, module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            self.total += _module_flops(module, output) // max(1, output.shape[0] if output.dim() else 1)

    def __enter__(self) -> FlopCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
