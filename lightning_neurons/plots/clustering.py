"""Figures of category and neuron clustering (each returns a ``matplotlib.figure.Figure``)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: Above this many classes tick labels are left out (they would overlap).
MAX_TICK_LABELS = 60


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
) -> tuple[Figure, list[int]]:
    """A dendrogram of the categories, coloured by the ``n_clusters`` cut.

    Args:
        linkage: SciPy linkage matrix (``CategoryClusterer.linkage_``).
        class_names: Leaf labels.
        n_clusters: Colour the clusters of this cut.
        title: Axes title.

    Returns:
        ``(figure, leaf_order)``: the figure (close it after use) and the category indices from
        left to right, to order other plots alike.
    """
    from scipy.cluster.hierarchy import dendrogram

    n = linkage.shape[0] + 1
    names = _names(class_names, n)
    width = min(16.0, 3.0 + 0.35 * n)
    fig, ax = plt.subplots(figsize=(width, 4.0), constrained_layout=True)
    threshold = cut_threshold(linkage, n_clusters) if n_clusters else None
    tree = dendrogram(
        linkage,
        labels=names if n <= MAX_TICK_LABELS * 2 else None,
        no_labels=n > MAX_TICK_LABELS * 2,
        color_threshold=threshold,
        above_threshold_color="0.5",
        leaf_rotation=90,
        ax=ax,
    )
    if threshold is not None:
        ax.axhline(threshold, color="0.3", linestyle="--", linewidth=0.8)
    ax.set_ylabel("distance")
    ax.set_title(title)
    return fig, [int(i) for i in tree["leaves"]]


def _heatmap(
    ax, matrix: np.ndarray, names: list[str], title: str, cmap: str, label: str, fig: Figure
) -> None:
    im = ax.imshow(matrix, cmap=cmap, interpolation="nearest")
    if len(names) <= MAX_TICK_LABELS:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label=label)


def distance_confusion_figure(
    distances: np.ndarray,
    confusion: np.ndarray | None,
    class_names: Sequence[str] | None = None,
    order: Sequence[int] | None = None,
    agreement: float | None = None,
    title: str = "",
) -> Figure:
    """The class-distance matrix next to the (row-normalised) confusion matrix.

    Args:
        distances: ``[C, C]`` class distances.
        confusion: ``[C, C]`` counts (rows: true class, columns: predicted); ``None`` shows the
            distances alone.
        class_names: Tick labels.
        order: Category order for both matrices (e.g. the dendrogram's leaves).
        agreement: The agreement figure to print in the title.
        title: Figure title.

    Returns:
        The figure.
    """
    n = distances.shape[0]
    order = list(order) if order is not None else list(range(n))
    names = [_names(class_names, n)[i] for i in order]
    panels = 2 if confusion is not None else 1
    side = min(8.0, 2.5 + 0.3 * n)
    fig, axes = plt.subplots(
        1, panels, figsize=(side * panels + 1.0, side), constrained_layout=True, squeeze=False
    )
    _heatmap(
        axes[0, 0],
        distances[np.ix_(order, order)],
        names,
        "class distance",
        "viridis_r",
        "distance",
        fig,
    )
    if confusion is not None:
        rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
        rates = rates[np.ix_(order, order)].astype(float)
        accuracy = float(np.trace(confusion) / max(confusion.sum(), 1))
        # The diagonal (correct predictions) would swamp the colour scale of the mistakes.
        np.fill_diagonal(rates, np.nan)
        _heatmap(
            axes[0, 1],
            rates,
            names,
            f"confusions (row-normalised, diagonal hidden; accuracy {accuracy:.1%})",
            "magma_r",
            "rate",
            fig,
        )
        axes[0, 1].set_xlabel("predicted")
        axes[0, 1].set_ylabel("true")
    if agreement is not None:
        title = (
            f"{title}  (Spearman agreement {agreement:.2f})"
            if np.isfinite(agreement)
            else f"{title}  (agreement undefined: no confusions)"
        )
    fig.suptitle(title)
    return fig


def cluster_profiles_figure(
    cluster_profiles: np.ndarray,
    cluster_sizes: Sequence[int],
    class_names: Sequence[str] | None = None,
    noise: int = 0,
    title: str = "",
) -> Figure:
    """Each neuron cluster's mean (normalised) response across the classes.

    Args:
        cluster_profiles: ``[n_clusters, C]`` (``NeuronClusterer.cluster_profiles_``).
        cluster_sizes: Neurons per cluster.
        class_names: Tick labels.
        noise: Neurons left unclustered, for the title.
        title: Title.

    Returns:
        The figure.
    """
    k, n = cluster_profiles.shape if cluster_profiles.ndim == 2 else (0, len(class_names or []))
    names = _names(class_names, n)
    fig, ax = plt.subplots(
        figsize=(min(16.0, 3.0 + 0.35 * n), 1.5 + 0.35 * max(k, 1)), constrained_layout=True
    )
    if k == 0:
        ax.text(0.5, 0.5, "no clusters found", ha="center", va="center")
        ax.set_axis_off()
    else:
        limit = float(np.abs(cluster_profiles).max()) or 1.0
        im = ax.imshow(
            cluster_profiles,
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
            aspect="auto",
            interpolation="nearest",
        )
        if n <= MAX_TICK_LABELS:
            ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(
            range(k), [f"{i} ({int(s)})" for i, s in enumerate(cluster_sizes)], fontsize=7
        )
        ax.set_ylabel("cluster (neurons)")
        fig.colorbar(im, ax=ax, label="mean normalised response")
    ax.set_title(f"{title}  [{int(noise)} unclustered]" if noise else title)
    return fig
