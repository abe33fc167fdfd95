"""Flip metrics: hand-computed cases, undefined rates, identities, and outcome alignment."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from rcat.attacks import OUTCOME_COLUMNS
from rcat.errors import InputError
from rcat.metrics import FLIP_COLUMNS, METRIC_KEYS, align_outcomes, compare_outcomes, flip_metrics

RATE_KEYS = [key for key in METRIC_KEYS if key != "n_samples"]

# Eight samples, one per interesting situation (robust implies clean-correct on every row):
#      c_old c_new r_old r_new
HAND = [
    (1, 1, 1, 1),  # 0: correct and robust for both
    (1, 1, 1, 0),  # 1: robust negative flip only
    (1, 0, 1, 0),  # 2: clean and robust negative flip (both)
    (1, 0, 0, 0),  # 3: clean negative flip only
    (0, 1, 0, 1),  # 4: positive flip, robust positive flip
    (0, 0, 0, 0),  # 5: wrong for both
    (1, 1, 0, 0),  # 6: correct for both, robust for neither
    (0, 0, 0, 0),  # 7: wrong for both
]


def columns(rows):
    return [[bool(row[k]) for row in rows] for k in range(4)]


def test_hand_computed_case_every_rate_and_count():
    metrics = flip_metrics(*columns(HAND))
    expected_counts = {
        "n_samples": 8,
        "n_correct_old": 5,  # 0,1,2,3,6
        "n_correct_new": 4,  # 0,1,4,6
        "n_robust_old": 3,  # 0,1,2
        "n_robust_new": 2,  # 0,4
        "n_negative_flips": 2,  # 2,3
        "n_positive_flips": 1,  # 4
        "n_robust_negative_flips": 2,  # 1,2
        "n_robust_positive_flips": 1,  # 4
        "n_both_negative_flips": 1,  # 2
        "n_any_negative_flips": 3,  # 1,2,3
        "n_correct_both": 3,  # 0,1,6
        "n_wrong_both": 2,  # 5,7
        "n_robust_both": 1,  # 0
        "n_nonrobust_both": 4,  # 3,5,6,7
    }
    expected_rates = {
        "accuracy_old": 5 / 8,
        "accuracy_new": 4 / 8,
        "robust_accuracy_old": 3 / 8,
        "robust_accuracy_new": 2 / 8,
        "nfr": 2 / 8,
        "pfr": 1 / 8,
        "rnfr": 2 / 8,
        "rpfr": 1 / 8,
        "bnfr": 1 / 8,
        "snfr": 3 / 8,
        "btc": 3 / 5,
        "bec": 2 / 3,
        "robust_btc": 1 / 3,
        "robust_bec": 4 / 5,
    }
    assert set(metrics) == set(expected_counts) | set(expected_rates)
    for key, value in expected_counts.items():
        assert metrics[key] == value, key
        assert isinstance(metrics[key], int), key
    for key, value in expected_rates.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


def test_hand_case_is_independent_of_sample_order():
    permuted = [HAND[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
    assert flip_metrics(*columns(permuted)) == flip_metrics(*columns(HAND))


def test_hand_case_accepts_numpy_and_pandas_inputs():
    c_old, c_new, r_old, r_new = columns(HAND)
    from_numpy = flip_metrics(np.array(c_old), np.array(c_new), np.array(r_old), np.array(r_new))
    from_pandas = flip_metrics(pd.Series(c_old), pd.Series(c_new), pd.Series(r_old), pd.Series(r_new))
    assert from_numpy == flip_metrics(c_old, c_new, r_old, r_new) == from_pandas


def test_all_samples_flip():
    n = 6
    ones, zeros = [True] * n, [False] * n
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = flip_metrics(ones, zeros, ones, zeros)
    assert metrics["nfr"] == metrics["rnfr"] == metrics["bnfr"] == metrics["snfr"] == 1.0
    assert metrics["pfr"] == metrics["rpfr"] == 0.0
    assert metrics["accuracy_old"] == metrics["robust_accuracy_old"] == 1.0
    assert metrics["accuracy_new"] == metrics["robust_accuracy_new"] == 0.0
    assert metrics["btc"] == metrics["robust_btc"] == 0.0
    assert metrics["n_negative_flips"] == metrics["n_any_negative_flips"] == n
    # the old model is never wrong / never non-robust: BEC is undefined, not 0 and not 1
    assert math.isnan(metrics["bec"]) and math.isnan(metrics["robust_bec"])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("bec" in m and "robust_bec" not in m for m in messages)
    assert any("robust_bec" in m for m in messages)


def test_no_flip_when_models_agree():
    c = [True, True, False, True, False]
    r = [True, False, False, True, False]
    metrics = flip_metrics(c, c, r, r)
    for key in ("nfr", "pfr", "rnfr", "rpfr", "bnfr", "snfr"):
        assert metrics[key] == 0.0, key
    assert metrics["btc"] == metrics["bec"] == metrics["robust_btc"] == metrics["robust_bec"] == 1.0
    assert metrics["accuracy_old"] == metrics["accuracy_new"] == 3 / 5
    assert metrics["robust_accuracy_old"] == metrics["robust_accuracy_new"] == 2 / 5


def test_old_model_never_correct_gives_nan_btc_with_warning():
    old = [False, False, False, False]
    new = [True, False, True, False]
    robust_new = [True, False, False, False]
    with pytest.warns(RuntimeWarning, match="btc") as record:
        metrics = flip_metrics(old, new, old, robust_new)
    assert math.isnan(metrics["btc"])
    assert math.isnan(metrics["robust_btc"])
    assert metrics["btc"] != 0.0  # NaN, never silently 0
    assert metrics["n_correct_both"] == 0 and metrics["n_correct_old"] == 0
    # the defined rates keep their values
    assert metrics["pfr"] == 0.5 and metrics["rpfr"] == 0.25 and metrics["nfr"] == 0.0
    assert metrics["bec"] == 0.5 and metrics["robust_bec"] == 0.75
    named = " ".join(str(w.message) for w in record)
    assert "btc" in named and "robust_btc" in named and "NaN" in named


def test_old_model_correct_but_never_robust_gives_nan_robust_btc_only():
    with pytest.warns(RuntimeWarning, match="robust_btc"):
        metrics = flip_metrics([True, True, False], [True, False, False], [False, False, False], [False, False, False])
    assert math.isnan(metrics["robust_btc"])
    assert metrics["btc"] == 0.5
    assert metrics["robust_bec"] == 1.0


def test_defined_rates_emit_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flip_metrics(*columns(HAND))


def test_empty_input_gives_nan_everywhere_never_zero():
    with pytest.warns(RuntimeWarning):
        metrics = flip_metrics([], [], [], [])
    assert metrics["n_samples"] == 0
    for key in RATE_KEYS:
        assert math.isnan(metrics[key]), key


def test_length_mismatch_raises():
    with pytest.raises(InputError, match="differ in length"):
        flip_metrics([True, False], [True], [False, False], [False, False])
    with pytest.raises(InputError, match="differ in length"):
        flip_metrics([True, False], [True, False], [False, False], [False])


def test_robust_but_wrong_is_rejected():
    with pytest.raises(InputError, match="robust"):
        flip_metrics([False, True], [True, True], [True, False], [False, False])
    with pytest.raises(InputError, match="robust"):
        flip_metrics([True, True], [True, False], [False, False], [False, True])


@pytest.mark.parametrize("seed", range(25))
def test_identities_on_random_vectors(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    p_correct, p_robust = rng.uniform(0.05, 0.95, size=2)
    c_old = rng.random(n) < p_correct
    c_new = rng.random(n) < p_correct
    r_old = c_old & (rng.random(n) < p_robust)
    r_new = c_new & (rng.random(n) < p_robust)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m = flip_metrics(c_old, c_new, r_old, r_new)

    assert m["accuracy_new"] - m["accuracy_old"] == pytest.approx(m["pfr"] - m["nfr"], abs=1e-12)
    assert m["robust_accuracy_new"] - m["robust_accuracy_old"] == pytest.approx(m["rpfr"] - m["rnfr"], abs=1e-12)
    nf, rnf = c_old & ~c_new, r_old & ~r_new
    assert m["snfr"] == pytest.approx(m["nfr"] + m["rnfr"] - m["bnfr"], abs=1e-12)
    assert m["snfr"] == pytest.approx((nf | rnf).mean(), abs=1e-12)
    assert m["bnfr"] == pytest.approx((nf & rnf).mean(), abs=1e-12)
    assert max(m["nfr"], m["rnfr"]) <= m["snfr"] <= m["nfr"] + m["rnfr"] + 1e-12
    if c_old.any():
        assert m["nfr"] == pytest.approx((1 - m["btc"]) * m["accuracy_old"], abs=1e-12)
    else:
        assert math.isnan(m["btc"])
    if r_old.any():
        assert m["rnfr"] == pytest.approx((1 - m["robust_btc"]) * m["robust_accuracy_old"], abs=1e-12)
    if (~c_old).any():
        assert m["pfr"] == pytest.approx((1 - m["bec"]) * (1 - m["accuracy_old"]), abs=1e-12)
    assert m["robust_accuracy_old"] <= m["accuracy_old"] and m["robust_accuracy_new"] <= m["accuracy_new"]
    for key in RATE_KEYS:
        value = m[key]
        assert math.isnan(value) or 0.0 <= value <= 1.0, key
    assert m["n_samples"] == n


# ---------------------------------------------------------------- outcome frames


def outcome_frame(rows, *, digest="digest-a", model="old", shuffle_seed=None):
    """An outcome frame with OUTCOME_COLUMNS from (sample_index, label, clean_correct, robust) rows."""
    records = []
    for sample_index, label, correct, robust in rows:
        prediction = label if correct else (label + 1) % 10
        adversarial = label if robust else (label + 2) % 10
        records.append(
            {
                "sample_index": sample_index,
                "label": label,
                "clean_prediction": prediction,
                "adversarial_prediction": adversarial,
                "clean_correct": bool(correct),
                "robust": bool(robust),
                "clean_margin": 1.0 if correct else -1.0,
                "adversarial_margin": 1.0 if robust else -1.0,
                "linf_distance": 0.0,
                "split": "validation",
                "model": model,
                "model_digest": f"md-{model}",
                "split_digest": digest,
                "attack": "apgd-dlr:5it:1r:Linf:eps=0.1",
                "attack_config": "{}",
            }
        )
    frame = pd.DataFrame(records, columns=list(OUTCOME_COLUMNS))
    if shuffle_seed is not None:
        frame = frame.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True)
    return frame


SAMPLE_IDS = [10, 11, 12, 13, 20, 21, 30, 31]
LABELS = [0, 1, 2, 3, 4, 5, 6, 7]


def hand_frames(**kwargs):
    old = outcome_frame([(i, y, row[0], row[2]) for i, y, row in zip(SAMPLE_IDS, LABELS, HAND)], model="old")
    new = outcome_frame([(i, y, row[1], row[3]) for i, y, row in zip(SAMPLE_IDS, LABELS, HAND)], model="new", **kwargs)
    return old, new


def test_compare_outcomes_matches_flip_metrics_and_flags_each_sample():
    old, new = hand_frames(shuffle_seed=3)  # row order must not matter
    metrics, flips = compare_outcomes(old, new)
    assert metrics == flip_metrics(*columns(HAND))
    assert tuple(flips.columns) == FLIP_COLUMNS
    assert flips["sample_index"].tolist() == SAMPLE_IDS  # sorted by sample index
    assert flips["label"].tolist() == LABELS
    assert flips["negative_flip"].tolist() == [False, False, True, True, False, False, False, False]
    assert flips["positive_flip"].tolist() == [False, False, False, False, True, False, False, False]
    assert flips["robust_negative_flip"].tolist() == [False, True, True, False, False, False, False, False]
    assert flips["robust_positive_flip"].tolist() == [False, False, False, False, True, False, False, False]
    for column in FLIP_COLUMNS[2:]:
        assert flips[column].dtype == bool, column
    assert flips["sample_index"].dtype == np.int64 and flips["label"].dtype == np.int64
    assert int(flips["negative_flip"].sum()) == metrics["n_negative_flips"]
    assert int(flips["robust_negative_flip"].sum()) == metrics["n_robust_negative_flips"]


def test_align_outcomes_pairs_rows_by_sample_index():
    old, new = hand_frames(shuffle_seed=7)
    merged = align_outcomes(old, new)
    assert merged["sample_index"].tolist() == SAMPLE_IDS
    assert (merged["model_old"] == "old").all() and (merged["model_new"] == "new").all()
    assert merged["clean_correct_old"].tolist() == [bool(r[0]) for r in HAND]
    assert merged["clean_correct_new"].tolist() == [bool(r[1]) for r in HAND]


def test_mismatched_samples_raise():
    old, new = hand_frames()
    with pytest.raises(InputError, match="different samples"):
        compare_outcomes(old, new.iloc[:-1])
    shifted = new.copy()
    shifted.loc[0, "sample_index"] = 999
    with pytest.raises(InputError, match="different samples"):
        compare_outcomes(old, shifted)


def test_different_split_digests_raise():
    old, new = hand_frames()
    new["split_digest"] = "digest-b"
    with pytest.raises(InputError, match="split digests differ"):
        compare_outcomes(old, new)


def test_label_disagreement_raises():
    old, new = hand_frames()
    new.loc[3, "label"] = 9
    with pytest.raises(InputError, match="labels"):
        compare_outcomes(old, new)


def test_duplicate_sample_raises():
    old, new = hand_frames()
    doubled = pd.concat([old, old.iloc[[0]]], ignore_index=True)
    with pytest.raises(InputError, match="twice"):
        compare_outcomes(doubled, new)
    with pytest.raises(InputError, match="twice"):
        compare_outcomes(old, pd.concat([new, new.iloc[[2]]], ignore_index=True))
