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
from rcat.pixels import as_float_images

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


def test_readme_evaluate_on_own_imagefolder_and_models(example, factories, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the built-in defaults apply
    out = tmp_path / "eval"
    result = runner.invoke(app, [
        "evaluate", "--old", f"factory:my_models:digit_mlp@{example / 'old.pt'}", "--new", f"factory:my_models:digit_cnn@{example / 'new.pt'}",
        "--data", f"imagefolder:{example / 'images'}", "--split", "test", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 360
    # the example's models are adversarially trained: robust but not perfectly, and the CNN is better
    assert 0.5 < metrics["robust_accuracy_old"] < metrics["robust_accuracy_new"] < 1.0


def test_wrong_factory_for_weights_is_one_line_error(example, factories, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [
        "evaluate", "--old", f"factory:my_models:digit_cnn@{example / 'old.pt'}", "--new", f"factory:my_models:digit_cnn@{example / 'new.pt'}",
        "--data", f"imagefolder:{example / 'images'}", "--out", str(tmp_path / "o"),
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


def test_mlflow_model_uri_loads_rcat_file_without_unpickling(tmp_path, monkeypatch, trained_mlp):
    """models:/name@alias resolves through the registry to the logged rcat model file."""
    from mlflow.tracking import MlflowClient

    from rcat.models import load_model_reference

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    network, spec = trained_mlp
    save_model(network, spec, tmp_path / "model.safetensors")
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("byo"))
    client.log_artifact(run.info.run_id, str(tmp_path / "model.safetensors"), "model")
    client.create_registered_model("digits")
    version = client.create_model_version("digits", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("digits", "champion", version.version)

    loaded = load_model_reference("models:/digits@champion")
    assert loaded.path == "models:/digits@champion"
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.network(x), network(x))

    # an artifact holding a pickle, not an rcat model file, is refused and never unpickled
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    client.log_artifact(run.info.run_id, str(tmp_path / "evil.pt"), "pickled")
    with pytest.raises(InputError, match="exactly one rcat model file"):
        load_model_reference(f"runs:/{run.info.run_id}/pickled")
    with pytest.raises(InputError, match="cannot fetch"):
        load_model_reference("models:/digits@nonexistent")
    assert not marker.exists()


def test_stale_robustbench_copy_is_detected():
    """torchattacks 3.3's wheel installs its own old 'robustbench'; a factory importing it is refused."""
    import importlib.metadata

    from rcat.models import check_bundled_copies

    owners = importlib.metadata.packages_distributions().get("robustbench", [])
    if owners != ["torchattacks"]:
        pytest.skip(f"robustbench here is owned by {owners or 'nothing'}, not torchattacks' bundled copy")
    with pytest.raises(InputError, match="stale copy bundled in torchattacks"):
        check_bundled_copies("robustbench.model_zoo.cifar10")
    check_bundled_copies("my_models")  # anything else passes


def test_dataparallel_checkpoint_layout(tmp_path, factories):
    """{'state_dict': {'module.<name>': ...}} (a DataParallel checkpoint, RobustBench's layout) loads."""
    from my_models import digit_mlp

    from rcat.models import load_model_reference

    network = digit_mlp()
    torch.save({"state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    loaded = load_model_reference(f"factory:my_models:digit_mlp@{tmp_path / 'ckpt.pt'}", input_shape=(3, 8, 8))
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(loaded.network(x), network.eval()(x))


def test_imagefolder_transforms_resize_and_center_crop(tmp_path):
    """Mixed-size images load when resize + center_crop bring them to one size; tensors get the same ops."""
    import numpy as np
    from PIL import Image

    from rcat.data import load_dataset, transform_images

    for name, size in (("a", (20, 12)), ("b", (12, 16))):
        folder = tmp_path / name
        folder.mkdir()
        Image.fromarray(np.full((size[1], size[0], 3), 200, dtype=np.uint8)).save(folder / "x.png")
    with pytest.raises(InputError, match="data.resize"):
        load_dataset(f"imagefolder:{tmp_path}")
    dataset = load_dataset(f"imagefolder:{tmp_path}", resize=8, center_crop=8)
    assert dataset.images.shape == (2, 3, 8, 8)
    assert torch.allclose(as_float_images(dataset.images), torch.full_like(as_float_images(dataset.images), 200 / 255), atol=1 / 255)
    images = torch.rand(3, 1, 10, 14)
    out = transform_images(images, resize=5, center_crop=4)
    assert out.shape == (3, 1, 4, 4) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(transform_images(images, None, 6), images[..., 2:8, 4:10])
    with pytest.raises(InputError, match="center_crop"):
        transform_images(images, None, 11)
