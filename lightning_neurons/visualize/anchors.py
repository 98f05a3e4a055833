"""Class anchors: a class image pulled towards how the model sees real images of the class.

An image that only maximises a class logit can be a texture no other model calls by that name
(the demo's "0" is a frame-filling grey texture of vertical strokes, not a ring). A
:class:`ClassAnchor` is the distance of a layer's output from the mean output of a few real
images of the class, each channel in units of its spread; subtracted from the logit
(:meth:`ClassAnchors.objective`), it pulls the image towards the layout of features the model
computes for real members of the class, while the logit still decides what the image stresses.
The images stay the model's (textures, exaggerated strokes), but other models recognise them:
on the demo, every judge for every render seed measured (``docs/benchmarks.md``).

The anchors are taken again on each epoch's model (:meth:`ClassAnchors.from_images`, one forward
pass of the images); FeatureVisualizer does so from the first ``class_anchor_images`` validation
images of each class it renders.

Example:
    >>> from lightning_neurons.models import SmallCNN
    >>> from lightning_neurons.visualize import DataPrior, render
    >>> model = SmallCNN(widths=(8, 16, 32)).eval()  # 1 x 16 x 16 images; train it first
    >>> images, labels = torch.rand(40, 1, 16, 16), torch.arange(40) % 10  # real images
    >>> anchors = ClassAnchors.from_images(model, "features.relu3", images, labels)
    >>> result = render(model, [anchors.objective(c) for c in range(10)], image_shape=(1, 16, 16),
    ...                 prior=DataPrior.from_images(images), steps=16)
    >>> result.images.shape
    torch.Size([10, 1, 16, 16])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass

import torch
from torch import nn

from lightning_neurons.batch import as_model_input
from lightning_neurons.checks import check_non_negative, check_positive
from lightning_neurons.device_copies import DeviceCopies
from lightning_neurons.errors import NeuronsError
from lightning_neurons.hooks import hooked
from lightning_neurons.state import analysis_mode
from lightning_neurons.visualize.objectives import BatchedFn, ClassLogit, Objective, Term
from lightning_neurons.visualize.scoring import StopForward

#: The anchor's weight against the class logit in FeatureVisualizer's class images
#: (``RenderOptions.class_anchor``; 3-30 measured on the demo, 10 the best).
ANCHOR_WEIGHT = 10.0


class ClassAnchor(Term):
    """The mean squared distance of ``layer``'s output from class ``index``'s mean output on real
    images, each channel in units of its spread over them: ``[B, K, *positions] -> [B]``
    (channels first, as the hooks hand outputs over). A penalty: subtract it from an objective.

    Made by :class:`ClassAnchors`. Its repr names the layer and the class only, so the anchor
    taken again on the next epoch's model is the same objective (FeatureVisualizer continues
    the image).

    Args:
        layer: The layer (call site) read.
        index: The class.
        target: The class's mean output ``[K, *positions]``.
        scale: Each channel's spread ``[K]`` (positive).
    """

    def __init__(self, layer: str, index: int, target: torch.Tensor, scale: torch.Tensor) -> None:
        self.layer, self.index = layer, int(index)
        self.target, self.scale = target, scale

    def _key(self) -> tuple:
        return (self.layer, self.index, id(self.target))

    def __repr__(self) -> str:
        return f"ClassAnchor({self.layer!r}, {self.index})"

    def value(self, output: torch.Tensor) -> torch.Tensor:
        return type(self).batched([self])(output)  # one target, broadcast over the rows

    def check(self, shape: Sequence[int]) -> None:
        if tuple(shape) != tuple(self.target.shape):
            raise NeuronsError(
                f"{self!r}: layer {self.layer!r} outputs [B, {', '.join(map(str, shape))}] "
                f"but the anchor was taken on outputs [B, {', '.join(map(str, self.target.shape))}]"
                " (another image size or layer); take the anchors on images of the rendered size"
            )

    @classmethod
    def batched(cls, terms: Sequence[Term]) -> BatchedFn:
        rows: list[ClassAnchor] = list(terms)  # type: ignore[arg-type]
        target = torch.stack([t.target for t in rows])  # [R, K, *positions]
        scale = torch.stack([t.scale for t in rows])  # [R, K]
        mean = DeviceCopies(target)  # once per device, not every step
        spread = DeviceCopies(scale.view(*scale.shape, *[1] * (target.dim() - 2)))

        def score(output: torch.Tensor) -> torch.Tensor:
            out = output.float()
            return ((out - mean.on(out.device)) / spread.on(out.device)).pow(2).flatten(1).mean(1)

        return score


@dataclass(frozen=True)
class ClassAnchors:
    """Each class's mean output of one layer on real images, and each channel's spread.

    Attributes:
        layer: The layer (call site).
        means: ``{class: [K, *positions]}``, float32, on the model's device.
        scale: ``[K]``: each channel's standard deviation over all the images and positions
            (at least 1% of the channels' mean one, so a channel silent on the data does not
            dominate).
        counts: ``{class: images}`` the means are taken over.
    """

    layer: str
    means: Mapping[int, torch.Tensor]
    scale: torch.Tensor
    counts: Mapping[int, int]

    def __contains__(self, index: object) -> bool:
        return index in self.means

    def __getitem__(self, index: int) -> ClassAnchor:
        if index not in self.means:
            raise NeuronsError(
                f"no anchor for class {index}: none of the images had that label (anchored "
                f"classes: {sorted(self.means)})"
            )
        return ClassAnchor(self.layer, index, self.means[index], self.scale)

    def objective(self, index: int, weight: float = ANCHOR_WEIGHT) -> Objective:
        """``ClassLogit(index) - weight * self[index]``: the class image FeatureVisualizer renders
        (the logit alone for a class without images, or ``weight`` 0)."""
        weight = check_non_negative("weight", weight)
        if weight == 0 or index not in self.means:
            return ClassLogit(index)
        return ClassLogit(index) - weight * self[index]

    @classmethod
    def from_images(
        cls,
        model: nn.Module,
        layer: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int = 64,
    ) -> ClassAnchors:
        """The anchors of ``layer`` from real images, with the model in eval mode (left as
        found; the forward pass stops after ``layer``).

        Args:
            model: The model.
            layer: The layer (or call site) whose output is anchored; a late layer whose output
                has positions (``[B, K, H, W]``, or tokens) works best.
            images: ``[N, C, H, W]`` images as the model takes them (the loader's).
            labels: ``[N]`` their classes.
            batch_size: Images per forward pass.

        Raises:
            NeuronsError: For mismatched counts, an unknown layer, a layer that did not run, or
                an output that is not finite on the images.
        """
        labels = torch.as_tensor(labels).reshape(-1).long().cpu()
        if len(images) != len(labels) or len(images) == 0:
            raise NeuronsError(
                f"need one label per image and at least one image: {len(images)} images, "
                f"{len(labels)} labels"
            )
        check_positive("batch_size", batch_size, integer=True)
        sums: dict[int, torch.Tensor] = {}
        moments = Moments()
        with analysis_mode(model, grad=False):
            for start in range(0, len(images), batch_size):
                out = layer_output(model, layer, images[start : start + batch_size])
                moments.add(out)
                part = labels[start : start + batch_size]
                for c in part.unique().tolist():
                    rows = out[(part == c).to(out.device)].sum(dim=0)
                    sums[c] = rows if c not in sums else sums[c] + rows
        counts = {c: int((labels == c).sum()) for c in sorted(sums)}
        means = {c: (sums[c] / counts[c]).float() for c in counts}
        return cls(layer, means, moments.scale(), counts)


def layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s channels-first output on ``x`` (float64, detached), the pass stopped there."""
    seen: list[torch.Tensor] = []

    def keep(_name: str, output: torch.Tensor) -> None:
        seen.append(output.detach().double())
        raise StopForward

    with hooked(model, [layer], keep), suppress(StopForward):
        model(as_model_input(x, model))
    if not seen:
        raise NeuronsError(f"layer {layer!r} did not run in the model's forward pass")
    out = seen[0]
    if not torch.isfinite(out).all():
        raise NeuronsError(
            f"layer {layer!r}'s output is not finite (NaN or inf) on the anchor images; check the "
            "model and the images (or set RenderOptions(class_anchor=0))"
        )
    return out


class Moments:
    """Each channel's running sum and sum of squares over images and positions (float64)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, out: torch.Tensor) -> None:
        flat = out.transpose(0, 1).flatten(1)  # [K, images x positions]
        total, squares = flat.sum(dim=1), flat.pow(2).sum(dim=1)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += flat.shape[1]

    def scale(self) -> torch.Tensor:
        """``[K]`` standard deviations, floored at 1% of their mean (float32)."""
        assert self.total is not None and self.squares is not None
        mean = self.total / self.count
        sd = (self.squares / self.count - mean.pow(2)).clamp_min(0).sqrt()
        floor = max(0.01 * float(sd.mean()), 1e-6)
        return sd.clamp_min(floor).float()


def deepest_with_positions(
    model: nn.Module, layers: Sequence[str], forward: Callable[[], object]
) -> str | None:
    """The last of ``layers`` to run in ``forward()`` whose output has positions (``[B, K,
    ...]`` channels first, tokens included); ``None`` when none has."""
    found: dict[str, int] = {}

    def note(name: str, output: torch.Tensor) -> None:
        found.setdefault(name, output.dim())

    with hooked(model, list(layers), note):
        forward()
    spatial = [name for name, dims in found.items() if dims >= 3]
    return spatial[-1] if spatial else None
