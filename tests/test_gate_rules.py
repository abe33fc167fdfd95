"""Gate rules that keep the update's gains: drops against the raw update, per-class drops, intervals,
McNemar's test of the RNF cut, and grid selection under the same limits. Exact, hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rcat.config import DecisionConfig, DecisionRules
from rcat.decision import best_grid_point, check_rules, decide, gate_figures, paired_mean_interval, wilson_interval
from rcat.metrics import FLIP_COLUMNS, flip_metrics


def flips(labels, c_old, c_new, r_old, r_new) -> pd.DataFrame:
    """A flip frame from per-sample 0/1 lists."""
    frame = pd.DataFrame({"sample_index": np.arange(len(labels)), "label": labels,
                          "old_clean_correct": np.array(c_old, bool), "new_clean_correct": np.array(c_new, bool),
                          "old_robust": np.array(r_old, bool), "new_robust": np.array(r_new, bool)})
    frame["negative_flip"] = frame.old_clean_correct & ~frame.new_clean_correct
    frame["positive_flip"] = ~frame.old_clean_correct & frame.new_clean_correct
    frame["robust_negative_flip"] = frame.old_robust & ~frame.new_robust
    frame["robust_positive_flip"] = ~frame.old_robust & frame.new_robust
    return frame[list(FLIP_COLUMNS)]


def evaluation(frame: pd.DataFrame, raw: pd.DataFrame, num_classes: int = 2) -> dict:
    metrics = flip_metrics(frame.old_clean_correct, frame.new_clean_correct, frame.old_robust, frame.new_robust)
    return dict(metrics) | gate_figures(frame, raw, num_classes)


# 20 samples, 2 classes. Old: 14 clean-correct, 6 robust. The raw update: 18 correct, 11 robust,
# 2 robustness negative flips (samples 0 and 10). A "conservative" fine-tune: RNFs cut to 0 by copying the old
# model, giving back 4 of the raw update's clean gains.
LABELS = [0] * 10 + [1] * 10
C_OLD = [1] * 7 + [0] * 3 + [1] * 7 + [0] * 3
R_OLD = [1] * 3 + [0] * 7 + [1] * 3 + [0] * 7
C_RAW = [1] * 9 + [0] + [1] * 9 + [0]
R_RAW = [0, 1, 1, 1, 1, 1, 0, 0, 0, 0] + [0, 1, 1, 1, 1, 1, 1, 0, 0, 0]


def raw_update() -> pd.DataFrame:
    return flips(LABELS, C_OLD, C_RAW, R_OLD, R_RAW)


def test_gate_figures_by_hand():
    raw = raw_update()
    conservative = flips(LABELS, C_OLD, C_OLD, R_OLD, R_OLD)  # the old model's own predictions
    figures = gate_figures(conservative, raw, 2)
    # acc(raw) = 18/20, acc(conservative) = 14/20: a drop of 4/20
    assert figures["accuracy_drop_vs_new"] == pytest.approx(0.2)
    # robust: 11/20 vs 6/20
    assert figures["robust_accuracy_drop_vs_new"] == pytest.approx(0.25)
    assert figures["max_class_accuracy_drop"] == 0.0
    assert figures["class_accuracy"] == [0.7, 0.7] and figures["class_accuracy_old"] == [0.7, 0.7]
    # old robust at 0-2 and 10-12, raw robust at 1-5 and 11-16: RNFs at samples 0 and 10
    assert int(raw["robust_negative_flip"].sum()) == 2 and figures["rnf_cut"] == 2
    # McNemar exact on 2 discordant samples, both one way: p = 2 * 0.5^2 = 0.5
    assert figures["rnf_cut_p_value"] == pytest.approx(0.5)
    assert gate_figures(raw, raw, 2)["rnf_cut_p_value"] == 1.0


def test_a_candidate_that_cuts_rnfr_by_losing_the_new_models_accuracy_is_rejected():
    raw = raw_update()
    conservative = flips(LABELS, C_OLD, C_OLD, R_OLD, R_OLD)
    evaluations = {name: {"validation": evaluation(frame, raw), "test": evaluation(frame, raw)}
                   for name, frame in (("new", raw), ("copy_old", conservative))}
    # without the rules against the raw update, the copy of the old model wins on S-NFR (0 flips)
    old_only = DecisionConfig(rules=DecisionRules(max_nfr=0.5, max_rnfr=0.5, max_accuracy_drop_vs_new=None, max_robust_accuracy_drop_vs_new=None))
    assert decide(evaluations, old_only, {"validation": 20, "test": 20})["candidate"] == "copy_old"
    record = decide(evaluations, DecisionConfig(rules=DecisionRules(max_nfr=0.5, max_rnfr=0.5)), {"validation": 20, "test": 20})
    assert record["candidate"] == "new"
    failed = {check["rule"]: check for check in record["candidates"]["copy_old"]["selection_checks"] if not check["passed"]}
    assert set(failed) == {"max_accuracy_drop_vs_new", "max_robust_accuracy_drop_vs_new"}
    assert failed["max_accuracy_drop_vs_new"]["value"] == pytest.approx(0.2) and failed["max_accuracy_drop_vs_new"]["threshold"] == 0.01


def test_a_per_class_regression_is_caught():
    raw = raw_update()
    # better on average than the old model (15 vs 14 correct), but class 1 falls from 7/10 to 5/10
    c_candidate = [1] * 10 + [1] * 5 + [0] * 5
    regressing = flips(LABELS, C_OLD, c_candidate, R_OLD, R_OLD)
    figures = evaluation(regressing, raw)
    assert figures["accuracy_new"] - figures["accuracy_old"] == pytest.approx(0.05)
    assert figures["max_class_accuracy_drop"] == pytest.approx(0.2) and figures["max_class_accuracy_drop_class"] == 1
    rules = DecisionRules(max_nfr=None, max_rnfr=None, max_accuracy_drop_vs_new=None, max_robust_accuracy_drop_vs_new=None,
                          max_class_accuracy_drop=0.1)
    checks = {check["rule"]: check for check in check_rules(figures, DecisionConfig(rules=rules), 20, "candidate")}
    assert not checks["max_class_accuracy_drop"]["passed"] and checks["max_class_accuracy_drop"]["class"] == 1
    assert checks["min_accuracy_delta"]["passed"]


def test_wilson_and_paired_intervals_by_hand():
    low, high = wilson_interval(2, 100)
    # Wilson: centre (p + z^2/2n) / (1 + z^2/n), half z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n); p = 0.02, n = 100
    z = 1.959963984540054
    centre = (0.02 + z * z / 200) / (1 + z * z / 100)
    half = z * math.sqrt(0.02 * 0.98 / 100 + z * z / 40000) / (1 + z * z / 100)
    assert (low, high) == (pytest.approx(centre - half, rel=1e-12), pytest.approx(centre + half, rel=1e-12))
    assert high == pytest.approx(0.0700, abs=5e-5)
    assert all(math.isnan(end) for end in wilson_interval(0, 0))
    mean, low, high = paired_mean_interval(np.array([1, 0, 0, 0]))
    # mean 0.25, sd (n-1) = 0.5, half = 1.96 * 0.5 / 2
    assert mean == 0.25 and high == pytest.approx(0.25 + 1.959964 * 0.25, rel=1e-6) and low == pytest.approx(0.25 - 1.959964 * 0.25, rel=1e-6)


def test_a_rule_on_the_interval_differs_from_the_same_rule_on_the_point_estimate():
    """RNFR 2/100 = 0.02 meets max_rnfr 0.05; the upper end of its Wilson interval (0.070) does not."""
    n = 100
    labels = [0] * n
    c = [1] * n
    r_old = [1] * 50 + [0] * 50
    r_candidate = [0, 0] + [1] * 48 + [0] * 50
    frame = flips(labels, c, c, r_old, r_candidate)
    metrics = evaluation(frame, frame, 1)
    assert metrics["rnfr"] == 0.02 and metrics["rnfr_upper"] == pytest.approx(0.0700, abs=5e-4)
    rules = DecisionRules(max_rnfr=0.05, max_nfr=None)
    point = {c["rule"]: c for c in check_rules(metrics, DecisionConfig(rules=rules), n, "x")}
    interval = {c["rule"]: c for c in check_rules(metrics, DecisionConfig(rules=rules, on_interval=["max_rnfr"]), n, "x")}
    assert point["max_rnfr"]["passed"] and point["max_rnfr"]["estimate"] == "point"
    assert not interval["max_rnfr"]["passed"] and interval["max_rnfr"]["estimate"] == "upper 95%"
    assert interval["max_rnfr"]["value"] == pytest.approx(metrics["rnfr_upper"])


def test_the_rnf_cut_must_be_significant_when_asked():
    raw = raw_update()
    cut = flips(LABELS, C_OLD, C_RAW, R_OLD, [max(a, b) for a, b in zip(R_RAW, R_OLD, strict=True)])  # both RNFs fixed
    rules = DecisionRules(max_nfr=None, max_rnfr=None, max_accuracy_drop_vs_new=None, max_robust_accuracy_drop_vs_new=None, max_rnf_cut_p_value=0.05)
    config = DecisionConfig(rules=rules)
    checks = {c["rule"]: c for c in check_rules(evaluation(cut, raw), config, 20, "cut")}
    # 2 discordant samples cannot reach p <= 0.05 (p = 0.5): the cut is not shown to be real
    assert not checks["max_rnf_cut_p_value"]["passed"] and checks["max_rnf_cut_p_value"]["rnf_cut"] == 2
    assert {c["rule"]: c for c in check_rules(evaluation(raw, raw), config, 20, "new")}["max_rnf_cut_p_value"]["passed"]
    lenient = DecisionConfig(rules=rules.model_copy(update={"max_rnf_cut_p_value": 0.6}))
    assert {c["rule"]: c for c in check_rules(evaluation(cut, raw), lenient, 20, "cut")}["max_rnf_cut_p_value"]["passed"]


def test_grid_selection_keeps_the_gains_or_says_it_cannot():
    new = {"accuracy_new": 0.80, "robust_accuracy_new": 0.40}
    rules = DecisionRules(max_accuracy_drop_vs_new=0.01, max_robust_accuracy_drop_vs_new=0.01)

    def point(snfr, accuracy, robust):
        return {"snfr": snfr, "accuracy_new": accuracy, "robust_accuracy_new": robust}

    # the lowest S-NFR point (0) gives up 5 points of accuracy: the lowest S-NFR within limits (2) is kept
    grid = [point(0.01, 0.75, 0.40), point(0.05, 0.80, 0.41), point(0.03, 0.795, 0.395)]
    assert best_grid_point(grid, new, rules) == (2, True)
    # none within limits: no fallback to the most conservative point; the least shortfall, reported
    grid = [point(0.01, 0.70, 0.40), point(0.05, 0.78, 0.40)]
    assert best_grid_point(grid, new, rules) == (1, False)
    # without the raw update's figures, the plain lowest S-NFR
    assert best_grid_point(grid) == (0, True)
