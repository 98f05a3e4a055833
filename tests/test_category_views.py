"""CategoryClustering's ``views``: which views are clustered and logged, from Python and YAML, and
clear errors for bad choices."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TinyData, fast_trainer
from test_clustering_callbacks import _scalar_tags, _tiny

from lightning_neurons import ActivationTracker, CategoryClustering, NeuronsError
from lightning_neurons.callbacks.category_clustering import COMBINED
from lightning_neurons.clustering import standardize_columns
from lightning_neurons.loggers import load_index

#: ResNet-50's 17 default layers, in the forward pass's order.
RESNET = ["relu"] + [
    f"layer{s}.{b}" for s, blocks in enumerate((3, 4, 6, 3), start=1) for b in range(blocks)
]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["layer4.2", COMBINED]),  # the default: bounded whatever the number of layers
        ({"views": 3}, ["layer4.0", "layer4.1", "layer4.2", COMBINED]),
        ({"views": 40}, [*RESNET, COMBINED]),  # more than there are: every layer
        ({"views": "all"}, [*RESNET, COMBINED]),
        ({"views": "all", "combine_layers": False}, RESNET),
        ({"views": 2, "combine_layers": False}, ["layer4.1", "layer4.2"]),
        # a list: those views (in the forward pass's order), and the headline view
        ({"views": [COMBINED, "layer2.0"]}, ["layer2.0", "layer4.2", COMBINED]),
        ({"views": ["layer1.0"], "view": "layer1.0"}, ["layer1.0"]),
        ({"views": ["layer1.0"], "view": COMBINED}, ["layer1.0", COMBINED]),
        ({"views": [COMBINED], "view": COMBINED}, [COMBINED]),
        ({"view": "layer3.5"}, ["layer3.5", "layer4.2", COMBINED]),
    ],
)
def test_the_views_chosen_for_seventeen_layers(kwargs, expected):
    assert CategoryClustering(**kwargs)._chosen_views(RESNET) == expected


def test_one_layer_has_no_combined_view_whatever_views_says():
    for views in (1, "all", [COMBINED]):
        assert CategoryClustering(views=views)._chosen_views(["fc"]) == ["fc"]


def test_the_default_logs_and_writes_only_the_deepest_layer_and_the_combined_view(tmp_path):
    layers = ["backbone.relu1", "backbone.relu2"]
    category = CategoryClustering(n_clusters=2, on_error="raise")
    trainer = fast_trainer(
        tmp_path, callbacks=[ActivationTracker(layers=layers, on_error="raise"), category]
    )
    trainer.fit(_tiny(), datamodule=TinyData())
    assert list(category.results) == ["backbone.relu2", COMBINED]
    assert category.main_view == "backbone.relu2"
    # the combined view still holds every layer's neurons
    assert category.results[COMBINED].layers == layers
    tags = _scalar_tags(trainer.logger.log_dir)
    assert "neurons/category_clustering/backbone.relu2/silhouette" in tags
    assert "category_clustering/combined/dendrogram" in tags
    assert not any("backbone.relu1" in t for t in tags if "category_clustering" in t)
    index = load_index(trainer.logger.log_dir + "/neurons")
    names = {r["name"] for r in index if r["kind"] == "category_clustering"}
    assert names == {"backbone.relu2", COMBINED, "assignments"}


def test_views_all_clusters_every_layer_and_the_same_views_give_the_same_results(tmp_path):
    layers = ["backbone.relu1", "backbone.relu2"]
    runs = {}
    for views in ("all", 1):
        category = CategoryClustering(views=views, n_clusters=2, enable_logging=False)
        trainer = fast_trainer(
            tmp_path / str(views),
            logger=False,
            callbacks=[ActivationTracker(layers=layers, enable_logging=False), category],
        )
        trainer.fit(_tiny(), datamodule=TinyData())
        runs[views] = category.results
    assert list(runs["all"]) == [*layers, COMBINED]
    for view, res in runs[1].items():  # choosing fewer views changes none of them
        assert res.labels.tolist() == runs["all"][view].labels.tolist()
        assert res.distances.allclose(runs["all"][view].distances, equal_nan=True)


_CHOICE = "`views` must be an integer >= 1 (the deepest layers), 'all', or a list of layer names"


@pytest.mark.parametrize("views", [0, -2, True, 1.5, "deepest", "", [], [""], ["a", 3], None])
def test_bad_views_are_clear_errors(views):
    with pytest.raises(NeuronsError, match=re.escape(_CHOICE)):
        CategoryClustering(views=views)


def test_combined_in_views_needs_combine_layers():
    with pytest.raises(NeuronsError, match="`views` names 'combined' but combine_layers=False"):
        CategoryClustering(views=[COMBINED], combine_layers=False)


def test_a_view_that_is_not_a_layer_is_a_clear_error_at_setup(tmp_path):
    category = CategoryClustering(views=["backbone.relu9", COMBINED])
    trainer = fast_trainer(
        tmp_path,
        callbacks=[ActivationTracker(layers=["backbone.relu1", "backbone.relu2"]), category],
    )
    with pytest.raises(NeuronsError, match=r"`views` names 'backbone.relu9', not among its layers"):
        trainer.fit(_tiny(), datamodule=TinyData())


@pytest.mark.parametrize(
    ("text", "expected"),
    [("all", "all"), ("2", 2), ("[combined, backbone.relu1]", [COMBINED, "backbone.relu1"])],
)
def test_views_from_yaml(text, expected):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CategoryClustering, "category")
    config = parser.parse_string(f"category:\n  views: {text}\n")
    category = parser.instantiate_classes(config).category
    assert category.views == expected


def test_the_combined_view_is_each_layers_standardised_block_side_by_side():
    """Every layer's class profile z-scored per neuron, in the layers' order; the rows of classes
    without images (NaN in any layer) NaN across the view."""
    g = torch.Generator().manual_seed(0)
    means = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(5, 7, generator=g) * 40}
    means["b"][2] = float("nan")  # a class that layer b saw no image of
    stats = {name: SimpleNamespace(class_means=m) for name, m in means.items()}
    layers, combined = CategoryClustering(views="all")._views(stats)[COMBINED]
    assert layers == ["a", "b"] and combined.dtype == np.float32
    blocks = [standardize_columns(np.nan_to_num(m.numpy())) for m in means.values()]
    expected = np.concatenate(blocks, axis=1)
    expected[2] = np.nan
    np.testing.assert_array_equal(combined, expected)  # the same operations: bit for bit
    assert np.isfinite(np.delete(combined, 2, axis=0)).all()
