"""Every fine-tuning family on the realistic CIFAR-10 pair: grid points, selection, frontier, matched accuracy.

For one seed, in a work directory (``.rcat_cache/compare/<name>/seed-<s>``, outside DVC's outputs):

1. prepare the profile's splits (the pair's test split; its own fine-tune and validation splits),
   put the committed pair (``docs/results/models/<pair>/seed-<s>/``) in place as ``old`` / ``new``;
2. the baseline attack cache: the old model attacked on the fine-tune split (the constraint sets
   that read it), both models on validation and test (reused from ``engine.cache_dir`` when the
   pair's own run left them there);
3. every method of ``finetune.methods`` in the order listed, through the pipeline's own
   ``finetune_method`` (one point each), attacked on test, and on validation when its family in
   ``compare.families`` has more than one point to choose from.

Each point is saved as it finishes (``docs/results/<name>/seed-<s>/<point>.json`` and its test
flips as ``<point>.parquet``), so a stopped run resumes where it was. ``--summary`` builds, from
every saved seed:

* each family's selected point: ``rcat.decision.best_grid_point`` on validation with the profile's
  ``decision.rules`` (the pipeline's rule: the lowest S-NFR among the points within the drop limits
  of the new model);
* the matched-accuracy point of each family on test: the lowest RNFR among its points whose clean
  and robust accuracy are at least the best AT's (AT's selected point) minus 1 point;
* the Pareto frontier plots (RNFR against clean and against robust accuracy, every point, 95%
  Wilson intervals) ``docs/results/<name>_frontier.png`` and the points as CSV;
* ``docs/results/<name>.json`` and the markdown tables of docs/RESULTS.md (printed).

    python benchmarks/compare_methods.py --params benchmarks/profiles/cifar10_compare.yaml --seed 0
    python benchmarks/compare_methods.py --params benchmarks/profiles/cifar10_compare.yaml --summary

The last line printed is one JSON line (the seed's points, or the summary's matched points).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_table import seed_params

from rcat import pipeline
from rcat.config import parse_params, read_yaml
from rcat.data import load_split
from rcat.decision import best_grid_point, wilson_interval
from rcat.metrics import compare_outcomes
from rcat.plots import FrontierPoint, frontier_figure, pareto_mask
from rcat.safe_io import atomic_path, read_json, read_parquet, sha256_file, write_json, write_parquet
from rcat.statistics import mcnemar_exact

MATCH_TOLERANCE = 0.01
"""Matched accuracy: clean and robust accuracy at least the best AT's minus this (1 point)."""

TARGET_RNFR_CUT = 0.40
"""Issue 12's target: the best method at matched accuracy cuts RNFR by at least 40% against the best AT."""


def load_profile(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The params profile (a valid params.yaml, e.g. for ``rcat evaluate --params``) and its families, from
    ``<stem>.families.yaml`` next to it (``pair``, ``families``)."""
    raw = read_yaml(path)
    parse_params(raw, str(path))  # one-line error naming the key
    families_path = path.with_name(f"{path.stem}.families.yaml")
    compare = read_yaml(families_path) if families_path.is_file() else None
    if not isinstance(compare, dict) or not isinstance(compare.get("families"), dict):
        sys.exit(f"{families_path}: needs 'pair' and 'families' (family -> list of finetune.methods names)")
    families = compare["families"]
    listed = [point for points in families.values() for point in points]
    methods = list((raw.get("finetune") or {}).get("methods") or {})
    if sorted(listed) != sorted(methods) or len(set(listed)) != len(listed):
        sys.exit(f"{families_path}: families must list every finetune.methods entry of {path} exactly once "
                 f"(missing {sorted(set(methods) - set(listed))}, unknown {sorted(set(listed) - set(methods))})")
    return raw, compare


def per_class(flips: pd.DataFrame, column: str, num_classes: int) -> list[float]:
    grouped = flips.groupby("label")[column].mean()
    return [round(float(grouped.get(label, float("nan"))), 4) for label in range(num_classes)]


def split_entry(old: pd.DataFrame, new: pd.DataFrame, num_classes: int) -> tuple[dict[str, Any], pd.DataFrame]:
    metrics, flips = compare_outcomes(old, new)
    predictions = np.bincount(new.sort_values("sample_index")["clean_prediction"].to_numpy(dtype=np.int64), minlength=num_classes)
    entry = {key: metrics[key] for key in ("n_samples", "accuracy_new", "robust_accuracy_new", "nfr", "rnfr", "snfr", "accuracy_old", "robust_accuracy_old")}
    entry["class_accuracy"] = per_class(flips, "new_clean_correct", num_classes)
    entry["class_robust_accuracy"] = per_class(flips, "new_robust", num_classes)
    entry["prediction_counts"] = predictions.tolist()
    return entry, flips


def prepare_work_dir(params, layout: pipeline.Layout, pair: str, seed: int) -> dict[str, str]:
    """Splits and the committed pair in place; returns the pair's file digests."""
    if not layout.manifest.exists():
        print(f"seed {seed}: preparing the splits", flush=True)
        pipeline.prepare(params, layout)
    digests = {}
    for role in ("old", "new"):
        source = ROOT / "docs" / "results" / "models" / pair / f"seed-{seed}" / f"{role}.safetensors"
        if not source.exists():
            sys.exit(f"{source}: no committed {pair} pair for seed {seed}; train it with benchmarks/train_pair.py --seed {seed}")
        target = layout.model(role)
        if not target.exists() or sha256_file(target) != sha256_file(source):
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        digests[role] = sha256_file(target)
    return digests


def baseline_cache(params, layout: pipeline.Layout) -> dict[str, pd.DataFrame]:
    """The old model on every split, the new one on validation and test, written as the attack cache's outcomes."""
    device = pipeline.resolve_device(params.device)
    splits = {name: load_split(layout.split(name)) for name in ("finetune", "validation", "test")}
    old = pipeline.load_model(layout.model("old"), device)
    new = pipeline.load_model(layout.model("new"), device)
    outcomes = {"old": pipeline.attack_model_on_splits(old, "old", splits, params.attack, params.seed, device, params.engine),
                "new": pipeline.attack_model_on_splits(new, "new", {k: splits[k] for k in ("validation", "test")}, params.attack, params.seed,
                                                       device, params.engine)}
    provenance = {"attack_config": json.dumps(params.attack.identity(), sort_keys=True), "old_digest": old.digest, "new_digest": new.digest}
    write_parquet(layout.attack_cache / "outcomes.parquet", pd.concat(outcomes.values(), ignore_index=True), provenance)
    return outcomes


def run_seed(raw: dict, compare: dict, name: str, seed: int) -> list[dict[str, Any]]:
    params = parse_params(seed_params(raw, seed), "params (seed override)")
    work = ROOT / ".rcat_cache" / "compare" / name / f"seed-{seed}"
    layout = pipeline.Layout(work / "data")
    out_dir = ROOT / "docs" / "results" / name / f"seed-{seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    pair_digests = prepare_work_dir(params, layout, compare["pair"], seed)
    num_classes = int(read_json(layout.manifest)["num_classes"])
    start = time.perf_counter()
    baseline = baseline_cache(params, layout)
    print(f"seed {seed}: baseline attack cache in {time.perf_counter() - start:.0f} s", flush=True)
    reference: dict[str, Any] = {"seed": seed, "pair": compare["pair"], "pair_digests": pair_digests, "attack": params.attack.label()}
    for split in ("validation", "test"):
        old_part = baseline["old"][baseline["old"]["split"] == split]
        new_part = baseline["new"][baseline["new"]["split"] == split]
        reference[split], _ = split_entry(old_part, new_part, num_classes)
        reference[split]["old_class_accuracy"] = per_class(compare_outcomes(old_part, old_part)[1], "old_clean_correct", num_classes)
    write_json(out_dir / "new.json", reference)
    family_of = {point: family for family, points in compare["families"].items() for point in points}
    device = pipeline.resolve_device(params.device)
    records = []
    for point, method in params.finetune.methods.items():
        record_path = out_dir / f"{point}.json"
        if record_path.exists():
            records.append(read_json(record_path))
            continue
        splits = ("validation", "test") if len(compare["families"][family_of[point]]) > 1 else ("test",)
        started = time.perf_counter()
        pipeline.finetune_method(params, point, layout)
        train_seconds = time.perf_counter() - started
        model = pipeline.load_model(layout.finetuned(point), device)
        loaded = {split: load_split(layout.split(split)) for split in splits}
        outcomes = pipeline.attack_model_on_splits(model, point, loaded, params.attack, params.seed, device, params.engine)
        record: dict[str, Any] = {"point": point, "family": family_of[point], "seed": seed, "method": method.model_dump(mode="json", exclude={"grid"}),
                                  "finetune": params.finetune.for_method(method).model_dump(mode="json", exclude={"methods"}),
                                  "train_seconds": round(train_seconds, 1), "attack_seconds": round(time.perf_counter() - started - train_seconds, 1),
                                  "weights_sha256": sha256_file(layout.finetuned(point)), "history": read_json(layout.finetune_history(point))["epochs"]}
        for split in splits:
            old_part = baseline["old"][baseline["old"]["split"] == split]
            record[split], flips = split_entry(old_part, outcomes[outcomes["split"] == split], num_classes)
            if split == "test":
                write_parquet(out_dir / f"{point}.parquet", flips.assign(candidate=point, seed=seed), {"weights_sha256": record["weights_sha256"]})
        write_json(record_path, record)
        test = record["test"]
        print(f"seed {seed}: {point}: test acc {test['accuracy_new']:.4f} rob {test['robust_accuracy_new']:.4f} nfr {test['nfr']:.4f} "
              f"rnfr {test['rnfr']:.4f} (train {record['train_seconds']:.0f} s, attack {record['attack_seconds']:.0f} s)", flush=True)
        records.append(record)
    print(json.dumps({"seed": seed, "points": {r["point"]: {k: r["test"][k] for k in ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr")} for r in records}}))
    return records


# ---------------------------------------------------------------- summary


def interval(successes: float, n: int) -> list[float]:
    low, high = wilson_interval(round(successes), n)
    return [round(low, 4), round(high, 4)]


def select(records: list[dict], reference: dict, compare: dict, rules, within: dict[str, bool] | None = None) -> dict[str, str]:
    """Each family's point by the pipeline's own grid rule on validation (a single point is its own choice).
    ``within``, when given, receives per family whether its point keeps the rule's drop limits against the new model
    (:func:`rcat.decision.best_grid_point`: when no point does, the one that misses them by the least)."""
    chosen = {}
    by_point = {r["point"]: r for r in records}
    for family, points in compare["families"].items():
        present = [p for p in points if p in by_point]
        if not present:
            continue
        if len(present) == 1:
            chosen[family] = present[0]
            continue
        index, kept = best_grid_point([by_point[p]["validation"] for p in present], reference["validation"], rules)
        chosen[family] = present[index]
        if within is not None:
            within[family] = kept
    return chosen


def matched(records: list[dict], compare: dict, at_point: dict) -> dict[str, str | None]:
    """Per family, the lowest test RNFR among its points with clean and robust accuracy >= the best AT's - 1 point."""
    floor_acc = at_point["test"]["accuracy_new"] - MATCH_TOLERANCE
    floor_rob = at_point["test"]["robust_accuracy_new"] - MATCH_TOLERANCE
    result: dict[str, str | None] = {}
    by_point = {r["point"]: r for r in records}
    for family, points in compare["families"].items():
        if family == "at":
            result[family] = at_point["point"]
            continue
        eligible = [by_point[p] for p in points if p in by_point
                    and by_point[p]["test"]["accuracy_new"] >= floor_acc - 1e-12 and by_point[p]["test"]["robust_accuracy_new"] >= floor_rob - 1e-12]
        result[family] = min(eligible, key=lambda r: (r["test"]["rnfr"], -r["test"]["robust_accuracy_new"]))["point"] if eligible else None
    return result


def seed_headline(records: list[dict], reference: dict, compare: dict, rules) -> dict[str, Any]:
    """One seed on its own, with every point it has (optional ones included): the best AT selected on validation, each
    family's matched point on test and its RNFR cut against that AT. Shows at once what points run on some seeds change."""
    within: dict[str, bool] = {}
    chosen = select(records, reference, compare, rules, within)
    at_point = next(r for r in records if r["point"] == chosen["at"])
    at_rnfr = at_point["test"]["rnfr"]
    families: dict[str, Any] = {}
    for family, point in matched(records, compare, at_point).items():
        if point is None:
            families[family] = None
            continue
        test = next(r for r in records if r["point"] == point)["test"]
        families[family] = {"point": point, "accuracy": round(test["accuracy_new"], 4), "robust_accuracy": round(test["robust_accuracy_new"], 4),
                            "nfr": round(test["nfr"], 4), "rnfr": round(test["rnfr"], 4),
                            "rnfr_cut_vs_at": round(1 - test["rnfr"] / at_rnfr, 4) if at_rnfr > 0 else None}
    return {"best_at": chosen["at"], "best_at_within_limits": within.get("at", True), "at_points": sorted(p for p in compare["families"]["at"] if any(r["point"] == p for r in records)),
            "matched": families}


def pareto(points: pd.DataFrame, accuracy: str) -> pd.Series:
    """True for the points no other point beats on both ``accuracy`` (higher) and RNFR (lower) (:func:`rcat.plots.pareto_mask`)."""
    return pd.Series(pareto_mask(points[accuracy].tolist(), points["rnfr"].tolist()), index=points.index)


def frontier_plot(points: pd.DataFrame, png: Path) -> None:
    figure = frontier_figure([FrontierPoint(row.point, row.accuracy, row.robust_accuracy, row.rnfr, group=row.family,
                                            accuracy_interval=(row.accuracy_low, row.accuracy_high),
                                            robust_accuracy_interval=(row.robust_accuracy_low, row.robust_accuracy_high),
                                            rnfr_interval=(row.rnfr_low, row.rnfr_high)) for row in points.itertuples()],
                             "CIFAR-10 pair: every fine-tuning point on test (95% Wilson intervals), mean over seeds")
    with atomic_path(png) as tmp:
        figure.savefig(tmp, format="png", dpi=110)


def summary(raw: dict, compare: dict, name: str) -> dict[str, Any]:
    params = parse_params(raw, "params")
    seed_dirs = sorted((ROOT / "docs" / "results" / name).glob("seed-*"))
    if not seed_dirs:
        sys.exit(f"no docs/results/{name}/seed-*/ yet: run a seed first")
    optional = set(compare.get("optional_families") or [])
    unknown = optional - set(compare["families"])
    if unknown:
        sys.exit(f"{name}: optional_families names {sorted(unknown)}, which is no family of the comparison's families file; "
                 f"list only names under 'families' ({sorted(compare['families'])})")
    # a seed enters the means with every point of the required families; an optional family's points are in the means
    # only where every such seed has them (else they show in the per-seed table alone)
    optional_points = set(compare.get("optional_points") or [])
    unknown_points = optional_points - {point for points in compare["families"].values() for point in points}
    if unknown_points:
        sys.exit(f"{name}: optional_points names {sorted(unknown_points)}, which is no point of the comparison's families file; "
                 f"list only points under 'families'")
    wanted = {point for family, points in compare["families"].items() if family not in optional for point in points} - optional_points
    per_seed, seed_names, by_seed = [], [], {}
    for seed_dir in seed_dirs:
        if not (seed_dir / "new.json").is_file():
            continue
        reference = read_json(seed_dir / "new.json")
        records = [read_json(p) for p in sorted(seed_dir.glob("*.json")) if p.name != "new.json"]
        by_seed[seed_dir.name] = {"new": reference["test"], **{r["point"]: r["test"] for r in records}}
        if not wanted <= {r["point"] for r in records}:
            continue  # a seed still running (or stopped): its points are shown per seed, not in the means
        flips = {r["point"]: read_parquet(seed_dir / f"{r['point']}.parquet") for r in records}
        per_seed.append((reference, records, flips))
        seed_names.append(seed_dir.name)
    if not per_seed:
        sys.exit(f"no seed of docs/results/{name}/ has every point of compare.families yet")
    n_test = per_seed[0][0]["test"]["n_samples"]
    common = set.intersection(*({r["point"] for r in records} for _, records, _ in per_seed))
    order = [p for family in compare["families"].values() for p in family if p in common]
    family_of = {point: family for family, points in compare["families"].items() for point in points}

    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    rows = []
    for role in ("old", "new"):
        tests = [reference["test"] for reference, _, _ in per_seed]
        accuracy = mean([t[f"accuracy_{role}"] for t in tests])
        robust = mean([t[f"robust_accuracy_{role}"] for t in tests])
        nfr = 0.0 if role == "old" else mean([t["nfr"] for t in tests])
        rnfr = 0.0 if role == "old" else mean([t["rnfr"] for t in tests])
        rows.append({"point": role, "family": role, "accuracy": accuracy, "robust_accuracy": robust, "nfr": nfr, "rnfr": rnfr})
    for point in order:
        tests = [next(r for r in records if r["point"] == point)["test"] for _, records, _ in per_seed]
        rows.append({"point": point, "family": family_of[point], "accuracy": mean([t["accuracy_new"] for t in tests]),
                     "robust_accuracy": mean([t["robust_accuracy_new"] for t in tests]), "nfr": mean([t["nfr"] for t in tests]),
                     "rnfr": mean([t["rnfr"] for t in tests])})
    points = pd.DataFrame(rows)
    total = n_test * len(per_seed)
    for metric in ("accuracy", "robust_accuracy", "nfr", "rnfr"):
        bounds = [interval(value * total, total) for value in points[metric]]
        points[f"{metric}_low"] = [b[0] for b in bounds]
        points[f"{metric}_high"] = [b[1] for b in bounds]
    with atomic_path(ROOT / "docs" / "results" / f"{name}_frontier.csv") as tmp:
        points.to_csv(tmp, index=False, float_format="%.4f")
    frontier_plot(points, ROOT / "docs" / "results" / f"{name}_frontier.png")

    # selection and matching per seed (the rule is applied to each seed's own points), reported for seed 0 and as counts
    selections, matches, per_seed_headline = [], [], {}
    for seed_name, (reference, all_records, _) in zip(seed_names, per_seed):
        per_seed_headline[seed_name] = seed_headline(all_records, reference, compare, params.decision.rules)
        records = [r for r in all_records if r["point"] in common]
        chosen = select(records, reference, compare, params.decision.rules)
        at_point = next(r for r in records if r["point"] == chosen["at"])
        selections.append(chosen)
        matches.append(matched(records, compare, at_point))
    by_point = points.set_index("point")
    at_name = selections[0]["at"]
    at_row = by_point.loc[at_name]
    matched_table: dict[str, Any] = {}
    for family, family_points in compare["families"].items():
        if not common & set(family_points):
            continue  # an optional family not run on every seed in the means: in the per-seed table only
        point = matches[0].get(family)
        if point is None:
            matched_table[family] = None
            continue
        row = by_point.loc[point]
        matched_table[family] = {"point": point, "accuracy": round(float(row["accuracy"]), 4), "robust_accuracy": round(float(row["robust_accuracy"]), 4),
                                 "nfr": round(float(row["nfr"]), 4), "rnfr": round(float(row["rnfr"]), 4),
                                 "rnfr_cut_vs_at": round(1 - float(row["rnfr"]) / float(at_row["rnfr"]), 4) if at_row["rnfr"] > 0 else None,
                                 "nfr_at_most_at": bool(row["nfr"] <= at_row["nfr"] + 1e-12)}
    # paired McNemar test of each matched point's RNF set against the best AT's, seed 0
    _, _, flips0 = per_seed[0]
    for family, entry in matched_table.items():
        if entry is None or family == "at":
            continue
        test = mcnemar_exact(flips0[entry["point"]]["robust_negative_flip"].to_numpy(), flips0[at_name]["robust_negative_flip"].to_numpy())
        entry["rnf_vs_at_mcnemar_seed0"] = test
    methods: dict[str, Any] = {}
    for _, row in points.iterrows():
        entry = {k: round(float(row[k]), 4) for k in ("accuracy", "robust_accuracy", "nfr", "rnfr")}
        entry["snfr"] = round(max(entry["nfr"], entry["rnfr"]), 4)
        entry["seeds"] = len(per_seed)
        entry["family"] = row["family"]
        for metric in ("accuracy", "robust_accuracy", "nfr", "rnfr"):
            entry[f"{metric}_ci95"] = [float(row[f"{metric}_low"]), float(row[f"{metric}_high"])]
        if row["point"] in {"old", "new"}:
            key = "old_class_accuracy" if row["point"] == "old" else "class_accuracy"
            entry["class_accuracy"] = [round(mean([ref["test"][key][c] for ref, _, _ in per_seed]), 4) for c in range(10)]
        else:
            tests = [next(r for r in records if r["point"] == row["point"])["test"] for _, records, _ in per_seed]
            entry["class_accuracy"] = [round(mean([t["class_accuracy"][c] for t in tests]), 4) for c in range(10)]
            entry["prediction_counts"] = [round(mean([t["prediction_counts"][c] for t in tests]), 1) for c in range(10)]
        methods[row["point"]] = entry
    pair = {role: {"accuracy": methods[role]["accuracy"], "robust_accuracy": methods[role]["robust_accuracy"],
                   "min_class_accuracy": min(methods[role]["class_accuracy"])} for role in ("old", "new")}
    pair["seeds"] = len(per_seed)
    controls = [f for f in compare["families"] if f.startswith("control") and f in matched_table]
    candidates = {f: e for f, e in matched_table.items() if e is not None and f != "at" and f not in controls and e["nfr_at_most_at"]}
    best = min(candidates.items(), key=lambda item: item[1]["rnfr"]) if candidates else None
    per_seed_points = {seed: {point: {k: round(float(test[k]), 4) for k in ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr")}
                              for point, test in points_of_seed.items()} for seed, points_of_seed in by_seed.items()}
    result = {
        "methods": methods, "pair": pair, "matched": {f: e for f, e in matched_table.items()},
        "best_at": at_name, "selected": selections[0], "seeds": len(per_seed), "n_test_samples": n_test,
        "seeds_in_means": seed_names, "points_not_in_means": sorted(set(family_of) - common), "seeds_partial": {seed: sorted(pts) for seed, pts in by_seed.items() if seed not in seed_names},
        "per_seed": per_seed_points, "per_seed_headline": per_seed_headline,
        "headline": {"best_family": best[0] if best else None, "rnfr_cut_vs_at": best[1]["rnfr_cut_vs_at"] if best else None,
                     "target_cut": TARGET_RNFR_CUT, "target_met": bool(best and best[1]["rnfr_cut_vs_at"] is not None and best[1]["rnfr_cut_vs_at"] >= TARGET_RNFR_CUT),
                     "controls_cut": {f: (matched_table[f] or {}).get("rnfr_cut_vs_at") for f in controls}},
        "note": ("means over seeds on the test split; *_ci95: 95% Wilson intervals over the seeds' pooled test samples; matched: the lowest test "
                 "RNFR among a family's points with clean and robust accuracy >= the best AT's - 1 point (the best AT: AT's point selected on validation)"),
    }
    write_json(ROOT / "docs" / "results" / TABLE_JSON, result)
    commit_matched_models(result, compare, name)
    print(markdown(result, points, compare))
    print(json.dumps({"matched": result["matched"], "headline": result["headline"]}))
    return result


TABLE_JSON = "cifar10.json"
"""The comparison's table: ``{"methods": {point: {...}}, "pair": ..., "matched": ..., "headline": ...}`` (issue 12's format)."""


def commit_matched_models(result: dict, compare: dict, name: str) -> None:
    """Copy seed 0's model of every family's matched point into ``docs/results/models/<name>/seed-0/`` and list them,
    with the pair and the params file that evaluates them, in ``docs/results/cifar10_models.json``."""
    work = ROOT / ".rcat_cache" / "compare" / name / "seed-0" / "data" / "finetune"
    target = ROOT / "docs" / "results" / "models" / name / "seed-0"
    pair = ROOT / "docs" / "results" / "models" / compare["pair"] / "seed-0"
    models: dict[str, dict] = {}
    for role in ("old", "new"):
        models[role] = {"file": str((pair / f"{role}.safetensors").relative_to(ROOT)), "sha256": sha256_file(pair / f"{role}.safetensors")}
    for family, entry in result["matched"].items():
        if entry is None:
            continue
        source = work / entry["point"] / "model.safetensors"
        recorded = read_json(ROOT / "docs" / "results" / name / "seed-0" / f"{entry['point']}.json")["weights_sha256"]
        committed = target / f"{entry['point']}.safetensors"
        if committed.is_file() and sha256_file(committed) == recorded:
            # committed by an earlier summary (its work directory need not exist on this machine)
            models[entry["point"]] = {"family": family, "file": str(committed.relative_to(ROOT)), "sha256": recorded}
            continue
        if not source.is_file() or sha256_file(source) != recorded:
            print(f"  {entry['point']}: its fine-tuned model is not in {source.parent} as evaluated; not committed", flush=True)
            continue
        with atomic_path(target / f"{entry['point']}.safetensors") as tmp:
            shutil.copyfile(source, tmp)
        models[entry["point"]] = {"family": family, "file": str((target / f"{entry['point']}.safetensors").relative_to(ROOT)), "sha256": recorded}
    write_json(ROOT / "docs" / "results" / "cifar10_models.json",
               {"seed": 0, "params": "benchmarks/profiles/cifar10_compare.yaml", "models": models,
                "check": "rcat evaluate --params benchmarks/profiles/cifar10_compare.yaml --data imagefolder:../shared/data/cifar10-jpeg/train "
                         "--split test --old <old file> --new <a model file> --out /tmp/check"})


def markdown(result: dict, points: pd.DataFrame, compare: dict) -> str:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    lines = ["| point | family | clean acc | robust acc | NFR | RNFR | S-NFR | Pareto (clean / robust) |", "|---|---|---|---|---|---|---|---|"]
    front_clean, front_robust = pareto(points, "accuracy"), pareto(points, "robust_accuracy")
    for index, row in points.iterrows():
        marks = f"{'yes' if front_clean[index] else 'no'} / {'yes' if front_robust[index] else 'no'}"
        lines.append(f"| {row['point']} | {row['family']} | {pct(row['accuracy'])} [{pct(row['accuracy_low'])}, {pct(row['accuracy_high'])}] | "
                     f"{pct(row['robust_accuracy'])} [{pct(row['robust_accuracy_low'])}, {pct(row['robust_accuracy_high'])}] | {pct(row['nfr'])} | "
                     f"{pct(row['rnfr'])} [{pct(row['rnfr_low'])}, {pct(row['rnfr_high'])}] | {pct(max(row['nfr'], row['rnfr']))} | {marks} |")
    lines += ["", f"Matched accuracy (clean and robust >= best AT `{result['best_at']}` - 1 point):", "",
              "| family | point | clean acc | robust acc | NFR | RNFR | RNFR cut vs best AT | NFR <= AT's | RNF vs AT (McNemar, seed 0) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for family, entry in result["matched"].items():
        if entry is None:
            lines.append(f"| {family} | none within 1 point of AT | | | | | | | |")
            continue
        test = entry.get("rnf_vs_at_mcnemar_seed0")
        paired = f"{test['only_first']}/{test['only_second']}, p={test['p_value']:.3f}" if test else "—"
        lines.append(f"| {family} | {entry['point']} | {pct(entry['accuracy'])} | {pct(entry['robust_accuracy'])} | {pct(entry['nfr'])} | "
                     f"{pct(entry['rnfr'])} | {pct(entry['rnfr_cut_vs_at'])}% | {'yes' if entry['nfr_at_most_at'] else 'no'} | {paired} |")
    seeds = list(result["per_seed"])
    lines += ["", "Per seed (test, in %: clean acc / robust acc / NFR / RNFR; seeds in the means above: "
              + ", ".join(result["seeds_in_means"]) + (f"; partial: {', '.join(result['seeds_partial'])}" if result["seeds_partial"] else "")
              + (f"; not in the means, not run on every one of those seeds: {', '.join(result['points_not_in_means'])}" if result["points_not_in_means"] else "")
              + "):", "",
              "| point | " + " | ".join(seeds) + " |", "|---|" + "---|" * len(seeds)]
    for point in ["new", *(p for family in compare["families"].values() for p in family)]:
        cells = []
        for seed in seeds:
            test = result["per_seed"][seed].get(point)
            cells.append(" / ".join(pct(test[k]) for k in ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr")) if test else "not run")
        lines.append(f"| {point} | " + " | ".join(cells) + " |")
    lines += ["", "Each seed on its own, with every point it has (the best AT selected on validation among its AT points; "
              "each family's matched point on that seed's test split; RNFR in %, cut against that seed's best AT):", "",
              "| seed | AT points | best AT | " + " | ".join(f for f in compare["families"] if f != "at") + " |",
              "|---|---|---|" + "---|" * (len(compare["families"]) - 1)]
    for seed, headline in result["per_seed_headline"].items():
        cells = []
        for family in compare["families"]:
            if family == "at":
                continue
            entry = headline["matched"].get(family)
            cells.append("—" if entry is None else f"{entry['point']} {pct(entry['rnfr'])} ({pct(entry['rnfr_cut_vs_at'])}%)")
        at_entry = headline["matched"]["at"]
        outside = "" if headline["best_at_within_limits"] else " (no AT point within the 1-point limits on validation: the nearest)"
        lines.append(f"| {seed} | {len(headline['at_points'])} | {headline['best_at']} {pct(at_entry['rnfr'])}{outside} | " + " | ".join(cells) + " |")
    lines += ["", "| point | " + " | ".join(f"class {c}" for c in range(10)) + " | predicted per class (test) |", "|---|" + "---|" * 11]
    for name, entry in result["methods"].items():
        counts = entry.get("prediction_counts")
        lines.append(f"| {name} | " + " | ".join(pct(v) for v in entry["class_accuracy"]) + f" | {' '.join(f'{c:.0f}' for c in counts) if counts else '—'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(ROOT / "benchmarks" / "profiles" / "cifar10_compare.yaml"))
    parser.add_argument("--name", default="cifar10_compare", help="results name: docs/results/<name>/, docs/results/<name>.json")
    parser.add_argument("--seed", type=int, help="run this seed's points (resumes); without it, --summary")
    parser.add_argument("--summary", action="store_true", help="build the tables, frontier and JSON from the saved seeds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw, compare = load_profile(Path(args.params))
    if args.seed is not None:
        run_seed(raw, compare, args.name, args.seed)
    if args.summary or args.seed is None:
        summary(raw, compare, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
