"""The update gate on hand-built metric dicts: selection, confirmation, fail-closed behaviour."""

from __future__ import annotations

import math

import pytest

from rcat.config import DecisionConfig, DecisionRules
from rcat.decision import check_rules, decide

# the rules against the old model only; those against the raw update and per class: tests/test_gate_rules.py
RULES = DecisionRules(max_nfr=0.05, max_rnfr=0.05, min_accuracy_delta=0.0, min_robust_accuracy_delta=0.0,
                      max_accuracy_drop_vs_new=None, max_robust_accuracy_drop_vs_new=None)
CONFIG = DecisionConfig(rules=RULES)
EXPECTED = {"validation": 100, "test": 200}


def metrics(nfr=0.02, rnfr=0.03, snfr=0.04, accuracy_old=0.80, accuracy_new=0.85, robust_old=0.40, robust_new=0.45, n=100):
    return {
        "nfr": nfr,
        "rnfr": rnfr,
        "snfr": snfr,
        "accuracy_old": accuracy_old,
        "accuracy_new": accuracy_new,
        "robust_accuracy_old": robust_old,
        "robust_accuracy_new": robust_new,
        "n_samples": n,
    }


def both(**kwargs):
    """The same metrics on validation (100 samples) and test (200 samples)."""
    return {"validation": metrics(**kwargs, n=100), "test": metrics(**kwargs, n=200)}


def test_promotes_the_lowest_snfr_admissible_candidate():
    evaluations = {
        "new": both(snfr=0.05),
        "at": both(snfr=0.03),
        "rcat": both(snfr=0.01),
        "pct": both(snfr=0.02),
    }
    record = decide(evaluations, CONFIG, EXPECTED)
    assert record["verdict"] == "promote" and record["candidate"] == "rcat"
    assert record["selected_on_validation"] == "rcat"
    assert all(info["admissible"] for info in record["candidates"].values())
    assert "confirmation_checks" in record["candidates"]["rcat"]
    assert "confirmation_checks" not in record["candidates"]["pct"]


def test_candidate_failing_a_rule_on_validation_is_excluded():
    evaluations = {
        "rcat": {"validation": metrics(snfr=0.001, nfr=0.06), "test": metrics(n=200)},  # best snfr but nfr too high
        "pct": both(snfr=0.02),
        "at": {"validation": metrics(snfr=0.005, robust_new=0.39), "test": metrics(n=200)},  # loses robust accuracy
        "new": {"validation": metrics(snfr=0.006, accuracy_new=0.79), "test": metrics(n=200)},  # loses accuracy
        "pct_at": {"validation": metrics(snfr=0.007, rnfr=0.051), "test": metrics(n=200)},
    }
    record = decide(evaluations, CONFIG, EXPECTED)
    assert record["verdict"] == "promote" and record["candidate"] == "pct"
    for name, rule in (("rcat", "max_nfr"), ("at", "min_robust_accuracy_delta"), ("new", "min_accuracy_delta"), ("pct_at", "max_rnfr")):
        info = record["candidates"][name]
        assert not info["admissible"], name
        failed = [check["rule"] for check in info["selection_checks"] if not check["passed"]]
        assert failed == [rule], (name, failed)


def test_rule_thresholds_are_inclusive():
    exact = both(nfr=0.05, rnfr=0.05, accuracy_new=0.80, robust_new=0.40)
    record = decide({"edge": exact}, CONFIG, EXPECTED)
    assert record["verdict"] == "promote"


def test_best_on_validation_failing_on_test_rejects_without_fallback():
    evaluations = {
        "rcat": {"validation": metrics(snfr=0.01), "test": metrics(nfr=0.08, n=200)},
        "pct": both(snfr=0.02),  # would pass everywhere, but was not selected
    }
    record = decide(evaluations, CONFIG, EXPECTED)
    assert record["verdict"] == "reject"
    assert record["candidate"] is None
    assert record["selected_on_validation"] == "rcat"
    assert any("rcat" in reason and "test" in reason and "max_nfr" in reason for reason in record["reasons"])
    assert "confirmation_checks" not in record["candidates"]["pct"]


@pytest.mark.parametrize(
    "test_metrics",
    [None, metrics(n=199), metrics(n=100), metrics(rnfr=math.nan, n=200), metrics(robust_new=None, n=200)],
    ids=["missing", "short", "validation-size", "nan", "none"],
)
def test_incomplete_confirmation_rejects(test_metrics):
    record = decide({"rcat": {"validation": metrics(), "test": test_metrics}}, CONFIG, EXPECTED)
    assert record["verdict"] == "reject" and record["candidate"] is None


def test_missing_confirmation_split_entry_rejects():
    record = decide({"rcat": {"validation": metrics()}}, CONFIG, EXPECTED)
    assert record["verdict"] == "reject"


@pytest.mark.parametrize(
    "bad",
    [
        None,
        metrics(n=99),
        metrics(n=0),
        {key: value for key, value in metrics().items() if key != "n_samples"},
        metrics(nfr=math.nan),
        metrics(nfr=None),
        metrics(accuracy_old=math.nan),
        metrics(robust_new=math.nan),
        metrics(snfr=math.nan),
        {key: value for key, value in metrics().items() if key != "snfr"},
        metrics(accuracy_new=math.inf),
        metrics(robust_old=-math.inf),
        metrics(snfr=-math.inf),
    ],
    ids=["none", "wrong-n", "zero-n", "no-n", "nan-nfr", "none-nfr", "nan-acc-old", "nan-robust", "nan-rank", "no-rank", "inf-acc", "inf-robust-old", "inf-rank"],
)
def test_incomplete_selection_metrics_make_a_candidate_inadmissible(bad):
    evaluations = {
        "rcat": {"validation": bad, "test": metrics(snfr=0.0, n=200)},
        "pct": both(snfr=0.03),
    }
    record = decide(evaluations, CONFIG, EXPECTED)
    assert not record["candidates"]["rcat"]["admissible"]
    assert record["candidate"] == "pct"
    alone = decide({"rcat": evaluations["rcat"]}, CONFIG, EXPECTED)
    assert alone["verdict"] == "reject" and alone["candidate"] is None
    assert any("rcat" in reason for reason in alone["reasons"])


def test_no_candidates_reject():
    record = decide({}, CONFIG, EXPECTED)
    assert record["verdict"] == "reject" and record["candidate"] is None
    assert record["reasons"] == ["no candidate was evaluated"]


def test_no_admissible_candidate_rejects_with_each_reason():
    evaluations = {"a": both(nfr=0.2), "b": both(rnfr=0.2)}
    record = decide(evaluations, CONFIG, EXPECTED)
    assert record["verdict"] == "reject"
    text = " | ".join(record["reasons"])
    assert "a: max_nfr" in text and "b: max_rnfr" in text


def test_disabled_rule_is_skipped():
    loose = DecisionConfig(rules=RULES.model_copy(update={"max_nfr": None}))
    evaluations = {"rcat": both(nfr=0.5, snfr=0.5)}
    assert decide(evaluations, CONFIG, EXPECTED)["verdict"] == "reject"
    record = decide(evaluations, loose, EXPECTED)
    assert record["verdict"] == "promote"
    rules = [check["rule"] for check in record["candidates"]["rcat"]["selection_checks"]]
    assert "max_nfr" not in rules and "max_rnfr" in rules
    # a disabled rule also ignores a missing metric
    no_nfr = {split: {k: v for k, v in m.items() if k != "nfr"} for split, m in both().items()}
    assert decide({"rcat": no_nfr}, loose, EXPECTED)["verdict"] == "promote"
    assert decide({"rcat": no_nfr}, CONFIG, EXPECTED)["verdict"] == "reject"


def test_ties_break_on_robust_accuracy_then_name():
    evaluations = {"b": both(snfr=0.02, robust_new=0.50), "a": both(snfr=0.02, robust_new=0.45), "c": both(snfr=0.02, robust_new=0.50)}
    assert decide(evaluations, CONFIG, EXPECTED)["candidate"] == "b"


@pytest.mark.parametrize(("rank_by", "winner"), [("nfr", "x"), ("rnfr", "y"), ("accuracy", "y"), ("robust_accuracy", "x")])
def test_rank_by_direction(rank_by, winner):
    evaluations = {
        "x": both(nfr=0.01, rnfr=0.04, accuracy_new=0.82, robust_new=0.50),
        "y": both(nfr=0.03, rnfr=0.02, accuracy_new=0.90, robust_new=0.41),
    }
    record = decide(evaluations, DecisionConfig(rules=RULES, rank_by=rank_by), EXPECTED)
    assert record["candidate"] == winner


def test_selection_and_confirmation_splits_are_honoured():
    config = DecisionConfig(rules=RULES, selection_split="test", confirmation_split="validation")
    evaluations = {
        "a": {"validation": metrics(snfr=0.01), "test": metrics(snfr=0.03, n=200)},
        "b": {"validation": metrics(snfr=0.03), "test": metrics(snfr=0.02, n=200)},
    }
    record = decide(evaluations, config, EXPECTED)
    assert record["candidate"] == "b" and record["selected_on_test"] == "b"


def test_check_rules_records_values_and_thresholds():
    checks = {check["rule"]: check for check in check_rules(metrics(), CONFIG, 100)}
    assert checks["evaluation_complete"]["passed"] and checks["evaluation_complete"]["value"] == 100
    assert checks["max_nfr"]["value"] == 0.02 and checks["max_nfr"]["threshold"] == 0.05
    assert checks["min_accuracy_delta"]["value"] == pytest.approx(0.05)
    assert checks["min_robust_accuracy_delta"]["value"] == pytest.approx(0.05)
    assert checks["snfr_defined"]["passed"]
    nan_checks = {check["rule"]: check for check in check_rules(metrics(nfr=math.nan), CONFIG, 100)}
    assert not nan_checks["max_nfr"]["passed"] and nan_checks["max_nfr"]["value"] is None
    assert check_rules(None, CONFIG, 100) == [{"rule": "evaluation_present", "passed": False, "detail": "no evaluation found"}]


def test_grid_selection_keeps_the_lowest_validation_snfr():
    """The paper's protocol, not the authors' ascending=False: lowest S-NFR wins; ties by robust accuracy, accuracy, order."""
    from rcat.decision import best_grid_point

    def point(snfr, robust=0.5, accuracy=0.9):
        return {"snfr": snfr, "robust_accuracy_new": robust, "accuracy_new": accuracy}

    assert best_grid_point([point(0.08), point(0.03), point(0.05)])[0] == 1
    assert best_grid_point([point(0.03, robust=0.4), point(0.03, robust=0.6)])[0] == 1
    assert best_grid_point([point(0.03, accuracy=0.8), point(0.03, accuracy=0.85)])[0] == 1
    assert best_grid_point([point(0.03), point(0.03)])[0] == 0
    assert best_grid_point([point(float("nan")), point(0.2)])[0] == 1
    assert best_grid_point([point(None), point(float("inf")), point(0.9)])[0] == 2
    with pytest.raises(ValueError):
        best_grid_point([])
