"""Why two 1-thread Dask workers lose to one 2-thread process, and what ``rcat.dask_executor.DASK_CONFIG`` buys.

The same attack (APGD-DLR on a small CNN, 1,000 CIFAR-size samples in chunks of 200, one torch
thread) is timed four ways, alternating, ``--repeat`` times each:

* ``plain``: one Python process alone, then two processes at once (multiprocessing, spawned),
  each on its own copy of the work. Shows what the 2 cores give two independent processes.
* one Dask worker alone, then two at once, on a local cluster created three ways:
  ``dask-default`` (distributed as shipped: its nanny sets ``MALLOC_TRIM_THRESHOLD_`` for the
  workers), ``dask-env`` (that variable unset, the rest default) and ``dask-rcat`` (the cluster
  started under ``rcat.dask_executor.DASK_CONFIG``: also the profiler off and the event-loop
  tick, memory and system monitors slowed down).

Per configuration it prints the median wall time of "one alone" and "two at once", and
``concurrency_efficiency`` = alone / together (1.0: the second process costs the first nothing;
two processes at efficiency e give 2e times the throughput of one). Both Dask configurations run
the network and chunks through plain ``client.submit`` (no Prefect), so that only the worker
processes differ.

    python benchmarks/dask_overhead.py            # about 5 minutes on 2 cores
    python benchmarks/dask_overhead.py --repeat 3

Prints its figures last as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHUNK = 200


def _work():
    """The network and data every process rebuilds identically (seeded): no pickling of the work."""
    import torch
    from attack_throughput import load_data, train

    from rcat.config import AttackConfig
    from rcat.models import ModelSpec

    images, labels, note = load_data(100, Path(tempfile.mkdtemp(prefix="rcat-dask-overhead-")))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order].contiguous(), labels[order].contiguous()
    torch.manual_seed(0)
    network = ModelSpec("cnn", (3, 32, 32), 10, {"channels": [16, 32], "hidden": 64}).build()
    train(network, images, labels, 3)
    config = AttackConfig(name="apgd", loss="dlr", eps=8 / 255, steps=50, batch_size=CHUNK)
    return network, images, labels, config, note


def attack_all(network, images, labels, config) -> float:
    """Attack every chunk in this thread at one torch thread; the wall time."""
    import torch

    from rcat.attacks import attack_outcomes

    torch.set_num_threads(1)
    provenance = {"split": "-", "model": "-", "model_digest": "-", "split_digest": "-"}
    began = time.perf_counter()
    for start in range(0, len(labels), CHUNK):
        attack_outcomes(network, images[start : start + CHUNK], labels[start : start + CHUNK], torch.arange(start, start + CHUNK), config,
                        num_classes=10, seed=0, provenance=provenance, position_offset=start)
    return time.perf_counter() - began


def _plain_process(barrier, results) -> None:
    import torch

    torch.set_num_threads(1)
    network, images, labels, config, _ = _work()
    attack_all(network, images[:CHUNK], labels[:CHUNK], config)  # warm-up
    barrier.wait()
    results.put(attack_all(network, images, labels, config))


def plain(processes: int) -> float:
    """Wall time per process (the slowest) of ``processes`` plain processes started together."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_plain_process, args=(barrier, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    times = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    return max(times)


def dask_times(client, network_future, images, labels, config, workers: list[str]) -> float:
    """Each of ``workers`` attacks every chunk at the same time; the slowest wall time."""
    futures = [client.submit(attack_all, network_future, images, labels, config, workers=[address], pure=False) for address in workers]
    return max(client.gather(futures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="timings per configuration (the median is kept)")
    args = parser.parse_args(argv)
    import dask
    import torch
    from distributed import Client, LocalCluster

    from rcat.dask_executor import DASK_CONFIG

    torch.set_num_threads(1)
    network, images, labels, config, note = _work()
    print(f"data: {note}; {len(labels)} samples in chunks of {CHUNK}; {config.label()}; 1 torch thread per process", flush=True)
    print(f"rcat.engine.DASK_CONFIG: {DASK_CONFIG}", flush=True)
    results: dict[str, dict[str, float]] = {}

    alone, together = [], []
    for _ in range(args.repeat):
        alone.append(plain(1))
        together.append(plain(2))
    results["plain"] = {"alone": statistics.median(alone), "together": statistics.median(together)}

    malloc_key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    for name in ("dask-default", "dask-env", "dask-rcat"):
        with contextlib.ExitStack() as stack:
            if name == "dask-env":
                stack.enter_context(dask.config.set({malloc_key: DASK_CONFIG[malloc_key]}))  # only the nanny's malloc variable unset
            if name == "dask-rcat":
                stack.enter_context(dask.config.set(DASK_CONFIG))
            cluster = stack.enter_context(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None))
            client = stack.enter_context(Client(cluster))
            addresses = sorted(client.scheduler_info()["workers"])
            # the work goes to both workers once, so that the timed tasks carry references only
            network_future, images_future, labels_future = client.scatter([network, images, labels], broadcast=True, hash=False)
            warm = client.scatter([images[:CHUNK], labels[:CHUNK]], broadcast=True, hash=False)
            dask_times(client, network_future, *warm, config, addresses)  # warm-up, both workers
            alone, together = [], []
            for _ in range(args.repeat):
                alone.append(dask_times(client, network_future, images_future, labels_future, config, addresses[:1]))
                together.append(dask_times(client, network_future, images_future, labels_future, config, addresses))
        results[name] = {"alone": statistics.median(alone), "together": statistics.median(together)}
        print(f"{name}: done", flush=True)

    figures = {}
    for name, times in results.items():
        efficiency = times["alone"] / times["together"]
        figures[f"concurrency_efficiency_{name.replace('-', '_')}"] = round(efficiency, 3)
        figures[f"alone_seconds_{name.replace('-', '_')}"] = round(times["alone"], 2)
        print(f"{name:13s} one alone {times['alone']:6.2f} s, two at once {times['together']:6.2f} s -> efficiency {efficiency:.3f} "
              f"(two give {2 * efficiency:.2f}x one)", flush=True)
    figures["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
