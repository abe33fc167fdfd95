"""Stage ``finetune@<method>``: constrained fine-tuning of the new model, one method (or its grid)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from rcat.config import MethodConfig, Params
from rcat.data import Split
from rcat.decision import best_grid_point
from rcat.errors import InputError
from rcat.executors import executor_for
from rcat.finetune import finetune
from rcat.models import LoadedModel, check_model_on, save_model, weights_digest
from rcat.results import Layout
from rcat.runtime import seed_everything
from rcat.safe_io import write_json
from rcat.stages.attacking import attack_model_on_splits
from rcat.stages.common import epoch_logger, load_cached_outcomes, split_metrics, stage_device, stage_model, stage_split
from rcat.stages.records import method_params
from rcat.tracking import Tracker


def finetune_method(params: Params, method_name: str, layout: Layout, tracker: Tracker | None = None) -> str:
    """Fine-tune the new model with one configured method; write the model and its training curves."""
    methods = params.finetune.methods
    if method_name not in methods:
        raise InputError(f"params.yaml: finetune.methods has no method {method_name!r} (configured: {', '.join(methods)})")
    method = methods[method_name]
    device = stage_device(params)
    seed_everything(params.finetune.seed)
    split = stage_split(layout, "finetune")
    old = stage_model(layout, "old", params, device)
    new = stage_model(layout, "new", params, device)
    for model in (old, new):
        check_model_on(model, split.images, split.num_classes, "the fine-tune split")
    old_robust = None
    if method.uses_attack_cache:
        # the constraint set from the baseline attack cache: samples the old model's own attack failed on
        cached = load_cached_outcomes(layout, "old", {"finetune": split}, params.attack, old.digest).set_index("sample_index")
        old_robust = torch.tensor(cached.loc[split.sample_index.numpy(), "robust"].to_numpy(dtype=bool))
    grid: list[dict[str, Any]] | None = None
    if method.grid is None:
        chosen = method
        curves: list[tuple[int, dict[str, float]]] = []
        progress = epoch_logger(f"finetune@{method_name}", params.finetune.for_method(method).epochs, len(split), curves)
        network, history = finetune(new.network, old.network, split, params.finetune, method, device, on_epoch=progress,
                                    old_robust=old_robust, label=f"stage finetune@{method_name}", on_batch=progress.on_batch)
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
        # its own run, not the candidate's: every candidate run (new included) then has the same metric keys
        with tracker.child(f"finetune:{method_name}", "stage") as run:
            run.params(method_params(params, method_name))
            for epoch, values in curves:
                run.metrics({f"train/{k}": v for k, v in values.items()}, step=epoch)
            run.tags({"rcat.weights_digest": digest})
            run.artifact(layout.finetuned(method_name), "model")
    return digest


def _grid_point(shared: tuple[Any, ...], index: int) -> tuple[int, dict[str, torch.Tensor], Any, list, dict[str, Any]]:
    """One grid point, wherever the executor runs it: fine-tune from the shared start, attack on validation.

    Returns ``(index, state dict, history, curves, validation metrics)``. Module-level, so that a
    worker process imports it; the validation attack runs in the worker itself (serially), never
    on a pool of its own.
    """
    params, method_name, points, new, old, split, validation, old_outcomes, old_robust, device = shared
    point = points[index]
    seed_everything(params.finetune.seed)
    curves: list[tuple[int, dict[str, float]]] = []
    progress = epoch_logger(f"finetune@{method_name} point {index}", params.finetune.for_method(point).epochs, len(split), curves)
    network, history = finetune(new.network, old.network, split, params.finetune, point, device, on_epoch=progress,
                                old_robust=old_robust, label=f"stage finetune@{method_name} (grid point {index})", on_batch=progress.on_batch)
    candidate = LoadedModel(network, new.spec, weights_digest(network), f"{method_name} grid point {index}")
    serial_engine = params.engine.model_copy(update={"workers": 1, "dask_address": None})
    outcomes = attack_model_on_splits(candidate, method_name, validation, params.attack, params.seed, device, serial_engine)
    metrics, _ = split_metrics(old_outcomes, outcomes, ("validation",))
    return index, {k: v.cpu() for k, v in network.state_dict().items()}, history, curves, metrics["validation"]


def _search_grid(params: Params, layout: Layout, method_name: str, method: MethodConfig, new: LoadedModel, old: LoadedModel, split: Split,
                 device: torch.device, old_robust: torch.Tensor | None) -> tuple[MethodConfig, torch.nn.Module, Any, list, list[dict[str, Any]], bool]:
    """Fine-tune once per grid point, attack each result on the validation split, keep the lowest
    S-NFR among the points that keep the new model's accuracy and robust accuracy within
    ``decision.rules``' drop limits (:func:`rcat.decision.best_grid_point`); the last value says
    whether any point did.

    Each point starts from the same weights and seed, so the points differ only in their settings.
    The points run on the attack engine's executor (``engine.workers`` / ``engine.dask_address``,
    :mod:`rcat.executors`): one after another in this process by default, or one per worker (one
    torch thread each). Every point is computed the same way wherever it runs, so the selected
    point and its weights equal a serial run's at the same torch thread count (oneDNN reduces in
    a thread-count dependent order: 1-thread workers match a 1-thread serial run bit for bit).
    Selection reads the validation split only (see :func:`rcat.decision.best_grid_point`); the
    test split stays untouched until the evaluate stage. The engine caches the validation attack
    of the kept model, so the evaluate stage does not repeat it.
    """
    validation = {"validation": stage_split(layout, "validation")}
    old_outcomes = load_cached_outcomes(layout, "old", validation, params.attack, old.digest)
    points = method.points()
    shared = (params, method_name, points, new, old, split, validation, old_outcomes, old_robust, device)
    results: dict[int, tuple] = {}
    with executor_for(params.engine.workers, params.engine.dask_address) as executor:
        for _, (index, state, history, curves, metrics) in executor.map_unordered(_grid_point, shared, list(range(len(points)))):
            results[index] = (state, history, curves, metrics)
    trials = []
    for index, point in enumerate(points):
        state, history, curves, metrics = results[index]
        network = copy.deepcopy(new.network)  # the same architecture (a user's factory model included), the point's weights
        network.load_state_dict(state)
        trials.append((point, network.to(device).eval(), history, curves, metrics))
    new_metrics, _ = split_metrics(old_outcomes, load_cached_outcomes(layout, "new", validation, params.attack, new.digest), ("validation",))
    kept, within_limits = best_grid_point([trial[4] for trial in trials], new_metrics["validation"], params.decision.rules)
    if not within_limits:
        warnings.warn(f"finetune@{method_name}: no grid point keeps validation accuracy and robust accuracy within "
                      f"decision.rules' limits of the new model's; kept point {kept}, the one closest to them, which the gate will reject",
                      RuntimeWarning, stacklevel=2)
    grid = [{"alpha": point.alpha, "beta": point.beta, "epochs": point.epochs, "lr": point.lr, "train_eps": point.train_eps,
             "selected": index == kept, "validation": metrics}
            for index, (point, *_, metrics) in enumerate(trials)]
    point, network, history, curves, _ = trials[kept]
    return point, network, history, curves, grid, within_limits
