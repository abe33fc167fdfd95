"""The process's C heap (glibc malloc): its free bytes, handing them back, its resident size.

An attack allocates and frees tens to hundreds of MB per batch (activations, gradients). glibc
keeps freed blocks in its arenas for reuse; fragmentation then makes the resident size and the
peak creep up chunk after chunk although nothing is held (measured: ``benchmarks/evaluate_memory.py``).
:func:`release_free_memory` returns those free pages to the kernel when there are many of them.

A second cause of growth is not the allocator: torch's CPU convolutions (oneDNN, through
ideep) cache one compiled primitive per layer, direction and *input shape*, by default up to
1,024 of each kind. An attack meets a new shape in almost every batch (it attacks the samples the
model classifies correctly, however many they are), so the live heap grew by about 2 MB per
1,000-image chunk until those caches were full. :func:`bound_shape_caches` caps them for the
process; process entry points call it before the first convolution. The peak within a chunk still
climbs with the heap's fragmentation (docs/BENCHMARKS.md: only mapping every large block, at twice
the attack's time, flattens it).

Everything here reads the process's state each time and keeps none of its own (no module
globals besides the cached ``libc`` handle); off glibc every function is a no-op returning None
or False.
"""

from __future__ import annotations

import ctypes
import functools
import os

TRIM_FREE_BYTES = 32 * 2**20
"""Free bytes in malloc's arenas above which :func:`release_free_memory` trims (32 MiB)."""


SHAPE_CACHE_LIMITS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256", "LRU_CACHE_CAPACITY": "64"}
"""Entries kept by oneDNN's primitive cache and by ideep's LRU cache of convolution descriptors
(torch's defaults: 1,024 each). A network with L convolutions needs up to 3L primitives per batch
shape (forward, backward to the input, backward to the weights): 45 for the committed CIFAR-10
pair's 15, whose attacks ran no slower with these bounds (docs/BENCHMARKS.md). An
attack's ever-new shapes evict old entries instead of accumulating. A much deeper network may
want more: set the variables in the environment, which wins."""


def bound_shape_caches() -> dict[str, str]:
    """Cap torch's per-shape convolution caches at :data:`SHAPE_CACHE_LIMITS` unless the environment
    already sets them (a user's value wins); return the values in effect.

    The libraries read these variables once, at the process's first convolution: call this from
    a process's entry point (rcat's command line, the DVC stages, the attack engine's workers)
    before any model runs. Later calls change nothing the libraries already read. The caches hold
    compiled kernels, not results: outcomes are bit-identical either way (tests/test_heap.py).
    """
    for name, value in SHAPE_CACHE_LIMITS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in SHAPE_CACHE_LIMITS}


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33), ten ``size_t`` fields in this order."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with ``malloc_trim`` and ``mallinfo2``, else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = [], _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


def free_heap_bytes() -> int | None:
    """Bytes malloc holds free in its arenas (``mallinfo2().fordblks``, main arena plus the others); None off glibc."""
    libc = _glibc()
    return None if libc is None else int(libc.mallinfo2().fordblks)


def heap_in_use_bytes() -> int | None:
    """Bytes malloc has handed out and not had back (``mallinfo2().uordblks``, every arena): the live C heap; None off glibc."""
    libc = _glibc()
    return None if libc is None else int(libc.mallinfo2().uordblks)


def release_free_memory(threshold: int = TRIM_FREE_BYTES) -> bool:
    """Hand malloc's free pages back to the kernel (``malloc_trim(0)``) when more than ``threshold``
    bytes are free in its arenas; return whether it trimmed.

    Bounds the resident size between chunks to what is live plus ``threshold``. malloc keeps
    counting a trimmed block as free (its pages are released, the block stays in the free lists),
    so once the heap is fragmented this trims on most calls: each costs the next chunk's page
    faults, 1-4% of a FGSM attack's time (docs/BENCHMARKS.md), less for multi-step attacks. The
    earlier rule (trim only after the resident size grew by 32 MB) needed per-process state.
    """
    libc = _glibc()
    free = free_heap_bytes()
    if libc is None or free is None or free <= threshold:
        return False
    libc.malloc_trim(0)
    return True


def resident_bytes() -> int | None:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
