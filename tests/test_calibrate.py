"""Replaying thresholds on recorded exits, and the shared-threshold search against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.calibrate import (
    ExitRecords,
    accuracy_at,
    accuracy_drop_bound,
    exits_taken,
    record_exits,
    shared_threshold,
)
from edgeexit.runtime import ExitSession


def _records(seed: int, policy: str, n: int = 120, exits: int = 3) -> ExitRecords:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    predictions = np.where(rng.random((exits, n)) < np.linspace(0.6, 0.9, exits)[:, None], labels, (labels + 1) % 4)
    scores = np.round(rng.random((exits, n)), 2)  # coarse values: many ties
    return ExitRecords(scores=scores, predictions=predictions, labels=labels, policy=policy)


def _brute_taken(records: ExitRecords, t: float) -> np.ndarray:
    higher = records.policy != "entropy"
    taken = []
    for i in range(records.labels.size):
        e = next((e for e in range(records.scores.shape[0] - 1)
                  if np.isfinite(records.scores[e, i])
                  and (records.scores[e, i] >= t if higher else records.scores[e, i] < t)),
                 records.scores.shape[0] - 1)
        taken.append(e)
    return np.array(taken)


@pytest.mark.parametrize("policy", ["entropy", "confidence", "margin"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("z", [0.0, 1.645])
def test_shared_threshold_is_the_most_permissive_feasible_one(policy, seed, z):
    records = _records(seed, policy)
    max_drop = 0.02
    t, acc, shares = shared_threshold(records, max_drop, z=z)
    taken = _brute_taken(records, t)
    np.testing.assert_array_equal(exits_taken(records, [t, t]), taken)
    assert accuracy_drop_bound(records, taken, z) <= max_drop + 1e-12
    # brute force over a fine grid: nothing feasible lets more samples out early
    grid = np.linspace(-0.01, 1.01, 1021)
    best_early = 0
    for g in grid:
        g_taken = _brute_taken(records, g)
        if accuracy_drop_bound(records, g_taken, z) <= max_drop + 1e-12:
            best_early = max(best_early, int((g_taken < 2).sum()))
    assert int((taken < 2).sum()) == best_early
    acc_ref = (records.predictions[taken, np.arange(taken.size)] == records.labels).mean()
    assert acc == pytest.approx(acc_ref)
    np.testing.assert_allclose(shares, np.bincount(taken, minlength=3) / taken.size)


def test_drop_bound_counts_paired_outcomes():
    records = ExitRecords(scores=np.zeros((2, 4)), predictions=np.array([[0, 0, 1, 1], [0, 1, 0, 1]]),
                          labels=np.array([0, 1, 1, 0]), policy="confidence")
    # early right/full right: s0; early wrong/full right: s1 (lost); early right/full wrong: s2 (won)
    taken = np.zeros(4, dtype=np.int64)
    assert accuracy_drop_bound(records, taken, 0.0) == 0.0
    assert accuracy_drop_bound(records, taken, 1.0) == pytest.approx(np.sqrt(2) / 4)


def test_replayed_decisions_equal_the_runtime(tiny_package):
    sess = ExitSession(tiny_package)
    x = np.random.default_rng(1).standard_normal((200, 4)).astype(np.float32) * 3
    labels = np.random.default_rng(2).integers(0, 3, 200)
    records = record_exits(sess, x, labels, batch_size=64)
    for t in np.quantile(records.scores[0], [0.1, 0.5, 0.9]):
        result = sess.run(x, thresholds=[t])
        np.testing.assert_array_equal(exits_taken(records, [t]), result.exit_index)
        acc, _ = accuracy_at(records, [t])
        assert acc == pytest.approx((result.predictions == labels).mean())
