"""Random transforms applied to the images at every optimisation step (transformation robustness).

An image that drives a neuron only at one exact pixel alignment is mostly high-frequency noise;
asking it to work under small random shifts, scalings and rotations gives images a person can
read. Every transform is a plain callable ``transform(images, generator) -> images`` on a
``[N, C, H, W]`` batch; the random parameters come from the ``torch.Generator`` passed in (never
from the global generator) and are shared by the whole batch at a step, so a row's image does not
depend on the batch it was rendered in. The geometry is torchvision's
(``torchvision.transforms.v2.functional``), which is differentiable on tensors.

Example:
    >>> chain = standard_transforms((1, 32, 32))
    >>> out = apply_transforms(torch.rand(4, 1, 32, 32), chain, torch.Generator().manual_seed(0))
    >>> out.shape
    torch.Size([4, 1, 32, 32])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from lightning_neurons.checks import (
    check_choice,
    check_index,
    check_non_negative,
    check_scale_range,
)
from lightning_neurons.errors import NeuronsError

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
TransformsArg = Literal["standard", "robust", "none"] | Sequence[Transform] | None


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """A random integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _filled(
    images: torch.Tensor, fill: float | None, warp: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``warp`` with pixels from outside the image set to ``fill``.

    torchvision's own ``fill`` is applied in place on the warped tensor, which autograd cannot
    differentiate; warping ``images - fill`` (outside: 0) and adding ``fill`` back is the same
    for a linear warp, and differentiable.
    """
    if not fill:
        return warp(images)
    return warp(images - fill) + fill


def _affine(
    images: torch.Tensor,
    fill: float | None,
    angle: float = 0.0,
    translate: Sequence[float] = (0.0, 0.0),
    scale: float = 1.0,
) -> torch.Tensor:
    """One bilinear affine warp about the centre (no shear), ``fill`` from outside."""
    return _filled(images, fill, lambda x: _warp(x, angle, translate, scale))


@functools.lru_cache(maxsize=32)
def _centres(
    h: int, w: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (``[1, w]``) and ``y`` (``[h, 1]``) of the output pixels' centres in
    ``grid_sample``'s units, ``-1`` and ``1`` at the image's edges (``align_corners=False``);
    made once for each size, device and type (the last 32 kept)."""
    xs = torch.linspace((1.0 - w) / w, (w - 1.0) / w, w, device=device, dtype=dtype)
    ys = torch.linspace((1.0 - h) / h, (h - 1.0) / h, h, device=device, dtype=dtype)
    return xs.unsqueeze(0), ys.unsqueeze(1)


def _warp(
    images: torch.Tensor, angle: float, translate: Sequence[float], scale: float
) -> torch.Tensor:
    """torchvision's bilinear ``affine`` of ``[N, C, H, W]`` images (no shear, about the centre,
    zeros from outside), its sampling grid computed on the images' device from Python numbers.
    torchvision makes its matrix with ``torch.tensor(..., device=)``: a copy from host memory,
    which on a GPU waits for everything queued there, at every rendering step. The pixels'
    centres are kept (:func:`_centres`), so a warp is 7 operations and the sampling."""
    if images.dim() == 3:  # one [C, H, W] image, as torchvision takes it too
        return _warp(images.unsqueeze(0), angle, translate, scale)[0]
    h, w = images.shape[-2:]
    rot = math.radians(angle)
    cos, sin = math.cos(rot) / scale, math.sin(rot) / scale
    tx, ty = float(translate[0]), float(translate[1])
    # the inverse map, output pixel -> input pixel, about the centre, in pixels:
    # x' = cos x + sin y - cos tx - sin ty, y' = -sin x + cos y + sin tx - cos ty; in
    # grid_sample's units (pixels / (w / 2) and / (h / 2)) the terms scale by h / w and w / h
    dtype = images.dtype if images.is_floating_point() else torch.float32
    xs, ys = _centres(h, w, images.device, dtype)
    gx = torch.add(xs * cos, ys, alpha=sin * h / w) + 2.0 * (-cos * tx - sin * ty) / w
    gy = torch.add(ys * cos, xs, alpha=-sin * w / h) + 2.0 * (sin * tx - cos * ty) / h
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0).expand(images.shape[0], -1, -1, -1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class Pad:
    """Pad every side by ``pixels`` (so that shifted, scaled or rotated content has a border).

    Args:
        pixels: Padding on each side.
        mode: ``"constant"`` (filled with ``value``), ``"reflect"``, ``"replicate"`` or
            ``"circular"``.
        value: Fill value for ``"constant"`` (0.5: mid-grey in display space).
    """

    pixels: int
    mode: Literal["constant", "reflect", "replicate", "circular"] = "constant"
    value: float = 0.5

    def __post_init__(self) -> None:
        self.pixels = check_index("pixels", self.pixels)
        self.mode = check_choice(
            "mode", self.mode, ("constant", "reflect", "replicate", "circular")
        )
        self.value = float(self.value)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.pixels == 0:
            return images
        mode = "edge" if self.mode == "replicate" else self.mode
        fill = self.value if mode == "constant" else None
        return TF.pad(images, [self.pixels], fill=fill, padding_mode=mode)


@dataclass
class Jitter:
    """Shift by a random whole number of pixels in ``[-pixels, pixels]``, as a crop.

    The result is ``pixels`` smaller in height and width (a random ``H - pixels`` window), as in
    Lucid; pad first, or finish with :class:`CenterCrop` for a fixed size.

    Args:
        pixels: Largest shift.
    """

    pixels: int

    def __post_init__(self) -> None:
        self.pixels = check_index("pixels", self.pixels)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.pixels == 0:
            return images
        height, width = images.shape[-2:]
        if self.pixels >= min(height, width):
            raise NeuronsError(f"Jitter({self.pixels}) is too large for {height}x{width} images")
        top = _randint(generator, 0, self.pixels)
        left = _randint(generator, 0, self.pixels)
        return TF.crop(images, top, left, height - self.pixels, width - self.pixels)


@dataclass
class RandomScale:
    """Zoom about the centre by a random factor in ``[low, high]`` (size unchanged; bilinear).

    Args:
        low: Smallest factor.
        high: Largest factor.
        fill: Value of pixels that come from outside the image (``None``: zero).
    """

    low: float = 0.9
    high: float = 1.1
    fill: float | None = 0.5

    def __post_init__(self) -> None:
        self.low, self.high = check_scale_range("low, high", (self.low, self.high))

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _affine(images, self.fill, scale=_uniform(generator, self.low, self.high))


@dataclass
class RandomRotate:
    """Rotate about the centre by a random angle in ``[-degrees, degrees]`` (bilinear).

    Args:
        degrees: Largest angle.
        fill: Value of pixels that come from outside the image (``None``: zero).
    """

    degrees: float = 10.0
    fill: float | None = 0.5

    def __post_init__(self) -> None:
        self.degrees = check_non_negative("degrees", self.degrees)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        angle = _uniform(generator, -self.degrees, self.degrees)
        return _affine(images, self.fill, angle=-angle)  # TF.rotate(angle) is TF.affine(-angle)


@dataclass
class CenterCrop:
    """Crop the centre ``height x width`` window (pads with zeros if the image is smaller).

    Args:
        height: Output height.
        width: Output width.
    """

    height: int
    width: int

    def __post_init__(self) -> None:
        self.height, self.width = int(self.height), int(self.width)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if tuple(images.shape[-2:]) == (self.height, self.width):
            return images
        return TF.center_crop(images, [self.height, self.width])


@dataclass
class RandomAffine:
    """Jitter, random scale and random rotation in one warp (one ``grid_sample``), size unchanged.

    Equivalent to :class:`Jitter`, :class:`RandomScale` and :class:`RandomRotate` with the pixels
    that come from outside the image set to ``fill`` (what padding first provides), but one
    differentiable warp instead of five operations, which matters when rendering costs a few
    milliseconds per step.

    Args:
        shift: Largest shift in whole pixels (drawn in ``[-shift, shift]`` for each axis).
        scale: ``(low, high)`` zoom factors.
        degrees: Largest rotation angle.
        fill: Value of pixels that come from outside the image (``None``: zero).
    """

    shift: int = 2
    scale: tuple[float, float] = (0.9, 1.1)
    degrees: float = 10.0
    fill: float | None = 0.5

    def __post_init__(self) -> None:
        self.shift = check_index("shift", self.shift)
        self.scale = check_scale_range("scale", self.scale)
        self.degrees = check_non_negative("degrees", self.degrees)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dx = _randint(generator, -self.shift, self.shift)
        dy = _randint(generator, -self.shift, self.shift)
        factor = _uniform(generator, *self.scale)
        angle = _uniform(generator, -self.degrees, self.degrees)
        return _affine(images, self.fill, angle=angle, translate=[dx, dy], scale=factor)


def standard_transforms(image_shape: Sequence[int], fill: float = 0.5) -> list[Transform]:
    """Lucid's standard transformation robustness, sized for the image, in one warp.

    Lucid pads by 12, jitters by 8, scales by 0.9-1.1, rotates by +-10 degrees and jitters by 4,
    for images of about 128-224 pixels. Here: shifts of up to ``min(H, W) / 16`` pixels (2 for
    32x32 images, 14 for 224x224), the same scales and angles, and mid-grey (``fill``) where
    padding would show, all as one :class:`RandomAffine`; the size stays the same, so models
    with a fixed input size work.

    Args:
        image_shape: ``(C, H, W)``.
        fill: Display-space value for pixels shifted, scaled or rotated in from outside.

    Returns:
        The transforms, in order.
    """
    side = min(int(image_shape[-2]), int(image_shape[-1]))
    return [RandomAffine(shift=max(1, round(side / 16)), scale=(0.9, 1.1), degrees=10.0, fill=fill)]


def robust_transforms(image_shape: Sequence[int], fill: float = 0.5) -> list[Transform]:
    """Stronger transformation robustness than :func:`standard_transforms`, in one warp.

    Shifts of up to ``min(H, W) / 8`` pixels (4 for 32x32 images), zooms by 0.8-1.2 and
    rotations of up to 15 degrees: on the digits demo, class images rendered with these (and
    the ``"maco"`` parametrization) were recognised by a twin model and by another architecture
    more often than with the standard ranges (``benchmarks/visualization.py --quality``).

    Args:
        image_shape: ``(C, H, W)``.
        fill: Display-space value for pixels shifted, scaled or rotated in from outside (the
            data's background, e.g. its mean border value, fits best).

    Returns:
        The transforms, in order.
    """
    side = min(int(image_shape[-2]), int(image_shape[-1]))
    return [RandomAffine(shift=max(1, round(side / 8)), scale=(0.8, 1.2), degrees=15.0, fill=fill)]


def resolve_transforms(
    transforms: TransformsArg, image_shape: Sequence[int], fill: float = 0.5
) -> list[Transform]:
    """The list of transforms meant by ``transforms``.

    Args:
        transforms: ``"standard"`` (:func:`standard_transforms`), ``"robust"``
            (:func:`robust_transforms`), ``"none"`` or ``None`` (no transforms), or a sequence
            of callables ``(images, generator) -> images``.
        image_shape: ``(C, H, W)`` of the rendered images.
        fill: Display-space value for pixels brought in from outside by the named sets.

    Raises:
        NeuronsError: For another string or a non-callable item.
    """
    if transforms is None or transforms == "none":
        return []
    if transforms == "standard":
        return standard_transforms(image_shape, fill)
    if transforms == "robust":
        return robust_transforms(image_shape, fill)
    if isinstance(transforms, str) or not isinstance(transforms, Sequence):
        raise NeuronsError(
            "`transforms` must be 'standard', 'none', None or a list of callables "
            f"(images, generator) -> images, or 'robust'; got {transforms!r}"
        )
    for t in transforms:
        if not callable(t):
            raise NeuronsError(
                f"every transform must be callable (images, generator) -> images; got {t!r}"
            )
    return list(transforms)


def apply_transforms(
    images: torch.Tensor, transforms: Sequence[Transform], generator: torch.Generator
) -> torch.Tensor:
    """Apply ``transforms`` in order, drawing their random parameters from ``generator``."""
    for transform in transforms:
        images = transform(images, generator)
    return images
