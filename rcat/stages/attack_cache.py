"""Stage ``attack_cache``: the old and the new model attacked once each; the raw update's flip evaluation."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from rcat.config import Params
from rcat.data import SPLIT_NAMES
from rcat.results import EVALUATED_SPLITS, Layout
from rcat.safe_io import write_json, write_parquet
from rcat.stages.attacking import ENGINE_SUMMARIES, attack_model_on_splits, write_evaluation_evidence, write_gallery
from rcat.stages.common import split_metrics, stage_device, stage_model, stage_split
from rcat.stages.records import key_figures
from rcat.tracking import Tracker


def attack_cache(params: Params, layout: Layout, tracker: Tracker | None = None) -> dict[str, Any]:
    """Attack the old and the new model once, each with its own attack, on every split.

    Writes ``outcomes.parquet`` (one row per model and sample, :data:`rcat.attacks.OUTCOME_COLUMNS`),
    and the un-fine-tuned update's flip evaluation (``metrics.json``, ``flips.parquet``): the
    candidate ``new`` of the update gate.
    """
    device = stage_device(params)
    splits = {name: stage_split(layout, name) for name in SPLIT_NAMES}
    old = stage_model(layout, "old", params, device)
    new = stage_model(layout, "new", params, device)
    # the confirmation split's adversarial points are kept in the engine's cache: the report's gallery is drawn from them
    confirmation = (params.decision.confirmation_split,)
    outcomes = {role: attack_model_on_splits(model, role, splits, params.attack, params.seed, device, params.engine, save_adversarial=confirmation)
                for role, model in (("old", old), ("new", new))}
    frame = pd.concat(outcomes.values(), ignore_index=True)
    provenance = {"attack_config": json.dumps(params.attack.identity(), sort_keys=True), "old_digest": old.digest, "new_digest": new.digest}
    write_parquet(layout.attack_cache / "outcomes.parquet", frame, provenance)
    metrics, flips = split_metrics(outcomes["old"], outcomes["new"], SPLIT_NAMES)
    write_parquet(layout.attack_cache / "flips.parquet", flips.assign(candidate="new"), provenance)
    write_json(layout.attack_cache / "metrics.json", metrics)
    split = splits[params.decision.confirmation_split]
    write_gallery(params, layout, "new", new, old, split, flips[flips["split"] == split.name])
    write_evaluation_evidence(params, layout, "new", splits)
    if tracker is not None:
        with tracker.child("attack_cache", "stage") as run:
            run.params({"attack": params.attack.label(), **{f"attack.{k}": v for k, v in params.attack.identity().items()}})
            run.metrics({f"{split}/{role}/robust_accuracy": float(df[df["split"] == split]["robust"].mean()) for role, df in outcomes.items() for split in SPLIT_NAMES})
            # the attack engine's figures per model and split: engine/<role>/<split>/samples_per_s, chunks_reused, ...
            run.metrics({"engine": {role: df.attrs.get(ENGINE_SUMMARIES, {}) for role, df in outcomes.items()}})
            run.artifact(layout.attack_cache / "outcomes.parquet")
        with tracker.child("candidate:new", "candidate") as run:
            run.params({"method": "new", "loss": "none"})
            # the evaluated splits only, as every other candidate run: the same metric keys on the compare page
            run.metrics(key_figures(params, metrics))
            run.metrics({split: metrics[split] for split in EVALUATED_SPLITS})
            run.artifact(layout.attack_cache / "flips.parquet", "flips")
    return metrics

