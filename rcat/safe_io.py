"""Safe, atomic file I/O: every output is written to a temporary file and renamed into place.

A stage killed mid-write (or a full disk) therefore leaves either the previous complete file
or no file, never a half-written one that DVC or a later stage could take as complete.
Nothing here unpickles: tensors travel as safetensors, tables as parquet, records as JSON.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from rcat.errors import InputError, OutputError

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on
    POSIX file systems. On any exception the temporary file is removed and ``path`` is untouched;
    an :class:`OSError` (disk full, no permission) becomes a one-line :class:`OutputError`.
    Temporary files of ``path`` left by a killed writer are removed first (one writer per output,
    as under DVC, is assumed).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A process killed mid-write (SIGKILL, power loss) cannot remove its temporary file: drop
        # such leftovers of this target, so they do not pile up in directories DVC hashes as deps.
        leftover = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")  # tempfile.mkstemp's names
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
            if leftover.fullmatch(stale.name):
                stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        # mkstemp creates 0600 whatever the umask; outputs get the permissions a plain open() would give
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        os.close(fd)
    except OSError as exc:
        raise _output_error(target, exc) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise _output_error(target, exc) from exc
        raise


def _output_error(target: Path, exc: OSError) -> OutputError:
    """One line for a failed write (disk full, permissions): what failed, that nothing changed, what to do."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = "free disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the directory's space and permissions"
    error = OutputError(f"{target}: could not write ({reason}); the previous file, if any, is unchanged; {fix} and rerun")
    error.errno = exc.errno
    return error


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def _nan_to_none(value: Any) -> Any:
    """Replace NaN/inf floats by None: strict JSON has no NaN, and DVC/MLflow readers reject it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value


def write_json(path: str | os.PathLike[str], payload: Any, *, sort_keys: bool = True) -> Path:
    """Write ``payload`` as indented JSON, atomically: keys sorted, or in the payload's own order with
    ``sort_keys=False`` (for files whose order a reader shows, like DVC's metrics). NaN and inf become ``null``."""
    text = json.dumps(_nan_to_none(payload), indent=2, sort_keys=sort_keys, default=_json_default)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; run the stage that produces it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); delete it and rerun the stage") from exc


def write_parquet(path: str | os.PathLike[str], frame: pd.DataFrame, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a frame to parquet atomically; ``metadata`` is stored in the file's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({f"rcat.{key}".encode(): value.encode() for key, value in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_parquet(path: str | os.PathLike[str], columns: list[str] | None = None) -> pd.DataFrame:
    """Read a parquet file written by :func:`write_parquet`; missing or corrupt files raise :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; run the stage that produces it first")
    try:
        return pd.read_parquet(path, columns=columns)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise InputError(f"{path}: unreadable parquet ({exc}); delete it and rerun the stage") from exc


def parquet_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Return the ``rcat.*`` key-value metadata of a parquet file, without the prefix."""
    import pyarrow.parquet as pq

    raw = pq.read_schema(path).metadata or {}
    return {key.decode()[5:]: value.decode() for key, value in raw.items() if key.startswith(b"rcat.")}


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors as safetensors (no pickle), atomically, with string ``metadata`` in the header.

    The file is serialised in memory and written by :func:`atomic_path` itself: ``save_file``
    would stage it in a temporary file of its own (``.tmpXXXXXX``), which a killed stage leaves
    behind, and would report a full disk as a ``SafetensorError`` instead of an :class:`OSError`.
    """
    from safetensors.torch import save as serialize_tensors  # torch: imported where tensors are written, not by every reader of this module

    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    data = _canonical_safetensors_header(serialize_tensors(contiguous, metadata=dict(metadata or {})))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _canonical_safetensors_header(data: bytes) -> bytes:
    """The same safetensors bytes with the JSON header's keys sorted.

    safetensors serialises the metadata from a Rust hash map whose order changes from call to
    call, so the same tensors and metadata gave different bytes, different DVC hashes and
    needless reruns downstream. Sorted keys make the file a function of its content.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def read_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors, header metadata). Never executes code from the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError for bad headers
        raise InputError(f"{path}: not a valid safetensors file ({exc})") from exc
    return tensors, metadata


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tensor_into(digest: Any, tensor: torch.Tensor) -> None:
    """Feed ``tensor``'s dtype, shape and raw bytes to ``digest`` (a hashlib object), without copying its memory."""
    array = tensor.detach().cpu().contiguous()
    digest.update(str(array.dtype).encode())
    digest.update(str(tuple(array.shape)).encode())
    flat = array.reshape(-1)
    try:
        buffer = flat.numpy()
    except TypeError:  # dtypes numpy lacks (bfloat16, ...): hash the raw bytes
        import torch

        buffer = flat.view(torch.uint8).numpy()
    digest.update(memoryview(buffer).cast("B"))  # type: ignore[arg-type]  # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12


def sha256_tensors(*tensors: torch.Tensor) -> str:
    """Hex SHA-256 over the dtype, shape and raw bytes of each tensor, in order (a content hash).

    Hashes the tensors' memory without copying it (a cached attack rerun's cost is mostly this).
    """
    digest = hashlib.sha256()
    for tensor in tensors:
        hash_tensor_into(digest, tensor)
    return digest.hexdigest()


def frame_digest(frame: pd.DataFrame) -> str:
    """Hex SHA-256 of a frame's content: column names, dtypes and values in row order (not its file
    bytes: the same frame written twice, or by another parquet writer, has the same digest)."""
    import numpy as np

    digest = hashlib.sha256()
    digest.update(str(len(frame)).encode())
    for name in frame.columns:
        column = frame[name]
        digest.update(f"\x00{name}\x00{column.dtype}\x00".encode())
        values = column.to_numpy()
        if values.dtype == object:
            digest.update("\x1f".join(map(str, values.tolist())).encode())
        else:
            digest.update(memoryview(np.ascontiguousarray(values)).cast("B"))  # type: ignore[arg-type]  # numpy's stubs: __buffer__ only for Python >= 3.12
    return digest.hexdigest()


def sha256_json(payload: Any) -> str:
    """Hex SHA-256 of the canonical (sorted-key, compact) JSON of ``payload``."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()
