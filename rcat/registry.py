"""MLflow model registry: register an update check's candidates, move ``challenger``, and ``champion`` only on a pass.

The decide stage calls :func:`register_update_check` after writing ``decision.json``. One update
check is one parent run (:class:`rcat.tracking.Tracker`). The step:

1. **Refuses** to touch the registry unless the decision is complete and valid
   (:func:`registry_refusal`): a verdict of ``promote`` or ``reject``, no problem reading any
   evaluation, a promoted candidate that names a configured candidate. A refused step records
   ``rcat.registry = skipped: <why>`` on the parent run and changes nothing in the registry, so a
   failed or incomplete evaluation can never move ``champion``.
2. **Registers** every candidate (``new`` and each fine-tuned method) whose model file still has the
   SHA-256 the decision recorded. The file is logged to the parent run under
   ``registry/<candidate>/<sha256[:16]>/`` as an MLflow model (:mod:`rcat.mlflow_model`: an
   ``MLmodel`` with a signature and a pyfunc flavour whose loader is installed rcat code reading
   the safetensors file, so ``mlflow.pyfunc.load_model("models:/<name>@champion").predict(batch)``
   returns class scores and ``mlflow models serve`` serves it), and that artifact location is the
   version's source, with the parent run as the version's run: the version's content is fixed (a
   rerun never overwrites it) and ``models:/<name>/<version>`` also loads through
   :func:`rcat.models.load_model_reference` (the safetensors file inside; nothing is unpickled).
   A weight file already registered (same SHA-256, by any earlier check) is not registered again:
   its version is reused and its tags updated. Version tags: ``rcat.candidate``,
   ``rcat.update_check`` (parent run id), ``rcat.pipeline_key``, ``rcat.code_revision``,
   ``rcat.sha256``, ``rcat.weights_digest``, ``rcat.check_verdict``, ``rcat.decision``
   (``promoted`` | ``selected, not confirmed`` | ``admissible`` | ``inadmissible``) and
   ``<split>/<metric>`` for the gate's figures.
3. Sets ``challenger`` to the check's best admissible candidate (the decision's selection), or
   removes it when the check has none: the alias always describes the latest check.
4. On ``promote`` only: moves ``previous_champion`` to the old champion's version, ``champion`` to
   the promoted version, tags that version ``rcat.promoted_by_check``, and appends
   ``{version, candidate, run_id, time, previous}`` to the registered model's ``champion_history``
   tag (JSON list, last :data:`HISTORY_KEEP` entries; every earlier champion stays reachable as
   ``models:/<name>/<version>``). On ``reject`` the champion is untouched and the registered
   model's ``last_rejected_check`` tag names the check.

**Idempotent.** A version is looked up by SHA-256 before one is created, so rerunning decide for
the same check, or checking the same weights again, registers nothing new; and a check moves
``champion`` at most once (its version carries ``rcat.promoted_by_check``), so rerunning an older
check's decide never rolls the champion back over a later promotion.

Only the driving process calls this (SQLite stores lock under concurrent writers); two update
checks deciding at the same instant against one registry are not serialised.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from pathlib import Path
from typing import Any

from rcat.config import Params
from rcat.safe_io import sha256_file

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous_champion"
HISTORY_TAG = "champion_history"
REJECTED_TAG = "last_rejected_check"
HISTORY_KEEP = 50
"""Entries kept in ``champion_history`` (a tag value; older champions stay reachable by version number)."""
MAX_VERSIONS_SEARCHED = 10_000
"""Versions read when looking for one with the same SHA-256 (a registry of one model rarely holds more)."""
TAGGED_METRICS = ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr", "snfr")
"""Gate figures copied onto each version as tags ``<split>/<metric>``."""


def candidate_files(params: Params, layout: Any) -> dict[str, Path]:
    """Each candidate's model file: the un-fine-tuned ``new`` model and every fine-tuned method."""
    return {"new": layout.model("new")} | {method: layout.finetuned(method) for method in params.finetune.methods}


def registry_refusal(record: dict[str, Any], params: Params) -> str | None:
    """Why this decision must not touch the registry, or None when it may.

    Fails closed: anything but a complete, well-formed decision is a refusal.
    """
    if not params.tracking.enabled:
        return "tracking is disabled"
    if params.tracking.registered_model is None:
        return "tracking.registered_model is null"
    verdict = record.get("verdict")
    if verdict not in {"promote", "reject"}:
        return f"decision has verdict {verdict!r}, not 'promote' or 'reject'"
    if record.get("problems"):
        return "incomplete evaluation: " + "; ".join(str(problem) for problem in record["problems"])
    configured = {"new", *params.finetune.methods}
    if verdict == "promote" and record.get("candidate") not in configured:
        return f"decision promotes {record.get('candidate')!r}, which is not a configured candidate"
    digests = (record.get("inputs") or {}).get("models")
    if not isinstance(digests, dict):
        return "decision record has no model digests (inputs.models)"
    return None


def _version_tags(candidate: str, record: dict[str, Any], check: dict[str, str], sha256: str, weights_digest: str) -> dict[str, str]:
    info = record.get("candidates", {}).get(candidate, {})
    selection = record.get("selection_split", "validation")
    if record.get("verdict") == "promote" and record.get("candidate") == candidate:
        role = "promoted"
    elif record.get(f"selected_on_{selection}") == candidate:
        role = "selected, not confirmed"
    else:
        role = "admissible" if info.get("admissible") else "inadmissible"
    tags = {"rcat.candidate": candidate, "rcat.sha256": sha256, "rcat.weights_digest": weights_digest,
            "rcat.check_verdict": str(record.get("verdict")), "rcat.decision": role, **check}
    evaluations = (record.get("replay") or {}).get("evaluations", {}).get(candidate, {})
    for split, metrics in evaluations.items():
        for key in TAGGED_METRICS:
            value = (metrics or {}).get(key)
            tags[f"{split}/{key}"] = "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.6g}"
    return tags


def _weights_digest(path: Path) -> str:
    """The weights digest in an rcat model file's header (read without loading the tensors)."""
    from safetensors import safe_open

    # the header is the same whatever the framework; numpy's spares the gate importing torch
    with safe_open(str(path), framework="numpy") as handle:
        return (handle.metadata() or {}).get("weights_digest", "unknown")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def register_update_check(tracker: Any, params: Params, layout: Any, record: dict[str, Any]) -> dict[str, Any]:
    """Register this check's candidates and move the aliases (see the module docstring).

    ``tracker`` is the stage's :class:`rcat.tracking.Tracker` (its parent run is the update check).
    Returns a summary (also logged to the parent run as ``registry.json``): ``registered_model``,
    ``versions`` (candidate -> version), ``skipped`` (candidate -> why), ``challenger``,
    ``champion``, ``champion_moved``, ``previous_champion`` and, when the step was refused,
    ``refused`` (why). MLflow failures raise :class:`~rcat.errors.TrackingError` (the decision file
    is already written).
    """
    parent = tracker.parent()
    refusal = registry_refusal(record, params)
    if refusal is not None:
        summary: dict[str, Any] = {"registered_model": params.tracking.registered_model, "refused": refusal, "champion_moved": False}
        if params.tracking.enabled:
            parent.tags({"rcat.registry": f"skipped: {refusal}"})
            tracker.client().log_dict(parent.run_id, summary, "registry.json")
        return summary

    client = tracker.client()
    name = params.tracking.registered_model
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="rcat update checks: every candidate is a version; "
                                       "'champion' is the model in service, 'challenger' the latest check's best admissible candidate")
    check = {"rcat.update_check": parent.run_id, "rcat.pipeline_key": tracker.key, "rcat.code_revision": tracker.revision}
    artifact_root = client.get_run(parent.run_id).info.artifact_uri
    # every version of the model, not only this check's: a weight file is registered once, by its SHA-256
    existing = client.search_model_versions(f"name = '{name}'", max_results=MAX_VERSIONS_SEARCHED)

    versions: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for candidate, path in candidate_files(params, layout).items():
        recorded = record["inputs"]["models"].get(candidate)
        if not path.is_file():
            skipped[candidate] = f"{path}: model file missing"
            continue
        sha256 = sha256_file(path)
        if sha256 != recorded:
            # the file changed after the decision: registering it would register a model nobody evaluated
            skipped[candidate] = f"{path}: SHA-256 {sha256[:12]} differs from the decision's {str(recorded)[:12]}; rerun 'dvc repro decide'"
            continue
        tags = _version_tags(candidate, record, check, sha256, _weights_digest(path))
        found = sorted((v for v in existing if v.tags.get("rcat.sha256") == sha256), key=lambda v: int(v.version))
        if found:
            # the same weights as an earlier version (this check rerun, or a later check of the same file): reuse it;
            # its tags now describe the latest check that evaluated it
            version = found[0]
            for key, value in tags.items():
                if version.tags.get(key) != value:
                    client.set_model_version_tag(name, version.version, key, value)
        else:
            import tempfile

            from rcat.mlflow_model import save_mlflow_model

            # a content-addressed path: a later rerun of this check never overwrites a registered version's files
            artifact_path = f"registry/{candidate}/{sha256[:16]}"
            with tempfile.TemporaryDirectory(prefix="rcat-register-") as tmp:
                client.log_artifacts(parent.run_id, str(save_mlflow_model(path, Path(tmp) / "model")), artifact_path)
            version = client.create_model_version(name, f"{artifact_root}/{artifact_path}", run_id=parent.run_id, tags=tags,
                                                  description=f"update check {parent.run_id}: candidate {candidate}")
            existing.append(version)
        versions[candidate] = version

    aliases = dict(client.get_registered_model(name).aliases or {})
    selected = record.get(f"selected_on_{record.get('selection_split', 'validation')}")
    challenger = str(versions[selected].version) if selected in versions else None
    if challenger is not None:
        client.set_registered_model_alias(name, CHALLENGER, challenger)
    elif CHALLENGER in aliases:
        client.delete_registered_model_alias(name, CHALLENGER)

    champion, previous, moved, note = aliases.get(CHAMPION), aliases.get(PREVIOUS_CHAMPION), False, ""
    if record["verdict"] == "promote":
        promoted = versions.get(record["candidate"])
        if promoted is None:
            note = f"champion not moved: the promoted model was not registered ({skipped.get(record['candidate'], 'unknown')})"
        elif client.get_model_version(name, promoted.version).tags.get("rcat.promoted_by_check") == parent.run_id:
            note = "champion not moved: this check promoted its version before (rerun)"
        else:
            if champion is not None and str(champion) != str(promoted.version):
                client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion)
                previous = champion
            client.set_registered_model_alias(name, CHAMPION, promoted.version)
            client.set_model_version_tag(name, promoted.version, "rcat.promoted_by_check", parent.run_id)
            # read-modify-write right after the alias moved; only the driving process writes the registry
            history = _history(client.get_registered_model(name).tags.get(HISTORY_TAG))
            history.append({"version": str(promoted.version), "candidate": record["candidate"], "run_id": parent.run_id,
                            "time": _now(), "previous": None if champion is None else str(champion)})
            client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))
            champion, moved = promoted.version, True
    else:
        client.set_registered_model_tag(name, REJECTED_TAG, json.dumps({"run_id": parent.run_id, "time": _now(), "reasons": record.get("reasons", [])[:5]}))
        note = "champion not moved: the update was rejected"

    summary = {"registered_model": name, "versions": {c: str(v.version) for c, v in versions.items()}, "skipped": skipped,
               "challenger": challenger, "champion": None if champion is None else str(champion), "champion_moved": moved,
               "previous_champion": None if previous is None else str(previous), "note": note}
    parent.tags({"rcat.registry": "champion moved" if moved else note or "registered",
                 "rcat.registry.champion": summary["champion"] or "none", "rcat.registry.challenger": challenger or "none"})
    client.log_dict(parent.run_id, summary, "registry.json")
    return summary


def _history(text: str | None) -> list[dict[str, Any]]:
    """The ``champion_history`` tag as a list; an unreadable tag starts a new list rather than blocking a promotion."""
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def pinned_reference(name: str, alias: str = CHAMPION, tracking_uri: str | None = None) -> str:
    """``models:/<name>/<version>`` that ``models:/<name>@<alias>`` points at now.

    Put this, not the alias, in the next check's ``train_old.reference``: an alias reference keeps
    the same text when the alias moves, so DVC would not rerun ``train_old`` and the update check's
    key (params + code) would not change.
    """
    import os

    from mlflow.tracking import MlflowClient

    from rcat.errors import InputError, TrackingUnavailable
    from rcat.tracking import HTTP_DEFAULTS, _is_tracking_failure, _is_transient, redact_uri

    for variable, value in HTTP_DEFAULTS.items():  # fail in seconds, not after MLflow's minutes of retries
        os.environ.setdefault(variable, value)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    try:
        version = MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, alias).version
    except Exception as exc:  # MlflowException (no such model or alias), connection errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        if _is_tracking_failure(exc) and _is_transient(exc) and not isinstance(exc, OSError):
            # the store did not answer: a transient failure (exit code 4, retried by the flow), not bad input
            raise TrackingUnavailable(f"models:/{name}@{alias}: MLflow at {redact_uri(str(uri or 'the default store'))} did not answer ({first}); "
                                      "start it or point MLFLOW_TRACKING_URI at a running one") from exc
        raise InputError(f"models:/{name}@{alias}: cannot resolve it in MLflow ({first}); run a passing update check first, "
                         "or check MLFLOW_TRACKING_URI") from exc
    return f"models:/{name}/{version}"


ALIAS_REFERENCE = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


def pin_alias(reference: str | None, tracking_uri: str | None = None) -> str | None:
    """``models:/<name>@<alias>`` becomes the ``models:/<name>/<version>`` the alias points at now;
    any other reference (or None) is returned unchanged.

    Why: DVC and the update check's key see the params' text. An alias keeps its text when it
    moves, so a check given ``models:/x@champion`` after a promotion would reuse the previous old
    model's outputs; the pinned version changes the text exactly when the champion changes.
    """
    if reference is None:
        return None
    match = ALIAS_REFERENCE.match(reference.strip())
    return reference if match is None else pinned_reference(match["name"], match["alias"], tracking_uri)


CHAMPION_REFERENCE = "champion"
"""``train_old.reference: champion``: the old model is the registry's champion, pinned in :data:`CHAMPION_PIN`."""
CHAMPION_PIN = Path("rcat-champion.json")
"""The project's pin of the champion (project root, tracked by git, a dep of ``train_old`` in dvc.yaml):
``{"reference": "models:/<name>/<version>" | null, "registered_model", "version"}``. It changes exactly when the
champion used as the old model moves, so DVC reruns the check then and only then."""


def write_champion_pin(params: Params, path: Path = CHAMPION_PIN, uri: str | None = None) -> dict[str, Any]:
    """Resolve the champion of ``tracking.registered_model`` now and write the pin (atomically); return it.

    Without ``train_old.reference: champion`` the pin is ``{"reference": null}``: the file then never
    changes, so it never reruns anything. ``uri``: the tracking store (default: the params', from the
    working directory).
    """
    from rcat.errors import InputError
    from rcat.safe_io import read_json, write_json
    from rcat.tracking import tracking_uri

    pin: dict[str, Any] = {"reference": None, "registered_model": None, "version": None}
    if params.train_old.reference == CHAMPION_REFERENCE:
        name = params.tracking.registered_model
        if not name:
            raise InputError("params.yaml: train_old.reference is 'champion' but tracking.registered_model is not set; name the registered model")
        reference = pinned_reference(name, CHAMPION, uri or tracking_uri(params.tracking))
        pin = {"reference": reference, "registered_model": name, "version": reference.rsplit("/", 1)[1]}
    if not path.is_file() or read_json(path) != pin:  # unchanged content: no rewrite, no new mtime
        write_json(path, pin)
    return pin


def read_champion_pin(path: Path = CHAMPION_PIN) -> str:
    """The pinned ``models:/<name>/<version>`` of ``train_old.reference: champion`` (one-line error when there is none)."""
    from rcat.errors import InputError
    from rcat.safe_io import read_json

    pin = read_json(path) if path.is_file() else {}
    reference = pin.get("reference") if isinstance(pin, dict) else None
    if not isinstance(reference, str) or not ALIAS_FREE.match(reference):
        raise InputError(f"{path}: no pinned champion; run 'rcat champion --pin' (after a passing update check registered one)")
    return reference


ALIAS_FREE = re.compile(r"^models:/[^/@]+/\d+$")
