"""The analyses' torch threads, given up to the figure workers and writer threads while they work.

torch runs an operation on ``torch.get_num_threads()`` OpenMP threads that wait for each other at
the end of every parallel loop. When a figure worker (:mod:`lightning_neurons.figure_worker`),
or a writer thread compressing an analysis's ``.npz`` files (:mod:`lightning_neurons.loggers`),
takes a core those threads need, every loop waits for the thread that lost its core: on a 2-core
machine, 40 contribution batches of the demo took 1.40 s alone, 1.68 s on both threads beside
the workers drawing 8 figures, and 1.48 s lending them (``docs/benchmarks.md``). So while an
analysis runs at an epoch's end, :class:`CoreShare` runs torch on the cores that the busy
workers and writers leave (at least one thread) and takes the threads back as they finish,
checking at each progress report (:mod:`lightning_neurons.progress`). The BLAS libraries that
NumPy and SciPy load (the clusterings' linear algebra) get as many threads meanwhile, through
``threadpoolctl``: on the same 2 cores, with the workers drawing, NeuronClustering's PCA (then
scikit-learn's) and HDBSCAN of ResNet-50's 17 layers at 1,000 classes took 6.4 and 5.8 s of
wall clock on the BLAS's own 2 threads, 4.7 and 4.5 s lending them (``docs/benchmarks.md``).

Only the analyses' threads change: the thread count the analysis started with is restored when it
ends, so the training loop runs as it would without us (results of the analyses may differ in
the last bits, as they do between machines with different core counts).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from threadpoolctl import ThreadpoolController


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


# threadpoolctl's search of the loaded libraries, the last time: (modules imported then, the BLAS
# libraries found). A search costs 1.5 ms with NumPy, SciPy and torch loaded (the demo's 5
# analysed epochs asked 131 times: 0.2 s); a library is loaded by an import, so the search is
# redone only after one.
_blas_found: tuple[int, ThreadpoolController] | None = None


def loaded_blas() -> ThreadpoolController:
    """threadpoolctl's controller of the BLAS libraries loaded now (searched again only when a
    module was imported since the last search)."""
    global _blas_found
    imported = len(sys.modules)
    if _blas_found is None or _blas_found[0] != imported:
        _blas_found = (imported, ThreadpoolController().select(user_api="blas"))
    return _blas_found[1]


class CoreShare:
    """torch's threads during one analysis: the cores left by ``busy()`` others, at most the
    threads the analysis started with, at least one; restored by :meth:`restore`.

    Args:
        busy: How many of our processes and threads take a core at this moment (figure
            workers drawing, writer threads compressing).
        cores: The cores to share (default: :func:`usable_cores`).
    """

    def __init__(self, busy: Callable[[], int], cores: int | None = None) -> None:
        self._busy = busy
        self._cores = cores or usable_cores()
        self.threads = torch.get_num_threads()  # the analysis's own, and the training loop's
        self.blas_limit: int | None = None  # the BLAS libraries' threads now (None: their own)
        self._limits: list[Any] = []  # threadpoolctl's limits, in the order they were set

    def wanted(self) -> int:
        """The threads for now: the starting threads while nothing of ours is busy, else
        ``cores - busy()`` between 1 and the starting threads."""
        return self._wanted(self._busy())

    def _wanted(self, busy: int) -> int:
        if busy == 0:  # the count the user or torch chose, whatever the cores
            return self.threads
        return max(1, min(self.threads, self._cores - busy))

    def check(self) -> None:
        """Set torch's threads to :meth:`wanted` (nothing to do when they already are), and the
        BLAS libraries' threads to as many while a worker draws (their own count else)."""
        busy = self._busy()
        wanted = self._wanted(busy)
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        self._limit_blas(wanted if busy else None)

    def restore(self) -> None:
        """The threads the analysis started with, back (torch's and the BLAS libraries')."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        self._limit_blas(None)

    def _limit_blas(self, limit: int | None) -> None:
        if limit == self.blas_limit:  # a change costs about 1 ms: not at every report
            return
        if limit is None:
            # newest first: each puts back what it found, so a library loaded after an earlier
            # limit gets its own count back too
            for limits in reversed(self._limits):
                limits.restore_original_limits()
            self._limits.clear()
        else:
            # the BLAS libraries loaded now, and only they: a limit puts back, when restored,
            # every library it controls (torch's OpenMP threads too, were they selected)
            self._limits.append(loaded_blas().limit(limits=limit))
        self.blas_limit = limit
