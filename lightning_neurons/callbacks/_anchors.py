"""FeatureVisualizer's class anchors: real images of each rendered class, kept from validation,
and the anchors taken from them on each round's model (see
:mod:`lightning_neurons.visualize.anchors`)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_neurons import progress
from lightning_neurons.batch import as_model_input
from lightning_neurons.callbacks._rendering import RenderOptions
from lightning_neurons.probes import ProbeCollector, shared_probes
from lightning_neurons.state import analysis_mode
from lightning_neurons.visualize.anchors import ClassAnchors, deepest_with_positions
from lightning_neurons.visualize.objectives import ClassLogit, Objective


class AnchorImages:
    """The first ``class_anchor_images`` validation images of each rendered class (chosen as
    the saliency probes are: the same on every rank, those one process would keep), and the
    class objectives anchored on them.

    Args:
        options: The render options (``class_anchor``, ``class_anchor_images``,
            ``class_anchor_layer``).
        classes: The rendered classes.
        layers: The visualized layers (the anchored layer is the deepest of them with positions,
            unless ``class_anchor_layer`` names one).
    """

    def __init__(self, options: RenderOptions, classes: list[int], layers: list[str]) -> None:
        self.weight = options.class_anchor
        self.layer = options.class_anchor_layer
        self.layers = layers
        self.searched = self.layer is not None  # the deepest layer with positions looked for
        per_class = options.class_anchor_images
        limit = per_class * len(classes) if self.weight > 0 else 0
        self.collector = ProbeCollector(per_class, limit, torch.float32, classes=classes)

    @property
    def full(self) -> bool:
        """Whether no further image is wanted."""
        return self.collector.full

    def update(self, images: torch.Tensor, labels: torch.Tensor, rank: int, world: int) -> None:
        """Add a validation batch (``[B, C, H, W]`` as the loader yields them, ``[B]``)."""
        if not self.collector.seen:
            self.collector.reset(rank, world)
        self.collector.update(images, labels)

    def objectives(self, model: nn.Module, classes: list[int]) -> list[Objective]:
        """Each class's objective on this round's model: ``ClassLogit(c) - class_anchor *
        anchor(c)``, the logit alone for a class without images (every rank must call it: the
        images are gathered from every rank)."""
        if self.weight <= 0:
            return [ClassLogit(c) for c in classes]
        picked = shared_probes(self.collector, "gathering the class anchors' images")
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
