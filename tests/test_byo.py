"""Bring your own models and data: the README's example, factory references in the pipeline, and
the rule that a model file can name user code but never make rcat run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import REPO_ROOT
from rcat import pipeline
from rcat.cli import EXIT_BAD_INPUT, app
from rcat.config import parse_params
from rcat.errors import InputError
from rcat.models import ModelSpec, load_model, save_model

EXAMPLE = REPO_ROOT / "examples" / "byo"
runner = CliRunner()


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README's example data and models, made by its own script."""
    out = tmp_path_factory.mktemp("byo")
    subprocess.run([sys.executable, str(EXAMPLE / "make_example.py"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def factories(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))


def test_readme_evaluate_on_own_imagefolder_and_models(example, factories, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(app, [
        "evaluate", "--old", f"factory:my_models:digit_mlp@{example / 'old.pt'}", "--new", f"factory:my_models:digit_cnn@{example / 'new.pt'}",
        "--data", f"imagefolder:{example / 'images'}", "--split", "test", "--out", str(out), "--params", str(tmp_path / "absent.yaml"),
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 360
    # the example's models are adversarially trained: robust but not perfectly, and the CNN is better
    assert 0.5 < metrics["robust_accuracy_old"] < metrics["robust_accuracy_new"] < 1.0


def test_wrong_factory_for_weights_is_one_line_error(example, factories, tmp_path):
    result = runner.invoke(app, [
        "evaluate", "--old", f"factory:my_models:digit_cnn@{example / 'old.pt'}", "--new", f"factory:my_models:digit_cnn@{example / 'new.pt'}",
        "--data", f"imagefolder:{example / 'images'}", "--out", str(tmp_path / "o"), "--params", str(tmp_path / "absent.yaml"),
    ])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "old.pt" in result.stderr and "do not fit" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _params_with_references(example, tmp_path):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"]["source"] = f"imagefolder:{example / 'images'}"
    raw["train_old"]["reference"] = f"factory:my_models:digit_mlp@{example / 'old.pt'}"
    raw["train_new"]["reference"] = f"factory:my_models:digit_cnn@{example / 'new.pt'}"
    raw["tracking"]["enabled"] = False
    return parse_params(raw)


def test_pipeline_imports_own_models(example, factories, tmp_path):
    """With references set, the train stages import the user's models; later stages reload them
    because the params name their factories."""
    params = _params_with_references(example, tmp_path)
    layout = pipeline.Layout(tmp_path / "data")
    pipeline.prepare(params, layout)
    for role in ("old", "new"):
        pipeline.train(params, role, layout)
    model = load_model(layout.model("new"), "cpu", params.trusted_factories())
    assert model.spec.architecture == "factory:my_models:digit_cnn"
    assert model.metadata["imported_from"] == params.train_new.reference
    reference = torch.load(example / "new.pt", weights_only=True)
    assert all(torch.equal(reference[name], value) for name, value in model.network.state_dict().items())
    # a model file naming a factory the params do not name is refused
    with pytest.raises(InputError, match="do not name"):
        load_model(layout.model("new"), "cpu")


def test_model_file_cannot_choose_code_to_run(tmp_path):
    """A crafted model file whose header names ``os:system`` is refused before anything is imported or called."""
    marker = tmp_path / "pwned"
    spec = ModelSpec("factory:os:system", (1, 8, 8), 10)
    network = torch.nn.Linear(1, 1)
    path = tmp_path / "evil.safetensors"
    save_model(network, spec, path)
    with pytest.raises(InputError, match="user code"):
        load_model(path)
    assert not marker.exists()


def test_torchscript_reference_cannot_be_finetuned(example, factories, tmp_path):
    params = _params_with_references(example, tmp_path)
    raw = params.model_dump(mode="json")
    raw["train_old"]["reference"] = "torchscript:whatever.pt"
    with pytest.raises(InputError, match="TorchScript"):
        pipeline.import_model(parse_params(raw), "old", pipeline.Layout(tmp_path / "data"))
