"""Where independent pieces of work run: in this process (the default), in local worker processes,
or on an existing Dask cluster (:mod:`rcat.dask_executor`, optional).

An executor maps a module-level function over items, ``fn(shared, item)``, and yields
``(position, result)`` as each item completes (completion order, not item order). ``shared`` is
what every item needs (a network, a config): the local pool pickles it with each task (a small
model is about 1 MB, against seconds of attack per task); the Dask executor sends it to every
worker once. Workers run one torch thread each, so ``workers`` processes never oversubscribe the
cores. No executor touches the process environment, keeps module state, or talks to Prefect:
orchestration lives in ``pipelines/``.

Choose with :func:`executor_for` from ``engine`` params: ``workers: 1`` and no ``dask_address``
is :class:`SerialExecutor`; ``workers: N`` is :class:`LocalProcessExecutor` (N spawned processes);
``dask_address`` is :class:`rcat.dask_executor.DaskExecutor` (the cluster's own workers).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    """Runs ``fn(shared, item)`` for every item; ``workers`` is how many run at once."""

    workers: int

    def map_unordered(self, fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...

    def close(self) -> None: ...


class SerialExecutor:
    """Every item in this process, one after another, in order."""

    workers = 1

    def map_unordered(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T]) -> Iterator[tuple[int, R]]:
        for position, item in enumerate(items):
            yield position, fn(shared, item)

    def close(self) -> None:
        pass

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


class LocalProcessExecutor:
    """``workers`` spawned processes on this machine, one torch thread each, started on first use.

    Spawned, not forked: a forked copy of a process that has started torch's thread pool can
    deadlock. The pool starts when the first items arrive (each worker imports torch once, about
    2 s) and is shut down by :meth:`close` (or the ``with`` block). Items are handed out one per
    free worker, in order, so whichever worker frees first takes the next.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _started(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)
        return self._pool

    def map_unordered(self, fn: Callable[[S, T], R], shared: S, items: Sequence[T]) -> Iterator[tuple[int, R]]:
        if not items:
            return
        pool = self._started()
        pending = iter(enumerate(items))
        in_flight: dict[concurrent.futures.Future[R], int] = {}

        def submit_next() -> None:
            entry = next(pending, None)
            if entry is not None:
                in_flight[pool.submit(fn, shared, entry[1])] = entry[0]

        for _ in range(self.workers):
            submit_next()
        try:
            while in_flight:
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    position = in_flight.pop(future)
                    submit_next()  # the freed worker takes the next item before the caller handles this one
                    yield position, future.result()
        finally:
            for future in in_flight:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LocalProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def executor_for(workers: int = 1, dask_address: str | None = None) -> SerialExecutor | LocalProcessExecutor | Any:
    """The executor that ``engine.workers`` / ``engine.dask_address`` ask for (see the module docstring)."""
    if dask_address:
        from rcat.dask_executor import DaskExecutor  # optional: needs the 'distributed' package

        return DaskExecutor(dask_address)
    if workers > 1:
        return LocalProcessExecutor(workers)
    return SerialExecutor()
