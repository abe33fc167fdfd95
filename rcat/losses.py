"""Fine-tuning losses: AT, PCT, PCT-AT and RCAT, as in the authors' code (see
``shared/reference/rcat-method.md`` section 2), with its pitfalls fixed.

Notation for one minibatch B of size |B|, C classes:

* ``z = f(x')``: logits of the model being fine-tuned on its input x' (clean x for PCT, the
  adversarial x~ of the *current* model for AT, PCT-AT and RCAT);
* ``z_old = f_old(x')``, ``z_new0 = f_new0(x')``: logits of the old model and of the frozen
  pre-fine-tuning new model on the same input (computed without gradients);
* ``D(a, b) = (1 / (2C)) * sum_k (a_k - b_k)^2``: half the mean squared logit difference. The
  1/C scale (a mean over classes, not a sum) is the authors' choice; we keep it so that their
  alpha/beta values mean the same here.

Losses (all reduce to a scalar):

* ``at``     = CE(z, y), batch mean.
* ``pct``    = CE(z, y) + alpha * mean_B D(z, z_old) + beta * (1/|B|) sum_B 1[old correct] D(z, z_old),
  on clean inputs (Yan et al.'s focal distillation, logit-matching variant; normalised by |B|).
* ``pct_at`` = the same expression on adversarial inputs.
* ``rcat``   = (1 - alpha - beta) CE(z, y) + alpha * mean_{i in N} D(z_i, z_new0_i)
  + beta * mean_{i in O} D(z_i, z_old_i), with O = {old model correct on x~}, N = {frozen new
  model correct on x~}. The masked means divide by max(|O|, 1) and max(|N|, 1): the authors'
  code divides by |O| and returns NaN on a batch where the mask is empty.
  The beta term's penalty can be replaced (``constraint_term``): ``new_error`` puts the per-sample
  CE(z_i, y_i) there, ``margin_hinge`` the hinge ``max(0, kappa - (z_y - max_{j != y} z_j))`` on
  the logit margin (:func:`margin_hinge`).

With alpha = beta = 0, ``rcat`` equals ``at`` exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


def logit_distance(logits: torch.Tensor, reference: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-sample ``D(a, b) = mean_k (a_k - b_k)^2 / 2`` (``reduction="mean"``, the authors') or
    ``sum_k (a_k - b_k)^2 / 2`` (``"sum"``, C times larger); shape ``(N,)``, range [0, inf)."""
    squared = (logits - reference).pow(2)
    if reduction == "mean":
        return squared.mean(dim=1) / 2
    if reduction == "sum":
        return squared.sum(dim=1) / 2
    raise ValueError(f"distance reduction {reduction!r}: use 'mean' or 'sum'")


def margin_hinge(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-sample ``max(0, kappa - (z_y - max_{j != y} z_j))`` with ``kappa = margin``; shape ``(N,)``, range [0, inf).

    Zero once the true class leads every other logit by ``margin`` or more: unlike cross-entropy
    it stops pushing a sample that is already classified with that margin, so it asks only for
    what a robustness regression is about (the sample stays on the right side of the boundary).
    """
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return F.relu(margin - (true_logit - others.max(dim=1).values))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i values_i / sum_i w_i`` for a boolean mask or weights ``w`` in [0, 1]: the mean
    over the mask for a boolean one; 0 (not NaN) when every weight is 0."""
    weights = mask.to(values.dtype)
    total = weights.sum()
    return (values * weights).sum() / torch.where(total > 0, total, torch.ones_like(total))


@dataclass(frozen=True)
class LossTerms:
    """The scalar loss and its parts, for logging (each already multiplied by its weight)."""

    total: torch.Tensor
    cross_entropy: torch.Tensor
    distill_new: torch.Tensor
    distill_old: torch.Tensor
    constrained_fraction: float

    def as_floats(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_cross_entropy": float(self.cross_entropy.detach()),
            "loss_distill_new": float(self.distill_new.detach()),
            "loss_distill_old": float(self.distill_old.detach()),
            "constrained_fraction": self.constrained_fraction,
        }


def at_loss(logits: torch.Tensor, labels: torch.Tensor) -> LossTerms:
    """Adversarial fine-tuning: batch-mean cross-entropy on adversarial inputs."""
    ce = F.cross_entropy(logits, labels)
    zero = ce.new_zeros(())
    return LossTerms(ce, ce, zero, zero, 0.0)


def pct_loss(logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float, *,
             distance_reduction: str = "mean") -> LossTerms:
    """Focal distillation (PCT): CE + alpha * mean_B D + beta * (1/|B|) sum 1[old correct] D.

    Used on clean inputs for ``pct`` and on adversarial inputs for ``pct_at``.
    """
    old_logits = old_logits.detach()  # a fixed target: no gradient may reach the old model
    ce = F.cross_entropy(logits, labels)
    distance = logit_distance(logits, old_logits, distance_reduction)
    old_correct = old_logits.argmax(1) == labels
    all_term = alpha * distance.mean()
    focal_term = beta * (distance * old_correct.to(distance.dtype)).mean()
    return LossTerms(ce + all_term + focal_term, ce, logits.new_zeros(()), all_term + focal_term, float(old_correct.float().mean()))


def rcat_loss(
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    new0_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    *,
    constraint_mask: torch.Tensor | None = None,
    constraint_term: str = "distill",
    distance_reduction: str = "mean",
    margin: float = 1.0,
) -> LossTerms:
    """RCAT: (1-alpha-beta) CE + alpha * mean_N D(z, z_new0) + beta * mean_O penalty.

    N (frozen new model correct) is computed on the adversarial input the loss sees. O is, by
    default, the paper's proxy: the old model is correct on that same input; ``constraint_mask``
    replaces it (e.g. the old model's robust flags from the baseline attack cache; boolean, or
    weights in [0, 1] for a weighted mean, as the class-reweighted control uses). The penalty is
    ``D(z, z_old)`` (``distill``, the paper) or the per-sample cross-entropy ``CE(z_i, y_i)``
    (``new_error``; ``focal_ce`` is its former name). The latter has no term toward the old
    model's logits: it is Bansal et al.'s "new-error" loss (AAAI 2019; BackwardCompatibilityML's
    ``new_error`` loss: cross-entropy up-weighted on the samples the old model got right), here on
    adversarial inputs and on the old model's robust set; or the margin hinge (``margin_hinge``,
    :func:`margin_hinge` with ``kappa = margin``). Denominators are clamped to at least 1.
    """
    old_logits, new0_logits = old_logits.detach(), new0_logits.detach()  # fixed targets
    ce = F.cross_entropy(logits, labels)
    constrained = old_logits.argmax(1) == labels if constraint_mask is None else constraint_mask
    new0_correct = new0_logits.argmax(1) == labels
    distill_new = alpha * masked_mean(logit_distance(logits, new0_logits, distance_reduction), new0_correct)
    if constraint_term == "distill":
        penalty = logit_distance(logits, old_logits, distance_reduction)
    elif constraint_term in {"new_error", "focal_ce"}:
        penalty = F.cross_entropy(logits, labels, reduction="none")
    elif constraint_term == "margin_hinge":
        penalty = margin_hinge(logits, labels, margin)
    else:
        raise ValueError(f"constraint_term {constraint_term!r}: use 'distill', 'new_error' or 'margin_hinge'")
    distill_old = beta * masked_mean(penalty, constrained)
    ce_term = (1.0 - alpha - beta) * ce
    return LossTerms(ce_term + distill_new + distill_old, ce_term, distill_new, distill_old, float(constrained.float().mean()))
