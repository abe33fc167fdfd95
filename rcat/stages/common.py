"""What every stage shares: its splits and models read from the layout, the device, progress lines,
the per-split flip metrics and the baseline attack cache's outcomes, read back with their provenance checked."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import torch

from rcat.config import AttackConfig, Params
from rcat.data import Split, load_split
from rcat.errors import InputError
from rcat.metrics import compare_outcomes
from rcat.models import LoadedModel, load_model
from rcat.results import Layout, require
from rcat.runtime import resolve_device
from rcat.safe_io import read_parquet


def epoch_logger(label: str, epochs: int, n_samples: int, curves: list[tuple[int, dict[str, float]]]) -> Any:
    """An ``on_epoch`` callback: keep the epoch's figures in ``curves`` and print one line to stdout
    (``train_old: epoch 3/30 loss 0.41 train accuracy 0.87, 1,234 samples/s``), so a long run is
    visibly alive in DVC's log (stderr stays for the one-line error)."""
    import sys
    import time

    last = [time.perf_counter()]

    def on_epoch(epoch: int, values: dict[str, float]) -> None:
        curves.append((epoch, values))
        now = time.perf_counter()
        rate = n_samples / max(now - last[0], 1e-9)
        last[0] = now
        sys.stdout.write(f"{label}: epoch {epoch}/{epochs} loss {values.get('loss', float('nan')):.4f} "
                         f"train accuracy {values.get('train_accuracy', float('nan')):.4f}, {rate:,.0f} samples/s\n")
        sys.stdout.flush()

    return on_epoch


def stage_split(layout: Layout, name: str) -> Split:
    return load_split(require(layout.split(name), "prepare"))


def stage_model(layout: Layout, role: str, params: Params, device: torch.device | str) -> LoadedModel:
    stage = f"train_{role}" if role in {"old", "new"} else f"finetune@{role}"
    path = layout.model(role) if role in {"old", "new"} else layout.finetuned(role)
    return load_model(require(path, stage), device, params.trusted_factories())


def stage_device(params: Params) -> torch.device:
    return resolve_device(params.device)


def provenance(split: Split, model: LoadedModel, role: str) -> dict[str, str]:
    return {"split": split.name, "model": role, "model_digest": model.digest, "split_digest": split.digest}



def split_metrics(old: pd.DataFrame, new: pd.DataFrame, splits: tuple[str, ...]) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    metrics: dict[str, dict[str, Any]] = {}
    flips = []
    for name in splits:
        values, frame = compare_outcomes(old[old["split"] == name], new[new["split"] == name])
        metrics[name] = values
        flips.append(frame.assign(split=name))
    return metrics, pd.concat(flips, ignore_index=True)



def load_cached_outcomes(layout: Layout, role: str, splits: dict[str, Split], attack: AttackConfig, model_digest: str | None = None) -> pd.DataFrame:
    """Read one model's cached outcomes and check they were made on these splits with this attack.

    Reuse is never silent: a mismatch in split digests, attack config or model digest raises.
    """
    path = layout.attack_cache / "outcomes.parquet"
    frame = read_parquet(path)
    frame = frame[frame["model"] == role]
    expected_attack = json.dumps(attack.identity(), sort_keys=True)
    for name, split in splits.items():
        part = frame[frame["split"] == name]
        if len(part) != len(split) or set(part["split_digest"]) != {split.digest}:
            raise InputError(f"{path}: cached {role} outcomes do not match split {name!r} (size or digest differ); rerun 'dvc repro attack_cache'")
        if set(part["attack_config"]) != {expected_attack}:
            raise InputError(f"{path}: cached {role} outcomes were made with another attack config; rerun 'dvc repro attack_cache'")
        if model_digest is not None and set(part["model_digest"]) != {model_digest}:
            raise InputError(f"{path}: cached {role} outcomes belong to other model weights; rerun 'dvc repro attack_cache'")
    return frame[frame["split"].isin(list(splits))]

def method_params(params: Params, method_name: str) -> dict[str, Any]:
    method = params.finetune.methods[method_name]
    shared = params.finetune.for_method(method).model_dump(mode="json", exclude={"methods", "attack"})
    # a grid method logs its grid here; the kept point's alpha/beta are in the fine-tune history and the model header
    weights = {"alpha": method.alpha, "beta": method.beta} if method.grid is None else {"grid": json.dumps([p.model_dump() for p in method.grid])}
    return {"method": method_name, "loss": method.loss, **weights,
            "constraint_set": method.constraint_set, "constraint_term": method.constraint_term, "distance": method.distance,
            "train_attack": params.finetune.for_method(method).attack.label(), **{f"finetune.{k}": v for k, v in shared.items()}}


KEY_FIGURES = ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr", "snfr")
"""A candidate's key figures, logged first on its MLflow run (``key/<figure>``: ``key`` sorts before the split names)."""


def key_figures(params: Params, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``key/accuracy``, ``key/robust_accuracy``, ``key/nfr``, ``key/rnfr``, ``key/snfr`` on the confirmation split:
    the same keys on every candidate run, so the MLflow compare page starts with them."""
    confirmation = metrics.get(params.decision.confirmation_split) or {}
    return {f"key/{name.removesuffix('_new')}": confirmation.get(name) for name in KEY_FIGURES}
