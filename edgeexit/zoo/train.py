"""Training recipe for early-exit models: weighted sum of every exit's cross-entropy, Adam."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..export.model import EarlyExitModel


def train_early_exit(
    model: EarlyExitModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 3e-3,
    exit_weights: Sequence[float] | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> EarlyExitModel:
    """Train every exit jointly (BranchyNet: sum of weighted exit losses, Adam, one-cycle LR).

    ``progress`` is called with the number of samples after each step.
    """
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    weights = list(exit_weights) if exit_weights is not None else [1.0] * model.num_exits
    if len(weights) != model.num_exits:
        raise ValueError(f"exit_weights needs {model.num_exits} values, got {len(weights)}")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.from_numpy(gen.permutation(len(y)))
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            outs = model(xt[idx])
            loss = sum(w * loss_fn(o, yt[idx]) for w, o in zip(weights, outs))
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
            schedule.step()
            if progress is not None:
                progress(len(idx))
    return model.eval()


@torch.no_grad()
def exit_accuracies(model: EarlyExitModel, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> list[float]:
    """Accuracy of every exit when all samples go through all stages."""
    model.eval()
    correct = np.zeros(model.num_exits)
    for start in range(0, len(y), batch_size):
        outs = model(torch.from_numpy(x[start:start + batch_size]))
        for i, o in enumerate(outs):
            correct[i] += (o.argmax(1).numpy() == y[start:start + batch_size]).sum()
    return (correct / len(y)).tolist()
