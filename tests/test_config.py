"""params.yaml validation: the repo's file loads; every mistake names the file, the key and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from rcat.config import AttackConfig, DataConfig, MethodConfig, Params, load_params, parse_params
from rcat.errors import ConfigError, InputError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
RAW = yaml.safe_load(REPO_PARAMS.read_text())


def write(tmp_path, raw, name="params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def edited(**path_values):
    """A deep copy of the repo's params with ``a__b__c=value`` set."""
    raw = copy.deepcopy(RAW)
    for dotted, value in path_values.items():
        *parents, last = dotted.split("__")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    return raw


def error_for(tmp_path, raw) -> str:
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message
    return message


def test_repo_params_validate():
    params = load_params(REPO_PARAMS)
    assert isinstance(params, Params)
    assert params.attack == AttackConfig(name="apgd", loss="dlr", norm="Linf", eps=0.1, steps=50, restarts=1, batch_size=512)
    assert set(params.finetune.methods) == {"at", "pct", "pct_at", "rcat", "rcat_cache", "rcat_cache_focal"}
    assert params.finetune.methods["rcat_cache_focal"].constraint_term == "focal_ce"
    assert params.finetune.methods["rcat"] == MethodConfig(loss="rcat", alpha=0.5, beta=0.4)
    assert params.finetune.attack.name == "fgsm_rs" and params.finetune.attack.step_size is None
    assert params.train_old.architecture_kwargs == {"hidden": [32]}
    assert params.decision.rules.max_nfr == 0.03
    assert params.data == DataConfig()


def test_params_are_frozen():
    params = load_params(REPO_PARAMS)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        params.seed = 5  # type: ignore[misc]


def test_config_error_is_an_input_error():
    assert issubclass(ConfigError, InputError)


def test_unknown_top_level_key(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["sed"] = 1
    message = error_for(tmp_path, raw)
    assert "unknown key 'sed'" in message
    for allowed in ("seed", "device", "data", "train_old", "train_new", "attack", "finetune", "decision", "tracking"):
        assert allowed in message.split("allowed here:")[1], allowed


def test_unknown_nested_key(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["finetune"]["lrr"] = 0.1
    message = error_for(tmp_path, raw)
    assert "unknown key 'finetune.lrr'" in message
    allowed = message.split("allowed here:")[1]
    for key in ("attack", "batch_size", "epochs", "lr", "methods", "momentum", "seed"):
        assert key in allowed, key
    assert "source" not in allowed and "rules" not in allowed  # the keys of finetune, not of another section


def test_unknown_key_inside_a_method(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["finetune"]["methods"]["rcat"]["gamma"] = 0.1
    message = error_for(tmp_path, raw)
    assert "finetune.methods.rcat.gamma" in message
    allowed = message.split("allowed here:")[1]
    assert "alpha" in allowed and "beta" in allowed and "loss" in allowed
    assert "momentum" not in allowed and "methods" not in allowed  # the keys of a method, not of the finetune section


def test_unknown_key_inside_a_nested_attack(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["train_old"]["attack"]["stepz"] = 3
    message = error_for(tmp_path, raw)
    assert "train_old.attack.stepz" in message
    allowed = message.split("allowed here:")[1]
    assert "steps" in allowed and "eps" in allowed and "step_size" in allowed
    assert "architecture" not in allowed


def test_unknown_decision_rule(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["decision"]["rules"]["max_bnfr"] = 0.1
    message = error_for(tmp_path, raw)
    assert "decision.rules.max_bnfr" in message
    assert "max_nfr" in message.split("allowed here:")[1]


def test_mistyped_value_names_the_key(tmp_path):
    message = error_for(tmp_path, edited(finetune__epochs="ten"))
    assert "finetune.epochs" in message and "'ten'" in message


@pytest.mark.parametrize(
    ("dotted", "value", "key"),
    [
        ("attack__eps", 0.0, "attack.eps"),
        ("attack__eps", 2.0, "attack.eps"),
        ("attack__name", "cw", "attack.name"),
        ("train_new__momentum", 1.0, "train_new.momentum"),
        ("finetune__lr", -0.1, "finetune.lr"),
        ("device", "tpu", "device"),
        ("data__source", "cifar10", "data.source"),
        ("data__source", "imagefolder:", "data.source"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, dotted, value, key):
    message = error_for(tmp_path, edited(**{dotted: value}))
    assert f"bad value for '{key}'" in message, message


def test_fractions_must_sum_to_at_most_one(tmp_path):
    raw = edited(data__finetune_fraction=0.7)  # 0.7 + 0.2 + 0.2
    message = error_for(tmp_path, raw)
    assert "data" in message and "must be at most 1" in message and "1.1" in message
    # below 1 the rest of the source is left out
    assert DataConfig(finetune_fraction=0.5, validation_fraction=0.1, test_fraction=0.2).finetune_fraction == 0.5


def test_grid_replaces_alpha_beta(tmp_path):
    grid = [{"alpha": 0.75, "beta": 0.2}, {"alpha": 0.3, "beta": 0.6}]
    method = MethodConfig(loss="rcat", grid=grid, constraint_set="attack_cache")
    points = method.points()
    assert [(p.alpha, p.beta) for p in points] == [(0.75, 0.2), (0.3, 0.6)]
    assert all(p.grid is None and p.constraint_set == "attack_cache" for p in points)
    assert MethodConfig(loss="pct", alpha=1, beta=2).points() == [MethodConfig(loss="pct", alpha=1, beta=2)]
    for methods, expected in [
        ({"rcat": {"loss": "rcat", "alpha": 0.5, "grid": grid}}, "not both"),
        ({"rcat": {"loss": "rcat", "grid": [{"alpha": 0.7, "beta": 0.4}]}}, "alpha + beta <= 1"),
        ({"at": {"loss": "at", "grid": grid}}, "at has no alpha/beta"),
        ({"rcat": {"loss": "rcat", "grid": []}}, "grid is empty"),
        ({"rcat": {"loss": "rcat", "grid": [{"alpha": 0.5, "beta": 0.4, "gamma": 1}]}}, "gamma"),
    ]:
        raw = copy.deepcopy(RAW)
        raw["finetune"]["methods"] = methods
        message = error_for(tmp_path, raw)
        assert "finetune.methods" in message and expected in message, message


def test_rcat_weights_must_be_convex(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["finetune"]["methods"]["rcat"] = {"loss": "rcat", "alpha": 0.7, "beta": 0.4}
    message = error_for(tmp_path, raw)
    assert "finetune.methods.rcat" in message and "alpha + beta <= 1" in message
    # exactly 1 is allowed; pct has no such bound
    assert MethodConfig(loss="rcat", alpha=0.6, beta=0.4).alpha == 0.6
    assert MethodConfig(loss="pct", alpha=1.0, beta=2.0).beta == 2.0


def test_at_takes_no_weights(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["finetune"]["methods"]["at"] = {"loss": "at", "beta": 0.5}
    assert "finetune.methods.at" in error_for(tmp_path, raw)


@pytest.mark.parametrize("methods", [{}, {"old": {"loss": "at"}}, {"my-method": {"loss": "at"}}])
def test_method_names_are_checked(tmp_path, methods):
    raw = copy.deepcopy(RAW)
    raw["finetune"]["methods"] = methods
    assert "finetune.methods" in error_for(tmp_path, raw)


def test_missing_finetune_section(tmp_path):
    raw = copy.deepcopy(RAW)
    del raw["finetune"]
    assert "missing required key 'finetune'" in error_for(tmp_path, raw)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\nfinetune:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_params(path)
    assert str(path) in str(info.value) and "line" in str(info.value)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping") as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_parse_params_names_its_source():
    raw = copy.deepcopy(RAW)
    raw["tracking"]["urii"] = "x"
    with pytest.raises(ConfigError, match=r"^custom\.yaml: unknown key 'tracking\.urii'"):
        parse_params(raw, "custom.yaml")


def test_several_problems_are_counted(tmp_path):
    raw = copy.deepcopy(RAW)
    raw["sed"] = 1
    raw["finetune"]["lrr"] = 1
    raw["attack"]["steps"] = "many"
    assert "(and 2 more problems)" in error_for(tmp_path, raw)


def test_attack_identity_and_label():
    config = AttackConfig(name="apgd", loss="dlr", eps=0.1, steps=50, batch_size=7)
    assert config.label() == "apgd-dlr:50it:1r:Linf:eps=0.1"
    assert config.identity() == {"name": "apgd", "loss": "dlr", "norm": "Linf", "eps": 0.1, "steps": 50, "restarts": 1, "step_size": None}
