"""Stage ``evaluate@<method>``: a fine-tuned model attacked afresh, compared with the old model's cached outcomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from rcat.config import AttackConfig, EngineConfig, Params
from rcat.data import Split
from rcat.errors import InputError
from rcat.metrics import compare_outcomes, flip_set
from rcat.models import LoadedModel
from rcat.results import EVALUATED_SPLITS, Layout
from rcat.safe_io import write_json, write_parquet
from rcat.stages.attacking import attack_model_on_splits, write_evaluation_evidence, write_gallery
from rcat.stages.common import load_cached_outcomes, split_metrics, stage_device, stage_model, stage_split
from rcat.stages.records import key_figures, method_params
from rcat.tracking import Tracker


def evaluate_method(params: Params, method_name: str, layout: Layout, tracker: Tracker | None = None) -> dict[str, Any]:
    """Attack a fine-tuned model afresh on validation and test; compare with the old model's cached outcomes."""
    if method_name not in params.finetune.methods:
        raise InputError(f"params.yaml: finetune.methods has no method {method_name!r}")
    device = stage_device(params)
    splits = {name: stage_split(layout, name) for name in EVALUATED_SPLITS}
    old = stage_model(layout, "old", params, device)
    old_digest = old.digest
    old_outcomes = load_cached_outcomes(layout, "old", splits, params.attack, old_digest)
    model = stage_model(layout, method_name, params, device)
    confirmation = params.decision.confirmation_split
    outcomes = attack_model_on_splits(model, method_name, splits, params.attack, params.seed, device, params.engine, save_adversarial=(confirmation,))
    metrics, flips = split_metrics(old_outcomes, outcomes, EVALUATED_SPLITS)
    out = layout.evaluation(method_name)
    provenance = {"attack_config": json.dumps(params.attack.identity(), sort_keys=True), "old_digest": old_digest, "candidate_digest": model.digest}
    write_parquet(out / "outcomes.parquet", outcomes, provenance)
    write_parquet(out / "flips.parquet", flips.assign(candidate=method_name), provenance)
    write_json(out / "metrics.json", metrics)
    write_gallery(params, layout, method_name, model, old, splits[confirmation], flips[flips["split"] == confirmation])
    write_evaluation_evidence(params, layout, method_name, splits)
    if tracker is not None:
        with tracker.child(f"candidate:{method_name}", "candidate") as run:
            run.params(method_params(params, method_name))
            run.metrics(key_figures(params, metrics))
            run.metrics(metrics)
            run.artifact(out / "flips.parquet", "flips")
            run.table(flip_set(flips.assign(candidate=method_name)), f"flips/{method_name}.json")
    return metrics



def evaluate_pair(old: LoadedModel, new: LoadedModel, split: Split, attack: AttackConfig, seed: int, device: torch.device, out_dir: Path,
                  engine: EngineConfig | None = None) -> dict[str, Any]:
    """The CLI's ``rcat evaluate``: attack both models on one split, write flat ``metrics.json`` and ``flips.parquet``."""
    old_outcomes = attack_model_on_splits(old, "old", {split.name: split}, attack, seed, device, engine)
    new_outcomes = attack_model_on_splits(new, "new", {split.name: split}, attack, seed, device, engine)
    metrics, flips = compare_outcomes(old_outcomes, new_outcomes)
    provenance = {"attack_config": json.dumps(attack.identity(), sort_keys=True), "old_digest": old.digest, "new_digest": new.digest,
                  "split_digest": split.digest, "old_model": old.path, "new_model": new.path}
    write_parquet(out_dir / "flips.parquet", flips, provenance)
    write_parquet(out_dir / "outcomes.parquet", pd.concat([old_outcomes, new_outcomes], ignore_index=True), provenance)
    write_json(out_dir / "metrics.json", metrics)
    return metrics

