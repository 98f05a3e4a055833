"""Which channels of a display image the figures show as red, green and blue.

By default a figure draws one channel as grey, two as magenta and green, three as RGB and more
as their first three (:func:`~lightning_neurons.plots.images.rgb_channels`). For multispectral
images the first three are seldom the colours to see (Sentinel-2's natural colours are its bands
4, 3 and 2, channels ``[3, 2, 1]`` from 0): ``display_channels`` names the channels to draw, three
(red, green, blue) or one (grey), on FeatureVisualizer or as a data module attribute, as
``input_transform`` is given. Only the figures change: results and files keep every channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_neurons.errors import NeuronsError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["check_display_channels", "display_channels_of", "is_bands", "shown_channels"]

Bands = tuple[int, ...]


def check_display_channels(value: Any, channels: int | None = None) -> Bands | None:
    """``value`` as a tuple of 1 or 3 channel indices (``None`` stays ``None``), each below
    ``channels`` when it is known.

    Raises:
        NeuronsError: If ``value`` is not 1 or 3 non-negative integers, or names a channel the
            images do not have.
    """
    if value is None:
        return None
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    items = list(value) if ok else []
    if not ok or len(items) not in (1, 3) or not all(_is_index(v) for v in items):
        raise NeuronsError(
            "`display_channels` must be 3 channel indices (drawn as red, green and blue) or 1 "
            f"(grey), e.g. [3, 2, 1] for Sentinel-2's natural colours; got {value!r}"
        )
    if channels is not None and max(items) >= channels:
        raise NeuronsError(
            f"`display_channels` {items} names channel {max(items)}, but the images have "
            f"{channels} channels (0 to {channels - 1})"
        )
    return tuple(int(v) for v in items)


def is_bands(value: Any) -> bool:
    """Whether ``value`` is 1 or 3 channel indices (a parameter constraint)."""
    try:
        check_display_channels(value)
    except NeuronsError:
        return False
    return True


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shown_channels(images: torch.Tensor, bands: Bands | None) -> torch.Tensor:
    """The channels ``bands`` of ``[N, C, H, W]`` display images, for a figure (all of them for
    ``None``, or for images that are not ``[N, C, H, W]``).

    Raises:
        NeuronsError: If a band is not a channel of the images.
    """
    if bands is None or images.dim() != 4:
        return images
    check_display_channels(bands, images.shape[1])
    return images[:, list(bands)]


def display_channels_of(trainer: Trainer) -> Bands | None:
    """The channels every figure of input images shows: FeatureVisualizer's
    ``display_channels``, else the data module's ``display_channels`` attribute, else ``None``
    (the default colours)."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if type(callback).__module__.startswith("lightning_neurons."):
            value = getattr(callback, "display_channels", None)
            if value is not None:
                return check_display_channels(value)
    value = getattr(getattr(trainer, "datamodule", None), "display_channels", None)
    return check_display_channels(value)
