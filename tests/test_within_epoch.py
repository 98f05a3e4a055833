"""Validations within an epoch (``val_check_interval`` < 1, or every N training batches across
epochs) and checkpoints saved within one: each analysis keeps its own files, named by epoch and
step (``epoch=000-step=0000003``), and ``load_run`` reads each back by its step."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyData, TinyNet, fast_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_neurons import ActivationTracker, NeuronClustering, NeuronsError, load_run
from lightning_neurons.analyze import analyze_checkpoints
from lightning_neurons.evolution import run_neuron_evolution
from lightning_neurons.models import ImageClassifier

LAYER = "backbone.relu2"


class _Held(pl.Callback):
    """What the tracker and NeuronClustering held after each validation, by global step."""

    def __init__(self, tracker: ActivationTracker, clusters: NeuronClustering) -> None:
        self.tracker, self.clusters = tracker, clusters
        self.means: dict[int, torch.Tensor] = {}
        self.clustered: list[int] = []
        self._last: object = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if LAYER in self.tracker.results:  # not before the tracker's first analysis
            self.means[step] = self.tracker.results[LAYER].class_means.clone()
        result = self.clusters.results.get(LAYER)
        if result is not None and result is not self._last:  # a new clustering
            self.clustered.append(step)
        self._last = result


def _callbacks(within_epochs: bool) -> tuple[ActivationTracker, NeuronClustering]:
    tracker = ActivationTracker(
        layers=["backbone.relu1", LAYER], within_epochs=within_epochs, on_error="raise"
    )
    clusters = NeuronClustering(
        layers=[LAYER], method="kmeans", n_clusters=2, every_n_epochs=2, on_error="raise"
    )
    return tracker, clusters


def _fit(
    tmp_path: Path,
    within_epochs: bool = True,
    more: tuple[pl.Callback, ...] = (),
    ckpt_path: Path | None = None,
    **trainer_options,
) -> tuple[Path, _Held]:
    """TinyNet on TinyData: 48 training images in batches of 8, six training batches an epoch."""
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)
    tracker, clusters = _callbacks(within_epochs)
    held = _Held(tracker, clusters)
    callbacks = [tracker, clusters, held, *more]
    trainer = fast_trainer(tmp_path, callbacks=callbacks, **trainer_options)
    trainer.fit(model, datamodule=TinyData(), ckpt_path=ckpt_path)
    return Path(trainer.logger.log_dir), held


def _folders(log_dir: Path, stage: str, kind: str) -> list[str]:
    return sorted(p.name for p in (log_dir / "neurons" / stage / kind).iterdir())


def test_validations_within_an_epoch_keep_their_own_files(tmp_path):
    # val_check_interval=0.5: a validation after the 3rd and after the 6th (last) batch of each
    # epoch; the first lies within its epoch, the second at its end
    log_dir, held = _fit(tmp_path, max_epochs=2, val_check_interval=0.5)
    assert sorted(held.means) == [3, 6, 9, 12]
    assert _folders(log_dir, "fit", "activations") == [
        "epoch=000",
        "epoch=000-step=0000003",
        "epoch=001",
        "epoch=001-step=0000009",
    ]
    run = load_run(log_dir)
    assert run.epochs == [0, 1]
    assert run.steps_of(ActivationTracker) == [3, 6, 9, 12]
    assert run.steps == {0: 6, 1: 12}
    for step, means in held.means.items():  # each validation's statistics, none overwritten
        loaded = run.results(ActivationTracker, step=step)[LAYER].class_means
        torch.testing.assert_close(loaded, means, rtol=0, atol=0, equal_nan=True)
    # the two analyses of an epoch differ (the model trained 3 batches in between)
    assert not torch.allclose(held.means[3], held.means[6])
    # an epoch alone names its last analysis, at its end
    torch.testing.assert_close(run.results(ActivationTracker, 0)[LAYER].class_means, held.means[6])
    # every validation of a due epoch (every_n_epochs=2: the second) is analysed
    assert held.clustered == [9, 12]
    assert run.steps_of(NeuronClustering) == [9, 12]
    with pytest.raises(NeuronsError, match=r"did not analyse epoch 0.*epochs 1 \(at steps 9, 12\)"):
        run.results(NeuronClustering, 0)
    # the evolution over the analyses: each one against the one before, the figure at the end
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    changed = events.Scalars(f"neurons/activations/{LAYER}/preference_changed")
    assert [e.step for e in changed] == [6, 9, 12]
    assert [e.step for e in events.Images(f"activations/{LAYER}/evolution")] == [12]
    evolution = run_neuron_evolution(run)[LAYER]  # read back: every analysis too
    assert evolution.steps.tolist() == [3, 6, 9, 12] and evolution.epochs.tolist() == [0, 0, 1, 1]
    with pytest.raises(NeuronsError, match="did not analyse step 4"):
        run.results(ActivationTracker, step=4)
    with pytest.raises(NeuronsError, match="did not analyse epoch 1 and step 3"):
        run.results(ActivationTracker, 1, step=3)


def test_within_epochs_false_analyses_each_epochs_last_validation_only(tmp_path):
    # the tracker skips the validations within an epoch (steps 3 and 9); NeuronClustering reads
    # the tracker's statistics, so it runs where they are new: at the due epoch's end
    log_dir, held = _fit(tmp_path, within_epochs=False, max_epochs=2, val_check_interval=0.5)
    assert _folders(log_dir, "fit", "activations") == ["epoch=000", "epoch=001"]
    assert sorted(held.means) == [6, 9, 12]  # none yet at step 3; at 9 still step 6's
    torch.testing.assert_close(held.means[9], held.means[6], rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(held.means[12], held.means[6])
    run = load_run(log_dir)
    assert run.steps_of(ActivationTracker) == [6, 12] and held.clustered == [12]
    # the same fit analysing every validation: the statistics at step 6 are those of the epoch
    _, every = _fit(tmp_path / "every", max_epochs=2, val_check_interval=0.5)
    torch.testing.assert_close(every.means[6], held.means[6], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(NeuronsError, match="within_epochs"):
        ActivationTracker(within_epochs="no")


def test_validations_every_n_batches_count_validations_not_epochs(tmp_path):
    # check_val_every_n_epoch=None: a validation every 4 training batches whatever the epochs
    # (after batches 4, 8, 12 and 16 of 18); every_n_epochs=2 then means every 2nd validation
    log_dir, held = _fit(tmp_path, max_epochs=3, check_val_every_n_epoch=None, val_check_interval=4)
    assert sorted(held.means) == [4, 8, 12, 16]
    # batch 12 is the last of epoch 1: that validation is the epoch's end
    assert _folders(log_dir, "fit", "activations") == [
        "epoch=000-step=0000004",
        "epoch=001",
        "epoch=001-step=0000008",
        "epoch=002-step=0000016",
    ]
    assert held.clustered == [8, 16]
    assert _folders(log_dir, "fit", "neuron_clustering") == [
        "epoch=001-step=0000008",
        "epoch=002-step=0000016",
    ]
    assert load_run(log_dir).steps_of(NeuronClustering) == [8, 16]


def test_validations_by_time_count_validations_too(tmp_path):
    # val_check_interval as a duration (Lightning sets no val_check_batch): a zero one validates
    # after every training batch; every_n_epochs=2 is every 2nd validation of the fit
    _, held = _fit(
        tmp_path, max_epochs=1, check_val_every_n_epoch=None, val_check_interval=timedelta(0)
    )
    assert sorted(held.means) == [1, 2, 3, 4, 5, 6]
    assert held.clustered == [2, 4, 6]


def test_checkpoints_within_an_epoch_are_analysed_each(tmp_path):
    folder = tmp_path / "ckpt"
    pl.seed_everything(0, verbose=False)
    saver = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=3, save_last=True)
    trainer = fast_trainer(
        tmp_path / "train", max_epochs=2, callbacks=[saver], enable_checkpointing=True
    )
    trainer.fit(ImageClassifier(TinyNet(), num_classes=3, lr=1e-2), datamodule=TinyData())
    assert (folder / "last.ckpt").exists()  # the same epoch and step as the step-12 file

    tracker, clusters = _callbacks(within_epochs=False)  # analyze reads every checkpoint
    analyser = fast_trainer(tmp_path / "analyse", callbacks=[tracker, clusters])
    model = ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = analyze_checkpoints(analyser, model, TinyData(), folder, progress=False)
    said = [str(w.message) for w in caught if "only the latter is analysed" in str(w.message)]
    assert len(said) == 1 and "last.ckpt" in said[0]
    assert [(i.epoch, i.global_step, i.within_epoch) for i in infos] == [
        (0, 3, True),
        (0, 6, False),
        (1, 9, True),
        (1, 12, False),
    ]
    log_dir = Path(analyser.logger.log_dir)
    assert _folders(log_dir, "validate", "activations") == [
        "epoch=000",
        "epoch=000-step=0000003",
        "epoch=001",
        "epoch=001-step=0000009",
    ]
    run = load_run(log_dir, stage="validate")
    assert run.steps_of(ActivationTracker) == [3, 6, 9, 12]
    first = run.results(ActivationTracker, step=3)[LAYER].class_means
    assert not torch.allclose(first, run.results(ActivationTracker, 0)[LAYER].class_means)


class _Endless(torch.utils.data.IterableDataset):
    """TinyData's training images over and over: no length, so an epoch never ends."""

    def __init__(self, data: TinyData) -> None:
        self.x, self.y = data.x, data.y

    def __iter__(self):
        while True:
            yield from zip(self.x, self.y, strict=True)


@pytest.mark.parametrize("within_epochs", [True, False])
def test_an_endless_training_set_is_analysed_unless_told_to_wait_for_epoch_ends(
    tmp_path, within_epochs
):
    data = TinyData()
    train = torch.utils.data.DataLoader(_Endless(data), batch_size=8)
    tracker = ActivationTracker(layers=[LAYER], within_epochs=within_epochs, on_error="raise")
    trainer = fast_trainer(
        tmp_path, max_steps=6, val_check_interval=3, check_val_every_n_epoch=None,
        callbacks=[tracker],
    )  # fmt: skip
    module = ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=train, val_dataloaders=data.val_dataloader())
    said = [str(w.message) for w in record if "no validation will be analysed" in str(w.message)]
    if within_epochs:
        analysed = _folders(
            Path(trainer.logger.log_dir), "fit", "activations"
        )  # the validations after training batches 3 and 6, each named by its step
        assert not said and analysed == ["epoch=000-step=0000003", "epoch=000-step=0000006"]
        assert LAYER in tracker.results
    else:
        assert len(said) == 1 and "within_epochs=True" in said[0] and LAYER not in tracker.results


def test_a_fit_resumed_from_a_checkpoint_counts_its_validations_by_time_on(tmp_path):
    # a checkpoint at each validation; the fit resumed from the third: validations 4 to 6, so
    # every 2nd one is at steps 4 and 6 as in the whole fit (counting afresh: step 5 only)
    by_time = dict(max_epochs=1, check_val_every_n_epoch=None, val_check_interval=timedelta(0))
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, enable_version_counter=False)
    _, whole = _fit(tmp_path / "whole", more=(saver,), enable_checkpointing=True, **by_time)
    assert whole.clustered == [2, 4, 6]
    third = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert torch.load(third, weights_only=False)["lightning_neurons_validations"] == [0, 1, 2]
    _, resumed = _fit(tmp_path / "resumed", ckpt_path=third, **by_time)
    assert sorted(resumed.means) == [4, 5, 6]
    assert resumed.clustered == [4, 6]
