"""Labelled image grids: rendered images (preference) and saliency overlays (focus).

The grids are drawn straight into pixels: the tiles pasted into one image, the title and the
labels drawn by :mod:`~lightning_neurons.plots._text` (matplotlib's fonts without its artists),
which is much faster to draw (and to log every epoch) than matplotlib axes or text artists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from torch.nn import functional as F

from lightning_neurons.errors import NeuronsError
from lightning_neurons.plots import _canvas, _text

_PAD = 4  # pixels between tiles
#: Height (pixels) of the band above each tile that holds its label (one line of 8-pt text).
LABEL_BAND = 15
#: Smallest and largest tile side (pixels); below the smallest, the grid shows fewer images.
MIN_TILE, MAX_TILE = 40, 112


def rgb_channels(channels: int) -> list[int]:
    """Which of an image's ``channels`` are drawn as red, green and blue: one channel as grey, two
    as magenta and green (``[0, 1, 0]``, as two-channel microscopy is shown), three as RGB, more
    (RGBA, RGB-D, multispectral bands) as their first three. The results and files keep every
    channel; only the figures are drawn this way."""
    if channels < 1:
        raise NeuronsError(f"images need at least one channel, got {channels}")
    return [[0, 0, 0], [0, 1, 0]][channels - 1] if channels < 3 else [0, 1, 2]


def _as_rgb(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [0, 1] -> ``[N, H, W, 3]`` float numpy (:func:`rgb_channels`)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise NeuronsError(f"images must be [N, C, H, W] tensors, got {shape}")
    array = images.detach().float().cpu().clamp(0, 1)[:, rgb_channels(images.shape[1])]
    return array.permute(0, 2, 3, 1).numpy()


def stretch(images: torch.Tensor) -> torch.Tensor:
    """Scale each image's values to span [0, 1] (for display only)."""
    flat = images.flatten(1)
    low = flat.amin(dim=1).view(-1, *([1] * (images.dim() - 1)))
    high = flat.amax(dim=1).view(-1, *([1] * (images.dim() - 1)))
    return (images - low) / (high - low).clamp_min(1e-8)


def _layout(n: int, band: int, title_px: int, ncols: int | None) -> tuple[int, int, int]:
    """``(columns, tile side, images shown)``: the largest tiles with which the grid fits in
    :data:`~lightning_neurons.plots._canvas.MAX_WIDTH` x ``MAX_HEIGHT`` pixels."""
    width, height = _canvas.MAX_WIDTH, _canvas.MAX_HEIGHT - title_px - _PAD

    def tile_of(cols: int) -> int:
        return min(MAX_TILE, (width - _PAD) // cols - _PAD)

    def fits(cols: int, tile: int) -> bool:
        return math.ceil(n / cols) * (tile + band + _PAD) <= height

    choices = [ncols] if ncols else range(1, max(n, 1) + 1)
    fitting = [(tile_of(c), c) for c in choices if tile_of(c) >= MIN_TILE and fits(c, tile_of(c))]
    if fitting:  # the largest tiles; of equal tiles, the widest grid (fewer rows)
        tile, cols = max(fitting)
        return cols, tile, n
    cols = ncols or (width - _PAD) // (MIN_TILE + _PAD)
    tile = max(8, min(MIN_TILE, tile_of(cols)))
    rows = max(1, height // (tile + band + _PAD))
    return cols, tile, min(n, rows * cols)


def _resized(cells: np.ndarray, tile: int) -> np.ndarray:
    """``[N, H, W, 3]`` -> ``[N, tile, tile, 3]``: the image fitted in the tile (white around)."""
    n, h, w, _ = cells.shape
    scale = tile / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    images = torch.from_numpy(np.ascontiguousarray(cells)).permute(0, 3, 1, 2)
    mode = "nearest" if scale >= 1 else "area"  # crisp pixels up, no aliasing down
    images = F.interpolate(images, size=size, mode=mode).permute(0, 2, 3, 1).numpy()
    out = np.ones((n, tile, tile, 3), dtype=np.float32)
    top, left = (tile - size[0]) // 2, (tile - size[1]) // 2
    out[:, top : top + size[0], left : left + size[1]] = images
    return out


def _grid_figure(
    cells: np.ndarray,
    labels: Sequence[str] | None,
    colors: Sequence[str] | None,
    ncols: int | None,
    title: str | None,
) -> np.ndarray:
    """The tiles in rows, each with its label in a band above it, under the title."""
    n = cells.shape[0]
    # a band of one text line per label line ("class\njudge: 3 ok" takes two)
    lines = max((str(label).count("\n") + 1 for label in labels), default=1) if labels else 1
    band = LABEL_BAND * lines if labels is not None else 0
    title = title or ""
    title_px = 6 + _canvas.TITLE_LINE * 2 if title else 4
    cols, tile, shown = _layout(n, band, title_px, ncols)
    cols = min(cols, max(shown, 1))
    rows = math.ceil(shown / cols)
    step_x, step_y = tile + _PAD, tile + band + _PAD
    width = cols * step_x + _PAD
    if shown < n:
        title = _canvas.with_note(title, f"(first {shown} of {n})", width)
    top = _canvas.title_height(title, width)
    image = np.full((min(top + rows * step_y + _PAD, _canvas.MAX_HEIGHT), width, 3), 255, np.uint8)
    _canvas.paste_title(image, title, top)
    tiles = (np.clip(_resized(cells[:shown], tile), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    for i, cell in enumerate(tiles):
        r, k = divmod(i, cols)
        y, x = top + _PAD + r * step_y + band, _PAD + k * step_x
        image[y : y + tile, x : x + tile] = cell
    for i in range(shown if labels is not None else 0):
        r, k = divmod(i, cols)
        _text.draw_text(
            image,
            _PAD + k * step_x + tile / 2,
            top + _PAD + r * step_y + band / 2,
            "\n".join(_canvas.shorten(line, tile) for line in str(labels[i]).split("\n")),
            size=_canvas.FONT,
            color=colors[i] if colors is not None else "black",
        )
    return image


def image_grid(
    images: torch.Tensor,
    labels: Sequence[str] | None = None,
    *,
    ncols: int | None = None,
    title: str | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """A grid of images, each with its label above it.

    The image is at most 480 x 720 pixels: the tiles are as large as fit (40 to 128 pixels a
    side, nearest-neighbour enlarged), labels are cut to their tile's width, and when even 40-pixel
    tiles do not fit, only the first images are shown (the title says how many; all are in the
    ``.npz``).

    Args:
        images: ``[N, C, H, W]`` with ``C`` 1 (grey) or 3 (RGB), values in [0, 1].
        labels: One short label per image (e.g. ``"12: 2.3x"``).
        ncols: Images per row (default: as few as give the largest tiles that fit).
        title: Figure title (two lines of about 60 characters are shown).
        normalize: Stretch each image to span [0, 1] (contrast for display only).

    Returns:
        The image, ``[H, W, 3]`` uint8 with ``W <= 480`` and ``H <= 720``.

    Raises:
        NeuronsError: For images of another shape, or a label count that differs.

    Example:
        >>> image = image_grid(torch.rand(8, 1, 32, 32), [f"ch {i}" for i in range(8)])
    """
    if labels is not None and len(labels) != len(images):
        raise NeuronsError(f"need one label per image: {len(images)} images, {len(labels)} labels")
    if normalize:
        images = stretch(images.float())
    return _grid_figure(_as_rgb(images), labels, None, ncols, title)


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
        torch.from_numpy(matplotlib.colormaps[cmap](scaled.numpy())[..., :3])
        .float()
        .permute(0, 3, 1, 2)
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
) -> np.ndarray:
    """Saliency maps over their images, each labelled with its predicted class; where the
    prediction is wrong, in red and followed by the true class: ``"5 (true 3)"``.

    The image is at most 480 x 720 pixels (see :func:`image_grid`).

    Args:
        images: ``[N, C, H, W]`` probe images in [0, 1].
        maps: ``[N, H, W]`` saliency maps.
        predicted: Predicted class per image.
        true: True class per image.
        class_names: Names of the classes (default: their indices).
        ncols: Images per row.
        title: Figure title.
        alpha: Weight of the map's colour.

    Returns:
        The image, ``[H, W, 3]`` uint8 with ``W <= 480`` and ``H <= 720``.

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

    labels = [
        name(p) if p == t else f"{name(p)} (true {name(t)})"
        for p, t in zip(predicted, true, strict=True)
    ]
    colors = ["black" if p == t else "red" for p, t in zip(predicted, true, strict=True)]
    cells = _as_rgb(overlay(images, maps, alpha=alpha))
    title = f"{title}: predicted class, red if wrong" if title else "predicted class, red if wrong"
    return _grid_figure(cells, labels, colors, ncols, title)
