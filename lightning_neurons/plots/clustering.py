"""Figures of category and neuron clustering (each returns a bounded ``[H, W, 3]`` uint8 image)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lightning_neurons.plots import _canvas

#: Above this many classes the rows and columns of the matrices are numbered instead of named.
MAX_TICK_LABELS = 20
#: The dendrogram shows at most this many leaves (above, the top branches, with their sizes).
MAX_LEAVES = 30
#: Neuron clusters shown at most (the largest ones).
MAX_CLUSTERS = 30


def _names(class_names: Sequence[str] | None, n: int) -> list[str]:
    if class_names is not None and len(class_names) == n:
        return [str(c) for c in class_names]
    return [str(c) for c in range(n)]


def cut_threshold(linkage: np.ndarray, n_clusters: int) -> float:
    """A merge height that cuts the tree into ``n_clusters`` clusters (for colouring).

    Args:
        linkage: SciPy linkage matrix ``[n - 1, 4]``.
        n_clusters: Clusters wanted.

    Returns:
        The midpoint between the last merge kept and the first one cut.
    """
    heights = np.sort(linkage[:, 2])
    if n_clusters <= 1 or heights.size == 0:
        return float(heights.max() * 1.01 + 1e-12) if heights.size else 1.0
    if n_clusters > heights.size:
        return float(heights.min() / 2.0)
    return float((heights[-n_clusters] + heights[-n_clusters + 1]) / 2.0)


def dendrogram_figure(
    linkage: np.ndarray,
    class_names: Sequence[str] | None = None,
    n_clusters: int | None = None,
    title: str = "",
) -> tuple[np.ndarray, list[int]]:
    """A dendrogram of the categories, coloured by the ``n_clusters`` cut.

    The image is 480 x at most 340 pixels. Up to 30 categories every leaf is named; above, the
    tree is drawn down to its 30 top branches, each labelled with its number of categories (the
    whole tree is the linkage matrix in the ``.npz``).

    Args:
        linkage: SciPy linkage matrix (``CategoryClusterer.linkage_``).
        class_names: Leaf labels.
        n_clusters: Colour the clusters of this cut.
        title: Title (keep it short: two lines of about 60 characters are shown).

    Returns:
        ``(image, leaf_order)``: the image, ``[H, W, 3]`` uint8 with ``W <= 480`` and
        ``H <= 720``, and all the category indices from left to right, to order other plots alike.
    """
    from scipy.cluster.hierarchy import dendrogram, leaves_list

    n = linkage.shape[0] + 1
    names = [_canvas.shorten(name, 64) for name in _names(class_names, n)]
    truncated = n > MAX_LEAVES
    left, bottom = 52, 82
    fig, top = _canvas.titled_figure(title, body=300)
    ax = _canvas.axes_at(fig, left, top + 6, _canvas.MAX_WIDTH - left - 10, 300 - 6 - bottom)
    threshold = cut_threshold(linkage, n_clusters) if n_clusters else None
    tree = dendrogram(
        linkage,
        labels=names,
        truncate_mode="lastp" if truncated else None,
        p=MAX_LEAVES,
        color_threshold=threshold,
        above_threshold_color="0.5",
        leaf_rotation=90,
        leaf_font_size=_canvas.FONT,
        ax=ax,
    )
    if threshold is not None:
        ax.axhline(threshold, color="0.3", linestyle="--", linewidth=0.8)
    _canvas.pixel_ticks(ax, "x", ax.get_xticks(), tree["ivl"], rotate=True)  # leaves, in order
    ax.set_ylabel("distance", fontsize=_canvas.FONT, labelpad=2)
    ax.tick_params(axis="y", labelsize=_canvas.FONT, length=2, pad=1)
    if truncated:
        ax.set_xlabel(f"top {MAX_LEAVES} branches of {n} classes, (size)", fontsize=_canvas.FONT)
        return _canvas.render(fig), [int(i) for i in leaves_list(linkage)]  # the same order
    return _canvas.render(fig), [int(i) for i in tree["leaves"]]


def _matrix_panel(
    fig: Figure, left: float, top: float, side: float, matrix: np.ndarray, cmap: str, vmax: float
) -> Axes:
    ax = _canvas.axes_at(fig, left, top, side, side)
    _canvas.heatmap(ax, matrix, cmap, 0.0, vmax)
    return ax


def distance_confusion_figure(
    distances: np.ndarray,
    confusion: np.ndarray | None,
    class_names: Sequence[str] | None = None,
    order: Sequence[int] | None = None,
    agreement: float | None = None,
    title: str = "",
) -> np.ndarray:
    """The class-distance matrix next to the (row-normalised) confusion matrix.

    The image is 480 x at most 420 pixels. Up to 20 classes the rows and columns are named; above,
    numbered, and where classes outnumber a panel's pixels, neighbouring classes (in ``order``:
    pass the dendrogram's leaves so that they are clusters) share a pixel, the mean of their cells.
    The full matrices are in the ``.npz``.

    Args:
        distances: ``[C, C]`` class distances.
        confusion: ``[C, C]`` counts (rows: true class, columns: predicted); ``None`` shows the
            distances alone.
        class_names: Tick labels.
        order: Category order for both matrices (e.g. the dendrogram's leaves).
        agreement: The agreement figure to print in the title.
        title: Figure title.

    Returns:
        The image, ``[H, W, 3]`` uint8 with ``W <= 480`` and ``H <= 720``.
    """
    n = distances.shape[0]
    order = list(order) if order is not None else list(range(n))
    all_names = _names(class_names, n)
    names = [all_names[i] for i in order]
    named = n <= MAX_TICK_LABELS
    if agreement is not None:
        title = (
            f"{title} (Spearman agreement {agreement:.2f})"
            if np.isfinite(agreement)
            else f"{title} (agreement undefined: no confusions)"
        )
    left, gap = (_canvas.label_room(names, 80) + 4, 28) if named else (40, 28)
    panels = 2 if confusion is not None else 1
    side = min(200, (_canvas.MAX_WIDTH - left - 18 - gap * (panels - 1)) // panels)
    ticks_room, rotate = _canvas.column_labels(names, side, 70) if named else (18, False)
    fig, top = _canvas.titled_figure(title, body=20 + side + ticks_room + 44)
    top += 18  # the panel titles
    dist = distances[np.ix_(order, order)].astype(float)
    vmax = float(np.nanmax(dist)) if dist.size and np.isfinite(dist).any() else 1.0
    axes = [_matrix_panel(fig, left, top, side, dist, "viridis_r", vmax or 1.0)]
    axes[0].set_title("class distance", fontsize=_canvas.FONT, pad=3)
    bars = [("viridis_r", vmax or 1.0, "distance")]
    if confusion is not None:
        rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
        rates = rates[np.ix_(order, order)].astype(float)
        accuracy = float(np.trace(confusion) / max(confusion.sum(), 1))
        # The diagonal (correct predictions) would swamp the colour scale of the mistakes.
        np.fill_diagonal(rates, np.nan)
        high = float(np.nanmax(rates)) if np.isfinite(rates).any() else 0.0
        axes.append(_matrix_panel(fig, left + side + gap, top, side, rates, "magma_r", high or 1.0))
        axes[1].set_title(f"confusions (accuracy {accuracy:.1%})", fontsize=_canvas.FONT, pad=3)
        bars.append(("magma_r", high or 1.0, "rate, row = true class"))
    for i, ax in enumerate(axes):
        if named:
            _canvas.label_ticks(ax, "x", names, room=ticks_room - 8, rotate=rotate)
            if i == 0:
                _canvas.label_ticks(ax, "y", names, room=left - 8)
            else:
                ax.set_yticks([])
        else:
            _canvas.index_ticks(ax, "x", n)
            if i == 0:
                _canvas.index_ticks(ax, "y", n)
            else:
                ax.set_yticks([])
        cmap, high, label = bars[i]
        _canvas.pixel_colorbar(
            fig,
            (left + i * (side + gap), top + side + ticks_room + 2, side, 8),
            cmap,
            0.0,
            high,
            label,
        )
    return _canvas.render(fig)


def cluster_profiles_figure(
    cluster_profiles: np.ndarray,
    cluster_sizes: Sequence[int],
    class_names: Sequence[str] | None = None,
    noise: int = 0,
    title: str = "",
) -> np.ndarray:
    """Each neuron cluster's mean (normalised) response across the classes.

    The image is 480 x at most 560 pixels: the 30 largest clusters at most (rows, labelled
    ``id (neurons)``); up to 30 classes named, above numbered, and where classes outnumber the
    pixels, neighbouring classes share one (the mean). The full profiles are in the ``.npz``.

    Args:
        cluster_profiles: ``[n_clusters, C]`` (``NeuronClusterer.cluster_profiles_``).
        cluster_sizes: Neurons per cluster.
        class_names: Tick labels.
        noise: Neurons left unclustered, for the title.
        title: Title.

    Returns:
        The image, ``[H, W, 3]`` uint8 with ``W <= 480`` and ``H <= 720``.
    """
    k, n = cluster_profiles.shape if cluster_profiles.ndim == 2 else (0, len(class_names or []))
    names = _names(class_names, n)
    title = f"{title} [{int(noise)} unclustered]" if noise else title
    if k == 0:
        fig, top = _canvas.titled_figure(title, body=60)
        _canvas.pixel_text(
            fig, fig.bbox.width / 2, top + 30, "no clusters found", size=_canvas.FONT
        )
        return _canvas.render(fig)
    sizes = np.asarray(cluster_sizes)
    rows = np.arange(k)
    if k > MAX_CLUSTERS:
        rows = np.sort(np.argsort(-sizes, kind="stable")[:MAX_CLUSTERS])
    named = n <= 30
    left, right = 70, 62
    rows_px = int(np.clip(len(rows) * 18, 90, 440))
    width = _canvas.MAX_WIDTH - left - right
    ticks_room, rotate = _canvas.column_labels(names, width, 70) if named else (18, False)
    fig, top = _canvas.titled_figure(title, body=rows_px + ticks_room + (6 if named else 22))
    ax = _canvas.axes_at(fig, left, top + 4, width, rows_px)
    shown = cluster_profiles[rows]
    limit = float(np.nanmax(np.abs(shown))) if np.isfinite(shown).any() else 1.0
    _canvas.heatmap(ax, shown, "RdBu_r", -(limit or 1.0), limit or 1.0)
    _canvas.label_ticks(ax, "y", [f"{i} ({int(sizes[i])})" for i in rows], room=left - 20)
    which = f"{len(rows)} largest of {k} clusters" if len(rows) < k else "cluster"
    ax.set_ylabel(f"{which} (size)", fontsize=_canvas.FONT, labelpad=2)
    if named:
        _canvas.label_ticks(ax, "x", names, room=ticks_room - 8, rotate=rotate)
    else:
        _canvas.index_ticks(ax, "x", n)
        ax.set_xlabel("class", fontsize=_canvas.FONT, labelpad=1)
    _canvas.pixel_colorbar(
        fig,
        (left + width + 8, top + 4, 10, rows_px),
        "RdBu_r",
        -(limit or 1.0),
        limit or 1.0,
        "mean response",
    )
    return _canvas.render(fig)
