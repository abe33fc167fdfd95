"""Uncertainty of flip metrics: bootstrap intervals over samples and paired tests between methods.

Every flip metric of :mod:`rcat.metrics` is the mean of a per-sample 0/1 indicator over the n
evaluated samples (e.g. RNFR = mean of ``robust_negative_flip``). Its sampling uncertainty is
estimated by resampling the *samples* (with replacement) and recomputing the mean; with several
seeds evaluated on the same samples, the statistic is the mean over seeds and each resample
uses the same sample indices for every seed (the seeds stay paired).

Two methods evaluated on the same samples are compared with McNemar's exact test on their
indicators (e.g. method's RNF set against AT's): only discordant samples carry information.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def bootstrap_interval(indicators: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the seed-averaged rate.

    ``indicators``: shape ``(n_samples,)`` or ``(n_seeds, n_samples)``, values in {0, 1}. The
    statistic is ``indicators.mean()`` (mean over samples, then over seeds); resampling draws
    sample indices, shared across seeds. Returns ``(low, high)`` in [0, 1].
    """
    values = np.atleast_2d(np.asarray(indicators, dtype=float))
    if values.shape[1] == 0:
        return (float("nan"), float("nan"))
    per_sample = values.mean(axis=0)  # average over seeds first: resampling samples keeps seeds paired
    from scipy import stats  # imported on use: most stages never test anything

    result = stats.bootstrap((per_sample,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", random_state=np.random.default_rng(seed), vectorized=True)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mcnemar_exact(first: np.ndarray, second: np.ndarray) -> dict[str, Any]:
    """McNemar's exact (binomial) two-sided test on paired 0/1 indicators of the same samples.

    ``only_first`` counts samples flagged by ``first`` only, ``only_second`` by ``second`` only;
    under the null hypothesis (no difference) each discordant sample is equally likely either way.
    The p-value is 1 when there are no discordant samples.
    """
    a = np.asarray(first, dtype=bool)
    b = np.asarray(second, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired indicators differ in shape: {a.shape} vs {b.shape}")
    only_first = int((a & ~b).sum())
    only_second = int((~a & b).sum())
    discordant = only_first + only_second
    from scipy import stats

    p_value = 1.0 if discordant == 0 else float(stats.binomtest(only_first, discordant, 0.5).pvalue)
    return {"only_first": only_first, "only_second": only_second, "p_value": p_value}
