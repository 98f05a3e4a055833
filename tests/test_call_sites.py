"""A module run several times per forward pass: every analysis treats each call as its own layer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyData, fast_trainer
from torch import nn

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    RenderOptions,
)
from lightning_neurons.class_contribution import class_contributions
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.models import ImageClassifier
from lightning_neurons.visualize import Channel, render

SITES = ["backbone.relu", "backbone.relu#1"]


class SharedReLUNet(nn.Module):
    """One ReLU module run twice per forward pass, on 4 and then 6 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 3)
        self.num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    pl.seed_everything(0, verbose=False)
    model, data = ImageClassifier(SharedReLUNet(), num_classes=3, lr=1e-2), TinyData()
    callbacks = [
        ActivationTracker(enable_logging=False, on_error="raise"),
        FeatureVisualizer(
            render=RenderOptions(steps=2),
            max_channels=2,
            saliency=[],
            classes=[],
            enable_logging=False,
            on_error="raise",
        ),
        CategoryClustering(views="all", enable_logging=False, on_error="raise"),
        NeuronClustering(method="kmeans", n_clusters=2, enable_logging=False, on_error="raise"),
        NeuronContribution(max_batches=2, max_probes=2, enable_logging=False, on_error="raise"),
    ]
    trainer = fast_trainer(tmp_path_factory.mktemp("shared"), callbacks=callbacks, max_epochs=1)
    with pytest.warns(UserWarning, match="runs 2 times per forward pass"):
        trainer.fit(model, datamodule=data)
    return model, data, callbacks


def test_every_analysis_gives_each_call_its_own_results(fitted):
    model, _, (tracker, visualizer, categories, neurons, contribution) = fitted
    assert list(tracker.results) == SITES
    assert list(visualizer.results) == SITES
    assert visualizer.results["backbone.relu#1"].images.shape[0] == 2
    assert set(categories.results) == {*SITES, "combined"}
    assert categories.results["combined"].layers == SITES
    assert list(neurons.results) == SITES
    assert neurons.results["backbone.relu#1"].labels.shape == (6,)
    assert list(contribution.results) == SITES
    widths = [contribution.results[s].class_contribution.shape[1] for s in SITES]
    assert widths == [4, 6]
    # the default ablation layer is the last tracked one: both of its calls are ablated
    assert all(contribution.results[s].ablation is not None for s in SITES)
    assert count_forward_hooks(model) == 0


def test_contributions_per_call_equal_the_library_function(fitted):
    model, data, (*_, contribution) = fitted
    kept = [b for _, b in zip(range(2), data.val_dataloader(), strict=False)]
    expected = class_contributions(model, ["backbone.relu"], kept)
    for site in SITES:
        got = contribution.results[site].class_contribution
        # the same float32 products summed in float64 in the same order
        torch.testing.assert_close(got, expected[site].class_contribution, atol=1e-9, rtol=0)


def test_rendering_a_call_site_scores_that_call_only():
    torch.manual_seed(0)
    net = SharedReLUNet().eval()
    # channel 5 exists only in the second call (6 channels); the first call has 4
    images = render(net, [Channel("relu#1", 5)], image_shape=(1, 8, 8), steps=2).images
    assert images.shape == (1, 1, 8, 8)
    with pytest.raises(Exception, match="channel 5"):
        render(net, [Channel("relu", 5)], image_shape=(1, 8, 8), steps=2)
    assert count_forward_hooks(net) == 0
