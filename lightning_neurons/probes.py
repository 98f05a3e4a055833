"""Probe images: the first images of each class in the validation order, the same on every rank.

FeatureVisualizer (saliency maps) and NeuronContribution (each probe's top neurons) explain a few
validation images. Both choose them the same way, in two steps:

1. each rank streams the batches it sees into a :class:`ProbeCollector`, which keeps its
   candidates: the first ``per_class`` images of each class, at most ``limit`` in all, each with
   its place in one process's validation order (:class:`ProbeCandidate`);
2. :func:`shared_probes` gathers every rank's candidates and :func:`choose_probes` picks, in the
   validation order, the first ``per_class`` images of each class until ``limit`` are picked.

``DistributedSampler`` deals an unshuffled validation set out rank by rank, so the ``p``-th image
that rank ``r`` of ``W`` sees is image ``p * W + r`` of one process's order; the probes picked
from every rank's candidates are those one process picks. Where ``limit`` is smaller than the
number of classes, the classes are those whose first image comes first.

Example:
    >>> collector = ProbeCollector(per_class=1, limit=3)
    >>> collector.update(torch.zeros(5, 1, 2, 2), torch.tensor([3, 3, 1, 3, 2]))
    >>> [c.label for c in choose_probes(collector.candidates, per_class=1, limit=3)]
    [3, 1, 2]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lightning_neurons.distributed import gather_all

__all__ = ["ProbeCandidate", "ProbeCollector", "choose_probes", "first_per_class", "shared_probes"]


@dataclass(frozen=True)
class ProbeCandidate:
    """One candidate probe image.

    Attributes:
        order: Its place in one process's validation order (``p * W + r`` for the ``p``-th image
            of rank ``r`` of ``W``).
        label: Its class.
        image: The image as the loader yielded it (``[C, H, W]``, on the CPU).
    """

    order: int
    label: int
    image: torch.Tensor


def first_per_class(
    labels: Sequence[int], kept: Sequence[int], per_class: int, limit: int
) -> list[int]:
    """Indices of ``labels`` to keep, in order: each label until ``per_class`` of it are kept
    (``kept`` are the labels kept before), at most ``limit`` kept in all.

    Example:
        >>> first_per_class([3, 3, 1, 3, 2], kept=[2], per_class=1, limit=3)
        [0, 2]
    """
    counts: dict[int, int] = {}
    for label in kept:
        counts[label] = counts.get(label, 0) + 1
    picked: list[int] = []
    for i, label in enumerate(labels):
        if len(kept) + len(picked) >= limit:
            break
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            picked.append(i)
    return picked


def choose_probes(
    candidates: Iterable[ProbeCandidate], per_class: int, limit: int, by_class: bool = False
) -> list[ProbeCandidate]:
    """The probes among ``candidates``: in the validation order, the first ``per_class`` of each
    class until ``limit`` are chosen.

    Args:
        candidates: Every rank's candidates, in any order.
        per_class: Probes per class.
        limit: Probes in all.
        by_class: Return them sorted by class (stably: within a class, in the validation order)
            instead of in the validation order.
    """
    ordered = sorted(candidates, key=lambda c: c.order)
    picked = [ordered[i] for i in first_per_class([c.label for c in ordered], [], per_class, limit)]
    return sorted(picked, key=lambda c: c.label) if by_class else picked


class ProbeCollector:
    """Streams one rank's probe candidates from the batches it sees (see the module's text).

    Args:
        per_class: Candidates kept per class.
        limit: Candidates kept in all.
        dtype: Type floating images are converted to (``None``, and integer images such as
            ``uint8``: kept as they are).
        rank, world: This process's rank and the number of processes (see :meth:`reset`).

    Example:
        >>> collector = ProbeCollector(per_class=1, limit=16, rank=1, world=2)
        >>> collector.update(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 0]), num_classes=2)
        >>> [(c.order, c.label) for c in collector.candidates], collector.full
        ([(1, 0), (3, 1)], True)
    """

    def __init__(
        self,
        per_class: int = 1,
        limit: int = 16,
        dtype: torch.dtype | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.per_class = per_class
        self.limit = limit
        self.dtype = dtype
        self.reset(rank, world)

    def reset(self, rank: int = 0, world: int = 1) -> None:
        """Forget every candidate; the next images are rank ``rank`` of ``world``'s first."""
        self.rank, self.world = rank, world
        #: This rank's candidates, in the order seen.
        self.candidates: list[ProbeCandidate] = []
        #: Images seen so far.
        self.seen = 0
        #: Whether no further candidate is wanted (``limit`` kept, or every class's ``per_class``).
        self.full = self.limit <= 0

    def update(
        self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
    ) -> None:
        """Add a batch of ``images`` (``[B, C, H, W]``) and their ``labels`` (``[B]``) as seen in
        the validation order; ``num_classes`` (when known) ends the collection once every class
        has its ``per_class`` candidates."""
        first, self.seen = self.seen, self.seen + labels.shape[0]
        if self.full:
            return
        values = labels.tolist()
        kept = [c.label for c in self.candidates]
        for i in first_per_class(values, kept, self.per_class, self.limit):
            with torch.inference_mode(False):  # normal tensors, usable in autograd later
                dtype = self.dtype if images.is_floating_point() else None
                image = images[i].detach().to(device="cpu", dtype=dtype).clone()
            order = (first + i) * self.world + self.rank
            self.candidates.append(ProbeCandidate(order, int(values[i]), image))
        enough = num_classes is not None and len(self.candidates) >= num_classes * self.per_class
        self.full = len(self.candidates) >= self.limit or enough


def shared_probes(
    collector: ProbeCollector, what: str, by_class: bool = False
) -> list[ProbeCandidate]:
    """The probes chosen from every rank's candidates (:func:`choose_probes`), on every rank.

    Raises:
        NeuronsError: On every rank, when gathering failed on any rank.
    """
    every = gather_all(lambda: collector.candidates, collector.world, what)
    candidates = [c for part in every for c in part]
    return choose_probes(candidates, collector.per_class, collector.limit, by_class=by_class)
