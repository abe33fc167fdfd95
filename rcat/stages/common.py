"""What every stage shares: its splits and models read from the layout, the device, progress lines,
the per-split flip metrics and the baseline attack cache's outcomes, read back with their provenance checked."""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

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


class EpochProgress:
    """Training progress: an ``on_epoch`` callback (call the object) and an ``on_batch`` one.

    Every epoch prints one line to ``stream`` (stdout by default: stderr stays for the one-line
    error), ``train_old: epoch 3/30 loss 0.41 train accuracy 0.87, 1,234 samples/s``, and keeps the
    epoch's figures in ``curves``. When ``stream`` is a terminal, a tqdm bar also runs through each
    epoch with the running mean loss and training accuracy and tqdm's samples/s; it is removed when
    the epoch's line is printed, so logs (DVC's, CI's: not terminals) get the lines only.
    """

    def __init__(self, label: str, epochs: int, n_samples: int, curves: list[tuple[int, dict[str, float]]], stream: IO[str] | None = None) -> None:
        self.label, self.epochs, self.n_samples, self.curves = label, epochs, n_samples, curves
        self.stream = stream if stream is not None else sys.stdout
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: Any = None
        self.epoch_began = time.perf_counter()
        self._sums = {"loss": 0.0, "train_accuracy": 0.0, "samples": 0.0}

    def on_batch(self, samples: int, values: dict[str, float]) -> None:
        """After each optimiser step: ``samples`` in the batch, ``values`` its loss terms and training accuracy."""
        if not self.terminal:
            return
        if self.bar is None:
            from tqdm import tqdm

            epoch = len(self.curves) + 1
            self.bar = tqdm(total=self.n_samples, desc=f"{self.label} epoch {epoch}/{self.epochs}", unit=" samples", file=self.stream,
                            dynamic_ncols=True, leave=False, smoothing=0.1)
        for key in ("loss", "train_accuracy"):
            self._sums[key] += values.get(key, float("nan")) * samples
        self._sums["samples"] += samples
        seen = self._sums["samples"]
        # drawn on the epoch's first batch, then whenever tqdm redraws (at most every 0.1 s)
        self.bar.set_postfix_str(f"loss {self._sums['loss'] / seen:.4f} acc {self._sums['train_accuracy'] / seen:.4f}", refresh=seen == samples)
        self.bar.update(samples)

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._sums = {"loss": 0.0, "train_accuracy": 0.0, "samples": 0.0}
        self.curves.append((epoch, values))
        now = time.perf_counter()
        rate = self.n_samples / max(now - self.epoch_began, 1e-9)
        self.epoch_began = now
        self.stream.write(f"{self.label}: epoch {epoch}/{self.epochs} loss {values.get('loss', float('nan')):.4f} "
                          f"train accuracy {values.get('train_accuracy', float('nan')):.4f}, {rate:,.0f} samples/s\n")
        self.stream.flush()


def epoch_logger(label: str, epochs: int, n_samples: int, curves: list[tuple[int, dict[str, float]]], stream: IO[str] | None = None) -> EpochProgress:
    """The stages' training progress (:class:`EpochProgress`): pass it as ``on_epoch`` and its ``on_batch`` as ``on_batch``."""
    return EpochProgress(label, epochs, n_samples, curves, stream)


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
