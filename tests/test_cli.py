"""The ``rcat`` command line: the evaluate contract and one-line errors with non-zero exits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from rcat.cli import EXIT_BAD_INPUT, app

CONTRACT_KEYS = {"accuracy_old", "accuracy_new", "robust_accuracy_old", "robust_accuracy_new", "nfr", "pfr", "rnfr", "rpfr", "bnfr", "snfr", "btc", "bec", "n_samples"}

runner = CliRunner()


@pytest.fixture
def short_params(tmp_path):
    from conftest import REPO_ROOT

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["attack"]["steps"] = 5
    params["tracking"]["enabled"] = False
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_evaluate_contract(tmp_path, model_files, short_params):
    old, new = model_files
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--old", str(old), "--new", str(new), "--data", "digits", "--split", "test", "--out", str(out), "--params", str(short_params)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= CONTRACT_KEYS
    assert metrics["n_samples"] == 360
    for key in CONTRACT_KEYS - {"n_samples"}:
        assert 0.0 <= metrics[key] <= 1.0, key
    flips = pd.read_parquet(out / "flips.parquet")
    assert len(flips) == 360 and flips["sample_index"].is_unique
    assert flips["negative_flip"].sum() == metrics["n_negative_flips"]
    assert flips["robust_negative_flip"].mean() == pytest.approx(metrics["rnfr"])
    # the perturbed model is worse: some negative flips must show up
    assert metrics["n_negative_flips"] > 0


def test_attack_single_model(tmp_path, model_files, short_params):
    old, _ = model_files
    out = tmp_path / "outcomes.parquet"
    result = runner.invoke(app, ["attack", "--model", str(old), "--data", "digits", "--split", "validation", "--out", str(out), "--params", str(short_params)])
    assert result.exit_code == 0, result.output
    outcomes = pd.read_parquet(out)
    assert len(outcomes) == 360
    assert (outcomes["robust"] <= outcomes["clean_correct"]).all()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--old", "missing.safetensors"], "missing.safetensors"),
        (["--data", "mnist"], "mnist"),
        (["--split", "train"], "--split"),
    ],
)
def test_evaluate_bad_input_is_one_line(tmp_path, model_files, short_params, arguments, expected):
    old, new = model_files
    base = {"--old": str(old), "--new": str(new), "--data": "digits", "--out": str(tmp_path / "out"), "--split": "test"}
    base.update(dict(zip(arguments[::2], arguments[1::2], strict=True)))
    args = ["evaluate", "--params", str(short_params)] + [item for pair in base.items() for item in pair]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_BAD_INPUT
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rcat: error:") and expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_params_key_names_it(tmp_path, model_files, short_params):
    params = yaml.safe_load(short_params.read_text())
    params["attack"]["stepz"] = 3
    short_params.write_text(yaml.safe_dump(params))
    old, new = model_files
    result = runner.invoke(app, ["evaluate", "--old", str(old), "--new", str(new), "--data", "digits", "--out", str(tmp_path / "o"), "--params", str(short_params)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "attack.stepz" in result.stderr and "steps" in result.stderr


def test_pickled_model_is_refused_without_unpickling(tmp_path, model_files, short_params):
    """A torch.save'd pickle given as a model is refused; its payload never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    torch.save({"weights": Payload()}, evil)
    _, new = model_files
    result = runner.invoke(app, ["evaluate", "--old", str(evil), "--new", str(new), "--data", "digits", "--out", str(tmp_path / "o"), "--params", str(short_params)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "evil.safetensors" in result.stderr
    assert not marker.exists()


def test_decide_replay_matches_and_detects_edits(evaluated_project, tmp_path, monkeypatch):
    """decision.json stores what its verdict came from; --replay recomputes it and catches a forged verdict.
    (Edited evidence files and signatures: tests/test_evidence.py.)"""
    from conftest import copy_evaluated

    monkeypatch.chdir(copy_evaluated(evaluated_project, tmp_path / "project"))
    monkeypatch.delenv("RCAT_SIGNING_KEY", raising=False)
    path = Path("data/decide/decision.json")
    result = runner.invoke(app, ["decide", "--replay", str(path)])
    assert result.exit_code == 0, result.output
    assert "matches" in result.output
    record = json.loads(path.read_text())
    verdict = record["verdict"]
    record["verdict"], record["candidate"] = ("reject", None) if verdict == "promote" else ("promote", "new")  # a forged verdict
    path.write_text(json.dumps(record))
    result = runner.invoke(app, ["decide", "--replay", str(path)])
    assert result.exit_code == EXIT_BAD_INPUT and f"record says {record['verdict']}" in result.stderr

    del record["replay"]
    path.write_text(json.dumps(record))
    result = runner.invoke(app, ["decide", "--replay", str(path)])
    assert result.exit_code == EXIT_BAD_INPUT and "no 'replay' section" in result.stderr


def test_explicit_missing_params_file_is_an_error_not_defaults(tmp_path, model_files):
    old, new = model_files
    result = runner.invoke(app, ["evaluate", "--old", str(old), "--new", str(new), "--data", "digits", "--out", str(tmp_path / "o"), "--params", str(tmp_path / "nope.yaml")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "nope.yaml" in result.stderr and "not found" in result.stderr
    assert not (tmp_path / "o").exists()


def test_flags_override_the_params_and_the_output_states_the_attack(tmp_path, model_files, short_params):
    old, new = model_files
    base = ["evaluate", "--old", str(old), "--new", str(new), "--data", "digits", "--split", "test", "--params", str(short_params)]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--eps", "4/255", "--attack", "pgd", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output.strip().splitlines()[-1])
    assert printed["attack"] == f"pgd-ce:5it:1r:Linf:eps={4 / 255:g}" and printed["device"] == "cpu"
    outcomes = pd.read_parquet(tmp_path / "a" / "outcomes.parquet")
    assert json.loads(outcomes["attack_config"].iloc[0])["eps"] == pytest.approx(4 / 255)
    # a smaller eps than the params' 0.1 leaves more samples robust
    default = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--json"])
    assert json.loads(default.output.strip().splitlines()[-1])["robust_accuracy_new"] < printed["robust_accuracy_new"]
    text = runner.invoke(app, ["attack", "--model", str(old), "--data", "digits", "--split", "test", "--out", str(tmp_path / "o.parquet"),
                               "--params", str(short_params), "--eps", "0.05"])
    assert text.exit_code == 0 and "attack apgd-dlr:5it:1r:Linf:eps=0.05" in text.output


@pytest.mark.parametrize(("flag", "value", "message"), [("--eps", "2", "must be in (0, 1]"), ("--eps", "a/b", "not a number"),
                                                        ("--attack", "deepfool", "attack.name"), ("--device", "tpu", "device")])
def test_bad_flags_are_one_line_errors(tmp_path, model_files, short_params, flag, value, message):
    old, new = model_files
    result = runner.invoke(app, ["evaluate", "--old", str(old), "--new", str(new), "--data", "digits", "--out", str(tmp_path / "o"),
                                 "--params", str(short_params), flag, value])
    assert result.exit_code == EXIT_BAD_INPUT
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_stage_modes_refuse_the_flags_and_version_prints():
    result = runner.invoke(app, ["evaluate", "--method", "at", "--eps", "0.1"])
    assert result.exit_code == EXIT_BAD_INPUT and "reads params.yaml only" in result.output
    version = runner.invoke(app, ["--version"])
    from rcat import __version__

    assert version.exit_code == 0 and version.output.strip() == f"rcat {__version__}"
    assert "``" not in runner.invoke(app, ["evaluate", "--help"]).output


def test_init_refuses_a_non_empty_directory_and_bad_params_writing_nothing(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["init", str(tmp_path / "taken")])
    assert result.exit_code == EXIT_BAD_INPUT and "not an empty directory" in result.output
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    result = runner.invoke(app, ["init", str(tmp_path / "fresh"), "--data", "nonsense:x"])
    assert result.exit_code == EXIT_BAD_INPUT and "data.source" in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no project, no staging directory left behind


def test_init_writes_the_template_with_the_users_references(tmp_path, model_files):
    from rcat.config import load_params

    old, new = model_files
    result = runner.invoke(app, ["init", str(tmp_path / "my-check"), "--old", str(old), "--new", str(new), "--no-git"])
    assert result.exit_code == 0, result.output
    project = tmp_path / "my-check"
    assert {p.name for p in project.iterdir()} >= {"dvc.yaml", "params.yaml", "prefect.yaml", "stages", "pipelines", ".gitignore", "data", ".dvc"}
    params = load_params(project / "params.yaml")
    assert (params.train_old.reference, params.train_new.reference) == (str(old), str(new))
    assert params.tracking.experiment == params.tracking.registered_model == "rcat-my-check"
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    deps = [d for stage in dvc_yaml["stages"].values() for d in stage.get("do", stage).get("deps", [])]
    assert deps and not [d for d in deps if d.startswith("rcat/")]  # the package is installed, not part of the project
    assert sorted(p.name for p in (project / "stages").glob("*.py")) == sorted(p.name for p in (Path(__file__).parents[1] / "stages").glob("*.py"))


@pytest.mark.slow
def test_the_wheel_ships_the_project_template(tmp_path):
    """`pip install rcat` (a wheel) brings what `rcat init` copies: share/rcat/project/... (pyproject's data-files)."""
    import subprocess
    import sys
    import zipfile

    from conftest import REPO_ROOT

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True)
    [wheel] = tmp_path.glob("rcat-*.whl")
    shipped = {name.split("/share/rcat/project/", 1)[1] for name in zipfile.ZipFile(wheel).namelist() if "/share/rcat/project/" in name}
    expected = {"dvc.yaml", "params.yaml", "prefect.yaml"} | {f"{p.parent.name}/{p.name}" for p in (REPO_ROOT / "stages").glob("*.py")}
    expected |= {f"pipelines/{p.name}" for p in (REPO_ROOT / "pipelines").glob("*.py")}
    expected |= {f"stages/plot_templates/{p.name}" for p in (REPO_ROOT / "stages" / "plot_templates").glob("*.json")}
    assert shipped == expected


def test_flags_work_on_the_built_in_defaults_outside_a_project(tmp_path, model_files, monkeypatch):
    """No params.yaml: the defaults (paper's APGD-DLR) with --eps; the engine's unset chunk size still adapts to the batch."""
    old, _ = model_files
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["attack", "--model", str(old), "--data", "digits", "--split", "test", "--out", str(tmp_path / "o.parquet"),
                                 "--eps", "0.05", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["attack"] == "apgd-dlr:50it:1r:Linf:eps=0.05"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_training_progress_lines_and_terminal_bar(digits_splits, terminal):
    """One line per epoch everywhere; on a terminal also a bar through each epoch with the running loss, accuracy and samples/s."""
    from rcat.config import AttackConfig, TrainConfig
    from rcat.finetune import adversarial_train
    from rcat.models import ModelSpec
    from rcat.stages.common import epoch_logger

    split = digits_splits["finetune"]
    config = TrainConfig(epochs=2, lr=0.05, batch_size=64, attack=AttackConfig(name="fgsm", loss="ce", eps=0.05), seed=0)
    stream = _Terminal() if terminal else io.StringIO()
    curves: list = []
    progress = epoch_logger("train_old", config.epochs, len(split), curves, stream=stream)
    history = adversarial_train(ModelSpec("mlp", (1, 8, 8), 10, {"hidden": [32]}).build(), split, config, torch.device("cpu"),
                                on_epoch=progress, on_batch=progress.on_batch)
    text = stream.getvalue()
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("train_old: epoch ")]
    assert [line.split(" loss ")[0] for line in lines] == ["train_old: epoch 1/2", "train_old: epoch 2/2"]
    assert f"loss {history.epochs[1]['loss']:.4f} train accuracy {history.epochs[1]['train_accuracy']:.4f}" in lines[1]
    assert [epoch for epoch, _ in curves] == [1, 2]
    bar = "train_old epoch 1/2" in text and "samples/s" in text.split("train_old: epoch 1/2")[0] and "acc " in text
    assert bar == terminal  # the bar only on a terminal; logs get the lines alone
    if not terminal:
        assert text.count("\n") == 2
