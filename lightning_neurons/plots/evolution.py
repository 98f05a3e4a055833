"""Figures of change: neurons over epochs, the category clustering over epochs, and two analyses
compared (see :mod:`lightning_neurons.evolution`).

Each function returns a :class:`~matplotlib.figure.Figure` on an Agg canvas (TensorBoard-sized),
or draws into the ``figure`` it is given (a notebook's ``plt.figure()``, say); none calls pyplot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from lightning_neurons.evolution import (
    CategoryChange,
    ClusteringEvolution,
    LayerChange,
    NeuronEvolution,
    RunComparison,
)
from lightning_neurons.plots import _canvas

__all__ = [
    "clustering_evolution_figure",
    "comparison_figure",
    "neuron_evolution_figure",
    "neuron_evolution_image",
]


def _figure(figure: Figure | None, height: int, width: int = _canvas.MAX_WIDTH) -> Figure:
    return figure if figure is not None else _canvas.new_figure(height, width)


def _title(fig: Figure, text: str) -> None:
    """``text`` above the figure, wrapped to its width (two lines at most)."""
    lines = _canvas.wrap_title(text, fig.bbox.width, lines=2)
    fig.suptitle("\n".join(lines), fontsize=_canvas.TITLE_FONT)


def class_colours(num_classes: int) -> ListedColormap:
    """One distinct colour per class (tab10, tab20, else evenly spaced hues)."""
    import matplotlib

    if num_classes <= 10:
        colours = matplotlib.colormaps["tab10"].colors[:num_classes]
    elif num_classes <= 20:
        colours = matplotlib.colormaps["tab20"].colors[:num_classes]
    else:
        colours = matplotlib.colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))
    return ListedColormap(colours)


def analysis_ticks(epochs: np.ndarray, steps: np.ndarray | None) -> tuple[list[str], str]:
    """The x tick labels of the analyses over time, and the axis' name: their epochs, or their
    steps when an epoch was analysed more than once (validations within it)."""
    if steps is None or len(set(int(e) for e in epochs)) == len(epochs):
        return [str(int(e)) for e in epochs], "epoch"
    return [str(int(s)) for s in steps], "step"


def _epoch_ticks(ax: Axes, labels: Sequence[str], axis: str, start: int = 0) -> None:
    """``labels`` at x = ``start``, ``start + 1``, ...; six of them when more than 10."""
    shown = np.arange(len(labels))
    if len(labels) > 10:
        shown = np.unique(np.linspace(0, len(labels) - 1, 6).round().astype(int))
    ax.set_xticks(shown + start, [labels[i] for i in shown], fontsize=_canvas.FONT)
    ax.set_xlabel(axis, fontsize=_canvas.FONT, labelpad=2)


def _class_legend(ax: Axes, names: Sequence[str], cmap: ListedColormap) -> None:
    """A colour strip naming the classes (their indices above 20 classes)."""
    n = len(names)
    ax.imshow(np.arange(n)[:, None], cmap=cmap, vmin=-0.5, vmax=n - 0.5, aspect="auto")
    ax.set_xticks([])
    ax.yaxis.tick_right()
    if n <= 20:
        ax.set_yticks(np.arange(n), [_canvas.shorten(str(s), 40) for s in names])
    else:
        ax.set_yticks(np.unique(np.linspace(0, n - 1, 5).round().astype(int)))
    ax.tick_params(axis="y", labelsize=_canvas.FONT, length=2, pad=1)


def neuron_evolution_figure(
    evolution: NeuronEvolution,
    class_names: Sequence[str] | None = None,
    *,
    figure: Figure | None = None,
) -> Figure:
    """Neuron x epoch pictures of one layer: each neuron's preferred class (left, one colour per
    class) and its class selectivity (right), neurons sorted by their latest preferred class,
    then selectivity. A neuron that keeps its class draws a straight band; one that switches
    changes colour where it switched. :func:`neuron_evolution_image` draws the same as pixels
    (what the tracker logs).

    Args:
        evolution: A :class:`~lightning_neurons.evolution.NeuronEvolution`.
        class_names: Names for the class legend (default: the class indices).
        figure: Draw into this figure instead of a new one (placed in proportion to its size).

    Returns:
        The figure.
    """
    layout = _NeuronLayout.of(evolution, class_names)
    title = _evolution_title(evolution)
    if figure is None:  # the title an artist: a notebook draws the figure itself
        fig = _canvas.new_figure(layout.height)
        _canvas.title_artist(fig, title)
    else:
        fig = figure
        _title(fig, title)
    for ax, pixels in zip(_neuron_axes(fig, layout), layout.pixels(evolution), strict=True):
        rows = pixels.shape[0]
        ax.imshow(pixels, aspect="auto", interpolation="nearest", extent=layout.extent(rows))
    return fig


def neuron_evolution_image(
    evolution: NeuronEvolution, class_names: Sequence[str] | None = None
) -> np.ndarray:
    """:func:`neuron_evolution_figure` as ``[H, W, 3]`` uint8 pixels, its frame (axes, legend,
    colour bar, epoch ticks) drawn once for every layer of the same epochs and classes.

    Example:
        >>> import torch
        >>> from lightning_neurons.evolution import neuron_evolution
        >>> from lightning_neurons.stats import ClassNeuronStats, LayerStats
        >>> def epoch(e):  # a layer's statistics at epoch e (the tracker's results)
        ...     sums = ClassNeuronStats(num_classes=3, num_neurons=8)
        ...     sums.update(torch.rand(30, 8), torch.arange(30) % 3)
        ...     return LayerStats.from_state("conv2", sums.compute(), epoch=e, reduction="mean", top_k=2)
        >>> image = neuron_evolution_image(neuron_evolution([epoch(0), epoch(1), epoch(2)]))
        >>> image.dtype, image.shape[2]
        (dtype('uint8'), 3)
    """
    layout = _NeuronLayout.of(evolution, class_names)
    image = _canvas.cached_frame(layout.key, lambda: _neuron_frame(layout))
    for box, pixels in zip(layout.boxes()[:2], layout.pixels(evolution), strict=True):
        _canvas.paste(image, box, pixels)
    _canvas.paste_title(image, _evolution_title(evolution), layout.top)
    return image


#: The neuron evolution figure in pixels: the heatmaps' height, the room for the y label on the
#: left and for the colour bar's ticks on the right.
_EVOLUTION_BODY, _EVOLUTION_LEFT, _EVOLUTION_RIGHT = 300, 26, 28


@dataclass(frozen=True)
class _NeuronLayout:
    """Where :func:`neuron_evolution_figure` draws what, in pixels of a
    :data:`~lightning_neurons.plots._canvas.MAX_WIDTH` wide figure."""

    top: int  # rows of the title
    names: tuple[str, ...]  # the legend's classes
    epochs: tuple[str, ...]  # the x ticks' labels: epochs, or steps (``axis``)
    axis: str
    room: int  # the legend's labels

    @classmethod
    def of(cls, evolution: NeuronEvolution, class_names: Sequence[str] | None) -> _NeuronLayout:
        num_classes = int(evolution.preferred_class.max(initial=0)) + 1
        if class_names is not None:
            num_classes = max(num_classes, len(class_names))
        given = list(class_names) if class_names is not None else []
        names = tuple(str(c) for c in given[:num_classes])
        names += tuple(str(c) for c in range(len(names), num_classes))
        # the legend names up to 20 classes, else shows a few indices (see _class_legend)
        labels = (
            [_canvas.shorten(n, 40) for n in names] if num_classes <= 20 else [str(num_classes)]
        )
        top = _canvas.title_height(_evolution_title(evolution), _canvas.MAX_WIDTH)
        ticks, axis = analysis_ticks(evolution.epochs, evolution.steps)
        return cls(top, names, tuple(ticks), axis, _canvas.label_room(labels, 60))

    @property
    def key(self) -> tuple:
        return ("neuron_evolution", self.top, self.names, self.epochs, self.axis, self.room)

    @property
    def height(self) -> int:
        return self.top + 18 + _EVOLUTION_BODY + 34

    @property
    def heatmap_width(self) -> int:
        fixed = _EVOLUTION_LEFT + 8 + 12 + self.room + 10 + 8 + 10 + _EVOLUTION_RIGHT
        return (_canvas.MAX_WIDTH - fixed) // 2

    def boxes(self) -> tuple[Box, Box, Box, Box]:
        """The class map, the selectivity map, the legend and the colour bar."""
        y, w, h = self.top + 18, self.heatmap_width, _EVOLUTION_BODY
        legend = _EVOLUTION_LEFT + w + 8
        right = legend + 12 + self.room + 10
        return (
            (_EVOLUTION_LEFT, y, w, h),
            (right, y, w, h),
            (legend, y, 12, h),
            (right + w + 8, y, 10, h),
        )

    def extent(self, rows: int) -> tuple[float, float, float, float]:
        return (-0.5, len(self.epochs) - 0.5, rows - 0.5, -0.5)

    def pixels(self, evolution: NeuronEvolution) -> tuple[np.ndarray, np.ndarray]:
        """The two heatmaps' colours: ``[K, E, 3]`` classes (rows subsampled by the paste) and
        ``[rows, E, 3]`` selectivity (neighbouring neurons averaged where they outnumber the
        rows)."""
        preferred, selectivity = evolution.preferred_class, evolution.selectivity
        last_sel = np.nan_to_num(selectivity[-1], nan=0.0)
        order = np.lexsort((-last_sel, preferred[-1]))
        classes = class_colours(len(self.names))(preferred.T[order], bytes=True)[..., :3]
        shown = _canvas.block_means(selectivity.T[order], _EVOLUTION_BODY, len(self.epochs))
        return classes, _canvas.colormapped(shown, "viridis", 0.0, 1.0)


def _evolution_title(evolution: NeuronEvolution) -> str:
    changed = float(evolution.changed_fraction[-1]) if len(evolution.epochs) > 1 else 0.0
    ticks, axis = analysis_ticks(evolution.epochs, evolution.steps)
    return (
        f"{evolution.layer} ({evolution.preferred_class.shape[1]} neurons): preferred class "
        f"and selectivity over {axis}s ({changed:.0%} changed class at {axis} {ticks[-1]})"
    )


#: An axes' place in pixels: left, top, width, height (as :func:`_canvas.axes_at` takes it).
Box = tuple[int, int, int, int]


def _neuron_axes(fig: Figure, layout: _NeuronLayout) -> tuple[Axes, Axes]:
    """Everything of the neuron evolution figure but its title and heatmaps' colours: returns
    the class map's and the selectivity map's axes (placed in proportion to ``fig``'s size)."""
    width, height = float(_canvas.MAX_WIDTH), float(layout.height)

    def place(box: Box) -> Axes:
        left, top, w, h = box
        return fig.add_axes((left / width, 1.0 - (top + h) / height, w / width, h / height))

    class_box, sel_box, legend_box, bar_box = layout.boxes()
    ax_class, ax_sel = place(class_box), place(sel_box)
    for ax, title in ((ax_class, "preferred class"), (ax_sel, "selectivity")):
        ax.set_xlim(-0.5, len(layout.epochs) - 0.5)
        ax.set_title(title, fontsize=_canvas.FONT, pad=3)
        ax.set_yticks([])
        _epoch_ticks(ax, layout.epochs, layout.axis)
    ax_class.set_ylabel("neurons, by latest class", fontsize=_canvas.FONT, labelpad=2)
    _class_legend(place(legend_box), list(layout.names), class_colours(len(layout.names)))
    _canvas.colorbar(place(bar_box), "viridis", 0.0, 1.0, "")
    return ax_class, ax_sel


def _neuron_frame(layout: _NeuronLayout) -> Figure:
    """The neuron evolution figure without its title and with blank heatmaps."""
    fig = _canvas.new_figure(layout.height)
    blank = np.full((1, len(layout.epochs), 3), 255, dtype=np.uint8)
    for ax in _neuron_axes(fig, layout):
        ax.imshow(blank, aspect="auto", interpolation="nearest", extent=layout.extent(1))
    return fig


def _matched(labels: np.ndarray) -> np.ndarray:
    """``[E, C]`` labels renumbered, epoch by epoch, to agree best with the latest epoch's (the
    Hungarian matching of their contingency table), so a stable cluster keeps its colour."""
    from scipy.optimize import linear_sum_assignment

    out = labels.copy()
    ref = labels[-1]
    for e in range(labels.shape[0] - 1):
        row = labels[e]
        ids, ref_ids = np.unique(row[row >= 0]), np.unique(ref[ref >= 0])
        if not ids.size or not ref_ids.size:
            continue
        table = np.array([[np.sum((row == i) & (ref == j)) for j in ref_ids] for i in ids])
        r, c = linear_sum_assignment(-table)
        mapping = {int(ids[i]): int(ref_ids[j]) for i, j in zip(r, c, strict=True)}
        unmatched = [int(i) for i in ids if int(i) not in mapping]
        first = int(ref_ids.max()) + 1  # clusters without a match get colours of their own
        mapping.update({i: first + k for k, i in enumerate(unmatched)})
        out[e] = [mapping[int(v)] if v >= 0 else -1 for v in row]
    return out


def clustering_evolution_figure(
    evolution: ClusteringEvolution, *, figure: Figure | None = None
) -> Figure:
    """How far one view's category clustering moved over epochs: the adjusted Rand index of
    consecutive epochs' labels and the correlation of their class distances (left), and each
    class's cluster per epoch (right; clusters renumbered to match the latest epoch's, so a
    stable cluster keeps its colour; white: left out).

    Args:
        evolution: A :class:`~lightning_neurons.evolution.ClusteringEvolution`.
        figure: Draw into this figure instead of a new one.

    Returns:
        The figure.
    """
    fig = _figure(figure, 360)
    ticks, axis = analysis_ticks(evolution.epochs, evolution.steps)
    fig.suptitle(f"{evolution.view}: category clustering over {axis}s", fontsize=_canvas.TITLE_FONT)
    grid = fig.add_gridspec(
        1, 2, width_ratios=[1.2, 1], left=0.1, right=0.86, top=0.86, bottom=0.14, wspace=0.3
    )
    ax_lines, ax_labels = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    later = np.arange(1, len(ticks))  # each analysis after the first, at its place
    ax_lines.plot(later, evolution.adjusted_rand, "o-", label="adjusted Rand (labels)")
    ax_lines.plot(later, evolution.distance_correlation, "s--", label="distance correlation")
    values = np.concatenate([evolution.adjusted_rand, evolution.distance_correlation])
    low = float(np.nanmin(np.append(values, 0.0)))  # both can go below 0
    ax_lines.set_ylim(min(-0.1, low - 0.05), 1.05)
    _epoch_ticks(ax_lines, ticks[1:], f"{axis} (vs the previous analysed one)", start=1)
    ax_lines.tick_params(labelsize=_canvas.FONT)
    ax_lines.legend(fontsize=_canvas.FONT - 1, loc="lower right")
    ax_lines.grid(alpha=0.3)
    labels = _matched(evolution.labels).astype(np.float64)
    labels[labels < 0] = np.nan
    top = int(np.nanmax(labels)) + 1 if np.isfinite(labels).any() else 1
    cmap = class_colours(top).with_extremes(bad="white")
    ax_labels.imshow(
        np.ma.masked_invalid(labels.T),
        cmap=cmap,
        vmin=-0.5,
        vmax=top - 0.5,
        aspect="auto",
        interpolation="nearest",
    )
    names = evolution.class_names or [str(c) for c in range(labels.shape[1])]
    if len(names) <= 30:
        ax_labels.yaxis.tick_right()
        ax_labels.set_yticks(np.arange(len(names)), [_canvas.shorten(n, 50) for n in names])
    ax_labels.tick_params(axis="y", labelsize=_canvas.FONT, length=2, pad=1)
    ax_labels.set_title("cluster of each class", fontsize=_canvas.FONT)
    _epoch_ticks(ax_labels, ticks, axis)
    return fig


def comparison_figure(
    comparison: RunComparison,
    layer: str | None = None,
    view: str | None = None,
    *,
    figure: Figure | None = None,
) -> Figure:
    """What changed between two analyses: for one layer, how the neurons' preferred classes moved
    (a class x class count: off the diagonal, the neurons that changed class) and their
    selectivity before and after (neurons that changed class in orange); for one view of the
    category clustering, how much of each class's cluster company it kept (Jaccard overlap of its
    cluster-mates; below 1: the class moved).

    Args:
        comparison: From :func:`~lightning_neurons.evolution.compare_runs` or
            :func:`~lightning_neurons.evolution.compare_results`.
        layer: The layer shown (default: the deepest compared).
        view: The clustering view shown (default: the same as ``layer`` when clustered, else the
            last view).
        figure: Draw into this figure instead of a new one.

    Returns:
        The figure.
    """
    layer = layer if layer is not None else list(comparison.layers)[-1]
    change = comparison.layers[layer]
    cats = comparison.categories
    if view is None and cats:
        view = layer if layer in cats else list(cats)[-1]
    category = cats.get(view) if view is not None else None
    a, b = comparison.label_a, comparison.label_b
    fig = _figure(figure, 620 if category is not None else 330)
    _title(
        fig,
        f"{layer}: {a} vs {b}; {change.changed.size} of {change.preferred_a.size} neurons "
        "changed class",
    )
    rows = 2 if category is not None else 1
    grid = fig.add_gridspec(
        rows,
        2,
        left=0.12,
        right=0.96,
        top=0.87 if rows == 2 else 0.76,
        bottom=0.1 if rows == 2 else 0.16,
        wspace=0.35,
        hspace=0.55,
    )
    names = category.class_names if category is not None else None
    _transitions(fig.add_subplot(grid[0, 0]), change.preferred_a, change.preferred_b, names, a, b)
    _selectivity(fig.add_subplot(grid[0, 1]), change, a, b)
    if category is not None:
        _company(fig.add_subplot(grid[1, :]), category)
    return fig


def _transitions(
    ax: Axes, pa: np.ndarray, pb: np.ndarray, names: Sequence[str] | None, a: str, b: str
) -> None:
    n = max(int(pa.max(initial=0)), int(pb.max(initial=0))) + 1
    if names is not None:
        n = max(n, len(names))
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (pa, pb), 1)
    shade = np.log1p(counts) / max(np.log1p(counts.max()), 1e-9)
    ax.imshow(shade, cmap="Blues", vmin=0.0, vmax=1.6, aspect="auto", interpolation="nearest")
    if n <= 12:
        for i, j in zip(*np.nonzero(counts), strict=True):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=_canvas.FONT - 1)
        labels = list(names)[:n] if names is not None else [str(c) for c in range(n)]
        ax.set_xticks(np.arange(n), labels)
        ax.set_yticks(np.arange(n), labels)
    ax.tick_params(labelsize=_canvas.FONT, length=2, pad=1)
    ax.set_xlabel(f"preferred class, {b}", fontsize=_canvas.FONT)
    ax.set_ylabel(f"preferred class, {a}", fontsize=_canvas.FONT)
    ax.set_title("neurons per class change", fontsize=_canvas.FONT)


def _selectivity(ax: Axes, change: LayerChange, a: str, b: str) -> None:
    moved = np.zeros(change.preferred_a.size, dtype=bool)
    moved[change.changed] = True
    sa, sb = change.selectivity_a, change.selectivity_b
    ax.scatter(sa[~moved], sb[~moved], s=8, color="0.55", label="kept class")
    ax.scatter(sa[moved], sb[moved], s=10, color="tab:orange", label="changed class")
    ax.plot([0, 1], [0, 1], color="0.3", lw=0.8, ls=":")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"selectivity, {a}", fontsize=_canvas.FONT)
    ax.set_ylabel(f"selectivity, {b}", fontsize=_canvas.FONT)
    ax.tick_params(labelsize=_canvas.FONT)
    ax.legend(fontsize=_canvas.FONT - 1, loc="upper left")


def _company(ax: Axes, category: CategoryChange) -> None:
    overlap = np.nan_to_num(category.mates_overlap, nan=1.0)
    colours = np.where(overlap < 1.0, "tab:orange", "tab:blue")
    x = np.arange(overlap.size)
    ax.bar(x, overlap, color=colours)
    if overlap.size <= 30:
        ax.set_xticks(x, [_canvas.shorten(n, 40) for n in category.class_names], rotation=90)
    ax.set_ylim(0, 1.05)
    ax.tick_params(labelsize=_canvas.FONT)
    ax.set_ylabel("cluster-mates kept", fontsize=_canvas.FONT)
    ax.set_title(
        f"category clustering of {_canvas.shorten(category.view, 200)}: "
        f"{category.moved.size} of {overlap.size} classes moved\n"
        f"adjusted Rand {category.adjusted_rand:.2f}, distance correlation "
        f"{category.distance_correlation:.2f}",
        fontsize=_canvas.FONT,
    )
