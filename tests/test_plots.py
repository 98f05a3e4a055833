"""Figures: bounded images readable at TensorBoard's card size, built without pyplot."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import pdist

from lightning_neurons.class_contribution import ContributionStats
from lightning_neurons.plots import _canvas, _text
from lightning_neurons.plots.activation import class_profile, class_profile_heatmap
from lightning_neurons.plots.clustering import (
    cluster_profiles_figure,
    dendrogram_figure,
    distance_confusion_figure,
)
from lightning_neurons.plots.contribution import (
    ablation_figure,
    contribution_figure,
    contribution_order,
    contribution_view,
    probe_grid,
    probe_tiles,
)
from lightning_neurons.plots.images import image_grid, saliency_grid
from lightning_neurons.stats import LayerStats, dominant_neurons, selectivity_index

ROOT = Path(__file__).resolve().parents[1]


def _profile(classes: int, neurons: int) -> torch.Tensor:
    """Non-negative profile; neurons tuned to one of 20 contiguous groups of classes."""
    g = torch.Generator().manual_seed(0)
    group = torch.arange(classes) * 20 // classes
    tuned = torch.randint(0, 20, (neurons,), generator=g)
    noise = torch.rand(classes, neurons, generator=g, dtype=torch.float64) * 0.3
    return noise + (group[:, None] == tuned[None, :]).double()


def _layer_stats(profile: torch.Tensor, epoch: int = 4) -> LayerStats:
    c, k = profile.shape
    dominant, domination = dominant_neurons(profile, 5)
    return LayerStats(
        layer="conv2",
        epoch=epoch,
        reduction="mean",
        counts=torch.full((c,), 10.0, dtype=torch.float64),
        class_means=profile,
        class_std=profile * 0.1,
        class_max=profile * 2,
        firing_rate=(profile > 0).double(),
        nan_counts=torch.zeros(k, dtype=torch.float64),
        selectivity=selectivity_index(profile),
        dead=profile.amax(dim=0) <= 0,
        dominant=dominant,
        domination=domination,
        preferred_class=profile.argmax(dim=0),
    )


def _contribution_stats(profile: torch.Tensor) -> ContributionStats:
    c, _ = profile.shape
    contribution = profile - profile.mean()
    dominant, domination = dominant_neurons(contribution, 5)
    return ContributionStats(
        layer="conv2",
        counts=torch.full((c,), 10.0, dtype=torch.float64),
        class_contribution=contribution,
        class_std=contribution.abs(),
        positive_rate=(contribution > 0).double(),
        class_logit=contribution.sum(dim=1),
        dominant=dominant,
        domination=domination,
    )


def _figures(classes: int, neurons: int) -> dict:
    """Every figure of the package for ``classes`` x ``neurons`` (one image per class)."""
    profile = _profile(classes, neurons)
    names = [f"class {c}" for c in range(classes)]
    distances = np.clip(1.0 - np.corrcoef(profile.numpy()), 0.0, None)
    np.fill_diagonal(distances, 0.0)
    tree = linkage(pdist(profile.numpy()), method="average")
    rng = np.random.default_rng(0)
    confusion = rng.poisson(1.0, (classes, classes)) + np.diag(np.full(classes, 30))
    sets = [f"class {c} top5" for c in range(min(classes, 40))]
    images = torch.rand(classes, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(classes, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(classes)
    title = "conv2: epoch 4, 7 clusters, silhouette 0.30"
    return {
        "class_profile": lambda: class_profile_heatmap(_layer_stats(profile), names),
        "dendrogram": lambda: dendrogram_figure(tree, names, 7, title)[0],
        "distance_vs_confusion": lambda: distance_confusion_figure(
            distances, confusion, names, agreement=0.5, title=title
        ),
        "cluster_profiles": lambda: cluster_profiles_figure(
            rng.standard_normal((40, classes)), rng.integers(5, 50, 40), names, 3, "conv2, epoch 4"
        ),
        "class_contribution": lambda: contribution_figure(
            _contribution_stats(profile), names, epoch=4
        ),
        "ablation": lambda: ablation_figure(
            torch.as_tensor(rng.uniform(-0.1, 0.9, (len(sets), classes))),
            sets,
            names,
            "conv2, epoch 4: accuracy drop when zeroed (baseline 0.80)",
        ),
        "image_grid": lambda: image_grid(
            images, [f"{c}: 2.5x" for c in range(classes)], title=title
        ),
        "saliency_grid": lambda: saliency_grid(
            images, maps, labels, labels.roll(1), class_names=names, title="smoothgrad, epoch 4"
        ),
        "probe_grid": lambda: probe_grid(images, [[images[0]] * 5 for _ in range(classes)]),
    }


@pytest.fixture
def drawn(monkeypatch):
    """Records every Figure the plot functions render (to inspect their text)."""
    figures: list[Figure] = []
    render = _canvas.render
    _canvas._frames.clear()  # every figure's frame drawn afresh (and recorded)

    def recording(figure: Figure) -> np.ndarray:
        figures.append(figure)
        return render(figure)

    monkeypatch.setattr(_canvas, "render", recording)
    return figures


class _Drawn(NamedTuple):
    """A text as it lands in an image: its string, points and box (pixels, y down)."""

    text: str
    size: float
    box: tuple[float, float, float, float]
    image: tuple[int, int]  # (width, height) of the image it is drawn in


@pytest.fixture
def texts(monkeypatch, drawn):
    """Records every text the plot functions draw, as matplotlib artists (in the figures that
    ``drawn`` records, collected by :func:`_texts`) or straight into pixels (here)."""
    pixel_texts: list[_Drawn] = []
    draw_text = _text.draw_text

    def recording(image: np.ndarray, x: float, y: float, text: str, **options) -> tuple:
        box = draw_text(image, x, y, text, **options)
        if text.strip():
            size = options.get("size", 8.0)
            pixel_texts.append(_Drawn(text, size, box, (image.shape[1], image.shape[0])))
        return box

    monkeypatch.setattr(_text, "draw_text", recording)
    return pixel_texts


def _texts(figures: list[Figure], pixel_texts: list[_Drawn]) -> list[_Drawn]:
    """Every visible non-empty text of ``figures`` (their artists) and ``pixel_texts``."""
    found = []
    for figure in figures:
        renderer = figure.canvas.get_renderer()
        width, height = figure.bbox.width, figure.bbox.height
        for text in figure.findobj(Text):
            if text.get_visible() and text.get_text().strip():
                box = text.get_window_extent(renderer)
                top_down = (box.x0, height - box.y1, box.x1, height - box.y0)
                found.append(
                    _Drawn(text.get_text(), text.get_fontsize(), top_down, (width, height))
                )
    return found + list(pixel_texts)


@pytest.mark.slow
def test_plots_leave_the_users_backend_and_pyplot_figures_alone():
    """A notebook's backend and its open figures survive importing and drawing every figure."""
    code = textwrap.dedent(
        """
        import matplotlib
        matplotlib.use("svg")
        import matplotlib.pyplot as plt
        mine = plt.figure()
        from tests.test_plots import _figures
        for make in _figures(6, 12).values():
            make()
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        assert plt.get_fignums() == [mine.number], plt.get_fignums()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize(("classes", "neurons"), [(3, 5), (10, 32), (1000, 2000)])
def test_every_figure_is_an_image_within_the_cap(classes, neurons):
    for name, make in _figures(classes, neurons).items():
        image = make()
        if name == "probe_grid":  # a [3, H, W] tensor in [0, 1], logged with add_image
            assert image.dim() == 3 and image.shape[0] == 3, name
            image = _canvas.as_image(image)
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8, name
        assert image.ndim == 3 and image.shape[2] == 3, name
        height, width = image.shape[:2]
        assert width <= _canvas.MAX_WIDTH and height <= _canvas.MAX_HEIGHT, (name, image.shape)
        assert width >= 250 and height >= 100, (name, image.shape)  # not shrunk to nothing
        assert image.std() > 10, name  # something is drawn


@pytest.mark.parametrize(("classes", "neurons"), [(10, 32), (1000, 2000)])
def test_every_text_is_readable_and_inside_its_image(drawn, texts, classes, neurons):
    """Text at 8 pt (11 px) or more, whole (not cut at an edge), and no two texts overlapping:
    matplotlib's artists and the text drawn straight into pixels alike."""
    for name, make in _figures(classes, neurons).items():
        drawn.clear()
        texts.clear()
        make()
        boxes = []
        for found in _texts(drawn, texts):
            assert found.size >= _canvas.FONT, (name, found.text)
            x0, y0, x1, y1 = found.box
            width, height = found.image
            inside = x0 >= -1 and y0 >= -1 and x1 <= width + 1 and y1 <= height + 1
            assert inside, (name, found.text, found.box, found.image)
            # boxes shrunk a little: line boxes of neighbouring rows may touch
            dx, dy = 0.01 * (x1 - x0), 0.05 * (y1 - y0)
            boxes.append((found.text, (x0 + dx, y0 + dy, x1 - dx, y1 - dy)))
        for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
            for b, (bx0, by0, bx1, by1) in boxes[i + 1 :]:
                overlap = ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1
                assert not overlap, (name, a, b)


def test_every_figure_titles_its_epoch(drawn, texts):
    for name, make in _figures(10, 32).items():
        if name == "probe_grid":  # an image without text; its tag and step say when
            continue
        drawn.clear()
        texts.clear()
        make()
        assert "epoch 4" in " ".join(found.text for found in _texts(drawn, texts)), name


def test_class_profile_heatmap_draws_each_neuron_scaled_in_its_class_row(drawn, texts):
    """Neuron k fires for class k only: after scaling per neuron, the preferred class's cell is
    the top of viridis and the others its bottom, with rows in class order."""
    profile = torch.tensor([[0.0, 0.0, 2.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    image = class_profile_heatmap(_layer_stats(profile))
    figure = drawn[0]
    ax = figure.axes[0]
    again = class_profile_heatmap(_layer_stats(profile))
    assert len(drawn) == 1, "the frame once"
    np.testing.assert_array_equal(again, image)
    wider = class_profile_heatmap(_layer_stats(torch.cat([profile, profile], dim=1)))
    assert len(drawn) == 1 and wider.shape == image.shape, "another layer's width: the same frame"
    frame, titles = [t.text for t in texts[:-3]], [t.text for t in texts[-3:]]
    assert frame[:3] == ["0", "1", "2"] and "scaled per neuron" in frame, "the frame drawn once"
    assert all("class profile" in t for t in titles) and "of 6 neurons" in titles[-1]
    top, bottom = _canvas.colormapped(np.array([[1.0, 0.0]]), "viridis", 0.0, 1.0)[0]
    box = ax.get_window_extent()
    for row in range(3):
        for col in range(3):  # columns sorted by preferred class: neurons 2, 0, 1
            x = int(box.x0 + (col + 0.5) * box.width / 3)
            y = int(figure.bbox.height - box.y1 + (row + 0.5) * box.height / 3)  # row 0 on top
            # nearest-neighbour resampling copies a cell's colour to its centre pixel exactly
            expected = top if row == col else bottom
            np.testing.assert_array_equal(image[y, x], expected, err_msg=f"cell {row}, {col}")


def test_block_means_shrink_a_matrix_to_its_pixels_ignoring_nan():
    matrix = np.arange(24, dtype=float).reshape(4, 6)
    matrix[0, 0] = np.nan
    shrunk = _canvas.block_means(matrix, 2, 3)
    # blocks of 2 x 2: [[nan, 1], [6, 7]] -> mean of 1, 6, 7; the others the mean of four values
    expected = np.array([[14 / 3, 5.5, 7.5], [15.5, 17.5, 19.5]])
    np.testing.assert_allclose(shrunk, expected, rtol=1e-12)  # sums of a few small integers
    assert _canvas.block_means(matrix, 10, 10) is not matrix
    np.testing.assert_array_equal(_canvas.block_means(matrix, 10, 10), matrix)
    assert np.isnan(_canvas.block_means(np.full((4, 4), np.nan), 2, 2)).all()


def test_dendrogram_returns_every_leaf_in_drawing_order_above_the_leaf_cap():
    points = np.random.default_rng(0).standard_normal((200, 5))
    tree = linkage(pdist(points), method="average")
    image, leaves = dendrogram_figure(tree, None, 5)
    assert leaves == leaves_list(tree).tolist()  # all 200, though 30 branches are drawn
    assert image.shape[1] <= _canvas.MAX_WIDTH


def test_a_grid_too_large_for_the_cap_shows_its_first_images_and_says_so(texts):
    long_title = "conv2, epoch 4: " + "a very long description of the images " * 5
    images = torch.rand(1000, 1, 8, 8)
    image = image_grid(images, [str(i) for i in range(1000)], title=long_title)
    drawn = [found.text for found in texts]
    shown = len(drawn) - 1  # the title, and one label per image shown
    assert 100 <= shown < 1000
    assert drawn[1:] == [str(i) for i in range(shown)]  # the labels of the first images, in order
    # the note survives the title's two-line cut
    assert drawn[0].endswith(f"(first {shown} of 1000)") and "\n" in drawn[0]
    assert image.shape[0] <= _canvas.MAX_HEIGHT and image.shape[1] <= _canvas.MAX_WIDTH


def test_as_image_accepts_arrays_tensors_and_figures():
    pixels = np.zeros((5, 7, 3), dtype=np.uint8)
    assert _canvas.as_image(pixels) is not None and _canvas.as_image(pixels).shape == (5, 7, 3)
    halves = _canvas.as_image(np.full((2, 3, 3), 0.5))
    assert halves.dtype == np.uint8 and (halves == 128).all()  # 0.5 * 255 rounds to 128
    assert _canvas.as_image(torch.ones(3, 4, 6)).shape == (4, 6, 3)
    figure = _canvas.new_figure(100, 200)
    assert _canvas.as_image(figure).shape == (100, 200, 3)
    with pytest.raises(TypeError, match="expected an"):
        _canvas.as_image(np.zeros((4, 4)))


def test_the_class_profile_sent_to_a_figure_worker_holds_only_what_is_drawn():
    """The tracker sends its figure workers the shown neurons' class means and the title's facts,
    not the layer's statistics: at 100 classes and 2,048 neurons, about a quarter of the bytes
    (the 512 shown of 2,048 neurons' means, without the std, max and firing rates)."""
    import pickle

    stats = _layer_stats(_profile(100, 2048))
    profile = class_profile(stats, max_neurons=512)
    assert profile.means.shape == (100, 512) and profile.total == 2048
    assert len(pickle.dumps(profile)) < len(pickle.dumps(stats)) / 4
    assert profile.selectivity == pytest.approx(float(stats.selectivity.nanmean()))
    assert profile.dead == int(stats.dead.sum())


def test_the_contribution_order_groups_neurons_by_class_then_by_falling_contribution():
    nan = float("nan")
    class_contribution = torch.tensor(
        [  # neurons 0-5; class 2 had no examples (NaN: counts as 0)
            [0.5, 0.2, 0.3, 0.1, -1.0, 0.2],
            [0.1, 0.7, nan, 0.7, -2.0, 0.3],
            [nan, nan, nan, nan, nan, nan],
        ]
    )
    # class 0: 0 (0.5), 2 (0.3); class 1: 1 and 3 (0.7, in their order), 5 (0.3); class 2: 4
    assert contribution_order(class_contribution).tolist() == [0, 2, 1, 3, 5, 4]


@pytest.mark.parametrize("classes", [8, 100])
def test_the_contribution_figure_from_its_view_is_the_figure_from_the_statistics(classes):
    """NeuronContribution sends the workers the view: the same pixels (rings up to 20 classes,
    numbered rows above), from the 256 shown neurons' columns and the shares (at 2,048 neurons
    under a quarter of the statistics' bytes)."""
    import pickle

    stats = _contribution_stats(_profile(classes, 2048))
    view = contribution_view(stats)
    assert view.shown.shape == (classes, 256) and view.num_neurons == 2048
    assert len(view.rings[0]) == (classes * 5 if classes <= 20 else 0)
    names = [f"class {c}" for c in range(classes)]
    assert np.array_equal(
        contribution_figure(view, names, epoch=3), contribution_figure(stats, names, epoch=3)
    )
    assert len(pickle.dumps(view)) < len(pickle.dumps(stats)) / 4


def test_the_probe_grid_from_its_tiles_is_the_grid_from_the_images():
    """NeuronContribution sends the workers the tiles: the same grid (grey for a missing image,
    the probes beyond the height left out) from 48-pixel tiles instead of 128-pixel renderings."""
    import pickle

    g = torch.Generator().manual_seed(0)
    probes = torch.rand(20, 3, 32, 32, generator=g)
    preferred = [
        [torch.randn(3, 128, 128, generator=g) if (r + c) % 4 else None for c in range(5)]
        for r in range(20)
    ]
    shown, tiles = probe_tiles(probes, preferred)
    assert shown.shape == (14, 3, 48, 48) and len(tiles) == 14  # (720 - 2) // 50 rows fit
    assert torch.equal(probe_grid(shown, tiles), probe_grid(probes, preferred))
    assert len(pickle.dumps((shown, tiles))) < len(pickle.dumps((probes, preferred))) / 4


def test_class_profile_heatmap_leaves_classes_without_data_blank(drawn):
    profile = torch.tensor([[1.0, 0.0], [float("nan")] * 2, [0.0, 2.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "All-NaN slice" or division warnings either
        image = class_profile_heatmap(_layer_stats(profile))
    figure = drawn[0]  # the frame; the title is drawn apart
    box = figure.axes[0].get_window_extent()
    x = int(box.x0 + box.width / 2)
    y = int(figure.bbox.height - box.y1 + 1.5 * box.height / 3)  # the middle row's centre
    np.testing.assert_array_equal(image[y, x], [255, 255, 255])  # NaN is drawn white


def test_the_logger_writes_an_image_of_the_figures_size_and_closes_pyplot_figures(tmp_path):
    import lightning.pytorch as pl
    import matplotlib.pyplot as plt
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_neurons.loggers import AnalysisLogger

    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(logger=tb, default_root_dir=tmp_path, enable_progress_bar=False)
    out = AnalysisLogger(trainer, "plots")
    pixels = class_profile_heatmap(_layer_stats(_profile(10, 32)))
    out.figure(out.tag("profile"), pixels)
    theirs = plt.figure(figsize=(2, 1), dpi=100)
    out.figure(out.tag("theirs"), theirs)
    assert theirs.number not in plt.get_fignums()
    tb.experiment.flush()
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0}).Reload()
    (profile,) = events.Images("plots/profile")
    assert (profile.height, profile.width) == pixels.shape[:2]
    (image,) = events.Images("plots/theirs")
    assert (image.width, image.height) == (200, 100)


def test_image_grid_gives_two_line_labels_a_band_of_two_lines():
    from lightning_neurons.plots.images import LABEL_BAND, image_grid

    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    one = image_grid(images, ["c0: 7"] * 4, ncols=4)
    two = image_grid(images, ["c0: 7\nmodel 7 judge 7 ok"] * 4, ncols=4)
    assert one.shape[1] == two.shape[1]  # same tiles
    assert two.shape[0] - one.shape[0] == LABEL_BAND  # one row of tiles, one more text line


def test_the_domination_bars_fill_each_class_row_to_its_share():
    from lightning_neurons.plots.contribution import _share_bars

    bars = _share_bars(np.array([0.5, 1.0, 0.0, np.nan]), named=True, height=40, width=20)
    red = (bars[..., 0] > 150) & (bars[..., 1] < 100)
    centres = [5, 15, 25, 35]  # the middle pixel row of each class's 10
    assert [int(red[r].sum()) for r in centres] == [10, 20, 0, 0]  # NaN: no bar
    assert not red[0].any() and not red[9].any(), "bars 0.8 of their row high: gaps between"
    steps = _share_bars(np.linspace(0.0, 1.0, 1000), named=False, height=50, width=20)
    filled = ((steps[..., 0] > 150) & (steps[..., 1] < 100)).sum(axis=1)
    assert (np.diff(filled) >= 0).all() and filled[0] <= 1 and filled[-1] == 20


@pytest.mark.parametrize(
    ("values", "rgb"),
    [
        ([0.8], (204, 204, 204)),  # grey
        ([1.0, 0.0], (255, 0, 255)),  # two channels: magenta and green
        ([0.0, 1.0], (0, 255, 0)),
        ([0.2, 0.6, 1.0], (51, 153, 255)),
        ([0.0, 0.0, 1.0, 1.0], (0, 0, 255)),  # RGBA, RGB-D: the first three
        ([1.0, 0.6, 0.0] + [0.3] * 10, (255, 153, 0)),  # multispectral bands
    ],
)
def test_images_of_any_channel_count_are_drawn_in_one_colour_rule(values, rgb):
    """The class and channel grids, the probe tiles and the projector's sprite show an image of
    any channel count by one rule (:func:`~lightning_neurons.plots.images.rgb_channels`)."""
    from lightning_neurons.plots.contribution import _tiles
    from lightning_neurons.plots.images import MIN_TILE

    image = torch.tensor(values).view(1, -1, 1, 1).expand(1, -1, 16, 16)
    grid = image_grid(image, ["x"], ncols=1)
    assert (grid == np.array(rgb, dtype=np.uint8)).all(axis=-1).sum() >= MIN_TILE**2
    (tile,) = _tiles([image[0]], 4)
    torch.testing.assert_close(tile, torch.tensor(rgb).view(3, 1, 1).expand(3, 4, 4) / 255)


def test_an_image_without_channels_is_a_clear_error():
    from lightning_neurons.errors import NeuronsError
    from lightning_neurons.plots.images import rgb_channels

    with pytest.raises(NeuronsError, match="at least one channel, got 0"):
        rgb_channels(0)
