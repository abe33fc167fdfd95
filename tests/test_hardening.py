"""Inputs of a careless or hostile user (issue: a gate that cannot be fooled): each ends in the
one-line error with its exit code, or in a stated behaviour, never a traceback, an exhausted
machine or a silent change. docs/ROBUSTNESS.md lists every case with its message and test."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import copy_evaluated
from rcat import engine
from rcat.cli import EXIT_BAD_INPUT, app
from rcat.config import AttackConfig, load_params
from rcat.dask_executor import require_reachable
from rcat.errors import ConfigError, InputError, TrainingFailed
from rcat.models import ModelSpec, load_model
from rcat.pixels import as_float_images
from rcat.safe_io import parquet_metadata, read_parquet, write_parquet, write_tensors

runner = CliRunner()


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rcat: error: "), result.stderr
    print(lines[0])
    return lines[0]


@pytest.fixture
def project(evaluated_project, tmp_path, monkeypatch):
    work = copy_evaluated(evaluated_project, tmp_path / "project")
    monkeypatch.chdir(work)
    return work


def edit_params(**changes) -> None:
    raw = yaml.safe_load(open("params.yaml"))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    yaml.safe_dump(raw, open("params.yaml", "w"), sort_keys=False)


# ---------------------------------------------------------------- case 4: cached attacks without their manifest


def test_forged_shards_without_a_manifest_are_recomputed(trained_mlp, tiny_split, tmp_path):
    """Forged robust flags in the shards, manifest deleted: RNFR went 0.024 -> 0.0 with no warning."""
    network, _ = trained_mlp
    config = AttackConfig(name="apgd", loss="dlr", eps=0.1, steps=5, batch_size=16)
    provenance = {"split": "validation", "model": "mlp", "model_digest": "m" * 64, "split_digest": "s" * 64}

    def run():
        return engine.run_attack(network, tiny_split, config, num_classes=10, seed=0, provenance=provenance, cache_dir=tmp_path, chunk_size=32)

    first = run()
    key_dir = next(tmp_path.iterdir())
    (key_dir / "manifest.json").unlink()
    for shard in sorted(key_dir.glob("chunk-*.parquet")):
        frame, metadata = read_parquet(shard), parquet_metadata(shard)
        frame["robust"] = frame["clean_correct"]  # "the attack failed everywhere"
        write_parquet(shard, frame, metadata)  # the forger keeps the engine's key in the footer
    with pytest.warns(engine.CacheWarning, match="differ from its own checksum"):
        again = run()
    pd.testing.assert_frame_equal(first, again)


def test_a_shard_without_its_checksum_is_not_trusted(trained_mlp, tiny_split, tmp_path):
    network, _ = trained_mlp
    config = AttackConfig(name="fgsm", loss="ce", eps=0.05, batch_size=16)
    provenance = {"split": "validation", "model": "mlp", "model_digest": "m" * 64, "split_digest": "s" * 64}
    engine.run_attack(network, tiny_split, config, num_classes=10, seed=0, provenance=provenance, cache_dir=tmp_path, chunk_size=32)
    key_dir = next(tmp_path.iterdir())
    (key_dir / "manifest.json").unlink()
    shard = key_dir / "chunk-00000.parquet"
    metadata = parquet_metadata(shard)
    del metadata["content_sha256"]
    write_parquet(shard, read_parquet(shard), metadata)
    with pytest.warns(engine.CacheWarning, match="no content checksum"):
        engine.run_attack(network, tiny_split, config, num_classes=10, seed=0, provenance=provenance, cache_dir=tmp_path, chunk_size=32)


# ---------------------------------------------------------------- case 5: one bad value exhausts the machine


def test_a_huge_label_is_refused_before_anything_is_sized_by_it(tmp_path, model_files):
    path = tmp_path / "data.npz"
    labels = np.arange(60) % 10
    labels[3] = 10**9
    np.savez(path, images=np.random.default_rng(0).random((60, 1, 8, 8)).astype(np.float32), labels=labels)
    old, new = model_files
    result = runner.invoke(app, ["evaluate", "--old", str(old), "--new", str(new), "--data", f"npz:{path}", "--out", str(tmp_path / "o")])
    assert result.exit_code == EXIT_BAD_INPUT
    line = error_line(result)
    assert "label 1000000000 is out of range" in line and "10000" in line


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(levels) + "\n")
    assert path.stat().st_size < 1024
    with pytest.raises(ConfigError, match="expands to .* YAML nodes through its aliases"):
        load_params(path)
    result = runner.invoke(app, ["decide", "--params", str(path)])
    assert result.exit_code == EXIT_BAD_INPUT and "aliases" in error_line(result)


def test_profiles_with_a_few_aliases_still_load():
    from conftest import REPO_ROOT

    params = load_params(REPO_ROOT / "benchmarks" / "profiles" / "cifar10.yaml")
    assert params.finetune.methods["pct_at"].grid == params.finetune.methods["pct"].grid


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\nfinetune:\n  methods: {at: {loss: at}}\n  epochs: 2\n  epochs: 20\n")
    with pytest.raises(ConfigError, match=r"line 5 \(duplicate key 'epochs' \(first at line 4\)\)"):
        load_params(path)


def test_huge_architecture_kwargs_are_refused_before_allocating(project):
    edit_params(train_old__architecture_kwargs={"hidden": [10**12]})
    result = runner.invoke(app, ["stage", "train", "old"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "weights (at most 500,000,000)" in error_line(result)


# ---------------------------------------------------------------- training that failed says so


def test_a_diverged_training_run_fails_with_stage_epoch_and_fix(project):
    edit_params(train_old__lr=1e6)
    result = runner.invoke(app, ["stage", "train", "old"])
    assert result.exit_code == EXIT_BAD_INPUT
    line = error_line(result)
    assert "stage train_old" in line and "epoch" in line and "lower the learning rate" in line


def test_a_run_that_learned_nothing_fails(digits_splits):
    from rcat.config import TrainConfig
    from rcat.finetune import adversarial_train

    spec = ModelSpec("mlp", (1, 8, 8), 10, {"hidden": [8]})
    config = TrainConfig(epochs=1, lr=1e-9, momentum=0.0, attack=AttackConfig(name="fgsm", loss="ce", eps=0.01), seed=0)
    with pytest.raises(TrainingFailed, match="no better than always predicting the most frequent class"):
        adversarial_train(spec.build(), digits_splits["finetune"], config, torch.device("cpu"), label="stage train_old")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("train_old__lr", float("inf"), "train_old.lr"),
    ("finetune__momentum", float("nan"), "finetune.momentum"),
    ("decision__confirmation_split", "validation", "confirms nothing"),
], ids=["lr-inf", "momentum-nan", "same-splits"])
def test_values_that_cannot_be_trained_or_decided_on(project, key, value, message):
    edit_params(**{key: value})
    result = runner.invoke(app, ["decide"])
    assert result.exit_code == EXIT_BAD_INPUT and message in error_line(result)


# ---------------------------------------------------------------- images as they are


def _folder(root, images: dict[str, list[tuple[str, object]]]):
    from PIL import Image

    for label, files in images.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name, array in files:
            Image.fromarray(array).save(root / label / name) if not isinstance(array, Image.Image) else array.save(root / label / name)
    return root


def test_16_bit_pngs_keep_their_range(tmp_path):
    from PIL import Image

    from rcat.data import load_imagefolder

    gradient = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    image16 = Image.fromarray(gradient)
    assert image16.mode.startswith("I;16")
    root = _folder(tmp_path / "images", {"a": [("x.png", image16)], "b": [("y.png", np.full((8, 8, 3), 128, np.uint8))]})
    dataset = load_imagefolder(root)
    values = as_float_images(dataset.images)[0, 0].flatten()
    # scaled by 255/65535, not clipped: the gradient spans the range (convert("RGB") made it 0 or 1)
    assert values.min() == 0.0 and values.max() == pytest.approx(round(65520 * 255 / 65535) / 255)
    assert len(torch.unique(values)) == 64
    assert torch.equal(dataset.images[0, 0], dataset.images[0, 2])  # grey copied to the three channels


def test_alpha_is_dropped_by_rule(tmp_path):
    from rcat.data import load_imagefolder

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red
    root = _folder(tmp_path / "images", {"a": [("x.png", rgba)], "b": [("y.png", np.zeros((4, 4, 3), np.uint8))]})
    assert load_imagefolder(root).images[0, 0, 0, 0] == 200  # 8-bit pixels kept as they are (rcat.pixels)


def test_nested_folders_and_empty_classes_are_refused_by_name(tmp_path):
    from rcat.data import load_imagefolder

    pixel = np.zeros((4, 4, 3), np.uint8)
    nested = _folder(tmp_path / "nested", {"a": [("x.png", pixel)], "b": [("y.png", pixel)], "b/more": [("z.png", pixel)]})
    with pytest.raises(InputError, match=r"nested/b/more: a folder inside class folder 'b'"):
        load_imagefolder(nested)
    empty = _folder(tmp_path / "empty", {"a": [("x.png", pixel)], "b": [("y.png", pixel)]})
    (empty / "c").mkdir()
    with pytest.raises(InputError, match=r"empty/c: class folder holds no images"):
        load_imagefolder(empty)


def test_a_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    from PIL import Image

    from rcat.data import load_imagefolder

    root = _folder(tmp_path / "images", {"a": [("big.png", np.zeros((64, 64, 3), np.uint8))], "b": [("y.png", np.zeros((4, 4, 3), np.uint8))]})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4,096 pixels: over twice the limit
    with pytest.raises(InputError, match=r"big.png: image too large to decode safely"):
        load_imagefolder(root)


def test_a_label_gap_is_named_not_reported_as_a_stratification_failure(tmp_path):
    from rcat.config import DataConfig
    from rcat.data import load_dataset, split_dataset

    path = tmp_path / "gap.npz"
    np.savez(path, images=np.zeros((40, 1, 4, 4), np.float32), labels=np.array([0, 2] * 20))
    with pytest.raises(InputError, match=r"class 1 \('1'\) has no samples"):
        split_dataset(load_dataset(f"npz:{path}"), DataConfig(), 0)


# ---------------------------------------------------------------- tracebacks that became one line


HEADERS = {
    "num_classes not a number": ({"num_classes": "ten"}, "num_classes"),
    "input_shape not JSON": ({"input_shape": "[1, 8"}, "input_shape"),
    "input_shape empty": ({"input_shape": "[]"}, "input_shape"),
    "input_shape of zeros": ({"input_shape": "[0, 8, 8]"}, "input_shape"),
    "input_shape too large": ({"input_shape": "[60000, 60000, 3]"}, "input_shape"),
    "kwargs not a mapping": ({"kwargs": "[1, 2]"}, "kwargs"),
    "kwargs missing": ({"kwargs": None}, "kwargs"),
    "architecture empty": ({"architecture": ""}, "architecture"),
    "normalization with a zero std": ({"normalization": "[[0.5], [0.0]]"}, "normalization"),
    "num_classes huge": ({"num_classes": "1000000000"}, "num_classes"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_malformed_model_headers_are_one_line(tmp_path, trained_mlp, case):
    from safetensors.torch import save_file

    network, spec = trained_mlp
    changes, field = HEADERS[case]
    metadata = spec.to_metadata()
    for key, value in changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path), metadata=metadata)
    with pytest.raises(InputError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message and field in message and "\n" not in message


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 12]), torch.tensor([0.0, 1.0, 2.0])], ids=["out-of-range", "float"])
def test_split_files_with_bad_labels_are_one_line(tmp_path, labels):
    from rcat.data import load_split

    path = tmp_path / "split.safetensors"
    write_tensors(path, {"images": torch.zeros(3, 1, 4, 4), "labels": labels, "sample_index": torch.arange(3)}, {"num_classes": "10", "split": "test"})
    with pytest.raises(InputError, match="split.safetensors: (labels must lie in 0..9|labels must be int64)"):
        load_split(path)


def test_a_malformed_replay_section_is_exit_2_even_with_fail_on_reject(tmp_path):
    path = tmp_path / "decision.json"
    path.write_text(json.dumps({"verdict": "promote", "candidate": "at", "replay": {"evaluations": [], "expected_samples": 3, "decision_config": {}}}))
    result = runner.invoke(app, ["decide", "--replay", str(path), "--fail-on-reject"])
    assert result.exit_code == EXIT_BAD_INPUT
    error_line(result)


def test_an_unreachable_dask_scheduler_is_one_line(free_port):
    with pytest.raises(InputError, match=rf"engine.dask_address tcp://127.0.0.1:{free_port}: no Dask scheduler answered"):
        require_reachable(f"tcp://127.0.0.1:{free_port}", timeout=2)


@pytest.fixture
def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("uri", "message"), [("sqlite://mlflow.db", "three or four slashes"), ("sqlite:///no/such/dir/mlflow.db", "does not exist")])
def test_mistyped_sqlite_uris_are_refused(uri, message):
    from rcat.tracking import check_sqlite_store

    with pytest.raises(InputError, match=message):
        check_sqlite_store(uri)


def test_a_new_sqlite_store_is_announced(tmp_path, capsys):
    from rcat.tracking import check_sqlite_store

    check_sqlite_store(f"sqlite:///{tmp_path}/fresh.db")
    assert "creating a new, empty one" in capsys.readouterr().err
    (tmp_path / "fresh.db").write_bytes(b"")
    check_sqlite_store(f"sqlite:///{tmp_path}/fresh.db")
    assert capsys.readouterr().err == ""


def test_a_corrupt_sqlite_store_is_named_not_reported_as_silent(tmp_path):
    from rcat.tracking import check_sqlite_store

    (tmp_path / "mlflow.db").write_bytes(b"this is not a database, but text that got in its place")
    with pytest.raises(InputError, match="mlflow.db is not an SQLite database"):
        check_sqlite_store(f"sqlite:///{tmp_path}/mlflow.db")


def test_nothing_is_written_when_params_are_bad(project):
    before = open("data/decide/decision.json").read()
    edit_params(train_old__lr=float("inf"))
    assert runner.invoke(app, ["decide"]).exit_code == EXIT_BAD_INPUT
    assert open("data/decide/decision.json").read() == before


def test_a_relative_store_resolves_to_the_project_root_even_in_a_dvc_temp_workspace(tmp_path, monkeypatch):
    """`dvc exp run --temp` / `--queue` run stages in <project>/.dvc/tmp/exps/...: their runs belong in the project's store."""
    from rcat.config import TrackingConfig
    from rcat.tracking import project_root, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmp4f2a"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    assert project_root() == (tmp_path / "project").resolve()
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{(tmp_path / 'project' / 'mlflow.db').resolve().as_posix()}"
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(TrackingConfig(uri="sqlite:///stores/m.db?timeout=5")) == f"sqlite:///{(tmp_path / 'stores' / 'm.db').resolve().as_posix()}?timeout=5"
    assert tracking_uri(TrackingConfig(uri="http://127.0.0.1:5000")) == "http://127.0.0.1:5000"


def test_champion_reference_without_a_pin_is_one_line(tmp_path):
    from rcat.registry import read_champion_pin

    with pytest.raises(InputError, match="no pinned champion; run 'rcat champion --pin'"):
        read_champion_pin(tmp_path / "rcat-champion.json")
    (tmp_path / "rcat-champion.json").write_text('{"reference": null}')
    with pytest.raises(InputError, match="no pinned champion"):
        read_champion_pin(tmp_path / "rcat-champion.json")
    (tmp_path / "rcat-champion.json").write_text('{"reference": "models:/rcat-digits@champion"}')  # an alias is not a pin
    with pytest.raises(InputError, match="no pinned champion"):
        read_champion_pin(tmp_path / "rcat-champion.json")
    (tmp_path / "rcat-champion.json").write_text('{"reference": "models:/rcat-digits/7"}')
    assert read_champion_pin(tmp_path / "rcat-champion.json") == "models:/rcat-digits/7"


@pytest.mark.parametrize("name", ["cifar10.yaml", "cifar10_compare.yaml", "cifar10_pair.yaml", "cifar10_pair_gpu.yaml"])
def test_every_benchmark_profile_is_a_valid_params_file(name):
    from conftest import REPO_ROOT

    params = load_params(REPO_ROOT / "benchmarks" / "profiles" / name)
    assert params.finetune.methods


def test_the_comparisons_families_name_its_methods_once_each():
    from conftest import REPO_ROOT
    from rcat.config import read_yaml

    profiles = REPO_ROOT / "benchmarks" / "profiles"
    methods = load_params(profiles / "cifar10_compare.yaml").finetune.methods
    listed = [point for points in read_yaml(profiles / "cifar10_compare.families.yaml")["families"].values() for point in points]
    assert sorted(listed) == sorted(methods)
    assert methods["hinge_b4"].constraint_term == "margin_hinge"
