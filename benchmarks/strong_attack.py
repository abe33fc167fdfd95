"""The CIFAR-10 table's matched points under a stronger attack: how much RNFR moves.

The comparison (``benchmarks/compare_methods.py``) evaluates every point with the paper's attack,
APGD-DLR with 50 steps and one restart. A reviewer asks whether its RNFR figures survive a
stronger evaluation. This benchmark takes the committed seed-0 models of
``docs/results/cifar10_models.json`` (the pair and each family's matched point, SHA-256 checked),
the profile's test split, and attacks every model, each with its own attack, with:

* ``paper``: the profile's own attack (APGD-DLR-50; reused from ``engine.cache_dir`` when the
  comparison left it there). Its figures must equal the committed records: the benchmark says so;
* ``strong``: ``APGD-CE-50`` then ``APGD-DLR-50`` (an ensemble, worst case per sample, the second
  attack only on the samples the first did not break; ``--attack autoattack-standard`` for the
  full AutoAttack "standard" preset, hours on 2 cores);
* ``worst``: a sample counts as robust only if neither run broke it (the union of both attacks'
  successes, so never weaker than either).

For each candidate (the new model and each matched point) against the old model, it prints clean
and robust accuracy, NFR and RNFR under the three, and the RNFR's change against the paper's
attack. The old model is attacked by the same attack as each candidate: RNFR compares "the
attack failed on the old model" with "the attack succeeded on the new one" under one attack.

    python benchmarks/strong_attack.py            # the 3,000 test images (about 15 minutes on 2 cores)
    python benchmarks/strong_attack.py --quick    # the first 300 test images

Results go to ``docs/results/cifar10_strong_attack.json`` (not with ``--quick``). The last line
printed is one JSON line: per candidate ``{attack: {accuracy, robust_accuracy, nfr, rnfr}}`` and
``rnfr_change_worst_vs_paper``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcat.config import AttackConfig, parse_params, read_yaml
from rcat.data import Split, load_data_argument
from rcat.metrics import compare_outcomes
from rcat.models import load_model
from rcat.runtime import resolve_device
from rcat.safe_io import read_json, sha256_file, write_json
from rcat.stages.attacking import attack_model_on_splits

MODELS_JSON = ROOT / "docs" / "results" / "cifar10_models.json"
RECORDS = ROOT / "docs" / "results" / "cifar10_compare"
OUT = ROOT / "docs" / "results" / "cifar10_strong_attack.json"
FIGURES = ("accuracy_new", "robust_accuracy_new", "nfr", "rnfr")


def strong_attack(paper: AttackConfig, preset: str | None) -> AttackConfig:
    """APGD-CE-50 then APGD-DLR-50 at the paper attack's eps (or the named preset)."""
    if preset is not None:
        return AttackConfig(preset=preset, eps=paper.eps, batch_size=paper.batch_size)
    members = [AttackConfig(name="apgd", loss=loss, steps=50, restarts=1, eps=paper.eps, batch_size=paper.batch_size) for loss in ("ce", "dlr")]
    return AttackConfig(ensemble=members, eps=paper.eps, batch_size=paper.batch_size)


def worst_case(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """``first`` with ``robust`` true only where both runs left the sample robust (same samples, same order)."""
    if not (first["sample_index"].to_numpy() == second["sample_index"].to_numpy()).all():
        raise SystemExit("the two runs cover different samples")
    return first.assign(robust=first["robust"].to_numpy() & second["robust"].to_numpy())


def figures(metrics: dict[str, Any]) -> dict[str, float]:
    return {key.removesuffix("_new"): round(float(metrics[key]), 4) for key in FIGURES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first 300 test images only (results not saved)")
    parser.add_argument("--attack", choices=["autoattack-standard"], help="the strong attack: this preset instead of APGD-CE then APGD-DLR")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    listing = read_json(MODELS_JSON)
    params_path = ROOT / listing["params"]
    raw = read_yaml(params_path)
    source = str(raw["data"]["source"]).removeprefix("imagefolder:")
    if not (ROOT / source).is_dir():
        print(f"skipped: needs the CIFAR-10 training split in {ROOT / source}")
        print(json.dumps({"skipped": True}))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the profile's data source and cache_dir are relative to the repository root
    params = parse_params(raw, str(params_path))
    seed = int(listing["seed"])
    device = resolve_device(params.device)
    split = load_data_argument(f"imagefolder:{source}", params.data, seed, "test")
    if args.quick:
        split = Split(split.name, split.images[:300], split.labels[:300], split.sample_index[:300], split.num_classes, split.source)
    models = {}
    for name, entry in listing["models"].items():
        path = ROOT / entry["file"]
        if sha256_file(path) != entry["sha256"]:
            raise SystemExit(f"{path}: SHA-256 differs from {MODELS_JSON}; restore the committed file")
        models[name] = load_model(path, device)
    paper = params.attack
    strong = strong_attack(paper, args.attack)
    print(f"seed {seed}, {len(split):,} test images, models {', '.join(models)}; paper attack {paper.label()}; strong attack {strong.label()}", flush=True)
    outcomes: dict[str, dict[str, pd.DataFrame]] = {}
    seconds: dict[str, float] = {}
    for name, model in models.items():
        began = time.perf_counter()
        runs = {label: attack_model_on_splits(model, name, {"test": split}, attack, params.seed, device, params.engine).reset_index(drop=True)
                for label, attack in (("paper", paper), ("strong", strong))}
        runs["worst"] = worst_case(runs["paper"], runs["strong"])
        outcomes[name] = runs
        seconds[name] = round(time.perf_counter() - began, 1)
        print(f"{name}: robust accuracy paper {runs['paper']['robust'].mean():.4f}, strong {runs['strong']['robust'].mean():.4f}, "
              f"worst {runs['worst']['robust'].mean():.4f} ({seconds[name]:.0f} s)", flush=True)
    result: dict[str, Any] = {"seed": seed, "n_samples": len(split), "paper_attack": paper.label(), "strong_attack": strong.label(),
                              "seconds": seconds, "candidates": {}}
    print("\n| candidate | attack | clean acc | robust acc | NFR | RNFR |\n|---|---|---|---|---|---|")
    for name in models:
        if name == "old":
            continue
        entry: dict[str, Any] = {}
        for label in ("paper", "strong", "worst"):
            metrics, _ = compare_outcomes(outcomes["old"][label], outcomes[name][label])
            entry[label] = figures(metrics)
            print(f"| {name} | {label} | " + " | ".join(f"{100 * entry[label][k]:.1f}" for k in ("accuracy", "robust_accuracy", "nfr", "rnfr")) + " |")
        entry["rnfr_change_worst_vs_paper"] = round(entry["worst"]["rnfr"] - entry["paper"]["rnfr"], 4)
        record_path = RECORDS / f"seed-{seed}" / ("new.json" if name == "new" else f"{name}.json")
        if not args.quick and record_path.is_file():
            recorded = figures(read_json(record_path)["test"])
            entry["paper_reproduces_table"] = recorded == entry["paper"]
        result["candidates"][name] = entry
    result["old"] = {label: round(float(outcomes["old"][label]["robust"].mean()), 4) for label in ("paper", "strong", "worst")}
    if not args.quick:
        reproduced = [entry.get("paper_reproduces_table") for entry in result["candidates"].values()]
        print(f"\nthe paper attack's figures equal the committed table's: {'yes' if all(reproduced) else 'NO: ' + str(reproduced)}")
        write_json(OUT, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
