"""The paper's table for a params profile, over several seeds, with intervals and paired tests.

For each seed, runs the pipeline's stage functions in-process (tracking off) in a temporary
directory: prepare, train (or import) the old and new model, the baseline attack cache, every
configured fine-tuning method, and its flip evaluation. The data split and the attack seed come
from ``seed`` in the params and stay fixed, so every seed is evaluated on the same test samples;
the seeds vary the models' and the fine-tuning's seeds (``train_old.seed``, ``train_new.seed``,
``finetune.seed`` plus 100 x seed). Each seed's per-sample test results are saved on their own
(``docs/results/<name>/seed-<s>.parquet``), so seeds can run in separate invocations; the table
is built from every seed file present.

    python benchmarks/results_table.py --name digits --seeds 0 1 2      # run 3 seeds, then build
    python benchmarks/results_table.py --name digits --merge-only       # rebuild from saved seeds
    python benchmarks/results_table.py --name digits --overlay benchmarks/profiles/paper_grids.yaml
    python benchmarks/results_table.py --name cifar10 --params benchmarks/profiles/cifar10.yaml --seeds 0 --save-models

Writes ``docs/results/<name>.json`` (``{"methods": {name: {accuracy, robust_accuracy, nfr, rnfr,
snfr, seeds, ...}}}``, fractions in [0, 1], means over seeds), ``docs/results/<name>_tradeoff.png``
(robust accuracy against RNFR per method and seed) and ``docs/results/<name>_tradeoff.csv``
(the same points, for ``dvc plots``), logs them to MLflow (experiment ``rcat-results`` of the
profile's tracking store; ``--no-mlflow`` to skip), and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcat import pipeline
from rcat.config import parse_params
from rcat.safe_io import atomic_path, read_json, read_parquet, sha256_file, write_json, write_parquet
from rcat.statistics import bootstrap_interval, mcnemar_exact

INDICATORS = ("old_clean_correct", "new_clean_correct", "old_robust", "new_robust", "negative_flip", "robust_negative_flip")


def seed_params(raw: dict, seed: int) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["tracking"]["enabled"] = False
    for section in ("train_old", "train_new", "finetune"):
        raw[section]["seed"] = raw[section].get("seed", 0) + 100 * seed
    return raw


def run_seed(raw: dict, seed: int, models_dir: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """One seed through every stage: the test split's per-sample flips of every candidate, and a
    record of the run (stage times, each family's grid on validation, the models' digests).

    ``models_dir``: also copy the old, new and fine-tuned model files there (``<name>.safetensors``).
    """
    params = parse_params(seed_params(raw, seed), "params (seed override)")
    record: dict = {"seed": seed, "stage_seconds": {}, "grids": {}, "models": {}}

    def timed(name: str, call) -> None:
        start = time.perf_counter()
        call()
        record["stage_seconds"][name] = round(time.perf_counter() - start, 1)
        print(f"  seed {seed}: {name} in {record['stage_seconds'][name]:.1f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix=f"rcat-results-{seed}-") as tmp:
        layout = pipeline.Layout(Path(tmp) / "data")
        timed("prepare", lambda: pipeline.prepare(params, layout))
        for role in ("old", "new"):
            timed(f"train_{role}", lambda role=role: pipeline.train(params, role, layout))
            last = read_json(layout.training_history(role))["epochs"][-1]
            print(f"    {role}: last epoch {json.dumps({k: round(v, 4) for k, v in last.items()})}", flush=True)
        timed("attack_cache", lambda: pipeline.attack_cache(params, layout))
        baseline = read_json(layout.attack_cache / "metrics.json")["test"]
        print(f"    test: old acc {baseline['accuracy_old']:.4f} rob {baseline['robust_accuracy_old']:.4f}; "
              f"new acc {baseline['accuracy_new']:.4f} rob {baseline['robust_accuracy_new']:.4f} rnfr {baseline['rnfr']:.4f}", flush=True)
        frames = [read_parquet(layout.attack_cache / "flips.parquet")]
        for method in params.finetune.methods:
            timed(f"finetune@{method}", lambda method=method: pipeline.finetune_method(params, method, layout))
            timed(f"evaluate@{method}", lambda method=method: pipeline.evaluate_method(params, method, layout))
            history = read_json(layout.finetune_history(method))
            record["grids"][method] = history.get("grid") or [{"alpha": history["alpha"], "beta": history["beta"], "selected": True}]
            frames.append(read_parquet(layout.evaluation(method) / "flips.parquet"))
            test = read_json(layout.evaluation(method) / "metrics.json")["test"]
            print(f"    {method} (alpha {history['alpha']}, beta {history['beta']}): acc {test['accuracy_new']:.4f} "
                  f"rob {test['robust_accuracy_new']:.4f} nfr {test['nfr']:.4f} rnfr {test['rnfr']:.4f}", flush=True)
        for name in ("old", "new", *params.finetune.methods):
            path = layout.model(name) if name in {"old", "new"} else layout.finetuned(name)
            record["models"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            if models_dir is not None:
                with atomic_path(models_dir / f"{name}.safetensors") as tmp_path:
                    shutil.copyfile(path, tmp_path)
    flips = pd.concat(frames, ignore_index=True)
    return flips[flips["split"] == "test"].reset_index(drop=True).assign(seed=seed), record


def summarise(flips: pd.DataFrame, reference: str = "at") -> dict:
    """Per method: means over seeds, spread (std over seeds), 95% bootstrap intervals, McNemar vs ``reference``."""
    seeds = sorted(flips["seed"].unique())
    methods: dict[str, dict] = {}

    def stack(candidate: str, column: str) -> np.ndarray:
        part = flips[flips["candidate"] == candidate].sort_values(["seed", "sample_index"])
        return part[column].to_numpy(dtype=float).reshape(len(seeds), -1)

    candidates = list(dict.fromkeys(flips["candidate"]))
    first = candidates[0]
    rows = {
        "old": {"accuracy": stack(first, "old_clean_correct"), "robust_accuracy": stack(first, "old_robust"),
                "nfr": np.zeros_like(stack(first, "negative_flip")), "rnfr": np.zeros_like(stack(first, "negative_flip"))},
    }
    for candidate in candidates:
        rows[candidate] = {"accuracy": stack(candidate, "new_clean_correct"), "robust_accuracy": stack(candidate, "new_robust"),
                           "nfr": stack(candidate, "negative_flip"), "rnfr": stack(candidate, "robust_negative_flip")}
    for name, values in rows.items():
        values["snfr"] = np.maximum(values["nfr"], values["rnfr"])
        entry: dict = {"seeds": len(seeds), "n_test_samples": int(values["nfr"].shape[1])}
        for metric, matrix in values.items():
            per_seed = matrix.mean(axis=1)
            entry[metric] = float(per_seed.mean())
            entry[f"{metric}_std_over_seeds"] = float(per_seed.std(ddof=1)) if len(seeds) > 1 else 0.0
            entry[f"{metric}_ci95"] = list(bootstrap_interval(matrix))
        if name in rows and reference in rows and name not in {"old", reference}:
            tests = [mcnemar_exact(rows[name]["rnfr"][i] > 0, rows[reference]["rnfr"][i] > 0) for i in range(len(seeds))]
            entry[f"rnf_vs_{reference}_mcnemar"] = tests
        methods[name] = entry
    return {"methods": methods, "seeds": [int(s) for s in seeds], "reference": reference,
            "note": "means over seeds; *_ci95: 95% percentile bootstrap over test samples (seeds paired); McNemar exact test per seed on RNF sets"}


def markdown(summary: dict) -> str:
    def cell(entry: dict, metric: str, error: bool = False) -> str:
        value, (low, high) = entry[metric], entry[f"{metric}_ci95"]
        if error:
            value, low, high = 1 - value, 1 - high, 1 - low
        return f"{100 * value:.2f} [{100 * low:.2f}, {100 * high:.2f}] ±{100 * entry[f'{metric}_std_over_seeds']:.2f}"

    reference = summary["reference"]
    lines = [f"| method | clean error | NFR | robust error | RNFR | S-NFR | RNF vs {reference.upper()} (McNemar p per seed) |", "|---|---|---|---|---|---|---|"]
    for name, entry in summary["methods"].items():
        tests = entry.get(f"rnf_vs_{reference}_mcnemar")
        paired = ", ".join(f"{t['only_first']}/{t['only_second']} p={t['p_value']:.2f}" for t in tests) if tests else "—"
        lines.append(f"| {name} | {cell(entry, 'accuracy', True)} | {cell(entry, 'nfr')} | {cell(entry, 'robust_accuracy', True)} | {cell(entry, 'rnfr')} | {cell(entry, 'snfr')} | {paired} |")
    return "\n".join(lines)


def plot(flips: pd.DataFrame, png: Path, csv: Path) -> None:
    points = (flips.groupby(["candidate", "seed"])[["new_robust", "robust_negative_flip"]].mean()
              .rename(columns={"new_robust": "robust_accuracy", "robust_negative_flip": "rnfr"}).reset_index())
    with atomic_path(csv) as tmp:
        points.to_csv(tmp, index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for candidate, part in points.groupby("candidate", sort=False):
        axis.scatter(100 * part["rnfr"], 100 * part["robust_accuracy"], label=candidate)
    axis.set_xlabel("RNFR on test (%)")
    axis.set_ylabel("robust accuracy on test (%)")
    axis.set_title("robust accuracy vs robustness negative flips (one point per seed)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(png) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def apply_overlay(raw: dict, overlay: dict, source: Path) -> dict:
    """A copy of ``raw`` with each dotted key of ``overlay`` replacing that node (the parent must exist)."""
    raw = json.loads(json.dumps(raw))
    for dotted, value in (overlay or {}).items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                sys.exit(f"{source}: overlay key {dotted!r} names no section of the params ({part!r} missing)")
            node = node[part]
        node[last] = value
    return raw


def write_models_index(path: Path, models_dir: Path, record: dict, params_path: Path) -> None:
    """List the committed model files with their digests, so that a table row can be checked with ``rcat evaluate``."""
    entries = {}
    for name, info in record["models"].items():
        chosen = next((point for point in record["grids"].get(name, []) if point.get("selected")), None)
        entries[name] = {"file": str((models_dir / f"{name}.safetensors").relative_to(ROOT)), **info,
                         **({"alpha": chosen["alpha"], "beta": chosen["beta"]} if chosen else {})}
    write_json(path, {"seed": record["seed"], "params": os.path.relpath(params_path.resolve(), ROOT), "models": entries})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="digits")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--merge-only", action="store_true", help="only rebuild the table from saved seed files")
    parser.add_argument("--save-models", action="store_true",
                        help="copy the first seed's old, new and fine-tuned models to docs/results/models/<name>/ and list them in docs/results/<name>_models.json")
    parser.add_argument("--overlay", type=Path, action="append", default=[],
                        help="YAML of dotted keys that replace nodes of the params (e.g. benchmarks/profiles/paper_grids.yaml)")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false", help="do not log the table and plot to MLflow")
    args = parser.parse_args()
    out_dir = ROOT / "docs" / "results"
    seed_dir = out_dir / args.name
    raw = yaml.safe_load(args.params.read_text())
    for overlay in args.overlay:
        raw = apply_overlay(raw, yaml.safe_load(overlay.read_text()), overlay)
    if not args.merge_only:
        for seed in args.seeds:
            start = time.perf_counter()
            models_dir = out_dir / "models" / args.name if args.save_models and seed == args.seeds[0] else None
            flips, record = run_seed(raw, seed, models_dir)
            record["total_seconds"] = round(time.perf_counter() - start, 1)
            write_parquet(seed_dir / f"seed-{seed}.parquet", flips)
            write_json(seed_dir / f"seed-{seed}.json", record)
            if models_dir is not None:
                write_models_index(out_dir / f"{args.name}_models.json", models_dir, record, args.params)
            print(f"seed {seed}: {record['total_seconds']:.1f} s", flush=True)
    files = sorted(seed_dir.glob("seed-*.parquet"))
    if not files:
        sys.exit(f"no seed results in {seed_dir}; run without --merge-only first")
    flips = pd.concat([read_parquet(f) for f in files], ignore_index=True)
    summary = summarise(flips)
    write_json(out_dir / f"{args.name}.json", summary)
    plot(flips, out_dir / f"{args.name}_tradeoff.png", out_dir / f"{args.name}_tradeoff.csv")
    if args.mlflow:
        log_to_mlflow(summary, args.name, raw, [out_dir / f"{args.name}.json", out_dir / f"{args.name}_tradeoff.png", out_dir / f"{args.name}_tradeoff.csv"])
    print(markdown(summary))


def log_to_mlflow(summary: dict, name: str, raw: dict, files: list[Path]) -> None:
    """One run ``results:<name>`` in the experiment ``rcat-results`` of the profile's tracking store
    (``MLFLOW_TRACKING_URI`` overrides): every method's means as ``<method>/<metric>``, the table,
    the trade-off plot and its CSV as artifacts."""
    import mlflow

    from rcat.config import TrackingConfig
    from rcat.tracking import redact_uri, tracking_uri

    uri = tracking_uri(TrackingConfig(**raw.get("tracking", {})))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("rcat-results")
    with mlflow.start_run(run_name=f"results:{name}"):
        mlflow.log_params({"dataset": name, "seeds": " ".join(str(s) for s in summary["seeds"])})
        mlflow.log_metrics({f"{method}/{metric}": entry[metric] for method, entry in summary["methods"].items()
                            for metric in ("accuracy", "robust_accuracy", "nfr", "rnfr", "snfr")})
        for path in files:
            mlflow.log_artifact(str(path), "results")
    print(f"logged to MLflow {redact_uri(uri)} (experiment rcat-results, run results:{name})", flush=True)


if __name__ == "__main__":
    main()
