"""Parametrizations: the tensors that are optimised, and how they become display images in [0, 1].

Each parametrization returns ``(params, image_fn)`` (as in Lucent): ``params`` are the leaf
tensors handed to the optimiser and ``image_fn()`` builds the ``[N, C, H, W]`` display image
from them. Every row ``i`` is initialised from its own seed (``seeds[i]``), so a row's image does
not depend on which other rows share its batch.

- ``"pixel"``: one free value per pixel.
- ``"fft"``: the image's 2-D Fourier spectrum, scaled by ``1 / frequency`` so that all
  frequencies learn at a similar pace (natural images have a ``1/f`` spectrum); this gives
  smoother, more natural images than pixels.

For RGB images both first mix the channels with a fixed colour-decorrelation matrix (the square
root of natural images' colour covariance, as in Lucid), then squash with a sigmoid into [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from lightning_neurons.errors import NeuronsError

Param = Literal["pixel", "fft"]
ImageFn = Callable[[], torch.Tensor]
PARAMS: tuple[str, ...] = ("pixel", "fft")

# Square root of the colour covariance of natural images (ImageNet), from Lucid's
# `color_correlation_svd_sqrt`: mixing decorrelated channels with it gives natural colours.
_COLOR_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float32
)
_COLOR_MIX = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()


def row_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for row ``index`` of a rendering seeded with ``seed``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def _rows(
    shape: Sequence[int], seeds: Sequence[int], sd: float, device: torch.device
) -> torch.Tensor:
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        rows.append(torch.randn(tuple(shape), generator=generator) * sd)
    return torch.stack(rows).to(device)


def decorrelate_colors(images: torch.Tensor) -> torch.Tensor:
    """Mix the channels of ``[N, 3, H, W]`` images with the colour-decorrelation matrix.

    Other channel counts are returned unchanged.
    """
    if images.shape[1] != 3:
        return images
    return torch.einsum("ij,njhw->nihw", _COLOR_MIX.to(images), images)


def to_display(raw: torch.Tensor, decorrelate: bool = True) -> torch.Tensor:
    """Unbounded values -> display image in (0, 1): colour mixing (RGB only), then a sigmoid."""
    return torch.sigmoid(decorrelate_colors(raw) if decorrelate else raw)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int, int]:
    if len(shape) != 4 or any(
        isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape
    ):
        raise NeuronsError(
            f"image batch shape must be 4 positive integers [N, C, H, W], got {shape!r}"
        )
    return tuple(shape)  # type: ignore[return-value]


def _check_seeds(shape: Sequence[int], seeds: Sequence[int]) -> None:
    if len(seeds) != shape[0]:
        raise NeuronsError(f"need one seed per image: {shape[0]} images but {len(seeds)} seeds")


def pixel_image(
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    sd: float = 0.01,
    decorrelate: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], ImageFn]:
    """One free parameter per pixel (and channel).

    Args:
        shape: ``[N, C, H, W]``.
        seeds: One seed per image (see :func:`row_seed`).
        sd: Standard deviation of the initial values (before the sigmoid).
        decorrelate: Mix RGB channels with the colour-decorrelation matrix.
        device: Where the parameters live.

    Returns:
        ``(params, image_fn)``; ``image_fn()`` returns ``[N, C, H, W]`` images in (0, 1).

    Example:
        >>> params, image_fn = pixel_image((2, 1, 8, 8), seeds=[0, 1])
        >>> image_fn().shape
        torch.Size([2, 1, 8, 8])
    """
    n, c, h, w = _check_shape(shape)
    _check_seeds(shape, seeds)
    raw = _rows((c, h, w), seeds, sd, torch.device(device)).requires_grad_(True)

    def image_fn() -> torch.Tensor:
        return to_display(raw, decorrelate)

    return [raw], image_fn


def spectrum_scale(height: int, width: int, decay_power: float = 1.0) -> torch.Tensor:
    """``1 / max(f, 1 / max(H, W)) ** decay_power`` for the ``[H, W // 2 + 1]`` rFFT frequencies."""
    fy = torch.fft.fftfreq(height).view(-1, 1)
    fx = torch.fft.rfftfreq(width).view(1, -1)
    freq = (fy * fy + fx * fx).sqrt()
    return 1.0 / freq.clamp_min(1.0 / max(height, width)) ** decay_power


def fft_image(
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    sd: float = 0.01,
    decay_power: float = 1.0,
    decorrelate: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], ImageFn]:
    """The image's Fourier spectrum, scaled by ``1/f``, as the parameter.

    Args:
        shape: ``[N, C, H, W]``.
        seeds: One seed per image (see :func:`row_seed`).
        sd: Standard deviation of the initial spectrum coefficients.
        decay_power: Exponent of the ``1/f`` scaling (1: natural images' spectrum).
        decorrelate: Mix RGB channels with the colour-decorrelation matrix.
        device: Where the parameters live.

    Returns:
        ``(params, image_fn)``; ``image_fn()`` returns ``[N, C, H, W]`` images in (0, 1).

    Example:
        >>> params, image_fn = fft_image((2, 3, 16, 16), seeds=[0, 1])
        >>> image_fn().shape
        torch.Size([2, 3, 16, 16])
    """
    n, c, h, w = _check_shape(shape)
    _check_seeds(shape, seeds)
    device = torch.device(device)
    spectrum = _rows((c, h, w // 2 + 1, 2), seeds, sd, device).requires_grad_(True)
    scale = spectrum_scale(h, w, decay_power).to(device)

    def image_fn() -> torch.Tensor:
        coefficients = torch.view_as_complex(spectrum) * scale
        # 4.0: keeps the initial image's pixel values small, as in Lucid's fft_image
        raw = torch.fft.irfft2(coefficients, s=(h, w), norm="ortho") / 4.0
        return to_display(raw, decorrelate)

    return [spectrum], image_fn


def parametrize(
    param: Param,
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    decorrelate: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], ImageFn]:
    """Build the parametrization called ``param`` (``"pixel"`` or ``"fft"``).

    Raises:
        NeuronsError: For another name.
    """
    if param == "pixel":
        return pixel_image(shape, seeds, decorrelate=decorrelate, device=device)
    if param == "fft":
        return fft_image(shape, seeds, decorrelate=decorrelate, device=device)
    raise NeuronsError(f"`param` must be one of {', '.join(map(repr, PARAMS))}; got {param!r}")
