"""Figures of the ActivationTracker's statistics."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lightning_neurons.stats import LayerStats  # noqa: E402


def neuron_order(means: torch.Tensor, selectivity: torch.Tensor) -> torch.Tensor:
    """Order neurons by preferred class, then by falling selectivity, so blocks show."""
    preferred = torch.nan_to_num(means, nan=-torch.inf).argmax(dim=0)
    sel = torch.nan_to_num(selectivity, nan=0.0)
    key = preferred.double() * 10.0 - sel.double()  # sel in [0, 1]
    return torch.argsort(key, stable=True)


def class_profile_heatmap(
    stats: LayerStats, class_names: Sequence[str] | None = None, max_neurons: int = 512
) -> Figure:
    """Class x neuron heatmap of a layer's class profile, each neuron scaled to [0, 1].

    Neurons are sorted by their preferred class, then by selectivity, so selective neurons form
    a block diagonal. Dead neurons are drawn last.

    Args:
        stats: A layer's :class:`~lightning_neurons.stats.LayerStats`.
        class_names: Tick labels for the classes.
        max_neurons: Show at most this many neurons (the most selective ones).

    Returns:
        The figure (close it after use).
    """
    means = stats.class_means.double()
    order = neuron_order(means, stats.selectivity)
    alive = order[~stats.dead[order]]
    order = torch.cat([alive, order[stats.dead[order]]])
    if order.numel() > max_neurons:
        keep = torch.argsort(torch.nan_to_num(stats.selectivity, nan=0.0), descending=True)[
            :max_neurons
        ]
        order = order[torch.isin(order, keep)]
    m = means[:, order].numpy()
    low = np.nanmin(m, axis=0, keepdims=True)
    high = np.nanmax(m, axis=0, keepdims=True)
    scaled = (m - low) / np.where(high - low > 0, high - low, 1.0)
    num_classes, num_neurons = scaled.shape
    width = min(14.0, max(7.0, 3.0 + 0.04 * num_neurons))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.3 * num_classes), constrained_layout=True)
    im = ax.imshow(scaled, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    ax.set_yticks(range(num_classes), names)
    ax.set_ylabel("class")
    ax.set_xlabel(
        f"neuron (sorted by preferred class, then selectivity; {int(stats.dead.sum())} dead at right)"
    )
    ax.set_title(
        f"{stats.layer}: class profile, epoch {stats.epoch} "
        f"(mean selectivity {float(stats.selectivity.nanmean()):.2f})"
    )
    fig.colorbar(im, ax=ax, label="activation, scaled per neuron")
    return fig
