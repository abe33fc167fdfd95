"""Peak memory of the attack engine on the whole CIFAR-10 training set (50,000 JPEG images).

Reads /work/shared/data/cifar10-jpeg/train (or --data DIR) with
``rcat.data.load_dataset("imagefolder:...")``, as the pipeline does, trains a small CNN (16-32
channels) for one epoch on 10,000 of the images (so that clean mistakes exist in realistic
proportion), then attacks every image with the engine (``rcat.engine.run_attack``, fresh cache,
in process) with a cheap attack (FGSM, eps 8/255: the point is memory, not strength).

Reports the peak resident set size of this process (``VmHWM``, :func:`peak_mb`) after
each phase, the wall time of each phase and the load average of the machine. Exits 0 with
``{"skipped": ...}`` when the data folder is absent.

    python benchmarks/attack_memory.py              # about 1.5 minutes on 2 idle cores

Prints the figures as one JSON line, last (``peak_rss_mb_50k`` is the whole run's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

CIFAR_DIR = Path("/work/shared/data/cifar10-jpeg/train")


def peak_mb() -> float:
    """This process's peak RSS: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own memory.

    Not ``ru_maxrss``: Linux carries it over fork and exec, so a child started by a 2.8 GB parent (``attack_throughput.py
    --memory``) reported 2,784 MB for a run that peaks far lower (measured 2026-12-07). ``ru_maxrss`` where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    from rcat.heap import resident_bytes

    return (resident_bytes() or 0) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=CIFAR_DIR, help="an image folder (class sub-folders)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="engine.chunk_size (the params' default)")
    parser.add_argument("--batch-size", type=int, default=256, help="attack.batch_size")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"{args.data} not found: nothing to measure")
        print(json.dumps({"skipped": f"{args.data} not found", "peak_rss_mb_50k": None}))
        return 0

    import torch

    from rcat.config import AttackConfig
    from rcat.data import load_dataset
    from rcat.engine import run_attack, summary_of
    from rcat.models import ModelSpec
    from rcat.pixels import as_float_images

    figures: dict[str, float | int | str | None] = {"load_avg_start": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads()}
    figures["rss_after_imports_mb"] = round(current_mb(), 1)
    began = time.perf_counter()
    dataset = load_dataset(f"imagefolder:{args.data}")
    figures["load_seconds"] = round(time.perf_counter() - began, 1)
    figures["peak_rss_after_load_mb"] = round(peak_mb(), 1)
    n = len(dataset.labels)
    print(f"data: {n} images {tuple(dataset.images.shape[1:])} from {args.data}, decoded in {figures['load_seconds']} s; "
          f"peak RSS {figures['peak_rss_after_load_mb']} MB", flush=True)

    torch.manual_seed(0)
    network = ModelSpec("cnn", tuple(dataset.images.shape[1:]), dataset.num_classes, {"channels": [16, 32], "hidden": 64}).build()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:10_000]
    began = time.perf_counter()
    network.train()
    for start in range(0, len(subset), 64):
        batch = subset[start : start + 64]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(as_float_images(dataset.images[batch])), dataset.labels[batch]).backward()
        optimizer.step()
    network.eval()
    figures["train_seconds"] = round(time.perf_counter() - began, 1)
    figures["peak_rss_after_train_mb"] = round(peak_mb(), 1)
    figures["rss_before_attack_mb"] = round(current_mb(), 1)

    config = AttackConfig(name="fgsm", loss="ce", eps=8 / 255, batch_size=args.batch_size)
    split = (dataset.images, dataset.labels, torch.arange(n))
    provenance = {"split": "train", "model": "cnn", "model_digest": "-", "split_digest": "-"}
    with tempfile.TemporaryDirectory(prefix="rcat-memory-") as cache:
        figures["load_avg_before_attack"] = round(os.getloadavg()[0], 2)
        began = time.perf_counter()
        frame = run_attack(network, split, config, num_classes=dataset.num_classes, seed=0, provenance=provenance, cache_dir=cache,
                           chunk_size=args.chunk_size, progress=None)
        figures["attack_seconds"] = round(time.perf_counter() - began, 1)
    summary = summary_of(frame)
    figures.update({"samples": n, "samples_per_s": round(summary.samples_per_second, 1), "robust_accuracy": round(summary.robust_accuracy, 4),
                    "clean_accuracy": round(summary.clean_accuracy, 4), "chunks": summary.chunks})
    figures["peak_rss_mb_50k"] = round(peak_mb(), 1)
    figures["load_avg_end"] = round(os.getloadavg()[0], 2)
    print(f"attack {config.label()} on {n} images, chunk {args.chunk_size}: {figures['attack_seconds']} s "
          f"({figures['samples_per_s']} samples/s); clean accuracy {figures['clean_accuracy']}, robust accuracy {figures['robust_accuracy']}", flush=True)
    print(f"peak RSS {figures['peak_rss_mb_50k']} MB (limit 1500 MB); load average {figures['load_avg_start']} at start, "
          f"{figures['load_avg_end']} at the end", flush=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
