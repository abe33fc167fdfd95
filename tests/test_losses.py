"""Fine-tuning losses against formulas written out in the test, masks, normalisation, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from rcat.losses import at_loss, logit_distance, masked_mean, pct_loss, rcat_loss


def D(a: torch.Tensor, b: torch.Tensor) -> float:
    """D(a, b) = (1 / (2C)) * sum_k (a_k - b_k)^2 for one sample, in plain Python."""
    values_a, values_b = a.tolist(), b.tolist()
    return sum((x - y) ** 2 for x, y in zip(values_a, values_b)) / (2 * len(values_a))


def CE(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Batch-mean cross-entropy, in plain Python (log-sum-exp per row)."""
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[label]
    return total / len(labels)


def test_logit_distance_matches_formula():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    b = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
    # row 0: (0 + 4 + 9) / 6 = 13/6 ; row 1: (4 + 4 + 16) / 6 = 4
    assert logit_distance(a, b).tolist() == pytest.approx([13 / 6, 4.0])
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=generator), torch.randn(7, 5, generator=generator)
    expected = [D(x[i], y[i]) for i in range(7)]
    assert logit_distance(x, y).shape == (7,)
    assert logit_distance(x, y).tolist() == pytest.approx(expected, rel=1e-6)
    assert logit_distance(x, x).abs().max() == 0.0
    assert torch.allclose(logit_distance(x, y), logit_distance(y, x))


def test_masked_mean_formula_and_empty_mask():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert float(masked_mean(values, torch.tensor([True, False, True, False]))) == pytest.approx(2.0)
    assert float(masked_mean(values, torch.tensor([False, False, False, True]))) == pytest.approx(10.0)
    empty = masked_mean(values, torch.zeros(4, dtype=torch.bool))
    assert float(empty) == 0.0 and not torch.isnan(empty)


def test_at_loss_is_batch_mean_cross_entropy():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-2.0, 3.0, 0.0]])
    labels = torch.tensor([0, 2, 0])
    terms = at_loss(logits, labels)
    assert float(terms.total) == pytest.approx(CE(logits, labels), rel=1e-6)
    assert torch.equal(terms.total, terms.cross_entropy)
    assert float(terms.distill_new) == float(terms.distill_old) == 0.0
    assert terms.constrained_fraction == 0.0


# Four samples, three classes. Masks chosen by construction:
#   old model correct (argmax z_old == y) only on samples 0 and 2 (O = {0, 2});
#   frozen new model correct only on sample 1 (N = {1}).
LABELS = torch.tensor([0, 1, 2, 1])
Z = torch.tensor([[0.3, -0.2, 0.9], [1.0, 0.5, -0.5], [0.0, 0.2, 0.4], [-1.0, 2.0, 0.7]])
Z_OLD = torch.tensor([[2.0, 0.0, 1.0], [1.5, 0.0, 0.0], [0.0, 1.0, 3.0], [2.0, 1.0, 0.0]])
Z_NEW0 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 4.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
O = [0, 2]
N = [1]


def test_constructed_masks_are_what_the_test_claims():
    assert (Z_OLD.argmax(1) == LABELS).nonzero().flatten().tolist() == O
    assert (Z_NEW0.argmax(1) == LABELS).nonzero().flatten().tolist() == N


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 0.4), (0.0, 1.0), (1.0, 0.0), (0.2, 0.3)])
def test_rcat_loss_matches_hand_formula_over_masked_samples(alpha, beta):
    terms = rcat_loss(Z, Z_OLD, Z_NEW0, LABELS, alpha, beta)
    ce = CE(Z, LABELS)
    distill_new = alpha * sum(D(Z[i], Z_NEW0[i]) for i in N) / len(N)
    distill_old = beta * sum(D(Z[i], Z_OLD[i]) for i in O) / len(O)
    assert float(terms.cross_entropy) == pytest.approx((1 - alpha - beta) * ce, rel=1e-6, abs=1e-7)
    assert float(terms.distill_new) == pytest.approx(distill_new, rel=1e-6, abs=1e-7)
    assert float(terms.distill_old) == pytest.approx(distill_old, rel=1e-6, abs=1e-7)
    assert float(terms.total) == pytest.approx((1 - alpha - beta) * ce + distill_new + distill_old, rel=1e-6)
    assert terms.constrained_fraction == pytest.approx(len(O) / 4)


def test_rcat_masked_terms_ignore_unselected_samples():
    """Changing the reference logits of samples outside O / N (without changing who is correct)
    must not change the distillation terms."""
    base = rcat_loss(Z, Z_OLD, Z_NEW0, LABELS, 0.5, 0.4)
    old_changed, new_changed = Z_OLD.clone(), Z_NEW0.clone()
    old_changed[1] = torch.tensor([9.0, 1.0, 1.0])  # still wrong for label 1
    old_changed[3] = torch.tensor([-5.0, -6.0, 4.0])  # still wrong for label 1
    new_changed[0] = torch.tensor([-3.0, 7.0, 2.0])  # still wrong for label 0
    new_changed[2] = torch.tensor([8.0, 0.0, -4.0])  # still wrong for label 2
    changed = rcat_loss(Z, old_changed, new_changed, LABELS, 0.5, 0.4)
    assert torch.equal(base.distill_old, changed.distill_old)
    assert torch.equal(base.distill_new, changed.distill_new)
    # ... while changing a selected sample's reference does change it
    old_changed[0] = torch.tensor([5.0, 0.0, 0.0])
    assert float(rcat_loss(Z, old_changed, Z_NEW0, LABELS, 0.5, 0.4).distill_old) != pytest.approx(float(base.distill_old))


def test_rcat_with_zero_weights_equals_at_exactly():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 10, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    old, new0 = torch.randn(16, 10, generator=generator), torch.randn(16, 10, generator=generator)
    rcat = rcat_loss(logits, old, new0, labels, 0.0, 0.0)
    at = at_loss(logits, labels)
    assert torch.equal(rcat.total, at.total)
    assert float(rcat.distill_new) == float(rcat.distill_old) == 0.0


def test_rcat_empty_masks_give_zero_not_nan():
    labels = torch.tensor([0, 0, 0])
    wrong = torch.tensor([[0.0, 1.0], [0.0, 2.0], [-1.0, 1.0]])  # nobody predicts class 0
    logits = torch.tensor([[0.5, 0.1], [0.2, 0.3], [1.0, -1.0]], requires_grad=True)
    terms = rcat_loss(logits, wrong, wrong, labels, 0.5, 0.4)
    assert float(terms.distill_old.detach()) == 0.0 and float(terms.distill_new.detach()) == 0.0
    assert torch.isfinite(terms.total)
    assert float(terms.total.detach()) == pytest.approx(0.1 * CE(logits.detach(), labels), rel=1e-6)
    assert terms.constrained_fraction == 0.0
    terms.total.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 2.0), (0.0, 5.0), (0.7, 0.0)])
def test_pct_loss_normalises_focal_term_by_batch_size(alpha, beta):
    terms = pct_loss(Z, Z_OLD, LABELS, alpha, beta)
    distances = [D(Z[i], Z_OLD[i]) for i in range(4)]
    all_term = alpha * sum(distances) / 4
    focal = beta * sum(distances[i] for i in O) / 4  # |B| = 4, not |O| = 2
    assert float(terms.total) == pytest.approx(CE(Z, LABELS) + all_term + focal, rel=1e-6)
    assert float(terms.distill_old) == pytest.approx(all_term + focal, rel=1e-6, abs=1e-7)
    assert float(terms.cross_entropy) == pytest.approx(CE(Z, LABELS), rel=1e-6)
    assert float(terms.distill_new) == 0.0
    assert terms.constrained_fraction == pytest.approx(0.5)
    if beta:
        wrong_normalisation = CE(Z, LABELS) + all_term + beta * sum(distances[i] for i in O) / len(O)
        assert float(terms.total) != pytest.approx(wrong_normalisation, rel=1e-4)


def test_pct_with_zero_weights_is_cross_entropy():
    assert torch.equal(pct_loss(Z, Z_OLD, LABELS, 0.0, 0.0).total, at_loss(Z, LABELS).total)


def test_as_floats_reports_every_term():
    floats = rcat_loss(Z, Z_OLD, Z_NEW0, LABELS, 0.5, 0.4).as_floats()
    assert set(floats) == {"loss", "loss_cross_entropy", "loss_distill_new", "loss_distill_old", "constrained_fraction"}
    assert floats["loss"] == pytest.approx(floats["loss_cross_entropy"] + floats["loss_distill_new"] + floats["loss_distill_old"], rel=1e-6)


def hand_rcat_torch(z, z_old, z_new0, labels, alpha, beta):
    """The RCAT formula with torch ops (for autograd), references treated as constants."""
    z_old, z_new0 = z_old.detach(), z_new0.detach()
    ce = torch.nn.functional.cross_entropy(z, labels)
    old_mask = z_old.argmax(1) == labels
    new_mask = z_new0.argmax(1) == labels
    d_old = ((z - z_old) ** 2).sum(1) / (2 * z.shape[1])
    d_new = ((z - z_new0) ** 2).sum(1) / (2 * z.shape[1])
    return (1 - alpha - beta) * ce + alpha * d_new[new_mask].sum() / max(int(new_mask.sum()), 1) + beta * d_old[old_mask].sum() / max(int(old_mask.sum()), 1)


@pytest.mark.parametrize("name", ["rcat", "pct"])
def test_gradients_flow_only_through_finetuned_logits(name):
    z = Z.clone().requires_grad_(True)
    z_old = Z_OLD.clone().requires_grad_(True)
    z_new0 = Z_NEW0.clone().requires_grad_(True)
    if name == "rcat":
        terms = rcat_loss(z, z_old, z_new0, LABELS, 0.5, 0.4)
    else:
        terms = pct_loss(z, z_old, LABELS, 1.0, 2.0)
    terms.total.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert z_old.grad is None, "the old model's logits are a fixed target and must get no gradient"
    assert z_new0.grad is None, "the frozen new model's logits are a fixed target and must get no gradient"


def test_rcat_gradient_matches_hand_formula():
    z = Z.clone().requires_grad_(True)
    rcat_loss(z, Z_OLD, Z_NEW0, LABELS, 0.5, 0.4).total.backward()
    reference = Z.clone().requires_grad_(True)
    hand_rcat_torch(reference, Z_OLD, Z_NEW0, LABELS, 0.5, 0.4).backward()
    assert torch.allclose(z.grad, reference.grad, atol=1e-6)
    # the distillation toward the old model pulls sample 0 (in O) toward z_old, sample 3 (not in O, not in N) only by CE
    ce_only = Z.clone().requires_grad_(True)
    (0.1 * torch.nn.functional.cross_entropy(ce_only, LABELS)).backward()
    assert torch.allclose(z.grad[3], ce_only.grad[3], atol=1e-7)
    assert not torch.allclose(z.grad[0], ce_only.grad[0], atol=1e-4)


# ---------------------------------------------------------------- the comparison's controls and strengths


def test_constraint_weights_by_hand():
    from rcat.finetune import constraint_weights

    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    robust = torch.tensor([True, True, False, False, True, False, False, False])
    assert constraint_weights(robust, labels, "attack_cache", 0).tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
    # r_c / n_c: class 0 has 2 of 4 robust, class 1 has 1 of 2, class 2 none
    assert constraint_weights(robust, labels, "class_reweighted", 0).tolist() == [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    for seed in range(5):
        chosen = constraint_weights(robust, labels, "random_class_matched", seed)
        # the same per-class counts as the robust set, on samples of the right class
        assert torch.bincount(labels[chosen.bool()], minlength=3).tolist() == [2, 1, 0]
        assert set(chosen.tolist()) <= {0.0, 1.0}
    draws = {tuple(constraint_weights(robust, labels, "random_class_matched", seed).tolist()) for seed in range(20)}
    assert len(draws) > 1  # a random subset, not the robust set itself
    assert constraint_weights(robust, labels, "random_class_matched", 3).tolist() == constraint_weights(robust, labels, "random_class_matched", 3).tolist()
    with pytest.raises(ValueError, match="not read from the attack cache"):
        constraint_weights(robust, labels, "paper_proxy", 0)


def test_weighted_constraint_is_a_weighted_mean_and_a_boolean_mask_its_special_case():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(masked_mean(values, torch.tensor([True, False, True, False]))) == pytest.approx(2.0)
    assert float(masked_mean(values, torch.tensor([0.5, 0.5, 0.0, 1.0]))) == pytest.approx((0.5 + 1.0 + 4.0) / 2.0)
    assert float(masked_mean(values, torch.zeros(4))) == 0.0


def test_sum_distance_is_the_mean_times_the_class_count():
    logits, reference = torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    assert float(logit_distance(logits, reference)[0]) == pytest.approx(21 / 6)
    assert float(logit_distance(logits, reference, "sum")[0]) == pytest.approx(21 / 2)
    with pytest.raises(ValueError, match="use 'mean' or 'sum'"):
        logit_distance(logits, reference, "max")


def test_a_methods_own_budget_overrides_the_shared_one():
    from rcat.config import FinetuneConfig, MethodConfig

    shared = FinetuneConfig(epochs=3, lr=0.01, methods={"at": MethodConfig(loss="at")})
    own = shared.for_method(MethodConfig(loss="at", epochs=6, lr=0.003, train_eps=0.02))
    assert (own.epochs, own.lr, own.attack.eps, own.attack.name) == (6, 0.003, 0.02, shared.attack.name)
    same = shared.for_method(MethodConfig(loss="at"))
    assert (same.epochs, same.lr, same.attack) == (3, 0.01, shared.attack)
    with pytest.raises(ValueError, match="no distillation term"):
        MethodConfig(loss="at", distance="sum")
    with pytest.raises(ValueError, match="loss: rcat only"):
        MethodConfig(loss="pct", constraint_set="class_reweighted")


def test_margin_hinge_by_hand():
    from rcat.losses import margin_hinge

    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.5], [1.0, 4.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    # margins z_y - max_{j != y} z_j: 2.0, 0.5, -3.0; hinge at kappa 1: 0, 0.5, 4.0
    assert margin_hinge(logits, labels, 1.0).tolist() == [0.0, 0.5, 4.0]
    assert margin_hinge(logits, labels, 2.5).tolist() == [0.5, 2.0, 5.5]


def test_rcat_margin_hinge_term_is_the_masked_mean_hinge():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.5], [1.0, 4.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    zeros = torch.zeros(3, 3)
    mask = torch.tensor([False, True, True])
    terms = rcat_loss(logits, zeros, zeros, labels, 0.0, 0.5, constraint_mask=mask, constraint_term="margin_hinge", margin=1.0)
    assert float(terms.distill_old) == pytest.approx(0.5 * (0.5 + 4.0) / 2)
    assert float(terms.total) == pytest.approx(0.5 * CE(logits.detach(), labels) + 0.5 * 2.25)
    terms.distill_old.backward()
    # d/dz of 0.5 * mean over the 2 masked samples of (kappa - z_y + z_runner_up): -/+ 0.25 on those two logits only
    assert logits.grad.tolist() == [[0.0, 0.0, 0.0], [0.0, -0.25, 0.25], [-0.25, 0.25, 0.0]]


def test_margin_is_set_only_with_the_margin_hinge():
    from rcat.config import MethodConfig

    assert MethodConfig(loss="rcat", beta=0.4, constraint_term="margin_hinge", margin=2.0).margin == 2.0
    with pytest.raises(ValueError, match="margin_hinge only"):
        MethodConfig(loss="rcat", beta=0.4, constraint_term="new_error", margin=2.0)
    with pytest.raises(ValueError, match="margin"):
        MethodConfig(loss="rcat", beta=0.4, constraint_term="margin_hinge", margin=0.0)
