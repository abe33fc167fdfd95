"""Wall time of each stage of the default pipeline, from scratch, on this machine.

Copies the project (code, dvc.yaml, params.yaml) into a temporary git + DVC repository, then
runs every stage once with ``dvc repro --single-item <stage>`` in pipeline order, timing each,
and finally a whole ``dvc repro`` (expected: nothing to do). Then, in the same run: each stage's
script alone (its ``cmd`` without DVC, outputs already there: the stage's own cost), each stage
module's import (``python -c "import rcat.stages.<module>"``) and ``python -c "import torch"``
(median of 3 each), so the fixed cost of a stage reads against the cost of importing torch:
``stage_vs_import_torch`` per stage (the script alone over importing torch) and its median,
``median_stage_vs_import_torch``; ``dvc_overhead_s`` per stage is the DVC run minus the script
alone. Prints markdown tables and, last, one JSON line with the figures.

    python benchmarks/stage_times.py            # the repo's params.yaml (the default pipeline)
    python benchmarks/stage_times.py --params other.yaml
    python benchmarks/stage_times.py --quick    # one timing of each script, import and of torch (not the median of 3)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--quick", action="store_true", help="time each script and import once instead of the median of 3")
    args = parser.parse_args()
    repeats = 1 if args.quick else REPEATS
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="rcat-bench-") as tmp:
        work = Path(tmp)
        for name in ("stages", "rcat"):
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
        shutil.copy(ROOT / "rcat-champion.json", work / "rcat-champion.json")
        shutil.copy(args.params, work / "params.yaml")
        (work / "data").mkdir()
        for command in (["git", "init", "-q"], ["dvc", "init", "-q"]):
            subprocess.run(command, cwd=work, check=True, env=env)
        methods = list(yaml.safe_load((work / "params.yaml").read_text())["finetune"]["methods"])
        order = ["prepare", "train_old", "train_new", "attack_cache", *(f"finetune@{m}" for m in methods), *(f"evaluate@{m}" for m in methods), "decide"]
        # every other stage of dvc.yaml (the report), so that the last `dvc repro` has nothing left to do
        order += [name for name in yaml.safe_load((work / "dvc.yaml").read_text())["stages"] if name not in {s.split("@")[0] for s in order}]
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
        stages_yaml = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]

        def command(stage: str) -> list[str]:
            name, _, key = stage.partition("@")
            body = stages_yaml[name].get("do", stages_yaml[name])
            return body["cmd"].replace("${key}", key).split()

        def timed(argv: list[str]) -> float:
            runs = []
            for _ in range(repeats):
                begin = time.perf_counter()
                subprocess.run(argv, cwd=work, check=True, env=env, capture_output=True)
                runs.append(time.perf_counter() - begin)
            return statistics.median(runs)

        import_torch = timed([sys.executable, "-c", "import torch"])
        alone = {stage: timed([sys.executable if word == "python" else word for word in command(stage)]) for stage in order}
        module_of = {"prepare": "rcat.stages.prepare", "train_old": "rcat.stages.train", "train_new": "rcat.stages.train",
                     "attack_cache": "rcat.stages.attack_cache", "decide": "rcat.stages.decide", "report": "rcat.report"}
        imports = {stage: timed([sys.executable, "-c", f"import {module_of.get(stage.split('@')[0], 'rcat.stages.' + stage.split('@')[0])}"])
                   for stage in order}
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
    print(f"\nfixed costs (median of {repeats}): python -c 'import torch' {import_torch:.2f} s")
    print("| stage | script alone (s) | x import torch | module import (s) | DVC's share (s) |\n|---|---|---|---|---|")
    for stage in order:
        print(f"| {stage} | {alone[stage]:.2f} | {alone[stage] / import_torch:.2f} | {imports[stage]:.2f} | {times[stage] - alone[stage]:.2f} |")
    ratios = {stage: alone[stage] / import_torch for stage in order}
    print(json.dumps({"stages_s": {k: round(v, 2) for k, v in times.items()}, "total_s": round(total, 1), "noop_repro_s": round(noop, 1),
                      "noop_up_to_date": "up to date" in again, "verdict": decision["verdict"], "candidate": decision["candidate"],
                      "import_torch_s": round(import_torch, 3), "script_alone_s": {k: round(v, 2) for k, v in alone.items()},
                      "stage_import_s": {k: round(v, 3) for k, v in imports.items()},
                      "stage_vs_import_torch": {k: round(v, 3) for k, v in ratios.items()},
                      "median_stage_vs_import_torch": round(statistics.median(ratios.values()), 3),
                      "dvc_overhead_s": {k: round(times[k] - alone[k], 2) for k in order},
                      "sum_script_alone_s": round(sum(alone.values()), 1), "repeats": repeats}))


if __name__ == "__main__":
    main()
