"""Throughput of the attack engine (rcat/engine.py) against a plain torchattacks loop, in one process.

Same small CNN, same CIFAR-size data (3x32x32), same attacks:

* ``ratio_vs_plain``: on the samples the CNN classifies correctly (so that no sample is
  misclassified on clean input and both attack every sample), the engine (first, uncached run:
  chunking, shards, manifest) against a plain loop over batches (torchattacks, then the
  predictions): > 1 is faster, ~1 means the engine's bookkeeping costs nothing measurable;
* ``ratio_vs_plain_realistic``: the engine running an ensemble the way it does (clean mistakes
  not attacked, each next attack only on samples still robust) against the plain loop running
  every attack on every sample;
* ``scaleout_2w_vs_1w``: the engine with 2 local worker processes (``engine.workers: 2``, a warm
  pool kept for the round, one torch thread each; ``scaleout_2w_cold_vs_1w`` with the pool started
  per run) against 1 worker (in process, one torch thread); ``scaleout_dask_2w_vs_1w`` (with
  ``--dask``): 2 workers of an existing local Dask cluster reached through ``dask_address``;
* ``scaleout_2w_vs_1proc_2threads``: the same 2 workers against one process using both cores
  (2 torch threads, in process); the two alternate ``--rounds`` times (default 3) and the figure is
  the median of the rounds' ratios (the machine drifts by several percent within minutes: each
  round compares neighbours); ``scaleout_2w_vs_1w`` uses the median 2-worker time;
* ``cached_rerun_fraction``: wall time of a rerun with the same inputs over the first run's;
  ``peak_rss_mb``: this process's peak resident set size (resource.getrusage; workers are
  separate processes and not included);
* ``ratio_vs_plain_realistic_single``, ``ratio_cascade_vs_plain``, ``cascade_extra_robust``,
  ``seed_noise_robust`` (section d, when the committed CIFAR-10 pair and the images are present):
  the pair's new model on real CIFAR-10 images with the paper's APGD-DLR-50 at 4/255. A plain
  torchattacks loop as a user writes it (its APGD attacks only the clean-correct samples by
  itself) against the engine with the same attack, and against the ``cascade`` preset (APGD-CE-10
  first, APGD-DLR-50 on what survives); the samples robust under the cascade but broken by the
  full attack alone; and, for scale, the samples whose verdict differs between two seeds of the
  full attack;
* ``peak_rss_mb_50k`` (with ``--memory``): the peak RSS of ``benchmarks/attack_memory.py`` (the
  engine on all 50,000 CIFAR-10 training images, FGSM), run as a separate process.

Before timing, one batch goes through the engine and through the plain loop (imports, oneDNN
primitives, pyarrow's first write: one-time costs of a process, not of a run). ``--quick``
repeats each single-attack timing 3 times, alternating, and keeps the fastest of each (its
runs last well under a second, so one run is mostly noise on a shared machine). Load averages
are printed with the figures: the machine has 2 cores, and other work on it skews every figure.

Data: a class-balanced subsample of real CIFAR-10 images read with
``rcat.data.load_dataset("imagefolder:...")`` from /work/shared/data/cifar10-jpeg/train when
present (the folder is linked into a temporary directory, so only the subsample is decoded),
otherwise seeded random images (the output says which). The CNN is trained clean for a few
epochs first, so that clean mistakes exist in realistic proportion.

    python benchmarks/attack_throughput.py --quick   # about a minute
    python benchmarks/attack_throughput.py           # larger sample, longer attacks
    python benchmarks/attack_throughput.py --memory  # also the 50,000-image memory run

Prints the figures as one JSON line, last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CIFAR_DIR = Path("/work/shared/data/cifar10-jpeg/train")


def load_data(per_class: int, workdir: Path):
    import torch

    from rcat.data import load_dataset
    from rcat.pixels import as_float_images

    if CIFAR_DIR.is_dir():
        folder = workdir / "cifar-subsample"
        for class_dir in sorted(p for p in CIFAR_DIR.iterdir() if p.is_dir()):
            target = folder / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                (target / image.name).symlink_to(image)
        dataset = load_dataset(f"imagefolder:{folder}")
        return as_float_images(dataset.images), dataset.labels, f"CIFAR-10 JPEG, {len(dataset.labels)} real images ({per_class} per class) from {CIFAR_DIR}"
    generator = torch.Generator().manual_seed(0)
    n = per_class * 10
    images = torch.rand(n, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return images, labels, f"random data ({n} images 3x32x32; {CIFAR_DIR} not found)"


def train(network, images, labels, epochs: int) -> None:
    import torch

    torch.manual_seed(0)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    network.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(network(images[batch]), labels[batch]).backward()
            optimizer.step()
    network.eval()


def plain_loop(network, images, labels, configs, batch_size: int, seed: int, *, skip_mistakes: bool) -> float:
    """A plain torchattacks loop over batches; returns its wall time. Every attack on every sample
    (``skip_mistakes=False``), or only on clean-correct samples (the engine's work for one attack)."""
    import torch

    from rcat.attacks import build_attack

    attacks = [build_attack(network, config, 10, seed=seed) for config in configs]
    begin = time.perf_counter()
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        with torch.no_grad():
            correct = network(x).argmax(1) == y
        for attack in attacks:
            if skip_mistakes:
                x_adv = x.clone()
                if correct.any():
                    x_adv[correct] = attack(x[correct], y[correct])
            else:
                x_adv = attack(x, y)
            with torch.no_grad():
                network(x_adv).argmax(1)
    return time.perf_counter() - begin


def timed_engine(network, split, config, cache_dir: Path, chunk_size: int, seed: int, **kwargs):
    from rcat.engine import run_attack

    provenance = {"split": "bench", "model": "cnn", "model_digest": "-", "split_digest": "-"}
    begin = time.perf_counter()
    frame = run_attack(network, split, config, num_classes=10, seed=seed, provenance=provenance, cache_dir=cache_dir, chunk_size=chunk_size, **kwargs)
    return time.perf_counter() - begin, frame


PAIR_DIR = Path(__file__).resolve().parents[1] / "docs" / "results" / "models" / "cifar10_pair" / "seed-0"
"""The committed CIFAR-10 pair, seed 0 (benchmarks/train_pair.py): old.safetensors, new.safetensors."""
REALISTIC_MODEL = PAIR_DIR / "new.safetensors"
"""The realistic model of section (d): the committed CIFAR-10 pair's new model (benchmarks/train_pair.py)."""


def realistic_comparison(quick: bool, workdir: Path, seed: int, n: int | None = None) -> dict:
    """Section (d): plain loop vs engine vs cascade on the committed CIFAR-10 model; seed noise of the full attack."""
    import torch

    from rcat.config import AttackConfig
    from rcat.models import load_model

    n, batch = (n, n // 2) if n else ((500, 250) if quick else (2000, 500))
    model = load_model(REALISTIC_MODEL, "cpu")
    images, labels, note = load_data(n // 10, workdir / "realistic")
    images, labels = images[:n].contiguous(), labels[:n].contiguous()
    network, eps = model.network.eval(), 4 / 255
    full = AttackConfig(name="apgd", loss="dlr", eps=eps, steps=50, batch_size=batch)
    cascade = full.model_copy(update={"preset": "cascade"})
    split = (images, labels, torch.arange(n))

    def plain() -> tuple[float, torch.Tensor]:
        import torchattacks

        attack = torchattacks.APGD(network, norm="Linf", eps=eps, steps=50, n_restarts=1, loss="dlr", seed=seed)
        robust = []
        begin = time.perf_counter()
        for start in range(0, n, batch):
            x, y = images[start : start + batch], labels[start : start + batch]
            x_adv = attack(x, y)
            with torch.no_grad():
                robust.append(network(x_adv).argmax(1) == y)
        return time.perf_counter() - begin, torch.cat(robust)

    fresh = iter(range(1_000))
    plain(), timed_engine(network, tuple(part[:batch] for part in split), full, workdir / "cache-r-warm", batch, seed)  # one-time costs
    (plain_s, plain_robust), (engine_s, engine_frame), (cascade_s, cascade_frame) = best_of(
        1 if quick else 2, plain,
        lambda: timed_engine(network, split, full, workdir / f"cache-r-{next(fresh)}", 2 * batch, seed),
        lambda: timed_engine(network, split, cascade, workdir / f"cache-r-{next(fresh)}", 2 * batch, seed),
    )
    _, other_seed = timed_engine(network, split, full, workdir / "cache-r-seed1", 2 * batch, seed + 1)
    full_robust, cascade_robust, seed1_robust = (frame["robust"].to_numpy() for frame in (engine_frame, cascade_frame, other_seed))
    extra = int((cascade_robust & ~full_robust).sum())
    noise = int((seed1_robust & ~full_robust).sum() + (full_robust & ~seed1_robust).sum())
    print(f"realistic: the committed CIFAR-10 new model ({REALISTIC_MODEL.name}, {note}), {n} images, clean accuracy "
          f"{engine_frame['clean_correct'].mean():.3f}, {full.label()} in batches of {batch} ({load()}):", flush=True)
    print(f"  plain torchattacks loop:  {plain_s:.2f} s, robust accuracy {float(plain_robust.float().mean()):.3f}")
    print(f"  engine, same attack:      {engine_s:.2f} s, robust accuracy {full_robust.mean():.3f} -> {plain_s / engine_s:.3f}x plain")
    print(f"  engine, cascade preset:   {cascade_s:.2f} s, robust accuracy {cascade_robust.mean():.3f} -> {plain_s / cascade_s:.3f}x plain; "
          f"broken by {cascade_frame['broken_by'].replace('', 'none').value_counts().to_dict()}")
    print(f"  robust under the cascade but broken by the full attack alone: {extra}; samples whose verdict changes between "
          f"attack seeds {seed} and {seed + 1} (full attack): {noise}", flush=True)
    return {"ratio_vs_plain_realistic_single": round(plain_s / engine_s, 3), "ratio_cascade_vs_plain": round(plain_s / cascade_s, 3),
            "cascade_extra_robust": extra, "seed_noise_robust": noise, "realistic_n": n,
            "realistic_robust_full": round(float(full_robust.mean()), 4), "realistic_robust_cascade": round(float(cascade_robust.mean()), 4)}


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def best_of(repeat: int, *runs):
    """Run each callable ``repeat`` times, alternating; the fastest (seconds, result) of each."""
    best: list = [None] * len(runs)
    for _ in range(repeat):
        for i, run in enumerate(runs):
            seconds, result = run()
            if best[i] is None or seconds < best[i][0]:
                best[i] = (seconds, result)
    return best


def memory_run() -> float | None:
    """Peak RSS (MB) of benchmarks/attack_memory.py, run as a separate process (None if skipped)."""
    script = Path(__file__).with_name("attack_memory.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    print(done.stdout.rstrip(), flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1]).get("peak_rss_mb_50k")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sample and short attacks: finishes within a minute")
    parser.add_argument("--no-workers", action="store_true", help="skip the 2-worker scale-out measurement")
    parser.add_argument("--dask", action="store_true", help="also time 2 workers of an existing Dask cluster (started here, excluded)")
    parser.add_argument("--realistic", action=argparse.BooleanOptionalAction, default=True,
                        help="the committed CIFAR-10 model: plain loop vs engine vs cascade, and seed noise (default on when present)")
    parser.add_argument("--skip-ensemble", action="store_true", help="skip the ensemble comparison (ratio_vs_plain_realistic: null)")
    parser.add_argument("--only-scaleout", action="store_true", help="only the scale-out figures (the others: null); 1-thread runs "
                        "suffer less than 2-thread ones from other work on a shared machine")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the single-attack and ensemble comparisons "
                        "(default: torch's, one per core); 1 keeps them meaningful when other work loads the machine, where "
                        "2-thread runs slow down many times over (OpenMP threads waiting on a busy core)")
    parser.add_argument("--rounds", type=int, default=3, help="scale-out: rounds of (2-thread process, 2 local workers), alternating; "
                        "the figures are medians (--quick: 1)")
    parser.add_argument("--memory", action="store_true", help="also run benchmarks/attack_memory.py (all 50,000 CIFAR-10 images)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    workdir = Path(tempfile.mkdtemp(prefix="rcat-bench-"))
    import torch

    from rcat.config import AttackConfig
    from rcat.engine import summary_of
    from rcat.models import ModelSpec

    # per_class: images loaded (the model trains on all); n_main: the first n_main of them are the
    # realistic data (ensemble, scale-out); the single-attack comparison runs on the clean-correct ones
    per_class, n_main, steps, queries, epochs, batch = (100, 400, 20, 200, 3, 100) if args.quick else (200, 2000, 50, 1000, 6, 200)
    chunk = 2 * batch
    seed = 0
    began = time.perf_counter()
    images, labels, data_note = load_data(per_class, workdir)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order].contiguous(), labels[order].contiguous()
    print(f"data: {data_note}", flush=True)
    torch.manual_seed(0)  # the same initial weights on every run
    network = ModelSpec("cnn", (3, 32, 32), 10, {"channels": [16, 32], "hidden": 64}).build()
    train(network, images, labels, epochs)
    with torch.no_grad():
        correct = network(images).argmax(1) == labels
    # no sample misclassified on clean input: every sample is attacked by both (a whole number of batches)
    n_correct = int(correct.sum()) // batch * batch
    correct_images, correct_labels = images[correct][:n_correct].contiguous(), labels[correct][:n_correct].contiguous()
    images, labels = images[:n_main].contiguous(), labels[:n_main].contiguous()
    sample_index = torch.arange(len(labels))
    print(f"model: small CNN (16-32 channels), trained clean {epochs} epochs on the {len(order)} images; clean accuracy "
          f"{float(correct.float().mean()):.3f}; realistic data: the first {n_main} images (clean accuracy {float(correct[:n_main].float().mean()):.3f})",
          flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, CPU cores: {os.cpu_count()}; {load()}", flush=True)
    load_start = os.getloadavg()[0]
    split = (images, labels, sample_index)
    n = len(labels)

    single = AttackConfig(name="apgd", loss="dlr", eps=8 / 255, steps=steps, batch_size=batch)
    ensemble = AttackConfig(eps=8 / 255, batch_size=batch, ensemble=[
        AttackConfig(name="apgd", loss="ce", eps=8 / 255, steps=steps, batch_size=batch),
        AttackConfig(name="square", loss="ce", eps=8 / 255, steps=queries, batch_size=batch),
    ])

    # (a) single attack on clean-correct samples: a plain loop vs the engine (first run, then cached rerun)
    plain_same = first = rerun = None
    if not args.only_scaleout:
        repeat = 3 if args.quick else 1
        correct_split = (correct_images, correct_labels, torch.arange(n_correct))
        timed_engine(network, tuple(part[:batch] for part in correct_split), single, workdir / "cache-warmup-1p", batch, seed)
        plain_loop(network, correct_images[:batch], correct_labels[:batch], [single], batch, seed, skip_mistakes=True)
        fresh = iter(range(1_000))
        (plain_same, _), (first, frame) = best_of(
            repeat,
            lambda: (plain_loop(network, correct_images, correct_labels, [single], batch, seed, skip_mistakes=False), None),
            lambda: timed_engine(network, correct_split, single, workdir / f"cache-{next(fresh)}", chunk, seed),
        )
        assert bool(frame["clean_correct"].all())
        cache = workdir / "cache-rerun"
        timed_engine(network, correct_split, single, cache, chunk, seed)
        rerun, again = timed_engine(network, correct_split, single, cache, chunk, seed)
        assert again.equals(frame)
        summary = summary_of(frame)
        print(f"single attack {single.label()} on {n_correct} samples, none misclassified on clean input "
              f"({load()}{'; fastest of 3' if repeat > 1 else ''}):", flush=True)
        print(f"  plain loop:                             {plain_same:.2f} s ({n_correct / plain_same:.0f} samples/s)")
        print(f"  engine, first run (chunk {chunk}):       {first:.2f} s ({n_correct / first:.0f} samples/s)")
        print(f"  engine, cached rerun:                   {rerun:.3f} s ({rerun / first:.2%} of the first run)")
        print(f"  engine summary: {summary.metrics()}", flush=True)

    # (b) realistic: ensemble with clean-mistake skip and only-still-robust, vs every attack on every sample
    plain_ensemble = engine_ensemble = None
    if not (args.skip_ensemble or args.only_scaleout):
        plain_ensemble = plain_loop(network, images, labels, ensemble.members(), batch, seed, skip_mistakes=False)
        engine_ensemble, ens_frame = timed_engine(network, split, ensemble, workdir / "cache-ensemble", chunk, seed)
        print(f"ensemble {ensemble.label()} ({load()}):", flush=True)
        print(f"  plain loop, every attack on every sample: {plain_ensemble:.2f} s")
        print(f"  engine (skip mistakes, only still-robust): {engine_ensemble:.2f} s; robust accuracy {ens_frame['robust'].mean():.3f}; "
              f"broken by: {ens_frame['broken_by'].replace('', 'none').value_counts().to_dict()}", flush=True)

    # (c) scale-out: 2 local worker processes (engine.workers: 2, one torch thread each) vs 1 worker, same attack, fresh caches,
    # one batch per chunk (balance). "1 worker" = one torch thread in process, as each worker runs (results are bit-identical
    # only at equal thread counts: oneDNN's convolutions reduce in a thread-count dependent order). The 2-thread process and
    # the 2 workers alternate, `rounds` times: the machine drifts by several percent within minutes, and each round compares
    # two runs made next to each other. The pool is kept across a round's runs (as a stage keeps it across its splits), so
    # its start-up (each worker imports torch) is measured once, cold, and excluded from the warm figure.
    scaleout = scaleout_2threads = cold_ratio = dask_ratio = None
    if not args.no_workers:
        import statistics

        from rcat.executors import LocalProcessExecutor

        rounds = 1 if args.quick else args.rounds
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        one, one_frame = timed_engine(network, split, single, workdir / "cache-1w", batch, seed)
        load_before = load()
        pairs, identical = [], True
        cold, cold_frame = timed_engine(network, split, single, workdir / "cache-2w-cold", batch, seed, workers=2)
        identical = cold_frame.equals(one_frame)
        for r in range(rounds):
            torch.set_num_threads(2)
            one2, _ = timed_engine(network, split, single, workdir / f"cache-1p2t-{r}", batch, seed)
            torch.set_num_threads(1)
            with LocalProcessExecutor(2) as pool:
                warmup = (images[: 2 * batch], labels[: 2 * batch], sample_index[: 2 * batch])  # both workers import torch and rcat once
                timed_engine(network, warmup, single, workdir / f"cache-warmup-{r}", batch, seed, executor=pool)
                two, two_frame = timed_engine(network, split, single, workdir / f"cache-2w-{r}", batch, seed, executor=pool)
            pairs.append((one2, two))
            identical = identical and two_frame.equals(one_frame)
        if args.dask:
            import dask
            from distributed import LocalCluster

            from rcat.dask_executor import DASK_CONFIG

            # the cluster a user would start for rcat: its workers with DASK_CONFIG (the nanny's malloc variable unset, the
            # periodic callbacks slowed); without it the same run gave 0.757x one thread (2026-12-07)
            with dask.config.set(DASK_CONFIG), LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
                warmup = (images[: 2 * batch], labels[: 2 * batch], sample_index[: 2 * batch])
                timed_engine(network, warmup, single, workdir / "cache-dask-warmup", batch, seed, dask_address=cluster.scheduler_address)
                dask_two, dask_frame = timed_engine(network, split, single, workdir / "cache-dask", batch, seed, dask_address=cluster.scheduler_address)
            dask_ratio = one / dask_two
            identical = identical and dask_frame.equals(one_frame)
            print(f"  2 Dask workers (an existing local cluster, dask_address): {dask_two:.2f} s -> {dask_ratio:.2f}x 1 thread", flush=True)
        torch.set_num_threads(threads)
        two = statistics.median(two for _, two in pairs)
        scaleout, scaleout_2threads, cold_ratio = one / two, statistics.median(one2 / two for one2, two in pairs), one / cold
        print(f"scale-out, {n} samples, {len(range(0, n, batch))} chunks of {batch} ({load_before} before, {load()} after):", flush=True)
        print(f"  1 process, 1 torch thread:                        {one:.2f} s")
        for r, (one2, two_r) in enumerate(pairs):
            print(f"  round {r + 1}: 1 process, 2 torch threads {one2:.2f} s; 2 local workers (warm pool) {two_r:.2f} s "
                  f"-> {one2 / two_r:.3f}x 2 threads")
        print(f"  2 local workers, median of {rounds}:                 {two:.2f} s -> {scaleout:.2f}x 1 thread, {scaleout_2threads:.3f}x 2 threads")
        print(f"  2 local workers, cold (pool started per run):     {cold:.2f} s -> {cold_ratio:.2f}x 1 thread (start-up included)")
        print(f"  results identical to the single-process 1-thread run: {identical}", flush=True)
        if not identical:
            raise SystemExit("the 2-worker result differs from the single-process one")

    # (d) a realistic model: the committed CIFAR-10 pair's new model (ResNet-14, eps 4/255) on real images, the paper's
    # APGD-DLR-50: a plain torchattacks loop as a user writes it (torchattacks' APGD attacks only the clean-correct
    # samples by itself) vs the engine with the same attack vs the cascade preset; and the attack's own seed-to-seed noise
    realistic: dict = {}
    if args.realistic and REALISTIC_MODEL.is_file() and CIFAR_DIR.is_dir():
        realistic = realistic_comparison(args.quick, workdir, seed)

    peak_50k = memory_run() if args.memory else None
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"total benchmark wall time {time.perf_counter() - began:.1f} s; {load()}", flush=True)
    figures = {
        "ratio_vs_plain": None if first is None else round(plain_same / first, 3),
        "ratio_vs_plain_realistic": None if engine_ensemble is None else round(plain_ensemble / engine_ensemble, 3),
        "scaleout_2w_vs_1w": None if scaleout is None else round(scaleout, 3),
        "cached_rerun_fraction": None if first is None else round(rerun / first, 4),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "scaleout_2w_vs_1proc_2threads": None if scaleout_2threads is None else round(scaleout_2threads, 3),
        "scaleout_2w_cold_vs_1w": None if cold_ratio is None else round(cold_ratio, 3),
        "scaleout_dask_2w_vs_1w": None if dask_ratio is None else round(dask_ratio, 3),
        **realistic,
        "peak_rss_mb_50k": peak_50k,
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
