"""Peak memory of ``rcat evaluate`` on 10,000 and on 50,000 CIFAR-10 images: it must grow by the images alone.

Each size is a folder of symbolic links to the first N images of the CIFAR-10 training split
(class-balanced; the files themselves are never copied), evaluated by the real command line in a
process of its own, with the committed realistic pair (``docs/results/models/cifar10_pair/seed-0``)
and FGSM at 4/255 (the memory question does not depend on the attack's strength; FGSM keeps the
50,000-image run to minutes on 2 cores). The peak resident set size of each ``rcat evaluate``
process is read from the kernel (``getrusage`` of the waited child, in a wrapper process per run).

The target (issue 16): the difference between the two peaks is at most the size of the extra
images in uint8 plus 20%, i.e. ``(n_large - n_small) * 3 * 32 * 32`` bytes * 1.2.

    python benchmarks/evaluate_memory.py            # 10,000 and 50,000 images (about 10 minutes on 2 cores)
    python benchmarks/evaluate_memory.py --quick    # 2,000 and 10,000 images
    python benchmarks/evaluate_memory.py --chunks 6000 [--mmap-threshold 1048576] [--caches torch]   # where the peak grows: per chunk, in process

``--chunks N`` attacks the pair's old model on N images in this process and prints, after each
chunk of the engine, the resident size, the bytes malloc has handed out and not had back (live
C heap, ``mallinfo2().uordblks``) and the peak so far; ``--mmap-threshold BYTES`` first fixes
glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``, so large blocks are mapped and returned on
free rather than served from a fragmenting heap); ``--caches bounded`` (the default, as every rcat
entry point does: :func:`rcat.heap.bound_shape_caches`) or ``torch`` (torch's own capacities of its
per-shape convolution caches, 1,024 each) is set before the first convolution.

The last line printed is one JSON line: ``peak_rss_mb_small``, ``peak_rss_mb_large``,
``difference_mb``, ``allowed_mb``, ``target_met`` and the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "train"
PAIR_DIR = ROOT / "docs" / "results" / "models" / "cifar10_pair" / "seed-0"
IMAGE_BYTES = 3 * 32 * 32
"""One CIFAR-10 image in uint8."""
ALLOWED_GROWTH = 1.2

WRAPPER = """
import json, resource, subprocess, sys
process = subprocess.run(sys.argv[1:], capture_output=True, text=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"returncode": process.returncode, "max_rss_kb": usage.ru_maxrss, "stdout": process.stdout[-4000:], "stderr": process.stderr[-4000:]}))
"""
"""Runs one command and reports its peak RSS: RUSAGE_CHILDREN of a process that waited for that one child only."""


def linked_folder(destination: Path, n: int) -> Path:
    """``destination/<class>/<file>`` symbolic links to the first ``n / classes`` files of every CIFAR-10 class (sorted)."""
    classes = sorted(entry.name for entry in CIFAR_DIR.iterdir() if entry.is_dir())
    per_class = n // len(classes)
    for name in classes:
        (destination / name).mkdir(parents=True)
        files = sorted(path for path in (CIFAR_DIR / name).iterdir() if path.is_file())[:per_class]
        if len(files) < per_class:
            sys.exit(f"{CIFAR_DIR / name}: {len(files)} images, {per_class} needed")
        for file in files:
            (destination / name / file.name).symlink_to(file)
    return destination


def evaluate_peak(n: int, scratch: Path) -> dict:
    """``rcat evaluate`` on ``n`` images in its own process; its peak RSS, wall time and result."""
    folder = linked_folder(scratch / f"images-{n}", n)
    params = scratch / f"params-{n}.yaml"
    params.write_text(f"engine:\n  cache_dir: {scratch / f'cache-{n}'}\n  progress: false\ntracking:\n  enabled: false\n"
                      "finetune:\n  methods:\n    at: {loss: at}\n", encoding="utf-8")
    rcat = str(Path(sys.executable).parent / "rcat")
    command = [rcat, "evaluate", "--old", str(PAIR_DIR / "old.safetensors"), "--new", str(PAIR_DIR / "new.safetensors"),
               "--data", f"imagefolder:{folder}", "--split", "all", "--attack", "fgsm", "--eps", "4/255", "--device", "cpu",
               "--params", str(params), "--out", str(scratch / f"out-{n}"), "--json"]
    began = time.perf_counter()
    wrapped = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - began
    report = json.loads(wrapped.stdout.strip().splitlines()[-1])
    if report["returncode"] != 0:
        sys.exit(f"rcat evaluate on {n} images failed ({report['returncode']}): {report['stderr']}")
    result = json.loads(report["stdout"].strip().splitlines()[-1])
    peak_mb = report["max_rss_kb"] / 1024  # Linux reports ru_maxrss in KiB
    print(f"{n} images: peak RSS {peak_mb:.1f} MB, {seconds:.0f} s; robust accuracy old {result.get('robust_accuracy_old'):.4f} "
          f"new {result.get('robust_accuracy_new'):.4f}, n_samples {result.get('n_samples')}", flush=True)
    shutil.rmtree(scratch / f"cache-{n}", ignore_errors=True)
    return {"n": n, "peak_rss_mb": round(peak_mb, 1), "seconds": round(seconds, 1), "n_samples": result.get("n_samples")}


def chunk_probe(n: int, scratch: Path, mmap_threshold: int | None, caches: str = "bounded") -> dict:
    """Attack the old model on ``n`` images in this process; the resident size, live C heap and peak after each engine chunk."""
    import ctypes
    import resource

    from rcat.heap import SHAPE_CACHE_LIMITS, bound_shape_caches, heap_in_use_bytes, resident_bytes

    if caches == "bounded":
        in_effect = bound_shape_caches()
    else:  # torch's own capacities, whatever this environment says
        os.environ.update({name: "1024" for name in SHAPE_CACHE_LIMITS})
        in_effect = {name: os.environ[name] for name in SHAPE_CACHE_LIMITS}

    import torch

    import rcat.engine as engine
    from rcat.config import parse_params
    from rcat.data import load_data_argument
    from rcat.models import load_model
    from rcat.stages.attacking import attack_model_on_splits

    if mmap_threshold is not None:
        M_MMAP_THRESHOLD = -3  # glibc's malloc.h
        if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
            sys.exit("mallopt(M_MMAP_THRESHOLD) failed: not glibc?")

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    compute_chunk = engine.compute_chunk
    rows = []

    def measured(*args, **kwargs):
        result = compute_chunk(*args, **kwargs)
        in_use = heap_in_use_bytes()
        rows.append({"chunk": kwargs["index"], "resident_mb": round((resident_bytes() or 0) / 2**20, 1),
                     "heap_in_use_mb": round(in_use / 2**20, 1) if in_use is not None else None, "peak_mb": round(peak_mb(), 1)})
        print(f"chunk {kwargs['index']}: resident {rows[-1]['resident_mb']:.0f} MB, C heap in use {rows[-1]['heap_in_use_mb']} MB, "
              f"peak so far {rows[-1]['peak_mb']:.0f} MB", flush=True)
        return result

    engine.compute_chunk = measured  # serial executor: chunks run in this process, through this name
    params = parse_params({"engine": {"cache_dir": str(scratch / "cache"), "progress": False}, "tracking": {"enabled": False},
                           "finetune": {"methods": {"at": {"loss": "at"}}}, "attack": {"name": "fgsm", "loss": "ce", "eps": 4 / 255}})
    split = load_data_argument(f"imagefolder:{linked_folder(scratch / 'images', n)}", params.data, 0, "all")
    old = load_model(str(PAIR_DIR / "old.safetensors"), "cpu")
    began = time.perf_counter()
    attack_model_on_splits(old, "old", {"all": split}, params.attack, 0, torch.device("cpu"), params.engine)
    return {"n": n, "mmap_threshold": mmap_threshold, "caches": in_effect, "chunks": rows, "seconds": round(time.perf_counter() - began, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 and 10,000 images instead of 10,000 and 50,000")
    parser.add_argument("--sizes", type=int, nargs=2, metavar=("SMALL", "LARGE"), help="the two sizes (multiples of 10)")
    parser.add_argument("--chunks", type=int, metavar="N", help="instead: the per-chunk probe on N images (see above)")
    parser.add_argument("--mmap-threshold", type=int, metavar="BYTES", help="with --chunks: fix glibc's mmap threshold first")
    parser.add_argument("--caches", choices=("bounded", "torch"), default="bounded",
                        help="with --chunks: the per-shape convolution caches as rcat bounds them, or at torch's capacities")
    args = parser.parse_args()
    if not CIFAR_DIR.is_dir() or not (PAIR_DIR / "new.safetensors").is_file():
        print(f"skipped: needs {CIFAR_DIR} and the committed pair in {PAIR_DIR}")
        print(json.dumps({"skipped": True}))
        return 0
    if args.chunks:
        with tempfile.TemporaryDirectory(prefix="rcat-chunk-probe-") as scratch_name:
            probe = chunk_probe(args.chunks, Path(scratch_name), args.mmap_threshold, args.caches)
        first, last = probe["chunks"][0], probe["chunks"][-1]
        print(f"caches {probe['caches']}: {probe['seconds']} s; after the first chunk / the last: C heap in use {first['heap_in_use_mb']} / "
              f"{last['heap_in_use_mb']} MB, peak {first['peak_mb']:.0f} / {last['peak_mb']:.0f} MB")
        print(json.dumps(probe))
        return 0
    small, large = args.sizes or ((2_000, 10_000) if args.quick else (10_000, 50_000))
    print(f"rcat evaluate, FGSM at 4/255, the committed CIFAR-10 pair (seed 0), on {small:,} and {large:,} images; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rcat-evaluate-memory-") as scratch_name:
        scratch = Path(scratch_name)
        runs = [evaluate_peak(n, scratch) for n in (small, large)]
    difference = runs[1]["peak_rss_mb"] - runs[0]["peak_rss_mb"]
    allowed = (large - small) * IMAGE_BYTES * ALLOWED_GROWTH / 2**20
    print(f"difference {difference:.1f} MB; allowed {allowed:.1f} MB (the {large - small:,} extra images in uint8, "
          f"{(large - small) * IMAGE_BYTES / 2**20:.1f} MB, plus 20%): {'met' if difference <= allowed else 'NOT met'}")
    print(json.dumps({"n_small": small, "n_large": large, "peak_rss_mb_small": runs[0]["peak_rss_mb"], "peak_rss_mb_large": runs[1]["peak_rss_mb"],
                      "difference_mb": round(difference, 1), "allowed_mb": round(allowed, 1), "target_met": difference <= allowed,
                      "seconds": [run["seconds"] for run in runs], "load_avg_1m_end": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
