"""The exit signals besides the logits (package format version 8), trained on a frozen encoder's features.

- ``halt``: PALBERT's halting probability lambda_k = sigmoid(MLP([pooled_k, pooled_{k-1}])) for
  the ``q_exit`` policy, fitted with PonderNet's loss (``fit_halting``);
- ``gate``: JEI-DNN's gate, sigmoid(Linear(4 -> 1)) of the exit softmax's max, entropy, top-1
  minus top-2 and the entropy of p^2 / sum p^2 (``gate_features``), fitted to the probability
  that the exit is right (``fit_gates``).

Both judge new inputs, so both learn from out-of-fold predictions (``out_of_fold_logits``): a
classifier is surer of the samples it was trained on than of new ones.  Used by the zoo's
``bert-exits`` and by ``export_hf`` for any Hugging Face model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

SIGNALS = ("halt", "gate")
HALT_HIDDEN = 32


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """JEI-DNN's four uncertainty features of a softmax, (batch, 4): max probability, entropy,
    top-1 minus top-2, and the entropy of p^2 / sum p^2 (= softmax(2 z))."""
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    log_q = torch.log_softmax(2.0 * logits, dim=1)
    top = torch.topk(p, 2, dim=1).values
    return torch.stack([top[:, 0], -(p * log_p).sum(dim=1), top[:, 0] - top[:, 1],
                        -(log_q.exp() * log_q).sum(dim=1)], dim=1)


def halting_head(width: int) -> nn.Sequential:
    """PALBERT's halting MLP on [pooled_k, pooled_{k-1}] (2 * width) -> one logit."""
    return nn.Sequential(nn.Linear(2 * width, HALT_HIDDEN), nn.ReLU(), nn.Linear(HALT_HIDDEN, 1))


def class_weights(y: torch.Tensor, classes: int) -> torch.Tensor:
    """Inverse class frequencies, normalized so a balanced set weighs 1 per class."""
    counts = torch.bincount(y, minlength=classes).float()
    return counts.sum() / (classes * counts.clamp(min=1))


def fit_linear(layer: nn.Module, x: np.ndarray, labels: np.ndarray, classes: int, *, epochs: int, lr: float,
               weight_decay: float) -> float:
    """Full-batch AdamW on class-weighted cross-entropy (``epochs * 10`` steps); returns the final loss."""
    data, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels.astype(np.int64))
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y, classes))
    loss = torch.tensor(math.nan)
    layer.train()
    for _ in range(epochs * 10):
        loss = loss_fn(layer(data), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    return float(loss.detach())


def out_of_fold_logits(features: Sequence[np.ndarray], labels: np.ndarray, classes: int, *, folds: int = 3,
                       epochs: int = 60, seed: int = 0) -> list[np.ndarray]:
    """Each exit's logits for each training sample from a linear classifier trained without it
    (``folds``-fold cross-fitting, stratified by label): what the exit would say of a new sample.
    ``features[k]`` is exit k's pooled (n, width) input."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = np.arange(len(rows)) % folds
    out = [np.empty((len(labels), classes), np.float32) for _ in features]
    torch.manual_seed(seed)
    for f in range(folds):
        train, held = fold != f, fold == f
        if not held.any() or not train.any():
            continue
        for k, x in enumerate(features):
            layer = nn.Linear(x.shape[1], classes)
            fit_linear(layer, x[train], labels[train], classes, epochs=epochs, lr=3e-3, weight_decay=1e-3)
            with torch.no_grad():
                out[k][held] = layer(torch.from_numpy(np.ascontiguousarray(x[held]))).numpy()
    return out


def halting_distribution(halts: torch.Tensor) -> torch.Tensor:
    """PALBERT/PonderNet: p_i = lambda_i prod_{j<i} (1 - lambda_j) for (n, exits) halting
    probabilities; the last exit takes what is left, so each row sums to 1."""
    running = torch.cumprod(torch.cat([torch.ones_like(halts[:, :1]), 1.0 - halts[:, :-1]], dim=1), dim=1)
    p = halts * running
    return torch.cat([p[:, :-1], running[:, -1:]], dim=1)


def fit_halting(heads: Sequence[nn.Module], inputs: Sequence[np.ndarray], oof_logits: Sequence[np.ndarray],
                labels: np.ndarray, *, prior: float = 0.5, beta: float = 0.1, steps: int = 600, lr: float = 3e-3,
                seed: int = 0) -> float:
    """Fit every exit's halting head (PALBERT's lambda) with PonderNet's loss: the expected
    cross-entropy under the halting distribution, plus ``beta`` times its KL divergence from a
    geometric prior with halting probability ``prior`` (which keeps it from always waiting for
    the last exit).  ``inputs[k]`` is head k's input ([pooled_k, pooled_{k-1}]); the
    cross-entropies are the out-of-fold ones.  The last head is then set to halt for sure
    (PonderNet's lambda_N = 1; the loss gives it no gradient).  Returns the final loss."""
    torch.manual_seed(seed)
    exits = len(heads)
    x = [torch.from_numpy(np.ascontiguousarray(v)) for v in inputs]
    y = torch.from_numpy(labels.astype(np.int64))
    ce = torch.stack([nn.functional.cross_entropy(torch.from_numpy(z), y, reduction="none") for z in oof_logits], 1)
    geometric = prior * (1.0 - prior) ** torch.arange(exits, dtype=torch.float32)
    geometric[-1] = 1.0 - geometric[:-1].sum()
    opt = torch.optim.Adam([p for h in heads for p in h.parameters()], lr=lr)
    loss = torch.tensor(math.nan)
    for h in heads:
        h.train()
    for _ in range(steps):
        halts = torch.cat([torch.sigmoid(h(v)) for h, v in zip(heads, x)], dim=1)
        p = halting_distribution(halts)
        kl = (p * (torch.log(p.clamp(min=1e-12)) - torch.log(geometric))).sum(dim=1)
        loss = ((p * ce).sum(dim=1) + beta * kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in heads:
        h.eval()
    last = [m for m in heads[-1].modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(40.0)
    return float(loss.detach())


def fit_gates(gates: Sequence[nn.Module], oof_logits: Sequence[np.ndarray], labels: np.ndarray, *,
              steps: int = 600, lr: float = 0.05, seed: int = 0) -> list[float]:
    """Fit every exit's JEI-DNN gate to the probability that the exit's prediction is right
    (binary cross-entropy on out-of-fold predictions), so its default threshold 0.5 means "more
    likely right than wrong"; calibration moves it.  Returns each gate's final loss."""
    torch.manual_seed(seed)
    losses = []
    for gate, z in zip(gates, oof_logits, strict=True):
        logits = torch.from_numpy(z)
        features = gate_features(logits)
        right = (logits.argmax(dim=1) == torch.from_numpy(labels.astype(np.int64))).float()[:, None]
        opt = torch.optim.Adam(gate.parameters(), lr=lr)
        loss = torch.tensor(math.nan)
        for _ in range(steps):
            loss = nn.functional.binary_cross_entropy_with_logits(gate(features), right)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
    return losses
