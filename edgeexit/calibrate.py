"""Threshold selection from recorded exit outputs (numpy only, runs on a device too).

``record_exits`` runs a labelled set once through every stage; ``exits_taken``
replays any thresholds on those records without running the model again; and
``shared_threshold`` finds the most permissive single threshold, shared by every
early exit, that keeps accuracy within ``max_drop`` of the full model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .policies import ExitPolicy, get_policy


@dataclass(frozen=True)
class ExitRecords:
    """Every exit's scores and predictions for a labelled set (n samples, E exits)."""

    scores: np.ndarray        # (E, n) float64
    predictions: np.ndarray   # (E, n) int64
    labels: np.ndarray        # (n,)
    policy: str

    @property
    def full_accuracy(self) -> float:
        return float((self.predictions[-1] == self.labels).mean())


def record_exits(session, inputs, labels: np.ndarray, policy: str | None = None,
                 batch_size: int = 256) -> ExitRecords:
    """Run ``inputs`` through every stage of ``session`` (an ``ExitSession``) and record each exit."""
    labels = np.asarray(labels)
    pol = get_policy(policy or session.package.policies[0])
    names = session.input_names
    feeds = inputs if isinstance(inputs, dict) else {names[0]: inputs}
    n = len(labels)
    if n == 0:
        raise InputError("the labelled set is empty; calibration needs samples")
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch_size):
        part = {k: v[start:start + batch_size] for k, v in feeds.items()}
        chunks.append(session.run_all_exits(part))
    per_exit = [np.concatenate([c[e] for c in chunks]) for e in range(session.num_exits)]
    return ExitRecords(
        scores=np.stack([pol.scores(logits) for logits in per_exit]),
        predictions=np.stack([logits.argmax(axis=1) for logits in per_exit]),
        labels=labels,
        policy=pol.name,
    )


def exits_taken(records: ExitRecords, thresholds: Sequence[float]) -> np.ndarray:
    """Exit index each sample would take under ``thresholds`` (one per early exit)."""
    pol = get_policy(records.policy)
    num_exits, n = records.scores.shape
    taken = np.full(n, num_exits - 1, dtype=np.int64)
    undecided = np.ones(n, dtype=bool)
    for e, t in enumerate(thresholds):
        fire = undecided & pol.accepts(records.scores[e], t)
        taken[fire] = e
        undecided &= ~fire
    return taken


def accuracy_at(records: ExitRecords, thresholds: Sequence[float]) -> tuple[float, np.ndarray]:
    """Early-exit accuracy and exit shares under ``thresholds``."""
    taken = exits_taken(records, thresholds)
    preds = records.predictions[taken, np.arange(taken.size)]
    shares = np.bincount(taken, minlength=records.scores.shape[0]) / taken.size
    return float((preds == records.labels).mean()), shares


def _candidates(pol: ExitPolicy, scores: np.ndarray) -> np.ndarray:
    # Midpoints between neighbouring distinct scores: each candidate changes the decision
    # of at least one sample and sits as far as possible from every recorded score.
    finite = np.unique(scores[np.isfinite(scores)])
    if finite.size == 0:
        return np.array([])
    mids = (finite[:-1] + finite[1:]) / 2
    lo, hi = finite[0] - 1e-9 - abs(finite[0]) * 1e-9, finite[-1] + 1e-9 + abs(finite[-1]) * 1e-9
    cands = np.concatenate([[lo], mids, [hi]])
    # most permissive first
    return cands[::-1] if pol.direction == "lower" else cands


def accuracy_drop_bound(records: ExitRecords, taken: np.ndarray, z: float) -> float:
    """Upper confidence bound on the accuracy drop vs the last exit, from paired outcomes.

    With ``lost`` samples the full model gets right and the early exit gets wrong, and
    ``won`` the other way round, the drop is (lost - won) / n with standard error
    sqrt(lost + won) / n (paired comparison, normal approximation).
    """
    n = taken.size
    early_right = records.predictions[taken, np.arange(n)] == records.labels
    full_right = records.predictions[-1] == records.labels
    lost = int((full_right & ~early_right).sum())
    won = int((early_right & ~full_right).sum())
    return (lost - won + z * np.sqrt(lost + won)) / n


def shared_threshold(records: ExitRecords, max_drop: float, z: float = 1.645) -> tuple[float, float, np.ndarray]:
    """The most permissive single threshold (shared by every early exit) whose accuracy drop
    vs the full model stays within ``max_drop`` at the one-sided confidence ``z`` (1.645:
    95 %; 0: the point estimate).  Returns (threshold, accuracy, exit shares).

    The bound matters: on a 500-sample calibration split one sample is 0.2 points, so the
    point estimate alone picks thresholds that lose accuracy on held-out data.
    """
    pol = get_policy(records.policy)
    early = records.scores.shape[0] - 1
    for t in _candidates(pol, records.scores[:-1].ravel()):
        taken = exits_taken(records, [t] * early)
        if accuracy_drop_bound(records, taken, z) <= max_drop + 1e-12:
            acc, shares = accuracy_at(records, [t] * early)
            return float(t), acc, shares
    raise InputError("no threshold keeps accuracy within max_drop; this cannot happen with a valid record")
