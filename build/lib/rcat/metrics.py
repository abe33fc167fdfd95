"""Flip metrics of an update, from per-sample correctness of the old and the new model.

Notation: over the n evaluated samples, ``c_old``/``c_new`` say the model classifies the clean
input correctly, ``r_old``/``r_new`` that it is robust (its own white-box attack failed and the
sample is correctly classified; see :mod:`rcat.attacks`). Each model is attacked by its own
attack: adversarial examples are never transferred.

=====================  =====================================================  ===============
metric                 formula                                                denominator
=====================  =====================================================  ===============
accuracy_m             #c_m / n                                               n (all samples)
robust_accuracy_m      #r_m / n                                               n
nfr                    #(c_old and not c_new) / n         (negative flips)    n
pfr                    #(not c_old and c_new) / n         (positive flips)    n
rnfr                   #(r_old and not r_new) / n         (robust NF)         n
rpfr                   #(not r_old and r_new) / n         (robust PF)         n
bnfr                   #(NF and RNF) / n                  (both)              n
snfr                   #(NF or RNF) / n = nfr + rnfr - bnfr                   n
btc                    #(c_old and c_new) / #c_old        (trust compat.)     #c_old
bec                    #(not c_old and not c_new) / #(not c_old)              #(not c_old)
robust_btc             #(r_old and r_new) / #r_old                            #r_old
robust_bec             #(not r_old and not r_new) / #(not r_old)              #(not r_old)
=====================  =====================================================  ===============

All rates lie in [0, 1]. Denominators of NFR-type rates are *all evaluated samples*, as in the
paper's code (not the old model's correct samples). BTC/BEC are pooled over the whole split,
never averaged per batch. A rate whose denominator is 0 is NaN with a warning, never 0. Every
rate is returned next to its numerator count. Identities (tested): ``accuracy_new -
accuracy_old = pfr - nfr``, ``robust_accuracy_new - robust_accuracy_old = rpfr - rnfr``,
``nfr = (1 - btc) * accuracy_old``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from rcat.errors import InputError

FLIP_COLUMNS = (
    "sample_index",
    "label",
    "old_clean_correct",
    "new_clean_correct",
    "old_robust",
    "new_robust",
    "negative_flip",
    "positive_flip",
    "robust_negative_flip",
    "robust_positive_flip",
)
"""Columns of a per-sample flip frame (one row per evaluated sample), before provenance columns."""

METRIC_KEYS = (
    "accuracy_old",
    "accuracy_new",
    "robust_accuracy_old",
    "robust_accuracy_new",
    "nfr",
    "pfr",
    "rnfr",
    "rpfr",
    "bnfr",
    "snfr",
    "btc",
    "bec",
    "robust_btc",
    "robust_bec",
    "n_samples",
)


def safe_rate(count: int, denominator: int, name: str) -> float:
    """``count / denominator``, or NaN with a warning when the denominator is 0."""
    if denominator == 0:
        warnings.warn(f"{name} is undefined (denominator 0); reported as NaN", RuntimeWarning, stacklevel=3)
        return math.nan
    return count / denominator


def flip_metrics(old_correct: Sequence[bool], new_correct: Sequence[bool], old_robust: Sequence[bool], new_robust: Sequence[bool]) -> dict[str, float | int]:
    """All flip metrics (see the module docstring) with their counts, from four boolean vectors.

    Raises :class:`InputError` when the vectors differ in length or a sample is robust but not
    clean-correct (impossible for a valid evaluation).
    """
    c_old, c_new, r_old, r_new = (np.asarray(vector, dtype=bool) for vector in (old_correct, new_correct, old_robust, new_robust))
    n = len(c_old)
    if not len(c_new) == len(r_old) == len(r_new) == n:
        raise InputError(f"per-sample vectors differ in length: {len(c_old)}, {len(c_new)}, {len(r_old)}, {len(r_new)}")
    if (r_old & ~c_old).any() or (r_new & ~c_new).any():
        raise InputError("a sample is marked robust but misclassified on clean input; the outcome file is inconsistent")
    negative = c_old & ~c_new
    positive = ~c_old & c_new
    robust_negative = r_old & ~r_new
    robust_positive = ~r_old & r_new
    counts = {
        "n_samples": n,
        "n_correct_old": int(c_old.sum()),
        "n_correct_new": int(c_new.sum()),
        "n_robust_old": int(r_old.sum()),
        "n_robust_new": int(r_new.sum()),
        "n_negative_flips": int(negative.sum()),
        "n_positive_flips": int(positive.sum()),
        "n_robust_negative_flips": int(robust_negative.sum()),
        "n_robust_positive_flips": int(robust_positive.sum()),
        "n_both_negative_flips": int((negative & robust_negative).sum()),
        "n_any_negative_flips": int((negative | robust_negative).sum()),
        "n_correct_both": int((c_old & c_new).sum()),
        "n_wrong_both": int((~c_old & ~c_new).sum()),
        "n_robust_both": int((r_old & r_new).sum()),
        "n_nonrobust_both": int((~r_old & ~r_new).sum()),
    }
    rates = {
        "accuracy_old": safe_rate(counts["n_correct_old"], n, "accuracy_old"),
        "accuracy_new": safe_rate(counts["n_correct_new"], n, "accuracy_new"),
        "robust_accuracy_old": safe_rate(counts["n_robust_old"], n, "robust_accuracy_old"),
        "robust_accuracy_new": safe_rate(counts["n_robust_new"], n, "robust_accuracy_new"),
        "nfr": safe_rate(counts["n_negative_flips"], n, "nfr"),
        "pfr": safe_rate(counts["n_positive_flips"], n, "pfr"),
        "rnfr": safe_rate(counts["n_robust_negative_flips"], n, "rnfr"),
        "rpfr": safe_rate(counts["n_robust_positive_flips"], n, "rpfr"),
        "bnfr": safe_rate(counts["n_both_negative_flips"], n, "bnfr"),
        "snfr": safe_rate(counts["n_any_negative_flips"], n, "snfr"),
        "btc": safe_rate(counts["n_correct_both"], counts["n_correct_old"], "btc"),
        "bec": safe_rate(counts["n_wrong_both"], n - counts["n_correct_old"], "bec"),
        "robust_btc": safe_rate(counts["n_robust_both"], counts["n_robust_old"], "robust_btc"),
        "robust_bec": safe_rate(counts["n_nonrobust_both"], n - counts["n_robust_old"], "robust_bec"),
    }
    return rates | counts


def align_outcomes(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Join two per-sample outcome frames (see :data:`rcat.attacks.OUTCOME_COLUMNS`) on ``sample_index``.

    Both must cover exactly the same samples with the same labels on the same split content;
    otherwise the comparison is meaningless and :class:`InputError` is raised.
    """
    for name, frame in (("old", old), ("new", new)):
        if frame["sample_index"].duplicated().any():
            raise InputError(f"{name} outcomes list a sample twice; the outcome file is corrupt")
    if set(old["split_digest"]) != set(new["split_digest"]):
        raise InputError("old and new outcomes come from different data (split digests differ); re-run the attack on the same split")
    merged = old.merge(new, on="sample_index", how="outer", suffixes=("_old", "_new"), indicator=True)
    unmatched = int((merged["_merge"] != "both").sum())
    if unmatched:
        raise InputError(f"old and new outcomes cover different samples ({unmatched} unmatched); evaluation is incomplete")
    if (merged["label_old"] != merged["label_new"]).any():
        raise InputError("old and new outcomes disagree on labels for the same sample; the data changed between runs")
    return merged.sort_values("sample_index").reset_index(drop=True)


def compare_outcomes(old: pd.DataFrame, new: pd.DataFrame) -> tuple[dict[str, float | int], pd.DataFrame]:
    """Flip metrics and the per-sample flip frame (:data:`FLIP_COLUMNS`) of ``new`` against ``old``."""
    merged = align_outcomes(old, new)
    metrics = flip_metrics(merged["clean_correct_old"], merged["clean_correct_new"], merged["robust_old"], merged["robust_new"])
    flips = pd.DataFrame(
        {
            "sample_index": merged["sample_index"].astype("int64"),
            "label": merged["label_old"].astype("int64"),
            "old_clean_correct": merged["clean_correct_old"].astype(bool),
            "new_clean_correct": merged["clean_correct_new"].astype(bool),
            "old_robust": merged["robust_old"].astype(bool),
            "new_robust": merged["robust_new"].astype(bool),
        }
    )
    flips["negative_flip"] = flips["old_clean_correct"] & ~flips["new_clean_correct"]
    flips["positive_flip"] = ~flips["old_clean_correct"] & flips["new_clean_correct"]
    flips["robust_negative_flip"] = flips["old_robust"] & ~flips["new_robust"]
    flips["robust_positive_flip"] = ~flips["old_robust"] & flips["new_robust"]
    return metrics, flips[list(FLIP_COLUMNS)]

def flip_set(flips: pd.DataFrame) -> pd.DataFrame:
    """The samples that flipped (any of the four flip columns) from a flip frame: the table logged to MLflow."""
    flipped = flips["negative_flip"] | flips["positive_flip"] | flips["robust_negative_flip"] | flips["robust_positive_flip"]
    return flips[flipped].reset_index(drop=True)
