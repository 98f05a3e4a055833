"""Text drawn straight into pixels (plots/_text.py) lands where matplotlib's text would."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_neurons.plots import _canvas
from lightning_neurons.plots._text import draw_text, text_width


def _ink(image: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` of the pixels darker than the white page."""
    rows, cols = np.nonzero(image.min(axis=2) < 200)
    return rows.min(), cols.min(), rows.max(), cols.max()


def _matplotlib(text: str, x: float, y: float, **options) -> np.ndarray:
    figure = _canvas.new_figure(80, 240)
    figure.text(x / 240, 1 - y / 80, text, **options)
    return _canvas.render(figure)


@pytest.mark.parametrize(
    ("text", "ha", "va"),
    [
        ("12: 2.3x", "center", "center"),
        ("Hg (true 3)", "left", "baseline"),
        ("-0.25 gy", "right", "top"),
        ("class 7", "center", "bottom"),
    ],
)
def test_a_line_lands_where_matplotlib_draws_it(text, ha, va):
    """Same font, size and hinting: the ink's box matches matplotlib's to within 2 pixels (its
    versions place glyphs at sub-pixel offsets or not, and matplotlib 3.11 adds half a line's
    leading, 1.3 px at 8 pt, above a top-aligned line)."""
    ours = np.full((80, 240, 3), 255, dtype=np.uint8)
    draw_text(ours, 120.4, 40.0, text, size=8, ha=ha, va=va)
    reference = _matplotlib(text, 120.4, 40.0, fontsize=8, ha=ha, va=va)
    np.testing.assert_allclose(_ink(ours), _ink(reference), atol=2)


def test_lines_stack_downwards_each_aligned_in_the_box_of_the_widest():
    image = np.full((80, 240, 3), 255, dtype=np.uint8)
    box = draw_text(image, 120, 10, "a long first line\nshort", size=9, va="top")
    top, left, bottom, right = _ink(image)
    assert box[1] == pytest.approx(10) and bottom < box[3] + 1
    first, second = image[: top + 12], image[top + 12 :]
    _, left1, _, right1 = _ink(first)
    _, left2, _, right2 = _ink(second)
    assert right2 - left2 < right1 - left1  # the short line is second
    assert abs((left2 + right2) / 2 - (left1 + right1) / 2) <= 1.5  # both centred on x
    assert box[2] - box[0] == pytest.approx(text_width("a long first line", 9))


def test_text_takes_its_colour_and_is_cut_at_the_edges():
    image = np.full((20, 30, 3), 255, dtype=np.uint8)
    box = draw_text(image, -5, 10, "red words cut", color="red", ha="left")
    assert box[0] == -5 and box[2] > 30  # the box as laid out, beyond the image
    inked = image.min(axis=2) < 128
    assert inked.any()
    red, green, blue = (image[..., c][inked].astype(int) for c in range(3))
    assert (red >= 200).all() and (green <= 128).all() and (blue <= 128).all()


def test_the_same_text_draws_the_same_pixels_and_nothing_for_an_empty_string():
    a = np.full((20, 60, 3), 255, dtype=np.uint8)
    b = np.full((20, 60, 3), 255, dtype=np.uint8)
    draw_text(a, 30, 10, "epoch 3")
    draw_text(b, 30, 10, "epoch 3")
    np.testing.assert_array_equal(a, b)
    blank = np.full((20, 60, 3), 255, dtype=np.uint8)
    assert draw_text(blank, 30, 10, "") == (30, 10, 30, 10)
    assert (blank == 255).all()
