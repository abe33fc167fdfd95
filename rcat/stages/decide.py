"""Stage ``decide``: the update gate over every candidate, read through its evidence; replaying a decision."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from rcat.config import Params
from rcat.decision import decide as decide_update
from rcat.errors import InputError, UpdateRejected
from rcat.metrics import flip_set
from rcat.results import EVALUATED_SPLITS, EvidenceError, Layout, load_candidates, require
from rcat.runtime import code_revision
from rcat.safe_io import atomic_path, read_json, read_parquet, sha256_file, write_json
from rcat.stages.records import key_figures, method_params
from rcat.tracking import Tracker

Evaluations = dict[str, dict[str, dict[str, Any] | None]]


def gather_evaluations(layout: Layout, candidates: list[str], *, split_digests: dict[str, str], attack_identity: dict[str, Any], seed: int,
                       num_classes: int) -> tuple[Evaluations, list[str], dict[str, dict[str, str]]]:
    """Each candidate's gate inputs per split, *recomputed* from its verified per-sample outcomes.

    Returns ``(evaluations, problems, evidence)``: ``evaluations[candidate][split]`` is the flip
    metrics against the old model plus :func:`rcat.decision.gate_figures` against the raw update
    (None where the candidate has no evaluation at all: a problem, and inadmissible);
    ``evidence[candidate]`` maps every file the figures rest on (path relative to ``layout.root``)
    to its SHA-256. An evaluation whose evidence does not hold raises
    :class:`~rcat.results.EvidenceError` (see :func:`rcat.results.verify_candidate`).
    """
    from rcat.decision import gate_figures
    from rcat.results import EVIDENCE_FILE

    present = [name for name in candidates if (layout.evaluation(name) / EVIDENCE_FILE).is_file() or (layout.evaluation(name) / "metrics.json").is_file()]
    problems = [f"{layout.evaluation(name)}: {name} was not evaluated (no evaluation found); run 'dvc repro'" for name in candidates if name not in present]
    _, verified = load_candidates(layout, present, split_digests=split_digests, attack_identity=attack_identity, seed=seed)
    if verified and num_classes < 1:
        raise InputError(f"{layout.manifest}: no num_classes, which the per-class rules need; rerun 'dvc repro prepare'")
    evaluations: Evaluations = {}
    for name in candidates:
        item = verified.get(name)
        if item is None:
            evaluations[name] = {split: None for split in EVALUATED_SPLITS}
            continue
        evaluations[name] = {}
        for split in EVALUATED_SPLITS:
            figures = gate_figures(item.flips[split], verified["new"].flips[split], num_classes) if "new" in verified else {}
            evaluations[name][split] = dict(item.metrics[split]) | figures
    root = layout.root.as_posix().rstrip("/") + "/"
    evidence = {name: {path[len(root):] if path.startswith(root) else path: digest for path, digest in item.files.items()}
                for name, item in verified.items()}
    return evaluations, problems, evidence


def _evaluation_inputs(params: Params, layout: Layout) -> tuple[dict[str, str], int, dict[str, int]]:
    """Split digests, class count and split sizes from the prepare stage's manifest (one-line errors when malformed)."""
    manifest = read_json(require(layout.manifest, "prepare"))
    try:
        digests = {split: str(manifest["splits"][split]["digest"]) for split in EVALUATED_SPLITS}
        expected = {split: int(manifest["splits"][split]["n_samples"]) for split in EVALUATED_SPLITS}
        num_classes = int(manifest.get("num_classes", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{layout.manifest}: malformed manifest (missing or bad {exc}); rerun 'dvc repro prepare'") from None
    return digests, num_classes, expected


def input_digests(params: Params, layout: Layout, evidence: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Digests of every input of the decision: data splits, models, params, code and attack config.

    ``models`` holds each candidate's *evaluated* model digest (from its evidence), so the registry
    registers a file only when it is byte for byte the one that was evaluated.
    """
    from rcat.safe_io import sha256_json

    digests: dict[str, Any] = {"params": sha256_json(params.model_dump(mode="json")), "attack_config": params.attack.identity(), "seed": params.seed}
    manifest = read_json(layout.manifest) if layout.manifest.is_file() else {"splits": {}}
    digests["data"] = {name: info["digest"] for name, info in manifest["splits"].items()}
    models: dict[str, str | None] = {"old": sha256_file(layout.model("old")) if layout.model("old").is_file() else None}
    for candidate in ("new", *params.finetune.methods):
        relative = layout.candidate_model(candidate).relative_to(layout.root).as_posix()
        models[candidate] = evidence.get(candidate, {}).get(relative)
    digests["models"] = models
    digests["old_reference"] = params.train_old.reference  # the old model's reference as configured
    if params.train_old.reference == "champion":
        from rcat.registry import CHAMPION_PIN

        # the registry version compared against: models:/<name>/<version>
        digests["old_reference"] = read_json(CHAMPION_PIN).get("reference") if CHAMPION_PIN.is_file() else None
    return digests


CHECK_FIGURES = ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr", "snfr")
"""The candidate's figures in ``check.json`` (fractions of the confirmation split, in [0, 1])."""


def check_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The few values ``dvc exp show`` leads with, in this order (DVC keeps a metrics file's key order,
    and the first column of a group is the one it never collapses): ``verdict`` (promote|reject),
    ``candidate`` (the promoted one, else the one selected on validation, else ``none``), its
    confirmation-split accuracy, robust accuracy, NFR, RNFR and S-NFR (null when it has none), and
    ``promote`` (1|0, for plots and sorting)."""
    candidate = record.get("candidate") or record.get(f"selected_on_{record.get('selection_split', 'validation')}")
    split = record.get("confirmation_split", "test")
    evaluations = (record.get("replay") or {}).get("evaluations") or {}
    metrics = (evaluations.get(candidate) or {}).get(split) or {} if candidate else {}
    figures = {key.removesuffix("_new"): metrics.get(key) for key in CHECK_FIGURES}
    return {"verdict": record["verdict"], "candidate": candidate or "none", **figures, "promote": int(record["verdict"] == "promote")}


def describe_decision(record: dict[str, Any]) -> str:
    """The stage's one line on stdout: ``decision: promote rcat (...reasons)``."""
    return f"decision: {record['verdict']} {record['candidate'] or ''} ({'; '.join(record['reasons'])})"


def decide(params: Params, layout: Layout, tracker: Tracker | None = None) -> dict[str, Any]:
    """Run the update gate over every candidate and write ``decision.json`` and the trade-off table.

    Every candidate is read through its evidence record and its metrics are recomputed from its
    per-sample outcomes (:func:`gather_evaluations`). Fails closed: a missing evaluation makes its
    candidate inadmissible; evidence that does not hold (a model file changed after its
    evaluation, an edited results file, an evaluation made with another attack, split or old
    model) writes a ``reject`` record naming it and raises :class:`~rcat.results.EvidenceError`,
    before the registry is touched.
    """
    from rcat.results import sign

    split_digests, num_classes, expected = _evaluation_inputs(params, layout)
    candidates = ["new", *params.finetune.methods]
    try:
        evaluations, problems, evidence = gather_evaluations(layout, candidates, split_digests=split_digests, attack_identity=params.attack.identity(),
                                                             seed=params.seed, num_classes=num_classes)
    except EvidenceError as exc:
        refused = {"verdict": "reject", "candidate": None, "reasons": [f"evidence check failed: {exc}"], "problems": [str(exc)],
                   "evidence_verified": False}
        write_json(layout.decision, sign(refused))
        write_json(layout.check, check_summary(refused), sort_keys=False)
        raise
    record = decide_update(evaluations, params.decision, expected)
    record["problems"] = problems
    record["evidence_verified"] = True
    record["evidence"] = evidence
    record["inputs"] = input_digests(params, layout, evidence)
    record["inputs"]["code_revision"] = tracker.revision if tracker is not None else code_revision()
    record["inputs"]["library_versions"] = library_versions()
    # what the verdict was computed from, so that it can be replayed and audited (rcat decide --replay)
    record["replay"] = {"evaluations": evaluations, "expected_samples": expected, "decision_config": params.decision.model_dump(mode="json"),
                        "num_classes": num_classes}
    record = sign(record)
    write_json(layout.decision, record)
    write_json(layout.check, check_summary(record), sort_keys=False)
    _write_tradeoff(evaluations, layout.tradeoff)
    if tracker is not None:
        parent = tracker.parent()
        parent.tags({"rcat.verdict": record["verdict"], "rcat.candidate": record["candidate"] or "none", "rcat.reasons": " | ".join(record["reasons"])})
        parent.metrics({"decision/promote": 1.0 if record["verdict"] == "promote" else 0.0})
        summary = check_summary(record)
        # the chosen candidate's key figures on the parent run: the check's row in the runs table
        parent.metrics({f"check/{key}": summary[key] for key in ("accuracy", "robust_accuracy", "nfr", "rnfr", "snfr") if summary[key] is not None})
        parent.rename(f"check {time.strftime('%Y-%m-%d')} {record['verdict']} {summary['candidate']}")
        parent.artifact(layout.decision)
        parent.artifact(layout.tradeoff)
        if tracker.enabled:
            parent.figure(_tradeoff_figure(evaluations), "plots/tradeoff.png")
            parent.figure(_frontier_figure(evaluations, record), "plots/frontier.png")
            # DVC may have reused evaluations made under another check (a rules-only change reruns decide alone):
            # their candidate runs are logged here from the verified outputs, so every check is complete in MLflow
            for name, by_split in evaluations.items():
                if tracker.has_child(f"candidate:{name}") or any(v is None for v in by_split.values()):
                    continue
                with tracker.child(f"candidate:{name}", "candidate") as run:
                    own = {"method": "new", "loss": "none"} if name == "new" else method_params(params, name)
                    run.params({**own, "logged_by": "decide (evaluation reused by DVC)"})
                    # the evaluation's own metrics.json (verified against its evidence above): the keys its evaluate stage logs
                    stored = {split: values for split, values in read_json(layout.evaluation(name) / "metrics.json").items() if split in EVALUATED_SPLITS}
                    run.metrics(key_figures(params, stored))
                    run.metrics(stored)
                    run.artifact(layout.evaluation(name) / "flips.parquet", "flips")
            new_flips = layout.evaluation("new") / "flips.parquet"
            if new_flips.is_file():  # the fine-tuned candidates' tables are logged by their evaluate stage
                with tracker.child("candidate:new", "candidate") as run:
                    run.table(flip_set(read_parquet(new_flips)), "flips/new.json")
            from rcat.registry import register_update_check

            # after decision.json is written and logged: the registry only ever reflects a recorded decision
            registry = register_update_check(tracker, params, layout, record)
            if registry.get("champion_moved") and params.train_old.reference == "champion":
                from rcat.registry import write_champion_pin

                write_champion_pin(params)  # the next `dvc repro` checks the update against the new champion
        tracker.finish_parent()
    return record


def _frontier_figure(evaluations: dict[str, dict[str, dict[str, Any] | None]], record: dict[str, Any]) -> Any:
    """The candidates on the confirmation split: RNFR against clean and robust accuracy, Wilson intervals, Pareto frontier."""
    from rcat.decision import wilson_interval
    from rcat.plots import FrontierPoint, frontier_figure

    split = record.get("confirmation_split", "test")
    points = []
    for candidate, by_split in evaluations.items():
        metrics = by_split.get(split)
        if not metrics or any(metrics.get(key) is None for key in ("accuracy_new", "robust_accuracy_new", "rnfr")):
            continue
        n = int(metrics["n_samples"])

        def wilson(rate: float, n: int = n) -> tuple[float, float]:
            return wilson_interval(round(rate * n), n)

        points.append(FrontierPoint(candidate, metrics["accuracy_new"], metrics["robust_accuracy_new"], metrics["rnfr"],
                                    accuracy_interval=wilson(metrics["accuracy_new"]), robust_accuracy_interval=wilson(metrics["robust_accuracy_new"]),
                                    rnfr_interval=wilson(metrics["rnfr"])))
    return frontier_figure(points, f"candidates on the {split} split (95% Wilson intervals)", record.get("candidate"),
                           (record.get("rules") or {}).get("max_rnfr"))


def _tradeoff_figure(evaluations: dict[str, dict[str, dict[str, Any] | None]]) -> Any:
    """Robust accuracy against RNFR per candidate, one panel per evaluated split (the old model at RNFR 0)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state in a long-lived process

    figure = Figure(figsize=(5 * len(EVALUATED_SPLITS), 4), layout="constrained")
    for axis, split in zip(figure.subplots(1, len(EVALUATED_SPLITS), squeeze=False)[0], EVALUATED_SPLITS):
        reference = None
        for candidate, by_split in evaluations.items():
            metrics = by_split.get(split)
            if metrics is None:
                continue
            reference = metrics["robust_accuracy_old"]
            if metrics["rnfr"] is None or metrics["robust_accuracy_new"] is None:  # undefined (null in JSON): nothing to place
                continue
            axis.scatter(metrics["rnfr"], metrics["robust_accuracy_new"], label=candidate)
            axis.annotate(candidate, (metrics["rnfr"], metrics["robust_accuracy_new"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        if reference is not None:
            axis.scatter([0.0], [reference], marker="x", color="black", label="old")
            axis.annotate("old", (0.0, reference), fontsize=8, xytext=(3, 3), textcoords="offset points")
        axis.set(title=split, xlabel="RNFR (robustness negative flip rate)", ylabel="robust accuracy")
        axis.grid(alpha=0.3)
    return figure


def _write_tradeoff(evaluations: dict[str, dict[str, dict[str, Any] | None]], path: Path) -> None:
    """One row per (candidate, split) with the figures a user trades off; the old model as reference."""
    columns = ["candidate", "split", "accuracy", "robust_accuracy", "nfr", "rnfr", "snfr"]
    rows: list[list[Any]] = []
    for candidate, by_split in evaluations.items():
        for split, metrics in by_split.items():
            if metrics is None:
                continue
            if not any(row[0] == "old" and row[1] == split for row in rows):
                rows.append(["old", split, metrics["accuracy_old"], metrics["robust_accuracy_old"], 0.0, 0.0, 0.0])
            rows.append([candidate, split, metrics["accuracy_new"], metrics["robust_accuracy_new"], metrics["nfr"], metrics["rnfr"], metrics["snfr"]])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that change results or their records."""
    import importlib.metadata

    versions = {}
    for name in ("rcat", "torch", "torchattacks", "numpy", "mlflow", "dvc", "prefect"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _comparable(value: Any) -> Any:
    """JSON round trip with NaN as None: how a value reads back from decision.json."""
    from rcat.safe_io import _nan_to_none

    return json.loads(json.dumps(_nan_to_none(value), sort_keys=True, default=str))


def replay_decision(record: dict[str, Any], layout: Layout | None = None) -> dict[str, Any]:
    """Verify a decision record against the files it rests on and recompute its verdict from them.

    1. its signature (with ``RCAT_SIGNING_KEY`` set; a signed record needs the key);
    2. every evidence file it lists (paths relative to ``layout.root``, default ``data/``) still has
       its recorded SHA-256;
    3. the evaluations recomputed from those files' per-sample outcomes equal the record's;
    4. the verdict recomputed from them, with the record's gate config, equals the record's.

    Returns ``{"matches": bool, "verdict", "candidate", "recorded_verdict", "recorded_candidate",
    "signature"}``; ``matches`` is False only for step 4 (the gate's code changed). Raises
    :class:`~rcat.results.EvidenceError` for steps 1-3 (an edited record or an edited or missing
    file) and :class:`InputError` for a record without replay data.
    """
    from rcat.config import DecisionConfig
    from rcat.results import check_signature

    layout = layout or Layout()
    replay = record.get("replay") if isinstance(record, dict) else None
    if not isinstance(replay, dict) or not {"evaluations", "expected_samples", "decision_config"} <= replay.keys():
        raise InputError("decision record has no 'replay' section (written by an older rcat, or edited); rerun 'dvc repro decide'")
    signature = check_signature(record, "decision record")
    try:
        config = DecisionConfig.model_validate(replay["decision_config"])
    except ValueError as exc:
        raise InputError(f"decision record: replay.decision_config is invalid ({exc.__class__.__name__})") from exc
    evidence, inputs = record.get("evidence"), record.get("inputs")
    if not isinstance(evidence, dict) or not isinstance(inputs, dict) or not isinstance(replay["evaluations"], dict):
        raise InputError("decision record has no 'evidence' or 'inputs' section (written by an older rcat, or edited); rerun 'dvc repro decide'")
    for candidate, files in evidence.items():
        if not isinstance(files, dict):
            raise EvidenceError(f"decision record: evidence.{candidate} is not a map of files to digests (the record was edited)")
        for relative, digest in files.items():
            path = layout.root / relative
            if not path.is_file():
                raise EvidenceError(f"{path}: the decision rests on it, but it is missing; replay where the decision was made (or restore the file)")
            actual = sha256_file(path)
            if actual != digest:
                raise EvidenceError(f"{path}: SHA-256 {actual[:12]} differs from the {str(digest)[:12]} the decision recorded; "
                                    "the file changed after the decision")
    try:
        split_digests = {split: inputs["data"][split] for split in EVALUATED_SPLITS}
        attack_identity, seed, num_classes = inputs["attack_config"], int(inputs["seed"]), int(replay["num_classes"])
        expected = {split: int(replay["expected_samples"][split]) for split in EVALUATED_SPLITS}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"decision record: inputs or replay section malformed (missing {exc}); rerun 'dvc repro decide'") from None
    again_evaluations, _, again_evidence = gather_evaluations(layout, list(replay["evaluations"]), split_digests=split_digests,
                                                              attack_identity=attack_identity, seed=seed, num_classes=num_classes)
    if _comparable(again_evaluations) != _comparable(replay["evaluations"]):
        differing = sorted(name for name in again_evaluations if _comparable(again_evaluations[name]) != _comparable(replay["evaluations"].get(name)))
        raise EvidenceError(f"decision record: the evaluations it states for {', '.join(differing) or 'some candidate'} differ from those "
                            "recomputed from the per-sample outcomes (the record was edited)")
    if _comparable(again_evidence) != _comparable(evidence):
        raise EvidenceError("decision record: its evidence list differs from the files the evaluations rest on (the record was edited)")
    again = decide_update(again_evaluations, config, expected)
    matches = (again["verdict"], again["candidate"], again["reasons"]) == (record.get("verdict"), record.get("candidate"), record.get("reasons"))
    return {"matches": matches, "verdict": again["verdict"], "candidate": again["candidate"],
            "recorded_verdict": record.get("verdict"), "recorded_candidate": record.get("candidate"), "signature": signature}


def require_promotion(record: dict[str, Any]) -> None:
    """Raise :class:`UpdateRejected` unless the decision record promotes a candidate."""
    if record.get("verdict") != "promote" or not record.get("candidate"):
        raise UpdateRejected("update rejected: " + "; ".join(record.get("reasons") or ["no reason recorded"]))
