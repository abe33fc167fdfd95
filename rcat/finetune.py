"""Training loops: adversarial training from scratch (the embedded default's old and new models)
and constrained fine-tuning (AT, PCT, PCT-AT, RCAT).

Both follow the authors' protocol: SGD with momentum, no weight decay, no schedule, no
augmentation, the last epoch's weights kept. The training attack is crafted against the *current*
weights at every step (FGSM with random start by default; PGD-k selectable), with the model in
eval mode while attacking (torchattacks switches and restores it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rcat.attacks import training_attack
from rcat.config import AttackConfig, FinetuneConfig, MethodConfig, TrainConfig
from rcat.data import Split
from rcat.errors import TrainingFailed
from rcat.losses import LossTerms, at_loss, pct_loss, rcat_loss
from rcat.pixels import as_float_images

EpochCallback = Callable[[int, dict[str, float]], None]
"""Called after each epoch with its number (from 1) and the epoch's mean loss terms and training accuracy."""
BatchCallback = Callable[[int, dict[str, float]], None]
"""Called after each optimiser step with the batch's size and its loss terms and training accuracy."""

ADVERSARIAL_LOSSES = {"at", "pct_at", "rcat"}


@dataclass
class TrainingHistory:
    """Per-epoch means of the loss terms and of accuracy on the inputs the loss saw."""

    epochs: list[dict[str, float]] = field(default_factory=list)


def _epochs(
    network: nn.Module,
    split: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
    device: torch.device,
    step: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], tuple[LossTerms, torch.Tensor]],
    on_epoch: EpochCallback | None,
    on_batch: BatchCallback | None = None,
    augment: str = "none",
    lr_schedule: str = "constant",
    weight_decay: float = 0.0,
    label: str = "training",
) -> TrainingHistory:
    """The shared loop: seeded shuffling, optional augmentation, SGD steps (optionally on a cosine
    schedule), per-epoch averages."""
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    # a separate stream, so that turning augmentation on does not change the shuffling order
    augment_generator = torch.Generator().manual_seed(seed + 7_919)
    total_steps = max(1, epochs * math.ceil(len(split) / batch_size))
    history = TrainingHistory()
    step_index = 0
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(split), generator=generator)
        sums: dict[str, float] = {}
        seen = 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x = as_float_images(split.images[batch])  # 8-bit pixels: converted a batch at a time
            if augment == "crop_flip":
                x = crop_flip(x, augment_generator)
            x = x.to(device)
            y = split.labels[batch].to(device)
            if lr_schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step_index / total_steps))
            terms, logits = step(x, y, seed * 1_000_003 + step_index, batch)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            step_index += 1
            values = terms.as_floats() | {"train_accuracy": float((logits.argmax(1) == y).float().mean())}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value * len(batch)
            seen += len(batch)
            if on_batch is not None:
                on_batch(len(batch), values)
        summary = {key: value / seen for key, value in sums.items()}
        if not math.isfinite(summary["loss"]):
            raise TrainingFailed(f"{label}: training diverged at epoch {epoch + 1} of {epochs} (mean loss {summary['loss']}); "
                                 f"lower the learning rate (lr {lr:g})")
        history.epochs.append(summary)
        if on_epoch is not None:
            on_epoch(epoch + 1, summary)
    network.eval()
    if history.epochs:
        _require_learning(history.epochs[-1], split, label, epochs, lr)
    return history


CHANCE_MARGIN = 0.01
"""How far above a constant predictor a run's last epoch must be to count as having learned."""


def _require_learning(last: dict[str, float], split: Split, label: str, epochs: int, lr: float) -> None:
    """Fail a run whose last epoch is no better than predicting the most frequent class.

    A constant predictor scores the majority class's share of the training labels; a run whose
    mean training accuracy in its last epoch is within :data:`CHANCE_MARGIN` of that has learned
    nothing (e.g. ``lr: 1e6`` gives a loss of 1e26 and a constant prediction), and its robust
    accuracy would equal its accuracy for the wrong reason.
    """
    counts = torch.bincount(split.labels, minlength=split.num_classes)
    majority = float(counts.max()) / max(1, len(split))
    accuracy = last.get("train_accuracy", math.nan)
    if not accuracy > majority + CHANCE_MARGIN:
        raise TrainingFailed(f"{label}: training accuracy in the last epoch ({epochs}) is {accuracy:.3f}, no better than always predicting "
                             f"the most frequent class ({majority:.3f}); the run learned nothing: lower the learning rate (lr {lr:g}), "
                             "train longer, or warm the training attack up (attack_warmup_epochs)")


def crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random shifts of up to ``pad`` pixels (zero padding, crop back to size) and left-right
    mirroring with probability 1/2, per image; ``images`` is (N, C, H, W), values are kept as they are."""
    count, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (count,), generator=generator).tolist()
    cols = torch.randint(0, 2 * pad + 1, (count,), generator=generator).tolist()
    flips = (torch.rand(count, generator=generator) < 0.5).tolist()
    out = torch.empty_like(images)
    for index in range(count):
        crop = padded[index, :, rows[index] : rows[index] + height, cols[index] : cols[index] + width]
        out[index] = crop.flip(-1) if flips[index] else crop
    return out


def warmed_up(attack: AttackConfig, fraction: float) -> AttackConfig:
    """``attack`` at ``fraction`` of its eps (and of its step size, when one is set)."""
    update: dict[str, float] = {"eps": attack.eps * fraction}
    if attack.step_size is not None:
        update["step_size"] = attack.step_size * fraction
    return attack.model_copy(update=update)


def adversarial_train(network: nn.Module, split: Split, config: TrainConfig, device: torch.device, on_epoch: EpochCallback | None = None,
                      label: str = "training", on_batch: BatchCallback | None = None) -> TrainingHistory:
    """Adversarial training from scratch: CE on the training attack's points (Madry et al. with PGD by default)."""
    network.to(device)
    steps_per_epoch = math.ceil(len(split) / config.batch_size)
    warmup = config.attack_warmup_epochs
    # one attack per warm-up epoch (eps * e / N), then the configured one
    attacks = [training_attack(network, warmed_up(config.attack, (epoch + 1) / warmup), split.num_classes) for epoch in range(warmup)]
    attacks.append(training_attack(network, config.attack, split.num_classes))
    steps_taken = [0]

    def step(x: torch.Tensor, y: torch.Tensor, step_seed: int, positions: torch.Tensor) -> tuple[LossTerms, torch.Tensor]:
        perturb = attacks[min(steps_taken[0] // steps_per_epoch, warmup)]
        steps_taken[0] += 1
        logits = network(perturb(x, y, step_seed))
        return at_loss(logits, y), logits

    return _epochs(
        network, split, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
        seed=config.seed, device=device, step=step, on_epoch=on_epoch, on_batch=on_batch,
        augment=config.augment, lr_schedule=config.lr_schedule, weight_decay=config.weight_decay, label=label,
    )


def constraint_weights(old_robust: torch.Tensor, labels: torch.Tensor, constraint_set: str, seed: int) -> torch.Tensor:
    """Per-sample weights of RCAT's beta term for a constraint set read from the attack cache.

    ``attack_cache``: the old model's robust flags themselves (0/1). ``class_reweighted``: every
    sample of class c weighs r_c / n_c (r_c robust among the n_c samples of class c), the same
    expected class emphasis on no particular samples. ``random_class_matched``: 0/1 flags on a
    random subset with r_c samples of each class c, drawn with ``seed``. Shape ``(N,)``, values in [0, 1].
    """
    robust = old_robust.to(torch.bool)
    if constraint_set == "attack_cache":
        return robust.to(torch.float32)
    labels = labels.to(torch.long)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float32)
    robust_counts = torch.bincount(labels[robust], minlength=num_classes).to(torch.float32)
    if constraint_set == "class_reweighted":
        return (robust_counts / counts.clamp(min=1.0))[labels]
    if constraint_set == "random_class_matched":
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.zeros(len(labels), dtype=torch.float32)
        for c in range(num_classes):
            members = torch.nonzero(labels == c).flatten()
            picked = members[torch.randperm(len(members), generator=generator)[: int(robust_counts[c])]]
            chosen[picked] = 1.0
        return chosen
    raise ValueError(f"constraint_set {constraint_set!r} is not read from the attack cache")


def finetune(
    new_network: nn.Module,
    old_network: nn.Module,
    split: Split,
    config: FinetuneConfig,
    method: MethodConfig,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    old_robust: torch.Tensor | None = None,
    label: str = "fine-tuning",
    on_batch: BatchCallback | None = None,
) -> tuple[nn.Module, TrainingHistory]:
    """Fine-tune a copy of ``new_network`` with ``method``'s loss; ``old_network`` and a frozen copy
    of the new network provide the reference logits. Returns the fine-tuned network (eval mode).

    ``config`` is the shared fine-tune section; ``method``'s own ``epochs`` / ``lr`` /
    ``train_eps`` override it. ``old_robust`` (bool, one per sample of ``split``, in its order) is
    the old model's robust flag from the baseline attack cache; RCAT with a constraint set read
    from the cache (:data:`rcat.config.CACHE_CONSTRAINT_SETS`) needs it.
    """
    config = config.for_method(method)
    weights = None
    if method.uses_attack_cache:
        if old_robust is None or old_robust.shape != (len(split),):
            raise ValueError(f"constraint_set {method.constraint_set!r} needs the old model's robust flag for every fine-tune sample")
        weights = constraint_weights(old_robust, split.labels, method.constraint_set, config.seed)
    network = copy.deepcopy(new_network).to(device)
    frozen_new = copy.deepcopy(new_network).to(device).eval().requires_grad_(False)
    old_network = old_network.to(device).eval().requires_grad_(False)
    perturb = training_attack(network, config.attack, split.num_classes) if method.loss in ADVERSARIAL_LOSSES else None

    def step(x: torch.Tensor, y: torch.Tensor, step_seed: int, positions: torch.Tensor) -> tuple[LossTerms, torch.Tensor]:
        inputs = perturb(x, y, step_seed) if perturb is not None else x
        logits = network(inputs)
        if method.loss == "at":
            return at_loss(logits, y), logits
        with torch.no_grad():
            old_logits = old_network(inputs)
        if method.loss in {"pct", "pct_at"}:
            return pct_loss(logits, old_logits, y, method.alpha, method.beta, distance_reduction=method.distance), logits
        with torch.no_grad():
            new0_logits = frozen_new(inputs)
        mask = weights[positions].to(device) if weights is not None else None
        terms = rcat_loss(logits, old_logits, new0_logits, y, method.alpha, method.beta, constraint_mask=mask,
                          constraint_term=method.constraint_term, distance_reduction=method.distance, margin=method.margin)
        return terms, logits

    history = _epochs(
        network, split, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
        seed=config.seed, device=device, step=step, on_epoch=on_epoch, on_batch=on_batch, label=label,
        augment=config.augment, lr_schedule=config.lr_schedule, weight_decay=config.weight_decay,
    )
    return network, history
