"""Attacking a model on the splits through the attack engine, and the evidence record of an evaluation."""

from __future__ import annotations

import pandas as pd
import torch

from rcat.config import AttackConfig, EngineConfig, Params
from rcat.data import Split
from rcat.engine import run_attack, summary_of
from rcat.executors import executor_for
from rcat.models import LoadedModel, check_model_on
from rcat.results import Layout, write_evidence
from rcat.stages.common import provenance

ENGINE_SUMMARIES = "rcat.engine_by_split"
"""``DataFrame.attrs`` key of :func:`attack_model_on_splits`' result: the engine's run summary per split."""


def attack_model_on_splits(model: LoadedModel, role: str, splits: dict[str, Split], attack: AttackConfig, seed: int, device: torch.device,
                           engine: EngineConfig | None = None) -> pd.DataFrame:
    """Per-sample outcomes of ``model`` under its own white-box attack on each split (long format).

    Runs through the attack engine (:mod:`rcat.engine`): chunked, cached under ``engine.cache_dir``
    by content (weights, data, attack, seed), resumable after a crash. ``engine`` defaults to the
    params' defaults.
    """
    engine = engine if engine is not None else EngineConfig()
    chunk_size = engine.effective_chunk_size(attack.batch_size)
    frames = []
    summaries: dict[str, dict[str, float]] = {}
    with executor_for(engine.workers, engine.dask_address) as executor:  # one pool for every split
        for split in splits.values():
            check_model_on(model, split.images, split.num_classes, f"split {split.name}")
            frames.append(run_attack(model.network, split, attack, num_classes=split.num_classes, seed=seed, provenance=provenance(split, model, role),
                                     device=device, cache_dir=engine.cache_dir, chunk_size=chunk_size, progress=engine.progress, executor=executor))
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
                   files=("outcomes.parquet", "flips.parquet", "metrics.json"))

