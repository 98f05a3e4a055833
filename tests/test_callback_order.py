"""The order of the callbacks in the Trainer's list changes no result: each callback publishes at
its own epoch end and reads the others' results at the stage end, after they have finished."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TinyData, TinyNet, fast_trainer

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    RenderOptions,
)
from lightning_neurons.models import ImageClassifier

LAYER = "backbone.relu2"


def _callbacks() -> dict[str, pl.Callback]:
    quiet = {"enable_logging": False, "on_error": "raise"}
    return {
        "tracker": ActivationTracker(layers=["backbone.relu1", LAYER], enable_logging=False),
        "category": CategoryClustering(n_clusters=2, **quiet),
        "neurons": NeuronClustering(layers=[LAYER], method="kmeans", n_clusters=2, **quiet),
        "visualizer": FeatureVisualizer(
            layers=[LAYER],
            max_channels=6,
            classes=[0],
            saliency=("gradient",),
            render=RenderOptions(steps=2, class_restarts=1, class_views=1),
            **quiet,
        ),
        "contribution": NeuronContribution(
            layers=[LAYER], max_batches=2, max_probes=2, probe_top=2, **quiet
        ),
    }


def _run(tmp_path, order: list[str]) -> dict[str, pl.Callback]:
    callbacks = _callbacks()
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)
    trainer = fast_trainer(tmp_path, callbacks=[callbacks[k] for k in order], logger=False)
    trainer.fit(model, datamodule=TinyData())
    return callbacks


def test_any_order_of_callbacks_gives_the_same_results(tmp_path):
    names = list(_callbacks())
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    orders = [names, names[::-1], shuffled, [names[-1], *names[:-1]]]
    assert len({tuple(o) for o in orders}) == len(orders)
    runs = [_run(tmp_path / str(i), order) for i, order in enumerate(orders)]
    first = runs[0]
    contribution = first["contribution"].results[LAYER]
    # every order ablates the clusters of the same epoch and shows the same epoch's renders
    assert contribution.ablation.clusters_epoch == 1
    assert contribution.ablation.sets[3:] == ["cluster 0", "cluster 1"]
    assert all(s == ["rendered"] * 2 for s in contribution.probes.preferred_source)
    for order, run in zip(orders[1:], runs[1:], strict=True):
        got = run["contribution"].results[LAYER]
        assert got.epoch == contribution.epoch == 1, order
        assert got.ablation.sets == contribution.ablation.sets, order
        assert got.ablation.clusters_epoch == 1, order
        torch.testing.assert_close(got.ablation.accuracy_drop, contribution.ablation.accuracy_drop)
        torch.testing.assert_close(got.class_contribution, contribution.class_contribution)
        assert got.probes.preferred_source == contribution.probes.preferred_source, order
        for a, b in zip(got.probes.preferred, contribution.probes.preferred, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), order
        for view, res in first["category"].results.items():
            assert np.array_equal(run["category"].results[view].labels, res.labels), order
        assert np.array_equal(
            run["neurons"].results[LAYER].labels, first["neurons"].results[LAYER].labels
        ), order
        assert run["neurons"].results[LAYER].epoch == 1
        for key, res in first["visualizer"].results.items():
            assert torch.equal(run["visualizer"].results[key].images, res.images), order
            assert run["visualizer"].results[key].epoch == 1
        tracker = run["tracker"].results[LAYER]
        torch.testing.assert_close(tracker.class_means, first["tracker"].results[LAYER].class_means)


def test_an_analysis_that_cannot_run_says_so_at_teardown(tmp_path):
    class Broken(NeuronClustering):
        def on_validation_end(self, trainer, pl_module):  # forgets super(): never finishes
            pass

    contribution = NeuronContribution(max_batches=1, enable_logging=False)
    callbacks = [ActivationTracker(enable_logging=False), Broken(), contribution]
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1, logger=False)
    with pytest.warns(
        UserWarning, match="NeuronContribution: the analysis at the end of validation"
    ):
        trainer.fit(ImageClassifier(TinyNet(), num_classes=3), datamodule=TinyData())
    assert contribution.results == {}
