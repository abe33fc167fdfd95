"""Model definitions and self-describing, pickle-free model files.

A model file is a safetensors file whose header holds the architecture name, its keyword
arguments, the input shape and the number of classes, so loading needs no code from the file
(safetensors cannot carry code) and no separate config. Inputs are always in [0, 1]; a model that
expects normalised inputs carries its mean/std inside (:class:`Normalize`), so attacks and eps
keep their pixel-space meaning.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from rcat.config import MAX_CLASSES
from rcat.errors import InputError
from rcat.pixels import as_float_images
from rcat.safe_io import read_tensors, sha256_tensors, write_tensors

MODEL_FORMAT = "rcat-model/1"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the first layer, so the model's input stays in [0, 1]."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (64,)) -> nn.Module:
    """Flatten, then ``len(hidden)`` ReLU layers, then a linear classifier."""
    width = 1
    for size in input_shape:
        width *= size
    layers: list[nn.Module] = [nn.Flatten()]
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = (16, 32), hidden: int = 64, stride: int = 1) -> nn.Module:
    """3x3 conv + ReLU blocks, then an MLP head.

    ``stride: 1``: each block after the first halves the resolution with a 2x2 max-pool.
    ``stride: 2``: every conv has stride 2 and there is no pooling; about 10x cheaper on 32x32
    inputs, which is what makes a CIFAR-10 benchmark fit on a CPU.
    """
    if stride not in (1, 2):
        raise TypeError(f"stride must be 1 or 2, got {stride!r}")
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for position, out_channels in enumerate(channels):
        if stride == 2:
            layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            height, width = (height + 1) // 2, (width + 1) // 2
            in_channels = out_channels
            continue
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
        if position > 0 or len(channels) == 1:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        in_channels = out_channels
    layers += [nn.Flatten(), nn.Linear(in_channels * height * width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """He et al.'s basic residual block: two 3x3 conv + BatchNorm, identity (or 1x1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1) -> nn.Module:
    """A CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3 stem, ``len(widths)`` stages of
    ``blocks`` basic blocks (every stage after the first halves the resolution), global average
    pooling and a linear classifier. ``widths=(16, 32, 64), blocks=1`` is ResNet-8 (78k weights);
    ``blocks=3`` is ResNet-20; ``widths=(64, 128, 256, 512), blocks=2`` is ResNet-18's layout.
    """
    if not widths or blocks < 1 or any(int(width) < 1 for width in widths):
        raise TypeError(f"resnet needs at least one width and blocks >= 1, got widths={widths!r}, blocks={blocks!r}")
    in_channels = input_shape[0]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    current = widths[0]
    for position, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if position > 0 and block == 0 else 1
            layers.append(BasicBlock(current, width, stride))
            current = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(current, num_classes)]
    return nn.Sequential(*layers)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet}


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a model: architecture, its keyword arguments, input shape, classes."""

    architecture: str
    input_shape: tuple[int, ...]
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def build(self, trusted_factories: Collection[str] = ()) -> nn.Module:
        """Instantiate the (untrained) network; the normalisation layer, if any, comes first.

        An architecture ``factory:module.path:callable`` (a user's model, imported by the train
        stage) is built only when ``module.path:callable`` is in ``trusted_factories``, which the
        caller takes from its own params: a model file can name code, but never choose to run it.
        """
        if self.architecture.startswith(FACTORY_PREFIX):
            target = self.architecture[len(FACTORY_PREFIX):]
            if target not in trusted_factories:
                raise InputError(
                    f"model architecture {self.architecture!r} is user code that this run's params do not name; "
                    f"set train_old.reference or train_new.reference to 'factory:{target}@WEIGHTS' to trust it"
                )
            network = _import_factory(target, self.architecture)()
        elif self.architecture in ARCHITECTURES:
            kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in self.kwargs.items()}
            try:
                # first on the meta device: sizes are known without allocating (hidden: [10**12] would take terabytes)
                with torch.device("meta"):
                    count = sum(parameter.numel() for parameter in ARCHITECTURES[self.architecture](self.input_shape, self.num_classes, **kwargs).parameters())
                if count > MAX_WEIGHTS:
                    raise InputError(f"architecture_kwargs {self.kwargs} for {self.architecture!r} give {count:,} weights "
                                     f"(at most {MAX_WEIGHTS:,}); use smaller layers")
                network = ARCHITECTURES[self.architecture](self.input_shape, self.num_classes, **kwargs)
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise InputError(f"architecture_kwargs for {self.architecture!r}: {exc}") from exc
        else:
            raise InputError(f"architecture {self.architecture!r} is unknown; use one of {sorted(ARCHITECTURES)} or a factory reference")
        if self.normalization is None:
            return network
        return nn.Sequential(Normalize(*self.normalization), network)

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": MODEL_FORMAT,
            "architecture": self.architecture,
            "kwargs": json.dumps(self.kwargs, sort_keys=True),
            "input_shape": json.dumps(list(self.input_shape)),
            "num_classes": str(self.num_classes),
            "normalization": json.dumps(self.normalization),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], where: str) -> ModelSpec:
        """Parse and bound-check a model file's header (see :func:`parse_header`)."""
        if metadata.get("format") != MODEL_FORMAT:
            raise InputError(f"{where}: not an rcat model file (header format {metadata.get('format')!r}, expected {MODEL_FORMAT!r})")
        header = parse_header(metadata, where)
        normalization = None if header.normalization is None else (tuple(header.normalization[0]), tuple(header.normalization[1]))
        return cls(architecture=header.architecture, input_shape=tuple(header.input_shape), num_classes=header.num_classes,
                   kwargs=header.kwargs, normalization=normalization)


MAX_INPUT_VALUES = 50_000_000
"""The most values one input may hold (C x H x W); larger shapes are refused before anything is allocated."""
MAX_WEIGHTS = 500_000_000
"""The most weights a built-in architecture may have (2 GB of float32), counted before allocating them."""


class ModelHeader(BaseModel):
    """The typed schema of an rcat model file's header: every field bounded before anything is built."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    architecture: Annotated[str, Field(min_length=1, max_length=256)]
    kwargs: dict[str, Any]
    input_shape: Annotated[list[Annotated[int, Field(ge=1, le=65_536)]], Field(min_length=1, max_length=4)]
    num_classes: Annotated[int, Field(ge=1, le=MAX_CLASSES)]
    normalization: tuple[list[Annotated[float, Field(allow_inf_nan=False)]], list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]]] | None = None

    @model_validator(mode="after")
    def _bounded(self) -> ModelHeader:
        values = 1
        for size in self.input_shape:
            values *= size
        if values > MAX_INPUT_VALUES:
            raise ValueError(f"input_shape {self.input_shape} holds {values:,} values per input (at most {MAX_INPUT_VALUES:,})")
        if self.normalization is not None and (len(self.normalization[0]) != len(self.normalization[1]) or len(self.normalization[0]) > 4096):
            raise ValueError("normalization needs one mean and one std per channel")
        return self


MAX_HEADER_FIELD_BYTES = 65_536


def parse_header(metadata: dict[str, str], where: str) -> ModelHeader:
    """Decode the JSON fields of a model header and validate them as a :class:`ModelHeader`.

    Every malformed header (a missing field, a field that is not JSON, a wrong type, an out-of-range
    size) is one :class:`InputError` naming the file and the field.
    """
    fields: dict[str, Any] = {"architecture": metadata.get("architecture")}
    for name, default in (("kwargs", None), ("input_shape", None), ("num_classes", None), ("normalization", "null")):
        text = metadata.get(name, default)
        if text is None:
            raise InputError(f"{where}: model header has no field '{name}'; the file is not a complete rcat model file, re-save it with rcat")
        if len(text) > MAX_HEADER_FIELD_BYTES:
            raise InputError(f"{where}: model header field '{name}' is {len(text)} bytes (at most {MAX_HEADER_FIELD_BYTES})")
        try:
            fields[name] = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise InputError(f"{where}: model header field '{name}' is not valid JSON ({text[:40]!r}); re-save the model with rcat") from None
    try:
        return ModelHeader.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field_name = ".".join(str(part) for part in first["loc"]) or "header"
        raise InputError(f"{where}: model header field '{field_name}': {first['msg']}; re-save the model with rcat") from None


@dataclass
class LoadedModel:
    """A model in eval mode with its spec, its weights' digest and where it came from."""

    network: nn.Module
    spec: ModelSpec
    digest: str
    path: str
    metadata: dict[str, str] = field(default_factory=dict)


def weights_digest(network: nn.Module) -> str:
    """SHA-256 over the state dict (names in sorted order, then each tensor's bytes)."""
    state = network.state_dict()
    names = sorted(state)
    return sha256_tensors(*(torch.tensor(list(name.encode()), dtype=torch.uint8) for name in names), *(state[name] for name in names))


def save_model(network: nn.Module, spec: ModelSpec, path: str | os.PathLike[str], extra: dict[str, str] | None = None) -> str:
    """Write weights + spec as one safetensors file, atomically; return the weights' digest."""
    digest = weights_digest(network)
    metadata = spec.to_metadata() | {"weights_digest": digest} | {f"extra.{key}": value for key, value in (extra or {}).items()}
    write_tensors(path, network.state_dict(), metadata)
    return digest


def load_model(path: str | os.PathLike[str], device: torch.device | str = "cpu", trusted_factories: Collection[str] = ()) -> LoadedModel:
    """Load a model file written by :func:`save_model` (no unpickling), check it, return it in eval mode.

    ``trusted_factories``: see :meth:`ModelSpec.build`.
    """
    tensors, metadata = read_tensors(path)
    spec = ModelSpec.from_metadata(metadata, str(path))
    network = spec.build(trusted_factories)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"{path}: weights do not fit architecture {spec.architecture!r} ({first})") from exc
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"{path}: weight {name!r} contains NaN or inf; the model is broken, retrain or re-export it")
    digest = weights_digest(network)
    if metadata.get("weights_digest") and metadata["weights_digest"] != digest:
        raise InputError(f"{path}: weights digest does not match its header (file corrupted or edited)")
    network.to(device).eval()
    extra = {key[6:]: value for key, value in metadata.items() if key.startswith("extra.")}
    return LoadedModel(network, spec, digest, str(path), extra)


def check_model_on(model: LoadedModel, images: torch.Tensor, num_classes: int, where: str) -> None:
    """Fail early and clearly when a model does not fit the data: input shape, class count, finite logits."""
    if tuple(images.shape[1:]) != tuple(model.spec.input_shape):
        raise InputError(f"{model.path}: model expects inputs of shape {tuple(model.spec.input_shape)}, {where} has {tuple(images.shape[1:])}")
    if model.spec.num_classes != num_classes:
        raise InputError(f"{model.path}: model outputs {model.spec.num_classes} classes, {where} has {num_classes}")
    device = next(model.network.parameters()).device
    with torch.no_grad():
        logits = model.network(as_float_images(images[:8]).to(device))
    if logits.shape != (min(8, len(images)), num_classes):
        raise InputError(f"{model.path}: model returned logits of shape {tuple(logits.shape)}, expected (N, {num_classes})")
    if not torch.isfinite(logits).all():
        raise InputError(f"{model.path}: model produced NaN or inf logits on {where}")


# ---------------------------------------------------------------- bring your own model

FACTORY_PREFIX = "factory:"
TORCHSCRIPT_PREFIX = "torchscript:"
MLFLOW_PREFIXES = ("models:/", "runs:/")


def _load_mlflow(reference: str, device: torch.device | str, trusted_factories: Collection[str], tracking_uri: str | None = None) -> LoadedModel:
    """Download an MLflow model or run artifact and load the rcat model file in it.

    MLflow's own model flavours unpickle by default (``pickle``) or need torch.export (``pt2``);
    rcat loads neither: the artifact must hold an rcat model file (safetensors), as the pipeline logs.
    """
    import tempfile
    from pathlib import Path

    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # defence in depth: never unpickle
    import mlflow

    with tempfile.TemporaryDirectory(prefix="rcat-mlflow-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=tmp, tracking_uri=tracking_uri))
        except Exception as exc:  # MlflowException (not found), connection errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise InputError(f"{reference}: cannot fetch it from MLflow at {tracking_uri or mlflow.get_tracking_uri()} ({first})") from exc
        files = [local] if local.is_file() else sorted(local.rglob("*.safetensors"))
        models = []
        for file in files:
            try:
                models.append(load_model(file, device, trusted_factories))
            except InputError as exc:
                if "not an rcat model file" not in str(exc):
                    raise InputError(f"{reference}: {exc}") from exc
        if len(models) != 1:
            flavour = " (an MLflow model flavour, which would need unpickling or torch.export)" if local.is_dir() and (local / "MLmodel").is_file() else ""
            raise InputError(f"{reference}: expected exactly one rcat model file (.safetensors) in the artifact, found {len(models)}{flavour}; "
                             "log the model file that rcat writes (save_model) as the artifact")
        loaded = models[0]
        loaded.path = reference
        return loaded


def _check_finite_weights(network: nn.Module, where: str) -> None:
    for name, tensor in network.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InputError(f"{where}: weight {name!r} contains NaN or inf; the model is broken, retrain or re-export it")


def _read_state_dict(path: str, where: str) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file, or a torch state dict loaded with ``weights_only=True``."""
    if path.endswith(".safetensors"):
        tensors, _ = read_tensors(path)
        return tensors
    if not os.path.isfile(path):
        raise InputError(f"{where}: weights file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for code-carrying pickles, RuntimeError for non-torch files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InputError(
            f"{where}: {path} cannot be loaded as plain tensors (weights_only=True refused it: {first}); "
            "it needs code to unpickle (e.g. a whole pickled nn.Module), which is not run. "
            "Export a state_dict (torch.save(model.state_dict(), path)) or a .safetensors file instead"
        ) from exc
    for key in ("state_dict", "model_state_dict"):  # common checkpoint layouts, e.g. RobustBench's
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    if not isinstance(state, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise InputError(f"{where}: {path} is not a state dict (a mapping of names to tensors); export model.state_dict()")
    return state


def check_bundled_copies(module_name: str) -> None:
    """Refuse the stale ``robustbench`` / ``autoattack`` copies that torchattacks' wheel installs.

    torchattacks 3.3 ships top-level ``robustbench`` and ``autoattack`` packages inside its own
    wheel, so ``import robustbench`` can load an old copy that no ``robustbench`` distribution
    owns. We detect that by asking which installed distribution owns the imported file.
    """
    import importlib.metadata
    import importlib.util

    top = module_name.split(".", 1)[0]
    if top not in {"robustbench", "autoattack"}:
        return
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        return
    owners = importlib.metadata.packages_distributions().get(top, [])
    if owners and all(owner.lower() == "torchattacks" for owner in owners):
        raise InputError(
            f"'{top}' at {spec.origin} is the stale copy bundled in torchattacks' wheel, not the real package; "
            f"install the real one after torchattacks (pip install {'robustbench' if top == 'robustbench' else 'pyautoattack'}), "
            "or point the factory at your own copy of the architecture"
        )


def _import_factory(target: str, where: str) -> Callable[[], nn.Module]:
    import importlib

    module_name, _, attribute = target.rpartition(":")
    if not module_name or not attribute:
        raise InputError(f"{where}: expected 'factory:module.path:callable@WEIGHTS'")
    check_bundled_copies(module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{where}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise InputError(f"{where}: module {module_name!r} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise InputError(f"{where}: {module_name}:{attribute} is not callable")
    return factory


def _load_factory(reference: str) -> tuple[nn.Module, str, dict[str, Any]]:
    where = reference
    target, _, weights = reference[len(FACTORY_PREFIX):].partition("@")
    if not weights:
        raise InputError(f"{where}: no weights; use 'factory:module.path:callable@WEIGHTS' (a .safetensors file or a torch state dict)")
    factory = _import_factory(target, where)
    network = factory()
    if not isinstance(network, nn.Module):
        raise InputError(f"{where}: {target} returned {type(network).__name__}, not a torch nn.Module")
    state = _read_state_dict(weights, where)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"{where}: weights {weights} do not fit the network built by {target} ({first})") from exc
    return network, f"factory:{target}", {"weights": weights}


def _load_torchscript(reference: str) -> tuple[nn.Module, str, dict[str, Any]]:
    path = reference[len(TORCHSCRIPT_PREFIX):]
    if not path:
        raise InputError(f"{reference}: no path; use 'torchscript:PATH'")
    if not os.path.isfile(path):
        raise InputError(f"{reference}: file not found")
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; loading existing archives still works
            warnings.simplefilter("ignore", DeprecationWarning)
            network = torch.jit.load(path, map_location="cpu")
    except Exception as exc:  # RuntimeError for anything that is not a TorchScript archive
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise InputError(f"{reference}: not a TorchScript archive ({first}); export it with torch.jit.script(model).save(path)") from exc
    return network, "torchscript", {"path": path}


def load_model_reference(
    reference: str,
    device: torch.device | str = "cpu",
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    trusted_factories: Collection[str] = (),
    tracking_uri: str | None = None,
) -> LoadedModel:
    """Load a model from any supported reference, in eval mode on ``device``.

    * ``models:/name@alias``, ``models:/name/version`` or ``runs:/id/path``: an rcat model file
      logged to MLflow (downloaded, never unpickled; see :func:`_load_mlflow`);
    * a path to an rcat model file (:func:`load_model`); ``input_shape`` / ``num_classes``, if
      given, must match its header, and ``normalization`` must not be given (the file carries its own);
    * ``factory:module.path:callable@WEIGHTS``: imports ``module.path``, calls ``callable()`` for an
      ``nn.Module`` and loads WEIGHTS into it (strictly): a ``.safetensors`` file, or a torch state
      dict read with ``torch.load(..., weights_only=True)``; a file that needs code to unpickle is refused;
    * ``torchscript:PATH``: a TorchScript archive (``torch.jit.load``; it cannot carry arbitrary Python).

    For the last two, ``input_shape`` (C, H, W) is required; ``num_classes`` defaults to the width of
    the logits on a zero input. ``normalization`` = (mean, std) wraps the network as
    ``Sequential(Normalize(mean, std), network)`` so inputs (and attack budgets) stay in [0, 1] pixel
    space. The returned spec records architecture ``factory:module.path:callable`` or
    ``torchscript``. A factory model saved with :func:`save_model` reloads through :func:`load_model`
    when its factory is passed in ``trusted_factories``; a TorchScript model cannot be rebuilt from a
    model file (evaluate it from its archive instead).
    """
    if reference.startswith(MLFLOW_PREFIXES):  # from ``tracking_uri`` (default: MLflow's own resolution, MLFLOW_TRACKING_URI)
        return _load_mlflow(reference, device, trusted_factories, tracking_uri)
    if not reference.startswith((FACTORY_PREFIX, TORCHSCRIPT_PREFIX)):
        loaded = load_model(reference, device, trusted_factories)
        if normalization is not None:
            raise InputError(f"{reference}: an rcat model file carries its own normalisation in its header; do not pass one")
        if input_shape is not None and tuple(input_shape) != tuple(loaded.spec.input_shape):
            raise InputError(f"{reference}: model expects inputs of shape {tuple(loaded.spec.input_shape)}, not {tuple(input_shape)}")
        if num_classes is not None and num_classes != loaded.spec.num_classes:
            raise InputError(f"{reference}: model outputs {loaded.spec.num_classes} classes, not {num_classes}")
        return loaded

    loader = _load_factory if reference.startswith(FACTORY_PREFIX) else _load_torchscript
    network, architecture, kwargs = loader(reference)
    if input_shape is None:
        raise InputError(f"{reference}: pass input_shape=(C, H, W) for a factory or TorchScript model")
    input_shape = tuple(int(size) for size in input_shape)
    if normalization is not None:
        mean, std = (tuple(float(v) for v in normalization[0]), tuple(float(v) for v in normalization[1]))
        if len(mean) != len(std) or len(mean) not in (1, input_shape[0]):
            raise InputError(f"{reference}: normalization needs one mean and one std per channel ({input_shape[0]}), got {len(mean)} and {len(std)}")
        if any(value <= 0 for value in std):
            raise InputError(f"{reference}: normalization std values must be positive, got {std}")
        normalization = (mean, std)
        network = nn.Sequential(Normalize(mean, std), network)
    _check_finite_weights(network, reference)
    network.eval()
    if num_classes is None:
        with torch.no_grad():
            try:
                logits = network(torch.zeros(1, *input_shape))
            except Exception as exc:  # shape errors from inside the user's network
                raise InputError(f"{reference}: forward pass on an input of shape {(1, *input_shape)} failed ({exc.__class__.__name__}: {exc})") from exc
        if logits.ndim != 2:
            raise InputError(f"{reference}: model returned logits of shape {tuple(logits.shape)}, expected (N, classes)")
        num_classes = int(logits.shape[1])
    spec = ModelSpec(architecture, input_shape, int(num_classes), kwargs, normalization)
    digest = weights_digest(network)
    network.to(device).eval()
    return LoadedModel(network, spec, digest, reference, {"source": architecture})
