"""Data sources and the seeded, stratified fine-tune / validation / test split.

Every source yields images as a float32 tensor ``(N, C, H, W)`` in [0, 1] and integer labels.
A :class:`Split` carries ``sample_index`` (the sample's position in the source, a stable id that
per-sample results refer to) and a content digest, so downstream results carry their provenance.

Sources (``DataConfig.source`` or the CLI's ``--data``):

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, no download),
  pixel values 0..16 scaled to [0, 1].
* ``imagefolder:PATH``: ``PATH/<class>/<image>``, classes in sorted order = labels 0..K-1,
  any format Pillow reads, converted to RGB; all images must share one size.
* a ``.safetensors`` split file written by :func:`save_split` (e.g. ``data/prepared/test.safetensors``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from rcat.config import DataConfig
from rcat.errors import InputError
from rcat.safe_io import read_tensors, sha256_tensors, write_tensors

SPLIT_NAMES = ("finetune", "validation", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Dataset:
    """Images in [0, 1] as ``(N, C, H, W)`` float32, labels ``(N,)`` int64, and class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Split:
    """One split: images, labels and each sample's index in the source dataset."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor
    num_classes: int
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def digest(self) -> str:
        """SHA-256 over images, labels and sample indices: equal digests mean identical content."""
        return sha256_tensors(self.images, self.labels, self.sample_index)


def validate_images(images: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    """Reject data that would silently corrupt an evaluation: wrong shape, NaN/inf, out of [0, 1], empty."""
    if images.ndim != 4:
        raise InputError(f"{where}: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise InputError(f"{where}: no samples; check the data source and the split fractions")
    if labels.shape != (images.shape[0],):
        raise InputError(f"{where}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if not torch.isfinite(images).all():
        raise InputError(f"{where}: images contain NaN or inf; clean the data")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise InputError(f"{where}: pixel values must lie in [0, 1] (got [{low:g}, {high:g}]); scale them, and put normalisation inside the model")


def load_digits_dataset() -> Dataset:
    """scikit-learn's bundled digits: 1,797 images of 1x8x8, values 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    return Dataset(images, labels, tuple(str(name) for name in bunch.target_names), "digits")


def load_imagefolder(root: str | os.PathLike[str]) -> Dataset:
    """Read ``root/<class>/<image>`` (sorted class names are labels 0..K-1) as RGB in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"imagefolder:{root}: directory not found")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if len(classes) < 2:
        raise InputError(f"imagefolder:{root}: needs at least two class sub-directories, found {len(classes)}")
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    shape: tuple[int, ...] | None = None
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            try:
                with Image.open(file) as image:
                    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as exc:
                raise InputError(f"{file}: unreadable or truncated image ({exc.__class__.__name__}); remove or replace it") from exc
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                raise InputError(f"{file}: size {array.shape[1]}x{array.shape[0]} differs from {shape[1]}x{shape[0]} of the first image; resize the folder to one size")
            arrays.append(array)
            labels.append(label)
    if not arrays:
        raise InputError(f"imagefolder:{root}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return Dataset(images.contiguous(), torch.tensor(labels, dtype=torch.int64), tuple(classes), f"imagefolder:{root}")


def load_dataset(source: str) -> Dataset:
    """Load a dataset by source string: ``digits`` or ``imagefolder:PATH``."""
    kind, _, argument = source.partition(":")
    if kind == "digits":
        dataset = load_digits_dataset()
    elif kind == "imagefolder" and argument:
        dataset = load_imagefolder(argument)
    else:
        raise InputError(f"data source {source!r}: unknown; use 'digits', 'imagefolder:PATH' or a .safetensors split file")
    validate_images(dataset.images, dataset.labels, source)
    return dataset


def split_dataset(dataset: Dataset, config: DataConfig, seed: int) -> dict[str, Split]:
    """Seeded stratified split into fine-tune / validation / test.

    Two calls to scikit-learn's ``train_test_split`` (stratified on labels): first test versus
    the rest, then validation versus fine-tune. Sample indices within each split are sorted so
    that the order does not depend on the shuffling.
    """
    indices = np.arange(len(dataset.labels))
    labels = dataset.labels.numpy()
    try:
        rest, test = train_test_split(indices, test_size=config.test_fraction, stratify=labels, random_state=seed)
        validation_share = config.validation_fraction / (config.finetune_fraction + config.validation_fraction)
        finetune, validation = train_test_split(rest, test_size=validation_share, stratify=labels[rest], random_state=seed + 1)
    except ValueError as exc:
        raise InputError(f"data.source {dataset.source}: cannot split stratified ({exc}); use more samples per class or other fractions") from exc
    splits = {}
    for name, chosen in zip(SPLIT_NAMES, (finetune, validation, test), strict=True):
        chosen = torch.from_numpy(np.sort(chosen))
        splits[name] = Split(name, dataset.images[chosen].contiguous(), dataset.labels[chosen].contiguous(), chosen, dataset.num_classes, dataset.source)
    return splits


def subsample(split: Split, fraction: float, seed: int) -> Split:
    """A seeded stratified subset holding ``fraction`` of ``split`` (the whole split when 1)."""
    if fraction >= 1.0:
        return split
    keep, _ = train_test_split(np.arange(len(split)), train_size=fraction, stratify=split.labels.numpy(), random_state=seed)
    keep = torch.from_numpy(np.sort(keep))
    return Split(split.name, split.images[keep], split.labels[keep], split.sample_index[keep], split.num_classes, split.source)


def save_split(split: Split, path: str | os.PathLike[str]) -> str:
    """Write a split as safetensors with its provenance in the header; return its content digest."""
    digest = split.digest
    metadata = {"split": split.name, "source": split.source, "num_classes": str(split.num_classes), "digest": digest}
    write_tensors(path, {"images": split.images, "labels": split.labels, "sample_index": split.sample_index}, metadata)
    return digest


def load_split(path: str | os.PathLike[str]) -> Split:
    """Read a split written by :func:`save_split` and verify its content digest."""
    tensors, metadata = read_tensors(path)
    missing = {"images", "labels", "sample_index"} - tensors.keys()
    if missing or "num_classes" not in metadata:
        raise InputError(f"{path}: not an rcat split file (missing {sorted(missing) or ['num_classes']}); write it with 'dvc repro prepare'")
    split = Split(
        metadata.get("split", Path(path).stem),
        tensors["images"],
        tensors["labels"],
        tensors["sample_index"],
        int(metadata["num_classes"]),
        metadata.get("source", "unknown"),
    )
    if metadata.get("digest") and split.digest != metadata["digest"]:
        raise InputError(f"{path}: content digest does not match its header (file corrupted or edited); rerun 'dvc repro prepare'")
    validate_images(split.images, split.labels, str(path))
    return split


def load_data_argument(data: str, config: DataConfig, seed: int, split: str = "all") -> Split:
    """Resolve the CLI's ``--data``: a split file, or a source (whole dataset or one named split)."""
    if data.endswith(".safetensors"):
        return load_split(data)
    dataset = load_dataset(data)
    if split == "all":
        everything = torch.arange(len(dataset.labels))
        return Split("all", dataset.images, dataset.labels, everything, dataset.num_classes, dataset.source)
    if split not in SPLIT_NAMES:
        raise InputError(f"--split {split!r}: use one of all, {', '.join(SPLIT_NAMES)}")
    return split_dataset(dataset, config, seed)[split]
