"""The same callbacks given to a new fit (a notebook's cell run again) start afresh; a fit
resumed from its checkpoint in the same process continues where it stopped."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
from conftest import TinyData, TinyNet, fast_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
)
from lightning_neurons.callbacks import RenderOptions
from lightning_neurons.models import ImageClassifier

LAYER = "backbone.conv2"


class _Record(pl.Callback):
    """After each validation: the Adam steps of the channel images of that round, and the two
    clusterings' stability (NaN where there is no earlier epoch of the fit to compare with)."""

    def __init__(self, callbacks: list[pl.Callback]) -> None:
        self.vis, self.category, self.neurons = callbacks[1], callbacks[2], callbacks[3]
        self.seen: list[tuple[int, list[int], float, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.seen.append(
            (
                trainer.current_epoch,
                self.vis.results[LAYER].steps.tolist(),
                self.category.results[LAYER].stability,
                self.neurons.results[LAYER].stability,
            )
        )


def _callbacks() -> list[pl.Callback]:
    # no convergence test: the steps say whether a round started from noise (6) or continued (2)
    options = RenderOptions(steps=6, continue_steps=2, converge_tol=None)
    return [
        ActivationTracker(layers=["backbone.conv1", LAYER]),
        FeatureVisualizer(max_channels=2, saliency=[], render=options, on_error="raise"),
        CategoryClustering(views="all", on_error="raise"),
        NeuronClustering(method="kmeans", n_clusters=2, on_error="raise"),
    ]


def _fit(trainer: pl.Trainer, callbacks: list[pl.Callback], **kwargs) -> list[tuple]:
    record = _Record(callbacks)
    trainer.callbacks.append(record)
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ImageClassifier(TinyNet(), num_classes=3), datamodule=TinyData(), **kwargs)
    return record.seen


def _steps_of(log_dir: str, tag: str) -> list[int]:
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    kind = "images" if tag.endswith("evolution") else "scalars"
    if tag not in events.Tags()[kind]:
        return []
    found = events.Images(tag) if kind == "images" else events.Scalars(tag)
    return [event.step for event in found]


def test_callbacks_given_to_a_new_fit_start_afresh(tmp_path):
    callbacks = _callbacks()
    runs = []
    for run in range(2):
        trainer = fast_trainer(tmp_path / str(run), callbacks=list(callbacks), max_epochs=2)
        runs.append((trainer, _fit(trainer, callbacks)))
    for trainer, seen in runs:
        # each fit's first round from noise, its second continued; the clusterings' stability
        # compares with the fit's own earlier epoch only
        assert [(epoch, steps) for epoch, steps, _, _ in seen] == [(0, [6, 6]), (1, [2, 2])]
        assert all(math.isnan(value) for value in seen[0][2:]), seen[0]
        assert all(math.isfinite(value) for value in seen[1][2:]), seen[1]
        log_dir, last = trainer.logger.log_dir, trainer.global_step
        per_epoch = last // 2
        # what changed since the earlier epoch: logged at the second epoch only, the figures of
        # the whole history at the end
        for tag in (
            f"neurons/activations/{LAYER}/preference_changed",
            f"neurons/category_clustering/{LAYER}/distance_correlation",
            f"neurons/category_clustering/{LAYER}/stability",
        ):
            assert _steps_of(log_dir, tag) == [2 * per_epoch], tag
        for tag in (f"activations/{LAYER}/evolution", f"category_clustering/{LAYER}/evolution"):
            assert _steps_of(log_dir, tag) == [last], tag


def test_a_fit_resumed_in_the_same_process_continues(tmp_path):
    callbacks = _callbacks()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    first = fast_trainer(
        tmp_path, callbacks=[*callbacks, checkpoints], max_epochs=2, enable_checkpointing=True
    )
    _fit(first, callbacks)
    resumed = fast_trainer(tmp_path, callbacks=list(callbacks), max_epochs=3)
    (seen,) = _fit(resumed, callbacks, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    epoch, steps, category, neurons = seen
    assert (epoch, steps) == (2, [2, 2]), "the images of epoch 1 continued"
    assert math.isfinite(category) and math.isfinite(neurons), "compared with epoch 1"


def test_a_new_fit_on_other_images_renders_and_probes_them(tmp_path):
    """A notebook's next cell: the same callbacks, new images of another size. The images are
    rendered at the new size, the data prior and the probes come from the new data."""
    callbacks = _callbacks()
    vis = callbacks[1]
    vis.saliency_methods = ["gradient"]  # probes, so that they are chosen from the data
    for run, size in enumerate((8, 12)):
        trainer = fast_trainer(tmp_path / str(run), callbacks=list(callbacks), max_epochs=1)
        pl.seed_everything(0, verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = TinyData(size=size)
            trainer.fit(ImageClassifier(TinyNet(), num_classes=3), datamodule=data)
        assert vis.results["classes"].images.shape[-2:] == (size, size)
        assert vis.saliency_results.inputs.shape[-2:] == (size, size)
        first = [int((data.vy == c).nonzero()[0, 0]) for c in range(3)]
        assert vis.saliency_results.inputs.equal(data.vx[first]), "this fit's probe images"
