"""Parametrizations: the tensors that are optimised, and how they become display images in [0, 1].

Each parametrization returns ``(params, image_fn)`` (as in Lucent): ``params`` are the leaf
tensors handed to the optimiser and ``image_fn()`` builds the ``[N, C, H, W]`` display image
from them. Every row ``i`` is initialised from its own seed (``seeds[i]``), so a row's image does
not depend on which other rows share its batch.

- ``"pixel"``: one free value per pixel.
- ``"fft"``: the image's 2-D Fourier spectrum, scaled by ``1 / frequency`` so that all
  frequencies learn at a similar pace (natural images have a ``1/f`` spectrum); this gives
  smoother, more natural images than pixels.
- ``"maco"``: only the phase of the spectrum; its amplitudes, and the image's per-pixel mean
  and spread, are the training data's (:class:`~lightning_neurons.visualize.DataPrior`), as in
  MaCo (Fel et al., 2023) but with the data's own statistics: images that other models
  recognise too.

For RGB images ``"pixel"`` and ``"fft"`` first mix the channels with a fixed colour-decorrelation matrix (the square
root of natural images' colour covariance, as in Lucid), then squash with a sigmoid into [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from lightning_neurons.checks import check_batch_shape, check_choice, check_positive
from lightning_neurons.device_copies import DeviceCopies
from lightning_neurons.errors import NeuronsError
from lightning_neurons.visualize.prior import DataPrior

Param = Literal["pixel", "fft", "maco"]
ImageFn = Callable[[], torch.Tensor]
PARAMS: tuple[str, ...] = ("pixel", "fft", "maco")

# Square root of the colour covariance of natural images (ImageNet), from Lucid's
# `color_correlation_svd_sqrt`: mixing decorrelated channels with it gives natural colours.
_COLOR_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float32
)
_COLOR_MIX = DeviceCopies(_COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max())


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
    return torch.einsum("ij,njhw->nihw", _COLOR_MIX.like(images), images)


def to_display(raw: torch.Tensor, decorrelate: bool = True) -> torch.Tensor:
    """Unbounded values -> display image in (0, 1): colour mixing (RGB only), then a sigmoid."""
    return torch.sigmoid(decorrelate_colors(raw) if decorrelate else raw)


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
    n, c, h, w = check_batch_shape(shape, seeds)
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

    Takes the arguments of :func:`pixel_image` (``sd`` the spread of the initial spectrum
    coefficients) and ``decay_power``, the exponent of the ``1/f`` scaling (1: natural images'
    spectrum); returns ``(params, image_fn)`` as it does.

    Example:
        >>> params, image_fn = fft_image((2, 3, 16, 16), seeds=[0, 1])
        >>> image_fn().shape
        torch.Size([2, 3, 16, 16])
    """
    n, c, h, w = check_batch_shape(shape, seeds)
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
    prior: DataPrior | None = None,
    contrast: float = 1.0,
) -> tuple[list[torch.Tensor], ImageFn]:
    """Build the parametrization called ``param`` (``"pixel"``, ``"fft"`` or ``"maco"``).

    Raises:
        NeuronsError: For another name, or ``"maco"`` without a ``prior``.
    """
    if param == "maco":
        if prior is None:
            raise NeuronsError(
                "param='maco' needs the data's statistics: pass `prior=` (a DataPrior, e.g. "
                "DataPrior.from_images(display_images) or DataPriorEstimate().compute())"
            )
        return maco_image(shape, seeds, prior=prior, contrast=contrast, device=device)
    build = {"pixel": pixel_image, "fft": fft_image}[check_choice("param", param, PARAMS)]
    return build(shape, seeds, decorrelate=decorrelate, device=device)


def soft_clip(values: torch.Tensor, knee: float = 0.1) -> torch.Tensor:
    """Squash into [0, 1]: the identity on ``[knee, 1 - knee]``, sigmoid-shaped outside.

    Unlike a sigmoid around 0.5, a dark background at 0.05 stays dark; unlike a hard clamp, the
    gradient leads back into the band from outside it (in float32 up to about 0.9 beyond it,
    where ``tanh`` rounds to 1).

    Example:
        >>> [round(v, 4) for v in soft_clip(torch.tensor([-5.0, 0.0, 0.5, 0.95, 5.0])).tolist()]
        [0.0, 0.0238, 0.5, 0.9462, 1.0]
    """
    # Below the knee 2 * knee * sigmoid(2 * (x - knee) / knee), which meets the identity with
    # value and slope 1 there; above 1 - knee the same, mirrored. As 2 * sigmoid(2 z) - 1 =
    # tanh(z), both are the band's nearest point plus knee * tanh(distance / knee): six
    # operations for both sides, not fifteen (each a kernel launch at every rendering step on
    # a GPU, and as many again in the backward pass).
    nearest = values.clamp(knee, 1 - knee)
    return nearest + knee * torch.tanh((values - nearest) / knee)


def _check_prior(prior: object, c: int, h: int, w: int) -> DataPrior:
    if not isinstance(prior, DataPrior):
        raise NeuronsError(f"`prior` must be a DataPrior, got {type(prior).__name__}")
    if prior.image_shape[0] != c:
        raise NeuronsError(
            f"the prior comes from images with {prior.image_shape[0]} channels but the rendered "
            f"images have {c}; estimate it from display images of the rendered kind"
        )
    return prior.resized(h, w)


def maco_image(
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    prior: DataPrior,
    contrast: float = 1.0,
    sd: float = 1.0,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], ImageFn]:
    """Only the phase of the image's spectrum is optimised; amplitudes and pixel statistics are
    the data's.

    MaCo (Fel et al., 2023) fixes the amplitude of every frequency to natural images' mean
    amplitude and optimises the phase only, so the image keeps the power spectrum of real images
    whatever the objective. Here the amplitudes are the training data's own
    (``prior.magnitude``), and the result is laid over the data's per-pixel statistics::

        pattern = irfft2(magnitude * exp(i * phase))          (zero frequency removed)
        image   = soft_clip(mean + contrast * std / rms(std) * pattern)

    so the image has the data's mean brightness at every pixel and varies where the data varies
    (for centred digits: in the middle, on a dark border). Optimising where the structure lies,
    not how much of it there is, gives images that other models recognise more often
    (``benchmarks/visualization.py --quality``); ``contrast`` > 1 lets a channel image drive its
    channel harder.

    Args:
        shape: ``[N, C, H, W]``.
        seeds: One seed per image (see :func:`row_seed`).
        prior: The data's statistics (resized to ``H x W`` when they come from another size).
        contrast: Scale of the pattern relative to the data's spread.
        sd: Standard deviation of the initial phases.
        device: Where the parameters live.

    Returns:
        ``(params, image_fn)``: the phases ``[N, C, H, W // 2 + 1]`` and the image builder.

    Raises:
        NeuronsError: For a prior of another channel count, or a contrast that is not positive.

    Example:
        >>> prior = DataPrior.from_images(torch.rand(8, 1, 16, 16))
        >>> params, image_fn = maco_image((2, 1, 16, 16), seeds=[0, 1], prior=prior)
        >>> image_fn().shape
        torch.Size([2, 1, 16, 16])
    """
    n, c, h, w = check_batch_shape(shape, seeds)
    check_positive("contrast", contrast)
    device = torch.device(device)
    stats = _check_prior(prior, c, h, w).to(device)
    phase = _rows((c, h, w // 2 + 1), seeds, sd, device).requires_grad_(True)
    magnitude = stats.magnitude.clone()
    magnitude[:, 0, 0] = 0.0  # the mean comes from the per-pixel mean below
    rms = stats.std.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-8)
    spread = float(contrast) * stats.std / rms

    def image_fn() -> torch.Tensor:
        pattern = torch.fft.irfft2(
            torch.polar(magnitude.expand_as(phase), phase), s=(h, w), norm="ortho"
        )
        return soft_clip(stats.mean + spread * pattern)

    return [phase], image_fn
