"""Stateful exit policies against references written out per sample, on recorded score tables."""

from __future__ import annotations

import numpy as np
import pytest

from edgeexit.policies import get_policy


def test_patience_scores_count_agreeing_consecutive_exits():
    rng = np.random.default_rng(0)
    per_exit = [rng.standard_normal((200, 3)) for _ in range(6)]      # 3 classes: runs of agreement happen
    per_exit[2][5, 1] = np.nan                                        # a row without a prediction breaks the run
    per_exit[3][7, 0] = -np.inf                                       # a class that cannot occur does not
    table = get_policy("patience").score_table(per_exit)
    for i in range(200):
        count, previous = 0, None
        for k in range(6):
            row = per_exit[k][i]
            if np.isnan(row).any() or not np.isfinite(row.max()):
                assert np.isnan(table[k, i])
                count, previous = 0, None
                continue
            prediction = int(np.argmax(row))
            count = count + 1 if prediction == previous else 0
            previous = prediction
            assert table[k, i] == count, (i, k)
    assert np.nanmax(table[0]) == 0 and np.nanmax(table) >= 3


def test_stateless_policies_score_each_exit_alone():
    rng = np.random.default_rng(1)
    per_exit = [rng.standard_normal((10, 4)) for _ in range(3)]
    for name in ("entropy", "confidence", "margin"):
        policy = get_policy(name)
        np.testing.assert_array_equal(policy.score_table(per_exit), np.stack([policy.scores(x) for x in per_exit]))
        assert not policy.stateful
    assert get_policy("patience").stateful


def test_q_exit_scores_the_cumulative_exit_probability():
    """PALBERT: p_i = lambda_i prod_{j<i} (1 - lambda_j); the score at exit i is sum_{j<=i} p_j, summed
    term by term here (not through the closed form the policy uses)."""
    rng = np.random.default_rng(2)
    halts = [rng.uniform(size=(300, 1)) for _ in range(6)]
    halts[1][3, 0] = np.nan          # a broken signal: NaN from there on, never an exit
    halts[2][4, 0] = 1.5             # outside [0, 1] is no probability either
    halts[0][5, 0] = 1.0             # certain to halt at the first exit
    halts[3][6, 0] = 0.0
    policy = get_policy("q_exit")
    table = policy.score_table(halts)
    for i in range(300):
        total, running, broken = 0.0, 1.0, False
        for k in range(6):
            lam = float(halts[k][i, 0])
            broken = broken or not (0.0 <= lam <= 1.0)
            if broken:
                assert np.isnan(table[k, i]), (i, k)
                continue
            total += lam * running
            running *= 1.0 - lam
            assert table[k, i] == pytest.approx(total, abs=1e-12), (i, k)
    assert table[0, 5] == 1.0 and np.all(np.diff(table[:, :3], axis=0) >= 0)


def test_q_exit_clips_a_halting_probability_a_rounding_away_from_0_or_1():
    """An int8 graph or a float rounding may give 1 + 1e-9 or -1e-9; that is still a probability.
    Further out (1.01, -0.01) or NaN is not: NaN from there on."""
    policy = get_policy("q_exit")
    halts = [np.array([[1.0 + 1e-9], [-1e-9], [1.01], [-0.01], [np.nan]]), np.full((5, 1), 0.5)]
    table = policy.score_table(halts)
    assert table[:, 0].tolist() == [1.0, 1.0] and table[:, 1].tolist() == [0.0, 0.5]
    assert np.isnan(table[:, 2:]).all()


def test_q_exit_exits_where_palbert_does():
    """The first exit whose cumulative exit probability passes q, per sample, against a loop."""
    from edgeexit.calibrate import ExitRecords, exits_taken

    rng = np.random.default_rng(3)
    halts = [rng.uniform(0, 0.6, size=(500, 1)) for _ in range(6)]
    policy = get_policy("q_exit")
    records = ExitRecords(policy.score_table(halts), np.zeros((6, 500), np.int64), np.zeros(500, np.int64), "q_exit")
    for q in (0.3, 0.5, 0.8):
        taken = exits_taken(records, [q] * 5)
        for i in range(500):
            survive, expected = 1.0, 5
            for k in range(5):
                survive *= 1.0 - halts[k][i, 0]
                if 1.0 - survive >= q:
                    expected = k
                    break
            assert taken[i] == expected, (q, i)


def test_the_gate_scores_its_signal_at_each_exit_alone():
    rng = np.random.default_rng(4)
    gates = [rng.uniform(size=(50, 1)).astype(np.float32) for _ in range(4)]
    table = get_policy("gate").score_table(gates)
    np.testing.assert_array_equal(table, np.stack([g[:, 0].astype(np.float64) for g in gates]))
    assert not get_policy("gate").stateful and get_policy("q_exit").stateful


def test_a_non_finite_patience_is_refused():
    from edgeexit.errors import ThresholdError
    from edgeexit.policies import check_thresholds

    assert check_thresholds(get_policy("patience"), [2, 3], 2) == [2.0, 3.0]
    with pytest.raises(ThresholdError):
        check_thresholds(get_policy("patience"), [float("nan"), 1], 2)
