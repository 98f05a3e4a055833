"""FeatureVisualizer's class anchors: real images of each rendered class, kept from validation,
and the anchors taken from them on each round's model (see
:mod:`lightning_neurons.visualize.anchors`)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_neurons import progress
from lightning_neurons.batch import as_model_input
from lightning_neurons.callbacks._render_options import RenderOptions
from lightning_neurons.distributed import gather_all
from lightning_neurons.probes import ProbeCandidate, choose_probes
from lightning_neurons.state import analysis_mode
from lightning_neurons.visualize.anchors import ClassAnchors, deepest_with_positions
from lightning_neurons.visualize.objectives import ClassLogit, Objective


class ClassImages:
    """The first ``per_class`` images of each of ``classes`` that one rank sees, kept where the
    batches are, with their place in one process's validation order (as
    :class:`~lightning_neurons.probes.ProbeCollector` numbers them).

    Nothing is read back on the host while batches stream in (on a GPU that would make every
    validation batch wait for the device): each batch's rows are copied into their slots with
    tensor operations, those not kept into one scratch row after the slots (which of them lands
    there does not matter). The counts are read at :meth:`candidates` (once a round); once every
    class has its images, batches are ignored.

    Example:
        >>> kept = ClassImages([2, 0], per_class=1)
        >>> kept.update(torch.arange(4.0).view(4, 1, 1, 1), torch.tensor([1, 2, 2, 0]))
        >>> [(c.order, c.label, float(c.image)) for c in kept.candidates()], kept.full
        ([(1, 2, 1.0), (3, 0, 3.0)], True)
    """

    def __init__(self, classes: list[int], per_class: int, rank: int = 0, world: int = 1) -> None:
        self.classes, self.per_class = list(classes), per_class
        self.rank, self.world = rank, world
        self.seen = 0  # images seen on this rank
        self.full = per_class == 0 or not self.classes
        self.images: torch.Tensor | None = None  # [slots + 1 scratch row, C, H, W]
        self.orders: torch.Tensor | None = None  # [slots + 1]
        self.counts: torch.Tensor | None = None  # [classes]: images of each seen so far
        self.slot_of: torch.Tensor | None = None  # class -> its index in `classes`, else -1

    @property
    def slots(self) -> int:
        return len(self.classes) * self.per_class

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch seen in the validation order (``[B, C, H, W]`` images, ``[B]`` labels)."""
        first, self.seen = self.seen, self.seen + len(labels)
        if self.full or not len(labels):
            return
        if self.images is not None and tuple(images.shape[1:]) != tuple(self.images.shape[1:]):
            return  # images of another shape are no anchor of the rendered images
        self._allocate(images)
        assert self.images is not None and self.orders is not None
        assert self.counts is not None and self.slot_of is not None
        device, k, size = self.images.device, self.per_class, len(labels)
        labels = labels.to(device).long().reshape(-1)
        top = len(self.slot_of) - 1  # its last entry (-1) stands for any label out of range
        index = self.slot_of[torch.where((labels >= 0) & (labels < top), labels, top)]
        valid = index >= 0
        # (F.one_hot reads the largest index on the host)
        one_hot = (index[:, None] == torch.arange(len(self.classes), device=device)).long()
        earlier = ((one_hot.cumsum(0) - one_hot) * one_hot).sum(1)  # same class, this batch
        place = self.counts[index.clamp_min(0)] + earlier
        keep = valid & (place < k)
        dest = torch.where(keep, index.clamp_min(0) * k + place, self.slots)
        self.images.index_copy_(0, dest, images.to(self.images))
        order = (first + torch.arange(size, device=device)) * self.world + self.rank
        self.orders.index_copy_(0, dest, order)
        self.counts += one_hot.sum(0)

    def _allocate(self, images: torch.Tensor) -> None:
        """The slots (and the scratch row) on the batches' device, at the first batch."""
        if self.images is not None:
            return
        device, rows = images.device, self.slots + 1
        self.images = torch.zeros(rows, *images.shape[1:], dtype=images.dtype, device=device)
        self.orders = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.counts = torch.zeros(len(self.classes), dtype=torch.long, device=device)
        slot_of = torch.full((max(self.classes) + 2,), -1, dtype=torch.long)
        slot_of[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        self.slot_of = slot_of.to(device)

    def candidates(self) -> list[ProbeCandidate]:
        """This rank's kept images (on the CPU), class by class (reads the device once)."""
        if self.images is None or self.orders is None or self.counts is None:
            return []
        counts = self.counts.clamp(max=self.per_class).tolist()
        self.full = all(n >= self.per_class for n in counts)
        rows = [j * self.per_class + p for j, n in enumerate(counts) for p in range(n)]
        index = torch.tensor(rows, dtype=torch.long, device=self.images.device)
        images = self.images.index_select(0, index).cpu()
        images = images.float() if images.is_floating_point() else images  # uint8 stays uint8
        orders = self.orders.index_select(0, index).tolist()
        labels = [self.classes[j] for j, n in enumerate(counts) for _ in range(n)]
        return [ProbeCandidate(o, c, im) for o, c, im in zip(orders, labels, images, strict=True)]


class AnchorImages:
    """The first ``class_anchor_images`` validation images of each rendered class (those one
    process would keep, on every rank), and the class objectives anchored on them.

    Args:
        options: The render options (``class_anchor``, ``class_anchor_images``,
            ``class_anchor_layer``).
        classes: The rendered classes.
        layers: The visualized layers (the anchored layer is the deepest of them with positions,
            unless ``class_anchor_layer`` names one).
        rank, world: This process's rank and the number of processes.
    """

    def __init__(
        self, options: RenderOptions, classes: list[int], layers: list[str], rank: int, world: int
    ) -> None:
        self.weight = options.class_anchor
        self.layer = options.class_anchor_layer
        self.layers = layers
        self.searched = self.layer is not None  # the deepest layer with positions looked for
        per_class = options.class_anchor_images if self.weight > 0 else 0
        self.kept = ClassImages(classes, per_class, rank, world)
        #: The images chosen, once every class has its own (they do not change after).
        self.chosen: list[ProbeCandidate] | None = None

    def objectives(self, model: nn.Module, classes: list[int]) -> list[Objective]:
        """Each class's objective on this round's model: ``ClassLogit(c) - class_anchor *
        anchor(c)``, the logit alone for a class without images (every rank must call it: the
        images are gathered from every rank)."""
        if self.weight <= 0:
            return [ClassLogit(c) for c in classes]
        picked = self.chosen or self._gathered(len(classes))
        if not picked:
            return [ClassLogit(c) for c in classes]
        progress.phase(f"class anchors ({len(picked)} images)")
        images = torch.stack([p.image for p in picked])
        labels = torch.tensor([p.label for p in picked])
        if not self.searched:
            self.searched = True
            with analysis_mode(model, grad=False):
                x = as_model_input(images[:1], model)
                self.layer = deepest_with_positions(model, self.layers, lambda: model(x))
        if self.layer is None:  # no visualized layer has positions: nothing to anchor on
            return [ClassLogit(c) for c in classes]
        anchors = ClassAnchors.from_images(model, self.layer, images, labels)
        return [anchors.objective(c, self.weight) for c in classes]

    def _gathered(self, count: int) -> list[ProbeCandidate]:
        """The images one process would keep, from every rank's (on every rank), class by class;
        kept, and the ranks' buffers freed, once every class has its own: later images come
        later in the validation order, so they would not change the choice."""
        every = gather_all(self.kept.candidates, self.kept.world, "gathering the anchor images")
        k = self.kept.per_class
        picked = choose_probes([c for part in every for c in part], k, k * count, by_class=True)
        if len(picked) == k * count:  # the same on every rank: the picks are gathered
            self.chosen = picked
            self.kept = ClassImages([], 0)  # full, and holding nothing
        return picked
