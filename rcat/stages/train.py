"""Stages ``train_old`` / ``train_new``: train the embedded default's models, or import the user's."""

from __future__ import annotations

from pathlib import Path

from rcat.config import Params
from rcat.data import subsample
from rcat.errors import InputError
from rcat.finetune import adversarial_train
from rcat.models import FACTORY_PREFIX, TORCHSCRIPT_PREFIX, ModelSpec, check_model_on, load_model_reference, save_model
from rcat.results import Layout
from rcat.runtime import seed_everything
from rcat.safe_io import sha256_file, write_json
from rcat.stages.common import epoch_logger, stage_device, stage_split
from rcat.tracking import Tracker, tracking_uri


def train(params: Params, role: str, layout: Layout, tracker: Tracker | None = None) -> str:
    """Adversarially train the embedded default's ``old`` or ``new`` model from scratch."""
    if role not in {"old", "new"}:
        raise InputError(f"train role {role!r}: use 'old' or 'new'")
    config = params.train_old if role == "old" else params.train_new
    device = stage_device(params)
    seed_everything(config.seed)
    if config.reference is not None:
        return import_model(params, role, layout, tracker)
    split = subsample(stage_split(layout, "finetune"), config.data_fraction, config.seed)
    normalization = None if config.normalization is None else (tuple(config.normalization.mean), tuple(config.normalization.std))
    spec = ModelSpec(config.architecture, tuple(split.images.shape[1:]), split.num_classes, dict(config.architecture_kwargs), normalization)
    network = spec.build()
    curves: list[tuple[int, dict[str, float]]] = []
    progress = epoch_logger(f"train_{role}", config.epochs, len(split), curves)
    history = adversarial_train(network, split, config, device, on_epoch=progress, label=f"stage train_{role}", on_batch=progress.on_batch)
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
    if reference == "champion":
        from rcat.registry import read_champion_pin

        reference = read_champion_pin()  # models:/<name>/<version>, pinned in rcat-champion.json (a dep of this stage)
    if reference.startswith(TORCHSCRIPT_PREFIX):
        raise InputError(f"params.yaml: train_{role}.reference {reference!r}: TorchScript models can be evaluated "
                         "('rcat evaluate') but not fine-tuned; export a state dict and use 'factory:module:callable@WEIGHTS'")
    split = stage_split(layout, "finetune")
    normalization = None if config.normalization is None else (tuple(config.normalization.mean), tuple(config.normalization.std))
    try:
        model = load_model_reference(reference, "cpu", num_classes=split.num_classes, input_shape=tuple(split.images.shape[1:]),
                                     normalization=normalization, trusted_factories=params.trusted_factories(),
                                     tracking_uri=tracking_uri(params.tracking))  # models:/ from the project's own store
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

