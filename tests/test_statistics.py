"""Bootstrap intervals and McNemar's exact test on hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest

from rcat.statistics import bootstrap_interval, mcnemar_exact


def test_mcnemar_exact_hand_case():
    # 6 discordant samples, all flagged by the second method only: p = 2 * 0.5**6
    first = np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    second = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    result = mcnemar_exact(first, second)
    assert (result["only_first"], result["only_second"]) == (0, 6)
    assert result["p_value"] == pytest.approx(2 * 0.5**6)


def test_mcnemar_no_discordant_samples_is_p_one():
    same = np.array([1, 0, 1, 0], dtype=bool)
    assert mcnemar_exact(same, same) == {"only_first": 0, "only_second": 0, "p_value": 1.0}
    with pytest.raises(ValueError, match="shape"):
        mcnemar_exact(same, same[:3])


def test_bootstrap_interval_brackets_the_rate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = (rng.random(100) < 0.2).astype(float)
    large = (rng.random(10_000) < 0.2).astype(float)
    low_s, high_s = bootstrap_interval(small)
    low_l, high_l = bootstrap_interval(large)
    assert low_s <= small.mean() <= high_s and low_l <= large.mean() <= high_l
    assert (high_l - low_l) < (high_s - low_s) / 5
    assert low_s >= 0.0 and high_s <= 1.0


def test_bootstrap_degenerate_and_paired_seeds():
    assert bootstrap_interval(np.zeros(50)) == (0.0, 0.0)
    row = (np.arange(200) % 5 == 0).astype(float)
    # two identical seeds are the same evidence as one: the interval does not narrow
    assert bootstrap_interval(np.stack([row, row])) == pytest.approx(bootstrap_interval(row))
