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

Writes ``docs/results/<name>.json`` (``{"methods": {name: {accuracy, robust_accuracy, nfr, rnfr,
snfr, seeds, ...}}}``, fractions in [0, 1], means over seeds), ``docs/results/<name>_tradeoff.png``
(robust accuracy against RNFR per method and seed) and ``docs/results/<name>_tradeoff.csv``
(the same points, for ``dvc plots``), and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcat import pipeline  # noqa: E402
from rcat.config import parse_params  # noqa: E402
from rcat.safe_io import atomic_path, read_parquet, write_json, write_parquet  # noqa: E402
from rcat.statistics import bootstrap_interval, mcnemar_exact  # noqa: E402

INDICATORS = ("old_clean_correct", "new_clean_correct", "old_robust", "new_robust", "negative_flip", "robust_negative_flip")


def seed_params(raw: dict, seed: int) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["tracking"]["enabled"] = False
    for section in ("train_old", "train_new", "finetune"):
        raw[section]["seed"] = raw[section].get("seed", 0) + 100 * seed
    return raw


def run_seed(raw: dict, seed: int) -> pd.DataFrame:
    """One seed through every stage; the test split's per-sample flips of every candidate."""
    params = parse_params(seed_params(raw, seed), "params (seed override)")
    with tempfile.TemporaryDirectory(prefix=f"rcat-results-{seed}-") as tmp:
        layout = pipeline.Layout(Path(tmp) / "data")
        pipeline.prepare(params, layout)
        for role in ("old", "new"):
            pipeline.train(params, role, layout)
        pipeline.attack_cache(params, layout)
        frames = [read_parquet(layout.attack_cache / "flips.parquet")]
        for method in params.finetune.methods:
            start = time.perf_counter()
            pipeline.finetune_method(params, method, layout)
            pipeline.evaluate_method(params, method, layout)
            frames.append(read_parquet(layout.evaluation(method) / "flips.parquet"))
            print(f"  seed {seed}: {method} in {time.perf_counter() - start:.1f} s", flush=True)
    flips = pd.concat(frames, ignore_index=True)
    return flips[flips["split"] == "test"].reset_index(drop=True).assign(seed=seed)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="digits")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--merge-only", action="store_true", help="only rebuild the table from saved seed files")
    args = parser.parse_args()
    out_dir = ROOT / "docs" / "results"
    seed_dir = out_dir / args.name
    raw = yaml.safe_load(args.params.read_text())
    if not args.merge_only:
        for seed in args.seeds:
            start = time.perf_counter()
            write_parquet(seed_dir / f"seed-{seed}.parquet", run_seed(raw, seed))
            print(f"seed {seed}: {time.perf_counter() - start:.1f} s", flush=True)
    files = sorted(seed_dir.glob("seed-*.parquet"))
    if not files:
        sys.exit(f"no seed results in {seed_dir}; run without --merge-only first")
    flips = pd.concat([read_parquet(f) for f in files], ignore_index=True)
    summary = summarise(flips)
    write_json(out_dir / f"{args.name}.json", summary)
    plot(flips, out_dir / f"{args.name}_tradeoff.png", out_dir / f"{args.name}_tradeoff.csv")
    print(markdown(summary))


if __name__ == "__main__":
    main()
