"""Atomic writes, strict JSON, parquet metadata, tensor files, content hashes."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from rcat.errors import InputError
from rcat.safe_io import (
    atomic_path,
    parquet_metadata,
    read_json,
    read_parquet,
    read_tensors,
    sha256_file,
    sha256_json,
    sha256_tensors,
    write_json,
    write_parquet,
    write_tensors,
)


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_path_failure_leaves_old_file_and_no_temp(tmp_path, error):
    target = tmp_path / "out.json"
    target.write_text("old content")
    with pytest.raises(error), atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("half-written new content")
        raise error()
    assert target.read_text() == "old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_path_failure_without_previous_file_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "new.bin"
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        raise Boom()
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_path_success_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "deep" / "dir" / "out.txt"
    target.parent.mkdir(parents=True)
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # not visible before the block ends
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_write_json_turns_nan_and_inf_into_null(tmp_path):
    path = tmp_path / "m.json"
    payload = {
        "btc": math.nan,
        "nested": {"values": [1.0, math.inf, -math.inf, (math.nan, 2)]},
        "numpy": np.float64(0.25),
        "count": np.int64(3),
        "tensor": torch.tensor(1.5),
        "path": tmp_path,
        "ok": 0.5,
    }
    write_json(path, payload)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)  # strict JSON parses
    assert data == {
        "btc": None,
        "nested": {"values": [1.0, None, None, [None, 2]]},
        "numpy": 0.25,
        "count": 3,
        "tensor": 1.5,
        "path": str(tmp_path),
        "ok": 0.5,
    }
    assert read_json(path) == data
    assert text.endswith("\n") and list(data) == sorted(data)  # key-sorted


def test_write_json_does_not_mutate_payload(tmp_path):
    payload = {"x": math.nan}
    write_json(tmp_path / "a.json", payload)
    assert math.isnan(payload["x"])


def test_write_json_unserialisable_leaves_no_file(tmp_path):
    path = tmp_path / "bad.json"
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_read_json_missing_and_malformed(tmp_path):
    missing = tmp_path / "absent.json"
    with pytest.raises(InputError, match="not found") as info:
        read_json(missing)
    assert str(missing) in str(info.value)
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": 1,\n')
    with pytest.raises(InputError, match="not valid JSON") as info:
        read_json(broken)
    assert str(broken) in str(info.value)
    nan_file = tmp_path / "nan.json"
    nan_file.write_text("{]")
    with pytest.raises(InputError):
        read_json(nan_file)


def test_parquet_roundtrip_with_metadata(tmp_path):
    path = tmp_path / "outcomes.parquet"
    frame = pd.DataFrame({"sample_index": np.array([3, 1, 2], dtype="int64"), "robust": [True, False, True], "margin": [0.5, -1.0, 2.0], "split": ["v", "v", "v"]})
    metadata = {"split_digest": "abc123", "model": "old", "attack_config": json.dumps({"eps": 0.1})}
    write_parquet(path, frame, metadata)
    assert parquet_metadata(path) == metadata
    pd.testing.assert_frame_equal(read_parquet(path), frame)
    pd.testing.assert_frame_equal(read_parquet(path, columns=["robust"]), frame[["robust"]])


def test_parquet_without_metadata_has_none(tmp_path):
    path = tmp_path / "plain.parquet"
    write_parquet(path, pd.DataFrame({"a": [1]}))
    assert parquet_metadata(path) == {}


def test_read_parquet_missing_and_corrupt(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_parquet(tmp_path / "absent.parquet")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="unreadable parquet") as info:
        read_parquet(corrupt)
    assert str(corrupt) in str(info.value)


def test_tensor_roundtrip_and_bad_files(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3).t(), "b": torch.tensor([1, 2], dtype=torch.int64)}  # non-contiguous is fine
    write_tensors(path, tensors, {"k": "v"})
    loaded, metadata = read_tensors(path)
    assert metadata == {"k": "v"}
    assert set(loaded) == {"a", "b"}
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    with pytest.raises(InputError, match="not found"):
        read_tensors(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(InputError, match="not a valid safetensors") as info:
        read_tensors(bad)
    assert str(bad) in str(info.value)


def test_content_hashes(tmp_path):
    a = torch.tensor([1.0, 2.0])
    assert sha256_tensors(a) == sha256_tensors(a.clone())
    assert sha256_tensors(a) != sha256_tensors(a.double())  # dtype matters
    assert sha256_tensors(a.view(1, 2)) != sha256_tensors(a)  # shape matters
    assert sha256_tensors(a, a) != sha256_tensors(a)
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": [1, 2], "b": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
