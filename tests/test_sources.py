"""Bring-your-own data and model sources: npz, CIFAR-10 binary/python releases, factory and TorchScript models."""

from __future__ import annotations

import os
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from rcat.config import DataConfig
from rcat.data import CIFAR10_CLASSES, load_dataset
from rcat.errors import InputError
from rcat.models import ModelSpec, Normalize, load_model_reference, save_model, weights_digest
from rcat.pixels import as_float_images

# ---------------------------------------------------------------- npz


def _random_uint8_images(n=12, channels=3, size=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_npz_uint8_roundtrip_both_layouts(tmp_path, layout):
    images = _random_uint8_images()
    labels = np.arange(12) % 3
    stored = images if layout == "nchw" else images.transpose(0, 2, 3, 1)
    path = tmp_path / "data.npz"
    np.savez(path, images=stored, labels=labels)
    dataset = load_dataset(f"npz:{path}")
    assert dataset.images.shape == (12, 3, 5, 5) and dataset.images.dtype == torch.float32
    assert torch.equal(dataset.images, torch.from_numpy(images).float() / 255.0)
    assert dataset.labels.tolist() == labels.tolist() and dataset.labels.dtype == torch.int64
    assert dataset.classes == ("0", "1", "2") and dataset.source == f"npz:{path}"


def test_npz_float_greyscale_nhwc_and_class_names(tmp_path):
    images = np.random.default_rng(1).random((6, 7, 7, 1)).astype(np.float64)  # NHWC, 1 channel
    path = tmp_path / "grey.npz"
    np.savez_compressed(path, images=images, labels=np.array([0, 1, 0, 1, 0, 1]), classes=np.array(["cat", "dog"]))
    dataset = load_dataset(f"npz:{path}")
    assert dataset.images.shape == (6, 1, 7, 7)
    assert torch.allclose(dataset.images, torch.from_numpy(images).permute(0, 3, 1, 2).float())
    assert dataset.classes == ("cat", "dog")


def test_npz_errors_name_file_and_array(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pictures=np.zeros((2, 1, 2, 2)), labels=np.zeros(2, dtype=int))
    with pytest.raises(InputError, match="images") as info:
        load_dataset(f"npz:{path}")
    assert str(path) in str(info.value) and "missing" in str(info.value)
    np.savez(path, images=np.zeros((2, 2, 2)), labels=np.zeros(2, dtype=int))
    with pytest.raises(InputError, match="'images'.*shape"):
        load_dataset(f"npz:{path}")
    np.savez(path, images=np.zeros((2, 1, 2, 2)), labels=np.zeros(3, dtype=int))
    with pytest.raises(InputError, match="'labels'"):
        load_dataset(f"npz:{path}")
    np.savez(path, images=np.full((2, 1, 2, 2), 300.0), labels=np.zeros(2, dtype=int))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_dataset(f"npz:{path}")
    np.savez(path, images=np.zeros((2, 1, 2, 2), dtype=np.int32), labels=np.zeros(2, dtype=int))
    with pytest.raises(InputError, match="dtype"):
        load_dataset(f"npz:{path}")
    # an object array would need pickle: refused, not unpickled
    np.savez(path, images=np.zeros((2, 1, 2, 2)), labels=np.array([0, None], dtype=object))
    with pytest.raises(InputError, match="pickle"):
        load_dataset(f"npz:{path}")
    with pytest.raises(InputError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


# ---------------------------------------------------------------- CIFAR-10 binary


def _cifar_records(n, seed):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return labels, pixels


def _write_cifar_binary(path, labels, pixels):
    path.write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())


def test_cifar10_binary_reads_all_data_batches_in_order(tmp_path):
    first = _cifar_records(20, seed=0)
    second = _cifar_records(10, seed=1)
    _write_cifar_binary(tmp_path / "data_batch_2.bin", *second)
    _write_cifar_binary(tmp_path / "data_batch_1.bin", *first)
    _write_cifar_binary(tmp_path / "test_batch.bin", *_cifar_records(10, seed=2))  # not read when data batches exist
    dataset = load_dataset(f"cifar10-binary:{tmp_path}")
    assert dataset.images.shape == (30, 3, 32, 32) and dataset.images.dtype == torch.uint8 and dataset.classes == CIFAR10_CLASSES
    expected = np.concatenate([first[1], second[1]]).reshape(30, 3, 32, 32)
    assert torch.equal(as_float_images(dataset.images), torch.from_numpy(expected).float() / 255.0)
    assert dataset.labels.tolist() == first[0].tolist() + second[0].tolist()


def test_cifar10_binary_test_batch_only_and_nested_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    labels, pixels = _cifar_records(20, seed=3)
    _write_cifar_binary(folder / "test_batch.bin", labels, pixels)
    (folder / "batches.meta.txt").write_text("\n".join(f"c{k}" for k in range(10)) + "\n\n")
    dataset = load_dataset(f"cifar10-binary:{tmp_path}")  # the parent of the extracted folder works too
    assert len(dataset.labels) == 20 and dataset.classes == tuple(f"c{k}" for k in range(10))
    # red channel of the first image is the first 1024 pixel bytes
    assert torch.equal(dataset.images[0, 0], torch.from_numpy(pixels[0, :1024].reshape(32, 32)))  # 8-bit pixels as stored


def test_cifar10_binary_truncated_file_is_named(tmp_path):
    _write_cifar_binary(tmp_path / "data_batch_1.bin", *_cifar_records(20, seed=0))
    broken = tmp_path / "data_batch_2.bin"
    _write_cifar_binary(broken, *_cifar_records(20, seed=1))
    broken.write_bytes(broken.read_bytes()[:-100])
    with pytest.raises(InputError, match="data_batch_2.bin") as info:
        load_dataset(f"cifar10-binary:{tmp_path}")
    assert "truncated" in str(info.value) and "3073" in str(info.value)


def test_cifar10_binary_missing_files_and_bad_labels(tmp_path):
    with pytest.raises(InputError, match="no data_batch"):
        load_dataset(f"cifar10-binary:{tmp_path}")
    with pytest.raises(InputError, match="not found"):
        load_dataset(f"cifar10-binary:{tmp_path / 'absent'}")
    labels, pixels = _cifar_records(10, seed=0)
    labels[3] = 42
    _write_cifar_binary(tmp_path / "data_batch_1.bin", labels, pixels)
    with pytest.raises(InputError, match="label 42"):
        load_dataset(f"cifar10-binary:{tmp_path}")


# ---------------------------------------------------------------- CIFAR-10 python


def _write_cifar_python(path, labels, pixels):
    with open(path, "wb") as handle:
        # protocol 4 (Python 3.8-3.13's default) pickles arrays through numpy's _reconstruct
        pickle.dump({b"batch_label": b"training batch", b"data": pixels, b"labels": labels.tolist(), b"filenames": [b"a.png"] * len(labels)}, handle, protocol=4)


def test_cifar10_python_roundtrip(tmp_path):
    first = _cifar_records(20, seed=0)
    second = _cifar_records(20, seed=1)
    _write_cifar_python(tmp_path / "data_batch_1", *first)
    _write_cifar_python(tmp_path / "data_batch_2", *second)
    with open(tmp_path / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_vis": 3072}, handle, protocol=4)
    dataset = load_dataset(f"cifar10-python:{tmp_path}")
    expected = np.concatenate([first[1], second[1]]).reshape(40, 3, 32, 32)
    assert torch.equal(as_float_images(dataset.images), torch.from_numpy(expected).float() / 255.0)
    assert dataset.labels.tolist() == first[0].tolist() + second[0].tolist()
    assert dataset.classes == CIFAR10_CLASSES
    # the binary and python releases of the same records give the same dataset
    _write_cifar_binary(tmp_path / "data_batch_1.bin", *first)
    _write_cifar_binary(tmp_path / "data_batch_2.bin", *second)
    binary = load_dataset(f"cifar10-binary:{tmp_path}")
    assert torch.equal(binary.images, dataset.images) and torch.equal(binary.labels, dataset.labels)


class _Trap:
    """Unpickling this creates a marker file: proof that a loader executed pickle code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemTrap:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("trap", [_Trap, _SystemTrap])
def test_malicious_cifar10_python_pickle_is_refused(tmp_path, trap):
    marker = tmp_path / "unpickled.marker"
    labels, pixels = _cifar_records(10, seed=0)
    with open(tmp_path / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": pixels, b"labels": labels.tolist(), b"x": trap(marker)}, handle, protocol=4)
    with pytest.raises(InputError, match="disallowed global") as info:
        load_dataset(f"cifar10-python:{tmp_path}")
    assert "data_batch_1" in str(info.value) and "refused" in str(info.value)
    assert not marker.exists(), "the CIFAR-10 python loader executed code from a pickle"
    # the trap is real: an unrestricted unpickler would have sprung it
    with open(tmp_path / "data_batch_1", "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


def test_cifar10_python_bad_content(tmp_path):
    with open(tmp_path / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 10), dtype=np.uint8), b"labels": [0, 1]}, handle, protocol=4)
    with pytest.raises(InputError, match=r"test_batch: b'data'"):
        load_dataset(f"cifar10-python:{tmp_path}")
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable"):
        load_dataset(f"cifar10-python:{tmp_path}")


def test_data_config_accepts_the_new_sources():
    for source in ("digits", "imagefolder:x", "npz:data.npz", "cifar10-binary:dir", "cifar10-python:dir"):
        assert DataConfig(source=source).source == source
    for source in ("cifar10", "npz:", "cifar10-binary: ", "mnist:x"):
        with pytest.raises(ValidationError):
            DataConfig(source=source)


# ---------------------------------------------------------------- imagefolder on the shared CIFAR-10 JPEGs

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg" / "train"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"shared CIFAR-10 JPEGs not found at {SHARED_CIFAR}")
def test_imagefolder_on_shared_cifar10_subset(tmp_path):
    root = tmp_path / "subset"
    for name in ("airplane", "automobile"):
        (root / name).mkdir(parents=True)
        for image in sorted((SHARED_CIFAR / name).iterdir())[:50]:
            (root / name / image.name).symlink_to(image)
    dataset = load_dataset(f"imagefolder:{root}")
    assert dataset.images.shape == (100, 3, 32, 32) and dataset.classes == ("airplane", "automobile")
    assert dataset.labels.tolist() == [0] * 50 + [1] * 50


# ---------------------------------------------------------------- models

FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def tiny_net():
        torch.manual_seed(123)  # a different init from the saved weights
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 5))

    def not_a_module():
        return 42
    """
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    package = tmp_path / "modules"
    package.mkdir()
    (package / "rcat_test_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(package))
    import importlib

    importlib.invalidate_caches()
    yield importlib.import_module("rcat_test_factory")
    import sys

    sys.modules.pop("rcat_test_factory", None)


@pytest.fixture
def trained_tiny(factory_module):
    torch.manual_seed(0)
    network = factory_module.tiny_net()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter))
    return network.eval()


def _same_logits(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("fmt", ["safetensors", "state_dict", "checkpoint"])
def test_factory_model_loads_weights(tmp_path, trained_tiny, fmt):
    if fmt == "safetensors":
        weights = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in trained_tiny.state_dict().items()}, str(weights))
    elif fmt == "state_dict":
        weights = tmp_path / "w.pt"
        torch.save(trained_tiny.state_dict(), weights)
    else:
        weights = tmp_path / "ckpt.pth"
        torch.save({"state_dict": trained_tiny.state_dict(), "epoch": 3}, weights)
    reference = f"factory:rcat_test_factory:tiny_net@{weights}"
    loaded = load_model_reference(reference, "cpu", input_shape=(3, 4, 4))
    assert not loaded.network.training
    assert loaded.spec == ModelSpec("factory:rcat_test_factory:tiny_net", (3, 4, 4), 5, {"weights": str(weights)})
    assert loaded.digest == weights_digest(trained_tiny) and loaded.path == reference
    assert _same_logits(loaded.network, trained_tiny, torch.rand(6, 3, 4, 4))


def test_factory_refuses_a_pickled_module(tmp_path, trained_tiny):
    marker = tmp_path / "unpickled.marker"
    weights = tmp_path / "whole.pt"
    torch.save(trained_tiny, weights)  # a whole nn.Module: needs code to unpickle
    with pytest.raises(InputError, match="state_dict") as info:
        load_model_reference(f"factory:rcat_test_factory:tiny_net@{weights}", input_shape=(3, 4, 4))
    assert "safetensors" in str(info.value) and "whole.pt" in str(info.value)
    # a state dict with a trap inside is refused without springing it
    torch.save({"0.weight": torch.zeros(1), "trap": _Trap(marker)}, weights)
    with pytest.raises(InputError, match="weights_only"):
        load_model_reference(f"factory:rcat_test_factory:tiny_net@{weights}", input_shape=(3, 4, 4))
    assert not marker.exists()


def test_factory_reference_errors(tmp_path, trained_tiny):
    weights = tmp_path / "w.pt"
    torch.save(trained_tiny.state_dict(), weights)
    cases = {
        "factory:rcat_test_factory:tiny_net": "no weights",
        f"factory:no_such_module_xyz:net@{weights}": "cannot import",
        f"factory:rcat_test_factory:missing@{weights}": "no attribute",
        f"factory:rcat_test_factory:not_a_module@{weights}": "not a torch nn.Module",
        f"factory:rcat_test_factory:tiny_net@{tmp_path / 'absent.pt'}": "not found",
    }
    for reference, match in cases.items():
        with pytest.raises(InputError, match=match):
            load_model_reference(reference, input_shape=(3, 4, 4))
    torch.save({"0.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(InputError, match="do not fit"):
        load_model_reference(f"factory:rcat_test_factory:tiny_net@{weights}", input_shape=(3, 4, 4))
    torch.save(trained_tiny.state_dict(), weights)
    with pytest.raises(InputError, match="input_shape"):
        load_model_reference(f"factory:rcat_test_factory:tiny_net@{weights}")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_roundtrip(tmp_path, trained_tiny):
    path = tmp_path / "net.pt"
    torch.jit.script(trained_tiny).save(str(path))
    loaded = load_model_reference(f"torchscript:{path}", input_shape=(3, 4, 4), num_classes=5)
    assert loaded.spec.architecture == "torchscript" and loaded.spec.num_classes == 5
    assert loaded.spec.input_shape == (3, 4, 4)
    assert loaded.digest == weights_digest(trained_tiny)
    assert _same_logits(loaded.network, trained_tiny, torch.rand(6, 3, 4, 4))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a TorchScript"):
        load_model_reference(f"torchscript:{tmp_path / 'junk.pt'}", input_shape=(3, 4, 4))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_normalization_wrapper_matches_normalizing_by_hand(tmp_path, trained_tiny):
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained_tiny.state_dict().items()}, str(weights))
    script = tmp_path / "net.pt"
    torch.jit.script(trained_tiny).save(str(script))
    x = torch.rand(7, 3, 4, 4)
    by_hand = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = trained_tiny(by_hand)
    for reference in (f"factory:rcat_test_factory:tiny_net@{weights}", f"torchscript:{script}"):
        loaded = load_model_reference(reference, input_shape=(3, 4, 4), normalization=(mean, std))
        assert isinstance(loaded.network[0], Normalize)
        assert loaded.spec.normalization == (mean, std)
        with torch.no_grad():
            assert torch.allclose(loaded.network(x), expected, atol=1e-6)
    with pytest.raises(InputError, match="per channel"):
        load_model_reference(f"torchscript:{script}", input_shape=(3, 4, 4), normalization=((0.5, 0.5), (0.2, 0.2)))


def test_rcat_model_file_reference(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("mlp", (1, 8, 8), 10, {"hidden": [16]})
    network = spec.build().eval()
    path = tmp_path / "m.safetensors"
    digest = save_model(network, spec, path)
    loaded = load_model_reference(str(path))
    assert loaded.spec == spec and loaded.digest == digest
    assert load_model_reference(str(path), num_classes=10, input_shape=(1, 8, 8)).digest == digest
    with pytest.raises(InputError, match="classes"):
        load_model_reference(str(path), num_classes=3)
    with pytest.raises(InputError, match="normalisation"):
        load_model_reference(str(path), normalization=((0.5,), (0.5,)))
