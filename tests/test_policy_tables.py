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


def test_a_non_finite_patience_is_refused():
    from edgeexit.errors import ThresholdError
    from edgeexit.policies import check_thresholds

    assert check_thresholds(get_policy("patience"), [2, 3], 2) == [2.0, 3.0]
    with pytest.raises(ThresholdError):
        check_thresholds(get_policy("patience"), [float("nan"), 1], 2)
