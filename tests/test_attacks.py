"""The torchattacks adapter: outcome frames agree with the model, eps-ball, seeding, RNG hygiene."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from rcat.attacks import OUTCOME_COLUMNS, attack_outcomes, build_attack, logit_margin, training_attack
from rcat.config import AttackConfig
from rcat.errors import InputError

EPS = 0.1
APGD = AttackConfig(name="apgd", loss="dlr", eps=EPS, steps=5)
PGD = AttackConfig(name="pgd", loss="ce", eps=EPS, steps=5, batch_size=50)  # several batches
PROVENANCE = {"split": "validation", "model": "mlp", "model_digest": "m" * 64, "split_digest": "s" * 64}


def run(network, split, config, seed=0, **kwargs):
    return attack_outcomes(
        network, split.images, split.labels, split.sample_index, config,
        num_classes=split.num_classes, seed=seed, provenance=PROVENANCE, return_adversarial=True, **kwargs,
    )


@pytest.fixture(scope="module")
def apgd_result(trained_mlp, tiny_split):
    network, _ = trained_mlp
    return run(network, tiny_split, APGD)


@pytest.fixture(scope="module")
def pgd_result(trained_mlp, tiny_split):
    network, _ = trained_mlp
    return run(network, tiny_split, PGD)


@pytest.mark.parametrize("which", ["apgd_result", "pgd_result"])
def test_outcomes_agree_with_a_fresh_prediction_on_the_returned_points(which, request, trained_mlp, tiny_split):
    frame, x_adv = request.getfixturevalue(which)
    network, _ = trained_mlp
    x, y = tiny_split.images, tiny_split.labels
    assert tuple(frame.columns) == OUTCOME_COLUMNS
    assert len(frame) == len(y) == x_adv.shape[0]
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32 and x_adv.device.type == "cpu"
    with torch.no_grad():
        clean_logits, adv_logits = network(x), network(x_adv)
    clean_prediction, adv_prediction = clean_logits.argmax(1), adv_logits.argmax(1)
    clean_correct = clean_prediction == y
    assert frame["sample_index"].tolist() == tiny_split.sample_index.tolist()
    assert frame["label"].tolist() == y.tolist()
    assert frame["clean_prediction"].tolist() == clean_prediction.tolist()
    assert frame["adversarial_prediction"].tolist() == adv_prediction.tolist()
    assert frame["clean_correct"].tolist() == clean_correct.tolist()
    assert frame["robust"].tolist() == (clean_correct & (adv_prediction == y)).tolist()
    assert torch.allclose(torch.tensor(frame["clean_margin"].to_numpy()), logit_margin(clean_logits, y), atol=1e-5)
    assert torch.allclose(torch.tensor(frame["adversarial_margin"].to_numpy()), logit_margin(adv_logits, y), atol=1e-5)
    # the margin's sign says who wins
    assert ((frame["adversarial_margin"] > 0) == (frame["adversarial_prediction"] == frame["label"])).all()


@pytest.mark.parametrize("which", ["apgd_result", "pgd_result"])
def test_adversarial_points_lie_in_the_eps_ball_and_the_image_box(which, request, tiny_split):
    frame, x_adv = request.getfixturevalue(which)
    distance = (x_adv - tiny_split.images).abs().flatten(1).amax(1)
    assert float(distance.max()) <= EPS + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert torch.allclose(torch.tensor(frame["linf_distance"].to_numpy()), distance, atol=1e-7)
    assert (frame["linf_distance"] <= EPS + 1e-6).all() and (frame["linf_distance"] >= 0).all()


@pytest.mark.parametrize("which", ["apgd_result", "pgd_result"])
def test_clean_mistakes_are_not_attacked(which, request, tiny_split):
    frame, x_adv = request.getfixturevalue(which)
    wrong = torch.from_numpy(~frame["clean_correct"].to_numpy())
    assert wrong.any(), "the fixture should misclassify a few clean digits"
    assert torch.equal(x_adv[wrong], tiny_split.images[wrong])
    assert (frame.loc[wrong.numpy(), "linf_distance"] == 0).all()
    assert not frame.loc[wrong.numpy(), "robust"].any()


@pytest.mark.parametrize("which", ["apgd_result", "pgd_result"])
def test_robust_accuracy_at_most_clean_accuracy_and_attack_bites(which, request):
    frame, _ = request.getfixturevalue(which)
    assert not (frame["robust"] & ~frame["clean_correct"]).any()
    assert frame["robust"].mean() <= frame["clean_correct"].mean()
    # the MLP is trained without attacks: eps = 0.1 breaks some of its correct predictions
    assert frame["robust"].sum() < frame["clean_correct"].sum()
    # and some attacked points actually moved
    assert (frame.loc[frame["clean_correct"], "linf_distance"] > 0).any()


def test_provenance_columns(apgd_result):
    frame, _ = apgd_result
    for key, value in PROVENANCE.items():
        assert (frame[key] == value).all(), key
    assert (frame["attack"] == APGD.label()).all()
    assert json.loads(frame["attack_config"].iloc[0]) == APGD.identity()
    assert "batch_size" not in json.loads(frame["attack_config"].iloc[0])


def test_missing_provenance_is_refused(trained_mlp, tiny_split):
    network, _ = trained_mlp
    with pytest.raises(ValueError, match="split_digest"):
        attack_outcomes(
            network, tiny_split.images, tiny_split.labels, tiny_split.sample_index, APGD,
            num_classes=10, seed=0, provenance={"split": "v", "model": "m", "model_digest": "d"},
        )


@pytest.mark.parametrize("config", [APGD, PGD], ids=["apgd", "pgd"])
def test_same_seed_gives_identical_results_and_global_rng_is_untouched(config, trained_mlp, tiny_split):
    network, _ = trained_mlp
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first, first_adv = run(network, tiny_split, config, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "attack_outcomes changed the global torch RNG"
    torch.rand(17)  # whatever ran before must not matter
    second, second_adv = run(network, tiny_split, config, seed=7)
    pd.testing.assert_frame_equal(first, second)
    assert torch.equal(first_adv, second_adv)


def test_seed_changes_the_random_start(trained_mlp, tiny_split):
    network, _ = trained_mlp
    _, adv_a = run(network, tiny_split, PGD, seed=1)
    _, adv_b = run(network, tiny_split, PGD, seed=2)
    assert not torch.equal(adv_a, adv_b)


def test_batching_keeps_rows_in_order_and_clean_results(trained_mlp, tiny_split, apgd_result):
    network, _ = trained_mlp
    frame, _ = apgd_result  # one batch of 120
    batched, x_adv = run(network, tiny_split, APGD.model_copy(update={"batch_size": 16}))  # 8 batches, the last partial
    assert len(batched) == len(frame) and x_adv.shape[0] == len(frame)
    for column in ("sample_index", "label", "clean_prediction", "clean_correct"):
        assert batched[column].tolist() == frame[column].tolist(), column
    # batch_size is not part of the attack's identity
    assert batched["attack_config"].iloc[0] == frame["attack_config"].iloc[0]
    assert not (batched["robust"] & ~batched["clean_correct"]).any()


def test_training_attack_is_seeded_and_leaves_global_rng(trained_mlp, tiny_split):
    network, _ = trained_mlp
    perturb = training_attack(network, AttackConfig(name="fgsm_rs", loss="ce", eps=EPS), 10)
    x, y = tiny_split.images[:32], tiny_split.labels[:32]
    state = torch.get_rng_state()
    a, b, c = perturb(x, y, 5), perturb(x, y, 5), perturb(x, y, 6)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float((a - x).abs().max()) <= EPS + 1e-6 and float(a.min()) >= 0 and float(a.max()) <= 1


def test_fgsm_rs_default_step_is_one_and_a_quarter_eps(trained_mlp):
    network, _ = trained_mlp
    attack = build_attack(network, AttackConfig(name="fgsm_rs", loss="ce", eps=0.1), 10)
    assert attack.alpha == pytest.approx(1.25 * 0.1)
    assert attack.eps == pytest.approx(0.1)
    explicit = build_attack(network, AttackConfig(name="fgsm_rs", loss="ce", eps=0.1, step_size=0.05), 10)
    assert explicit.alpha == pytest.approx(0.05)


def test_pgd_default_step_and_settings(trained_mlp):
    network, _ = trained_mlp
    attack = build_attack(network, AttackConfig(name="pgd", loss="ce", eps=0.1, steps=5), 10)
    assert attack.alpha == pytest.approx(2.5 * 0.1 / 5)
    assert attack.steps == 5 and attack.random_start is True


def test_apgd_settings_are_passed_through(trained_mlp):
    network, _ = trained_mlp
    attack = build_attack(network, AttackConfig(name="apgd", loss="dlr", eps=0.1, steps=7, restarts=2), 10, seed=3)
    assert (attack.eps, attack.steps, attack.n_restarts, attack.seed, attack.loss) == (pytest.approx(0.1), 7, 2, 3, "dlr")


@pytest.mark.parametrize("name", ["pgd", "fgsm", "fgsm_rs"])
def test_ce_only_attacks_refuse_dlr(trained_mlp, name):
    network, _ = trained_mlp
    with pytest.raises(InputError, match="loss: ce"):
        build_attack(network, AttackConfig(name=name, loss="dlr", eps=0.1), 10)


def test_dlr_needs_three_classes(trained_mlp):
    network, _ = trained_mlp
    with pytest.raises(InputError, match="3 classes"):
        build_attack(network, AttackConfig(name="apgd", loss="dlr", eps=0.1), 2)


def test_logit_margin_hand_case():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-2.0, -3.0, -1.0]])
    labels = torch.tensor([1, 2, 0, 2])
    # 3 - 2 = 1 ; -1 - 5 = -6 ; tie: 0.5 - 0.5 = 0 ; -1 - (-2) = 1
    assert logit_margin(logits, labels).tolist() == [1.0, -6.0, 0.0, 1.0]
    # the input is not modified
    assert logits[0].tolist() == [1.0, 3.0, 2.0]


def test_nan_logits_are_refused(tiny_split):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x.flatten(1)) * float("nan")

    with pytest.raises(InputError, match="NaN"):
        attack_outcomes(
            Broken(), tiny_split.images[:4], tiny_split.labels[:4], tiny_split.sample_index[:4], APGD,
            num_classes=10, seed=0, provenance=PROVENANCE,
        )


def test_importing_the_adapter_defers_scipy_stats_and_a_later_user_gets_the_real_module():
    """torchattacks imports scipy.stats for TI-FGSM only; the adapter defers it (a second of every attacking stage's start),
    and whoever uses scipy.stats afterwards gets the same module a plain import gives."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import rcat.attacks\n"
        "print('scipy.stats._stats_py' in sys.modules)\n"
        "from scipy import stats\n"
        "import scipy.stats as again\n"
        "print(again is stats, round(float(stats.norm.pdf(0.0)), 6), 'scipy.stats._stats_py' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True", "0.398942", "True"], result.stdout + result.stderr
