"""Figures of neuron contribution: the class x neuron heatmap with domination, the ablation matrix,
and the probe-image grid."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lightning_neurons.contribution import ContributionStats  # noqa: E402


def _names(class_names: Sequence[str] | None, n: int) -> list[str]:
    return list(class_names) if class_names is not None else [str(c) for c in range(n)]


def contribution_order(class_contribution: torch.Tensor) -> torch.Tensor:
    """Neurons ordered by the class they contribute most to, then by falling contribution, so
    each class's neurons form a block."""
    m = torch.nan_to_num(class_contribution.double(), nan=0.0)
    best, cls = m.max(dim=0)
    scale = float(best.abs().max()) or 1.0
    key = cls.double() * 4.0 - best / scale  # best / scale in [-1, 1]
    return torch.argsort(key, stable=True)


def contribution_figure(
    stats: ContributionStats, class_names: Sequence[str] | None = None, max_neurons: int = 256
) -> Figure:
    """Class x neuron heatmap of the mean contribution to each class's logit, and each class's
    domination.

    Left: ``class_contribution`` (red: raises the class's logit, blue: lowers it), neurons grouped by
    the class they contribute most to; the class's dominant neurons are ringed. Right: the share
    of each class's positive contribution carried by its ``top_k`` dominant neurons.

    Args:
        stats: A layer's :class:`~lightning_neurons.contribution.ContributionStats`.
        class_names: Tick labels for the classes.
        max_neurons: Show at most this many neurons (those with the largest contribution to any
            class; every dominant neuron is kept).

    Returns:
        The figure (close it after use).
    """
    m = torch.nan_to_num(stats.class_contribution.double(), nan=0.0)
    num_classes, num_neurons = m.shape
    order = contribution_order(m)
    if num_neurons > max_neurons:
        strength = m.abs().amax(dim=0)
        strength[stats.dominant.flatten()] = torch.inf
        keep = torch.argsort(strength, descending=True)[:max_neurons]
        order = order[torch.isin(order, keep)]
    shown = m[:, order].numpy()
    limit = float(np.abs(shown).max()) or 1.0
    names = _names(class_names, num_classes)
    width = min(16.0, 5.0 + 0.04 * len(order))
    fig, (ax, bar) = plt.subplots(
        1,
        2,
        figsize=(width, 1.4 + 0.3 * num_classes),
        gridspec_kw={"width_ratios": [max(4.0, width - 3.0), 2.0]},
        constrained_layout=True,
    )
    im = ax.imshow(
        shown, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
    )
    column = {int(n): i for i, n in enumerate(order.tolist())}
    rows, cols = [], []
    for c in range(num_classes):
        for n in stats.dominant[c].tolist():
            if n in column:
                rows.append(c)
                cols.append(column[n])
    ax.scatter(cols, rows, s=14, facecolors="none", edgecolors="black", linewidths=0.8)
    ax.set_yticks(range(num_classes), names)
    ax.set_ylabel("class")
    ax.set_xlabel(
        f"neuron (grouped by the class it contributes most to; {len(order)} of {num_neurons})"
    )
    ax.set_title(
        f"{stats.layer}: mean contribution to the class's logit (rings: top {stats.dominant.shape[1]})"
    )
    fig.colorbar(im, ax=ax, label="activation x gradient", pad=0.01)
    share = stats.domination.double().numpy()
    bar.barh(range(num_classes), share, color="tab:red")
    bar.set_xlim(0, 1)
    bar.set_ylim(num_classes - 0.5, -0.5)
    bar.set_yticks(range(num_classes), names)
    bar.set_xlabel(f"share carried by top {stats.dominant.shape[1]}")
    bar.set_title(f"domination (mean {share.mean():.2f})")
    return fig


def ablation_figure(
    accuracy_drop: torch.Tensor,
    set_names: Sequence[str],
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """Accuracy drop of every class (columns) when each neuron set (rows) is zeroed.

    Args:
        accuracy_drop: ``[S, C]`` accuracy without minus with the ablation.
        set_names: Row labels (the ablated sets).
        class_names: Column labels.
        title: Figure title.

    Returns:
        The figure (close it after use).
    """
    drop = torch.as_tensor(accuracy_drop, dtype=torch.float64).numpy()
    num_sets, num_classes = drop.shape
    fig, ax = plt.subplots(
        figsize=(min(16.0, 2.5 + 0.45 * num_classes), min(16.0, 1.2 + 0.3 * num_sets)),
        constrained_layout=True,
    )
    im = ax.imshow(drop, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks(
        range(num_classes), _names(class_names, num_classes), rotation=90 if num_classes > 12 else 0
    )
    ax.set_yticks(range(num_sets), list(set_names))
    ax.set_xlabel("class")
    ax.set_ylabel("zeroed neurons")
    if num_sets * num_classes <= 400:
        for (r, c), value in np.ndenumerate(drop):
            if np.isfinite(value):
                ax.text(
                    c,
                    r,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if abs(value) > 0.6 else "black",
                )
    ax.set_title(title or "accuracy drop when zeroed")
    fig.colorbar(im, ax=ax, label="accuracy drop", pad=0.01)
    return fig


def _tile(image: torch.Tensor, size: int) -> torch.Tensor:
    """One image ``[C, H, W]`` (or ``[H, W]``) as ``[3, size, size]`` scaled to [0, 1]."""
    image = image.detach().float().cpu()
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] != 3:
        image = (
            image[:3] if image.shape[0] > 3 else image.mean(dim=0, keepdim=True).expand(3, -1, -1)
        )
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 1:
        image = (image - low) / (high - low if high > low else 1.0)
    return F.interpolate(image.unsqueeze(0), size=(size, size), mode="nearest")[0]


def probe_grid(
    probes: torch.Tensor,
    preferred: Sequence[Sequence[torch.Tensor | None]],
    size: int = 48,
    pad: int = 2,
) -> torch.Tensor:
    """A grid image: one row per probe image, followed by the preferred images of the neurons that
    contributed most to its prediction (grey where none is available).

    Args:
        probes: ``[P, C, H, W]`` probe images.
        preferred: For each probe, the images ``[C, H, W]`` (or ``None``) of its top neurons.
        size: Side of each tile in pixels.
        pad: White space between tiles.

    Returns:
        ``[3, H, W]`` image in [0, 1].
    """
    num_rows = probes.shape[0]
    num_cols = 1 + max((len(row) for row in preferred), default=0)
    step = size + pad
    grid = torch.ones(3, num_rows * step + pad, num_cols * step + 3 * pad)
    for r in range(num_rows):
        tiles = [
            _tile(probes[r], size),
            *[
                _tile(p, size) if p is not None else torch.full((3, size, size), 0.5)
                for p in preferred[r]
            ],
        ]
        for c, tile in enumerate(tiles):
            left = pad + c * step + (2 * pad if c > 0 else 0)  # a gap after the probe column
            top = pad + r * step
            grid[:, top : top + size, left : left + size] = tile
    return grid
