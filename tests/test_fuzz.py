"""Property-based tests of rcat's input surfaces: params files, model-file headers, data files.

Every generated input must end in a parsed object or rcat's one-line error (an
:class:`~rcat.errors.RcatError`), never another exception. The suite runs a bounded, seeded
number of examples per test (``RCAT_FUZZ_EXAMPLES``, default 40); ``make fuzz`` runs many more
(docs/ROBUSTNESS.md has its last count).
"""

from __future__ import annotations

import io
import json
import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT
from rcat.errors import RcatError
from rcat.pixels import as_float_images

EXAMPLES = int(os.environ.get("RCAT_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

BASE_PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(string.printable, max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=12), inner, max_size=4)),
                      max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))


PARAM_PATHS = [path for path in _paths(BASE_PARAMS) if path]


@st.composite
def mutated_params(draw):
    """The repo's params.yaml with a few keys replaced by arbitrary values, deleted, or added."""
    raw = json.loads(json.dumps(BASE_PARAMS))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PARAM_PATHS))
        node = raw
        for part in path[:-1]:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            if isinstance(node, dict):
                action = draw(st.sampled_from(["replace", "delete", "add"]))
                if action == "replace":
                    node[path[-1]] = draw(values)
                elif action == "delete":
                    node.pop(path[-1], None)
                else:
                    node[draw(st.text(string.ascii_lowercase, min_size=1, max_size=8))] = draw(values)
    return raw


def _load(path: Path):
    from rcat.config import load_params

    try:
        params = load_params(path)
    except RcatError as exc:
        assert "\n" not in str(exc), str(exc)
        event("one-line error")
        return exc
    event("parsed")
    return params


@FUZZ
@given(raw=mutated_params())
def test_mutated_params_load_or_fail_with_one_line(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    _load(path)


@FUZZ
@given(text=st.text(string.printable + "&*!|>-:[]{}", max_size=300))
def test_arbitrary_yaml_text_loads_or_fails_with_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "params.yaml"
    path.write_text(text)
    _load(path)


HEADER_FIELDS = ("format", "architecture", "kwargs", "input_shape", "num_classes", "normalization", "weights_digest")
header_values = st.one_of(st.text(string.printable, max_size=40), scalars.map(lambda value: json.dumps(value)), values.map(lambda value: json.dumps(value)))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(HEADER_FIELDS), st.one_of(st.none(), header_values), max_size=4))
def test_mutated_model_headers_load_or_fail_with_one_line(tmp_path_factory, trained_mlp, changes):
    from safetensors.torch import save_file

    from rcat.models import load_model

    network, spec = trained_mlp
    metadata = spec.to_metadata()
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path), metadata=metadata)
    try:
        load_model(path)
        event("loaded")
    except RcatError as exc:
        assert "\n" not in str(exc)
        event("one-line error")


dtypes = st.sampled_from(["uint8", "float32", "float64", "int64", "int8", "bool", "float16", "complex64", "U3"])


@st.composite
def npz_arrays(draw):
    n = draw(st.integers(0, 6))
    shape = draw(st.sampled_from([(n, 1, 4, 4), (n, 4, 4, 3), (n, 4, 4), (n,), (n, 2, 4, 4, 1)]))
    images = np.zeros(shape, dtype=draw(dtypes))
    if images.dtype.kind == "f":
        images = images + draw(st.sampled_from([0.0, 0.5, 2.0, np.nan, np.inf, -1.0]))
    label_kind = draw(st.sampled_from(["int", "float", "neg", "huge", "shape", "text"]))
    labels = {"int": np.arange(n) % 3, "float": np.arange(n) / 2, "neg": -np.ones(n, np.int64), "huge": np.full(n, 2**40),
              "shape": np.zeros((n, 2), np.int64), "text": np.array(["a"] * n)}[label_kind]
    arrays = {"images": images, "labels": labels}
    if draw(st.booleans()):
        del arrays[draw(st.sampled_from(["images", "labels"]))]
    return arrays


@FUZZ
@given(arrays=npz_arrays())
def test_npz_files_load_or_fail_with_one_line(tmp_path_factory, arrays):
    from rcat.data import load_dataset

    path = tmp_path_factory.mktemp("fuzz") / "data.npz"
    np.savez(path, **arrays)
    try:
        dataset = load_dataset(f"npz:{path}")
    except RcatError as exc:
        assert "\n" not in str(exc)
        event("one-line error")
        return
    event("loaded")
    assert as_float_images(dataset.images).ndim == 4 and bool(((as_float_images(dataset.images) >= 0) & (as_float_images(dataset.images) <= 1)).all())
    assert len(dataset.labels) == 0 or int(dataset.labels.max()) < dataset.num_classes


@FUZZ
@given(blob=st.binary(max_size=400), suffix=st.sampled_from([".png", ".jpg", ".gif", ".tiff", ".bmp"]))
def test_image_files_load_or_fail_with_one_line(tmp_path_factory, blob, suffix):
    from PIL import Image

    from rcat.data import load_imagefolder

    root = tmp_path_factory.mktemp("fuzz") / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "a" / "ok.png")
    # a valid image's header with arbitrary bytes after it, or arbitrary bytes alone
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(buffer, format="PNG")
    (root / "b" / f"fuzzed{suffix}").write_bytes(buffer.getvalue()[: len(blob) % 60] + blob)
    try:
        dataset = load_imagefolder(root)
    except RcatError as exc:
        assert "\n" not in str(exc)
        event("one-line error")
        return
    event("loaded")
    assert dataset.images.shape[0] == 2


@pytest.mark.parametrize("shape", [(3, 1, 4, 4), (0, 1, 4, 4)])
def test_split_files_with_arbitrary_tensors(tmp_path, shape):
    from rcat.data import load_split
    from rcat.safe_io import write_tensors

    for labels in (torch.zeros(shape[0], dtype=torch.int64), torch.full((shape[0],), -1), torch.zeros(shape[0] + 1, dtype=torch.int64)):
        path = tmp_path / "split.safetensors"
        write_tensors(path, {"images": torch.zeros(shape), "labels": labels, "sample_index": torch.arange(shape[0])}, {"num_classes": "3"})
        try:
            load_split(path)
        except RcatError as exc:
            assert "\n" not in str(exc)
