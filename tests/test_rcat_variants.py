"""RCAT's constraint-set and constraint-term variants, on tiny tensors and through the pipeline."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from rcat.config import MethodConfig, parse_params
from rcat.losses import logit_distance, rcat_loss


def _logits():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.randn(4, 3, requires_grad=True)
    old = torch.tensor([[5.0, 0, 0], [0, 0, 5.0], [0, 0, 5.0], [5.0, 0, 0]])  # old correct on samples 0 and 2
    new0 = torch.tensor([[0, 5.0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 5.0, 0]])  # frozen new correct on 1 and 3
    return logits, old, new0, labels


def test_default_constraint_is_the_papers_proxy():
    logits, old, new0, labels = _logits()
    proxy = rcat_loss(logits, old, new0, labels, 0.0, 1.0)
    explicit = rcat_loss(logits, old, new0, labels, 0.0, 1.0, constraint_mask=torch.tensor([True, False, True, False]))
    assert torch.equal(proxy.total, explicit.total)
    expected = (logit_distance(logits, old)[0] + logit_distance(logits, old)[2]) / 2
    assert torch.allclose(proxy.distill_old, expected)


def test_cache_mask_replaces_the_proxy():
    logits, old, new0, labels = _logits()
    cached = torch.tensor([False, True, False, True])  # the cache says: old robust on 1 and 3 only
    terms = rcat_loss(logits, old, new0, labels, 0.0, 0.5, constraint_mask=cached)
    expected = 0.5 * (logit_distance(logits, old)[1] + logit_distance(logits, old)[3]) / 2
    assert torch.allclose(terms.distill_old, expected)
    assert terms.constrained_fraction == 0.5


def test_focal_ce_term_is_masked_mean_cross_entropy():
    logits, old, new0, labels = _logits()
    cached = torch.tensor([True, True, False, False])
    terms = rcat_loss(logits, old, new0, labels, 0.2, 0.3, constraint_mask=cached, constraint_term="focal_ce")
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(terms.distill_old, 0.3 * per_sample[:2].mean())
    assert torch.allclose(terms.cross_entropy, 0.5 * F.cross_entropy(logits, labels))
    # an empty constraint set contributes 0, not NaN
    empty = rcat_loss(logits, old, new0, labels, 0.2, 0.3, constraint_mask=torch.zeros(4, dtype=torch.bool), constraint_term="focal_ce")
    assert empty.distill_old.item() == 0.0
    with pytest.raises(ValueError, match="constraint_term"):
        rcat_loss(logits, old, new0, labels, 0.2, 0.3, constraint_term="kl")


def test_variants_only_for_rcat():
    MethodConfig(loss="rcat", alpha=0.5, beta=0.4, constraint_set="attack_cache", constraint_term="focal_ce")
    with pytest.raises(ValueError, match="rcat only"):
        MethodConfig(loss="pct_at", alpha=1, beta=2, constraint_set="attack_cache")


def test_cache_constraint_through_the_pipeline(tmp_path, monkeypatch):
    """finetune with constraint_set attack_cache reads the old model's robust flags from the cache,
    in the fine-tune split's order; without the cache it fails with the stage to run."""
    from conftest import reduced_params
    from rcat import pipeline
    from rcat.errors import InputError

    raw = reduced_params(tmp_path)
    raw["tracking"]["enabled"] = False
    raw["finetune"]["epochs"] = 1
    raw["finetune"]["methods"] = {"cache": {"loss": "rcat", "alpha": 0.5, "beta": 0.4, "constraint_set": "attack_cache"}}
    params = parse_params(raw)
    layout = pipeline.Layout(tmp_path / "data")
    pipeline.prepare(params, layout)
    pipeline.train(params, "old", layout)
    pipeline.train(params, "new", layout)
    with pytest.raises(InputError, match="attack_cache"):
        pipeline.finetune_method(params, "cache", layout)
    pipeline.attack_cache(params, layout)

    seen = {}
    import rcat.finetune as finetune_module

    original = finetune_module.finetune

    def spy(*args, old_robust=None, **kwargs):
        seen["old_robust"] = old_robust
        return original(*args, old_robust=old_robust, **kwargs)

    from rcat.stages import finetune as finetune_stage

    monkeypatch.setattr(finetune_stage, "finetune", spy)
    pipeline.finetune_method(params, "cache", layout)
    import pandas as pd

    outcomes = pd.read_parquet(layout.attack_cache / "outcomes.parquet")
    expected = outcomes[(outcomes["model"] == "old") & (outcomes["split"] == "finetune")].sort_values("sample_index")["robust"].to_numpy()
    assert seen["old_robust"].tolist() == expected.tolist()
    assert 0 < seen["old_robust"].sum() < len(expected)


def test_grid_method_keeps_the_point_with_the_lowest_validation_snfr(tmp_path, monkeypatch):
    """A grid method fine-tunes every point, attacks each on validation only, and keeps the lowest S-NFR;
    the kept model equals a plain run with that point's alpha/beta, and the history records every point."""
    import json

    from conftest import reduced_params
    from rcat import pipeline
    from rcat.models import load_model

    raw = reduced_params(tmp_path)
    raw["tracking"]["enabled"] = False
    raw["finetune"]["epochs"] = 1
    grid = [{"alpha": 0.75, "beta": 0.2}, {"alpha": 0.3, "beta": 0.6}, {"alpha": 0.5, "beta": 0.4}]
    raw["finetune"]["methods"] = {"family": {"loss": "rcat", "grid": grid}}
    params = parse_params(raw)
    layout = pipeline.Layout(tmp_path / "data")
    pipeline.prepare(params, layout)
    pipeline.train(params, "old", layout)
    pipeline.train(params, "new", layout)
    pipeline.attack_cache(params, layout)

    attacked_splits = []
    original_attack = pipeline.attack_model_on_splits

    def spy(model, role, splits, *args, **kwargs):
        attacked_splits.append(tuple(splits))
        return original_attack(model, role, splits, *args, **kwargs)

    from rcat.stages import finetune as finetune_stage

    monkeypatch.setattr(finetune_stage, "attack_model_on_splits", spy)
    digest = pipeline.finetune_method(params, "family", layout)
    assert attacked_splits == [("validation",)] * 3  # the test split is never read for selection

    history = json.loads(layout.finetune_history("family").read_text())
    snfrs = [point["validation"]["snfr"] for point in history["grid"]]
    kept = [point["selected"] for point in history["grid"]].index(True)
    assert snfrs[kept] == min(snfrs)
    assert (history["alpha"], history["beta"]) == (grid[kept]["alpha"], grid[kept]["beta"])

    # the same point as a plain method gives the same weights (same start, same seed)
    raw["finetune"]["methods"] = {"single": {"loss": "rcat", **grid[kept]}}
    single = parse_params(raw)
    assert pipeline.finetune_method(single, "single", layout) == digest
    assert load_model(layout.finetuned("family")).metadata["alpha"] == str(grid[kept]["alpha"])

    # the grid on two worker processes (one torch thread each) selects the same point with the same weights as a
    # serial run with one torch thread (the thread count changes oneDNN's reduction order, not the method)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial_digest = pipeline.finetune_method(params, "family", layout)
        serial_history = json.loads(layout.finetune_history("family").read_text())
    finally:
        torch.set_num_threads(threads)
    raw["finetune"]["methods"] = {"family": {"loss": "rcat", "grid": grid}}
    raw["engine"]["workers"] = 2
    parallel = parse_params(raw)
    assert pipeline.finetune_method(parallel, "family", layout) == serial_digest
    assert json.loads(layout.finetune_history("family").read_text())["grid"] == serial_history["grid"]


def test_training_attack_eps_warms_up_linearly(tiny_split, monkeypatch):
    """attack_warmup_epochs N: epoch e <= N attacks at eps * e / N (step size scaled when set), then full eps;
    0 keeps the configured attack from the first step."""
    import rcat.finetune as finetune_module
    from rcat.config import TrainConfig
    from rcat.models import mlp

    used = []
    original = finetune_module.training_attack

    def recording(network, config, num_classes):
        perturb = original(network, config, num_classes)

        def call(x, y, step_seed):
            used.append((config.eps, config.step_size))
            return perturb(x, y, step_seed)

        return call

    monkeypatch.setattr(finetune_module, "training_attack", recording)
    # 4 epochs at eps 0.2 on 120 digits learn nothing, which fails the run; this test is about the schedule
    monkeypatch.setattr(finetune_module, "_require_learning", lambda *args: None)
    batch_size = 64
    steps_per_epoch = -(-len(tiny_split) // batch_size)
    attack = {"name": "fgsm_rs", "loss": "ce", "eps": 0.2, "step_size": 0.25}
    config = TrainConfig(epochs=4, batch_size=batch_size, attack=attack, attack_warmup_epochs=2, lr=0.01)
    finetune_module.adversarial_train(mlp((1, 8, 8), 10), tiny_split, config, torch.device("cpu"))
    per_epoch = [used[e * steps_per_epoch:(e + 1) * steps_per_epoch] for e in range(4)]
    assert len(used) == 4 * steps_per_epoch
    for epoch, expected_eps in enumerate((0.1, 0.2, 0.2, 0.2)):
        assert [eps for eps, _ in per_epoch[epoch]] == pytest.approx([expected_eps] * steps_per_epoch)
        assert [step for _, step in per_epoch[epoch]] == pytest.approx([expected_eps * 1.25] * steps_per_epoch)

    used.clear()
    finetune_module.adversarial_train(mlp((1, 8, 8), 10), tiny_split, TrainConfig(epochs=2, batch_size=batch_size, attack=attack, lr=0.01), torch.device("cpu"))
    assert {eps for eps, _ in used} == {0.2}
