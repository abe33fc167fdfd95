"""Data sources and the seeded, stratified fine-tune / validation / test split.

Every source yields images ``(N, C, H, W)`` and integer labels: 8-bit pixels (``uint8``, value /
255) from the 8-bit sources (``imagefolder:``, the CIFAR-10 releases), float32 in [0, 1] from the
others; :func:`rcat.pixels.as_float_images` gives the floats a model sees, a batch at a time.
A :class:`Split` carries ``sample_index`` (the sample's position in the source, a stable id that
per-sample results refer to) and a content digest, so downstream results carry their provenance.

Sources (``DataConfig.source`` or the CLI's ``--data``):

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, no download),
  pixel values 0..16 scaled to [0, 1].
* ``imagefolder:PATH``: ``PATH/<class>/<image>``, classes in sorted order = labels 0..K-1,
  any format Pillow reads, converted to RGB; all images must share one size.
* ``npz:PATH``: a NumPy ``.npz`` archive with arrays ``images`` and ``labels``, read with
  ``allow_pickle=False``. ``images`` is ``(N, C, H, W)`` or ``(N, H, W, C)`` (taken as channels-last
  when the last dimension is 1 or 3 and the second is not), either uint8 (scaled by 1/255) or
  float already in [0, 1]; ``labels`` holds integers 0..K-1 (K = largest label + 1). An optional
  ``classes`` array of strings names the classes.
* ``cifar10-binary:DIR``: the CIFAR-10 binary release (``cifar-10-batches-bin``): records of one
  label byte followed by 3,072 pixel bytes (3x32x32, channel-major). Reads every
  ``data_batch_*.bin`` present in DIR, in numeric order (normally 1..5, the 50,000 training images);
  only when there is none, ``test_batch.bin``. Class names come from ``batches.meta.txt`` if present.
* ``cifar10-python:DIR``: the CIFAR-10 python release (``cifar-10-batches-py``): pickled dicts
  with keys ``b'data'`` (N x 3072 uint8) and ``b'labels'``. Same file choice as the binary release
  (every ``data_batch_*``, else ``test_batch``). The pickles are read through
  :class:`RestrictedUnpickler`, which allows only the globals needed to rebuild a numpy array and
  refuses anything else, so a tampered file cannot run code.
* a ``.safetensors`` split file written by :func:`save_split` (e.g. ``data/prepared/test.safetensors``).

For the two CIFAR-10 sources DIR may also be the parent of the extracted ``cifar-10-batches-bin`` /
``cifar-10-batches-py`` folder.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rcat.config import MAX_CLASSES, DataConfig
from rcat.errors import InputError
from rcat.pixels import as_float_images, content_digest, is_pixels
from rcat.safe_io import read_tensors, write_tensors

SPLIT_NAMES = ("finetune", "validation", "test")
VALIDATE_BLOCK_BYTES = 32 * 2**20  # validate_images checks about this many bytes of images at a time
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Dataset:
    """Images ``(N, C, H, W)`` (uint8 pixels or float32 in [0, 1], :mod:`rcat.pixels`), labels ``(N,)`` int64, and class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Split:
    """One split: images (uint8 pixels or float32 in [0, 1], :mod:`rcat.pixels`), labels and each sample's index in the source dataset."""

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
        """SHA-256 over images (as float32, whatever their storage), labels and sample indices: equal digests mean identical content."""
        return content_digest(self.images, self.labels, self.sample_index)


def validate_images(images: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    """Reject data that would silently corrupt an evaluation: wrong shape, NaN/inf, out of [0, 1], empty.

    8-bit pixels (:mod:`rcat.pixels`) are in range by construction; float images are checked.
    """
    if images.ndim != 4:
        raise InputError(f"{where}: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise InputError(f"{where}: no samples; check the data source and the split fractions")
    if labels.shape != (images.shape[0],):
        raise InputError(f"{where}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if is_pixels(images):
        return
    # Checked a block of samples at a time: torch.isfinite on the whole tensor allocates
    # temporaries several times its size (1 GB more on 50,000 CIFAR images, measured).
    step = max(1, VALIDATE_BLOCK_BYTES // max(1, images[0].numel() * images.element_size()))
    finite, low, high = True, float("inf"), float("-inf")
    for start in range(0, images.shape[0], step):
        block = images[start : start + step]
        finite = finite and bool(torch.isfinite(block).all())
        low, high = min(low, float(block.min())), max(high, float(block.max()))
    if not finite:
        raise InputError(f"{where}: images contain NaN or inf; clean the data")
    if low < 0.0 or high > 1.0:
        raise InputError(f"{where}: pixel values must lie in [0, 1] (got [{low:g}, {high:g}]); scale them, and put normalisation inside the model")


def load_digits_dataset() -> Dataset:
    """scikit-learn's bundled digits: 1,797 images of 1x8x8, values 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    return Dataset(images, labels, tuple(str(name) for name in bunch.target_names), "digits")


def _resize_and_crop(image: Any, resize: int | None, center_crop: int | None) -> Any:
    """PIL: scale the shorter side to ``resize`` (bilinear, antialiased), then crop the centre square."""
    from PIL import Image

    if resize is not None:
        width, height = image.size
        scale = resize / min(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    if center_crop is not None:
        width, height = image.size
        if center_crop > min(width, height):
            raise InputError(f"data.center_crop {center_crop} is larger than the image ({width}x{height}); lower it or set data.resize")
        left, top = (width - center_crop) // 2, (height - center_crop) // 2
        image = image.crop((left, top, left + center_crop, top + center_crop))
    return image


def transform_images(images: torch.Tensor, resize: int | None, center_crop: int | None) -> torch.Tensor:
    """The same transforms on an ``(N, C, H, W)`` tensor: shorter side to ``resize``, centre crop (float32 out)."""
    images = as_float_images(images)
    if resize is not None:
        height, width = images.shape[-2:]
        scale = resize / min(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0.0, 1.0)
    if center_crop is not None:
        height, width = images.shape[-2:]
        if center_crop > min(height, width):
            raise InputError(f"data.center_crop {center_crop} is larger than the images ({width}x{height}); lower it or set data.resize")
        top, left = (height - center_crop) // 2, (width - center_crop) // 2
        images = images[..., top : top + center_crop, left : left + center_crop]
    return images.contiguous()


def load_imagefolder(root: str | os.PathLike[str], resize: int | None = None, center_crop: int | None = None) -> Dataset:
    """Read ``root/<class>/<image>`` (sorted class names are labels 0..K-1) as RGB in [0, 1].

    ``resize`` / ``center_crop`` are applied to each image as it is read, so a folder of mixed
    sizes loads when they bring every image to one size.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"imagefolder:{root}: directory not found")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if len(classes) < 2:
        raise InputError(f"imagefolder:{root}: needs at least two class sub-directories, found {len(classes)}")
    if len(classes) > MAX_CLASSES:
        raise InputError(f"imagefolder:{root}: {len(classes)} class sub-directories, at most {MAX_CLASSES}")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        entries = sorted((root / name).iterdir())
        nested = [entry for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
        if nested:
            # silently taking or skipping nested images would change the data without a word
            raise InputError(f"{nested[0]}: a folder inside class folder '{name}'; images must sit directly in {root}/<class>/ "
                             "(move them up, or point imagefolder: at the level whose sub-folders are the classes)")
        found = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise InputError(f"{root / name}: class folder holds no images (suffixes {sorted(IMAGE_SUFFIXES)}); "
                             "add its images or remove the folder (an empty class cannot be split or evaluated)")
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        raise InputError(f"imagefolder:{root}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    # Decoded straight into one preallocated uint8 (N, C, H, W) array, which the dataset keeps:
    # 50,000 CIFAR images are 150 MB (the float tensor was 600 MB more, and a list of arrays, its
    # stacked copy and two float copies were 2.2 GB, measured).
    pixels: np.ndarray | None = None
    shape: tuple[int, ...] | None = None
    for position, file in enumerate(files):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(file) as image:
                    array = np.asarray(_resize_and_crop(as_rgb8(image, file), resize, center_crop), dtype=np.uint8)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"{file}: image too large to decode safely ({exc.__class__.__name__}: more than "
                             f"{Image.MAX_IMAGE_PIXELS:,} pixels); shrink it or remove it") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{file}: unreadable or truncated image ({exc.__class__.__name__}); remove or replace it") from exc
        if shape is None:
            shape = array.shape
            pixels = np.empty((len(files), shape[2], shape[0], shape[1]), dtype=np.uint8)
        elif array.shape != shape:
            raise InputError(f"{file}: size {array.shape[1]}x{array.shape[0]} differs from {shape[1]}x{shape[0]} of the first image; set data.resize and data.center_crop")
        assert pixels is not None  # allocated together with shape on the first image
        pixels[position] = array.transpose(2, 0, 1)
    # kept as 8-bit pixels (rcat.pixels): a quarter of the float tensor, converted a batch at a time where used
    return Dataset(torch.from_numpy(pixels), torch.tensor(labels, dtype=torch.int64), tuple(classes), f"imagefolder:{root}")


def as_rgb8(image: Any, file: Path) -> Any:
    """An image as 8-bit RGB, keeping its real range.

    * 8-bit modes (``L``, ``P``, ``RGB``, ``CMYK``, ...): Pillow's conversion; grey levels are
      copied to the three channels.
    * 16-bit grey (``I;16*``, and ``I`` with values in 0..65535, how Pillow opens 16-bit PNGs):
      scaled by 255/65535 (Pillow's own conversion would clip every value above 255 to white).
    * 32-bit float (``F``): must lie in [0, 1]; scaled by 255.
    * Alpha (``RGBA``, ``LA``, ``PA``, or ``P`` with transparency) is dropped: the colour channels
      are taken as stored, not composited onto a background.
    """
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(f"{file}: {mode} image with values {values.min():g}..{values.max():g}, outside the 16-bit range 0..65535; save it as 8 or 16 bits")
        grey = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 1):
            raise InputError(f"{file}: float image with values outside [0, 1]; scale it or save it as 8 bits")
        return Image.fromarray(np.rint(values * 255.0).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def _labels_from_array(labels: np.ndarray, n: int, where: str) -> torch.Tensor:
    """Check and convert an integer label vector of length ``n``."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != (n,):
        raise InputError(f"{where}: {n} images but labels of shape {labels.shape}; need one integer label per image")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise InputError(f"{where}: labels must be whole numbers, got non-integer floats")
    elif labels.dtype.kind not in "iub":
        raise InputError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if n and labels.min() < 0:
        raise InputError(f"{where}: labels must be 0..K-1, found {int(labels.min())}")
    if n and labels.max() >= MAX_CLASSES:
        # checked before anything is sized by the label (one label of 10**9 would allocate gigabytes)
        raise InputError(f"{where}: label {int(labels.max())} is out of range; labels must lie in 0..K-1 with K at most {MAX_CLASSES}")
    return torch.from_numpy(labels)


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Read ``images`` and ``labels`` from a NumPy ``.npz`` archive (no pickle); see the module docstring."""
    path = Path(path)
    where = f"npz:{path}"
    if not path.is_file():
        raise InputError(f"{where}: file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError ...
        raise InputError(f"{where}: not a readable .npz archive ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{where}: a single .npy array, not an .npz archive with 'images' and 'labels'; write it with np.savez")
    with archive:
        missing = [name for name in ("images", "labels") if name not in archive.files]
        if missing:
            raise InputError(f"{where}: missing array(s) {missing} (found {sorted(archive.files)}); save with np.savez(path, images=..., labels=...)")
        try:
            images = archive["images"]
            labels = archive["labels"]
            classes_array = archive["classes"] if "classes" in archive.files else None
        except ValueError as exc:  # object arrays need pickle, which is refused
            raise InputError(f"{where}: an array needs pickle to load ({exc}); store plain numeric arrays") from exc
    if images.ndim != 4:
        raise InputError(f"{where}: array 'images' must be (N, C, H, W) or (N, H, W, C), got shape {images.shape}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.dtype == np.uint8:
        tensor = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
    elif images.dtype.kind == "f":
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    else:
        raise InputError(f"{where}: array 'images' has dtype {images.dtype}; use uint8 (0..255) or float in [0, 1]")
    label_tensor = _labels_from_array(labels, images.shape[0], f"{where}: array 'labels'")
    num_classes = int(label_tensor.max()) + 1 if len(label_tensor) else 0
    if classes_array is not None:
        classes = tuple(str(name) for name in np.asarray(classes_array).reshape(-1))
        if len(classes) < num_classes:
            raise InputError(f"{where}: array 'classes' names {len(classes)} classes but labels go up to {num_classes - 1}")
    else:
        classes = tuple(str(k) for k in range(num_classes))
    return Dataset(tensor.contiguous(), label_tensor, classes, where)


CIFAR10_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_RECORD = 1 + 3 * 32 * 32


def _cifar_directory(root: Path, release: str, where: str) -> Path:
    """The folder holding the batch files: ``root`` itself or its extracted ``cifar-10-batches-*``."""
    if not root.is_dir():
        raise InputError(f"{where}: directory not found")
    nested = root / f"cifar-10-batches-{release}"
    pattern = "data_batch_*" + (".bin" if release == "bin" else "")
    test_name = "test_batch" + (".bin" if release == "bin" else "")
    if not any(root.glob(pattern)) and not (root / test_name).is_file() and nested.is_dir():
        return nested
    return root


def _cifar_batch_files(root: Path, release: str, where: str) -> list[Path]:
    """Every ``data_batch_N`` present, in numeric order; only when there is none, ``test_batch``."""
    suffix = ".bin" if release == "bin" else ""
    pattern = re.compile(r"data_batch_(\d+)" + re.escape(suffix) + "$")
    batches = sorted((int(match.group(1)), entry) for entry in root.iterdir() if entry.is_file() and (match := pattern.match(entry.name)))
    files = [entry for _, entry in batches]
    if not files and (root / f"test_batch{suffix}").is_file():
        files = [root / f"test_batch{suffix}"]
    if not files:
        raise InputError(f"{where}: no data_batch_N{suffix} or test_batch{suffix} files in {root}; point it at the extracted cifar-10-batches-{release} folder")
    return files


def _cifar_dataset(images: list[np.ndarray], labels: list[np.ndarray], classes: tuple[str, ...], where: str) -> Dataset:
    data = np.concatenate(images).reshape(-1, 3, 32, 32)
    label_tensor = torch.from_numpy(np.concatenate(labels).astype(np.int64))
    if len(label_tensor) and int(label_tensor.max()) >= len(classes):
        raise InputError(f"{where}: label {int(label_tensor.max())} is out of range for {len(classes)} classes; the files are corrupt")
    return Dataset(torch.from_numpy(np.ascontiguousarray(data)), label_tensor, classes, where)  # 8-bit pixels (rcat.pixels)


def load_cifar10_binary(directory: str | os.PathLike[str]) -> Dataset:
    """Read the CIFAR-10 binary release (label byte + 3,072 pixel bytes per record); see the module docstring."""
    where = f"cifar10-binary:{directory}"
    root = _cifar_directory(Path(directory), "bin", where)
    images, labels = [], []
    for file in _cifar_batch_files(root, "bin", where):
        raw = np.fromfile(file, dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR10_RECORD:
            raise InputError(f"{file}: {raw.size} bytes is not a whole number of {CIFAR10_RECORD}-byte CIFAR-10 records; the file is truncated or not CIFAR-10 binary, download it again")
        records = raw.reshape(-1, CIFAR10_RECORD)
        labels.append(records[:, 0])
        images.append(records[:, 1:])
    classes = CIFAR10_CLASSES
    meta = root / "batches.meta.txt"
    if meta.is_file():
        names = tuple(line.strip() for line in meta.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
        if names:
            classes = names
    return _cifar_dataset(images, labels, classes, where)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    Dicts, lists, tuples, strings, bytes and numbers need no global lookup; the only globals
    allowed are the ones numpy's array pickling (protocols 2-4) refers to. Any other global (a
    function such as ``os.system`` or ``open``, any class) raises :class:`InputError` before it
    can be called.
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def __init__(self, file, *, where: str) -> None:
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise InputError(f"{self.where}: the file tried to load the disallowed global {module}.{name} and was refused; only numpy arrays and plain containers may be unpickled")
        return super().find_class(module, name)

    @classmethod
    def load_file(cls, path: Path) -> object:
        try:
            with open(path, "rb") as handle:
                return cls(handle, where=str(path)).load()
        except InputError:
            raise
        except Exception as exc:  # UnpicklingError, EOFError, ValueError ... from a corrupt file
            raise InputError(f"{path}: not a readable CIFAR-10 python pickle ({exc.__class__.__name__}: {exc})") from exc


def _get(mapping: dict, key: str) -> object:
    return mapping[key.encode()] if key.encode() in mapping else mapping.get(key)


def load_cifar10_python(directory: str | os.PathLike[str]) -> Dataset:
    """Read the CIFAR-10 python release through :class:`RestrictedUnpickler`; see the module docstring."""
    where = f"cifar10-python:{directory}"
    root = _cifar_directory(Path(directory), "py", where)
    images, labels = [], []
    for file in _cifar_batch_files(root, "py", where):
        batch = RestrictedUnpickler.load_file(file)
        if not isinstance(batch, dict):
            raise InputError(f"{file}: expected a pickled dict with keys b'data' and b'labels', got {type(batch).__name__}")
        data, batch_labels = _get(batch, "data"), _get(batch, "labels")
        if not isinstance(data, np.ndarray) or batch_labels is None:
            raise InputError(f"{file}: missing or bad b'data' / b'labels' (need a uint8 array and a label list)")
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise InputError(f"{file}: b'data' must be a uint8 array of shape (N, 3072), got {data.dtype} {data.shape}")
        label_array = np.asarray(batch_labels)
        if label_array.dtype.kind not in "iu" or label_array.shape != (data.shape[0],):
            raise InputError(f"{file}: b'labels' must be {data.shape[0]} integers, got {label_array.dtype} {label_array.shape}")
        images.append(data)
        labels.append(label_array)
    classes = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        loaded = RestrictedUnpickler.load_file(meta)
        names = _get(loaded, "label_names") if isinstance(loaded, dict) else None
        if isinstance(names, list) and names:
            classes = tuple(name.decode() if isinstance(name, bytes) else str(name) for name in names)
    return _cifar_dataset(images, labels, classes, where)


DATA_SOURCES_HELP = "'digits', 'imagefolder:PATH', 'npz:PATH', 'cifar10-binary:DIR', 'cifar10-python:DIR' or a .safetensors split file"


def load_dataset(source: str, resize: int | None = None, center_crop: int | None = None) -> Dataset:
    """Load a dataset by source string (see the module docstring for the kinds), then apply the
    transforms: shorter side to ``resize`` (bilinear, antialiased), then a centre crop."""
    kind, _, argument = source.partition(":")
    if kind == "imagefolder" and argument:
        dataset = load_imagefolder(argument, resize, center_crop)
        validate_images(dataset.images, dataset.labels, source)
        return dataset
    if kind == "digits":
        dataset = load_digits_dataset()
    elif kind == "npz" and argument:
        dataset = load_npz(argument)
    elif kind == "cifar10-binary" and argument:
        dataset = load_cifar10_binary(argument)
    elif kind == "cifar10-python" and argument:
        dataset = load_cifar10_python(argument)
    else:
        raise InputError(f"data source {source!r}: unknown; use {DATA_SOURCES_HELP}")
    if resize is not None or center_crop is not None:
        dataset = Dataset(transform_images(dataset.images, resize, center_crop), dataset.labels, dataset.classes, dataset.source)
    validate_images(dataset.images, dataset.labels, source)
    return dataset


def split_dataset(dataset: Dataset, config: DataConfig, seed: int) -> dict[str, Split]:
    """Seeded stratified split into fine-tune / validation / test.

    Fractions are shares of the whole source (when they sum to less than 1, the rest is unused).
    Two calls to scikit-learn's ``train_test_split`` (stratified on labels): first test versus
    the rest, then validation versus fine-tune. Sample indices within each split are sorted so
    that the order does not depend on the shuffling.
    """
    from sklearn.model_selection import train_test_split  # 1 s to import: only the stages that split pay it

    indices = np.arange(len(dataset.labels))
    labels = dataset.labels.numpy()
    counts = np.bincount(labels, minlength=dataset.num_classes) if len(labels) else np.zeros(dataset.num_classes, dtype=np.int64)
    empty = [label for label, count in enumerate(counts[: dataset.num_classes]) if count == 0]
    if empty:
        # else scikit-learn's stratified split fails with a message about split sizes
        name = dataset.classes[empty[0]] if empty[0] < len(dataset.classes) else str(empty[0])
        raise InputError(f"data.source {dataset.source}: class {empty[0]} ({name!r}) has no samples ({len(empty)} empty of {dataset.num_classes}); "
                         "labels must be 0..K-1 with every class present: relabel without gaps")
    total = config.finetune_fraction + config.validation_fraction + config.test_fraction
    try:
        rest, test = train_test_split(indices, test_size=config.test_fraction, stratify=labels, random_state=seed)
        if total >= 1.0 - 1e-6:
            validation_share = config.validation_fraction / (config.finetune_fraction + config.validation_fraction)
            finetune, validation = train_test_split(rest, test_size=validation_share, stratify=labels[rest], random_state=seed + 1)
        else:  # fractions below 1: sizes are shares of the whole source; the remainder is left out
            finetune, validation = train_test_split(
                rest, train_size=round(config.finetune_fraction * len(indices)), test_size=round(config.validation_fraction * len(indices)),
                stratify=labels[rest], random_state=seed + 1,
            )
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
    from sklearn.model_selection import train_test_split

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
    try:
        num_classes = int(metadata["num_classes"])
    except ValueError:
        raise InputError(f"{path}: header field num_classes {metadata['num_classes']!r} is not an integer; rerun 'dvc repro prepare'") from None
    if not 1 <= num_classes <= MAX_CLASSES:
        raise InputError(f"{path}: header field num_classes {num_classes} must lie in 1..{MAX_CLASSES}; rerun 'dvc repro prepare'")
    images, labels, sample_index = tensors["images"], tensors["labels"], tensors["sample_index"]
    if images.ndim != 4 or not (images.is_floating_point() or is_pixels(images)):
        raise InputError(f"{path}: images must be a float or uint8 (N, C, H, W) tensor, got {images.dtype} of shape {tuple(images.shape)}")
    for name, tensor in (("labels", labels), ("sample_index", sample_index)):
        if tensor.dtype != torch.int64 or tensor.shape != (images.shape[0],):
            raise InputError(f"{path}: {name} must be int64 with one entry per image ({images.shape[0]}), got {tensor.dtype} of shape {tuple(tensor.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InputError(f"{path}: labels must lie in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}; rerun 'dvc repro prepare'")
    split = Split(metadata.get("split", Path(path).stem), images, labels, sample_index, num_classes, metadata.get("source", "unknown"))
    if metadata.get("digest") and split.digest != metadata["digest"]:
        raise InputError(f"{path}: content digest does not match its header (file corrupted or edited); rerun 'dvc repro prepare'")
    validate_images(split.images, split.labels, str(path))
    return split


def load_data_argument(data: str, config: DataConfig, seed: int, split: str = "all") -> Split:
    """Resolve the CLI's ``--data``: a split file, or a source (whole dataset or one named split)."""
    if data.endswith(".safetensors"):
        return load_split(data)
    dataset = load_dataset(data, config.resize, config.center_crop)
    if split == "all":
        everything = torch.arange(len(dataset.labels))
        return Split("all", dataset.images, dataset.labels, everything, dataset.num_classes, dataset.source)
    if split not in SPLIT_NAMES:
        raise InputError(f"--split {split!r}: use one of all, {', '.join(SPLIT_NAMES)}")
    return split_dataset(dataset, config, seed)[split]
