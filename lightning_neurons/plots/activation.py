"""Figures of the ActivationTracker's statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from lightning_neurons.plots import _canvas
from lightning_neurons.stats import LayerStats

#: Above this many classes the rows are not named (and above the heatmap's height in pixels,
#: neighbouring classes share a row: the mean of their profiles).
MAX_NAMED_ROWS = 30


def neuron_order(means: torch.Tensor, selectivity: torch.Tensor) -> torch.Tensor:
    """Order neurons by preferred class, then by falling selectivity, so blocks show."""
    return _order(torch.nan_to_num(means, nan=-torch.inf).argmax(dim=0), selectivity)


def _order(preferred: torch.Tensor, selectivity: torch.Tensor) -> torch.Tensor:
    sel = torch.nan_to_num(selectivity, nan=0.0)
    key = preferred.double() * 10.0 - sel.double()  # sel in [0, 1]
    return torch.argsort(key, stable=True)


def _shown_neurons(stats: LayerStats, max_neurons: int) -> torch.Tensor:
    """Column order: by preferred class and selectivity, dead neurons last, at most
    ``max_neurons`` (the most selective)."""
    order = _order(stats.preferred_class, stats.selectivity)  # neuron_order's, computed once
    dead = stats.dead[order]
    order = torch.cat([order[~dead], order[dead]])
    if order.numel() > max_neurons:
        sel = torch.nan_to_num(stats.selectivity, nan=0.0)
        keep = torch.argsort(sel, descending=True)[:max_neurons]
        order = order[torch.isin(order, keep)]
    return order


class ClassProfile(NamedTuple):
    """What the class profile figure draws of a layer's statistics: the class means of the
    neurons shown, in their order, and the facts of its title. Small to send to a figure worker
    (a ``LayerStats`` of 2,048 neurons at 1,000 classes pickles to 33 MB; this, to 4 MB)."""

    means: np.ndarray  # [C, shown] float64, the columns in drawing order
    layer: str
    epoch: int
    total: int  # the layer's neurons
    selectivity: float  # the layer's mean selectivity
    dead: int  # the layer's dead neurons


def class_profile(stats: LayerStats, max_neurons: int = 512) -> ClassProfile:
    """The :class:`ClassProfile` of ``stats``: at most ``max_neurons`` neurons (the most
    selective), sorted by preferred class and selectivity, dead neurons last."""
    order = _shown_neurons(stats, max_neurons)
    return ClassProfile(
        means=np.take(stats.class_means.numpy(), order.numpy(), axis=1).astype(np.float64),
        layer=stats.layer,
        epoch=stats.epoch,
        total=stats.class_means.shape[1],
        selectivity=float(stats.selectivity.nanmean()),
        dead=int(stats.dead.sum()),
    )


def class_profile_heatmap(
    stats: LayerStats, class_names: Sequence[str] | None = None, max_neurons: int = 512
) -> np.ndarray:
    """Class x neuron heatmap of a layer's class profile, each neuron scaled to [0, 1].

    Neurons are sorted by their preferred class, then by selectivity, so selective neurons form
    a block diagonal; dead neurons are drawn last. The image is at most 480 x 720 pixels whatever
    the number of classes and neurons: above 30 classes the rows are numbered instead of named,
    and where classes or neurons outnumber the heatmap's pixels, neighbouring ones share a pixel
    (the mean of their scaled profiles). The full profile is in the tracker's ``.npz``.

    Args:
        stats: A layer's :class:`~lightning_neurons.stats.LayerStats`.
        class_names: Tick labels for the classes.
        max_neurons: Show at most this many neurons (the most selective ones).

    Returns:
        The image, ``[H, W, 3]`` uint8, ``W <= 480`` and ``H <= 720``.

    Example:
        >>> from lightning_neurons.stats import ClassNeuronStats, LayerStats
        >>> sums = ClassNeuronStats(num_classes=3, num_neurons=8)
        >>> sums.update(torch.rand(30, 8), torch.arange(30) % 3)  # a layer's responses, labels
        >>> stats = LayerStats.from_state("conv2", sums.compute(), epoch=0, reduction="mean", top_k=2)
        >>> image = class_profile_heatmap(stats, ["zero", "one", "two"])  # as tracker.results[layer]
        >>> image.dtype, image.shape[2], image.shape[0] <= 720 and image.shape[1] <= 480
        (dtype('uint8'), 3, True)
    """
    return class_profile_image(class_profile(stats, max_neurons), class_names)


def class_profile_image(
    profile: ClassProfile, class_names: Sequence[str] | None = None
) -> np.ndarray:
    """The class profile figure of a :class:`ClassProfile` (see :func:`class_profile_heatmap`)."""
    m = profile.means
    num_classes, num_neurons = m.shape
    finite = np.isfinite(m)
    # neurons without data (all NaN) stay NaN, drawn blank
    low = np.where(finite, m, np.inf).min(axis=0, keepdims=True)
    high = np.where(finite, m, -np.inf).max(axis=0, keepdims=True)
    with np.errstate(invalid="ignore"):
        spread = np.where(high - low > 0, high - low, 1.0)
        scaled = np.where(finite, (m - np.where(finite.any(axis=0), low, 0.0)) / spread, np.nan)
    named = num_classes <= MAX_NAMED_ROWS
    rows_px = int(np.clip(num_classes * 22, 110, 440)) if named else 440
    total = profile.total
    shown = f"the {num_neurons} most selective of {total}" if num_neurons < total else f"{total}"
    title = (
        f"{profile.layer}, epoch {profile.epoch}: class profile of {shown} neurons "
        f"(mean selectivity {profile.selectivity:.2f}, {profile.dead} dead)"
    )
    top = _canvas.title_height(title)
    names = None
    if named:
        given = class_names if class_names is not None else range(num_classes)
        names = tuple(str(c) for c in given)[:num_classes]
    # the frame is the same for every layer of the same classes (and title lines)
    key = ("class_profile", num_classes, names, top)
    image = _canvas.cached_frame(key, lambda: _profile_frame(num_classes, names, top, rows_px))
    width = _canvas.MAX_WIDTH - _LEFT - _RIGHT
    shown = _canvas.block_means(scaled, rows_px, width)
    _canvas.paste(
        image, (_LEFT, top + 4, width, rows_px), _canvas.colormapped(shown, "viridis", 0, 1)
    )
    _canvas.paste_title(image, title, top)
    return image


#: Pixels left and right of the class profile's heatmap (class names; colour bar).
_LEFT, _RIGHT = 78, 62


def _profile_frame(num_classes: int, names: tuple[str, ...] | None, top: int, rows_px: int):
    """The class profile figure without its title and with a blank heatmap."""
    fig = _canvas.new_figure(top + rows_px + 30)
    width = _canvas.MAX_WIDTH - _LEFT - _RIGHT
    ax = _canvas.axes_at(fig, _LEFT, top + 4, width, rows_px)
    _canvas.heatmap(ax, np.full((num_classes, 1), np.nan), "viridis", 0.0, 1.0)
    if names is not None:
        _canvas.label_ticks(ax, "y", names, room=_LEFT - 22)
    else:
        _canvas.index_ticks(ax, "y", num_classes)
    ax.set_ylabel("class", fontsize=_canvas.FONT, labelpad=2)
    ax.set_xticks([])
    ax.set_xlabel("neurons, by preferred class", fontsize=_canvas.FONT, labelpad=3)
    _canvas.pixel_colorbar(
        fig, (_LEFT + width + 8, top + 4, 10, rows_px), "viridis", 0.0, 1.0, "scaled per neuron"
    )
    return fig
