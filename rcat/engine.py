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
* **Distributed (optional).** Missing chunks run on an executor (:mod:`rcat.executors`): in this
  process by default, in ``workers`` local processes (one torch thread each), or on an existing
  Dask cluster at ``dask_address`` (:mod:`rcat.dask_executor`). Chunks are grouped into tasks
  (:func:`task_groups`); a task carries its chunks' rows only, and the next task goes to the
  worker that freed. Workers write their shards; only the driver writes the manifest. The engine
  starts no server and changes no environment variable.
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

import hashlib
import itertools
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from rcat.attacks import OUTCOME_COLUMNS, attack_outcomes, torchattacks
from rcat.config import AttackConfig
from rcat.errors import InputError
from rcat.executors import Executor, SerialExecutor, executor_for
from rcat.heap import bound_shape_caches, release_free_memory
from rcat.pixels import as_float_images, content_digest
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
    return content_digest(images, labels, sample_index)


def run_key(network: nn.Module, split: Any, config: AttackConfig, seed: int, chunk_size: int) -> str:
    """The key :func:`run_attack` files this run under (``<cache_dir>/<key>/``)."""
    images, labels, sample_index = _split_tensors(split)
    return attack_key(model_content_digest(network), content_digest(images, labels, sample_index), config.identity(), seed, chunk_size)


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
    images = as_float_images(images)  # 8-bit pixels become floats one chunk at a time (rcat.pixels)
    result = attack_outcomes(network, images, labels, sample_index, config, num_classes=num_classes, seed=seed, provenance=provenance,
                             device=device, return_adversarial=save_adversarial, position_offset=offset)
    # attack_outcomes returns (frame, adversarial) exactly when return_adversarial=save_adversarial is true
    frame, adversarial = cast("tuple[pd.DataFrame, torch.Tensor | None]", result if save_adversarial else (result, None))
    frame = frame[_columns(config)]
    metadata = {"engine_key": key, "chunk": str(index), "offset": str(offset), "content_sha256": frame_digest(frame.reset_index(drop=True))}
    if adversarial is not None:
        # written before the shard: a present shard implies its adversarial points are there too
        write_tensors(directory / adversarial_name(index), {"adversarial": adversarial.float(), "sample_index": sample_index.cpu()}, metadata)
    path = write_parquet(directory / shard_name(index), frame, metadata)
    del result, adversarial
    release_free_memory()  # fragmentation would otherwise make the resident size creep chunk after chunk (rcat.heap)
    record = {"file": path.name, "rows": len(frame), "sha256": sha256_file(path), "seconds": round(time.perf_counter() - began, 3),
              "torch_threads": torch.get_num_threads(), "robust": int(frame["robust"].sum()), "clean_correct": int(frame["clean_correct"].sum())}
    return record, frame


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
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Attack ``network`` on ``split`` (``images``, ``labels``, ``sample_index``), chunked and cached.

    Returns the same frame (columns and values) as :func:`rcat.attacks.attack_outcomes` on the
    whole split, with a :class:`RunSummary` in ``frame.attrs["rcat.engine"]`` (:func:`summary_of`).
    ``progress``: None shows a bar when stderr is a terminal; True also prints one line per chunk
    when it is not; False shows nothing. See the module docstring for the cache layout and the
    checks before reuse. Missing chunks run on ``executor`` (:mod:`rcat.executors`), by default the
    one ``workers`` / ``dask_address`` ask for (:func:`rcat.executors.executor_for`), closed on return.
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

    owned = executor is None
    chosen = executor if executor is not None else executor_for(workers, dask_address)
    meter = Progress(progress, key, n_samples, len(starts), sys.stderr)
    meter.reused(sum(len(f) for f in frames if f is not None), sum(int(f["robust"].sum()) for f in frames if f is not None), len(starts) - len(todo))
    try:
        if todo:
            directory.mkdir(parents=True, exist_ok=True)
            common: dict[str, Any] = {"num_classes": num_classes, "seed": seed, "device": device, "directory": directory, "key": key, "save_adversarial": save_adversarial}

            def done(i: int, record: dict[str, Any]) -> None:
                records[i] = record
                meter.computed(i, record["rows"], record["robust"])

            if not isinstance(chosen, SerialExecutor):
                run_chunks(chosen, network, images, labels, sample_index, config, [(i, starts[i]) for i in todo], chunk_size, common, on_done=done)
                for i in todo:  # written by the workers: the driver assembles what they wrote
                    written = records[i]
                    assert written is not None  # run_chunks returned, so on_done recorded every job
                    frame, reason = _load_shard(directory / shard_name(i), key, index_all[starts[i] : starts[i] + chunk_size], written["sha256"], columns)
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
        if owned:
            chosen.close()
    result = _assemble(frames, config, provenance, n_samples)
    summary = RunSummary(key=key, samples=n_samples, seconds=time.perf_counter() - began,
                         robust_accuracy=float(result["robust"].mean()) if n_samples else 0.0,
                         clean_accuracy=float(result["clean_correct"].mean()) if n_samples else 0.0, chunks=len(starts),
                         chunks_computed=len(todo), chunks_reused=len(starts) - len(todo),
                         samples_computed=sum(int(cast("dict[str, Any]", records[i])["rows"]) for i in todo), workers=chosen.workers)
    if todo or manifest is None:
        write_json(directory / MANIFEST_NAME, {
            "key": key, "n_samples": n_samples, "chunk_size": chunk_size, "chunks": records, "columns": columns,
            "attack": config.identity(), "attack_label": config.label(), "seed": seed, "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": summary.as_dict(),
        })
    result.attrs[SUMMARY_ATTR] = summary.as_dict()
    return result


def saved_adversarial(network: nn.Module, split: Any, config: AttackConfig, *, seed: int, cache_dir: str | Path, chunk_size: int,
                      positions: Sequence[int]) -> torch.Tensor:
    """The adversarial points a ``save_adversarial=True`` run stored for ``positions`` (positions in the split),
    read from the run's chunk files (its key from the same inputs as :func:`run_attack`); float32, ``(len(positions), ...)``.

    Each chunk file is checked against the run's key and the sample indices it holds; an absent or
    foreign file is a one-line :class:`InputError` (rerun the stage that attacked the model).
    """
    from rcat.safe_io import read_tensors

    images, labels, sample_index = _split_tensors(split)
    key = run_key(network, (images, labels, sample_index), config, seed, chunk_size)
    directory = Path(cache_dir) / key
    loaded: dict[int, dict[str, torch.Tensor]] = {}
    rows = []
    for position in positions:
        chunk = int(position) // chunk_size
        if chunk not in loaded:
            path = directory / adversarial_name(chunk)
            tensors, metadata = read_tensors(path) if path.is_file() else ({}, {})
            expected = sample_index[chunk * chunk_size : (chunk + 1) * chunk_size]
            if metadata.get("engine_key") != key or "adversarial" not in tensors or not torch.equal(tensors.get("sample_index", torch.empty(0)), expected.cpu()):
                raise InputError(f"attack cache {path}: no adversarial points of this run for chunk {chunk}; "
                                 "rerun the stage that attacked the model (dvc repro --force <stage>)")
            loaded[chunk] = tensors
        rows.append(loaded[chunk]["adversarial"][int(position) - chunk * chunk_size])
    return torch.stack(rows) if rows else images[:0].float()


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


# ---------------------------------------------------------------- distribution (an executor)


def _attack_task(shared: tuple[nn.Module, AttackConfig, int, dict[str, Any]], task: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]
                 ) -> list[dict[str, Any]]:
    """One task's chunks ``jobs`` (index, position in the split), wherever the executor runs it;
    ``task``'s rows hold these chunks back to back. Writes each chunk's shard; returns their records."""
    bound_shape_caches()  # a worker of the user's own Dask cluster has no other rcat entry point (rcat.heap)
    network, config, chunk_size, common = shared
    images, labels, sample_index, jobs = task
    records, local = [], 0
    n_rows = int(labels.shape[0])
    for index, offset in jobs:
        span = slice(local, local + min(chunk_size, n_rows - local))
        records.append(compute_chunk(network, images[span], labels[span], sample_index[span], config, offset=offset, index=index, **common)[0])
        local = span.stop
    return records


def task_groups(jobs: list[tuple[int, int]], workers: int, max_chunks: int | None = None) -> list[list[tuple[int, int]]]:
    """Consecutive chunks grouped into tasks of decreasing size (guided scheduling), at least one chunk each.

    Each task takes ``ceil(remaining / (2 * workers))`` chunks, at most ``max_chunks``: the first
    tasks are large (few tasks, each costing a round trip and a copy of the network) and the last
    ones are single chunks, so that whichever worker frees first takes the next and the workers
    finish within about one chunk of each other, even when chunks take unequal times (APGD skips
    clean mistakes). 10 chunks on 2 workers: 3, 2, 2, 1, 1, 1. ``max_chunks`` bounds what one task
    carries (its rows travel to the worker).
    """
    groups, position, share = [], 0, 2 * max(1, workers)
    while position < len(jobs):
        count = -(-(len(jobs) - position) // share)
        if max_chunks is not None:
            count = min(count, max(1, max_chunks))
        groups.append(jobs[position : position + count])
        position += count
    return groups


TASK_BYTES = 64 * 2**20
"""The most bytes of rows one task carries (:func:`task_groups`' ``max_chunks``): 5 chunks of
1,024 CIFAR-10 images, where guided groups alone would send 13 in one task (160 MB) on 50,000."""


def run_chunks(executor: Executor, network: nn.Module, images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor, config: AttackConfig,
               jobs: list[tuple[int, int]], chunk_size: int, common: dict[str, Any],
               on_done: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run chunks ``jobs`` (index, start) on ``executor`` (:mod:`rcat.executors`); return their shard records in ``jobs`` order.

    Chunks are grouped into tasks (:func:`task_groups`: guided, a few per worker, at most
    :data:`TASK_BYTES` of rows each); a task carries only its rows (cloned: a view would pickle the
    split's whole storage). Workers write the shards, the caller writes the manifest.
    ``on_done(index, record)`` is called here as each chunk's task completes (progress).
    """
    n_samples = int(labels.shape[0])
    chunk_bytes = chunk_size * (images[:1].numel() * images.element_size() + labels.element_size() + sample_index.element_size())
    groups = task_groups(jobs, max(1, executor.workers or 2), max_chunks=TASK_BYTES // max(1, chunk_bytes))

    def rows(group: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        spans = [(start, min(start + chunk_size, n_samples)) for _, start in group]
        if all(a[1] == b[0] for a, b in itertools.pairwise(spans)):
            picked = slice(spans[0][0], spans[-1][1])
            return images[picked].clone(), labels[picked].clone(), sample_index[picked].clone(), group
        index = torch.cat([torch.arange(a, b) for a, b in spans])
        return images[index], labels[index], sample_index[index], group

    network = network.cpu() if torch.device(common["device"]).type == "cpu" else network
    results: dict[int, dict[str, Any]] = {}
    shared = (network, config, chunk_size, common)
    for position, records in executor.map_unordered(_attack_task, shared, _Lazy(groups, rows)):
        for (index, _), record in zip(groups[position], records, strict=True):
            results[index] = record
            if on_done is not None:
                on_done(index, record)
    return [results[index] for index, _ in jobs]


class _Lazy(Sequence[Any]):
    """``groups`` mapped through ``build`` on access: a task's rows are copied only when it is submitted."""

    def __init__(self, groups: list[list[tuple[int, int]]], build: Callable[[list[tuple[int, int]]], Any]) -> None:
        self._groups, self._build = groups, build

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, position: Any) -> Any:
        if isinstance(position, slice):
            return [self._build(group) for group in self._groups[position]]
        return self._build(self._groups[position])
