"""Data sources, the seeded stratified split, split files, and self-describing model files."""

from __future__ import annotations

import copy
import io
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from rcat.config import DataConfig
from rcat.data import (
    Split,
    load_data_argument,
    load_dataset,
    load_imagefolder,
    load_split,
    save_split,
    split_dataset,
    subsample,
    validate_images,
)
from rcat.errors import InputError
from rcat.models import ModelSpec, check_model_on, load_model, save_model, weights_digest
from rcat.pixels import as_float_images
from rcat.safe_io import read_tensors, write_tensors

# ---------------------------------------------------------------- digits and the split


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_dataset_shape_and_range(digits):
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.float32
    assert digits.labels.shape == (1797,) and digits.labels.dtype == torch.int64
    assert digits.num_classes == 10 and digits.classes == tuple(str(k) for k in range(10))
    assert float(digits.images.min()) == 0.0 and float(digits.images.max()) == 1.0
    # pixel values are 0..16 scaled by 1/16
    assert torch.equal(digits.images * 16, (digits.images * 16).round())


def test_split_sizes_cover_everything_once(digits_splits, digits):
    sizes = {name: len(split) for name, split in digits_splits.items()}
    # test: ceil(0.2 * 1797) = 360; validation: ceil(0.25 * 1437) = 360; the rest fine-tunes
    assert sizes == {"finetune": 1077, "validation": 360, "test": 360}
    indices = [set(split.sample_index.tolist()) for split in digits_splits.values()]
    assert sum(len(s) for s in indices) == 1797
    assert set.union(*indices) == set(range(1797))
    for a in range(3):
        for b in range(a + 1, 3):
            assert not indices[a] & indices[b]


def test_split_rows_are_the_source_rows(digits_splits, digits):
    for split in digits_splits.values():
        assert torch.equal(split.sample_index, split.sample_index.sort().values)
        assert torch.equal(split.images, digits.images[split.sample_index])
        assert torch.equal(split.labels, digits.labels[split.sample_index])
        assert split.num_classes == 10 and split.source == "digits"


def test_split_is_stratified(digits_splits, digits):
    totals = torch.bincount(digits.labels, minlength=10).double()
    for name, fraction in (("finetune", 0.6), ("validation", 0.2), ("test", 0.2)):
        counts = torch.bincount(digits_splits[name].labels, minlength=10).double()
        assert (counts - fraction * totals).abs().max() <= 1.0 + 1e-9, (name, counts, fraction * totals)


def test_split_is_deterministic_and_seeded(digits_splits, digits):
    again = split_dataset(digits, DataConfig(), seed=0)
    other = split_dataset(digits, DataConfig(), seed=1)
    for name in ("finetune", "validation", "test"):
        assert again[name].digest == digits_splits[name].digest
        assert torch.equal(again[name].sample_index, digits_splits[name].sample_index)
        assert other[name].digest != digits_splits[name].digest
    assert len({split.digest for split in digits_splits.values()}) == 3


def test_split_digest_sees_every_field(tiny_split):
    base = tiny_split.digest
    images = tiny_split.images.clone()
    images[0, 0, 0, 0] = 1.0 - images[0, 0, 0, 0]
    labels = tiny_split.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    index = tiny_split.sample_index.clone()
    index[0] = 10_000
    for changed in (
        Split("v", images, tiny_split.labels, tiny_split.sample_index, 10, "digits"),
        Split("v", tiny_split.images, labels, tiny_split.sample_index, 10, "digits"),
        Split("v", tiny_split.images, tiny_split.labels, index, 10, "digits"),
    ):
        assert changed.digest != base


def test_other_fractions_and_impossible_split(digits):
    splits = split_dataset(digits, DataConfig(finetune_fraction=0.5, validation_fraction=0.3, test_fraction=0.2), seed=0)
    assert [len(splits[n]) for n in ("finetune", "validation", "test")] == [898, 539, 360]
    tiny = type(digits)(digits.images[:12], digits.labels[:12], digits.classes, "digits")
    with pytest.raises(InputError, match="stratified"):
        split_dataset(tiny, DataConfig(), seed=0)


def test_fractions_below_one_leave_the_rest_out(digits, digits_splits):
    """Shares of the whole source; disjoint, stratified; the test split is the same as with the full split."""
    splits = split_dataset(digits, DataConfig(finetune_fraction=0.3, validation_fraction=0.1, test_fraction=0.2), seed=0)
    sizes = [len(splits[n]) for n in ("finetune", "validation", "test")]
    assert sizes == [round(0.3 * 1797), round(0.1 * 1797), 360]
    indices = [set(splits[n].sample_index.tolist()) for n in ("finetune", "validation", "test")]
    assert not (indices[0] & indices[1]) and not (indices[0] & indices[2]) and not (indices[1] & indices[2])
    assert splits["test"].sample_index.tolist() == digits_splits["test"].sample_index.tolist()
    counts = torch.bincount(splits["finetune"].labels, minlength=10)
    assert counts.min() >= 50 and counts.max() <= 56  # about 54 per class


def test_subsample_is_stratified_and_seeded(digits_splits):
    split = digits_splits["finetune"]
    part = subsample(split, 0.3, seed=1)
    assert len(part) == 323  # floor(0.3 * 1077), scikit-learn's rounding of train_size
    counts = torch.bincount(part.labels, minlength=10).double()
    assert (counts - 0.3 * torch.bincount(split.labels, minlength=10).double()).abs().max() <= 1.0
    assert set(part.sample_index.tolist()) <= set(split.sample_index.tolist())
    assert part.digest == subsample(split, 0.3, seed=1).digest != subsample(split, 0.3, seed=2).digest
    assert subsample(split, 1.0, seed=1) is split


# ---------------------------------------------------------------- split files


def test_save_load_split_roundtrip(tmp_path, tiny_split):
    path = tmp_path / "validation.safetensors"
    digest = save_split(tiny_split, path)
    assert digest == tiny_split.digest
    loaded = load_split(path)
    assert loaded.digest == digest
    assert torch.equal(loaded.images, tiny_split.images)
    assert torch.equal(loaded.labels, tiny_split.labels)
    assert torch.equal(loaded.sample_index, tiny_split.sample_index)
    assert (loaded.name, loaded.num_classes, loaded.source) == ("validation", 10, "digits")
    assert load_data_argument(str(path), DataConfig(), seed=0).digest == digest


def test_edited_split_content_is_detected(tmp_path, tiny_split):
    path = tmp_path / "split.safetensors"
    save_split(tiny_split, path)
    tensors, metadata = read_tensors(path)
    tensors["labels"] = tensors["labels"].clone()
    tensors["labels"][5] = (tensors["labels"][5] + 1) % 10  # still a valid label: only the digest can tell
    write_tensors(path, tensors, metadata)
    with pytest.raises(InputError, match="digest") as info:
        load_split(path)
    assert str(path) in str(info.value)


def test_flipped_byte_in_split_data_is_detected(tmp_path, tiny_split):
    path = tmp_path / "split.safetensors"
    save_split(tiny_split, path)
    raw = bytearray(path.read_bytes())
    header_length = struct.unpack("<Q", raw[:8])[0]
    position = 8 + header_length + (len(raw) - 8 - header_length) // 2
    raw[position] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="digest"):
        load_split(path)


def test_tampered_split_header_is_detected(tmp_path, tiny_split):
    path = tmp_path / "split.safetensors"
    digest = save_split(tiny_split, path)
    raw = path.read_bytes()
    forged = ("0" if digest[0] != "0" else "1") + digest[1:]
    path.write_bytes(raw.replace(digest.encode(), forged.encode()))  # same length: still a valid file
    with pytest.raises(InputError, match="digest"):
        load_split(path)
    # a header that is no longer JSON
    raw = bytearray(path.read_bytes())
    raw[10:20] = b"\xff" * 10
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="not a valid safetensors"):
        load_split(path)


def test_non_split_safetensors_and_missing_file(tmp_path):
    path = tmp_path / "other.safetensors"
    write_tensors(path, {"weights": torch.zeros(3)}, {})
    with pytest.raises(InputError, match="not an rcat split"):
        load_split(path)
    with pytest.raises(InputError, match="not found"):
        load_split(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------- imagefolder


def write_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def test_imagefolder_labels_in_sorted_class_order(tmp_path):
    root = tmp_path / "images"
    white = np.full((5, 4, 3), 255)
    red = np.zeros((5, 4, 3))
    red[..., 0] = 51  # 51 / 255 = 0.2
    write_png(root / "zebra" / "b.png", white)
    write_png(root / "zebra" / "a.png", red)
    write_png(root / "apple" / "x.png", np.full((5, 4), 0), mode="L")  # greyscale, converted to RGB
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    dataset = load_imagefolder(root)
    assert dataset.classes == ("apple", "zebra")
    assert dataset.labels.tolist() == [0, 1, 1]
    assert dataset.images.shape == (3, 3, 5, 4) and dataset.images.dtype == torch.uint8  # 8-bit pixels (rcat.pixels)
    assert float(as_float_images(dataset.images).min()) >= 0.0 and float(as_float_images(dataset.images).max()) <= 1.0
    assert torch.equal(as_float_images(dataset.images)[0], torch.zeros(3, 5, 4))
    # files in sorted order inside a class: a.png (red), then b.png (white)
    assert torch.allclose(as_float_images(dataset.images)[1, 0], torch.full((5, 4), 0.2))
    assert torch.equal(as_float_images(dataset.images)[1, 1:], torch.zeros(2, 5, 4))
    assert torch.equal(as_float_images(dataset.images)[2], torch.ones(3, 5, 4))
    via_source = load_dataset(f"imagefolder:{root}")
    assert torch.equal(via_source.images, dataset.images) and via_source.source == f"imagefolder:{root}"


def test_truncated_image_is_refused_by_name(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    write_png(root / "a" / "ok.png", rng.integers(0, 256, (16, 16, 3)))
    write_png(root / "b" / "broken.png", rng.integers(0, 256, (16, 16, 3)))
    broken = root / "b" / "broken.png"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])
    with pytest.raises(InputError, match="broken.png") as info:
        load_imagefolder(root)
    assert "truncated" in str(info.value)


def test_garbage_image_is_refused_by_name(tmp_path):
    root = tmp_path / "images"
    write_png(root / "a" / "ok.png", np.zeros((4, 4, 3)))
    (root / "b").mkdir()
    (root / "b" / "fake.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(InputError, match="fake.jpg"):
        load_imagefolder(root)


def test_mixed_sizes_are_refused(tmp_path):
    root = tmp_path / "images"
    write_png(root / "a" / "one.png", np.zeros((4, 4, 3)))
    write_png(root / "b" / "two.png", np.zeros((4, 6, 3)))
    with pytest.raises(InputError, match="two.png") as info:
        load_imagefolder(root)
    assert "differs" in str(info.value)


def test_imagefolder_needs_two_classes_and_images(tmp_path):
    root = tmp_path / "images"
    write_png(root / "only" / "one.png", np.zeros((4, 4, 3)))
    with pytest.raises(InputError, match="two class"):
        load_imagefolder(root)
    (root / "empty").mkdir()
    (root / "only" / "one.png").unlink()
    with pytest.raises(InputError, match="no images"):
        load_imagefolder(root)
    with pytest.raises(InputError, match="not found"):
        load_imagefolder(tmp_path / "missing")
    with pytest.raises(InputError, match="unknown"):
        load_dataset("mnist")


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (torch.full((2, 1, 2, 2), float("nan")), torch.zeros(2, dtype=torch.long), "NaN"),
        (torch.full((2, 1, 2, 2), float("inf")), torch.zeros(2, dtype=torch.long), "NaN or inf"),
        (torch.full((2, 1, 2, 2), 1.5), torch.zeros(2, dtype=torch.long), r"\[0, 1\]"),
        (torch.full((2, 1, 2, 2), -0.01), torch.zeros(2, dtype=torch.long), r"\[0, 1\]"),
        (torch.zeros((0, 1, 2, 2)), torch.zeros(0, dtype=torch.long), "no samples"),
        (torch.zeros((2, 2, 2)), torch.zeros(2, dtype=torch.long), "shape"),
        (torch.zeros((2, 1, 2, 2)), torch.zeros(3, dtype=torch.long), "labels"),
    ],
)
def test_validate_images_rejects_bad_data(images, labels, match):
    with pytest.raises(InputError, match=match) as info:
        validate_images(images, labels, "somewhere")
    assert "somewhere" in str(info.value)


def test_validate_images_accepts_the_closed_unit_interval():
    validate_images(torch.tensor([0.0, 1.0, 0.5, 1.0]).view(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), "ok")


# ---------------------------------------------------------------- model files


def test_model_roundtrip_gives_identical_logits_and_digest(tmp_path, trained_mlp, tiny_split):
    network, spec = trained_mlp
    path = tmp_path / "model.safetensors"
    digest = save_model(network, spec, path, extra={"trained_on": "digits"})
    assert digest == weights_digest(network)
    loaded = load_model(path)
    assert loaded.digest == digest and loaded.spec == spec and loaded.path == str(path)
    assert loaded.metadata == {"trained_on": "digits"}
    assert not loaded.network.training
    with torch.no_grad():
        assert torch.equal(loaded.network(tiny_split.images), network(tiny_split.images))
    check_model_on(loaded, tiny_split.images, 10, "validation")


def test_model_with_normalisation_roundtrips(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("cnn", (3, 8, 8), 4, {"channels": [4, 8], "hidden": 16}, ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    network = spec.build().eval()
    save_model(network, spec, tmp_path / "cnn.safetensors")
    loaded = load_model(tmp_path / "cnn.safetensors")
    assert loaded.spec == spec
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), network(x))


def test_weights_digest_changes_with_any_weight(trained_mlp):
    network, _ = trained_mlp
    other = copy.deepcopy(network)
    with torch.no_grad():
        other[-1].bias[0] += 1e-3
    assert weights_digest(other) != weights_digest(network)
    assert weights_digest(copy.deepcopy(network)) == weights_digest(network)


def test_check_model_on_catches_mismatches(tmp_path, trained_mlp, tiny_split):
    network, spec = trained_mlp
    save_model(network, spec, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    with pytest.raises(InputError, match="10 classes") as info:
        check_model_on(loaded, tiny_split.images, 3, "validation")
    assert "validation" in str(info.value) and "m.safetensors" in str(info.value)
    with pytest.raises(InputError, match="shape"):
        check_model_on(loaded, torch.rand(4, 3, 8, 8), 10, "validation")
    with pytest.raises(InputError, match="shape"):
        check_model_on(loaded, torch.rand(4, 1, 4, 4), 10, "validation")


def test_nan_weights_are_refused(tmp_path, trained_mlp):
    network, spec = trained_mlp
    broken = copy.deepcopy(network)
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    save_model(broken, spec, tmp_path / "nan.safetensors")
    with pytest.raises(InputError, match="NaN") as info:
        load_model(tmp_path / "nan.safetensors")
    assert "1.weight" in str(info.value)


def test_edited_weights_are_detected(tmp_path, trained_mlp):
    network, spec = trained_mlp
    path = tmp_path / "m.safetensors"
    save_model(network, spec, path)
    tensors, metadata = read_tensors(path)
    tensors["1.bias"] = tensors["1.bias"] + 0.5
    write_tensors(path, tensors, metadata)
    with pytest.raises(InputError, match="digest"):
        load_model(path)


def test_safetensors_that_is_not_an_rcat_model_is_refused(tmp_path, trained_mlp):
    network, spec = trained_mlp
    plain = tmp_path / "plain.safetensors"
    write_tensors(plain, network.state_dict(), {"framework": "pt"})
    with pytest.raises(InputError, match="not an rcat model"):
        load_model(plain)
    # right header, wrong weights
    wrong = tmp_path / "wrong.safetensors"
    write_tensors(wrong, {"0.weight": torch.zeros(2, 2)}, spec.to_metadata())
    with pytest.raises(InputError, match="do not fit"):
        load_model(wrong)


class _Trap:
    """Unpickling this creates a marker file: proof that a loader executed pickle code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_pickle_file_is_refused_without_unpickling(tmp_path, trained_mlp, name):
    network, _ = trained_mlp
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / name
    torch.save({"state_dict": network.state_dict(), "trap": _Trap(marker)}, path)
    with pytest.raises(InputError) as info:
        load_model(path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "load_model executed code from a pickle"
    # the trap is real: an unpickling loader would have sprung it
    torch.load(io.BytesIO(path.read_bytes()), weights_only=False)
    assert marker.exists()


def test_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"trap": _Trap(marker)}))
    with pytest.raises(InputError):
        load_model(path)
    assert not marker.exists()


def test_unknown_architecture_and_bad_kwargs():
    with pytest.raises(InputError, match="unknown"):
        ModelSpec("vgg", (1, 8, 8), 10).build()
    with pytest.raises(InputError, match="architecture_kwargs"):
        ModelSpec("mlp", (1, 8, 8), 10, {"width": 3}).build()


def test_model_metadata_is_json_text(trained_mlp):
    _, spec = trained_mlp
    metadata = spec.to_metadata()
    assert all(isinstance(value, str) for value in metadata.values())
    assert json.loads(metadata["input_shape"]) == [1, 8, 8] and metadata["num_classes"] == "10"
    assert ModelSpec.from_metadata(metadata, "x") == spec


def test_8_bit_sources_keep_their_pixels_and_the_split_digest_does_not_depend_on_it(tmp_path):
    """imagefolder: keeps uint8 pixels (a quarter of float32); a split saved and loaded that way has the digest of
    the float32 images it stands for, and every consumer sees floats bit-identical to float32(v) / 255."""
    from PIL import Image

    from rcat.data import Split, load_imagefolder, load_split, save_split
    from rcat.pixels import as_float_images, content_digest
    from rcat.safe_io import sha256_tensors

    generator = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(generator.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
    dataset = load_imagefolder(tmp_path / "images")
    assert dataset.images.dtype == torch.uint8 and dataset.images.element_size() == 1
    floats = as_float_images(dataset.images)
    assert floats.dtype == torch.float32 and torch.equal(floats, dataset.images.to(torch.float32) / 255.0)
    assert as_float_images(floats) is floats  # float images pass through untouched

    index = torch.arange(len(dataset.labels))
    stored = Split("test", dataset.images, dataset.labels, index, 2, dataset.source)
    as_floats = Split("test", floats, dataset.labels, index, 2, dataset.source)
    assert stored.digest == as_floats.digest == sha256_tensors(floats, dataset.labels, index)
    assert content_digest(dataset.images[:0], dataset.labels[:0], index[:0]) == sha256_tensors(floats[:0], dataset.labels[:0], index[:0])
    save_split(stored, tmp_path / "test.safetensors")
    loaded = load_split(tmp_path / "test.safetensors")
    assert loaded.images.dtype == torch.uint8 and loaded.digest == as_floats.digest
