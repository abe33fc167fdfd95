"""Wall time of each stage of the default pipeline, from scratch, on this machine.

Copies the project (code, dvc.yaml, params.yaml) into a temporary git + DVC repository, then
runs every stage once with ``dvc repro --single-item <stage>`` in pipeline order, timing each,
and finally a whole ``dvc repro`` (expected: nothing to do). Prints a markdown table and, last,
one JSON line with the figures.

    python benchmarks/stage_times.py            # the repo's params.yaml (the default pipeline)
    python benchmarks/stage_times.py --params other.yaml
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args()
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="rcat-bench-") as tmp:
        work = Path(tmp)
        for name in ("stages", "rcat"):
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
        shutil.copy(args.params, work / "params.yaml")
        (work / "data").mkdir()
        for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
            subprocess.run(command, cwd=work, check=True, env=env)
        methods = list(yaml.safe_load((work / "params.yaml").read_text())["finetune"]["methods"])
        order = ["prepare", "train_old", "train_new", "attack_cache", *(f"finetune@{m}" for m in methods), *(f"evaluate@{m}" for m in methods), "decide"]
        times: dict[str, float] = {}
        for stage in order:
            start = time.perf_counter()
            subprocess.run(["dvc", "repro", "--single-item", stage], cwd=work, check=True, env=env, capture_output=True)
            times[stage] = time.perf_counter() - start
        start = time.perf_counter()
        again = subprocess.run(["dvc", "repro"], cwd=work, check=True, env=env, capture_output=True, text=True).stdout
        noop = time.perf_counter() - start
        decision = json.loads((work / "data/decide/decision.json").read_text())
        rows = list(csv.DictReader((work / "data/decide/tradeoff.csv").open()))
    total = sum(times.values())
    print(f"CPU threads: {torch.get_num_threads()}, torch {torch.__version__}")
    print("| stage | wall time (s) |\n|---|---|")
    for stage, seconds in times.items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| **all stages** | **{total:.1f}** |")
    print(f"| second `dvc repro` (nothing to do: {'up to date' in again}) | {noop:.1f} |")
    print(f"\ndecision: {decision['verdict']} {decision['candidate'] or ''}\n")
    print("| candidate | split | accuracy | robust accuracy | NFR | RNFR | S-NFR |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join([row["candidate"], row["split"], *(f"{float(row[k]):.4f}" for k in ("accuracy", "robust_accuracy", "nfr", "rnfr", "snfr"))]) + " |")
    print(json.dumps({"stages_s": {k: round(v, 2) for k, v in times.items()}, "total_s": round(total, 1), "noop_repro_s": round(noop, 1),
                      "noop_up_to_date": "up to date" in again, "verdict": decision["verdict"], "candidate": decision["candidate"]}))


if __name__ == "__main__":
    main()
