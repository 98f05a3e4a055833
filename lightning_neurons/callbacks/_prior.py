"""FeatureVisualizer's data prior for ``param="maco"``: given, or streamed from validation."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_neurons.batch import InputTransform, to_display
from lightning_neurons.visualize.prior import DataPrior, DataPriorEstimate


class PriorStream:
    """The data prior a FeatureVisualizer renders with: the user's, else one estimated once from
    the first ``images`` validation images (display images) and then kept, also in the
    checkpoint.

    Under DDP each rank streams the first ``ceil(images / ranks)`` images of its shard: the
    shards interleave the validation set, so together they are its first ``images``; the sums
    are added up over the ranks (:meth:`DataPriorEstimate.compute_over_ranks`).

    Args:
        given: The user's prior (then nothing is estimated).
        images: Validation images to estimate it from.
        wanted: Whether a prior is needed at all (``param="maco"``).
    """

    def __init__(self, given: DataPrior | None, images: int, wanted: bool) -> None:
        self.given, self.images, self.wanted = given, images, wanted
        self.estimate = DataPriorEstimate(images)
        #: The prior estimated from the validation data (``None`` until it is).
        self.estimated: DataPrior | None = None
        self._warned = False

    @property
    def streaming(self) -> bool:
        """Whether validation images are still wanted for the estimate."""
        return self.wanted and self.given is None and self.estimated is None

    @property
    def wants_images(self) -> bool:
        """Whether the next validation images would be added to the estimate."""
        return self.streaming and not self.estimate.full

    def start(self, world: int) -> None:
        """Before the first images: size this rank's share of them."""
        if self.estimate.count == 0 and self.estimated is None:
            self.estimate = DataPriorEstimate(-(-self.images // max(1, world)))

    def update(self, images: torch.Tensor) -> None:
        """Add display images ``[B, C, H, W]`` (until this rank's share is seen)."""
        if self.wants_images:
            with torch.inference_mode(False), torch.no_grad():
                self.estimate.update(images)

    def add_inputs(self, inputs: torch.Tensor, transform: InputTransform | None) -> None:
        """Add model inputs, mapped back to display images (only an exact inverse: a transform
        without one gives no faithful display images)."""
        if self.wants_images:
            images, exact = to_display(inputs, transform)
            if exact:
                self.update(images)

    def finish(self, world: int, device: torch.device) -> None:
        """Turn the streamed sums of every rank into the kept prior (every rank must call it)."""
        if self.streaming:
            self.estimated = self.estimate.compute_over_ranks(world, device)

    def reset(self) -> None:
        """Forget the estimate: it is made again from the next validation images."""
        self.estimate.reset()
        self.estimated = None

    def prior(self) -> DataPrior | None:
        """The prior to render with; ``None`` (with a warning, once) when one is wanted but no
        display image was seen: the images are then rendered with ``param="fft"``."""
        prior = self.given or self.estimated
        if self.wanted and prior is None and not self._warned:
            self._warned = True
            rank_zero_warn(
                "FeatureVisualizer: param='maco' needs the data's statistics, but no display "
                "images were seen (no validation images, or an input transform that cannot be "
                "inverted); rendering with param='fft'. Pass `prior=DataPrior.from_images(...)`."
            )
        return prior

    def state_dict(self) -> dict[str, Any] | None:
        """The estimated prior's tensors and image count (``None`` before it is estimated)."""
        p = self.estimated
        if p is None:
            return None
        return {"magnitude": p.magnitude, "mean": p.mean, "std": p.std, "count": p.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the prior of :meth:`state_dict` (a resumed run renders with it)."""
        self.estimated = DataPrior(
            magnitude=state["magnitude"],
            mean=state["mean"],
            std=state["std"],
            count=int(state["count"]),
        )
