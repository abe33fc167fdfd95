"""Attacking a model on the splits through the attack engine, and the evidence record of an evaluation."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from rcat.config import AttackConfig, EngineConfig, Params
from rcat.data import Split
from rcat.engine import run_attack, saved_adversarial, summary_of
from rcat.executors import executor_for
from rcat.models import LoadedModel, check_model_on
from rcat.results import GALLERY_FILE, GALLERY_SAMPLES, Layout, write_evidence
from rcat.safe_io import write_tensors
from rcat.stages.common import provenance

ENGINE_SUMMARIES = "rcat.engine_by_split"
"""``DataFrame.attrs`` key of :func:`attack_model_on_splits`' result: the engine's run summary per split."""


def attack_model_on_splits(model: LoadedModel, role: str, splits: dict[str, Split], attack: AttackConfig, seed: int, device: torch.device,
                           engine: EngineConfig | None = None, save_adversarial: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per-sample outcomes of ``model`` under its own white-box attack on each split (long format).

    Runs through the attack engine (:mod:`rcat.engine`): chunked, cached under ``engine.cache_dir``
    by content (weights, data, attack, seed), resumable after a crash. ``engine`` defaults to the
    params' defaults. On the splits named in ``save_adversarial`` the engine also keeps every
    adversarial point (for the report's gallery, :func:`write_gallery`).
    """
    engine = engine if engine is not None else EngineConfig()
    chunk_size = engine.effective_chunk_size(attack.batch_size)
    frames = []
    summaries: dict[str, dict[str, float]] = {}
    with executor_for(engine.workers, engine.dask_address) as executor:  # one pool for every split
        for split in splits.values():
            check_model_on(model, split.images, split.num_classes, f"split {split.name}")
            frames.append(run_attack(model.network, split, attack, num_classes=split.num_classes, seed=seed, provenance=provenance(split, model, role),
                                     device=device, cache_dir=engine.cache_dir, chunk_size=chunk_size, progress=engine.progress, executor=executor,
                                     save_adversarial=split.name in save_adversarial))
            summary = summary_of(frames[-1])
            if summary is not None:
                summaries[split.name] = summary.metrics()
    result = pd.concat(frames, ignore_index=True)
    result.attrs[ENGINE_SUMMARIES] = summaries  # concat drops each frame's own attrs
    return result



def write_evaluation_evidence(params: Params, layout: Layout, candidate: str, splits: dict[str, Split]) -> None:
    """An evaluation's ``evidence.json``, written last: it vouches for the files written before it
    and names the weights, old model, splits and attack they were computed from (:mod:`rcat.results`)."""
    write_evidence(layout.evaluation(candidate), candidate=candidate, model_path=layout.candidate_model(candidate), old_model_path=layout.model("old"),
                   old_outcomes_path=layout.attack_cache / "outcomes.parquet", split_digests={name: split.digest for name, split in splits.items()},
                   attack_identity=params.attack.identity(), attack_label=params.attack.label(), seed=params.seed,
                   files=("outcomes.parquet", "flips.parquet", "metrics.json", GALLERY_FILE))


def write_gallery(params: Params, layout: Layout, candidate: str, model: LoadedModel, old: LoadedModel, split: Split, flips: pd.DataFrame) -> None:
    """``gallery.safetensors`` of an evaluation: the candidate's first :data:`rcat.results.GALLERY_SAMPLES` robustness
    negative flips on ``split`` (in split order), with the old model's and the candidate's adversarial points as the
    evaluation's own attacks left them (read from the engine's cache: the report renders them and never attacks).

    Tensors: ``sample_index`` (int64), ``position`` (int64, in the split), ``old_adversarial`` and
    ``candidate_adversarial`` (float32, ``(K, C, H, W)``), K at most :data:`rcat.results.GALLERY_SAMPLES`.
    """
    rnf = set(flips.loc[flips["robust_negative_flip"], "sample_index"].astype(int))
    positions = [p for p, index in enumerate(split.sample_index.tolist()) if index in rnf][:GALLERY_SAMPLES]
    chunk_size = params.engine.effective_chunk_size(params.attack.batch_size)
    common: dict[str, Any] = {"seed": params.seed, "cache_dir": params.engine.cache_dir, "chunk_size": chunk_size, "positions": positions}
    tensors = {"sample_index": split.sample_index[positions].to(torch.int64), "position": torch.tensor(positions, dtype=torch.int64),
               "old_adversarial": saved_adversarial(old.network, split, params.attack, **common),
               "candidate_adversarial": saved_adversarial(model.network, split, params.attack, **common)}
    write_tensors(layout.evaluation(candidate) / GALLERY_FILE, tensors, {"candidate": candidate, "split": split.name, "split_digest": split.digest,
                                                                          "attack": params.attack.label(), "old_digest": old.digest,
                                                                          "candidate_digest": model.digest})

