"""The update gate: promote the best admissible candidate, or reject. It fails closed.

Candidates are the un-fine-tuned new model (``new``) and every fine-tuned model. For each
candidate and split the gate needs that candidate's flip metrics against the old model (see
:mod:`rcat.metrics`). The procedure:

1. A candidate is *complete* on a split when its metrics exist, cover the expected number of
   samples, and every metric a rule reads is finite. An incomplete candidate is inadmissible.
2. It is *admissible* when it is complete and meets every enabled rule on the selection split
   (``nfr <= max_nfr``, ``rnfr <= max_rnfr``, ``accuracy_new - accuracy_old >= min_accuracy_delta``,
   ``robust_accuracy_new - robust_accuracy_old >= min_robust_accuracy_delta``).
3. The best admissible candidate by ``rank_by`` (lowest rate or highest accuracy; ties broken
   by higher robust accuracy, then by name) is *selected* on the selection split.
4. It is *confirmed* when it is complete and meets every rule on the confirmation split too.
   If it is not, the verdict is ``reject``: falling back to the runner-up would choose on the
   confirmation split and turn it into a second selection split.

Anything missing (no candidates, no metrics, a wrong sample count, a NaN) leads to ``reject``
with the reason stated; nothing can promote by omission.

The rules (:class:`rcat.config.DecisionRules`) read a candidate's flip metrics against the old
model plus the figures :func:`gate_figures` derives from its per-sample flips and the raw
update's: drops against the un-fine-tuned new model, the worst per-class accuracy drop against the
old model, 95% intervals, and McNemar's test of the candidate's RNF set against the raw update's.
A rule listed in ``on_interval`` compares the pessimistic end of its interval.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from rcat.config import DecisionConfig, DecisionRules

LOWER_IS_BETTER = {"snfr", "rnfr", "nfr"}


def _value(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    value = math.nan if value is None else float(value)
    return value if math.isfinite(value) else math.nan  # inf is not a measurement: fail closed like NaN


Z_95 = 1.959963984540054
"""The standard normal quantile of 0.975: two-sided 95% intervals."""


def wilson_interval(count: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``count / n`` (in [0, 1]); (nan, nan) when ``n`` is 0."""
    if n <= 0:
        return (math.nan, math.nan)
    p = count / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_mean_interval(differences: np.ndarray, z: float = Z_95) -> tuple[float, float, float]:
    """Mean of per-sample paired differences (each in {-1, 0, 1}) and its normal 95% interval,
    ``mean +- z * sd / sqrt(n)`` (sd with n - 1); (nan, nan, nan) for fewer than 2 samples."""
    values = np.asarray(differences, dtype=float)
    if len(values) < 2:
        return (math.nan, math.nan, math.nan)
    mean = float(values.mean())
    half = z * float(values.std(ddof=1)) / math.sqrt(len(values))
    return (mean, mean - half, mean + half)


def gate_figures(flips: pd.DataFrame, new_flips: pd.DataFrame, num_classes: int) -> dict[str, Any]:
    """The per-sample figures the gate's rules read beyond the flip metrics, for one candidate on one split.

    ``flips``: the candidate's per-sample flip frame against the old model; ``new_flips``: the raw
    update's on the same samples (both :data:`rcat.metrics.FLIP_COLUMNS`). Returns, as fractions of
    the split's n samples unless stated:

    * ``accuracy_drop_vs_new`` = acc(new) - acc(candidate), ``robust_accuracy_drop_vs_new`` likewise,
      each with ``*_upper`` (upper end of the paired 95% interval);
    * ``accuracy_delta_lower`` / ``robust_accuracy_delta_lower``: lower end of the paired interval of
      candidate minus old; ``nfr_upper`` / ``rnfr_upper``: upper end of the Wilson interval;
    * ``class_accuracy_old`` / ``class_accuracy`` (one fraction per class, denominator the class's
      samples), ``max_class_accuracy_drop`` = max_c acc_old(c) - acc(c), the class it occurs in
      (``max_class_accuracy_drop_class``) and ``max_class_accuracy_drop_upper`` (the largest upper end
      of the per-class paired intervals);
    * ``rnf_cut`` = #RNF(new) - #RNF(candidate) (a count), and ``rnf_cut_p_value``, McNemar's exact
      two-sided p-value of the two paired RNF sets (1 when they are identical).
    """
    from rcat.statistics import mcnemar_exact

    mine = flips.sort_values("sample_index").reset_index(drop=True)
    raw = new_flips.sort_values("sample_index").reset_index(drop=True)
    if len(mine) != len(raw) or not np.array_equal(mine["sample_index"].to_numpy(), raw["sample_index"].to_numpy()):
        raise ValueError("the candidate's and the raw update's flips cover different samples")
    n = len(mine)
    c_old, c_new, c = (mine["old_clean_correct"].to_numpy(bool), raw["new_clean_correct"].to_numpy(bool), mine["new_clean_correct"].to_numpy(bool))
    r_old, r_new, r = (mine["old_robust"].to_numpy(bool), raw["new_robust"].to_numpy(bool), mine["new_robust"].to_numpy(bool))
    figures: dict[str, Any] = {}
    for name, reference, own in (("accuracy", c_new, c), ("robust_accuracy", r_new, r)):
        mean, _, upper = paired_mean_interval(reference.astype(int) - own.astype(int))
        figures[f"{name}_drop_vs_new"], figures[f"{name}_drop_vs_new_upper"] = mean, upper
    figures["accuracy_delta_lower"] = paired_mean_interval(c.astype(int) - c_old.astype(int))[1]
    figures["robust_accuracy_delta_lower"] = paired_mean_interval(r.astype(int) - r_old.astype(int))[1]
    figures["nfr_upper"] = wilson_interval(int(mine["negative_flip"].sum()), n)[1]
    figures["rnfr_upper"] = wilson_interval(int(mine["robust_negative_flip"].sum()), n)[1]
    labels = mine["label"].to_numpy()
    class_old, class_own, drops, uppers = [], [], [], []
    for label in range(num_classes):
        members = labels == label
        if not members.any():
            class_old.append(math.nan)
            class_own.append(math.nan)
            continue
        class_old.append(float(c_old[members].mean()))
        class_own.append(float(c[members].mean()))
        mean, _, upper = paired_mean_interval(c_old[members].astype(int) - c[members].astype(int))
        drops.append((class_old[-1] - class_own[-1], label))
        uppers.append(upper if math.isfinite(upper) else class_old[-1] - class_own[-1])
    figures["class_accuracy_old"], figures["class_accuracy"] = class_old, class_own
    worst = max(drops) if drops else (math.nan, None)
    figures["max_class_accuracy_drop"], figures["max_class_accuracy_drop_class"] = worst
    figures["max_class_accuracy_drop_upper"] = max(uppers) if uppers else math.nan
    test = mcnemar_exact(raw["robust_negative_flip"].to_numpy(bool), mine["robust_negative_flip"].to_numpy(bool))
    figures["rnf_cut"] = int(raw["robust_negative_flip"].sum()) - int(mine["robust_negative_flip"].sum())
    figures["rnf_cut_p_value"] = test["p_value"]
    return figures


def _rule_specs(metrics: dict[str, Any], rules: DecisionRules, on_interval: set[str]) -> list[tuple[str, float | None, float, str, str]]:
    """(rule, threshold, value, op, estimate) for every rule; ``estimate`` is ``point`` or the interval end used."""

    def pick(rule: str, point: float, bound_key: str) -> tuple[float, str]:
        if rule in on_interval:
            return _value(metrics, bound_key), bound_key.rsplit("_", 1)[1] + " 95%"
        return point, "point"

    specs = []
    value, how = pick("max_nfr", _value(metrics, "nfr"), "nfr_upper")
    specs.append(("max_nfr", rules.max_nfr, value, "<=", how))
    value, how = pick("max_rnfr", _value(metrics, "rnfr"), "rnfr_upper")
    specs.append(("max_rnfr", rules.max_rnfr, value, "<=", how))
    value, how = pick("min_accuracy_delta", _value(metrics, "accuracy_new") - _value(metrics, "accuracy_old"), "accuracy_delta_lower")
    specs.append(("min_accuracy_delta", rules.min_accuracy_delta, value, ">=", how))
    value, how = pick("min_robust_accuracy_delta", _value(metrics, "robust_accuracy_new") - _value(metrics, "robust_accuracy_old"),
                      "robust_accuracy_delta_lower")
    specs.append(("min_robust_accuracy_delta", rules.min_robust_accuracy_delta, value, ">=", how))
    for rule, key in (("max_accuracy_drop_vs_new", "accuracy_drop_vs_new"), ("max_robust_accuracy_drop_vs_new", "robust_accuracy_drop_vs_new"),
                      ("max_class_accuracy_drop", "max_class_accuracy_drop")):
        value, how = pick(rule, _value(metrics, key), f"{key}_upper")
        specs.append((rule, getattr(rules, rule), value, "<=", how))
    return specs


def check_rules(metrics: dict[str, Any] | None, config: DecisionConfig, expected_samples: int | None, candidate: str = "") -> list[dict[str, Any]]:
    """Evaluate completeness and every enabled rule; one record per check with ``passed``.

    Each rule's record holds its ``value``, ``threshold`` and ``estimate`` (``point``, or the end of
    the 95% interval it compared). ``candidate`` names the candidate (``new`` is exempt from
    ``max_rnf_cut_p_value``).
    """
    if metrics is None:
        return [{"rule": "evaluation_present", "passed": False, "detail": "no evaluation found"}]
    checks: list[dict[str, Any]] = []
    n = metrics.get("n_samples")
    complete = n is not None and n > 0 and (expected_samples is None or n == expected_samples)
    checks.append({"rule": "evaluation_complete", "passed": bool(complete), "value": n, "threshold": expected_samples})
    for name, threshold, value, op, how in _rule_specs(metrics, config.rules, set(config.on_interval)):
        if threshold is None:
            continue
        # NaN compares False both ways, so a missing metric fails the rule (fail closed).
        passed = value <= threshold if op == "<=" else value >= threshold
        record = {"rule": name, "passed": bool(passed), "value": None if math.isnan(value) else value, "threshold": threshold, "estimate": how}
        if name == "max_class_accuracy_drop" and metrics.get("max_class_accuracy_drop_class") is not None:
            record["class"] = metrics["max_class_accuracy_drop_class"]
        checks.append(record)
    if config.rules.max_rnf_cut_p_value is not None:
        if candidate == "new":
            checks.append({"rule": "max_rnf_cut_p_value", "passed": True, "value": None, "threshold": config.rules.max_rnf_cut_p_value,
                           "detail": "not applied to the raw update"})
        else:
            p_value, cut = _value(metrics, "rnf_cut_p_value"), _value(metrics, "rnf_cut")
            passed = cut > 0 and p_value <= config.rules.max_rnf_cut_p_value
            checks.append({"rule": "max_rnf_cut_p_value", "passed": bool(passed), "value": None if math.isnan(p_value) else p_value,
                           "threshold": config.rules.max_rnf_cut_p_value, "rnf_cut": None if math.isnan(cut) else int(cut),
                           "estimate": "McNemar exact"})
    rank_value = _value(metrics, _rank_key(config.rank_by))
    checks.append({"rule": f"{config.rank_by}_defined", "passed": not math.isnan(rank_value), "value": None if math.isnan(rank_value) else rank_value})
    return checks


def _rank_key(rank_by: str) -> str:
    return {"accuracy": "accuracy_new", "robust_accuracy": "robust_accuracy_new"}.get(rank_by, rank_by)


def _failures(checks: list[dict[str, Any]]) -> list[str]:
    out = []
    for check in checks:
        if check["passed"]:
            continue
        if "threshold" in check and check.get("value") is not None and check["threshold"] is not None:
            out.append(f"{check['rule']}: {check['value']:.4g} vs {check['threshold']:.4g}")
        else:
            out.append(f"{check['rule']}: {check.get('detail', 'failed')}")
    return out


def decide(
    evaluations: dict[str, dict[str, dict[str, Any] | None]],
    config: DecisionConfig,
    expected_samples: dict[str, int],
) -> dict[str, Any]:
    """Decide on an update.

    ``evaluations[candidate][split]`` is that candidate's metrics dict (or None when missing);
    ``expected_samples[split]`` is the split's size. Returns the decision record: ``verdict``
    (``promote`` | ``reject``), ``candidate`` (or None), ``reasons`` and per-candidate checks.
    """
    selection, confirmation = config.selection_split, config.confirmation_split
    record: dict[str, Any] = {
        "verdict": "reject",
        "candidate": None,
        "reasons": [],
        "selection_split": selection,
        "confirmation_split": confirmation,
        "rank_by": config.rank_by,
        "rules": config.rules.model_dump(),
        "on_interval": list(config.on_interval),
        "candidates": {},
    }
    if not evaluations:
        record["reasons"].append("no candidate was evaluated")
        return record
    admissible: list[tuple[str, float, float]] = []
    for name, by_split in sorted(evaluations.items()):
        metrics = by_split.get(selection)
        checks = check_rules(metrics, config, expected_samples.get(selection), name)
        record["candidates"][name] = {"selection_checks": checks, "admissible": all(c["passed"] for c in checks)}
        if record["candidates"][name]["admissible"]:
            assert metrics is not None  # check_rules fails "evaluation_present" when metrics is None
            rank = _value(metrics, _rank_key(config.rank_by))
            sort_rank = rank if config.rank_by in LOWER_IS_BETTER else -rank
            admissible.append((name, sort_rank, -_value(metrics, "robust_accuracy_new")))
    if not admissible:
        record["reasons"].append(f"no candidate meets every rule on the {selection} split")
        for name, info in record["candidates"].items():
            record["reasons"].append(f"{name}: " + "; ".join(_failures(info["selection_checks"])))
        return record
    admissible.sort(key=lambda item: (item[1], item[2], item[0]))
    best = admissible[0][0]
    record["selected_on_" + selection] = best
    confirm_checks = check_rules(evaluations[best].get(confirmation), config, expected_samples.get(confirmation), best)
    record["candidates"][best]["confirmation_checks"] = confirm_checks
    if all(check["passed"] for check in confirm_checks):
        record["verdict"] = "promote"
        record["candidate"] = best
        record["reasons"].append(f"{best} is the best admissible candidate by {config.rank_by} on {selection} and meets every rule on {confirmation}")
    else:
        record["reasons"].append(f"{best} (best on {selection}) fails on {confirmation}: " + "; ".join(_failures(confirm_checks)))
    return record


def best_grid_point(validation_metrics: list[dict[str, Any]], new_metrics: dict[str, Any] | None = None,
                    rules: DecisionRules | None = None) -> tuple[int, bool]:
    """The grid point to keep and whether it keeps the update's gains: ``(index, within_limits)``.

    A point is *within limits* when its validation accuracy and robust accuracy are at most
    ``rules.max_accuracy_drop_vs_new`` / ``rules.max_robust_accuracy_drop_vs_new`` below the
    un-fine-tuned new model's (``new_metrics``; a disabled limit always holds). Among the points
    within limits, the lowest validation S-NFR is kept (ties: higher robust accuracy, higher
    accuracy, earlier point). When no point is within limits the search does *not* fall back to
    the most conservative point: it keeps the point that misses the limits by the least (largest
    shortfall, then S-NFR) and returns ``within_limits=False``, which the caller reports (the gate's
    own drop rules then reject it on the same split). Without ``new_metrics`` or ``rules``, every
    point is within limits (the plain lowest S-NFR). A point whose S-NFR is missing or not finite
    is never chosen over a measured one. The authors' table script keeps the *highest* S-NFR
    (``ascending=False``); the paper's protocol means the lowest.
    """
    if not validation_metrics:
        raise ValueError("no grid points to choose from")
    worst = math.inf

    def shortfall(metrics: dict[str, Any]) -> float:
        if new_metrics is None or rules is None:
            return 0.0
        missing = 0.0
        for key, limit in (("accuracy_new", rules.max_accuracy_drop_vs_new), ("robust_accuracy_new", rules.max_robust_accuracy_drop_vs_new)):
            if limit is None:
                continue
            drop = _value(new_metrics, key) - _value(metrics, key)
            missing = max(missing, worst if math.isnan(drop) else drop - limit)
        return max(0.0, missing)

    def order(index: int) -> tuple[float, float, float, float, int]:
        metrics = validation_metrics[index]
        snfr, robust, accuracy = (_value(metrics, key) for key in ("snfr", "robust_accuracy_new", "accuracy_new"))
        return (shortfall(metrics), worst if math.isnan(snfr) else snfr, worst if math.isnan(robust) else -robust,
                worst if math.isnan(accuracy) else -accuracy, index)

    best = min(range(len(validation_metrics)), key=order)
    return best, shortfall(validation_metrics[best]) <= 0.0
