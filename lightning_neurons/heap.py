"""Hands the heap memory that an analysis freed back to the operating system.

An analysis allocates and frees hundreds of megabytes of intermediates (statistics gathered on
the host, clusterings, images), on the training thread and on helper threads. glibc's ``malloc``
keeps freed memory in the arena it came from and returns little of it by itself, so the
resident memory of the process stays near its highest point, and memory freed in one thread's
arena is not reused by a thread allocating in another. ``malloc_trim(0)`` gives the free pages
of every arena back. Measured on the CPU (ResNet-18, 1,000 classes, every analysis): 280-410 MB
given back after each epoch's analyses, with the live tensors and objects the same each epoch.
It runs after each analysis and at each of its phases (:func:`lightning_neurons.progress.phase`):
a phase whose blocks do not fit the holes the last one left grows the heap instead; and in the
figure workers after each figure (:mod:`lightning_neurons.figure_worker`). At every
phase (ResNet-50, 1,000 classes, 2 epochs, every analysis): 64 calls, 0.31 s in all, and the
peak memory of the tree 80-170 MB lower (``benchmarks/scale.py``; ``docs/benchmarks.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` (not Linux, another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the system; ``False`` where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
