"""Train one realistic CIFAR-10 (old, new) model pair for a seed, measure it, commit-ready.

Runs the pipeline's own stage functions in a work directory (``.rcat_cache/pairs/<name>/seed-<s>``,
outside DVC's outputs): prepare, train the old and the new model (seeds as in
``benchmarks/results_table.py``: ``train_*.seed + 100 x seed``), then attacks both models with the
profile's evaluation attack on the validation and test splits through the attack engine (so a
later pipeline run on the same data reuses those attacks from ``engine.cache_dir``). Writes:

* ``docs/results/models/<name>/seed-<s>/{old,new}.safetensors``: the pair (rcat model files);
* ``docs/results/<name>/seed-<s>.json``: the training budget (images, epochs, weights, seconds,
  threads, and the training config; ``train_seconds`` is wall time, longer when the machine was
  shared), and per model and split the clean and robust accuracy (fractions of the split, overall
  and per class), the raw update's NFR / RNFR, and whether the pair meets the profile's targets.

    python benchmarks/train_pair.py --params benchmarks/profiles/cifar10_pair.yaml --seed 0
    python benchmarks/train_pair.py --summary          # the tables of docs/RESULTS.md from the saved seeds

The last line printed is the seed's summary as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_table import seed_params

from rcat import pipeline
from rcat.config import parse_params
from rcat.data import load_split
from rcat.metrics import compare_outcomes
from rcat.safe_io import atomic_path, read_json, sha256_file, write_json

TARGETS = {
    "old_min_accuracy": 0.55,
    "old_min_class_accuracy": 0.25,
    "min_accuracy_gain": 0.05,
    "min_robust_accuracy_gain": 0.03,
    "new_min_robust_accuracy": 0.30,
}
"""The realistic pair's targets (issue 12), on the test split."""


def per_class(frame: pd.DataFrame, column: str, num_classes: int) -> list[float]:
    """Mean of boolean ``column`` per true class (fraction of that class's samples in the split)."""
    grouped = frame.groupby("label")[column].mean()
    return [round(float(grouped.get(label, float("nan"))), 4) for label in range(num_classes)]


def measure(layout: pipeline.Layout, params, num_classes: int) -> dict:
    device = pipeline.resolve_device(params.device)
    splits = {name: load_split(layout.split(name)) for name in ("validation", "test")}
    models = {role: pipeline.load_model(layout.model(role), device) for role in ("old", "new")}
    outcomes = {role: pipeline.attack_model_on_splits(model, role, splits, params.attack, params.seed, device, params.engine)
                for role, model in models.items()}
    result: dict = {}
    for name in splits:
        metrics, flips = compare_outcomes(outcomes["old"][outcomes["old"]["split"] == name], outcomes["new"][outcomes["new"]["split"] == name])
        entry = {"n_samples": int(metrics["n_samples"]), "nfr": metrics["nfr"], "rnfr": metrics["rnfr"]}
        for role in ("old", "new"):
            entry[role] = {
                "accuracy": metrics[f"accuracy_{role}"], "robust_accuracy": metrics[f"robust_accuracy_{role}"],
                "class_accuracy": per_class(flips, f"{role}_clean_correct", num_classes),
                "class_robust_accuracy": per_class(flips, f"{role}_robust", num_classes),
            }
            entry[role]["min_class_accuracy"] = min(entry[role]["class_accuracy"])
        result[name] = entry
    return result


def targets_met(test: dict) -> dict[str, bool]:
    old, new = test["old"], test["new"]
    return {
        "old_min_accuracy": old["accuracy"] >= TARGETS["old_min_accuracy"],
        "old_min_class_accuracy": old["min_class_accuracy"] >= TARGETS["old_min_class_accuracy"],
        "min_accuracy_gain": new["accuracy"] - old["accuracy"] >= TARGETS["min_accuracy_gain"],
        "min_robust_accuracy_gain": new["robust_accuracy"] - old["robust_accuracy"] >= TARGETS["min_robust_accuracy_gain"],
        "new_min_robust_accuracy": new["robust_accuracy"] >= TARGETS["new_min_robust_accuracy"],
    }


def summary_table(name: str) -> str:
    """The markdown tables of docs/RESULTS.md from every ``docs/results/<name>/seed-*.json`` present."""
    records = [read_json(path) for path in sorted((ROOT / "docs" / "results" / name).glob("seed-*.json"))]
    if not records:
        return f"no docs/results/{name}/seed-*.json yet"

    def pct(value: float) -> str:
        return f"{100 * value:.1f}"

    lines = ["| seed | old clean | old robust | old worst class | new clean | new robust | clean gain | robust gain | NFR | RNFR | targets met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        test = record["splits"]["test"]
        old, new = test["old"], test["new"]
        lines.append(f"| {record['seed']} | {pct(old['accuracy'])} | {pct(old['robust_accuracy'])} | {pct(old['min_class_accuracy'])} | "
                     f"{pct(new['accuracy'])} | {pct(new['robust_accuracy'])} | {pct(new['accuracy'] - old['accuracy'])} | "
                     f"{pct(new['robust_accuracy'] - old['robust_accuracy'])} | {pct(test['nfr'])} | {pct(test['rnfr'])} | "
                     f"{'all' if all(record['targets_met'].values()) else ', '.join(k for k, v in record['targets_met'].items() if not v) + ' missed'} |")
    lines += ["", "| seed | model | " + " | ".join(f"class {c}" for c in range(10)) + " |", "|---|---|" + "---|" * 10]
    for record in records:
        test = record["splits"]["test"]
        for role in ("old", "new"):
            for kind, key in (("clean", "class_accuracy"), ("robust", "class_robust_accuracy")):
                lines.append(f"| {record['seed']} | {role} {kind} | " + " | ".join(pct(v) for v in test[role][key]) + " |")
    lines += ["", "| seed | model | architecture | weights | training images | epochs | train seconds (threads) |", "|---|---|---|---|---|---|---|"]
    for record in records:
        for role in ("old", "new"):
            budget = record["budget"][role]
            lines.append(f"| {record['seed']} | {role} | {budget['architecture']} {json.dumps(budget['architecture_kwargs'])} | {budget['weights']:,} | "
                         f"{budget['n_train_images']:,} | {budget['epochs']} | {budget['train_seconds']:,.0f} ({budget.get('threads', record['threads'])}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", help="profile (params.yaml format); required unless --summary")
    parser.add_argument("--name", default="cifar10_pair", help="results name (docs/results/<name>/, docs/results/models/<name>/)")
    parser.add_argument("--seed", type=int, help="the seed to train (required unless --summary)")
    parser.add_argument("--summary", action="store_true", help="print docs/RESULTS.md's tables from the saved seeds and exit")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--measure-only", action="store_true", help="reuse the work directory's trained models")
    parser.add_argument("--reuse-trained", action="store_true",
                        help="keep a model already trained in the work directory when its recorded training config equals the profile's")
    args = parser.parse_args()
    if args.summary:
        print(summary_table(args.name))
        return 0
    if args.seed is None or args.params is None:
        parser.error("--seed and --params are required")
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))
    params = parse_params(seed_params(raw, args.seed), f"{args.params} (seed {args.seed})")
    work = ROOT / ".rcat_cache" / "pairs" / args.name / f"seed-{args.seed}"
    layout = pipeline.Layout(work / "data")
    record: dict = {"seed": args.seed, "params": args.params, "threads": torch.get_num_threads(), "budget": {}}
    if not args.measure_only:
        previous = read_json(work / "budget.json") if (work / "budget.json").is_file() else {}
        start = time.perf_counter()
        pipeline.prepare(params, layout)
        record["budget"]["prepare_seconds"] = round(time.perf_counter() - start, 1)
        for role in ("old", "new"):
            config = params.train_old if role == "old" else params.train_new
            wanted = config.model_dump(mode="json")
            kept = previous.get(role, {})
            if args.reuse_trained and kept.get("config") == wanted and layout.model(role).is_file():
                record["budget"][role] = kept | {"reused": True}
                print(f"seed {args.seed}: kept the trained {role} model (same training config)", flush=True)
                continue
            start = time.perf_counter()
            pipeline.train(params, role, layout)
            seconds = time.perf_counter() - start
            history = read_json(layout.training_history(role))
            network = pipeline.load_model(layout.model(role), "cpu").network
            record["budget"][role] = {
                "architecture": config.architecture, "architecture_kwargs": config.architecture_kwargs,
                "weights": sum(p.numel() for p in network.parameters()), "n_train_images": history["n_train_samples"],
                "epochs": config.epochs, "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                "last_epoch": history["epochs"][-1], "config": wanted,
            }
            print(f"seed {args.seed}: trained {role} in {seconds:.0f} s; last epoch {history['epochs'][-1]}", flush=True)
            write_json(work / "budget.json", record["budget"])
    else:
        record["budget"] = read_json(work / "budget.json")
    start = time.perf_counter()
    manifest = read_json(layout.manifest)
    record["splits"] = measure(layout, params, manifest["num_classes"])
    record["budget"]["attack_seconds"] = round(time.perf_counter() - start, 1)
    record["targets"] = TARGETS
    record["targets_met"] = targets_met(record["splits"]["test"])
    models_dir = ROOT / "docs" / "results" / "models" / args.name / f"seed-{args.seed}"
    record["models"] = {}
    for role in ("old", "new"):
        destination = models_dir / f"{role}.safetensors"
        destination.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(destination) as tmp:
            shutil.copyfile(layout.model(role), tmp)
        record["models"][role] = {"path": str(destination.relative_to(ROOT)), "sha256": sha256_file(destination)}
    write_json(ROOT / "docs" / "results" / args.name / f"seed-{args.seed}.json", record)
    test = record["splits"]["test"]
    print(json.dumps({"seed": args.seed, "old_accuracy": test["old"]["accuracy"], "old_robust_accuracy": test["old"]["robust_accuracy"],
                      "old_min_class_accuracy": test["old"]["min_class_accuracy"], "new_accuracy": test["new"]["accuracy"],
                      "new_robust_accuracy": test["new"]["robust_accuracy"], "nfr": test["nfr"], "rnfr": test["rnfr"],
                      "targets_met": all(record["targets_met"].values())}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
