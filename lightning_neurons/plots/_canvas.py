"""Bounded images for TensorBoard's cards: fixed-size figures, colour-mapped arrays, block means.

Every figure of the package is an RGB image of at most :data:`MAX_WIDTH` x :data:`MAX_HEIGHT`
pixels, drawn to be read at the size TensorBoard shows it (an image card is about 350-500 px wide):
text at :data:`FONT` points or more, short titles that carry the epoch, and the details in the
``.npz`` files the callbacks write next to them. Matrices are drawn as colour-mapped arrays, shrunk
by block means to the pixels they get, so a figure costs the same at 10 and at 1,000 classes.

Figures are built through matplotlib's object API (a :class:`~matplotlib.figure.Figure` with an
Agg canvas): a library must never call ``matplotlib.use`` or ``pyplot``, which would switch a
notebook's backend and leave figures open.
Text, tick labels and colour bars of the figures that only :func:`render` draws are drawn
straight into the pixels after matplotlib has drawn the rest (:func:`pixel_text`,
:func:`pixel_ticks`, :func:`pixel_colorbar`): a text artist costs 2-3 ms and an axes about 20 ms.
"""

from __future__ import annotations

import textwrap
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_neurons.plots import _text

#: Widest image, in pixels (TensorBoard's image card is about 350-500 px wide).
MAX_WIDTH = 480
#: Tallest image, in pixels.
MAX_HEIGHT = 720
#: Pixels per inch of every figure: a point is 100 / 72 = 1.4 px.
DPI = 100
#: Font size (points) of tick labels and other small text; 8 pt is 11 px at :data:`DPI`.
FONT = 8.0
#: Font size (points) of titles.
TITLE_FONT = 9.0
#: Height (pixels) of one line of :data:`TITLE_FONT` text, with its leading.
TITLE_LINE = 16
#: Average width (pixels) of one :data:`FONT` character (DejaVu Sans), to shorten labels to fit.
CHAR_WIDTH = 6.2


def new_figure(height: int, width: int = MAX_WIDTH) -> Figure:
    """A figure of ``width`` x ``height`` pixels (clipped to the caps) with an Agg canvas."""
    width, height = min(int(width), MAX_WIDTH), min(int(height), MAX_HEIGHT)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


#: What :func:`render` draws into a figure's pixels after matplotlib has drawn the figure, in
#: order: text (:func:`pixel_text`) and colour bars (:func:`pixel_colorbar`).
_overlays: weakref.WeakKeyDictionary[Figure, list[Callable[[np.ndarray], Any]]]
_overlays = weakref.WeakKeyDictionary()


def pixel_text(figure: Figure, x: float, y: float, text: str, **options: Any) -> None:
    """Text that :func:`render` draws into ``figure``'s pixels (:func:`_text.draw_text`, a tenth
    of the cost of a matplotlib text artist): for titles, labels and printed values of figures
    that only :func:`render` draws.

    Args:
        figure: The figure.
        x: Pixels from the figure's left edge.
        y: Pixels from the figure's top edge.
        text: The text.
        **options: Keyword arguments of :func:`_text.draw_text` (``size``, ``color``, ``ha``,
            ``va``, ``weight``, ``linespacing``, ``rotation``).
    """
    _overlays.setdefault(figure, []).append(
        lambda pixels: _text.draw_text(pixels, x, y, text, **options)
    )


def render(figure: Figure) -> np.ndarray:
    """Draw ``figure`` (and its :func:`pixel_text`) and return its pixels, ``[H, W, 3]`` uint8."""
    canvas = (
        figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    )
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    for draw in _overlays.get(figure, ()):
        draw(pixels)
    return pixels


def as_image(figure: Any) -> np.ndarray:
    """Pixels ``[H, W, 3]`` (uint8) of an image or a figure, for TensorBoard.

    Args:
        figure: An ``[H, W, 3|4]`` array (uint8, or float in [0, 1]), a ``[3, H, W]`` tensor in
            [0, 1], or a :class:`~matplotlib.figure.Figure` (drawn on an Agg canvas).

    Returns:
        ``[H, W, 3]`` uint8.

    Raises:
        TypeError: For anything else.
    """
    if isinstance(figure, Figure):
        return render(figure)
    if hasattr(figure, "detach"):  # a torch tensor [C, H, W]
        figure = figure.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
    array = np.asarray(figure)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise TypeError(f"expected an [H, W, 3] image or a Figure, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def axes_at(figure: Figure, left: float, top: float, width: float, height: float) -> Axes:
    """Axes placed in pixels, measured from the figure's top-left corner."""
    fw, fh = figure.bbox.width, figure.bbox.height
    return figure.add_axes((left / fw, 1.0 - (top + height) / fh, width / fw, height / fh))


def block_means(matrix: np.ndarray, max_rows: int, max_cols: int) -> np.ndarray:
    """``matrix`` shrunk to at most ``max_rows`` x ``max_cols`` by the NaN-ignoring mean of
    contiguous blocks (rows and columns keep their order; a block of all-NaN stays NaN).

    Args:
        matrix: ``[R, C]`` values.
        max_rows: Rows wanted at most.
        max_cols: Columns wanted at most.

    Returns:
        ``[min(R, max_rows), min(C, max_cols)]`` float64.
    """
    values = np.asarray(matrix, dtype=np.float64)
    finite = np.isfinite(values)
    total, count = np.where(finite, values, 0.0), finite.astype(np.float64)
    for axis, limit in ((0, max_rows), (1, max_cols)):
        n = values.shape[axis]
        if n > limit:
            starts = np.unique(np.linspace(0, n, int(limit) + 1).astype(int)[:-1])
            total = np.add.reduceat(total, starts, axis=axis)
            count = np.add.reduceat(count, starts, axis=axis)
    if total.shape == values.shape:
        return values.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1.0), np.nan)


def colormapped(
    matrix: np.ndarray, cmap: str, vmin: float, vmax: float, bad: str = "white"
) -> np.ndarray:
    """``[R, C]`` values as ``[R, C, 3]`` uint8 colours of ``cmap`` over ``[vmin, vmax]`` (NaN:
    ``bad``)."""
    scale = vmax - vmin if vmax > vmin else 1.0
    normalized = (np.asarray(matrix, dtype=np.float64) - vmin) / scale
    colours = matplotlib.colormaps[cmap].with_extremes(bad=bad)
    return colours(np.ma.masked_invalid(normalized), bytes=True)[..., :3]


def heatmap(
    ax: Axes,
    matrix: np.ndarray,
    cmap: str,
    vmin: float,
    vmax: float,
    extent: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Draw ``matrix`` in ``ax`` as one colour-mapped image, first shrunk to the axes' pixels.

    Data coordinates stay those of the full matrix (``extent``: column 0 to ``C``, row 0 at the
    top to ``R``), so ticks and marks can be placed by row and column index.

    Returns:
        The matrix as drawn (after the block means).
    """
    rows, cols = matrix.shape
    box = ax.get_window_extent()
    shown = block_means(matrix, max(1, int(box.height)), max(1, int(box.width)))
    ax.imshow(
        colormapped(shown, cmap, vmin, vmax),
        aspect="auto",
        interpolation="nearest",
        extent=extent if extent is not None else (0, cols, rows, 0),
    )
    return shown


def colorbar(ax: Axes, cmap: str, vmin: float, vmax: float, label: str) -> None:
    """A colour bar for a :func:`heatmap`, drawn in ``ax`` (a thin axes) with three ticks."""
    vertical = ax.get_window_extent().height > ax.get_window_extent().width
    ramp = np.linspace(vmin, vmax, 128)
    image = colormapped(ramp[::-1, None] if vertical else ramp[None, :], cmap, vmin, vmax)
    extent = (0.0, 1.0, vmin, vmax) if vertical else (vmin, vmax, 0.0, 1.0)
    ax.imshow(image, aspect="auto", extent=extent, interpolation="bilinear")
    ticks = [vmin, (vmin + vmax) / 2.0, vmax]
    if vertical:
        ax.set_xticks([])
        ax.yaxis.tick_right()
        ax.yaxis.set_label_position("right")
        ax.set_yticks(ticks, [_number(t) for t in ticks], fontsize=FONT)
        ax.set_ylabel(label, fontsize=FONT, labelpad=2)
        ax.get_yticklabels()[0].set_verticalalignment("bottom")
        ax.get_yticklabels()[-1].set_verticalalignment("top")
    else:
        ax.set_yticks([])
        ax.set_xticks(ticks, [_number(t) for t in ticks], fontsize=FONT)
        ax.set_xlabel(label, fontsize=FONT, labelpad=1)
        # the end labels inside the bar's extent, so that they are neither cut nor overlap others
        ax.get_xticklabels()[0].set_horizontalalignment("left")
        ax.get_xticklabels()[-1].set_horizontalalignment("right")
    ax.tick_params(length=2, pad=1)


def pixel_image(figure: Figure, box: tuple[float, float, float, float], pixels: np.ndarray) -> None:
    """``pixels`` ``[h, w, 3]`` (uint8) that :func:`render` pastes into ``box`` (``left, top,
    width, height``), framed in black as an axes is: a panel without an axes."""
    left, top, width, height = (int(round(v)) for v in box)

    def draw(image: np.ndarray) -> None:
        image[top : top + height, left : left + width] = 0  # the frame
        paste(image, (left, top, width, height), pixels)

    _overlays.setdefault(figure, []).append(draw)


def pixel_colorbar(
    figure: Figure,
    box: tuple[float, float, float, float],
    cmap: str,
    vmin: float,
    vmax: float,
    label: str,
) -> None:
    """:func:`colorbar` drawn into the pixels by :func:`render`, without an axes (an axes costs
    about 20 ms to make): the ramp framed in ``box``, its ends' and middle values beside it.

    Args:
        figure: A figure that only :func:`render` draws.
        box: ``(left, top, width, height)`` in pixels; taller than wide: a vertical bar (values
            on its right), else horizontal (values below).
        cmap: The heatmap's colour map.
        vmin: Its lowest value.
        vmax: Its highest value.
        label: What the colours are.
    """
    left, top, width, height = (int(round(v)) for v in box)
    vertical = height > width
    ramp = np.linspace(vmin, vmax, 128)
    colours = colormapped(ramp[::-1, None] if vertical else ramp[None, :], cmap, vmin, vmax)

    pixel_image(figure, (left, top, width, height), colours)
    values = [_number(v) for v in (vmin, (vmin + vmax) / 2.0, vmax)]
    if vertical:
        x, ends = left + width + 3, (top + height, top + height / 2, top)
        for value, y, va in zip(values, ends, ("bottom", "center", "top"), strict=True):
            pixel_text(figure, x, y, value, size=FONT, ha="left", va=va)
        x += max(_text.text_width(value, FONT) for value in values) + 3
        pixel_text(figure, x, top + height / 2, label, size=FONT, ha="left", rotation=90)
        return
    y, ends = top + height + 3, (left, left + width / 2, left + width)
    for value, x, ha in zip(values, ends, ("left", "center", "right"), strict=True):
        pixel_text(figure, x, y, value, size=FONT, ha=ha, va="top")
    pixel_text(figure, left + width / 2, y + sum(_text.line_box(FONT)), label, size=FONT, va="top")


def _number(value: float) -> str:
    return f"{value:.2g}" if value != 0 else "0"


def shorten(text: str, pixels: float, font: float = FONT) -> str:
    """``text`` cut (with an ellipsis) to about ``pixels`` wide at ``font`` points."""
    chars = max(1, int(pixels / (CHAR_WIDTH * font / FONT)))
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "\u2026"


def wrap_title(text: str, width: float = MAX_WIDTH, lines: int = 2) -> list[str]:
    """``text`` wrapped to ``width`` pixels at :data:`TITLE_FONT`, at most ``lines`` lines (the
    last one cut with an ellipsis)."""
    if not text:
        return []
    room = width - 8
    chars = max(10, int(room / (CHAR_WIDTH * TITLE_FONT / FONT)))
    wrapped = textwrap.wrap(text, width=chars)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = shorten(wrapped[-1] + " \u2026", room, TITLE_FONT)
    return wrapped


def with_note(text: str, note: str, width: float = MAX_WIDTH, lines: int = 2) -> str:
    """``text`` followed by ``note``, ``text`` cut so that the note stays within ``lines`` title
    lines of ``width`` pixels."""
    chars = max(10, int((width - 8) / (CHAR_WIDTH * TITLE_FONT / FONT)))
    room = lines * chars - len(note) - 2 - 6 * lines  # a few characters lost per line to wrapping
    if len(text) > room:
        text = text[: max(0, room - 1)].rstrip() + "\u2026"
    return f"{text} {note}".strip()


def titled_figure(
    text: str, body: int, width: int = MAX_WIDTH, lines: int = 2
) -> tuple[Figure, int]:
    """A figure with ``text`` as its title (wrapped, centred) above ``body`` pixels.

    Args:
        text: The title.
        body: Pixels wanted below the title (clipped so that the figure stays within the caps).
        width: Figure width in pixels (at most :data:`MAX_WIDTH`).
        lines: Most title lines.

    Returns:
        ``(figure, top)``: the figure and the pixels its title takes from the top.
    """
    top = title_height(text, width, lines)
    figure = new_figure(top + body, width)
    if text:
        pixel_text(figure, figure.bbox.width / 2, 4, _title_lines(text, width, lines), **_TITLE)
    return figure, top


#: How titles are drawn: centred, their top 4 pixels below the image's, lines TITLE_LINE apart.
_TITLE: dict[str, Any] = {"size": TITLE_FONT, "ha": "center", "va": "top", "linespacing": 1.1}


def title_artist(figure: Figure, text: str, lines: int = 2) -> None:
    """The title of :func:`titled_figure` as a matplotlib text artist: for a figure handed to
    the user, which a notebook draws itself (without :func:`render`'s pixel text)."""
    if text:
        figure.text(
            0.5,
            1.0 - 4 / figure.bbox.height,
            _title_lines(text, figure.bbox.width, lines),
            ha="center",
            va="top",
            fontsize=TITLE_FONT,
            linespacing=_TITLE["linespacing"],
        )


def _title_lines(text: str, width: float, lines: int) -> str:
    return "\n".join(wrap_title(text, width, lines))


def title_height(text: str, width: float = MAX_WIDTH, lines: int = 2) -> int:
    """Pixels that :func:`titled_figure` gives the title ``text``."""
    wrapped = wrap_title(text, width, lines)
    return 6 + TITLE_LINE * len(wrapped) if wrapped else 4


def label_room(labels: Sequence[str], cap: float) -> int:
    """Pixels that the longest of ``labels`` takes at :data:`FONT` (plus a margin), at most
    ``cap``."""
    longest = max((len(str(s)) for s in labels), default=1)
    return int(min(cap, CHAR_WIDTH * longest + 10))


def column_labels(labels: Sequence[str], width: float, cap: float) -> tuple[int, bool]:
    """``(pixels below the axes, rotated)`` for one label per column of an axes ``width`` pixels
    wide: horizontal where the longest label fits its column, else turned by 90 degrees (and cut
    to ``cap`` pixels)."""
    longest = CHAR_WIDTH * max((len(str(s)) for s in labels), default=1) + 4
    if longest <= width / max(len(labels), 1):
        return 18, False
    return label_room(labels, cap), True


def label_ticks(
    ax: Axes, axis: str, labels: Sequence[str], room: float, rotate: bool = False
) -> None:
    """One label per row (``axis="y"``) or column (``"x"``) at cell centres (data coordinates
    0.5, 1.5, ...), shortened to ``room`` pixels: :func:`pixel_ticks`."""
    short = [shorten(str(s), room) for s in labels]
    pixel_ticks(ax, axis, np.arange(len(labels)) + 0.5, short, rotate)


def pixel_ticks(
    ax: Axes, axis: str, positions: Sequence[float], labels: Sequence[str], rotate: bool = False
) -> None:
    """Tick labels drawn into the pixels by :func:`render` instead of matplotlib's ticks (a tick
    costs as much as a text artist; no tick marks are drawn), and the axis label, if any,
    placed beyond the longest of them.

    Args:
        ax: Axes of a figure that only :func:`render` draws, with its data limits set.
        axis: ``"y"`` (labels on the left) or ``"x"`` (below).
        positions: Where the labels go, in data coordinates.
        labels: One label per position.
        rotate: Turn the ``"x"`` labels by 90 degrees (read upwards).
    """
    figure = ax.figure
    box, height = ax.get_window_extent(), figure.bbox.height
    positions = np.asarray(positions, dtype=np.float64)
    if axis == "y":
        ax.set_yticks([])
        low, high = ax.get_ylim()
        rows = height - (box.y0 + (positions - low) / ((high - low) or 1.0) * box.height)
        for label, y in zip(labels, rows, strict=True):  # clear of a column label "0" below
            pixel_text(figure, box.x0 - 4, y, label, size=FONT, ha="right", va="center")
        widest = max((_text.text_width(label, FONT) for label in labels), default=0.0)
        ax.yaxis.set_label_coords(-(widest + 7) / box.width, 0.5)
        return
    ax.set_xticks([])
    low, high = ax.get_xlim()
    columns = box.x0 + (positions - low) / ((high - low) or 1.0) * box.width
    turn = 90 if rotate else 0
    for label, x in zip(labels, columns, strict=True):
        pixel_text(figure, x, height - box.y0 + 3, label, size=FONT, va="top", rotation=turn)
    if rotate:
        tallest = max((_text.text_width(label, FONT) for label in labels), default=0.0)
    else:
        tallest = sum(_text.line_box(FONT))
    ax.xaxis.set_label_coords(0.5, -(tallest + 5) / box.height)


def index_ticks(ax: Axes, axis: str, n: int) -> None:
    """A few integer ticks (0 to ``n``) for an axis whose rows or columns are too many to name,
    drawn as :func:`pixel_ticks`."""
    ticks = np.unique(np.linspace(0, n, 5).round().astype(int))
    pixel_ticks(ax, axis, ticks, [str(t) for t in ticks])


#: Frames kept by :func:`cached_frame` (each at most 480 x 720 x 3 bytes, 1 MB).
MAX_FRAMES = 32
_frames: OrderedDict[Hashable, np.ndarray] = OrderedDict()


def cached_frame(key: Hashable, draw: Callable[[], Figure]) -> np.ndarray:
    """A copy of the pixels of ``draw()``, drawn only the first time ``key`` is asked for.

    A figure redrawn every epoch mostly redraws what did not change (axes, tick labels, colour
    bar): such a figure draws its frame once, keyed by what the frame depends on, then pastes
    what changed into a copy (:func:`paste`, :func:`paste_title`)."""
    frame = _frames.get(key)
    if frame is None:
        frame = render(draw())
        _frames[key] = frame
        while len(_frames) > MAX_FRAMES:
            _frames.popitem(last=False)
    _frames.move_to_end(key)
    return frame.copy()


def paste(image: np.ndarray, box: tuple[int, int, int, int], pixels: np.ndarray) -> None:
    """Fill the inside of the axes ``box`` (``left, top, width, height`` in pixels, as given to
    :func:`axes_at`; its one-pixel frame is kept) with ``pixels`` ``[h, w, 3]``, each stretched
    to the box by the nearest pixel, as ``imshow(..., interpolation="nearest")`` draws it."""
    left, top, width, height = (int(round(v)) for v in box)
    h, w = pixels.shape[:2]
    y0, y1 = top + 1, top + height - 1
    x0, x1 = left + 1, left + width - 1
    rows = ((np.arange(y0, y1) - top + 0.5) * h / height).astype(int).clip(0, h - 1)
    cols = ((np.arange(x0, x1) - left + 0.5) * w / width).astype(int).clip(0, w - 1)
    image[y0:y1, x0:x1] = pixels[rows[:, None], cols[None, :]]


def paste_title(image: np.ndarray, text: str, top: int, lines: int = 2) -> None:
    """Draw ``text`` as :func:`titled_figure` does into the ``top`` rows of ``image`` (a frame
    drawn with an empty title)."""
    width = image.shape[1]
    image[:top] = 255
    _text.draw_text(image[:top], width / 2, 4, _title_lines(text, width, lines), **_TITLE)
