"""A fine-tuning grid on 2 worker processes against 1 process with 2 threads: time and selection, in one run.

The committed CIFAR-10 pair (``docs/results/models/cifar10_pair/seed-0``) imported into a pipeline
on a class-balanced subsample of the CIFAR-10 training JPEGs; a four-point RCAT grid (the new-error
term on the attack cache's set at four strengths); ``finetune_method`` run twice on the same
prepared project: ``engine.workers: 1`` with 2 torch threads, then ``engine.workers: 2`` (one
thread per worker). Each grid point fine-tunes and is attacked on validation (APGD-DLR-50, 4/255).
``grid_2w_vs_1proc_2threads`` is the serial wall time over the 2-worker one (target >= 1.3);
``same_selection`` says whether both kept the same point. Weights are compared too, but are
bit-identical only at equal thread counts (oneDNN's reductions), so ``same_weights`` may be false
while the selection holds.

    python benchmarks/grid_scaleout.py --quick   # 600 images, about 3 minutes on 2 cores
    python benchmarks/grid_scaleout.py           # 2,000 images

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attack_throughput import CIFAR_DIR
from attack_throughput import PAIR_DIR as PAIR


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import torch

    from rcat import pipeline
    from rcat.config import parse_params, read_yaml
    from rcat.safe_io import read_json, sha256_file

    if not (PAIR / "new.safetensors").is_file() or not CIFAR_DIR.is_dir():
        print(json.dumps({"skipped": f"needs {PAIR} and {CIFAR_DIR}"}))
        return 0
    per_class = 60 if args.quick else 200
    raw = read_yaml(ROOT / "benchmarks" / "profiles" / "cifar10_compare.yaml")
    with tempfile.TemporaryDirectory(prefix="rcat-grid-") as tmp:
        work = Path(tmp)
        folder = work / "cifar-subsample"
        for class_dir in sorted(p for p in CIFAR_DIR.iterdir() if p.is_dir()):
            (folder / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                (folder / class_dir.name / image.name).symlink_to(image)
        raw["data"].update(source=f"imagefolder:{folder}", finetune_fraction=0.6, validation_fraction=0.2, test_fraction=0.2)
        raw["train_old"] = {"reference": str(PAIR / "old.safetensors")}
        raw["train_new"] = {"reference": str(PAIR / "new.safetensors")}
        raw["engine"].update(cache_dir=str(work / "cache"), chunk_size=500)
        raw["finetune"].update(epochs=1, methods={"grid": {"loss": "rcat", "constraint_set": "attack_cache", "constraint_term": "new_error",
                                                           "grid": [{"alpha": 0.0, "beta": b} for b in (0.2, 0.4, 0.6, 0.8)]}})
        params = parse_params(raw, "grid benchmark params")
        layout = pipeline.Layout(work / "data")
        pipeline.prepare(params, layout)
        for role in ("old", "new"):
            pipeline.train(params, role, layout)
        pipeline.attack_cache(params, layout)
        n = read_json(layout.manifest)["splits"]["finetune"]["n_samples"]
        print(f"{n} fine-tune images, {read_json(layout.manifest)['splits']['validation']['n_samples']} validation; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        results = {}
        for label, workers, threads in (("serial, 2 threads", 1, 2), ("2 workers", 2, 1)):
            torch.set_num_threads(threads)
            raw["engine"]["workers"] = workers
            raw["engine"]["cache_dir"] = str(work / f"cache-{workers}")  # the validation attacks are not reused across the two
            run_params = parse_params(raw, "grid benchmark params")
            begin = time.perf_counter()
            pipeline.finetune_method(run_params, "grid", layout)
            seconds = time.perf_counter() - begin
            history = read_json(layout.finetune_history("grid"))
            results[label] = {"seconds": seconds, "selected": [p["selected"] for p in history["grid"]].index(True),
                              "sha256": sha256_file(layout.finetuned("grid")), "snfr": [p["validation"]["snfr"] for p in history["grid"]]}
            print(f"  {label}: {seconds:.1f} s, kept point {results[label]['selected']}, validation S-NFR {results[label]['snfr']}", flush=True)
        torch.set_num_threads(2)
    serial, parallel = results["serial, 2 threads"], results["2 workers"]
    print(json.dumps({"grid_2w_vs_1proc_2threads": round(serial["seconds"] / parallel["seconds"], 3), "serial_s": round(serial["seconds"], 1),
                      "two_workers_s": round(parallel["seconds"], 1), "same_selection": serial["selected"] == parallel["selected"],
                      "same_weights": serial["sha256"] == parallel["sha256"], "points": 4, "fine_tune_images": n,
                      "load_avg_1m_end": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
