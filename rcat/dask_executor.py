"""An executor on an existing Dask cluster (``engine.dask_address``): optional, needs ``distributed``.

The cluster is the user's: this module starts no scheduler or worker, no Prefect server, and sets
nothing in the process environment. ``shared`` (the network) is scattered to every worker once
(``broadcast=True``); each task carries only its item. Tasks are submitted with ``pure=False``, so
Dask names them with a random key instead of pickling and hashing their arguments (megabytes of
images). The driver keeps one task in flight per worker thread and gives the next item to the
worker that freed (:func:`keep_slots_busy`, with why Dask's own placement is not used).
Start the cluster's workers with one thread each (``dask worker ADDRESS --nthreads 1``) and
:data:`DASK_CONFIG` for full speed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from rcat.errors import InputError

T = TypeVar("T")
S = TypeVar("S")

DASK_CONFIG = {
    # tasks carry their chunks' rows (tens of MB); Dask warns about any graph above 10 MB
    "distributed.admin.large-graph-warning-threshold": "128MB",
    # Periodic callbacks wake each worker's event loop, which then takes the GIL from the
    # attack's thread and, with every core busy, preempts a compute process: the statistical
    # profiler every 10 ms, the event-loop tick every 20 ms, the memory monitor every 100 ms
    # (worker and nanny) and the system monitor every 500 ms. With the defaults, two 1-thread
    # workers running at once reached 1.80x of one alone on 2 cores, with these 1.94x, and two
    # plain processes 1.99x (benchmarks/dask_overhead.py).
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    # distributed's nanny starts each worker with MALLOC_TRIM_THRESHOLD_=65536, which turns off
    # glibc's dynamic mmap threshold: an attack then ran 1.6-2.1x slower in a worker, and two such
    # workers on 2 cores gave 0.76x of one thread in process (benchmarks/attack_throughput.py
    # --dask, 2026-12-07). None unsets it (distributed.nanny._get_env_variables).
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
}
"""Dask settings for a cluster that runs rcat's attacks: give them to the processes that start its
scheduler, nannies and workers (``with dask.config.set(DASK_CONFIG): LocalCluster(...)``, or as
``DASK_*`` variables of *their* environment, e.g.
``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None``); the driver's client
uses them while it runs. rcat sets them in no process but its own client's scope."""


def require_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line :class:`InputError` unless a TCP connection to the scheduler at ``address`` opens
    within ``timeout`` seconds (Dask's own client would retry for its connect timeout, then raise
    a traceback from deep inside the run)."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port or 8786
    except ValueError as exc:
        raise InputError(f"engine.dask_address {address!r}: not an address ({exc}); use tcp://host:port") from None
    if not host:
        raise InputError(f"engine.dask_address {address!r}: no host; use tcp://host:port")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise InputError(f"engine.dask_address {address}: no Dask scheduler answered ({exc.strerror or exc}); "
                         "start one (dask scheduler), or set engine.dask_address: null to attack in this process") from None


def keep_slots_busy(items: Iterable[T], slots: Sequence[S], submit: Callable[[T, S], tuple[Any, Any]],
                    as_completed: Callable[[list[Any]], Any]) -> Iterator[tuple[T, Any]]:
    """Submit ``items`` in order, one in flight per slot; yield ``(item, handle)`` as each completes.

    ``slots``: one entry per worker thread (a worker's address, repeated per thread).
    ``submit(item, slot)`` runs ``item`` on ``slot`` and returns ``(dask_future, handle)``;
    ``as_completed(futures)`` is distributed's (its ``add`` extends it while iterating). As soon as
    an item completes, the next one goes to the slot it freed, before the caller handles the result.

    Why the driver places tasks instead of submitting them all and letting Dask's scheduler place
    them (both measured with per-chunk timelines of 13 s runs on 2 workers):

    * Dask queues a task on the scheduler, for whichever worker frees first, only once its task
      group holds more than twice the cluster's threads (``is_rootish``); before that it binds each
      task to a worker on arrival, and the run ended with one worker idle while the other still
      held a task (0.5 to 1.9 s).
    * A task depending on data scattered to every worker goes to a worker that holds it, and the
      scheduler's Active Memory Manager drops all but one of those copies within seconds: every
      later task was bound to that one worker, busy or not, until work stealing moved it.
    """
    pending = iter(items)
    in_flight: dict[Any, tuple[T, Any, S]] = {}

    def start(slot: S) -> Any | None:
        item = next(pending, None)
        if item is None:
            return None
        dask_future, handle = submit(item, slot)
        in_flight[dask_future] = (item, handle, slot)
        return dask_future

    completed = as_completed([future for future in (start(slot) for slot in slots) if future is not None])
    for finished in completed:
        item, handle, slot = in_flight.pop(finished)
        following = start(slot)
        if following is not None:
            completed.add(following)
        yield item, handle


def _single_threaded(fn: Callable[[Any, Any], Any], shared: Any, item: Any) -> Any:
    """Run ``fn`` with one torch thread: a worker shares its machine with the other workers."""
    import torch

    torch.set_num_threads(1)
    return fn(shared, item)


class DaskExecutor:
    """Items as tasks on the Dask cluster at ``address`` (its scheduler must be running)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Any = None
        self.workers = 0

    def _connected(self) -> Any:
        if self._client is None:
            try:
                from distributed import Client
            except ImportError as exc:  # pragma: no cover - distributed is a declared dependency
                raise InputError(f"engine.dask_address needs the 'distributed' package ({exc}); pip install distributed") from exc
            require_reachable(self.address)
            self._client = Client(self.address, set_as_default=False)
        return self._client

    def _slots(self, client: Any) -> list[str]:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        slots = [address for address, worker in sorted(workers.items()) for _ in range(max(1, int(worker.get("nthreads", 1))))]
        if not slots:
            raise InputError(f"engine.dask_address {self.address}: the Dask cluster has no workers; start workers for it "
                             "(dask worker <address> --nthreads 1) or set engine.workers instead")
        return slots

    def map_unordered(self, fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        if not items:
            return
        import dask
        from distributed import as_completed

        client = self._connected()
        # as_current: distributed's as_completed finds this client without it becoming the process-wide default
        with dask.config.set(DASK_CONFIG), client.as_current():
            slots = self._slots(client)
            self.workers = len(slots)
            [scattered] = client.scatter([shared], broadcast=True, hash=False)
            try:
                def submit(entry: tuple[int, Any], worker: str) -> tuple[Any, Any]:
                    # placed on the worker that freed (loose: another one if it left the cluster)
                    future = client.submit(_single_threaded, fn, scattered, entry[1], pure=False, workers=[worker], allow_other_workers=True)
                    return future, future

                for (position, _), future in keep_slots_busy(list(enumerate(items)), slots, submit,
                                                             lambda futures: as_completed(futures, loop=client.loop)):
                    yield position, future.result()
            finally:
                scattered.release()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
