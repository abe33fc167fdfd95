"""What RCAT's extra forwards cost: one fine-tuning epoch of RCAT against one of AT, same data, same model, one run.

RCAT's loss needs, per step, the logits of the old model and of the frozen pre-update new model on
the adversarial batch (two forwards without gradients) on top of what AT does (the training
attack's forward-backward and the update's forward-backward). The limit asked (issue 16) is
``rcat_epoch_vs_at_epoch <= 1.35``. The models are the committed CIFAR-10 pair
(``docs/results/models/cifar10_pair/seed-0/``: ResNet-8 old, ResNet-14 new), the data real CIFAR-10
training images (the first ``n / 10`` per class of ``/work/shared/data/cifar10-jpeg/train``),
fine-tuning as the comparison profile does (FGSM-RS at 4/255, batch 128, crop-and-flip). AT and
RCAT alternate ``--rounds`` times; the figure is the median of the rounds' ratios.

    python benchmarks/rcat_overhead.py --quick    # 1,024 images, 1 round: about a minute on 2 cores
    python benchmarks/rcat_overhead.py            # 4,096 images, 3 rounds

Prints one JSON line last: ``at_epoch_s``, ``rcat_epoch_s`` (medians), ``rcat_epoch_vs_at_epoch``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch
    from attack_throughput import load_data

    from rcat.config import AttackConfig, FinetuneConfig, MethodConfig
    from rcat.data import Split
    from rcat.finetune import finetune
    from rcat.models import load_model

    if not (PAIR / "new.safetensors").is_file() or not CIFAR_DIR.is_dir():
        print(json.dumps({"skipped": f"needs {PAIR} and {CIFAR_DIR}"}))
        return 0
    n, rounds = (1024, 1) if args.quick else (4096, args.rounds)
    with tempfile.TemporaryDirectory(prefix="rcat-overhead-") as tmp:
        images, labels, note = load_data(n // 10 + 1, Path(tmp))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n]  # the folder is sorted by class
    images, labels = images[order].contiguous(), labels[order].contiguous()
    split = Split("finetune", images, labels, torch.arange(n), 10, "cifar10")
    old, new = load_model(PAIR / "old.safetensors", "cpu"), load_model(PAIR / "new.safetensors", "cpu")
    config = FinetuneConfig(epochs=1, lr=0.01, batch_size=128, augment="crop_flip", attack=AttackConfig(name="fgsm_rs", loss="ce", eps=4 / 255),
                            methods={"at": MethodConfig(loss="at")})
    methods = {"at": MethodConfig(loss="at"), "rcat": MethodConfig(loss="rcat", alpha=0.5, beta=0.4)}
    print(f"data: {note}, the first {n}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    finetune(new.network, old.network, Split("warm", images[:128], labels[:128], torch.arange(128), 10, "x"), config, methods["at"], torch.device("cpu"))
    times: dict[str, list[float]] = {"at": [], "rcat": []}
    for _ in range(rounds):
        for name, method in methods.items():
            begin = time.perf_counter()
            finetune(new.network, old.network, split, config, method, torch.device("cpu"))
            times[name].append(time.perf_counter() - begin)
            print(f"  {name}: {times[name][-1]:.1f} s for one epoch of {n} images", flush=True)
    ratios = [r / a for a, r in zip(times["at"], times["rcat"], strict=True)]
    figures = {"at_epoch_s": round(statistics.median(times["at"]), 2), "rcat_epoch_s": round(statistics.median(times["rcat"]), 2),
               "rcat_epoch_vs_at_epoch": round(statistics.median(ratios), 3), "n_images": n, "rounds": rounds,
               "load_avg_1m_end": round(os.getloadavg()[0], 2)}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
