"""Change across epochs and between runs: the numbers on hand-made results, the figures, and
what a live run logs once two epochs are analysed."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import TinyData, fast_trainer
from matplotlib.figure import Figure
from matplotlib.text import Text

from lightning_neurons import ActivationTracker, CategoryClustering, NeuronsError, load_run
from lightning_neurons.evolution import (
    ClusteringHistory,
    NeuronHistory,
    clustering_evolution,
    compare_results,
    compare_runs,
    distance_correlation,
    neuron_evolution,
    run_clustering_evolution,
    run_neuron_evolution,
)
from lightning_neurons.plots import _canvas
from lightning_neurons.plots._canvas import render
from lightning_neurons.plots.evolution import (
    _NeuronLayout,
    analysis_ticks,
    class_colours,
    clustering_evolution_figure,
    comparison_figure,
    neuron_evolution_figure,
    neuron_evolution_image,
)
from lightning_neurons.results import CategoryClusteringResult
from lightning_neurons.stats import LayerStats


def stats(epoch: int, means: list[list[float]], layer: str = "conv") -> LayerStats:
    """LayerStats whose class profile is ``means`` (one image per class)."""
    m = torch.tensor(means, dtype=torch.float64)
    state = {
        "images": torch.ones(m.shape[0], dtype=torch.int64),
        "sum": m,
        "sum_sq": m * m,
        "fired": (m > 0).int(),
        "nan": torch.zeros_like(m, dtype=torch.int32),
        "max": m.float(),
    }
    return LayerStats.from_state(layer, state, epoch=epoch, reduction="mean", top_k=1)


def clustering(epoch: int, labels: list[int], distances: np.ndarray) -> CategoryClusteringResult:
    """A category clustering with the tensors CategoryClustering holds."""
    n = len(labels)
    return CategoryClusteringResult(
        view="conv",
        layers=["conv"],
        epoch=epoch,
        class_names=[f"c{i}" for i in range(n)],
        classes=torch.arange(n),
        labels=torch.tensor(labels, dtype=torch.int64),
        n_clusters=len(set(labels)),
        silhouette=0.5,
        distances=torch.as_tensor(distances, dtype=torch.float64),
        linkage=None,
        leaf_order=torch.arange(n),
    )


# neuron 0 prefers class 0 throughout; neuron 1 switches from class 1 to class 2; neuron 2 keeps
# class 2 but becomes selective
EPOCH0 = [[1.0, 0.0, 0.1], [0.0, 1.0, 0.1], [0.0, 0.5, 0.1]]
EPOCH1 = [[1.0, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.9, 1.0]]
POINTS = np.array([0.0, 1.0, 5.0, 6.0])
DISTANCES = np.abs(POINTS[:, None] - POINTS[None, :])


def test_neuron_evolution_follows_each_neurons_class_and_selectivity():
    evolution = neuron_evolution([stats(1, EPOCH1), stats(0, EPOCH0)])  # any order
    assert evolution.epochs.tolist() == [0, 1]
    assert evolution.preferred_class.tolist() == [[0, 1, 0], [0, 2, 2]]
    # neurons 1 and 2 changed: 2 of 3
    np.testing.assert_allclose(evolution.changed_fraction, [2 / 3])
    # neuron 2: flat (SI 0) then responds to class 2 only (SI 1)
    np.testing.assert_allclose(evolution.selectivity[:, 2], [0.0, 1.0], atol=1e-12)  # float64 sums
    with pytest.raises(NeuronsError, match="one layer"):
        neuron_evolution([stats(0, EPOCH0), stats(1, EPOCH1, layer="other")])
    with pytest.raises(NeuronsError, match="at least one epoch"):
        neuron_evolution([])


def test_distance_correlation_is_one_for_the_same_shape_and_lower_when_classes_move():
    assert distance_correlation(DISTANCES, 3.0 * DISTANCES) == pytest.approx(1.0)
    moved = POINTS[[0, 2, 1, 3]]  # classes 1 and 2 swap places
    swapped = np.abs(moved[:, None] - moved[None, :])
    assert distance_correlation(DISTANCES, swapped) < 0.5
    with_nan = DISTANCES.copy()
    with_nan[0, :] = with_nan[:, 0] = np.nan  # a class left out: its pairs are skipped
    assert distance_correlation(with_nan, DISTANCES) == pytest.approx(1.0)
    assert np.isnan(distance_correlation(np.zeros((4, 4)), DISTANCES))


def test_clustering_evolution_ignores_how_clusters_are_numbered():
    evolution = clustering_evolution(
        [
            clustering(0, [0, 0, 1, 1], DISTANCES),
            clustering(1, [1, 1, 0, 0], 2 * DISTANCES),  # the same partition, renumbered
            clustering(2, [0, 1, 1, 0], DISTANCES),  # another partition
        ]
    )
    assert evolution.epochs.tolist() == [0, 1, 2]
    assert evolution.adjusted_rand[0] == pytest.approx(1.0)
    assert evolution.adjusted_rand[1] < 0.0
    np.testing.assert_allclose(evolution.distance_correlation, [1.0, 1.0])


def test_compare_results_names_the_neurons_and_categories_that_changed():
    a = clustering(0, [0, 0, 1, 1], DISTANCES)
    b = clustering(1, [0, 0, 0, 1], DISTANCES)  # class 2 joined classes 0 and 1
    result = compare_results(
        {"conv": stats(0, EPOCH0)}, {"conv": stats(1, EPOCH1)}, {"conv": a}, {"conv": b}
    )
    change = result.layers["conv"]
    assert change.changed.tolist() == [1, 2] and change.changed_fraction == pytest.approx(2 / 3)
    assert change.profile_correlation[0] == pytest.approx(1.0)
    category = result.categories["conv"]
    # class 3 lost its mate (class 2), classes 0, 1 gained one, class 2 changed company
    assert category.moved.tolist() == [0, 1, 2, 3]
    # mates include the class itself: class 2 went from {2, 3} to {0, 1, 2}: 1 of 4
    np.testing.assert_allclose(category.mates_overlap, [2 / 3, 2 / 3, 1 / 4, 1 / 2])
    same = compare_results(
        {"conv": stats(0, EPOCH0)}, {"conv": stats(1, EPOCH0)}, {"conv": a}, {"conv": a}
    )
    assert same.layers["conv"].changed.size == 0 and same.categories["conv"].moved.size == 0
    with pytest.raises(NeuronsError, match="share no layer"):
        compare_results({"conv": stats(0, EPOCH0)}, {"fc": stats(0, EPOCH0, layer="fc")})


def test_histories_keep_what_the_figures_need_and_skip_a_repeated_epoch():
    neurons = NeuronHistory()
    assert neurons.update({"conv": stats(0, EPOCH0)}) == {}
    evolution = neurons.update({"conv": stats(1, EPOCH1)})["conv"]
    assert evolution.preferred_class.tolist() == [[0, 1, 0], [0, 2, 2]]
    categories = ClusteringHistory()
    assert categories.update({"conv": clustering(0, [0, 0, 1, 1], DISTANCES)}) == {}
    moved = categories.update({"conv": clustering(1, [0, 1, 1, 0], DISTANCES)})["conv"]
    again = categories.update({"conv": clustering(1, [0, 0, 1, 1], DISTANCES)})  # same epoch
    assert again == {} and moved.adjusted_rand[0] < 0.0
    # a negative index (the partition moved a lot) is drawn on the chart, not below it
    lines = clustering_evolution_figure(moved).axes[0]
    assert lines.get_ylim()[0] < moved.adjusted_rand[0] < lines.get_ylim()[1]


def test_analyses_within_an_epoch_are_kept_apart_by_their_steps():
    # validations within an epoch (val_check_interval < 1): epoch 0 at steps 3 and 6, epoch 1
    neurons = NeuronHistory()
    assert neurons.update({"conv": stats(0, EPOCH0)}, step=3) == {}
    within = neurons.update({"conv": stats(0, EPOCH1)}, step=6)["conv"]
    assert within.epochs.tolist() == [0, 0] and within.steps.tolist() == [3, 6]
    assert within.changed_fraction.tolist() == pytest.approx([2 / 3])
    again = neurons.update({"conv": stats(0, EPOCH0)}, step=6)["conv"]  # the same step: replaced
    assert again.steps.tolist() == [3, 6] and again.changed_fraction.tolist() == [0.0]
    last = neurons.update({"conv": stats(1, EPOCH1)}, step=9)["conv"]
    assert last.epochs.tolist() == [0, 0, 1] and last.steps.tolist() == [3, 6, 9]
    categories = ClusteringHistory()
    categories.update({"conv": clustering(0, [0, 0, 1, 1], DISTANCES)}, step=3)
    moved = categories.update({"conv": clustering(0, [0, 1, 1, 0], DISTANCES)}, step=6)["conv"]
    assert moved.steps.tolist() == [3, 6] and moved.adjusted_rand[0] < 0.0
    assert categories.update({"conv": clustering(0, [0, 0, 1, 1], DISTANCES)}, step=6) == {}
    # the figures label the analyses by step when an epoch repeats, else by epoch
    assert analysis_ticks(last.epochs, last.steps) == (["3", "6", "9"], "step")
    assert analysis_ticks(np.array([0, 1]), np.array([6, 12])) == (["0", "1"], "epoch")
    assert analysis_ticks(np.array([0, 1]), None) == (["0", "1"], "epoch")
    for figure in (neuron_evolution_figure(last), clustering_evolution_figure(moved)):
        ticks = [t.get_text() for ax in figure.axes for t in ax.get_xticklabels()]
        labels = [ax.get_xlabel() for ax in figure.axes]
        texts = [t.get_text() for t in figure.findobj(Text)]
        assert "6" in ticks and any(label.startswith("step") for label in labels)
        assert any("over steps" in text for text in texts)


def test_figures_are_agg_figures_without_pyplot_and_draw_into_a_given_figure():
    pyplot_before = "matplotlib.pyplot" in sys.modules
    evolution = neuron_evolution([stats(0, EPOCH0), stats(1, EPOCH1)])
    categories = clustering_evolution(
        [clustering(0, [0, 0, 1, 1], DISTANCES), clustering(1, [1, 0, 0, -1], DISTANCES)]
    )
    result = compare_results(
        {"conv": stats(0, EPOCH0)},
        {"conv": stats(1, EPOCH1)},
        {"conv": clustering(0, [0, 0, 1, 1], DISTANCES)},
        {"conv": clustering(1, [0, 0, 0, 1], DISTANCES)},
    )
    figures = [
        neuron_evolution_figure(evolution, ["zero", "one", "two"]),
        clustering_evolution_figure(categories),
        comparison_figure(result),
        comparison_figure(compare_results({"conv": stats(0, EPOCH0)}, {"conv": stats(1, EPOCH1)})),
    ]
    for figure in figures:
        assert isinstance(figure, Figure)
        pixels = render(figure)
        assert pixels.ndim == 3 and pixels.shape[1] <= 480 and pixels.std() > 0
    own = Figure(figsize=(8, 4))
    assert neuron_evolution_figure(evolution, figure=own) is own and own.axes
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before


def test_the_evolution_image_is_the_figure_with_one_frame_for_every_layer(monkeypatch):
    import lightning_neurons.plots.evolution as plots

    real, frames = plots._neuron_frame, []

    def counted(layout: _NeuronLayout) -> Figure:
        frames.append(layout)
        return real(layout)

    monkeypatch.setattr(plots, "_neuron_frame", counted)
    _canvas._frames.clear()
    names = ["zero", "one", "two"]
    conv = neuron_evolution([stats(0, EPOCH0), stats(1, EPOCH1)])
    other = neuron_evolution([stats(0, EPOCH1, "fc"), stats(1, EPOCH0, "fc")])
    image = neuron_evolution_image(conv, names)
    assert neuron_evolution_image(other, names).shape == image.shape
    assert len(frames) == 1, "the same epochs and classes: one frame drawn for both layers"
    drawn = render(neuron_evolution_figure(conv, names))
    assert drawn.shape == image.shape and image.shape[1] == 480
    # the same pixels but where the heatmaps' cells are cut into pixels a little differently
    assert (drawn == image).all(axis=-1).mean() > 0.95
    # latest classes [0, 2, 2]: neuron 0 (class 0) on top, then neurons 1 and 2 (class 2)
    left, top, width, height = _NeuronLayout.of(conv, names).boxes()[0]
    x = left + 3 * width // 4  # the latest epoch's column
    colours = class_colours(3)([0, 2], bytes=True)[:, :3]
    assert (image[top + height // 6, x] == colours[0]).all()
    assert (image[top + 5 * height // 6, x] == colours[1]).all()


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("evolution")
    import lightning.pytorch as pl
    from conftest import TinyNet

    from lightning_neurons.models import ImageClassifier

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)
    callbacks = [
        ActivationTracker(on_error="raise"),
        CategoryClustering(views="all", on_error="raise"),  # relu2 too, not only the deepest
    ]
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    trainer.fit(model, datamodule=TinyData())
    return trainer.logger.log_dir, trainer.global_step


def test_a_live_run_logs_the_evolution_from_its_second_analysed_epoch(two_epochs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, last_step = two_epochs
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images, scalars = events.Tags()["images"], events.Tags()["scalars"]
    for tag in (
        "activations/backbone.relu2/evolution",
        "category_clustering/backbone.relu2/evolution",
    ):
        assert tag in images
        assert [e.step for e in events.Images(tag)] == [last_step]  # not in the first epoch
    assert "neurons/activations/backbone.relu2/preference_changed" in scalars
    assert "neurons/category_clustering/backbone.relu2/distance_correlation" in scalars


def test_a_run_read_back_gives_the_same_evolution_as_the_live_one(two_epochs):
    run = load_run(two_epochs[0])
    evolution = run_neuron_evolution(run)["backbone.relu2"]
    assert evolution.epochs.tolist() == [0, 1]
    live_stats = [run.results("ActivationTracker", e)["backbone.relu2"] for e in run.epochs]
    np.testing.assert_array_equal(
        evolution.preferred_class, np.stack([s.preferred_class.numpy() for s in live_stats])
    )
    categories = run_clustering_evolution(run)["backbone.relu2"]
    stability = run.results("CategoryClustering", 1)["backbone.relu2"].stability
    assert categories.adjusted_rand[0] == pytest.approx(stability)  # the callback's own ARI
    result = compare_runs(run)  # first vs last epoch
    assert (result.epoch_a, result.epoch_b) == (0, 1)
    assert result.label_a == "epoch 0" and "backbone.relu2" in result.categories
    assert isinstance(comparison_figure(result), Figure)
    other = compare_runs(run, load_run(two_epochs[0]), epoch_a=1)
    assert all(c.changed.size == 0 for c in other.layers.values())
