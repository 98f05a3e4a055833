"""What the training data looks like, for rendering images that resemble it: a data prior.

Our callbacks see the data the model is trained on, which no post-hoc visualization tool does.
:class:`DataPrior` holds three statistics of the data's display images, all streamed over batches
by :class:`DataPriorEstimate` (float64 sums, nothing stored per batch):

- ``magnitude``: the mean amplitude of every frequency of the image's 2-D Fourier spectrum
  (orthonormal ``rfft2``), ``[C, H, W // 2 + 1]``; MaCo (Fel et al., 2023) fixes a rendered
  image's amplitudes to natural images' mean amplitudes and optimises only the phase;
- ``mean`` and ``std``: every pixel's mean and standard deviation, ``[C, H, W]``: where the data
  is bright, and where it varies (for centred digits: the centre, not the border).

Example:
    >>> estimate = DataPriorEstimate()
    >>> estimate.update(torch.rand(16, 1, 8, 8))
    >>> prior = estimate.compute()
    >>> prior.magnitude.shape, prior.mean.shape
    (torch.Size([1, 8, 5]), torch.Size([1, 8, 8]))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from lightning_neurons.checks import check_optional_positive_int
from lightning_neurons.distributed import attempt, sum_over_ranks
from lightning_neurons.errors import NeuronsError


def _check_images(images: torch.Tensor) -> None:
    if (
        not isinstance(images, torch.Tensor)
        or images.dim() != 4
        or not images.is_floating_point()
        or len(images) == 0
    ):
        raise NeuronsError(
            "need a non-empty float batch of display images [N, C, H, W], got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
        )


def amplitude_spectrum(images: torch.Tensor) -> torch.Tensor:
    """The mean amplitude ``|rfft2|`` (orthonormal) of ``[N, C, H, W]`` images: ``[C, H, W // 2 + 1]``.

    Example:
        >>> amplitude_spectrum(torch.rand(4, 1, 8, 8)).shape
        torch.Size([1, 8, 5])
    """
    _check_images(images)
    return torch.fft.rfft2(images.double(), norm="ortho").abs().mean(dim=0)


@dataclass(frozen=True)
class DataPrior:
    """Statistics of the data's display images that a rendered image is made to share.

    Attributes:
        magnitude: Mean amplitude spectrum ``[C, H, W // 2 + 1]`` (orthonormal ``rfft2``).
        mean: Per-pixel mean ``[C, H, W]``.
        std: Per-pixel standard deviation ``[C, H, W]``.
        count: Number of images the statistics come from.
    """

    magnitude: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    count: int

    @classmethod
    def from_images(cls, images: torch.Tensor) -> DataPrior:
        """The prior of a batch of display images ``[N, C, H, W]`` in [0, 1].

        Example:
            >>> DataPrior.from_images(torch.rand(8, 1, 16, 16)).std.shape
            torch.Size([1, 16, 16])
        """
        estimate = DataPriorEstimate(max_images=None)
        estimate.update(images)
        return estimate.compute()

    @classmethod
    def from_sums(cls, sums: Mapping[str, torch.Tensor]) -> DataPrior:
        """The prior of :meth:`DataPriorEstimate.sums` (or their sum over processes)."""
        n = float(sums["count"])
        magnitude, total, squares = (
            sums[name].double().cpu() / n for name in ("magnitude", "total", "squares")
        )
        variance = (squares - total.pow(2)).clamp_min(0.0)
        return cls(
            magnitude=magnitude.float(),
            mean=total.float(),
            std=variance.sqrt().float(),
            count=int(n),
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the statistics come from."""
        return tuple(self.mean.shape)  # type: ignore[return-value]

    def resized(self, height: int, width: int) -> DataPrior:
        """The statistics for ``height x width`` images (bilinear; the same prior if unchanged).

        Amplitudes are interpolated over the (centred) frequencies, which keeps the energy per
        pixel (Parseval: the sum of squared amplitudes is the sum of squared pixels); only the
        zero frequency, the mean times ``sqrt(H * W)`` with the orthonormal FFT, is rescaled.
        """
        c, h, w = self.image_shape
        if (h, w) == (height, width):
            return self
        size = (height, width)
        mean = F.interpolate(self.mean[None], size=size, mode="bilinear", align_corners=False)[0]
        std = F.interpolate(self.std[None], size=size, mode="bilinear", align_corners=False)[0]
        centred = torch.fft.fftshift(self.magnitude, dim=1)[None]
        spectrum = F.interpolate(
            centred, size=(height, width // 2 + 1), mode="bilinear", align_corners=False
        )[0]
        magnitude = torch.fft.ifftshift(spectrum, dim=1)
        magnitude[:, 0, 0] = self.magnitude[:, 0, 0] * ((height * width) / (h * w)) ** 0.5
        return DataPrior(magnitude=magnitude, mean=mean, std=std, count=self.count)

    def border_value(self) -> float:
        """The data's mean value on the one-pixel frame of the image (what lies beyond its
        border): the fill of the pixels that the random transforms bring in from outside."""
        mean = self.mean
        frame = torch.cat([mean[:, 0], mean[:, -1], mean[:, :, 0], mean[:, :, -1]], dim=1)
        return float(frame.mean())

    def to(self, device: torch.device | str) -> DataPrior:
        """The same statistics on ``device`` (float32)."""
        return DataPrior(
            magnitude=self.magnitude.to(device, torch.float32),
            mean=self.mean.to(device, torch.float32),
            std=self.std.to(device, torch.float32),
            count=self.count,
        )


class DataPriorEstimate:
    """Streams a :class:`DataPrior` over batches of display images.

    Only sums are kept (float64): memory does not grow with the batches. Call :meth:`reset` to
    recompute from new batches (e.g. after the data changed).

    Args:
        max_images: Stop updating after this many images (``None``: use every image given).

    Raises:
        NeuronsError: For a ``max_images`` that is not a positive integer or None.

    Example:
        >>> estimate = DataPriorEstimate(max_images=32)
        >>> estimate.update(torch.rand(64, 1, 8, 8))
        >>> estimate.count
        32
    """

    def __init__(self, max_images: int | None = 512) -> None:
        self.max_images = check_optional_positive_int("max_images", max_images)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen."""
        self.count = 0
        self._sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def full(self) -> bool:
        """Whether ``max_images`` images have been seen."""
        return self.max_images is not None and self.count >= self.max_images

    def update(self, images: torch.Tensor) -> None:
        """Add ``[B, C, H, W]`` display images (until ``max_images`` are seen).

        Raises:
            NeuronsError: For a batch that is not ``[B, C, H, W]`` floats, or whose image shape
                differs from the earlier batches'.
        """
        _check_images(images)
        if self.full:
            return
        if self.max_images is not None:
            images = images[: self.max_images - self.count]
        with torch.no_grad():
            x = images.detach().to("cpu", torch.float64)
            sums = (
                torch.fft.rfft2(x, norm="ortho").abs().sum(dim=0),
                x.sum(dim=0),
                x.pow(2).sum(dim=0),
            )
        if self._sums is not None:
            if self._sums[1].shape != sums[1].shape:
                raise NeuronsError(
                    "every batch of one estimate must have the same image shape: had "
                    f"{tuple(self._sums[1].shape)}, got {tuple(images.shape[1:])}"
                )
            sums = tuple(a + b for a, b in zip(self._sums, sums, strict=True))  # type: ignore[assignment]
        self._sums = sums
        self.count += len(images)

    def sums(self) -> dict[str, torch.Tensor] | None:
        """The streamed sums (float64): ``count``, and the ``magnitude``, ``total`` and
        ``squares`` sums of the images seen (``None`` before any image)."""
        if self._sums is None:
            return None
        magnitude, total, squares = self._sums
        count = torch.tensor(float(self.count), dtype=torch.float64)
        return {"count": count, "magnitude": magnitude, "total": total, "squares": squares}

    def compute(self) -> DataPrior:
        """The prior of every image seen (float32, CPU).

        Raises:
            NeuronsError: When no image has been seen.
        """
        sums = self.sums()
        if sums is None:
            raise NeuronsError("no images seen yet: call update() with display images first")
        return DataPrior.from_sums(sums)

    def compute_over_ranks(self, world: int, device: torch.device) -> DataPrior | None:
        """The prior of every process's images, on every process (DDP: the sums are added up
        with :func:`~lightning_neurons.distributed.sum_over_ranks` on ``device``, the process
        group's device); ``None`` when no process has seen an image. Every process must call it.

        Raises:
            NeuronsError: On every process, when the processes' image shapes differ.
        """
        summed = sum_over_ranks(attempt(self.sums, world), world, device, "the data prior")
        if summed is None or float(summed["count"]) == 0:
            return None
        return DataPrior.from_sums(summed)
