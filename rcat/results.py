"""The results layer: where every stage's outputs live, and reading them back *verified*.

One module owns the output layout (:class:`Layout`) and the evidence chain of the update gate:

* every flip evaluation (the baseline attack cache for the raw update ``new``, ``evaluate@<m>``
  for each fine-tuned candidate) writes ``evidence.json`` beside its outputs: the SHA-256 of the
  model file it attacked, of the old model file, of the old model's cached outcomes it compared
  against and of every file it wrote, the split digests, the attack's identity and seed
  (:func:`write_evidence`);
* :func:`load_candidates` reads each candidate back only through that record: it checks that the
  model file that would be registered is the one evaluated, that the old model, the splits and
  the attack are this run's, that every file still has its recorded digest, and it *recomputes*
  each candidate's metrics from the per-sample outcomes (``metrics.json`` is a summary for
  people and DVC, never an input to the gate). Any mismatch is an :class:`EvidenceError` that
  names the file, what differs and what to rerun;
* with ``RCAT_SIGNING_KEY`` set in the environment, evidence records and decision records carry
  an HMAC-SHA256 ``signature`` over their canonical JSON, and reading them checks it: a record
  that changed after it was signed, or that is unsigned while a key is set, is refused.

The per-sample table :func:`load_candidates` returns has the fixed columns
:data:`CANDIDATE_COLUMNS`: one row per (candidate, split, sample).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rcat.errors import InputError
from rcat.metrics import FLIP_COLUMNS, compare_outcomes
from rcat.safe_io import read_json, read_parquet, sha256_file, sha256_json, write_json

EVIDENCE_FILE = "evidence.json"
EVIDENCE_FORMAT = "rcat-evidence/1"
SIGNING_KEY_ENV = "RCAT_SIGNING_KEY"
EVALUATED_SPLITS = ("validation", "test")
"""Splits on which candidates are evaluated (the fine-tune split is their training data)."""

CANDIDATE_COLUMNS = ("candidate", "split", *FLIP_COLUMNS)
"""Columns of :func:`load_candidates`' per-sample table."""

COMPARED_METRICS = ("accuracy_old", "accuracy_new", "robust_accuracy_old", "robust_accuracy_new", "nfr", "pfr", "rnfr", "rpfr",
                    "bnfr", "snfr", "n_samples")
"""Metrics that ``metrics.json`` must agree on with the recomputation (exactly: both are ratios of the same counts)."""


class EvidenceError(InputError):
    """An evaluation's evidence does not hold: a file changed, a digest differs, a signature fails."""


GALLERY_FILE = "gallery.safetensors"
"""Each evaluation's saved adversarial points of its first robustness negative flips (the report's gallery)."""
GALLERY_SAMPLES = 6
"""Robustness negative flips an evaluation keeps for the report's gallery (at most)."""


@dataclass(frozen=True)
class Layout:
    """Where every stage reads and writes, relative to ``root`` (the DVC outputs live in ``data/``)."""

    root: Path = Path("data")

    def split(self, name: str) -> Path:
        return self.root / "prepared" / f"{name}.safetensors"

    @property
    def manifest(self) -> Path:
        return self.root / "prepared" / "manifest.json"

    def model(self, role: str) -> Path:
        return self.root / "models" / f"{role}.safetensors"

    def training_history(self, role: str) -> Path:
        return self.root / "models" / f"{role}_history.json"

    @property
    def attack_cache(self) -> Path:
        return self.root / "attack_cache"

    def finetuned(self, method: str) -> Path:
        return self.root / "finetune" / method / "model.safetensors"

    def finetune_history(self, method: str) -> Path:
        return self.root / "finetune" / method / "history.json"

    def evaluation(self, candidate: str) -> Path:
        """Directory of a candidate's flip evaluation; ``new`` is evaluated by the attack cache."""
        return self.attack_cache if candidate == "new" else self.root / "evaluate" / candidate

    def candidate_model(self, candidate: str) -> Path:
        """The model file of a candidate: what the gate would promote and the registry would register."""
        return self.model("new") if candidate == "new" else self.finetuned(candidate)

    @property
    def decision(self) -> Path:
        return self.root / "decide" / "decision.json"

    @property
    def check(self) -> Path:
        """The check's headline for ``dvc exp show`` (:func:`rcat.stages.decide.check_summary`)."""
        return self.root / "decide" / "check.json"

    @property
    def tradeoff(self) -> Path:
        return self.root / "decide" / "tradeoff.csv"


def require(path: Path, stage: str) -> Path:
    """A stage input must exist; if not, say which stage makes it."""
    if not path.is_file():
        raise InputError(f"{path}: not found; run the '{stage}' stage first (dvc repro {stage})")
    return path


# ---------------------------------------------------------------- signatures


def signing_key() -> bytes | None:
    """The HMAC key from ``RCAT_SIGNING_KEY`` (None when unset or empty)."""
    value = os.environ.get(SIGNING_KEY_ENV, "")
    return value.encode() if value else None


def signature_of(record: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 (hex) of the canonical JSON of ``record`` without its ``signature`` field."""
    body = {name: value for name, value in record.items() if name != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def sign(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with a ``signature`` when a signing key is set (else unchanged, unsigned)."""
    key = signing_key()
    if key is None:
        return {name: value for name, value in record.items() if name != "signature"}
    return record | {"signature": signature_of(record, key)}


def check_signature(record: dict[str, Any], where: str) -> str:
    """Verify ``record``'s signature against the key in the environment.

    Returns ``"verified"`` or ``"unsigned (no RCAT_SIGNING_KEY set)"``. Raises
    :class:`EvidenceError` when a key is set and the record is unsigned or its signature differs,
    or when the record is signed and no key is set (it cannot be checked: fail closed).
    """
    key = signing_key()
    recorded = record.get("signature")
    if key is None:
        if recorded is not None:
            raise EvidenceError(f"{where}: the record is signed but {SIGNING_KEY_ENV} is not set, so it cannot be verified; "
                                f"set {SIGNING_KEY_ENV} to the key it was signed with")
        return "unsigned (no RCAT_SIGNING_KEY set)"
    if not isinstance(recorded, str):
        raise EvidenceError(f"{where}: the record is not signed although {SIGNING_KEY_ENV} is set; rerun the stage that wrote it with the key")
    if not hmac.compare_digest(recorded, signature_of(record, key)):
        raise EvidenceError(f"{where}: signature does not match (the record changed after it was signed, or another key signed it)")
    return "verified"


# ---------------------------------------------------------------- evidence of one evaluation


def _file_entry(path: Path) -> dict[str, str]:
    return {"path": path.as_posix(), "sha256": sha256_file(path)}


def write_evidence(directory: Path, *, candidate: str, model_path: Path, old_model_path: Path, old_outcomes_path: Path,
                   split_digests: dict[str, str], attack_identity: dict[str, Any], attack_label: str, seed: int,
                   files: tuple[str, ...]) -> dict[str, Any]:
    """Write ``directory/evidence.json`` for an evaluation whose ``files`` (names in ``directory``) are written.

    Written last, after every file it vouches for, so a present record implies complete outputs.
    """
    record: dict[str, Any] = {
        "format": EVIDENCE_FORMAT,
        "candidate": candidate,
        "model": _file_entry(model_path),
        "old_model": _file_entry(old_model_path),
        "old_outcomes": _file_entry(old_outcomes_path),
        "splits": dict(sorted(split_digests.items())),
        "attack": attack_identity,
        "attack_label": attack_label,
        "seed": seed,
        "files": {name: sha256_file(directory / name) for name in files},
    }
    write_json(directory / EVIDENCE_FILE, sign(record))
    return record


def read_evidence(directory: Path, candidate: str) -> dict[str, Any]:
    """Read and shape-check an evaluation's evidence record, and its signature."""
    path = directory / EVIDENCE_FILE
    stage = "attack_cache" if candidate == "new" else f"evaluate@{candidate}"
    if not path.is_file():
        raise EvidenceError(f"{path}: no evidence record, so nothing ties {candidate}'s results to the model it would promote; "
                            f"rerun 'dvc repro {stage}'")
    record = read_json(path)
    required = {"format", "candidate", "model", "old_model", "old_outcomes", "splits", "attack", "seed", "files"}
    if not isinstance(record, dict) or not required <= record.keys() or record.get("format") != EVIDENCE_FORMAT:
        raise EvidenceError(f"{path}: not an {EVIDENCE_FORMAT} record (missing fields or another format); rerun 'dvc repro {stage}'")
    for name in ("model", "old_model", "old_outcomes"):
        entry = record[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("path"), str):
            raise EvidenceError(f"{path}: field '{name}' must hold a path and a sha256; rerun 'dvc repro {stage}'")
    if not isinstance(record["files"], dict) or not all(isinstance(v, str) for v in record["files"].values()):
        raise EvidenceError(f"{path}: field 'files' must map file names to SHA-256 digests; rerun 'dvc repro {stage}'")
    if record["candidate"] != candidate:
        raise EvidenceError(f"{path}: the record is for candidate {record['candidate']!r}, not {candidate!r}; rerun 'dvc repro {stage}'")
    check_signature(record, str(path))
    return record


def _same_attack(recorded: Any, expected: dict[str, Any]) -> bool:
    return sha256_json(recorded) == sha256_json(expected)


@dataclass
class VerifiedCandidate:
    """One candidate read back through its evidence: per-sample flips and metrics per split, recomputed."""

    name: str
    flips: dict[str, pd.DataFrame]
    metrics: dict[str, dict[str, Any]]
    evidence: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    """Every file the verdict on this candidate rests on (path -> SHA-256), for the decision record."""


class _SharedInputs:
    """Files every candidate's verification reads (the old model, the old model's cached outcomes):
    hashed and read once per decision, not once per candidate."""

    def __init__(self) -> None:
        self._digests: dict[Path, str] = {}
        self._frames: dict[Path, pd.DataFrame] = {}

    def digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = sha256_file(path)
        return self._digests[path]

    def frame(self, path: Path) -> pd.DataFrame:
        if path not in self._frames:
            self._frames[path] = read_parquet(path)
        return self._frames[path]


def verify_candidate(layout: Layout, candidate: str, *, split_digests: dict[str, str], attack_identity: dict[str, Any],
                     seed: int, splits: tuple[str, ...] = EVALUATED_SPLITS, shared: _SharedInputs | None = None) -> VerifiedCandidate:
    """Read ``candidate``'s evaluation through its evidence record and recompute its metrics.

    Checks, each an :class:`EvidenceError` naming the file and the rerun:

    1. the evidence record exists, is well formed and (with a key set) correctly signed;
    2. the candidate's model file *now* has the SHA-256 that was evaluated (else a model nobody
       evaluated would be promoted and registered);
    3. the old model file and the old model's cached outcomes are those the evaluation compared with;
    4. the evaluated split digests, attack identity and seed are this run's;
    5. every file the record lists still has its digest;

    (4 is checked first: an evaluation made with another attack says so rather than "file changed".)
    6. the metrics recomputed from the per-sample outcomes (old model's cached outcomes against the
       candidate's) equal ``metrics.json`` and ``flips.parquet`` equals the recomputed flips.

    The returned metrics are the recomputed ones.
    """
    shared = shared if shared is not None else _SharedInputs()
    directory = layout.evaluation(candidate)
    stage = "attack_cache" if candidate == "new" else f"evaluate@{candidate}"
    rerun = f"rerun 'dvc repro {stage}'"
    evidence = read_evidence(directory, candidate)
    where = directory / EVIDENCE_FILE

    recorded_splits = evidence["splits"]
    for name in splits:
        if recorded_splits.get(name) != split_digests.get(name):
            raise EvidenceError(f"{where}: {candidate} was evaluated on another {name} split (digest {str(recorded_splits.get(name))[:12]}, "
                                f"this run's is {str(split_digests.get(name))[:12]}); {rerun}")
    if not _same_attack(evidence["attack"], attack_identity):
        raise EvidenceError(f"{where}: {candidate} was evaluated with attack {evidence.get('attack_label', evidence['attack'])}, "
                            f"not this run's {json.dumps(attack_identity, sort_keys=True)}; the evaluations are mixed, {rerun}")
    if evidence["seed"] != seed:
        raise EvidenceError(f"{where}: {candidate} was evaluated with attack seed {evidence['seed']}, this run's is {seed}; {rerun}")
    model_path = layout.candidate_model(candidate)
    old_model_path = layout.model("old")
    old_outcomes_path = layout.attack_cache / "outcomes.parquet"
    for label, path, entry in (("model", model_path, evidence["model"]), ("old model", old_model_path, evidence["old_model"]),
                               ("old model's cached outcomes", old_outcomes_path, evidence["old_outcomes"])):
        if not path.is_file():
            raise EvidenceError(f"{path}: {label} file missing; {rerun}")
        digest = shared.digest(path) if path != model_path else sha256_file(path)
        if digest != entry["sha256"]:
            raise EvidenceError(f"{path}: the {label} has SHA-256 {digest[:12]}, but {candidate} was evaluated on {entry['sha256'][:12]} "
                                f"({where}); the file changed after the evaluation, {rerun}")
    files = {model_path.as_posix(): evidence["model"]["sha256"], old_model_path.as_posix(): evidence["old_model"]["sha256"],
             old_outcomes_path.as_posix(): evidence["old_outcomes"]["sha256"], where.as_posix(): sha256_file(where)}
    for name, recorded in evidence["files"].items():
        path = directory / name
        if not path.is_file():
            raise EvidenceError(f"{path}: missing, though {where} lists it; {rerun}")
        digest = sha256_file(path)
        if digest != recorded:
            raise EvidenceError(f"{path}: SHA-256 {digest[:12]} differs from the {recorded[:12]} recorded in {where} "
                                f"(the file was edited or corrupted); {rerun}")
        files[path.as_posix()] = digest
    if "outcomes.parquet" not in evidence["files"]:
        raise EvidenceError(f"{where}: lists no outcomes.parquet, so the metrics cannot be recomputed; {rerun}")

    old_all = shared.frame(old_outcomes_path)
    own = old_all if directory / "outcomes.parquet" == old_outcomes_path else read_parquet(directory / "outcomes.parquet")
    old = old_all[old_all["model"] == "old"]
    mine = own[own["model"] == ("new" if candidate == "new" else candidate)]
    flips: dict[str, pd.DataFrame] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for name in splits:
        old_part, mine_part = old[old["split"] == name], mine[mine["split"] == name]
        if mine_part.empty:
            raise EvidenceError(f"{directory / 'outcomes.parquet'}: no {candidate} outcomes on the {name} split; {rerun}")
        if set(mine_part["split_digest"]) != {split_digests.get(name)} or set(old_part["split_digest"]) != {split_digests.get(name)}:
            raise EvidenceError(f"{directory / 'outcomes.parquet'}: outcomes on {name} were made on other data than this run's split; {rerun}")
        values, frame = compare_outcomes(old_part, mine_part)
        metrics[name] = values
        flips[name] = frame
    _check_summaries(directory, candidate, metrics, flips, rerun)
    return VerifiedCandidate(candidate, flips, metrics, evidence, files)


def _check_summaries(directory: Path, candidate: str, metrics: dict[str, dict[str, Any]], flips: dict[str, pd.DataFrame], rerun: str) -> None:
    """``metrics.json`` and ``flips.parquet`` must say what the outcomes say."""
    path = directory / "metrics.json"
    if path.is_file():
        recorded = read_json(path)
        for split, values in metrics.items():
            stored = recorded.get(split) if isinstance(recorded, dict) else None
            if not isinstance(stored, dict):
                raise EvidenceError(f"{path}: no '{split}' section, though the outcomes cover it; {rerun}")
            for key in COMPARED_METRICS:
                mine, theirs = values.get(key), stored.get(key)
                same = (mine is None or (isinstance(mine, float) and math.isnan(mine))) and theirs is None
                if not same and (theirs is None or mine is None or not math.isclose(float(mine), float(theirs), rel_tol=0, abs_tol=1e-12)):
                    raise EvidenceError(f"{path}: {split}.{key} = {theirs} but the per-sample outcomes give {mine} "
                                        f"(metrics.json was edited or is stale); {rerun}")
    flips_path = directory / "flips.parquet"
    if flips_path.is_file():
        stored_flips = read_parquet(flips_path)
        for split, frame in flips.items():
            part = stored_flips[stored_flips["split"] == split][list(FLIP_COLUMNS)].sort_values("sample_index").reset_index(drop=True)
            if not part.equals(frame.reset_index(drop=True)):
                raise EvidenceError(f"{flips_path}: the {split} flips differ from those the per-sample outcomes give "
                                    f"(the file was edited or is stale); {rerun}")


def load_candidates(layout: Layout, candidates: list[str], *, split_digests: dict[str, str], attack_identity: dict[str, Any],
                    seed: int) -> tuple[pd.DataFrame, dict[str, VerifiedCandidate]]:
    """Every candidate, verified (:func:`verify_candidate`): the tidy per-sample table
    (:data:`CANDIDATE_COLUMNS`) and each candidate's verified record. Raises on the first
    candidate whose evidence does not hold."""
    shared = _SharedInputs()
    verified = {name: verify_candidate(layout, name, split_digests=split_digests, attack_identity=attack_identity, seed=seed, shared=shared)
                for name in candidates}
    frames = [frame.assign(candidate=name, split=split) for name, item in verified.items() for split, frame in item.flips.items()]
    table = pd.concat(frames, ignore_index=True)[list(CANDIDATE_COLUMNS)] if frames else pd.DataFrame(columns=list(CANDIDATE_COLUMNS))
    return table, verified
