"""The pipeline's stages as functions of (validated params, file layout).

DVC stage scripts (``stages/``), the ``rcat`` command line and the Prefect flow all call these,
so there is one code path per stage. Each function reads its inputs from the layout, calls the
core modules, writes its outputs atomically, then logs to MLflow. Outputs are written before
logging so that a tracking failure never leaves a half-written output behind.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from rcat.config import AttackConfig, EngineConfig, MethodConfig, Params
from rcat.data import SPLIT_NAMES, Split, load_dataset, load_split, save_split, split_dataset, subsample
from rcat.decision import best_grid_point
from rcat.decision import decide as decide_update
from rcat.engine import run_attack, summary_of
from rcat.errors import InputError, UpdateRejected
from rcat.finetune import adversarial_train, finetune
from rcat.metrics import compare_outcomes
from rcat.models import FACTORY_PREFIX, TORCHSCRIPT_PREFIX, LoadedModel, ModelSpec, check_model_on, load_model, load_model_reference, save_model, weights_digest
from rcat.results import EVALUATED_SPLITS, EvidenceError, Layout, load_candidates, require, write_evidence
from rcat.runtime import code_revision, resolve_device, seed_everything
from rcat.safe_io import atomic_path, read_json, read_parquet, sha256_file, write_json, write_parquet
from rcat.tracking import Tracker

__all__ = ["EVALUATED_SPLITS", "Layout"]

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


def _split(layout: Layout, name: str) -> Split:
    return load_split(require(layout.split(name), "prepare"))


def _pipeline_model(layout: Layout, role: str, params: Params, device: torch.device | str) -> LoadedModel:
    stage = f"train_{role}" if role in {"old", "new"} else f"finetune@{role}"
    path = layout.model(role) if role in {"old", "new"} else layout.finetuned(role)
    return load_model(require(path, stage), device, params.trusted_factories())


def _device(params: Params) -> torch.device:
    return resolve_device(params.device)


def _provenance(split: Split, model: LoadedModel, role: str) -> dict[str, str]:
    return {"split": split.name, "model": role, "model_digest": model.digest, "split_digest": split.digest}


# ---------------------------------------------------------------- prepare


def prepare(params: Params, layout: Layout, tracker: Tracker | None = None) -> dict[str, Any]:
    """Load the data source, split it (seeded, stratified), write each split and a manifest of digests."""
    dataset = load_dataset(params.data.source, params.data.resize, params.data.center_crop)
    splits = split_dataset(dataset, params.data, params.seed)
    manifest: dict[str, Any] = {"source": params.data.source, "num_classes": dataset.num_classes, "classes": list(dataset.classes),
                                "input_shape": list(dataset.images.shape[1:]), "seed": params.seed, "splits": {}}
    for name, split in splits.items():
        digest = save_split(split, layout.split(name))
        counts = torch.bincount(split.labels, minlength=dataset.num_classes).tolist()
        manifest["splits"][name] = {"n_samples": len(split), "digest": digest, "class_counts": counts}
    write_json(layout.manifest, manifest)
    if tracker is not None:
        with tracker.child("prepare", "stage") as run:
            run.params({"data.source": params.data.source, **{f"data.{n}.digest": s["digest"] for n, s in manifest["splits"].items()}})
            run.metrics({f"{n}/n_samples": s["n_samples"] for n, s in manifest["splits"].items()})
            run.artifact(layout.manifest)
    return manifest


# ---------------------------------------------------------------- train (embedded default only)


def train(params: Params, role: str, layout: Layout, tracker: Tracker | None = None) -> str:
    """Adversarially train the embedded default's ``old`` or ``new`` model from scratch."""
    if role not in {"old", "new"}:
        raise InputError(f"train role {role!r}: use 'old' or 'new'")
    config = params.train_old if role == "old" else params.train_new
    device = _device(params)
    seed_everything(config.seed)
    if config.reference is not None:
        return import_model(params, role, layout, tracker)
    split = subsample(_split(layout, "finetune"), config.data_fraction, config.seed)
    normalization = None if config.normalization is None else (tuple(config.normalization.mean), tuple(config.normalization.std))
    spec = ModelSpec(config.architecture, tuple(split.images.shape[1:]), split.num_classes, dict(config.architecture_kwargs), normalization)
    network = spec.build()
    curves: list[tuple[int, dict[str, float]]] = []
    history = adversarial_train(network, split, config, device, on_epoch=epoch_logger(f"train_{role}", config.epochs, len(split), curves),
                                label=f"stage train_{role}")
    digest = save_model(network.cpu(), spec, layout.model(role), extra={"role": role, "trained_on": split.digest})
    write_json(layout.training_history(role), {"role": role, "n_train_samples": len(split), "epochs": history.epochs, "weights_digest": digest})
    if tracker is not None:
        with tracker.child(f"train_{role}", "stage") as run:
            run.params({"architecture": config.architecture, "n_train_samples": len(split), **config.model_dump(mode="json", exclude={"attack"}),
                        "attack": config.attack.label()})
            for epoch, values in curves:
                run.metrics({f"train/{k}": v for k, v in values.items()}, step=epoch)
            run.tags({"rcat.weights_digest": digest})
            run.artifact(layout.model(role), "model")
    return digest


def import_model(params: Params, role: str, layout: Layout, tracker: Tracker | None = None) -> str:
    """Bring the user's own ``old`` or ``new`` model (``train_<role>.reference``) into the pipeline.

    The model is loaded without unpickling code, checked against the data (input shape, classes,
    finite logits) and written as an rcat model file whose header records where it came from.
    """
    config = params.train_old if role == "old" else params.train_new
    reference = config.reference or ""
    if reference.startswith(TORCHSCRIPT_PREFIX):
        raise InputError(f"params.yaml: train_{role}.reference {reference!r}: TorchScript models can be evaluated "
                         "('rcat evaluate') but not fine-tuned; export a state dict and use 'factory:module:callable@WEIGHTS'")
    split = _split(layout, "finetune")
    normalization = None if config.normalization is None else (tuple(config.normalization.mean), tuple(config.normalization.std))
    try:
        model = load_model_reference(reference, "cpu", num_classes=split.num_classes, input_shape=tuple(split.images.shape[1:]),
                                     normalization=normalization, trusted_factories=params.trusted_factories())
    except InputError as exc:
        raise InputError(f"params.yaml: train_{role}.reference: {exc}") from exc
    check_model_on(model, split.images, split.num_classes, "the fine-tune split")
    source = reference.partition("@")[2] if reference.startswith(FACTORY_PREFIX) else reference
    extra = {"role": role, "imported_from": reference, "source_sha256": sha256_file(source) if Path(source).is_file() else "unknown"}
    digest = save_model(model.network, model.spec, layout.model(role), extra=extra)
    write_json(layout.training_history(role), {"role": role, "imported_from": reference, "epochs": [], "weights_digest": digest})
    if tracker is not None:
        with tracker.child(f"train_{role}", "stage") as run:
            run.params({"reference": reference})
            run.tags({"rcat.weights_digest": digest})
            run.artifact(layout.model(role), "model")
    return digest


# ---------------------------------------------------------------- baseline attack cache


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
    for split in splits.values():
        check_model_on(model, split.images, split.num_classes, f"split {split.name}")
        frames.append(run_attack(model.network, split, attack, num_classes=split.num_classes, seed=seed, provenance=_provenance(split, model, role),
                                 device=device, cache_dir=engine.cache_dir, chunk_size=chunk_size, progress=engine.progress,
                                 workers=engine.workers, dask_address=engine.dask_address))
        summary = summary_of(frames[-1])
        if summary is not None:
            summaries[split.name] = summary.metrics()
    result = pd.concat(frames, ignore_index=True)
    result.attrs[ENGINE_SUMMARIES] = summaries  # concat drops each frame's own attrs
    return result


def _split_metrics(old: pd.DataFrame, new: pd.DataFrame, splits: tuple[str, ...]) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    metrics: dict[str, dict[str, Any]] = {}
    flips = []
    for name in splits:
        values, frame = compare_outcomes(old[old["split"] == name], new[new["split"] == name])
        metrics[name] = values
        flips.append(frame.assign(split=name))
    return metrics, pd.concat(flips, ignore_index=True)


def attack_cache(params: Params, layout: Layout, tracker: Tracker | None = None) -> dict[str, Any]:
    """Attack the old and the new model once, each with its own attack, on every split.

    Writes ``outcomes.parquet`` (one row per model and sample, :data:`rcat.attacks.OUTCOME_COLUMNS`),
    and the un-fine-tuned update's flip evaluation (``metrics.json``, ``flips.parquet``): the
    candidate ``new`` of the update gate.
    """
    device = _device(params)
    splits = {name: _split(layout, name) for name in SPLIT_NAMES}
    old = _pipeline_model(layout, "old", params, device)
    new = _pipeline_model(layout, "new", params, device)
    outcomes = {role: attack_model_on_splits(model, role, splits, params.attack, params.seed, device, params.engine) for role, model in (("old", old), ("new", new))}
    frame = pd.concat(outcomes.values(), ignore_index=True)
    provenance = {"attack_config": json.dumps(params.attack.identity(), sort_keys=True), "old_digest": old.digest, "new_digest": new.digest}
    write_parquet(layout.attack_cache / "outcomes.parquet", frame, provenance)
    metrics, flips = _split_metrics(outcomes["old"], outcomes["new"], SPLIT_NAMES)
    write_parquet(layout.attack_cache / "flips.parquet", flips.assign(candidate="new"), provenance)
    write_json(layout.attack_cache / "metrics.json", metrics)
    _write_evaluation_evidence(params, layout, "new", splits)
    if tracker is not None:
        with tracker.child("attack_cache", "stage") as run:
            run.params({"attack": params.attack.label(), **{f"attack.{k}": v for k, v in params.attack.identity().items()}})
            run.metrics({f"{split}/{role}/robust_accuracy": float(df[df["split"] == split]["robust"].mean()) for role, df in outcomes.items() for split in SPLIT_NAMES})
            # the attack engine's figures per model and split: engine/<role>/<split>/samples_per_s, chunks_reused, ...
            run.metrics({"engine": {role: df.attrs.get(ENGINE_SUMMARIES, {}) for role, df in outcomes.items()}})
            run.artifact(layout.attack_cache / "outcomes.parquet")
        with tracker.child("candidate:new", "candidate") as run:
            run.params({"method": "new", "loss": "none"})
            run.metrics(metrics)
            run.artifact(layout.attack_cache / "flips.parquet", "flips")
    return metrics


def _write_evaluation_evidence(params: Params, layout: Layout, candidate: str, splits: dict[str, Split]) -> None:
    """An evaluation's ``evidence.json``, written last: it vouches for the files written before it
    and names the weights, old model, splits and attack they were computed from (:mod:`rcat.results`)."""
    write_evidence(layout.evaluation(candidate), candidate=candidate, model_path=layout.candidate_model(candidate), old_model_path=layout.model("old"),
                   old_outcomes_path=layout.attack_cache / "outcomes.parquet", split_digests={name: split.digest for name, split in splits.items()},
                   attack_identity=params.attack.identity(), attack_label=params.attack.label(), seed=params.seed,
                   files=("outcomes.parquet", "flips.parquet", "metrics.json"))


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


# ---------------------------------------------------------------- constrained fine-tune


def finetune_method(params: Params, method_name: str, layout: Layout, tracker: Tracker | None = None) -> str:
    """Fine-tune the new model with one configured method; write the model and its training curves."""
    methods = params.finetune.methods
    if method_name not in methods:
        raise InputError(f"params.yaml: finetune.methods has no method {method_name!r} (configured: {', '.join(methods)})")
    method = methods[method_name]
    device = _device(params)
    seed_everything(params.finetune.seed)
    split = _split(layout, "finetune")
    old = _pipeline_model(layout, "old", params, device)
    new = _pipeline_model(layout, "new", params, device)
    for model in (old, new):
        check_model_on(model, split.images, split.num_classes, "the fine-tune split")
    old_robust = None
    if method.loss == "rcat" and method.constraint_set == "attack_cache":
        # the constraint set from the baseline attack cache: samples the old model's own attack failed on
        cached = load_cached_outcomes(layout, "old", {"finetune": split}, params.attack, old.digest).set_index("sample_index")
        old_robust = torch.tensor(cached.loc[split.sample_index.numpy(), "robust"].to_numpy(dtype=bool))
    grid: list[dict[str, Any]] | None = None
    if method.grid is None:
        chosen = method
        curves: list[tuple[int, dict[str, float]]] = []
        network, history = finetune(new.network, old.network, split, params.finetune, method, device,
                                    on_epoch=epoch_logger(f"finetune@{method_name}", params.finetune.epochs, len(split), curves),
                                    old_robust=old_robust, label=f"stage finetune@{method_name}")
    else:
        chosen, network, history, curves, grid, within_limits = _search_grid(params, layout, method_name, method, new, old, split, device, old_robust)
    extra = {"method": method_name, "loss": method.loss, "alpha": str(chosen.alpha), "beta": str(chosen.beta), "base_digest": new.digest, "old_digest": old.digest}
    digest = save_model(network.cpu(), new.spec, layout.finetuned(method_name), extra=extra)
    record = {"method": method_name, **chosen.model_dump(exclude={"grid"}), "epochs": history.epochs, "weights_digest": digest}
    if grid is not None:
        record["grid"] = grid
        # false: no point kept the new model's accuracy within decision.rules' limits on validation
        record["grid_within_limits"] = within_limits
    write_json(layout.finetune_history(method_name), record)
    if tracker is not None:
        with tracker.child(f"candidate:{method_name}", "candidate") as run:
            run.params(_method_params(params, method_name))
            for epoch, values in curves:
                run.metrics({f"train/{k}": v for k, v in values.items()}, step=epoch)
            run.tags({"rcat.weights_digest": digest})
            run.artifact(layout.finetuned(method_name), "model")
    return digest


def _search_grid(params: Params, layout: Layout, method_name: str, method: MethodConfig, new: LoadedModel, old: LoadedModel, split: Split,
                 device: torch.device, old_robust: torch.Tensor | None) -> tuple[MethodConfig, torch.nn.Module, Any, list, list[dict[str, Any]], bool]:
    """Fine-tune once per grid point, attack each result on the validation split, keep the lowest
    S-NFR among the points that keep the new model's accuracy and robust accuracy within
    ``decision.rules``' drop limits (:func:`rcat.decision.best_grid_point`); the last value says
    whether any point did.

    Each point starts from the same weights and seed, so the points differ only in alpha/beta.
    Selection reads the validation split only (see :func:`rcat.decision.best_grid_point`); the
    test split stays untouched until the evaluate stage. The engine caches the validation attack
    of the kept model, so the evaluate stage does not repeat it.
    """
    validation = {"validation": _split(layout, "validation")}
    old_outcomes = load_cached_outcomes(layout, "old", validation, params.attack, old.digest)
    trials = []
    for index, point in enumerate(method.points()):
        seed_everything(params.finetune.seed)
        curves: list[tuple[int, dict[str, float]]] = []
        network, history = finetune(new.network, old.network, split, params.finetune, point, device,
                                    on_epoch=epoch_logger(f"finetune@{method_name} point {index}", params.finetune.epochs, len(split), curves),
                                    old_robust=old_robust,
                                    label=f"stage finetune@{method_name} (grid point {index})")
        candidate = LoadedModel(network, new.spec, weights_digest(network), f"{method_name} grid point {index}")
        outcomes = attack_model_on_splits(candidate, method_name, validation, params.attack, params.seed, device, params.engine)
        metrics, _ = _split_metrics(old_outcomes, outcomes, ("validation",))
        trials.append((point, network, history, curves, metrics["validation"]))
    new_metrics, _ = _split_metrics(old_outcomes, load_cached_outcomes(layout, "new", validation, params.attack, new.digest), ("validation",))
    kept, within_limits = best_grid_point([trial[4] for trial in trials], new_metrics["validation"], params.decision.rules)
    if not within_limits:
        warnings.warn(f"finetune@{method_name}: no grid point keeps validation accuracy and robust accuracy within "
                      f"decision.rules' limits of the new model's; kept point {kept}, the one closest to them, which the gate will reject",
                      RuntimeWarning, stacklevel=2)
    grid = [{"alpha": point.alpha, "beta": point.beta, "selected": index == kept, "validation": metrics}
            for index, (point, *_, metrics) in enumerate(trials)]
    point, network, history, curves, _ = trials[kept]
    return point, network, history, curves, grid, within_limits


def _method_params(params: Params, method_name: str) -> dict[str, Any]:
    method = params.finetune.methods[method_name]
    shared = params.finetune.model_dump(mode="json", exclude={"methods", "attack"})
    # a grid method logs its grid here; the kept point's alpha/beta are in the fine-tune history and the model header
    weights = {"alpha": method.alpha, "beta": method.beta} if method.grid is None else {"grid": json.dumps([p.model_dump() for p in method.grid])}
    return {"method": method_name, "loss": method.loss, **weights,
            "constraint_set": method.constraint_set, "constraint_term": method.constraint_term,
            "train_attack": params.finetune.attack.label(), **{f"finetune.{k}": v for k, v in shared.items()}}


# ---------------------------------------------------------------- flip evaluation


def evaluate_method(params: Params, method_name: str, layout: Layout, tracker: Tracker | None = None) -> dict[str, Any]:
    """Attack a fine-tuned model afresh on validation and test; compare with the old model's cached outcomes."""
    if method_name not in params.finetune.methods:
        raise InputError(f"params.yaml: finetune.methods has no method {method_name!r}")
    device = _device(params)
    splits = {name: _split(layout, name) for name in EVALUATED_SPLITS}
    old_digest = _pipeline_model(layout, "old", params, "cpu").digest
    old_outcomes = load_cached_outcomes(layout, "old", splits, params.attack, old_digest)
    model = _pipeline_model(layout, method_name, params, device)
    outcomes = attack_model_on_splits(model, method_name, splits, params.attack, params.seed, device, params.engine)
    metrics, flips = _split_metrics(old_outcomes, outcomes, EVALUATED_SPLITS)
    out = layout.evaluation(method_name)
    provenance = {"attack_config": json.dumps(params.attack.identity(), sort_keys=True), "old_digest": old_digest, "candidate_digest": model.digest}
    write_parquet(out / "outcomes.parquet", outcomes, provenance)
    write_parquet(out / "flips.parquet", flips.assign(candidate=method_name), provenance)
    write_json(out / "metrics.json", metrics)
    _write_evaluation_evidence(params, layout, method_name, splits)
    if tracker is not None:
        with tracker.child(f"candidate:{method_name}", "candidate") as run:
            run.params(_method_params(params, method_name))
            run.metrics(metrics)
            run.artifact(out / "flips.parquet", "flips")
            run.table(flip_set(flips.assign(candidate=method_name)), f"flips/{method_name}.json")
    return metrics


def flip_set(flips: pd.DataFrame) -> pd.DataFrame:
    """The samples that flipped (any of the four flip columns) from a flip frame: the table logged to MLflow."""
    flipped = flips["negative_flip"] | flips["positive_flip"] | flips["robust_negative_flip"] | flips["robust_positive_flip"]
    return flips[flipped].reset_index(drop=True)


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


# ---------------------------------------------------------------- update decision


Evaluations = dict[str, dict[str, dict[str, Any] | None]]


def gather_evaluations(layout: Layout, candidates: list[str], *, split_digests: dict[str, str], attack_identity: dict[str, Any], seed: int,
                       num_classes: int) -> tuple[Evaluations, list[str], dict[str, dict[str, str]]]:
    """Each candidate's gate inputs per split, *recomputed* from its verified per-sample outcomes.

    Returns ``(evaluations, problems, evidence)``: ``evaluations[candidate][split]`` is the flip
    metrics against the old model plus :func:`rcat.decision.gate_figures` against the raw update
    (None where the candidate has no evaluation at all: a problem, and inadmissible);
    ``evidence[candidate]`` maps every file the figures rest on (path relative to ``layout.root``)
    to its SHA-256. An evaluation whose evidence does not hold raises
    :class:`~rcat.results.EvidenceError` (see :func:`rcat.results.verify_candidate`).
    """
    from rcat.decision import gate_figures
    from rcat.results import EVIDENCE_FILE

    present = [name for name in candidates if (layout.evaluation(name) / EVIDENCE_FILE).is_file() or (layout.evaluation(name) / "metrics.json").is_file()]
    problems = [f"{layout.evaluation(name)}: {name} was not evaluated (no evaluation found); run 'dvc repro'" for name in candidates if name not in present]
    _, verified = load_candidates(layout, present, split_digests=split_digests, attack_identity=attack_identity, seed=seed)
    if verified and num_classes < 1:
        raise InputError(f"{layout.manifest}: no num_classes, which the per-class rules need; rerun 'dvc repro prepare'")
    evaluations: Evaluations = {}
    for name in candidates:
        item = verified.get(name)
        if item is None:
            evaluations[name] = {split: None for split in EVALUATED_SPLITS}
            continue
        evaluations[name] = {}
        for split in EVALUATED_SPLITS:
            figures = gate_figures(item.flips[split], verified["new"].flips[split], num_classes) if "new" in verified else {}
            evaluations[name][split] = dict(item.metrics[split]) | figures
    root = layout.root.as_posix().rstrip("/") + "/"
    evidence = {name: {path[len(root):] if path.startswith(root) else path: digest for path, digest in item.files.items()}
                for name, item in verified.items()}
    return evaluations, problems, evidence


def _evaluation_inputs(params: Params, layout: Layout) -> tuple[dict[str, str], int, dict[str, int]]:
    """Split digests, class count and split sizes from the prepare stage's manifest (one-line errors when malformed)."""
    manifest = read_json(require(layout.manifest, "prepare"))
    try:
        digests = {split: str(manifest["splits"][split]["digest"]) for split in EVALUATED_SPLITS}
        expected = {split: int(manifest["splits"][split]["n_samples"]) for split in EVALUATED_SPLITS}
        num_classes = int(manifest.get("num_classes", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{layout.manifest}: malformed manifest (missing or bad {exc}); rerun 'dvc repro prepare'") from None
    return digests, num_classes, expected


def input_digests(params: Params, layout: Layout, evidence: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Digests of every input of the decision: data splits, models, params, code and attack config.

    ``models`` holds each candidate's *evaluated* model digest (from its evidence), so the registry
    registers a file only when it is byte for byte the one that was evaluated.
    """
    from rcat.safe_io import sha256_json

    digests: dict[str, Any] = {"params": sha256_json(params.model_dump(mode="json")), "attack_config": params.attack.identity(), "seed": params.seed}
    manifest = read_json(layout.manifest) if layout.manifest.is_file() else {"splits": {}}
    digests["data"] = {name: info["digest"] for name, info in manifest["splits"].items()}
    models: dict[str, str | None] = {"old": sha256_file(layout.model("old")) if layout.model("old").is_file() else None}
    for candidate in ("new", *params.finetune.methods):
        relative = layout.candidate_model(candidate).relative_to(layout.root).as_posix()
        models[candidate] = evidence.get(candidate, {}).get(relative)
    digests["models"] = models
    return digests


def decide(params: Params, layout: Layout, tracker: Tracker | None = None) -> dict[str, Any]:
    """Run the update gate over every candidate and write ``decision.json`` and the trade-off table.

    Every candidate is read through its evidence record and its metrics are recomputed from its
    per-sample outcomes (:func:`gather_evaluations`). Fails closed: a missing evaluation makes its
    candidate inadmissible; evidence that does not hold (a model file changed after its
    evaluation, an edited results file, an evaluation made with another attack, split or old
    model) writes a ``reject`` record naming it and raises :class:`~rcat.results.EvidenceError`,
    before the registry is touched.
    """
    from rcat.results import sign

    split_digests, num_classes, expected = _evaluation_inputs(params, layout)
    candidates = ["new", *params.finetune.methods]
    try:
        evaluations, problems, evidence = gather_evaluations(layout, candidates, split_digests=split_digests, attack_identity=params.attack.identity(),
                                                             seed=params.seed, num_classes=num_classes)
    except EvidenceError as exc:
        refused = {"verdict": "reject", "candidate": None, "reasons": [f"evidence check failed: {exc}"], "problems": [str(exc)],
                   "evidence_verified": False}
        write_json(layout.decision, sign(refused))
        raise
    record = decide_update(evaluations, params.decision, expected)
    record["problems"] = problems
    record["evidence_verified"] = True
    record["evidence"] = evidence
    record["inputs"] = input_digests(params, layout, evidence)
    record["inputs"]["code_revision"] = tracker.revision if tracker is not None else code_revision()
    record["inputs"]["library_versions"] = library_versions()
    # what the verdict was computed from, so that it can be replayed and audited (rcat decide --replay)
    record["replay"] = {"evaluations": evaluations, "expected_samples": expected, "decision_config": params.decision.model_dump(mode="json"),
                        "num_classes": num_classes}
    record = sign(record)
    write_json(layout.decision, record)
    _write_tradeoff(evaluations, layout.tradeoff)
    if tracker is not None:
        parent = tracker.parent()
        parent.tags({"rcat.verdict": record["verdict"], "rcat.candidate": record["candidate"] or "none", "rcat.reasons": " | ".join(record["reasons"])})
        parent.metrics({"decision/promote": 1.0 if record["verdict"] == "promote" else 0.0})
        parent.artifact(layout.decision)
        parent.artifact(layout.tradeoff)
        if tracker.enabled:
            parent.figure(_tradeoff_figure(evaluations), "plots/tradeoff.png")
            new_flips = layout.evaluation("new") / "flips.parquet"
            if new_flips.is_file():  # the fine-tuned candidates' tables are logged by their evaluate stage
                with tracker.child("candidate:new", "candidate") as run:
                    run.table(flip_set(read_parquet(new_flips)), "flips/new.json")
            from rcat.registry import register_update_check

            # after decision.json is written and logged: the registry only ever reflects a recorded decision
            register_update_check(tracker, params, layout, record)
        tracker.finish_parent()
    return record


def _tradeoff_figure(evaluations: dict[str, dict[str, dict[str, Any] | None]]) -> Any:
    """Robust accuracy against RNFR per candidate, one panel per evaluated split (the old model at RNFR 0)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state in a long-lived process

    figure = Figure(figsize=(5 * len(EVALUATED_SPLITS), 4), layout="constrained")
    for axis, split in zip(figure.subplots(1, len(EVALUATED_SPLITS), squeeze=False)[0], EVALUATED_SPLITS):
        reference = None
        for candidate, by_split in evaluations.items():
            metrics = by_split.get(split)
            if metrics is None:
                continue
            reference = metrics["robust_accuracy_old"]
            if metrics["rnfr"] is None or metrics["robust_accuracy_new"] is None:  # undefined (null in JSON): nothing to place
                continue
            axis.scatter(metrics["rnfr"], metrics["robust_accuracy_new"], label=candidate)
            axis.annotate(candidate, (metrics["rnfr"], metrics["robust_accuracy_new"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if reference is not None:
            axis.scatter([0.0], [reference], marker="x", color="black", label="old")
            axis.annotate("old", (0.0, reference), fontsize=8, xytext=(3, 3), textcoords="offset points")
        axis.set(title=split, xlabel="RNFR (robustness negative flip rate)", ylabel="robust accuracy")
        axis.grid(alpha=0.3)
    return figure


def _write_tradeoff(evaluations: dict[str, dict[str, dict[str, Any] | None]], path: Path) -> None:
    """One row per (candidate, split) with the figures a user trades off; the old model as reference."""
    columns = ["candidate", "split", "accuracy", "robust_accuracy", "nfr", "rnfr", "snfr"]
    rows = []
    for candidate, by_split in evaluations.items():
        for split, metrics in by_split.items():
            if metrics is None:
                continue
            if not any(row[0] == "old" and row[1] == split for row in rows):
                rows.append(["old", split, metrics["accuracy_old"], metrics["robust_accuracy_old"], 0.0, 0.0, 0.0])
            rows.append([candidate, split, metrics["accuracy_new"], metrics["robust_accuracy_new"], metrics["nfr"], metrics["rnfr"], metrics["snfr"]])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that change results or their records."""
    import importlib.metadata

    versions = {}
    for name in ("rcat", "torch", "torchattacks", "numpy", "mlflow", "dvc", "prefect"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _comparable(value: Any) -> Any:
    """JSON round trip with NaN as None: how a value reads back from decision.json."""
    from rcat.safe_io import _nan_to_none

    return json.loads(json.dumps(_nan_to_none(value), sort_keys=True, default=str))


def replay_decision(record: dict[str, Any], layout: Layout | None = None) -> dict[str, Any]:
    """Verify a decision record against the files it rests on and recompute its verdict from them.

    1. its signature (with ``RCAT_SIGNING_KEY`` set; a signed record needs the key);
    2. every evidence file it lists (paths relative to ``layout.root``, default ``data/``) still has
       its recorded SHA-256;
    3. the evaluations recomputed from those files' per-sample outcomes equal the record's;
    4. the verdict recomputed from them, with the record's gate config, equals the record's.

    Returns ``{"matches": bool, "verdict", "candidate", "recorded_verdict", "recorded_candidate",
    "signature"}``; ``matches`` is False only for step 4 (the gate's code changed). Raises
    :class:`~rcat.results.EvidenceError` for steps 1-3 (an edited record or an edited or missing
    file) and :class:`InputError` for a record without replay data.
    """
    from rcat.config import DecisionConfig
    from rcat.results import check_signature

    layout = layout or Layout()
    replay = record.get("replay") if isinstance(record, dict) else None
    if not isinstance(replay, dict) or not {"evaluations", "expected_samples", "decision_config"} <= replay.keys():
        raise InputError("decision record has no 'replay' section (written by an older rcat, or edited); rerun 'dvc repro decide'")
    signature = check_signature(record, "decision record")
    try:
        config = DecisionConfig.model_validate(replay["decision_config"])
    except ValueError as exc:
        raise InputError(f"decision record: replay.decision_config is invalid ({exc.__class__.__name__})") from exc
    evidence, inputs = record.get("evidence"), record.get("inputs")
    if not isinstance(evidence, dict) or not isinstance(inputs, dict) or not isinstance(replay["evaluations"], dict):
        raise InputError("decision record has no 'evidence' or 'inputs' section (written by an older rcat, or edited); rerun 'dvc repro decide'")
    for candidate, files in evidence.items():
        if not isinstance(files, dict):
            raise EvidenceError(f"decision record: evidence.{candidate} is not a map of files to digests (the record was edited)")
        for relative, digest in files.items():
            path = layout.root / relative
            if not path.is_file():
                raise EvidenceError(f"{path}: the decision rests on it, but it is missing; replay where the decision was made (or restore the file)")
            actual = sha256_file(path)
            if actual != digest:
                raise EvidenceError(f"{path}: SHA-256 {actual[:12]} differs from the {str(digest)[:12]} the decision recorded; "
                                    "the file changed after the decision")
    try:
        split_digests = {split: inputs["data"][split] for split in EVALUATED_SPLITS}
        attack_identity, seed, num_classes = inputs["attack_config"], int(inputs["seed"]), int(replay["num_classes"])
        expected = {split: int(replay["expected_samples"][split]) for split in EVALUATED_SPLITS}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"decision record: inputs or replay section malformed (missing {exc}); rerun 'dvc repro decide'") from None
    again_evaluations, _, again_evidence = gather_evaluations(layout, list(replay["evaluations"]), split_digests=split_digests,
                                                              attack_identity=attack_identity, seed=seed, num_classes=num_classes)
    if _comparable(again_evaluations) != _comparable(replay["evaluations"]):
        differing = sorted(name for name in again_evaluations if _comparable(again_evaluations[name]) != _comparable(replay["evaluations"].get(name)))
        raise EvidenceError(f"decision record: the evaluations it states for {', '.join(differing) or 'some candidate'} differ from those "
                            "recomputed from the per-sample outcomes (the record was edited)")
    if _comparable(again_evidence) != _comparable(evidence):
        raise EvidenceError("decision record: its evidence list differs from the files the evaluations rest on (the record was edited)")
    again = decide_update(again_evaluations, config, expected)
    matches = (again["verdict"], again["candidate"], again["reasons"]) == (record.get("verdict"), record.get("candidate"), record.get("reasons"))
    return {"matches": matches, "verdict": again["verdict"], "candidate": again["candidate"],
            "recorded_verdict": record.get("verdict"), "recorded_candidate": record.get("candidate"), "signature": signature}


def require_promotion(record: dict[str, Any]) -> None:
    """Raise :class:`UpdateRejected` unless the decision record promotes a candidate."""
    if record.get("verdict") != "promote" or not record.get("candidate"):
        raise UpdateRejected("update rejected: " + "; ".join(record.get("reasons") or ["no reason recorded"]))
