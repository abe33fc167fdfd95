"""What a candidate's MLflow run records first: its method's params and its key figures.

Apart from :mod:`rcat.stages.common` (splits, models, devices) so that ``decide``, which logs
them from per-sample results, imports neither torch nor the models.
"""

from __future__ import annotations

import json
from typing import Any

from rcat.config import Params


def method_params(params: Params, method_name: str) -> dict[str, Any]:
    """A method's params as logged on its run: its loss and weights (or its grid), its constraint, and the fine-tune settings it uses."""
    method = params.finetune.methods[method_name]
    shared = params.finetune.for_method(method).model_dump(mode="json", exclude={"methods", "attack"})
    # a grid method logs its grid here; the kept point's alpha/beta are in the fine-tune history and the model header
    weights = {"alpha": method.alpha, "beta": method.beta} if method.grid is None else {"grid": json.dumps([p.model_dump() for p in method.grid])}
    return {"method": method_name, "loss": method.loss, **weights,
            "constraint_set": method.constraint_set, "constraint_term": method.constraint_term, "distance": method.distance,
            **({"margin": method.margin} if method.constraint_term == "margin_hinge" else {}),
            "train_attack": params.finetune.for_method(method).attack.label(), **{f"finetune.{k}": v for k, v in shared.items()}}


KEY_FIGURES = ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr", "snfr")
"""A candidate's key figures, logged first on its MLflow run (``key/<figure>``: ``key`` sorts before the split names)."""


def key_figures(params: Params, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``key/accuracy``, ``key/robust_accuracy``, ``key/nfr``, ``key/rnfr``, ``key/snfr`` on the confirmation split:
    the same keys on every candidate run, so the MLflow compare page starts with them."""
    confirmation = metrics.get(params.decision.confirmation_split) or {}
    return {f"key/{name.removesuffix('_new')}": confirmation.get(name) for name in KEY_FIGURES}
