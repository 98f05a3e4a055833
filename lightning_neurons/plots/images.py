"""Labelled image grids: rendered images (preference) and saliency overlays (focus).

The grids are drawn as one mosaic in one axes with text labels, which is much faster to draw
(and to log every epoch) than one matplotlib axes per image.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lightning_neurons.errors import NeuronsError  # noqa: E402

_PAD = 2  # pixels between cells (in image pixels)


def _as_rgb(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` (C = 1 or 3) in [0, 1] -> ``[N, H, W, 3]`` float numpy."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NeuronsError(f"images must be [N, 1 or 3, H, W] tensors, got {shape}")
    array = images.detach().float().cpu().clamp(0, 1)
    if array.shape[1] == 1:
        array = array.expand(-1, 3, -1, -1)
    return array.permute(0, 2, 3, 1).numpy()


def stretch(images: torch.Tensor) -> torch.Tensor:
    """Scale each image's values to span [0, 1] (for display only)."""
    flat = images.flatten(1)
    low = flat.amin(dim=1).view(-1, *([1] * (images.dim() - 1)))
    high = flat.amax(dim=1).view(-1, *([1] * (images.dim() - 1)))
    return (images - low) / (high - low).clamp_min(1e-8)


def _mosaic(cells: np.ndarray, ncols: int) -> np.ndarray:
    n, h, w, c = cells.shape
    nrows = math.ceil(n / ncols)
    canvas = np.ones((nrows * (h + _PAD) + _PAD, ncols * (w + _PAD) + _PAD, c), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, ncols)
        top, left = _PAD + r * (h + _PAD), _PAD + k * (w + _PAD)
        canvas[top : top + h, left : left + w] = cells[i]
    return canvas


def _grid_figure(
    cells: np.ndarray,
    labels: Sequence[str] | None,
    colors: Sequence[str] | None,
    ncols: int | None,
    title: str | None,
    cell_inches: float,
) -> Figure:
    n, h, w, _ = cells.shape
    ncols = ncols or min(n, max(1, math.ceil(math.sqrt(n * 1.5))))
    nrows = math.ceil(n / ncols)
    label_band = 0.22 if labels is not None else 0.0
    fig = plt.figure(
        figsize=(
            ncols * cell_inches,
            nrows * cell_inches * (1 + label_band) + (0.35 if title else 0.1),
        ),
        dpi=100,
    )
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - (0.35 / fig.get_figheight() if title else 0.0)))
    if labels is not None:
        # taller cells: each image gets a band above it for its label
        band = max(1, round(h * label_band))
        padded = np.ones((n, h + band, w, 3), dtype=np.float32)
        padded[:, band:] = cells
        cells, h = padded, h + band
    ax.imshow(_mosaic(cells, ncols), interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    if labels is not None:
        size = max(6.0, min(9.0, 80.0 * cell_inches / max(6, max(len(s) for s in labels) + 2)))
        for i, text in enumerate(labels):
            r, k = divmod(i, ncols)
            x = _PAD + k * (w + _PAD) + w / 2
            y = _PAD + r * (h + _PAD) + band / 2
            color = colors[i] if colors is not None else "black"
            ax.text(x, y, text, ha="center", va="center", fontsize=size, color=color)
    if title:
        lines = textwrap.wrap(title, width=max(20, int(fig.get_figwidth() * 13)))
        fig.suptitle("\n".join(lines[:2]), fontsize=9, y=1.0 - 0.03 / fig.get_figheight(), va="top")
    return fig


def image_grid(
    images: torch.Tensor,
    labels: Sequence[str] | None = None,
    *,
    ncols: int | None = None,
    title: str | None = None,
    normalize: bool = False,
    cell_inches: float = 1.0,
) -> Figure:
    """A grid of images, each with its label above it.

    Args:
        images: ``[N, C, H, W]`` with ``C`` 1 (grey) or 3 (RGB), values in [0, 1].
        labels: One label per image (e.g. ``"ch 12 · 2.3x"``).
        ncols: Images per row (default: about ``sqrt(1.5 N)``).
        title: Figure title.
        normalize: Stretch each image to span [0, 1] (contrast for display only).
        cell_inches: Size of one image in the figure.

    Returns:
        The figure (close it after use; :meth:`AnalysisLogger.figure` does).

    Raises:
        NeuronsError: For images of another shape, or a label count that differs.

    Example:
        >>> fig = image_grid(torch.rand(8, 1, 32, 32), [f"ch {i}" for i in range(8)])
    """
    if labels is not None and len(labels) != len(images):
        raise NeuronsError(f"need one label per image: {len(images)} images, {len(labels)} labels")
    if normalize:
        images = stretch(images.float())
    return _grid_figure(_as_rgb(images), labels, None, ncols, title, cell_inches)


def overlay(
    images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5, cmap: str = "jet"
) -> torch.Tensor:
    """Blend saliency maps (scaled per map to [0, 1]) in colour over grey versions of the images.

    Args:
        images: ``[N, C, H, W]`` in [0, 1].
        maps: ``[N, H, W]`` non-negative maps of the same size.
        alpha: Weight of the map's colour.
        cmap: A matplotlib colour map.

    Returns:
        ``[N, 3, H, W]`` RGB images in [0, 1].

    Raises:
        NeuronsError: If the shapes do not match.
    """
    if (
        maps.dim() != 3
        or maps.shape[0] != images.shape[0]
        or tuple(maps.shape[1:]) != tuple(images.shape[-2:])
    ):
        raise NeuronsError(
            f"maps must be [N, H, W] matching images {tuple(images.shape)}; got {tuple(maps.shape)}"
        )
    grey = images.detach().float().cpu().clamp(0, 1).mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    scaled = maps.detach().float().cpu()
    scaled = scaled / scaled.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    colored = (
        torch.from_numpy(plt.get_cmap(cmap)(scaled.numpy())[..., :3]).float().permute(0, 3, 1, 2)
    )
    weight = alpha * scaled.clamp(0, 1).unsqueeze(1)
    return ((1 - weight) * grey + weight * colored).clamp(0, 1)


def saliency_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    predicted: Sequence[int] | torch.Tensor,
    true: Sequence[int] | torch.Tensor,
    *,
    class_names: Sequence[str] | None = None,
    ncols: int | None = None,
    title: str | None = None,
    alpha: float = 0.7,
    cell_inches: float = 1.4,
) -> Figure:
    """Saliency maps over their images, labelled ``pred X / true Y`` (red where wrong).

    Args:
        images: ``[N, C, H, W]`` probe images in [0, 1].
        maps: ``[N, H, W]`` saliency maps.
        predicted: Predicted class per image.
        true: True class per image.
        class_names: Names of the classes (default: their indices).
        ncols: Images per row.
        title: Figure title.
        alpha: Weight of the map's colour.
        cell_inches: Size of one image in the figure.

    Returns:
        The figure.

    Raises:
        NeuronsError: If the counts or shapes do not match.
    """
    predicted = [int(p) for p in predicted]
    true = [int(t) for t in true]
    if not len(predicted) == len(true) == len(images):
        raise NeuronsError(
            f"need one predicted and one true label per image: {len(images)} images, "
            f"{len(predicted)} predicted, {len(true)} true"
        )

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)

    labels = [f"pred {name(p)} / true {name(t)}" for p, t in zip(predicted, true, strict=True)]
    colors = ["black" if p == t else "red" for p, t in zip(predicted, true, strict=True)]
    cells = _as_rgb(overlay(images, maps, alpha=alpha))
    return _grid_figure(cells, labels, colors, ncols, title, cell_inches)
