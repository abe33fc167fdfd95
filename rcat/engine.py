"""A content-addressed, chunked, resumable attack runner over :func:`rcat.attacks.attack_outcomes`.

* **Content-addressed.** A run's key (:func:`attack_key`) is the SHA-256 of the model's weights,
  the split's content, the attack's identity, the seed, the chunk size and the versions of torch,
  torchattacks and this engine's format. The same key means the same result, so a rerun reuses
  it; any change of an input gives a new key (and a new directory). ``batch_size`` and
  ``cache_dir`` are not part of it.
* **Chunked.** Samples are attacked ``chunk_size`` at a time; chunk ``i`` is written atomically as
  ``<cache_dir>/<key>/chunk-<i:05d>.parquet``. A chunk's rows do not depend on the chunking
  (``chunk_size`` is a multiple of the attack's ``batch_size`` and every batch is seeded by its
  position in the whole split), so the merged chunks equal one ``attack_outcomes`` call on the
  whole split. Only one chunk's adversarial points are in memory at a time; with
  ``save_adversarial=True`` they are written as float32 safetensors next to the shard
  (``chunk-<i:05d>.adversarial.safetensors``).
* **Resumable.** ``manifest.json`` is written last and marks a complete run. A run killed midway
  resumes at the first missing shard. Every shard carries its own content checksum
  (:func:`rcat.safe_io.frame_digest` of its rows, in the parquet footer, written with it in one
  atomic rename), so a shard is verified on every reuse, with or without a manifest (a killed
  run leaves none). Shards are checked before reuse (key recorded in the shard and the
  manifest, its own checksum, row count, sample indices, and the manifest's SHA-256 of each
  shard): a corrupt, edited or foreign shard is recomputed with a warning, never silently reused.
* **Distributed (optional).** With ``workers > 1`` or a ``dask_address``, missing chunks run as
  Prefect tasks on a ``prefect_dask.DaskTaskRunner`` (a local cluster with one torch thread per
  worker, or the scheduler at ``dask_address``). The network travels to each worker once
  (scattered, broadcast), not with every task; a task carries its chunks' rows only. The driver
  keeps one task in flight per worker thread and gives the next to the worker that freed
  (:func:`keep_slots_busy`). Workers write their shards; only the driver writes the manifest.
* **Progress and summary.** With a terminal on stderr (or ``progress=True``) a tqdm bar shows
  samples done, samples/s and the robust accuracy so far; ``progress=True`` without a terminal
  prints one plain line per chunk instead (clean logs in DVC and CI). Every returned frame
  carries a :class:`RunSummary` (samples, seconds, samples/s, robust accuracy, chunks computed
  and reused, workers) in ``frame.attrs["rcat.engine"]`` (read it with :func:`summary_of`), and
  the manifest records the summary of the run that wrote it.

Shards hold the computed columns only; provenance (split and model names, digests) and the
attack's label are added when the frame is assembled, so one cached run serves every caller
that attacks the same weights on the same data.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

import numpy as np
import pandas as pd
import torch
import torchattacks
from torch import nn

from rcat.attacks import OUTCOME_COLUMNS, attack_outcomes
from rcat.config import AttackConfig
from rcat.errors import InputError
from rcat.safe_io import (
    frame_digest,
    parquet_metadata,
    read_json,
    read_parquet,
    sha256_file,
    sha256_json,
    sha256_tensors,
    write_json,
    write_parquet,
    write_tensors,
)

T = TypeVar("T")
S = TypeVar("S")

ENGINE_FORMAT_VERSION = "1"
MANIFEST_NAME = "manifest.json"

PROVENANCE_COLUMNS = ("split", "model", "model_digest", "split_digest", "attack", "attack_config")
COMPUTED_COLUMNS = tuple(column for column in OUTCOME_COLUMNS if column not in PROVENANCE_COLUMNS)
"""Columns stored in a shard (everything in :data:`OUTCOME_COLUMNS` that does not name where a row came from)."""


SUMMARY_ATTR = "rcat.engine"
"""Key of the :class:`RunSummary` (as a dict) in the ``attrs`` of a frame returned by :func:`run_attack`."""


@dataclass(frozen=True)
class RunSummary:
    """What one :func:`run_attack` call did.

    ``seconds`` is its wall time (reading shards, attacking, writing); ``samples_per_second`` is
    ``samples / seconds`` (cached samples included, so a cached rerun shows a high rate);
    ``robust_accuracy`` and ``clean_accuracy`` are the means of the ``robust`` and
    ``clean_correct`` columns over every sample; ``workers`` is 1 in process, else the number of
    Dask workers (or 0 for an external cluster, whose size the engine does not choose).
    """

    key: str
    samples: int
    seconds: float
    robust_accuracy: float
    clean_accuracy: float
    chunks: int
    chunks_computed: int
    chunks_reused: int
    samples_computed: int
    workers: int

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Numbers to log (e.g. to MLflow): samples, seconds, samples_per_s, robust_accuracy,
        clean_accuracy, chunks_computed, chunks_reused, samples_computed, workers."""
        return {"samples": float(self.samples), "seconds": round(self.seconds, 3), "samples_per_s": round(self.samples_per_second, 2),
                "robust_accuracy": self.robust_accuracy, "clean_accuracy": self.clean_accuracy, "chunks_computed": float(self.chunks_computed),
                "chunks_reused": float(self.chunks_reused), "samples_computed": float(self.samples_computed), "workers": float(self.workers)}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_second": round(self.samples_per_second, 2)}


def summary_of(frame: pd.DataFrame) -> RunSummary | None:
    """The :class:`RunSummary` a frame returned by :func:`run_attack` carries (None for another frame)."""
    raw = frame.attrs.get(SUMMARY_ATTR)
    if not isinstance(raw, dict):
        return None
    return RunSummary(**{name: raw[name] for name in RunSummary.__dataclass_fields__})


class CacheWarning(UserWarning):
    """A cached shard or manifest could not be used and is recomputed."""


class SplitTensors(NamedTuple):
    """What the engine attacks: images in [0, 1], labels and each sample's index in the source."""

    images: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor


def versions() -> dict[str, str]:
    """The versions a cached result depends on."""
    return {"torch": torch.__version__, "torchattacks": torchattacks.__version__, "engine_format": ENGINE_FORMAT_VERSION}


def attack_key(model_digest: str, split_digest: str, attack_identity: dict[str, Any], seed: int, chunk_size: int) -> str:
    """SHA-256 of everything a run's result depends on (plus torch, torchattacks and format versions)."""
    payload = {"model_digest": model_digest, "split_digest": split_digest, "attack": attack_identity, "seed": int(seed),
               "chunk_size": int(chunk_size), **versions()}
    return sha256_json(payload)


def model_content_digest(network: nn.Module) -> str:
    """SHA-256 of a network's class and state dict (parameter and buffer names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    digest.update(f"{type(network).__module__}.{type(network).__qualname__}".encode())
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(sha256_tensors(tensor).encode())
    return digest.hexdigest()


def split_content_digest(split: Any) -> str:
    """SHA-256 of a split's images, labels and sample indices (the same as :attr:`rcat.data.Split.digest`)."""
    images, labels, sample_index = _split_tensors(split)
    return sha256_tensors(images, labels, sample_index)


def run_key(network: nn.Module, split: Any, config: AttackConfig, seed: int, chunk_size: int) -> str:
    """The key :func:`run_attack` files this run under (``<cache_dir>/<key>/``)."""
    images, labels, sample_index = _split_tensors(split)
    return attack_key(model_content_digest(network), sha256_tensors(images, labels, sample_index), config.identity(), seed, chunk_size)


def _split_tensors(split: Any) -> SplitTensors:
    if isinstance(split, tuple) and len(split) == 3:
        return SplitTensors(*split)
    return SplitTensors(split.images, split.labels, split.sample_index)


def check_chunk_size(chunk_size: int, config: AttackConfig) -> None:
    """``chunk_size`` must be a positive multiple of the attack's ``batch_size`` (chunking must not change results)."""
    if chunk_size < 1 or chunk_size % config.batch_size:
        raise InputError(f"engine.chunk_size {chunk_size} must be a positive multiple of attack.batch_size {config.batch_size} "
                         "(otherwise chunking would change which samples share a batch, and the results); "
                         f"use e.g. chunk_size: {max(1, chunk_size // config.batch_size) * config.batch_size}")


def shard_name(index: int) -> str:
    return f"chunk-{index:05d}.parquet"


def adversarial_name(index: int) -> str:
    return f"chunk-{index:05d}.adversarial.safetensors"


def _columns(config: AttackConfig) -> list[str]:
    return list(COMPUTED_COLUMNS) + (["broken_by"] if config.is_ensemble else [])


def compute_chunk(network: nn.Module, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor, config: AttackConfig, *,
                  num_classes: int, seed: int, device: torch.device | str, offset: int, directory: Path, index: int, key: str,
                  save_adversarial: bool) -> tuple[dict[str, Any], pd.DataFrame]:
    """Attack one chunk (positions ``offset``... of the split) and write its shard; return the shard's record and frame."""
    provenance = {"split": "-", "model": "-", "model_digest": "-", "split_digest": "-"}
    began = time.perf_counter()
    result = attack_outcomes(network, images, labels, sample_index, config, num_classes=num_classes, seed=seed, provenance=provenance,
                             device=device, return_adversarial=save_adversarial, position_offset=offset)
    frame, adversarial = result if save_adversarial else (result, None)
    frame = frame[_columns(config)]
    metadata = {"engine_key": key, "chunk": str(index), "offset": str(offset), "content_sha256": frame_digest(frame.reset_index(drop=True))}
    if adversarial is not None:
        # written before the shard: a present shard implies its adversarial points are there too
        write_tensors(directory / adversarial_name(index), {"adversarial": adversarial.float(), "sample_index": sample_index.cpu()}, metadata)
    path = write_parquet(directory / shard_name(index), frame, metadata)
    del result, adversarial
    release_free_memory()
    record = {"file": path.name, "rows": len(frame), "sha256": sha256_file(path), "seconds": round(time.perf_counter() - began, 3),
              "torch_threads": torch.get_num_threads(), "robust": int(frame["robust"].sum()), "clean_correct": int(frame["clean_correct"].sum())}
    return record, frame


TRIM_GROWTH_BYTES = 32 * 2**20
"""Resident growth since the last trim above which :func:`release_free_memory` trims the heap."""


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``) when the resident size grew by
    more than :data:`TRIM_GROWTH_BYTES` since the last trim; a no-op elsewhere than glibc.

    An attack allocates and frees tens of MB per batch (activations, gradients); glibc keeps the
    freed pages in its arenas, and fragmentation makes the resident size creep up chunk after
    chunk (by about 250 MB over 50,000 CIFAR images without trimming, measured) although nothing
    is held. Trimming after every chunk bounds that, but costs 1-4% of the attack's time: the
    next chunk faults every released page in again. Trimming only past a growth threshold keeps
    the bound (threshold plus one chunk's transients) and pays the faults rarely.
    """
    global _MALLOC_TRIM, _TRIMMED_AT
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if not _MALLOC_TRIM:
        return
    resident = resident_bytes()
    if resident is not None and _TRIMMED_AT is not None and resident - _TRIMMED_AT <= TRIM_GROWTH_BYTES:
        return
    _MALLOC_TRIM(0)
    _TRIMMED_AT = resident_bytes()


def resident_bytes() -> int | None:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_MALLOC_TRIM: Any = None
_TRIMMED_AT: int | None = None


def _load_shard(path: Path, key: str, expected_index: np.ndarray, sha256: str | None, columns: list[str]) -> tuple[pd.DataFrame | None, str]:
    """A shard's frame if it is intact and belongs to this run, else ``(None, reason)``."""
    if not path.is_file():
        return None, "missing"
    if sha256 is not None and sha256_file(path) != sha256:
        return None, "its SHA-256 differs from the manifest's"
    try:
        metadata = parquet_metadata(path)
        if metadata.get("engine_key") != key:
            return None, "it belongs to another run (key mismatch)"
        frame = read_parquet(path)
    except Exception as exc:  # corrupt footer, truncated file, ...
        return None, f"unreadable ({type(exc).__name__})"
    if len(frame) != len(expected_index):
        return None, f"it has {len(frame)} rows, expected {len(expected_index)}"
    recorded = metadata.get("content_sha256")
    if recorded is None:
        return None, "it carries no content checksum (written by an older rcat, or rewritten)"
    if frame_digest(frame) != recorded:
        return None, "its rows differ from its own checksum (edited or corrupted)"
    if list(frame.columns) != columns or not np.array_equal(frame["sample_index"].to_numpy(), expected_index):
        return None, "its columns or sample indices do not match the split"
    return frame, ""


def _read_manifest(directory: Path, key: str, n_samples: int, n_chunks: int) -> tuple[dict[str, Any] | None, str]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None, ""
    try:
        manifest = read_json(path)
    except InputError as exc:
        return None, str(exc)
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None, f"{path}: records another key"
    chunks = manifest.get("chunks")
    if manifest.get("n_samples") != n_samples or not isinstance(chunks, list) or len(chunks) != n_chunks:
        return None, f"{path}: shard or sample count does not match"
    if not all(isinstance(chunk, dict) and isinstance(chunk.get("sha256"), str) for chunk in chunks):
        return None, f"{path}: malformed shard records"
    return manifest, ""


def run_attack(
    network: nn.Module,
    split: Any,
    config: AttackConfig,
    *,
    num_classes: int,
    seed: int,
    provenance: dict[str, str],
    device: torch.device | str = "cpu",
    cache_dir: str | Path,
    chunk_size: int,
    progress: bool | None = None,
    save_adversarial: bool = False,
    workers: int = 1,
    dask_address: str | None = None,
) -> pd.DataFrame:
    """Attack ``network`` on ``split`` (``images``, ``labels``, ``sample_index``), chunked and cached.

    Returns the same frame (columns and values) as :func:`rcat.attacks.attack_outcomes` on the
    whole split, with a :class:`RunSummary` in ``frame.attrs["rcat.engine"]`` (:func:`summary_of`).
    ``progress``: None shows a bar when stderr is a terminal; True also prints one line per chunk
    when it is not; False shows nothing. See the module docstring for the cache layout and the
    checks before reuse.
    """
    began = time.perf_counter()
    missing = {"split", "model", "model_digest", "split_digest"} - provenance.keys()
    if missing:
        raise ValueError(f"provenance is missing {sorted(missing)}")
    check_chunk_size(chunk_size, config)
    images, labels, sample_index = _split_tensors(split)
    n_samples = int(labels.shape[0])
    key = run_key(network, (images, labels, sample_index), config, seed, chunk_size)
    directory = Path(cache_dir) / key
    starts = list(range(0, n_samples, chunk_size))
    columns = _columns(config)

    manifest, problem = _read_manifest(directory, key, n_samples, len(starts))
    if problem:
        warnings.warn(f"attack cache {directory}: ignoring the manifest ({problem}); checking shards one by one", CacheWarning, stacklevel=2)
    records: list[dict[str, Any] | None] = [None] * len(starts)
    frames: list[pd.DataFrame | None] = [None] * len(starts)
    todo: list[int] = []
    index_all = sample_index.cpu().numpy().astype("int64")
    for i, start in enumerate(starts):
        expected = index_all[start : start + chunk_size]
        sha = manifest["chunks"][i]["sha256"] if manifest else None
        frame, reason = _load_shard(directory / shard_name(i), key, expected, sha, columns)
        if frame is not None and save_adversarial and not (directory / adversarial_name(i)).is_file():
            frame, reason = None, "its adversarial points are missing"
        if frame is None:
            if reason != "missing" or manifest is not None:
                warnings.warn(f"attack cache {directory / shard_name(i)}: {reason}; recomputing the chunk", CacheWarning, stacklevel=2)
            todo.append(i)
            continue
        frames[i] = frame
        records[i] = manifest["chunks"][i] if manifest else {"file": shard_name(i), "rows": len(frame), "sha256": sha256_file(directory / shard_name(i))}

    n_workers = 1 if not (workers > 1 or dask_address) else (0 if dask_address else workers)
    meter = Progress(progress, key, n_samples, len(starts), sys.stderr)
    meter.reused(sum(len(f) for f in frames if f is not None), sum(int(f["robust"].sum()) for f in frames if f is not None), len(starts) - len(todo))
    try:
        if todo:
            directory.mkdir(parents=True, exist_ok=True)
            common = {"num_classes": num_classes, "seed": seed, "device": device, "directory": directory, "key": key, "save_adversarial": save_adversarial}

            def done(i: int, record: dict[str, Any]) -> None:
                records[i] = record
                meter.computed(i, record["rows"], record["robust"])

            if n_workers != 1:
                run_chunks_on_dask(network, images, labels, sample_index, config, [(i, starts[i]) for i in todo], chunk_size, common,
                                   workers=workers, address=dask_address, on_done=done)
                for i in todo:  # written by the workers: the driver assembles what they wrote
                    frame, reason = _load_shard(directory / shard_name(i), key, index_all[starts[i] : starts[i] + chunk_size], records[i]["sha256"], columns)
                    if frame is None:
                        raise RuntimeError(f"attack cache {directory / shard_name(i)}: the shard just written does not read back ({reason})")
                    frames[i] = frame
            else:
                for i in todo:
                    start, end = starts[i], starts[i] + chunk_size
                    record, frames[i] = compute_chunk(network, images[start:end], labels[start:end], sample_index[start:end], config,
                                                      offset=start, index=i, **common)
                    done(i, record)
    finally:
        meter.close()
    result = _assemble(frames, config, provenance, n_samples)
    summary = RunSummary(key=key, samples=n_samples, seconds=time.perf_counter() - began,
                         robust_accuracy=float(result["robust"].mean()) if n_samples else 0.0,
                         clean_accuracy=float(result["clean_correct"].mean()) if n_samples else 0.0, chunks=len(starts),
                         chunks_computed=len(todo), chunks_reused=len(starts) - len(todo),
                         samples_computed=sum(int(records[i]["rows"]) for i in todo), workers=n_workers)
    if todo or manifest is None:
        write_json(directory / MANIFEST_NAME, {
            "key": key, "n_samples": n_samples, "chunk_size": chunk_size, "chunks": records, "columns": columns,
            "attack": config.identity(), "attack_label": config.label(), "seed": seed, "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": summary.as_dict(),
        })
    result.attrs[SUMMARY_ATTR] = summary.as_dict()
    return result


def _assemble(frames: list[pd.DataFrame | None], config: AttackConfig, provenance: dict[str, str], n_samples: int) -> pd.DataFrame:
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_columns(config))
    data: dict[str, Any] = {column: merged[column].to_numpy() for column in COMPUTED_COLUMNS}
    data.update({name: provenance[name] for name in ("split", "model", "model_digest", "split_digest")})
    data["attack"] = config.label()
    data["attack_config"] = json.dumps(config.identity(), sort_keys=True)
    columns = list(OUTCOME_COLUMNS)
    if config.is_ensemble:
        data["broken_by"] = merged["broken_by"].tolist()
        columns.append("broken_by")
    frame = pd.DataFrame(data, columns=columns)
    assert len(frame) == n_samples
    return frame


class Progress:
    """Progress of one run on ``stream``: a tqdm bar on a terminal, plain lines otherwise, or nothing.

    ``enabled``: None = a bar when ``stream`` is a terminal, else nothing (the default: DVC and CI
    logs stay clean); True = a bar on a terminal, else one line per computed chunk; False =
    nothing. The rate counts computed samples only (reused ones are the bar's starting point);
    the robust accuracy is over every sample done so far, reused ones included.
    """

    def __init__(self, enabled: bool | None, key: str, n_samples: int, n_chunks: int, stream: IO[str]) -> None:
        terminal = bool(getattr(stream, "isatty", lambda: False)())
        self.mode = None if enabled is False else "bar" if terminal else "lines" if enabled else None
        self.key, self.n_samples, self.n_chunks, self.stream = key[:12], n_samples, n_chunks, stream
        self.done = self.robust = self.computed_samples = self.chunks_done = 0
        self.began = time.perf_counter()
        self.bar: Any = None

    def reused(self, samples: int, robust: int, chunks: int) -> None:
        """Account for the chunks read from the cache (called once, before any computing)."""
        self.done, self.robust, self.chunks_done = samples, robust, chunks
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.n_samples, initial=samples, unit=" samples", desc=f"attack {self.key[:8]}", file=self.stream,
                            dynamic_ncols=True, leave=True, smoothing=0.1)
            self._postfix()
        elif self.mode == "lines" and chunks:
            self._line(f"{chunks}/{self.n_chunks} chunks reused from the cache")
        self.began = time.perf_counter()

    def computed(self, index: int, rows: int, robust: int) -> None:
        self.done += rows
        self.robust += robust
        self.computed_samples += rows
        self.chunks_done += 1
        if self.bar is not None:
            self._postfix()
            self.bar.update(rows)
        elif self.mode == "lines":
            rate = self.computed_samples / max(time.perf_counter() - self.began, 1e-9)
            self._line(f"chunk {index + 1}/{self.n_chunks} computed; {self.done}/{self.n_samples} samples, {rate:.1f} samples/s, "
                       f"robust accuracy so far {self.robust_accuracy:.4f}")

    @property
    def robust_accuracy(self) -> float:
        return self.robust / self.done if self.done else 0.0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"robust acc {self.robust_accuracy:.4f}" if self.done else "", refresh=False)

    def _line(self, text: str) -> None:
        print(f"[rcat.engine {self.key}] {text}", file=self.stream, flush=True)


# ---------------------------------------------------------------- distribution (Prefect + Dask)


@dataclass(frozen=True)
class TaskRows:
    """The rows of one task's chunks, back to back: what a task carries besides the (scattered) network.

    prefect-dask submits with ``pure=True``, so Dask would name each task by pickling and hashing
    all its arguments, megabytes of images here (50 ms of the driver's CPU for 600 CIFAR-10 rows,
    measured), for a key that Prefect's task-run id makes unique anyway: ``token`` names the rows
    instead (a fresh uuid per task). A dataclass, not a tuple: Dask tokenises a tuple item by item,
    whatever its ``__dask_tokenize__`` says.
    """

    images: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor
    token: str

    def __dask_tokenize__(self) -> str:
        return self.token


def _chunks_in_worker(network: nn.Module, rows: TaskRows, config: AttackConfig, jobs: list[tuple[int, int]], chunk_size: int,
                      common: dict[str, Any]) -> list[dict[str, Any]]:
    """Chunks ``jobs`` (index, position in the split) of one task on a Dask worker, one torch thread
    (workers must not oversubscribe the cores). ``rows`` hold these chunks back to back."""
    torch.set_num_threads(1)
    records, local = [], 0
    n_rows = int(rows.labels.shape[0])
    for index, offset in jobs:
        span = slice(local, local + min(chunk_size, n_rows - local))
        records.append(compute_chunk(network, rows.images[span], rows.labels[span], rows.sample_index[span], config, offset=offset,
                                     index=index, **common)[0])
        local = span.stop
    return records


def task_groups(jobs: list[tuple[int, int]], workers: int, max_chunks: int | None = None) -> list[list[tuple[int, int]]]:
    """Consecutive chunks grouped into tasks of decreasing size (guided scheduling), at least one chunk each.

    Each task takes ``ceil(remaining / (2 * workers))`` chunks, at most ``max_chunks``: the first
    tasks are large (few Prefect task runs, each costing a client, a context and a few events on
    2 cores: about 0.1-0.2 s measured) and the last ones are single chunks, so that whichever worker
    frees first takes the next and the workers finish within about one chunk of each other, even
    when chunks take unequal times (APGD skips clean mistakes). 10 chunks on 2 workers: 3, 2, 2,
    1, 1, 1. ``max_chunks`` bounds what one task carries (its rows travel through the scheduler).
    """
    groups, position, share = [], 0, 2 * max(1, workers)
    while position < len(jobs):
        count = -(-(len(jobs) - position) // share)
        if max_chunks is not None:
            count = min(count, max(1, max_chunks))
        groups.append(jobs[position : position + count])
        position += count
    return groups


def keep_slots_busy(items: Iterable[T], slots: Sequence[S], submit: Callable[[T, S], tuple[Any, Any]],
                    as_completed: Callable[[list[Any]], Any]) -> Iterator[tuple[T, Any]]:
    """Submit ``items`` in order, one in flight per slot; yield ``(item, handle)`` as each completes.

    ``slots``: one entry per worker thread (a worker's address, repeated per thread).
    ``submit(item, slot)`` runs ``item`` on ``slot`` and returns ``(dask_future, handle)``;
    ``as_completed(futures)`` is distributed's (its ``add`` extends it while iterating). As soon as
    an item completes, the next one goes to the slot it freed, before the caller handles the result.

    Why the driver places tasks instead of submitting them all and letting Dask's scheduler place
    them (both measured with per-chunk timelines of 13 s runs on 2 workers):

    * Dask queues a task on the scheduler, for whichever worker frees first, only once its task
      group holds more than twice the cluster's threads (``is_rootish``); before that it binds each
      task to a worker on arrival, and the run ended with one worker idle while the other still
      held a task (0.5 to 1.9 s).
    * A task depending on the network scattered to every worker goes to a worker that holds the
      network, and the scheduler's Active Memory Manager drops all but one of those copies within
      seconds: every later task was bound to that one worker, busy or not, until work stealing
      moved it (1 to 2 s idle per run).
    """
    pending = iter(items)
    in_flight: dict[Any, tuple[T, Any, S]] = {}

    def start(slot: S) -> Any | None:
        item = next(pending, None)
        if item is None:
            return None
        dask_future, handle = submit(item, slot)
        in_flight[dask_future] = (item, handle, slot)
        return dask_future

    completed = as_completed([future for future in (start(slot) for slot in slots) if future is not None])
    for finished in completed:
        item, handle, slot = in_flight.pop(finished)
        following = start(slot)
        if following is not None:
            completed.add(following)
        yield item, handle


def run_chunks_on_dask(network: nn.Module, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor, config: AttackConfig,
                       jobs: list[tuple[int, int]], chunk_size: int, common: dict[str, Any], *, workers: int, address: str | None,
                       on_done: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run chunks ``jobs`` (index, start) as Prefect tasks on a DaskTaskRunner; return their shard records in order.

    A local cluster of ``workers`` processes with one thread each, or the scheduler at ``address``.
    The network is scattered to every worker once (``client.scatter(broadcast=True)``); each task
    carries only the rows of its chunks (:class:`TaskRows`; :func:`task_groups`: guided, a few tasks
    per worker). The driver keeps one task in flight per worker thread and submits the next as one
    completes, so the next group goes to whichever worker freed first. Workers write the shards,
    the caller writes the manifest. ``on_done(index, record)`` is called in the driver as each
    chunk's task completes (progress).
    """
    try:
        from distributed import as_completed
        from prefect import flow, task
        from prefect.cache_policies import NONE
        from prefect.context import FlowRunContext
        from prefect.settings import temporary_settings
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - prefect-dask is a declared dependency
        raise InputError(f"engine.workers > 1 / engine.dask_address need prefect-dask ({exc}); pip install 'prefect-dask>=0.3'") from exc

    if address:
        _require_reachable(address)
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None})
    network = network.cpu() if torch.device(common["device"]).type == "cpu" else network
    token = uuid.uuid4().hex
    _DRIVER_RUNS[token] = {"network": network, "images": images, "labels": labels, "sample_index": sample_index, "config": config, "jobs": jobs,
                           "chunk_size": chunk_size, "common": common, "n_workers": None if address else workers, "on_done": on_done,
                           "task": task(_chunks_in_worker, name="attack-chunks", cache_policy=NONE, persist_result=False),
                           "as_completed": as_completed, "context": FlowRunContext}
    attack_chunks = flow(_attack_chunks_flow, name="rcat-attack-chunks", task_runner=runner, validate_parameters=False, persist_result=False)
    try:
        # No heartbeats for this short internal flow: Prefect's heartbeat thread sleeps in 1 s
        # steps and the flow's exit joins it, which added up to 1 s to every run (measured 0.07-0.82 s).
        with prefect_api_for_workers(), dask_worker_environment(), temporary_settings(updates={"flows.heartbeat_frequency": None}):
            return attack_chunks(token)
    finally:
        _DRIVER_RUNS.pop(token, None)


def _require_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line :class:`InputError` unless a TCP connection to the scheduler at ``address`` opens
    within ``timeout`` seconds (Dask's own client would retry for its connect timeout, then raise
    a traceback from deep inside the flow)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port or 8786
    except ValueError as exc:
        raise InputError(f"engine.dask_address {address!r}: not an address ({exc}); use tcp://host:port") from None
    if not host:
        raise InputError(f"engine.dask_address {address!r}: no host; use tcp://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise InputError(f"engine.dask_address {address}: no Dask scheduler answered ({exc.strerror or exc}); "
                         "start one (dask scheduler), or set engine.dask_address: null to attack in this process") from None


_DRIVER_RUNS: dict[str, dict[str, Any]] = {}
"""What a running :func:`_attack_chunks_flow` needs, by token, in the driver only. Prefect
serialises the flow (its function and parameters) into the context of every task it submits, so
the flow takes a token, not the network and the split: they would travel with every task."""


def _attack_chunks_flow(token: str) -> list[dict[str, Any]]:
    """The Prefect flow of :func:`run_chunks_on_dask` (module level, so that it pickles by reference)."""
    import dask

    run = _DRIVER_RUNS[token]
    images, labels, sample_index, chunk_size, jobs = run["images"], run["labels"], run["sample_index"], run["chunk_size"], run["jobs"]
    n_samples = int(labels.shape[0])

    def payload(group: list[tuple[int, int]]) -> TaskRows:
        # the group's rows only (cloned: a view would pickle the split's whole storage)
        spans = [(start, min(start + chunk_size, n_samples)) for _, start in group]
        if all(a[1] == b[0] for a, b in itertools.pairwise(spans)):
            rows = slice(spans[0][0], spans[-1][1])
            return TaskRows(images[rows].clone(), labels[rows].clone(), sample_index[rows].clone(), uuid.uuid4().hex)
        picked = torch.cat([torch.arange(a, b) for a, b in spans])
        return TaskRows(images[picked], labels[picked], sample_index[picked], uuid.uuid4().hex)

    client = run["context"].get().task_runner.client
    if run["n_workers"]:
        client.wait_for_workers(run["n_workers"], timeout=120)  # so that the broadcast below reaches every worker
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    slots = [address for address, worker in sorted(workers.items()) for _ in range(max(1, int(worker.get("nthreads", 1))))]
    if not slots:
        raise InputError(f"engine.dask_address: the Dask cluster at {client.scheduler.address} has no workers; start workers for it "
                         "(dask worker <address>) or set engine.workers instead")
    # The network goes to every worker once, not with each task: a task gets the scattered
    # future, which Dask resolves to the worker's copy (or fetches once, if the scheduler dropped it).
    [scattered] = client.scatter([run["network"]], broadcast=True, hash=False)
    # a task's rows travel driver -> scheduler -> worker in one message: at most TASK_BYTES each
    chunk_bytes = chunk_size * (images[:1].numel() * images.element_size() + labels.element_size() + sample_index.element_size())
    groups = task_groups(jobs, len(slots), max_chunks=TASK_BYTES // max(1, chunk_bytes))

    def submit(group: list[tuple[int, int]], worker: str) -> tuple[Any, Any]:
        # placed on the worker that freed (loose: another one if it left the cluster)
        with dask.annotate(workers=[worker], allow_other_workers=True):
            future = run["task"].submit(scattered, payload(group), run["config"], group, chunk_size, run["common"])
        return future.wrapped_future, future

    try:
        results: dict[int, dict[str, Any]] = {}
        # distributed's as_completed (Prefect's waits forever on Dask futures, prefect-dask 0.3.7)
        for group, future in keep_slots_busy(groups, slots, submit, lambda futures: run["as_completed"](futures, loop=client.loop)):
            for (index, _), record in zip(group, future.result()):
                results[index] = record
                if run["on_done"] is not None:
                    run["on_done"](index, record)
        return [results[index] for index, _ in jobs]
    finally:
        scattered.release()


TASK_BYTES = 64 * 2**20
"""The most bytes of rows one Dask task carries (:func:`task_groups`' ``max_chunks``): 5 chunks of
1,024 CIFAR-10 images, where guided groups alone would send 13 in one task (160 MB) on 50,000."""

DASK_CONFIG = {
    # tasks carry their chunks' rows (up to TASK_BYTES); Dask warns about any graph above 10 MB
    "distributed.admin.large-graph-warning-threshold": "128MB",
    # Periodic callbacks wake each worker's event loop, which then takes the GIL from the
    # attack's thread and, with every core busy, preempts a compute process: the statistical
    # profiler every 10 ms, the event-loop tick every 20 ms, the memory monitor every 100 ms
    # (worker and nanny) and the system monitor every 500 ms. With the defaults, two 1-thread
    # workers running at once reached 1.80x of one alone on 2 cores, with these 1.94x, and two
    # plain processes 1.99x (benchmarks/dask_overhead.py).
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}
"""Dask settings for the local cluster of ``engine.workers > 1`` (set while it is created; the
scheduler and the workers' nannies read them then) and for the driver's client during a
distributed run. Start the scheduler and workers of an existing cluster (``engine.dask_address``)
with the same settings for the same speed."""


@contextlib.contextmanager
def dask_worker_environment() -> Iterator[None]:
    """Create a local Dask cluster inside this context: workers spawned without
    ``MALLOC_TRIM_THRESHOLD_``, :data:`DASK_CONFIG` applied, and this process's environment left
    as it was.

    distributed's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` for its workers; any value of it
    turns off glibc's dynamic mmap threshold, so every tensor above 128 KiB is mmap'ed and
    unmapped again: attacks ran 1.6-2.1x slower in a worker than in process (measured). The nanny
    also copies its worker variables (``OMP_NUM_THREADS=1``, ...) into the spawning process's
    own environment, where later subprocesses (DVC stages) would inherit them; they are restored.
    Use it around the creation of a local cluster (``run_attack`` does, for ``workers > 1``).
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {})
    environ["MALLOC_TRIM_THRESHOLD_"] = None  # None: not set at all (see distributed.nanny._get_env_variables)
    keys = set(environ) | {"PYTHONHASHSEED"}
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, **DASK_CONFIG}):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def prefect_api_for_workers() -> Iterator[None]:
    """Make the driver and the Dask workers it spawns report to one Prefect API.

    Without ``PREFECT_API_URL`` every process would start an ephemeral server of its own (seconds
    to minutes each, migrating a database): start the ephemeral one here, once, and hand its URL
    to the workers through the environment they inherit.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
