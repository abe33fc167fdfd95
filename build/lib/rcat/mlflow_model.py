"""rcat model files as MLflow models: ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` work on them.

A registered version is a directory with an ``MLmodel`` file and the rcat model file under
``data/``. Its only flavour is ``python_function`` with ``loader_module: rcat.mlflow_model``:
MLflow imports *this installed module* and calls :func:`_load_pyfunc` on the data path, which
reads the safetensors file through :func:`rcat.models.load_model`. Nothing is unpickled and no
code comes from the artifact (no ``python_model`` pickle, no ``code_paths``); loading needs rcat
installed where the model is loaded or served.

The signature is one float32 tensor of shape ``(-1, C, H, W)`` in [0, 1] pixel units (the model
normalises inside) and one float32 output of shape ``(-1, num_classes)``: the class scores (logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.safetensors"
"""The rcat model file's name inside the MLflow model's ``data/`` directory."""


class RcatPyfuncModel:
    """What :func:`_load_pyfunc` returns: ``predict(batch) -> class scores`` (numpy, float32)."""

    def __init__(self, path: str) -> None:
        from rcat.models import load_model

        self.loaded = load_model(path, "cpu")

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        if isinstance(model_input, dict):  # a named-tensor request: its one tensor
            if len(model_input) != 1:
                raise ValueError(f"rcat model takes one input tensor, got {len(model_input)}: {sorted(model_input)}")
            model_input = next(iter(model_input.values()))
        array = np.asarray(model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input, dtype=np.float32)
        expected = tuple(self.loaded.spec.input_shape)
        if array.ndim == len(expected) and tuple(array.shape) == expected:
            array = array[None]
        if tuple(array.shape[1:]) != expected:
            raise ValueError(f"rcat model expects inputs of shape (N, {', '.join(map(str, expected))}), got {tuple(array.shape)}")
        with torch.no_grad():
            return self.loaded.network(torch.from_numpy(np.ascontiguousarray(array))).numpy().astype(np.float32)


def _load_pyfunc(data_path: str) -> RcatPyfuncModel:
    """MLflow's entry point for ``loader_module``: ``data_path`` is the model's ``data`` entry."""
    path = Path(data_path)
    return RcatPyfuncModel(str(path / MODEL_FILE if path.is_dir() else path))


def save_mlflow_model(model_file: str | Path, directory: str | Path) -> Path:
    """Write ``directory`` (which must not exist) as an MLflow model holding ``model_file``; return it."""
    import shutil
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from rcat.models import load_model

    spec = load_model(model_file, "cpu").spec
    # unnamed tensors: pyfunc then passes predict() the array itself
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *spec.input_shape))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))]))
    with tempfile.TemporaryDirectory(prefix="rcat-mlflow-model-") as tmp:
        staged = Path(tmp) / MODEL_FILE
        shutil.copyfile(model_file, staged)
        # pip_requirements given: MLflow would otherwise infer them by importing and profiling the model
        mlflow.pyfunc.save_model(path=str(directory), loader_module="rcat.mlflow_model", data_path=str(staged), signature=signature,
                                 pip_requirements=["torch", "safetensors", "numpy"])
    return Path(directory)
