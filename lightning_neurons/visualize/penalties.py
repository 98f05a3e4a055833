"""What is subtracted from an image's value, and when an image has converged.

- :class:`L2` and :class:`TotalVariation`: penalty terms on the display image, to subtract from
  an objective (``Channel(...) - 0.1 * L2()``).
- :class:`Penalties`: L2 and total variation on every image, and the diversity term (Olah et
  al., 2017) among the images of one objective: each image's mean cosine similarity to the
  others (:func:`similarity_to_others`), on the Gram matrices of the objective's layer or on the
  centred pixels.
- :class:`Convergence`: every ``window`` steps each running image is scored without transforms;
  one whose value rose by less than ``tol`` (relative) at :data:`PATIENCE` checks in a row is
  frozen and leaves the batch. The decision is per image, so an image's steps do not depend on
  the other objectives, the chunking or the DDP split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lightning_neurons.checks import check_weight
from lightning_neurons.device_copies import DeviceCopies
from lightning_neurons.visualize.objectives import IMAGE, BatchedFn, Objective, Term


class L2(Term):
    """Penalty: mean squared distance of the display image from ``centre`` (subtract it).

    Args:
        centre: The value images are pulled towards (0.5: mid-grey).

    Example:
        >>> from lightning_neurons.visualize import Channel
        >>> Channel("features.conv2", 3) - 0.1 * L2()
        Channel('features.conv2', 3) - 0.1 * L2()
    """

    def __init__(self, centre: float = 0.5) -> None:
        self.layer = IMAGE
        self.centre = check_weight(centre)

    def _key(self) -> tuple:
        return (self.centre,)

    def __repr__(self) -> str:
        return "L2()" if self.centre == 0.5 else f"L2(centre={self.centre:g})"

    def value(self, output: torch.Tensor) -> torch.Tensor:
        return l2_penalty(output, self.centre)

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        centre = DeviceCopies(torch.tensor([t.centre for t in terms]))  # type: ignore[attr-defined]

        def score(output: torch.Tensor) -> torch.Tensor:
            c = centre.like(output).view(-1, *([1] * (output.dim() - 1)))
            return (output - c).pow(2).flatten(1).mean(dim=1)

        return score


class TotalVariation(Term):
    """Penalty: mean absolute difference of neighbouring pixels of the display image (subtract it).

    Example:
        >>> from lightning_neurons.visualize import Channel
        >>> Channel("features.conv2", 3) - 0.05 * TotalVariation()
        Channel('features.conv2', 3) - 0.05 * TotalVariation()
    """

    def __init__(self) -> None:
        self.layer = IMAGE

    def _key(self) -> tuple:
        return ()

    def __repr__(self) -> str:
        return "TotalVariation()"

    def value(self, output: torch.Tensor) -> torch.Tensor:
        return total_variation(output)

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        return total_variation


def l2_penalty(images: torch.Tensor, centre: float = 0.5) -> torch.Tensor:
    """Mean squared distance of each image from ``centre``: ``[B, C, H, W] -> [B]``."""
    return (images - centre).pow(2).flatten(1).mean(dim=1)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertically and horizontally neighbouring pixels: ``[B]``."""
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(dim=1)
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(dim=1)
    return dy + dx


#: Checks in a row at which an image's value must have risen by less than ``converge_tol``
#: before it stops (a single calm window is often a pause).
PATIENCE = 2


class Diverse(Protocol):
    """Rows whose images are kept apart by the diversity term."""

    n_images: int

    def similarity(self, image: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Penalties:
    """Weights of the terms subtracted from every image's value."""

    l2: float
    tv: float
    diversity: float

    def apply(self, value: torch.Tensor, image: torch.Tensor, rows: Diverse) -> torch.Tensor:
        """``value`` (``[R]``) minus the weighted penalties of the rows' images."""
        if self.l2:
            value = value - self.l2 * l2_penalty(image)
        if self.tv:
            value = value - self.tv * total_variation(image)
        if self.diversity and rows.n_images > 1:
            value = value - self.diversity * rows.similarity(image)
        return value


@dataclass(frozen=True)
class Convergence:
    """When an image stops (``render(converge_tol=, converge_window=)``).

    Every ``window`` steps each running image is scored without transforms; an image whose
    value rose by less than ``tol`` times its absolute value since the previous check is calm,
    and one calm at ``patience`` checks in a row has converged. ``unit`` consecutive rows (the
    images one diversity term keeps apart) are calm together, when all of them are.
    """

    tol: float
    window: int
    unit: int = 1
    patience: int = PATIENCE

    def calm(self, value: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Which rows rose by less than ``tol`` (``[R]`` bool) from a check to the next."""
        # relative to the earlier value; a value still at exactly zero (a dead channel) has
        # converged, one rising from a tiny value has not
        rise = (value - previous) / previous.abs().clamp_min(torch.finfo(torch.float32).tiny)
        done = (rise < self.tol).view(-1, self.unit).all(dim=1)
        return done.repeat_interleave(self.unit)


def similarity_to_others(images: torch.Tensor, group: int, centre: bool = True) -> torch.Tensor:
    """Each image's mean cosine similarity to the other images of its group.

    Rows ``k * group`` to ``(k + 1) * group - 1`` form group ``k``; ``[R, ...] -> [R]``. With
    ``centre`` each row's mean is subtracted first (for pixels: brightness does not count).

    Example:
        >>> similarity_to_others(torch.rand(4, 1, 8, 8), group=2).shape
        torch.Size([4])
    """
    flat = images.flatten(1)
    if centre:
        flat = flat - flat.mean(dim=1, keepdim=True)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    unit = unit.view(-1, group, unit.shape[1])
    cosine = unit @ unit.transpose(1, 2)  # [groups, group, group]
    others = cosine.sum(dim=2) - cosine.diagonal(dim1=1, dim2=2)
    return (others / (group - 1)).reshape(-1)


def diversity_layer(objective: Objective, spatial: frozenset[str]) -> str | None:
    """The layer whose Gram matrix measures how alike an objective's images are: its first
    term's layer when that has channels and positions; else ``None`` (the pixels)."""
    _, term = objective.terms()[0]
    return term.layer if term.layer in spatial else None
