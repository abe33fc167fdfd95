"""The one adapter over torchattacks: build an attack from an :class:`AttackConfig`, run it, and
record per-sample outcomes as a tidy frame.

Conventions (what every caller can rely on):

* inputs are in [0, 1]; eps and step sizes are in the same units (normalisation is inside the model);
* the attacked model is put in eval mode during the attack and its mode restored afterwards
  (torchattacks' ``Attack.__call__`` does this);
* a sample is **robust** when it is classified correctly on clean input *and* on the adversarial
  point the attack returned: ``robust = clean_correct and adversarial_prediction == label``.
  Clean mistakes are non-robust without an attack, so they are not attacked (their adversarial
  point is the clean input);
* each batch runs under its own seed (``seed`` and the batch's first position), inside a forked
  RNG, so results do not depend on what ran before and the global RNG is left untouched;
* every adversarial point is checked to lie within eps of its input (Linf) and within [0, 1].
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterator

import pandas as pd
import torch
from torch import nn

from rcat.config import AttackConfig
from rcat.errors import InputError


def defer_scipy_stats() -> None:
    """Register ``scipy.stats`` with importlib's :class:`~importlib.util.LazyLoader`, unless it is imported already.

    torchattacks imports ``scipy.stats`` at import time for one attack rcat never builds (TI-FGSM's
    Gaussian kernel): about 1.2 s of a stage's 3.5-4.5 s of imports on 2 cores. The lazy module is
    the real one, executed in full on its first attribute access, so any later user of
    ``scipy.stats`` gets exactly what a plain import gives; only the cost moves to where it is used.
    """
    if "scipy.stats" in sys.modules:
        return
    spec = importlib.util.find_spec("scipy.stats")
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scipy.stats"] = module
    spec.loader.exec_module(module)
    # bound on its parent as the import system binds a submodule, so that `from scipy import stats` finds it
    # there (importing it by name would read its __spec__ and load it at once)
    sys.modules["scipy"].stats = module  # type: ignore[attr-defined]


defer_scipy_stats()
import torchattacks  # noqa: E402  (after deferring scipy.stats)

OUTCOME_COLUMNS = (
    "sample_index",
    "label",
    "clean_prediction",
    "adversarial_prediction",
    "clean_correct",
    "robust",
    "clean_margin",
    "adversarial_margin",
    "linf_distance",
    "split",
    "model",
    "model_digest",
    "split_digest",
    "attack",
    "attack_config",
)
"""Columns of a per-sample outcome frame, in order.

* ``clean_margin`` / ``adversarial_margin``: logit of the true class minus the largest other
  logit, on the clean / adversarial input (negative means misclassified); range (-inf, inf).
* ``linf_distance``: max |x_adv - x| over pixels, in [0, eps].
* ``model_digest``, ``split_digest``, ``attack_config`` (JSON): provenance of every row.
"""

_LINF_TOLERANCE = 1e-5


def build_attack(network: nn.Module, config: AttackConfig, num_classes: int, seed: int = 0) -> torchattacks.attack.Attack:
    """Instantiate the torchattacks attack that ``config`` names, bound to ``network``."""
    if config.is_ensemble:
        raise InputError(f"attack {config.label()} is an ensemble; it runs only as an evaluation attack (attack_outcomes), not as a single attack")
    if config.loss == "dlr" and num_classes < 3 and config.name == "apgd":
        raise InputError(f"attack.loss 'dlr' needs at least 3 classes (the data has {num_classes}); use loss: ce")
    if config.name in {"pgd", "fgsm", "fgsm_rs"} and config.loss != "ce":
        raise InputError(f"attack {config.name!r} supports only loss: ce in torchattacks (got {config.loss!r}); use name: apgd for DLR")
    eps = config.eps
    if config.name == "apgd":
        return torchattacks.APGD(network, norm=config.norm, eps=eps, steps=config.steps, n_restarts=config.restarts, seed=seed, loss=config.loss, rho=0.75)
    if config.name == "apgdt":
        return torchattacks.APGDT(network, norm=config.norm, eps=eps, steps=config.steps, n_restarts=config.restarts, seed=seed, n_classes=num_classes)
    if config.name == "pgd":
        step = config.step_size if config.step_size is not None else 2.5 * eps / config.steps
        return torchattacks.PGD(network, eps=eps, alpha=step, steps=config.steps, random_start=True)
    if config.name == "fgsm":
        return torchattacks.FGSM(network, eps=eps)
    if config.name == "fgsm_rs":
        # Wong et al.'s FGSM with random start: step 1.25*eps (the authors' code used an absolute
        # 1.25, which pushes every coordinate to the eps boundary: a bug we do not copy).
        step = config.step_size if config.step_size is not None else 1.25 * eps
        return torchattacks.FFGSM(network, eps=eps, alpha=step)
    if config.name == "fab":
        return torchattacks.FAB(network, norm=config.norm, eps=eps, steps=config.steps, n_restarts=config.restarts, seed=seed, n_classes=num_classes)
    if config.name == "fab_t":
        return torchattacks.FAB(network, norm=config.norm, eps=eps, steps=config.steps, n_restarts=config.restarts, seed=seed, n_classes=num_classes,
                                multi_targeted=True)
    if config.name == "square":
        return torchattacks.Square(network, norm=config.norm, eps=eps, n_queries=config.steps, n_restarts=config.restarts, seed=seed, loss="margin")
    raise InputError(f"attack.name {config.name!r} is not supported")


def training_attack(network: nn.Module, config: AttackConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """A function ``(images, labels, step_seed) -> adversarial images`` against ``network`` as it is now.

    Used inside training loops: the attack always targets the current weights, runs with the
    model in eval mode, and restores train mode (torchattacks does both).
    """
    attack = build_attack(network, config, num_classes)

    def perturb(images: torch.Tensor, labels: torch.Tensor, step_seed: int) -> torch.Tensor:
        with seeded(step_seed, images):
            return attack(images, labels).detach()

    return perturb


@contextlib.contextmanager
def seeded(seed: int, tensor: torch.Tensor) -> Iterator[None]:
    """Run the block under ``seed`` in a forked RNG (the caller's RNG state is restored after).

    On the CPU only the CPU generator is seeded: ``torch.manual_seed`` would also queue a seed for
    every other backend (formatting a stack trace each time while CUDA is not initialised, about
    1 ms per batch); the attack on a CPU tensor draws from the CPU generator only.
    """
    cuda = tensor.device.type == "cuda"
    with torch.random.fork_rng(devices=[tensor.device.index or 0] if cuda else []):
        if cuda:
            torch.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{k != y} z_k`` per row: positive iff the true class wins; range (-inf, inf)."""
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, labels[:, None], float("-inf"))
    return true_logit - others.max(dim=1).values


@torch.no_grad()
def _predict(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return network(images)


def attack_outcomes(
    network: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sample_index: torch.Tensor,
    config: AttackConfig,
    *,
    num_classes: int,
    seed: int,
    provenance: dict[str, str],
    device: torch.device | str = "cpu",
    return_adversarial: bool = False,
    position_offset: int = 0,
) -> pd.DataFrame | tuple[pd.DataFrame, torch.Tensor]:
    """Attack ``network`` on every sample (white-box, its own attack) and return one row per sample.

    ``provenance`` must hold ``split``, ``model``, ``model_digest`` and ``split_digest``; they are
    stored on every row together with the attack's label and JSON config.
    With ``return_adversarial`` the adversarial images (float32, on the CPU) are returned too.

    ``position_offset`` is the position of ``images[0]`` in the whole split: the batch starting
    at local position ``start`` runs under seed ``seed * 1_000_003 + position_offset + start``, so
    attacking a split in chunks (whose starts are multiples of ``batch_size``) gives the same rows
    as attacking it whole.

    With an ensemble config (``ensemble`` or ``preset``) the attacks run in order, each only on
    the samples every earlier attack failed to break; a row records the worst case (the first
    point that breaks the sample, else the point with the lowest margin) and the column
    ``broken_by`` names the attack that broke it ("" when none did or the sample is a clean mistake).
    """
    missing = {"split", "model", "model_digest", "split_digest"} - provenance.keys()
    if missing:
        raise ValueError(f"provenance is missing {sorted(missing)}")
    network.eval()
    members = config.members()
    attacks = [build_attack(network, member, num_classes, seed=seed) for member in members]
    member_labels = [member.label() for member in members]
    max_eps = config.max_eps
    rows: dict[str, list] = {name: [] for name in ("clean_logits", "adversarial_logits", "linf", "broken_by")}
    adversarial_batches: list[torch.Tensor] = []
    for start in range(0, len(labels), config.batch_size):
        x = images[start : start + config.batch_size].to(device)
        y = labels[start : start + config.batch_size].to(device)
        clean_logits = _predict(network, x)
        if not torch.isfinite(clean_logits).all():
            first = position_offset + start
            raise InputError(f"model {provenance['model']}: NaN or inf logits on {provenance['split']} samples {first}..{first + len(y) - 1}")
        correct = clean_logits.argmax(1) == y
        batch_seed = seed * 1_000_003 + position_offset + start
        if config.is_ensemble:
            x_adv, source = _ensemble_batch(network, attacks, member_labels, x, y, correct, batch_seed)
        else:
            x_adv = x.clone()
            if correct.any():
                with seeded(batch_seed, x):
                    x_adv[correct] = attacks[0](x[correct], y[correct]).detach()
        adversarial_logits = _predict(network, x_adv)
        linf = (x_adv - x).abs().flatten(1).amax(1)
        if float(linf.max()) > max_eps + _LINF_TOLERANCE or float(x_adv.min()) < 0.0 or float(x_adv.max()) > 1.0:
            raise RuntimeError(f"attack {config.label()} returned points outside the eps-ball or [0, 1]; this is a bug in the attack backend")
        rows["clean_logits"].append(clean_logits.cpu())
        rows["adversarial_logits"].append(adversarial_logits.cpu())
        rows["linf"].append(linf.cpu())
        if config.is_ensemble:
            # who broke it, judged on the stored point itself, so that broken_by != "" exactly when robust is False
            fooled = (adversarial_logits.argmax(1) != y) & correct
            rows["broken_by"].extend(label if hit else "" for label, hit in zip(source, fooled.tolist()))
        if return_adversarial:
            adversarial_batches.append(x_adv.cpu())
    clean_logits = torch.cat(rows["clean_logits"])
    adversarial_logits = torch.cat(rows["adversarial_logits"])
    labels_cpu = labels.cpu()
    clean_prediction = clean_logits.argmax(1)
    adversarial_prediction = adversarial_logits.argmax(1)
    clean_correct = clean_prediction == labels_cpu
    columns = list(OUTCOME_COLUMNS) + (["broken_by"] if config.is_ensemble else [])
    data = {
        "sample_index": sample_index.cpu().numpy().astype("int64"),
        "label": labels_cpu.numpy().astype("int64"),
        "clean_prediction": clean_prediction.numpy().astype("int64"),
        "adversarial_prediction": adversarial_prediction.numpy().astype("int64"),
        "clean_correct": clean_correct.numpy(),
        "robust": (clean_correct & (adversarial_prediction == labels_cpu)).numpy(),
        "clean_margin": logit_margin(clean_logits, labels_cpu).numpy(),
        "adversarial_margin": logit_margin(adversarial_logits, labels_cpu).numpy(),
        "linf_distance": torch.cat(rows["linf"]).numpy(),
        "split": provenance["split"],
        "model": provenance["model"],
        "model_digest": provenance["model_digest"],
        "split_digest": provenance["split_digest"],
        "attack": config.label(),
        "attack_config": json.dumps(config.identity(), sort_keys=True),
    }
    if config.is_ensemble:
        data["broken_by"] = rows["broken_by"]
    frame = pd.DataFrame(data, columns=columns)
    if return_adversarial:
        return frame, torch.cat(adversarial_batches)
    return frame


ENSEMBLE_COLUMNS = (*OUTCOME_COLUMNS, "broken_by")
"""Columns of an ensemble's outcome frame: :data:`OUTCOME_COLUMNS` plus ``broken_by``."""

_MEMBER_SEED_STRIDE = 1_000_000_007


def _ensemble_batch(network: nn.Module, attacks: list, member_labels: list[str], x: torch.Tensor, y: torch.Tensor,
                    correct: torch.Tensor, batch_seed: int) -> tuple[torch.Tensor, list[str]]:
    """Run the ensemble's attacks in order on one batch; each only on the samples still robust.

    Returns the worst-case points (the breaking point where an attack succeeded, else the point of
    lowest margin over the attacks that ran; the clean input for clean mistakes) and, per sample,
    the label of the attack whose point is kept ("" where none ran).
    """
    x_adv = x.clone()
    source = [""] * len(y)
    remaining = correct.clone()
    best_margin = torch.full((len(y),), float("inf"), device=x.device)
    for k, (attack, label) in enumerate(zip(attacks, member_labels)):
        if not remaining.any():
            break
        index = remaining.nonzero().squeeze(1)
        with seeded(batch_seed + k * _MEMBER_SEED_STRIDE, x):
            candidate = attack(x[index], y[index]).detach()
        logits = _predict(network, candidate)
        margin = logit_margin(logits, y[index])
        broken = logits.argmax(1) != y[index]
        better = broken | (margin < best_margin[index])
        x_adv[index[better]] = candidate[better]
        best_margin[index[better]] = margin[better]
        for position in index[better].tolist():
            source[position] = label
        remaining[index[broken]] = False
    return x_adv, source
