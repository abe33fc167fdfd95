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
"""

from __future__ import annotations

import math
from typing import Any

from rcat.config import DecisionConfig

LOWER_IS_BETTER = {"snfr", "rnfr", "nfr"}


def _value(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    value = math.nan if value is None else float(value)
    return value if math.isfinite(value) else math.nan  # inf is not a measurement: fail closed like NaN


def check_rules(metrics: dict[str, Any] | None, config: DecisionConfig, expected_samples: int | None) -> list[dict[str, Any]]:
    """Evaluate completeness and every enabled rule; one record per check with ``passed``."""
    if metrics is None:
        return [{"rule": "evaluation_present", "passed": False, "detail": "no evaluation found"}]
    checks: list[dict[str, Any]] = []
    n = metrics.get("n_samples")
    complete = n is not None and n > 0 and (expected_samples is None or n == expected_samples)
    checks.append({"rule": "evaluation_complete", "passed": bool(complete), "value": n, "threshold": expected_samples})
    rules = config.rules
    specs = [
        ("max_nfr", rules.max_nfr, _value(metrics, "nfr"), "<="),
        ("max_rnfr", rules.max_rnfr, _value(metrics, "rnfr"), "<="),
        ("min_accuracy_delta", rules.min_accuracy_delta, _value(metrics, "accuracy_new") - _value(metrics, "accuracy_old"), ">="),
        ("min_robust_accuracy_delta", rules.min_robust_accuracy_delta, _value(metrics, "robust_accuracy_new") - _value(metrics, "robust_accuracy_old"), ">="),
    ]
    for name, threshold, value, op in specs:
        if threshold is None:
            continue
        # NaN compares False both ways, so a missing metric fails the rule (fail closed).
        passed = value <= threshold if op == "<=" else value >= threshold
        checks.append({"rule": name, "passed": bool(passed), "value": None if math.isnan(value) else value, "threshold": threshold})
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
        "candidates": {},
    }
    if not evaluations:
        record["reasons"].append("no candidate was evaluated")
        return record
    admissible: list[tuple[str, float, float]] = []
    for name, by_split in sorted(evaluations.items()):
        metrics = by_split.get(selection)
        checks = check_rules(metrics, config, expected_samples.get(selection))
        record["candidates"][name] = {"selection_checks": checks, "admissible": all(c["passed"] for c in checks)}
        if record["candidates"][name]["admissible"]:
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
    confirm_checks = check_rules(evaluations[best].get(confirmation), config, expected_samples.get(confirmation))
    record["candidates"][best]["confirmation_checks"] = confirm_checks
    if all(check["passed"] for check in confirm_checks):
        record["verdict"] = "promote"
        record["candidate"] = best
        record["reasons"].append(f"{best} is the best admissible candidate by {config.rank_by} on {selection} and meets every rule on {confirmation}")
    else:
        record["reasons"].append(f"{best} (best on {selection}) fails on {confirmation}: " + "; ".join(_failures(confirm_checks)))
    return record


def best_grid_point(validation_metrics: list[dict[str, Any]]) -> int:
    """Index of the grid point to keep: the lowest validation S-NFR (NF or RNF, over all samples).

    Ties go to higher robust accuracy, then higher accuracy, then the earlier grid point. A point
    whose S-NFR is missing or not finite is never chosen over a measured one. The authors' table
    script keeps the *highest* S-NFR (``ascending=False``); the paper's protocol means the lowest.
    """
    if not validation_metrics:
        raise ValueError("no grid points to choose from")

    def order(index: int) -> tuple[float, float, float, int]:
        metrics = validation_metrics[index]
        snfr, robust, accuracy = (_value(metrics, key) for key in ("snfr", "robust_accuracy_new", "accuracy_new"))
        worst = math.inf
        return (worst if math.isnan(snfr) else snfr, worst if math.isnan(robust) else -robust, worst if math.isnan(accuracy) else -accuracy, index)

    return min(range(len(validation_metrics)), key=order)
