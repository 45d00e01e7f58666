"""Small seeded torch models and an independent torch reference of the early-exit decision."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeexit.export import EarlyExitModel

NUM_CLASSES = 5


class _Split(nn.Module):
    """A stage whose carry is a tuple: feature map and pooled vector."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.conv(x))
        return y, y.mean(dim=(2, 3))


class _Merge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.mix = nn.Linear(6, 8)

    def forward(self, y: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(y)) + self.mix(pooled)[:, :, None, None]


def _head(channels: int, scale: float) -> nn.Module:
    head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, NUM_CLASSES))
    with torch.no_grad():
        head[1].weight.mul_(scale)  # spread the scores so samples leave at different exits
    return head


def tiny_model(seed: int = 0) -> EarlyExitModel:
    """Four stages on 1x8x8 inputs; exits after stages 0, 2, 3 (stage 1 has none, and a tuple carry)."""
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), _Split(), _Merge(),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())]
    exits = [_head(4, 8.0), None, _head(8, 8.0), _head(8, 8.0)]
    return EarlyExitModel(stages=stages, exits=exits).eval()


def tiny_inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def factory() -> tuple[EarlyExitModel, dict[str, torch.Tensor]]:
    """For `edgeexit export tests._models:factory`-style CLI tests."""
    return tiny_model(), {"x": torch.from_numpy(tiny_inputs(4))}


# --- the reference ------------------------------------------------------------------


def torch_scores(logits: torch.Tensor, policy: str) -> torch.Tensor:
    z = logits.double()
    p = torch.softmax(z, dim=1)
    if policy == "confidence":
        return p.max(dim=1).values
    if policy == "entropy":
        return -(p * torch.log_softmax(z, dim=1)).sum(dim=1)
    if policy == "margin":
        top = torch.topk(p, 2, dim=1).values
        return top[:, 0] - top[:, 1]
    raise KeyError(policy)


def fires(score: torch.Tensor, threshold: float, policy: str) -> torch.Tensor:
    return score < threshold if policy == "entropy" else score >= threshold


@torch.no_grad()
def all_exit_logits(model: EarlyExitModel, x: np.ndarray) -> list[torch.Tensor]:
    return model(torch.from_numpy(x))


@torch.no_grad()
def reference_decisions(model: EarlyExitModel, x: np.ndarray, policy: str, thresholds: list[float]):
    """(exit_index, predictions, scores, logits) that the runtime must reproduce."""
    logits = all_exit_logits(model, x)
    n = x.shape[0]
    exit_index = np.full(n, len(logits) - 1)
    decided = np.zeros(n, dtype=bool)
    for e, t in enumerate(thresholds):
        f = fires(torch_scores(logits[e], policy), t, policy).numpy() & ~decided
        exit_index[f] = e
        decided |= f
    chosen = torch.stack([logits[e][i] for i, e in enumerate(exit_index)])
    scores = np.array([float(torch_scores(logits[e][i:i + 1], policy)[0]) for i, e in enumerate(exit_index)])
    return exit_index, chosen.argmax(1).numpy(), scores, chosen.numpy()


def safe_thresholds(model: EarlyExitModel, x: np.ndarray, policy: str, quantiles: list[float]) -> list[float]:
    """Per-exit thresholds near the given score quantiles, placed in the widest nearby gap so
    that float differences between onnxruntime and torch cannot flip a decision."""
    logits = all_exit_logits(model, x)
    out = []
    for e, q in enumerate(quantiles):
        s = np.sort(torch_scores(logits[e], policy).numpy())
        lo, hi = int(len(s) * max(0.0, q - 0.1)), int(len(s) * min(1.0, q + 0.1))
        window = s[max(lo, 0):max(hi, lo + 2)]
        gaps = np.diff(window)
        j = int(np.argmax(gaps))
        assert gaps[j] > 1e-4, "scores too dense for a safe threshold"
        out.append(float((window[j] + window[j + 1]) / 2))
    return out
