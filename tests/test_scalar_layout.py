"""TensorBoard's Custom Scalars tab shows every layer of an analysis metric on one chart."""

from __future__ import annotations

import re
import warnings

from conftest import TinyData, TinyNet, fast_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    NeuronClustering,
    NeuronContribution,
)
from lightning_neurons.models import ImageClassifier
from lightning_neurons.scalar_layout import ScalarLayout

TAGS = [
    "neurons/activations/conv1/dead_fraction",
    "neurons/activations/conv2/dead_fraction",
    "neurons/activations/conv2/mean_selectivity",
    "neurons/contribution/fc/ablation_selectivity/own_drop",
    "neurons/contribution/fc.1#1/ablation_selectivity/own_drop",
    "neurons/preference/conv1/steps",
    "neurons/preference/classes/steps",
    "neurons/preference/clusters/conv1/steps",
    "neurons/preference/clusters/conv1/model_agrees",
    "neurons/neuron_clustering/conv1/n_clusters",
    "neurons/category_clustering/combined/n_clusters",
]


def _charts(layout: dict) -> dict[tuple[str, str], str]:
    return {
        (category, title): content[1][0]
        for category, charts in layout.items()
        for title, content in charts.items()
    }


def _matched(pattern: str, tags: list[str]) -> list[str]:
    return [tag for tag in tags if re.search(pattern, tag)]


def test_each_metric_is_one_chart_with_a_line_per_layer():
    layout = ScalarLayout()
    assert layout.add(TAGS)
    charts = _charts(layout.layout())
    assert set(charts) == {
        ("neurons/activations", "dead_fraction"),
        ("neurons/activations", "conv2/mean_selectivity"),  # one layer: its name stays
        ("neurons/contribution", "ablation_selectivity/own_drop"),
        ("neurons/preference", "steps"),
        ("neurons/preference", "clusters/conv1/model_agrees"),
        ("neurons/neuron_clustering", "conv1/n_clusters"),
        ("neurons/category_clustering", "combined/n_clusters"),
    }
    for (category, _), pattern in charts.items():
        # the chart's lines: its category's tags that end with its title, whatever the layer
        title_tags = [t for t in TAGS if t.startswith(category + "/")]
        assert _matched(pattern, title_tags) == _matched(pattern, TAGS)
    assert _matched(charts["neurons/activations", "dead_fraction"], TAGS) == TAGS[:2]
    assert _matched(charts["neurons/preference", "steps"], TAGS) == TAGS[5:8]
    assert (
        _matched(charts["neurons/contribution", "ablation_selectivity/own_drop"], TAGS)
        == (TAGS[3:5])
    )
    # every tag is on exactly one chart
    assert all(sum(bool(re.search(p, t)) for p in charts.values()) == 1 for t in TAGS)


def test_the_layout_changes_only_when_a_chart_does():
    layout = ScalarLayout()
    assert layout.add(["neurons/activations/conv1/dead_fraction"])
    assert not layout.add(["neurons/activations/conv1/dead_fraction"])
    assert not layout.add(["neurons/hp_metric", "neurons/activations/dead_fraction"])
    assert layout.add(["neurons/activations/conv2/dead_fraction"])  # title conv1/... -> dead_...
    assert list(layout.layout()["neurons/activations"]) == ["dead_fraction"]


def test_a_fit_writes_a_layout_that_charts_every_analysis_scalar(tmp_path):
    callbacks = [
        ActivationTracker(layers=["backbone.relu1", "backbone.relu2", "backbone.fc"]),
        CategoryClustering(),
        NeuronClustering(method="kmeans"),
        NeuronContribution(max_batches=2),
    ]
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ImageClassifier(TinyNet(), num_classes=3), datamodule=TinyData())
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    written = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(written[-1].tensor_proto.string_val[0])
    charts = {
        (category.title, chart.title): chart.multiline.tag[0]
        for category in layout.category
        for chart in category.chart
    }
    tags = [t for t in events.Tags()["scalars"] if t.startswith("neurons/")]
    assert len(tags) > 20 and len(written) < len(tags)  # written again only for new charts
    for tag in tags:
        on = [key for key, pattern in charts.items() if re.search(pattern, tag)]
        assert len(on) == 1, (tag, on)
        assert tag.startswith(on[0][0] + "/")
    for pattern in charts.values():
        assert _matched(pattern, tags)
    dead = _matched(charts["neurons/activations", "dead_fraction"], tags)
    assert len(dead) == 3  # one line per tracked layer
