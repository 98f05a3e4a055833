"""The analyses' torch threads, given up to the figure workers while they draw.

torch runs an operation on ``torch.get_num_threads()`` OpenMP threads that wait for each other at
the end of every parallel loop. When a figure worker (:mod:`lightning_neurons.figure_worker`)
takes a core those threads need, every loop waits for the thread that lost its core: on a 2-core
machine, 40 contribution batches of the demo took 1.40 s alone, 1.68 s on both threads beside
the workers drawing 8 figures, and 1.48 s lending them (``docs/benchmarks.md``). So while an
analysis runs at an epoch's end, :class:`CoreShare` runs torch on the cores that the busy
workers leave (at least one thread) and takes the threads back as the workers finish,
checking at each progress report (:mod:`lightning_neurons.progress`).

Only the analyses' threads change: the thread count the analysis started with is restored when it
ends, so the training loop runs as it would without us (results of the analyses may differ in
the last bits, as they do between machines with different core counts).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class CoreShare:
    """torch's threads during one analysis: the cores left by ``busy()`` others, at most the
    threads the analysis started with, at least one; restored by :meth:`restore`.

    Args:
        busy: How many processes of ours draw at this moment (the figure workers).
        cores: The cores to share (default: :func:`usable_cores`).
    """

    def __init__(self, busy: Callable[[], int], cores: int | None = None) -> None:
        self._busy = busy
        self._cores = cores or usable_cores()
        self.threads = torch.get_num_threads()  # the analysis's own, and the training loop's

    def wanted(self) -> int:
        """The threads for now: the starting threads while nothing of ours is busy, else
        ``cores - busy()`` between 1 and the starting threads."""
        busy = self._busy()
        if busy == 0:  # the count the user or torch chose, whatever the cores
            return self.threads
        return max(1, min(self.threads, self._cores - busy))

    def check(self) -> None:
        """Set torch's threads to :meth:`wanted` (nothing to do when they already are)."""
        wanted = self.wanted()
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def restore(self) -> None:
        """The threads the analysis started with, back."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
