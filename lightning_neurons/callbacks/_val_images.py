"""FeatureVisualizer's validation images: this rank's saliency probe candidates and the class
anchors' images, streamed from the validation batches until each has what it needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_neurons.batch import BatchReader
from lightning_neurons.callbacks._anchors import AnchorImages
from lightning_neurons.callbacks._plan import VisualizerPlan, shows_images
from lightning_neurons.errors import NeuronsError
from lightning_neurons.loaders import LoaderRows
from lightning_neurons.probes import ProbeCollector


class ValidationImages:
    """The validation images FeatureVisualizer keeps: probe candidates (:mod:`~lightning_neurons.
    probes`; a round's probes are chosen from every rank's) and the class anchors' images.

    Args:
        per_class: Probe candidates kept per class.
        limit: Probe candidates kept in all.
    """

    def __init__(self, per_class: int, limit: int) -> None:
        #: This rank's probe candidates.
        self.probes = ProbeCollector(per_class, limit, torch.float32)
        #: The real rows of the analysed loader's batches (DistributedSampler's repeats out).
        self.rows = LoaderRows()
        self._warned = False  # the batches could not be read, or are not images: said once

    def reset(self) -> None:
        """Forget the candidates (a new fit: its data's images)."""
        self.probes.reset()
        self._warned = False

    def wanted(self, saliency: bool, anchors: AnchorImages | None) -> bool:
        """Whether a validation batch is still wanted: probes (for ``saliency``) or anchors."""
        probes = saliency and not self.probes.full
        return probes or (anchors is not None and not anchors.kept.full)

    def add(
        self,
        batch: Any,
        batch_idx: int,
        reader: BatchReader,
        plan: VisualizerPlan | None,
        anchors: AnchorImages | None,
        saliency: bool,
        ranks: tuple[int, int],
        num_classes: Callable[[], int | None],
    ) -> None:
        """Stream a validation batch into the probe candidates (for ``saliency``) and the
        ``anchors``' images; a batch that cannot be read, or holds no images, ends both (with
        one warning)."""
        images, labels = self._read(batch, reader)
        shown = images is not None and shows_images(images, plan)
        if images is not None and not shown:
            self._warn(
                f"the validation inputs are {list(images.shape)} batches, not images [B, C, H, W];"
                " saliency maps and class anchors need images and are left out (the preferred "
                "images are rendered through `input_transform`; one with an `inverse`, such as "
                "`lightning_neurons.data.Flatten`, gives them back)."
            )
        if images is None or labels is None or not shown:
            self.probes.full = True
            if anchors is not None:
                anchors.kept.full = True
            return
        rows = self.rows.rows(batch_idx, labels.shape[0])
        if anchors is not None and not anchors.kept.full:
            anchors.kept.update(images[:rows], labels[:rows])
        if self.probes.full or not saliency:
            return
        if not self.probes.seen:
            self.probes.reset(*ranks)
        self.probes.update(images[:rows], labels[:rows], num_classes())

    def _read(
        self, batch: Any, reader: BatchReader
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        try:
            return reader.inputs(batch), reader.labels(batch)
        except NeuronsError as err:
            self._warn(
                f"the validation batches cannot be read ({err}); saliency probes and class "
                "anchors are skipped."
            )
            return None, None

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"FeatureVisualizer: {message}")
