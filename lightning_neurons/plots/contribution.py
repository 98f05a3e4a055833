"""Figures of neuron contribution: the class x neuron heatmap with domination, the ablation matrix,
and the probe-image grid (each a bounded image)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from torch.nn import functional as F

from lightning_neurons.class_contribution import ContributionStats
from lightning_neurons.plots import _canvas, _text
from lightning_neurons.plots.images import rgb_channels

#: Above this many classes the rows (contribution) or columns (ablation) are numbered, not named.
MAX_NAMED_CLASSES = 20
#: Ablated neuron sets shown at most (the first ones).
MAX_SETS = 30


def _names(class_names: Sequence[str] | None, n: int) -> list[str]:
    return list(class_names) if class_names is not None else [str(c) for c in range(n)]


def contribution_order(class_contribution: torch.Tensor) -> torch.Tensor:
    """Neurons ordered by the class they contribute most to, then by falling contribution, so
    each class's neurons form a block (NaN counts as 0; ties keep the neurons' order)."""
    best, cls = torch.nan_to_num(class_contribution, nan=0.0).max(dim=0)
    return _by_class(best, cls)


def _by_class(best: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """The neurons sorted by ``cls``, then by falling ``best``: two stable sorts of ``[K]``."""
    falling = torch.argsort(-best, stable=True)
    return falling[torch.argsort(cls[falling], stable=True)]


@dataclass
class ContributionView:
    """What :func:`contribution_figure` draws of a layer's
    :class:`~lightning_neurons.class_contribution.ContributionStats`: the shown neurons' columns, the
    rings and the shares (a few MB at 1,000 classes, where the statistics are tens of MB: the
    payload sent to the figure workers).

    Attributes:
        layer: Module name.
        shown: ``[C, N]`` mean contribution of the shown neurons, in their order (NaN as 0).
        num_neurons: The layer's neurons ``K``.
        rings: ``(columns, rows)`` of the dominant neurons among the shown ones (up to
            :data:`MAX_NAMED_CLASSES` classes; empty above).
        domination: ``[C]`` each class's top-k share.
        top_k: Dominant neurons per class.
    """

    layer: str
    shown: np.ndarray
    num_neurons: int
    rings: tuple[list[float], list[float]]
    domination: np.ndarray
    top_k: int


def contribution_view(stats: ContributionStats, max_neurons: int = 256) -> ContributionView:
    """The part of ``stats`` that :func:`contribution_figure` shows: at most ``max_neurons``
    neurons (those with the largest contribution to any class; every dominant neuron is kept),
    grouped by the class they contribute most to."""
    # [C, K] (2M values a layer at 1,000 classes): float32, two passes over it
    m = torch.nan_to_num(stats.class_contribution.float(), nan=0.0)
    num_classes, num_neurons = m.shape
    best, cls = m.max(dim=0)
    order = _by_class(best, cls)
    if num_neurons > max_neurons:
        strength = torch.maximum(best, -m.amin(dim=0))  # the largest |contribution|
        strength[stats.dominant.flatten()] = torch.inf
        keep = torch.argsort(strength, descending=True, stable=True)[:max_neurons]
        order = order[torch.isin(order, keep)]
    rings: tuple[list[float], list[float]] = ([], [])
    if num_classes <= MAX_NAMED_CLASSES:
        column = {int(n): i for i, n in enumerate(order.tolist())}
        for c, row in enumerate(stats.dominant.tolist()):
            for n in row:
                if n in column:
                    rings[0].append(column[n] + 0.5)
                    rings[1].append(c + 0.5)
    return ContributionView(
        layer=stats.layer,
        shown=m[:, order].numpy(),
        num_neurons=num_neurons,
        rings=rings,
        domination=stats.domination.double().numpy(),
        top_k=stats.dominant.shape[1],
    )


def contribution_figure(
    stats: ContributionStats | ContributionView,
    class_names: Sequence[str] | None = None,
    max_neurons: int = 256,
    *,
    epoch: int | None = None,
) -> np.ndarray:
    """Class x neuron heatmap of the mean contribution to each class's logit, and each class's
    domination.

    Left: ``class_contribution`` (red: raises the class's logit, blue: lowers it), neurons grouped by
    the class they contribute most to; up to 20 classes, the class's dominant neurons are ringed.
    Right: the share of each class's positive contribution carried by its ``top_k`` dominant
    neurons. The image is 480 x at most 560 pixels: above 20 classes the rows are numbered, and
    where classes or neurons outnumber the pixels, neighbouring ones share a pixel (the mean). The
    full matrices are in the ``.npz``.

    Args:
        stats: A layer's :class:`~lightning_neurons.class_contribution.ContributionStats`, or its
            :func:`contribution_view` (then ``max_neurons`` is the view's).
        class_names: Tick labels for the classes.
        max_neurons: Show at most this many neurons (those with the largest contribution to any
            class; every dominant neuron is kept).
        epoch: The epoch, for the title.

    Returns:
        The image, ``[H, W, 3]`` uint8 with ``W <= 480`` and ``H <= 720``.
    """
    view = stats if isinstance(stats, ContributionView) else contribution_view(stats, max_neurons)
    shown = view.shown
    num_classes = shown.shape[0]
    limit = (float(np.abs(shown).max()) if shown.size else 0.0) or 1.0
    names = _names(class_names, num_classes)
    named = num_classes <= MAX_NAMED_CLASSES
    left = (_canvas.label_room(names, 70) if named else 34) + 16
    share_width, gap = 64, 12
    width = _canvas.MAX_WIDTH - left - gap - share_width - 8
    rows_px = int(np.clip(num_classes * 22, 110, 440)) if named else 440
    when = f", epoch {epoch}" if epoch is not None else ""
    fig, top = _canvas.titled_figure(
        f"{view.layer}{when}: contribution to the class's logit", body=18 + rows_px + 64
    )
    top += 18  # the panel titles
    ax = _canvas.axes_at(fig, left, top, width, rows_px)
    _canvas.heatmap(ax, shown, "RdBu_r", -limit, limit)
    if named:
        _canvas.label_ticks(ax, "y", names, room=left - 22)
        ax.scatter(*view.rings, s=20, facecolors="none", edgecolors="black", linewidths=0.8)
        heading = f"rings: top {view.top_k} per class"
    else:
        _canvas.index_ticks(ax, "y", num_classes)
        heading = "mean contribution"
    _canvas.pixel_text(fig, left + width / 2, top - 4, heading, size=_canvas.FONT, va="bottom")
    ax.set_ylabel("class", fontsize=_canvas.FONT, labelpad=2)
    ax.set_xticks([])
    ax.set_xlabel(
        f"{shown.shape[1]} of {view.num_neurons} neurons, by class", fontsize=_canvas.FONT
    )
    _canvas.pixel_colorbar(
        fig, (left, top + rows_px + 20, width, 8), "RdBu_r", -limit, limit, "activation x gradient"
    )
    _domination_panel(fig, (left + width + gap, top, share_width, rows_px), view, named)
    return _canvas.render(fig)


def _domination_panel(
    fig: Figure, box: tuple[int, int, int, int], view: ContributionView, named: bool
) -> None:
    """Each class's top-k share as a red bar (0 at the left edge, 1 at the right), drawn into the
    pixels: its title above, "0" and "1" and the mean below."""
    left, top, width, height = box
    share = view.domination
    _canvas.pixel_image(fig, box, _share_bars(share, named, height - 2, width - 2))
    text = {"size": _canvas.FONT, "va": "top"}
    below = top + height + 3
    _canvas.pixel_text(
        fig, left + width / 2, top - 4, f"top-{view.top_k} share", size=_canvas.FONT, va="bottom"
    )
    _canvas.pixel_text(fig, left, below, "0", **text)
    _canvas.pixel_text(fig, left + width, below, "1", **text)
    if share.size:
        mean = f"mean {np.nanmean(share):.2f}"
        _canvas.pixel_text(fig, left + width / 2, below + sum(_text.line_box()) + 1, mean, **text)


def _share_bars(share: np.ndarray, named: bool, height: int, width: int) -> np.ndarray:
    """``[height, width, 3]`` pixels: each class a row (top first), its share of ``width`` in red;
    named classes as bars 0.8 of their row high, else one step per pixel row (block means)."""
    values = share if named else _canvas.block_means(share[:, None], height, 1)[:, 0]
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    if values.size == 0:
        return pixels
    position = (np.arange(height) + 0.5) * values.size / height
    row = np.minimum(position.astype(int), values.size - 1)
    inside = np.abs(position - row - 0.5) < 0.4 if named else np.ones(height, dtype=bool)
    filled = (np.arange(width)[None, :] + 0.5 < values[row, None] * width) & inside[:, None]
    pixels[filled] = np.round(np.asarray(to_rgb("tab:red")) * 255).astype(np.uint8)
    return pixels


def _cell_text(value: float) -> str:
    """``0.25`` -> ``.25``, ``-0.10`` -> ``-.10``: short enough for a 28-pixel cell."""
    return f"{value + 0.0:.2f}".replace("0.", ".", 1) if round(value, 2) != 0 else ".00"


def ablation_figure(
    accuracy_drop: torch.Tensor,
    set_names: Sequence[str],
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> np.ndarray:
    """Accuracy drop of every class (columns) when each neuron set (rows) is zeroed.

    Each cell prints its value where it is at least 28 x 15 pixels. The image is 480 x at most
    560 pixels: the first 30 sets at most; up to 20 classes named, above numbered, and where
    classes outnumber the pixels, neighbouring classes share one (the mean). The full matrix is in
    the ``.npz``.

    Args:
        accuracy_drop: ``[S, C]`` accuracy without minus with the ablation.
        set_names: Row labels (the ablated sets).
        class_names: Column labels.
        title: Figure title (put the epoch in it).

    Returns:
        The image, ``[H, W, 3]`` uint8 with ``W <= 480`` and ``H <= 720``.
    """
    drop = torch.as_tensor(accuracy_drop, dtype=torch.float64).numpy()
    num_sets, num_classes = drop.shape
    shown_sets = min(num_sets, MAX_SETS)
    drop, sets = drop[:shown_sets], [str(s) for s in list(set_names)[:shown_sets]]
    names = _names(class_names, num_classes)
    named = num_classes <= MAX_NAMED_CLASSES
    finite = drop[np.isfinite(drop)]
    limit = max(0.05, float(np.abs(finite).max()) if finite.size else 0.0)
    left = _canvas.label_room(sets, 110) + 4
    width = _canvas.MAX_WIDTH - left - 18
    rows_px = int(np.clip(shown_sets * 20, 100, 440))
    ticks_room, rotate = _canvas.column_labels(names, width, 60) if named else (32, False)
    fig, top = _canvas.titled_figure(
        title or "accuracy drop when zeroed", body=rows_px + ticks_room + 50
    )
    ax = _canvas.axes_at(fig, left, top + 4, width, rows_px)
    _canvas.heatmap(ax, drop, "RdBu_r", -limit, limit)
    _canvas.label_ticks(ax, "y", sets, room=left - 8)
    if named:
        _canvas.label_ticks(ax, "x", names, room=ticks_room - 8, rotate=rotate)
    else:
        _canvas.index_ticks(ax, "x", num_classes)
        ax.set_xlabel("class", fontsize=_canvas.FONT, labelpad=1)
    cell_w, cell_h = width / max(num_classes, 1), rows_px / max(shown_sets, 1)
    if cell_w >= 28 and cell_h >= 15:
        for (r, c), value in np.ndenumerate(drop):
            if np.isfinite(value):
                _canvas.pixel_text(
                    fig,
                    left + (c + 0.5) * cell_w,
                    top + 4 + (r + 0.5) * cell_h,
                    _cell_text(value),
                    size=_canvas.FONT,
                    color="white" if abs(value) > 0.6 * limit else "black",
                )
    bar = (left, top + 4 + rows_px + ticks_room + 4, min(width, 240), 8)
    more = f" (first {shown_sets} of {num_sets} sets)" if shown_sets < num_sets else ""
    _canvas.pixel_colorbar(fig, bar, "RdBu_r", -limit, limit, f"accuracy drop{more}")
    return _canvas.render(fig)


def _tiles(images: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Each image ``[C, H, W]`` (or ``[H, W]``) as ``[3, size, size]``, scaled to [0, 1] where it
    leaves that range; the images of one shape and type in one batch (a probe grid has
    hundreds)."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((image.shape, image.dtype, image.device), []).append(i)
    tiles: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for found in groups.values():
        batch = torch.stack([images[i].detach() for i in found]).float().cpu()
        if batch.dim() == 3:
            batch = batch.unsqueeze(1)
        batch = batch[:, rgb_channels(batch.shape[1])]
        low = batch.amin(dim=(1, 2, 3), keepdim=True)
        high = batch.amax(dim=(1, 2, 3), keepdim=True)
        span = torch.where(high > low, high - low, 1.0)
        batch = torch.where((low < 0) | (high > 1), (batch - low) / span, batch)
        resized = F.interpolate(batch, size=(size, size), mode="nearest")
        for k, i in enumerate(found):
            tiles[i] = resized[k].clone()  # its own storage: pickled, a view takes its base
    return tiles


def probe_tiles(
    probes: torch.Tensor,
    preferred: Sequence[Sequence[torch.Tensor | None]],
    size: int = 48,
    pad: int = 2,
) -> tuple[torch.Tensor, list[list[torch.Tensor | None]]]:
    """The probes and preferred images that :func:`probe_grid` shows, as its tiles (``[3, s,
    s]`` in [0, 1]): the grid drawn from them is the grid drawn from the originals, from a
    payload of a few MB (the figure workers get this, not the rendered images at full size)."""
    num_cols = 1 + max((len(row) for row in preferred), default=0)
    size = max(16, min(size, (_canvas.MAX_WIDTH - 3 * pad) // num_cols - pad))
    num_rows = min(probes.shape[0], max(1, (_canvas.MAX_HEIGHT - pad) // (size + pad)))
    rows = [list(row) for row in preferred[:num_rows]]
    given = [p for row in rows for p in row if p is not None]
    made = iter(_tiles([*probes[:num_rows], *given], size))
    shown = torch.stack([next(made) for _ in range(num_rows)])
    tiles = [[None if p is None else next(made) for p in row] for row in rows]
    return shown, tiles


def probe_grid(
    probes: torch.Tensor,
    preferred: Sequence[Sequence[torch.Tensor | None]],
    size: int = 48,
    pad: int = 2,
) -> torch.Tensor:
    """A grid image: one row per probe image, followed by the preferred images of the neurons that
    contributed most to its prediction (grey where none is available).

    The image is at most 480 x 720 pixels: tiles shrink (down to 16 pixels) to fit the width, and
    only the first probes that fit the height are shown (the rest are in the ``.npz``).

    Args:
        probes: ``[P, C, H, W]`` probe images.
        preferred: For each probe, the images ``[C, H, W]`` (or ``None``) of its top neurons.
        size: Side of each tile in pixels (at most; smaller where the row would be too wide).
        pad: White space between tiles.

    Returns:
        ``[3, H, W]`` image in [0, 1], ``W <= 480`` and ``H <= 720``.
    """
    shown, tiles = probe_tiles(probes, preferred, size, pad)
    num_rows, size = shown.shape[0], shown.shape[-1]
    num_cols = 1 + max((len(row) for row in preferred), default=0)
    step = size + pad
    grid = torch.ones(3, num_rows * step + pad, num_cols * step + 3 * pad)
    for r in range(num_rows):
        row = [shown[r], *[torch.full((3, size, size), 0.5) if p is None else p for p in tiles[r]]]
        for c, tile in enumerate(row):
            left = pad + c * step + (2 * pad if c > 0 else 0)  # a gap after the probe column
            top = pad + r * step
            grid[:, top : top + size, left : left + size] = tile
    return grid
