"""ActivationTracker: correctness, errors, no side effects, hook hygiene, resume."""

from __future__ import annotations

import gc
import warnings
import weakref

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyData, TinyNet, fast_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import ActivationTracker, NeuronsError
from lightning_neurons.batch import read_labels as extract_labels
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.loggers import load_index
from lightning_neurons.models import ImageClassifier


def _module(seed: int = 0, net: nn.Module | None = None) -> ImageClassifier:
    pl.seed_everything(seed, verbose=False)
    return ImageClassifier(net or TinyNet(), num_classes=3, lr=1e-2)


def _hand_class_means(
    model: ImageClassifier, loader, layer: str, reduction: str = "mean"
) -> torch.Tensor:
    outputs = []
    post = torch.relu if layer == "backbone.relu()" else (lambda t: t)
    if layer == "backbone.relu()":  # the function layer of torch.relu(self.fc(...)) in TinyNet
        layer = "backbone.fc"
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: outputs.append(post(o.detach())))
    model.eval()
    labels = []
    with torch.no_grad():
        for x, y in loader:
            model(x)
            labels.append(y)
    handle.remove()
    acts = torch.cat(outputs).double()
    if acts.dim() == 4:
        acts = acts.mean(dim=(2, 3)) if reduction == "mean" else acts.amax(dim=(2, 3))
    y = torch.cat(labels)
    return torch.stack([acts[y == c].mean(0) for c in range(3)])


@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_class_means_equal_a_hand_computation(tmp_path, reduction):
    model, data = _module(), TinyData()
    tracker = ActivationTracker(reduction=reduction)
    fast_trainer(tmp_path, callbacks=[tracker]).fit(model, datamodule=data)
    # the default layers are TinyNet's ReLU modules and its torch.relu call (responses), not its
    # signed convs
    assert set(tracker.results) == {"backbone.relu1", "backbone.relu2", "backbone.relu()"}
    for layer in tracker.results:
        expected = _hand_class_means(model, data.val_dataloader(), layer, reduction)
        res = tracker.results[layer]
        torch.testing.assert_close(res.class_means.double(), expected, atol=1e-5, rtol=0)
        assert res.counts.tolist() == [8.0, 8.0, 8.0]
        assert res.epoch == 1
        assert res.dominant.shape == (3, min(5, res.num_neurons))
        assert res.selectivity.shape == res.dead.shape == (res.num_neurons,)


def test_train_stage_piggybacks_on_training_batches(tmp_path):
    model, data = _module(), TinyData()
    tracker = ActivationTracker(stage="train", layers=["backbone.conv2"], enable_logging=False)
    fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1).fit(model, datamodule=data)
    res = tracker.results["backbone.conv2"]
    assert res.counts.sum() == 48  # every training image once, no validation image
    assert res.epoch == 0


def test_every_n_epochs_and_max_batches(tmp_path):
    model, data = _module(), TinyData()
    tracker = ActivationTracker(every_n_epochs=2, max_batches=2, enable_logging=False)
    seen = []

    class Spy(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            res = tracker.results
            seen.append(None if not res else next(iter(res.values())).epoch)

    fast_trainer(tmp_path, callbacks=[tracker, Spy()], max_epochs=3).fit(model, datamodule=data)
    assert seen == [None, 1, 1]
    assert tracker.results["backbone.relu2"].counts.sum() == 16  # 2 batches of 8


def _final_weights(tmp_path, callbacks, stage_seed=0):
    model = _module(stage_seed)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=2)
    trainer.fit(model, datamodule=TinyData())
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


@pytest.mark.parametrize("stage", ["validation", "train"])
def test_no_side_effects_on_training(tmp_path, stage):
    plain, mode_plain = _final_weights(tmp_path / "a", [])
    tracked, mode_tracked = _final_weights(
        tmp_path / "b", [ActivationTracker(stage=stage, reduction="max")]
    )
    assert plain.keys() == tracked.keys()
    for key in plain:
        assert torch.equal(plain[key], tracked[key]), key
    assert mode_plain == mode_tracked


class _Modes(pl.Callback):
    """Records the model's training flag at every training batch."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append(pl_module.training)


def test_training_mode_is_untouched(tmp_path):
    spy_plain, spy_tracked = _Modes(), _Modes()
    _final_weights(tmp_path / "a", [spy_plain])
    _final_weights(tmp_path / "b", [ActivationTracker(), spy_tracked])
    assert spy_plain.modes == spy_tracked.modes and all(spy_plain.modes)


def test_hooks_are_removed_after_fit_validate_and_test(tmp_path):
    model, data = _module(), TinyData()
    tracker = ActivationTracker(stage="validation")
    trainer = fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1)
    trainer.fit(model, datamodule=data)
    assert count_forward_hooks(model) == 0
    trainer.validate(model, datamodule=data, verbose=False)
    assert count_forward_hooks(model) == 0
    assert tracker.results["backbone.relu2"].counts.sum() == 24
    test_tracker = ActivationTracker(stage="test")
    fast_trainer(tmp_path, callbacks=[test_tracker]).test(model, datamodule=data, verbose=False)
    assert count_forward_hooks(model) == 0
    assert test_tracker.results["backbone.relu2"].counts.sum() == 24


class _Boom(ImageClassifier):
    def validation_step(self, batch, batch_idx):
        assert count_forward_hooks(self) > 0  # the tracker is hooked right now
        if batch_idx == 1:
            raise RuntimeError("boom mid-epoch")
        return super().validation_step(batch, batch_idx)


def test_hooks_are_removed_after_an_exception_mid_epoch(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = _Boom(TinyNet(), num_classes=3)
    with pytest.raises(RuntimeError, match="boom mid-epoch"):
        fast_trainer(tmp_path, callbacks=[ActivationTracker()]).fit(model, datamodule=TinyData())
    assert count_forward_hooks(model) == 0


def test_unknown_layer_fails_at_fit_start_with_available_names(tmp_path):
    tracker = ActivationTracker(layers=["backbone.conv9"])
    with pytest.raises(
        NeuronsError,
        match=r"'backbone.conv9' not found.*Did you mean: .*backbone.conv1.*Available: backbone, backbone.conv1",
    ):
        fast_trainer(tmp_path, callbacks=[tracker]).fit(_module(), datamodule=TinyData())


def test_layer_with_an_unusable_output_shape(tmp_path):
    class SeqNet(TinyNet):
        def __init__(self):
            super().__init__()
            self.seq = nn.Flatten(0)  # the whole batch in one vector: no neuron axis

        def forward(self, x):
            self.seq(x)
            return super().forward(x)

    tracker = ActivationTracker(layers=["backbone.seq"])
    with pytest.raises(NeuronsError, match=r"'backbone.seq' returned a tensor of shape \(512,\)"):
        fast_trainer(tmp_path, callbacks=[tracker]).fit(
            _module(net=SeqNet()), datamodule=TinyData()
        )


def test_batch_without_labels(tmp_path):
    class NoLabels(TinyData):
        def val_dataloader(self):
            return DataLoader(self.vx, batch_size=8)

    class XOnly(ImageClassifier):
        def validation_step(self, batch, batch_idx):
            self(batch)

    pl.seed_everything(0, verbose=False)
    with pytest.raises(NeuronsError, match="carries no labels.*label_fn"):
        fast_trainer(tmp_path, callbacks=[ActivationTracker()]).fit(
            XOnly(TinyNet(), num_classes=3), datamodule=NoLabels()
        )


def test_label_layouts():
    y = torch.tensor([0, 2])
    assert torch.equal(extract_labels((torch.zeros(2), y, "meta")), y)
    assert torch.equal(extract_labels({"image": torch.zeros(2), "target": y}), y)
    assert torch.equal(extract_labels({"img": 0, "lbl": y}, label_fn=lambda b: b["lbl"]), y)
    with pytest.raises(NeuronsError, match=r"keys \['image'\] but none of label"):
        extract_labels({"image": torch.zeros(2)})
    # class probabilities (one-hot, mixup, label smoothing) are read as their top class
    soft = torch.tensor([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0], [0.05, 0.05, 0.9]])
    assert extract_labels((torch.zeros(3), soft)).tolist() == [1, 0, 2]
    assert extract_labels((torch.zeros(3), soft.bfloat16())).tolist() == [1, 0, 2]
    one_hot = nn.functional.one_hot(torch.tensor([2, 0, 1]), 3)  # int64, as F.one_hot makes it
    assert extract_labels((torch.zeros(3), one_hot)).tolist() == [2, 0, 1]
    with pytest.raises(NeuronsError, match=r"row 0 sums to 2 "):
        extract_labels((torch.zeros(1), torch.tensor([[1, 0, 1]])))  # multi-hot integers
    with pytest.raises(NeuronsError, match=r"row 1 sums to 2 .*Multi-label targets and logits"):
        extract_labels((torch.zeros(2), torch.tensor([[0.0, 1.0], [1.0, 1.0]])))  # multi-hot
    with pytest.raises(NeuronsError, match=r"row 0 sums to 0.5 .*label_fn="):
        extract_labels((torch.zeros(1), torch.tensor([[-1.5, 2.0]])))  # logits
    # a binary classifier's targets: 0.0 / 1.0 (BCE's, a [B, 1] column too), or booleans
    for targets in (torch.tensor([0.0, 2.0, 1.0]), torch.tensor([[0.0], [2.0], [1.0]])):
        read = extract_labels((torch.zeros(3), targets))
        assert read.dtype == torch.int64 and read.tolist() == [0, 2, 1]
    assert extract_labels((torch.zeros(2), torch.tensor([True, False]))).tolist() == [1, 0]
    with pytest.raises(NeuronsError, match=r"whole numbers; one is 0.7\b.*label_fn="):
        extract_labels((torch.zeros(2), torch.tensor([1.0, 0.7])))
    with pytest.raises(NeuronsError, match=r"whole numbers; one is nan"):
        extract_labels((torch.zeros(2), torch.tensor([1.0, float("nan")])))
    with pytest.raises(NeuronsError, match=r"\[B\] integer class indices or \[B, num_classes\]"):
        extract_labels((torch.zeros(2), torch.zeros(2, 1, 3)))


def _soft_validation(data: TinyData, share: float) -> DataLoader:
    """``data``'s validation images with mixup-like targets: ``share`` of each image's class, the
    rest the next class's (so the top class is the label whenever ``share > 0.5``)."""
    one_hot = nn.functional.one_hot(data.vy, data.num_classes).float()
    targets = share * one_hot + (1 - share) * one_hot.roll(1, dims=1)
    return DataLoader(TensorDataset(data.vx, targets), batch_size=data.batch_size)


def test_class_probability_labels_give_the_statistics_of_their_top_class(tmp_path):
    class SoftVal(TinyData):
        def val_dataloader(self):
            return _soft_validation(self, 0.7)

    results = {}
    for name, data in {"indices": TinyData(), "probabilities": SoftVal()}.items():
        tracker = ActivationTracker()
        fast_trainer(tmp_path / name, callbacks=[tracker]).fit(_module(), datamodule=data)
        results[name] = tracker.results
    assert set(results["indices"]) == set(results["probabilities"])
    for layer, res in results["indices"].items():
        soft = results["probabilities"][layer]
        # the same images through the same weights, counted for the same classes: the same
        # arithmetic in the same order, so equal to the bit
        assert torch.equal(soft.counts, res.counts)
        assert torch.equal(soft.class_means, res.class_means)
        assert torch.equal(soft.selectivity.nan_to_num(), res.selectivity.nan_to_num())


def test_labels_that_are_not_probabilities_are_reported_at_the_first_batch(tmp_path):
    class MultiHot(TinyData):
        def val_dataloader(self):
            targets = _soft_validation(self, 0.5).dataset.tensors[1] * 2  # two classes each
            return DataLoader(TensorDataset(self.vx, targets), batch_size=self.batch_size)

    pl.seed_everything(0, verbose=False)
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker()], num_sanity_val_steps=1)
    with pytest.raises(NeuronsError, match=r"row 0 sums to 2 .*pass `label_fn=`"):
        trainer.fit(_module(), datamodule=MultiHot())
    assert trainer.global_step == 0  # reported by the sanity check, before any training step


def test_labels_out_of_range(tmp_path):
    class BigLabels(TinyData):
        def val_dataloader(self):
            return DataLoader(TensorDataset(self.vx, self.vy + 5), batch_size=8)

    class NoLoss(ImageClassifier):
        def validation_step(self, batch, batch_idx):
            self(batch[0])

    pl.seed_everything(0, verbose=False)
    with pytest.raises(NeuronsError, match=r"label 7 is outside \[0, 3\)"):
        fast_trainer(tmp_path, callbacks=[ActivationTracker()]).fit(
            NoLoss(TinyNet(), num_classes=3), datamodule=BigLabels()
        )


def test_nan_activations_are_counted_and_reported(tmp_path):
    class NanNet(TinyNet):
        def forward(self, x):
            out = super().forward(x)
            # poison fc's input for the brightest images: NaN reaches backbone.fc only in eval
            return out

    model = _module()
    fc = model.backbone.fc

    def poison(module, inputs, output):
        if not module.training:
            output = output.clone()
            output[::4, 0] = float("nan")
            return output

    fc.register_forward_hook(poison)
    tracker = ActivationTracker(layers=["backbone.fc"])
    with pytest.warns(UserWarning, match=r"'backbone.fc' gave 6 non-finite.*1 of 8 neurons"):
        fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1).fit(model, datamodule=TinyData())
    res = tracker.results["backbone.fc"]
    assert res.nan_counts.tolist() == [6.0] + [0.0] * 7
    assert torch.isfinite(res.class_means).all()


def _absent_class_notes(record) -> list[str]:
    return [str(w.message) for w in record if "had no image" in str(w.message)]


def test_classes_without_images_are_said_once_with_the_class_count_to_check(tmp_path):
    # 3 classes in the data, 5 for the tracker: classes 3 and 4 never seen, in either epoch
    tracker = ActivationTracker(layers=["backbone.fc"], num_classes=5, enable_logging=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast_trainer(tmp_path, callbacks=[tracker]).fit(_module(), datamodule=TinyData())
    (note,) = _absent_class_notes(record)
    assert "2 of the 5 classes had no image in the validation batches of epoch 0" in note
    assert "(classes 3, 4; 3 had images)" in note
    assert "if the data has 3 classes, build the model with 3 outputs" in note
    assert "`num_classes=3`" in note
    res = tracker.results["backbone.fc"]
    assert res.counts.tolist() == [8.0, 8.0, 8.0, 0.0, 0.0]
    assert torch.isnan(res.class_means[3:]).all() and torch.isfinite(res.class_means[:3]).all()


def test_a_class_missing_from_the_validation_data_points_at_the_data(tmp_path):
    data = TinyData()
    keep = data.vy != 1
    data.vx, data.vy = data.vx[keep], data.vy[keep]
    tracker = ActivationTracker(layers=["backbone.fc"], enable_logging=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1).fit(_module(), datamodule=data)
    (note,) = _absent_class_notes(record)
    assert "1 of the 3 classes had no image" in note and "(classes 1; 2 had images)" in note
    assert "hold every class (the data's split, `limit_val_batches`, `max_batches`)" in note


def test_no_absent_class_note_when_every_class_has_images(tmp_path):
    tracker = ActivationTracker(layers=["backbone.fc"], enable_logging=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1).fit(
            _module(), datamodule=TinyData()
        )
    assert _absent_class_notes(record) == []


def test_logs_figures_and_files_next_to_the_event_files(tmp_path):
    tracker = ActivationTracker(layers=["backbone.conv2", "backbone.fc"])
    trainer = fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1)
    trainer.fit(_module(), datamodule=TinyData())
    root = tmp_path / "tb" / "version_0" / "neurons"
    index = load_index(root)
    assert {r["name"] for r in index} == {"backbone.conv2", "backbone.fc"}
    import numpy as np

    arrays = np.load(root / index[0]["file"])
    assert arrays["class_means"].shape[0] == 3 and "selectivity" in arrays
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}
    ).Reload()
    tags = events.Tags()
    assert "activations/backbone.fc/class_profile" in tags["images"]
    assert "neurons/activations/backbone.fc/dead_fraction" in tags["scalars"]
    assert "activations/backbone.conv2/selectivity" in tags["histograms"]


def test_without_tensorboard_warns_once_and_still_writes_files(tmp_path):
    tracker = ActivationTracker(layers=["backbone.fc"])
    with pytest.warns(UserWarning, match="no TensorBoardLogger") as record:
        fast_trainer(tmp_path, callbacks=[tracker], logger=False, max_epochs=2).fit(
            _module(), datamodule=TinyData()
        )
    assert sum("no TensorBoardLogger" in str(w.message) for w in record) == 1
    assert [r["name"] for r in load_index(tmp_path / "neurons" / "run_0")] == ["backbone.fc"] * 2


def test_an_epochs_results_and_checkpoint_are_not_changed_by_later_epochs(tmp_path):
    """What the tracker published at an epoch's end (its results, a checkpoint taken while the
    next epoch is being measured) keeps that epoch's numbers."""
    tracker = ActivationTracker(layers=["backbone.conv2"], enable_logging=False)
    ends, mid = [], []

    class Keep(pl.Callback):
        def on_validation_batch_end(self, trainer, *args, **kwargs):  # after the tracker's
            if trainer.current_epoch > 0:
                mid.append((trainer.current_epoch, tracker.state_dict()["states"]))

        def on_validation_end(self, trainer, pl_module):  # after the tracker has published
            stats = tracker.results["backbone.conv2"]
            copies = {k: v.clone() for k, v in stats.as_arrays().items()}
            ends.append((stats, copies, tracker.state_dict()["states"]))

    fast_trainer(tmp_path, callbacks=[tracker, Keep()], max_epochs=3).fit(
        _module(), datamodule=TinyData()
    )
    assert len(ends) == 3 and len(mid) == 2 * 3  # 3 validation batches in epochs 1 and 2
    assert not torch.equal(ends[0][1]["class_means"], ends[2][1]["class_means"])
    for stats, copies, _ in ends:
        arrays = stats.as_arrays()
        for key, value in copies.items():
            torch.testing.assert_close(arrays[key], value, rtol=0, atol=0, equal_nan=True)
    for epoch, states in mid:  # a checkpoint mid-epoch holds the last complete epoch
        previous = ends[epoch - 1][2]["backbone.conv2"]
        assert all(torch.equal(states["backbone.conv2"][k], v) for k, v in previous.items())


def test_the_tracker_holds_its_statistics_once_between_epochs(tmp_path):
    """After an epoch's end the tracker holds the summed states once (its checkpoint state and
    the metric's own), not a copy per torchmetrics ``compute()`` and ``reset()``."""
    tracker = ActivationTracker(layers=["backbone.conv2"], enable_logging=False)
    held = []

    class Measure(pl.Callback):
        def on_validation_end(self, trainer, pl_module):  # after the tracker has published
            metric = tracker._metrics["backbone.conv2"]
            tensors = [*metric._defaults.values(), *metric.summed().values()]
            tensors += [t for s in tracker._saved_states.values() for t in s.values()]
            tensors += [getattr(metric, name) for name in metric._defaults]
            storages = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
            }
            states = sum(getattr(metric, name).nbytes for name in metric._defaults)
            held.append((sum(storages.values()), states))

    fast_trainer(tmp_path, callbacks=[tracker, Measure()], max_epochs=2).fit(
        _module(), datamodule=TinyData()
    )
    assert len(held) == 2
    for total, states in held:  # the defaults' one element each: under 64 bytes
        assert states <= total < states + 64


def test_checkpoint_resume_restores_the_statistics(tmp_path):
    model, data = _module(), TinyData()
    tracker = ActivationTracker(layers=["backbone.conv2"])
    trainer = fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1)
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    restored = ActivationTracker(layers=["backbone.conv2"])
    assert not restored.results
    trainer2 = fast_trainer(tmp_path, callbacks=[restored], max_epochs=1)
    trainer2.fit(_module(1), datamodule=data, ckpt_path=str(ckpt))
    before, after = tracker.results["backbone.conv2"], restored.results["backbone.conv2"]
    torch.testing.assert_close(after.class_means, before.class_means)
    assert after.epoch == before.epoch == 0
    # a tracker with other arguments keeps its own state key, so it is not confused with this one
    assert ActivationTracker(layers=["backbone.fc"]).state_key != restored.state_key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction": "median"}, "`reduction` must be one of 'mean', 'max'; got 'median'"),
        ({"stage": "predict"}, "`stage` must be one of 'validation', 'train', 'test'"),
        ({"top_k": 0}, "`top_k` must be an integer >= 1; got 0"),
        ({"top_k": True}, "`top_k` must be an integer >= 1; got True"),
        ({"num_classes": 0}, r"`num_classes` must be an integer >= 1 or None; got 0"),
        ({"max_batches": 1.5}, r"`max_batches` must be an integer >= 1 or None; got 1.5"),
        ({"dataloader_idx": -1}, "`dataloader_idx` must be an integer >= 0; got -1"),
        ({"label_fn": "label"}, "`label_fn` must be a callable or None; got 'label'"),
        ({"layers": 3}, "`layers` must be a layer name or a list of layer names or None; got 3"),
        ({"every_n_epochs": -1}, "`every_n_epochs` must be an integer >= 1; got -1"),
        ({"enable_logging": "yes"}, "`enable_logging` must be a bool; got 'yes'"),
        ({"on_error": "ignore"}, "`on_error` must be one of 'warn', 'raise'; got 'ignore'"),
    ],
)
def test_arguments_are_checked(kwargs, message):
    with pytest.raises(NeuronsError, match="^ActivationTracker: " + message):
        ActivationTracker(**kwargs)


class _SharedReLUNet(nn.Module):
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


def test_each_call_of_a_shared_module_is_tracked_as_its_own_layer(tmp_path):
    model, data = _module(net=_SharedReLUNet()), TinyData()
    tracker = ActivationTracker(enable_logging=False)  # default layers: the ReLU, both calls
    with pytest.warns(UserWarning, match=r"'backbone.relu' runs 2 times.*backbone.relu#1"):
        fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1).fit(model, datamodule=data)
    assert list(tracker.results) == ["backbone.relu", "backbone.relu#1"]
    first, second = tracker.results["backbone.relu"], tracker.results["backbone.relu#1"]
    assert first.num_neurons == 4 and second.num_neurons == 6
    assert first.counts.tolist() == second.counts.tolist() == [8.0, 8.0, 8.0]  # 24 images once
    net = model.backbone.eval()
    with torch.no_grad():
        x, y = data.vx, data.vy
        a = net.relu(net.conv1(x))
        b = net.relu(net.conv2(a))
    for res, act in ((first, a), (second, b)):
        expected = torch.stack([act[y == c].double().mean(dim=(0, 2, 3)) for c in range(3)])
        # float64 sums of the same float32 values in another order
        torch.testing.assert_close(res.class_means.double(), expected, atol=1e-5, rtol=0)
    only_second = ActivationTracker(layers=["backbone.relu#1"], enable_logging=False)
    fast_trainer(tmp_path, callbacks=[only_second], max_epochs=1).validate(
        model, datamodule=data, verbose=False
    )
    assert list(only_second.results) == ["backbone.relu#1"]
    assert count_forward_hooks(model) == 0


def test_signed_layers_picked_explicitly_get_a_note(tmp_path):
    tracker = ActivationTracker(layers=["backbone.conv1", "backbone.relu1"], enable_logging=False)
    with pytest.warns(UserWarning, match=r"backbone.conv1 output signed values.*shifted"):
        fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1).fit(_module(), TinyData())


def test_the_spec_is_what_the_tracker_tracks_and_peers_see_it_before_its_setup(tmp_path):
    """``tracker.spec`` is set at setup; :func:`tracker_spec` gives the same description to a
    peer whose setup runs first (it stands before the tracker in the callbacks' list)."""
    import dataclasses

    from lightning_neurons.callbacks.tracker import tracker_spec
    from lightning_neurons.results import TrackerSpec

    def label_fn(batch):
        return batch[1]

    tracker = ActivationTracker(
        layers=["backbone.relu*"], reduction="max", top_k=2, label_fn=label_fn, enable_logging=False
    )
    seen = []

    class Peer(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            seen.append(tracker_spec(trainer, required="Peer"))

    assert tracker.spec is None
    fast_trainer(tmp_path, callbacks=[Peer(), tracker], max_epochs=1).fit(
        _module(), datamodule=TinyData()
    )
    expected = TrackerSpec(
        reader=tracker.reader,
        layers=("backbone.relu1", "backbone.relu2", "backbone.relu()"),
        stage="validation",
        dataloader_idx=0,
        reduction="max",
        num_classes=3,
        top_k=2,
    )
    assert seen == [expected] and tracker.spec == expected
    assert tracker.spec.reader.label_fn is label_fn
    with pytest.raises(dataclasses.FrozenInstanceError):
        tracker.spec.stage = "train"


def test_tracker_spec_and_results_without_a_tracker_are_empty_or_a_clear_error():
    from types import SimpleNamespace

    from lightning_neurons.callbacks.tracker import tracker_results, tracker_spec

    trainer = SimpleNamespace(callbacks=[], lightning_module=None)
    assert tracker_spec(trainer) is None
    assert tracker_results(trainer) == {}
    for seam in (tracker_spec, tracker_results):
        with pytest.raises(NeuronsError, match="Peer reads the results of an ActivationTracker"):
            seam(trainer, required="Peer")


def test_tracker_results_are_what_the_tracker_published_in_a_copy_peers_cannot_change(tmp_path):
    from lightning_neurons.callbacks.tracker import tracker_results

    tracker = ActivationTracker(layers=["backbone.relu1"], enable_logging=False)
    trainer = fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1)
    trainer.fit(_module(), datamodule=TinyData())
    published = tracker_results(trainer, required="Peer")
    assert list(published) == ["backbone.relu1"]
    assert published["backbone.relu1"] is tracker.results["backbone.relu1"]
    published.clear()
    assert list(tracker.results) == ["backbone.relu1"]


def test_a_model_without_a_class_count_is_a_clear_error():
    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten())

    with pytest.raises(NeuronsError, match="could not tell how many classes NoHead predicts"):
        ActivationTracker().describe(NoHead())
    assert ActivationTracker(num_classes=4).describe(NoHead()).num_classes == 4


class _InPlaceAfterLinear(nn.Module):
    """A tracked Linear whose output the next module changes in place."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(64, 8)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(self.flat(x))))


def test_a_layer_changed_in_place_later_is_tracked_as_it_was(tmp_path):
    """The tracker holds a few batches before adding them up; a [B, K] output is copied, so a
    later ReLU(inplace=True) does not change what was tracked: the signed means of the Linear."""
    model, data = _module(net=_InPlaceAfterLinear()), TinyData()
    tracker = ActivationTracker(layers=["backbone.fc"])
    fast_trainer(tmp_path, callbacks=[tracker]).fit(model, datamodule=data)
    outputs, labels = [], []
    handle = model.backbone.fc.register_forward_hook(
        lambda m, i, o: outputs.append(o.detach().clone())
    )
    model.eval()
    with torch.no_grad():
        for x, y in data.val_dataloader():
            model(x)
            labels.append(y)
    handle.remove()
    acts, y = torch.cat(outputs).double(), torch.cat(labels)
    expected = torch.stack([acts[y == c].mean(0) for c in range(3)])
    means = tracker.results["backbone.fc"].class_means.double()
    assert (expected < 0).any()  # what the in-place ReLU would have zeroed
    torch.testing.assert_close(means, expected, atol=1e-5, rtol=0)


class _Mixed(nn.Module):
    """A signed conv, a ReLU module, a block ending in a ReLU whose result it then shifts in
    place (negative means, positive peaks), a residual block that returns its ReLU's result, a
    one-position pool, and float16 maps that are zero but for one small value, whose float16
    mean is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.block = _ShiftedAfterReLU()
        self.ends = _EndsInReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.small = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.zeros(x.shape[0], 2, 56, 56, dtype=torch.float16)
        maps[:, 0, 0, 0] = 1e-5  # its mean over 3,136 positions rounds to 0 in float16
        self.small(maps)
        return self.head(self.pool(self.ends(self.block(self.relu(self.conv(x))))).flatten(1))


class _ShiftedAfterReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(x)
        out -= 0.5  # in place, after the ReLU: this block's outputs can be negative
        return out


class _EndsInReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out += x
        return self.relu(out)


def test_firing_rates_equal_a_hand_count_whether_the_peak_or_the_mean_says_it(tmp_path):
    """A neuron fires on an image when its peak is positive. ReLU modules' outputs, and a block's
    that returns its ReLU's result unchanged, are never negative, so their means say it and
    their peaks are not reduced; every other layer's are (and a layer's one position is its own
    peak); float16 outputs keep their peaks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, data = _module(net=_Mixed()), TinyData()
    layers = ["backbone.conv", "backbone.relu", "backbone.block", "backbone.ends", "backbone.pool"]
    layers.append("backbone.small")
    tracker = ActivationTracker(layers=layers, max_batches=2)
    amax = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "amax":
                amax.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with Count():
        fast_trainer(tmp_path, max_epochs=1, callbacks=[tracker]).validate(model, datamodule=data)
    # two batches: peaks of the conv and the block (reduced together: their outputs, of one
    # shape with the ReLU's and `ends`', are stacked) and of the float16 maps only
    assert sorted(amax) == sorted([(8, 2, 4, 8, 8)] * 2 + [(8, 2, 56, 56)] * 2)
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: outputs[n].append(o.detach().float().flatten(2).amax(2))
        )
        for n in layers
    ]
    labels = []
    with torch.no_grad():
        for x, y in list(data.val_dataloader())[:2]:
            model(x)
            labels.append(y)
    for h in handles:
        h.remove()
    y = torch.cat(labels)
    for name in layers:
        fired = (torch.cat(outputs[name]) > 0).float()
        expected = torch.stack([fired[y == c].mean(0) for c in range(3)])
        assert torch.equal(tracker.results[name].firing_rate, expected), name
    assert (tracker.results["backbone.block"].class_means < 0).any()
    assert tracker.results["backbone.block"].firing_rate.sum() > 0
    small = tracker.results["backbone.small"]
    assert small.firing_rate[:, 0].tolist() == [1.0] * 3 and small.class_means[:, 0].eq(0).all()


def test_resnet_blocks_count_firing_from_their_means_as_their_peaks_would(tmp_path, monkeypatch):
    """torchvision's ResNet-18 (random weights): every default layer (the stem's ReLU, the
    blocks, which return their ReLU's result) is known never negative, and the firing counts are
    those that the peaks give."""
    import torchvision

    from lightning_neurons import grouped

    x, y = (
        torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        torch.arange(48) % 3,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    fired = []
    for shortcut in (True, False):
        if not shortcut:
            monkeypatch.setattr(grouped, "never_negative_layers", lambda *args: set())
        torch.manual_seed(0)  # the same weights both times
        model = _module(net=torchvision.models.resnet18(num_classes=3))
        tracker = ActivationTracker(enable_logging=False, on_error="raise")
        fast_trainer(tmp_path, callbacks=[tracker]).validate(model, loader, verbose=False)
        assert tracker._never_negative == (set(tracker.layers) if shortcut else set())
        fired.append({n: s["fired"] for n, s in tracker._saved_states.items()})
    assert fired[0].keys() == fired[1].keys() and len(fired[0]) == 9
    for name, counts in fired[0].items():
        assert torch.equal(counts, fired[1][name]), name
        assert 0 < counts.sum() < 48 * counts.shape[1]  # fired on some images, not on all


def test_the_last_epochs_statistics_are_released_before_the_next_are_made(tmp_path, monkeypatch):
    """The published ``[C, K]`` tables live on the host for the whole fit: the last epoch's go
    before this epoch's are computed, so that two epochs' never coexist."""
    from lightning_neurons.stats import LayerStats

    earlier: list[weakref.ref] = []
    alive_when_made: list[bool] = []
    from_state = LayerStats.from_state.__func__

    def spied(cls, *args, **kwargs):
        gc.collect()
        alive_when_made.append(any(ref() is not None for ref in earlier))
        stats = from_state(cls, *args, **kwargs)
        earlier.append(weakref.ref(stats.class_means))
        return stats

    monkeypatch.setattr(LayerStats, "from_state", classmethod(spied))
    tracker = ActivationTracker(layers=["backbone.relu1", "backbone.relu2"], enable_logging=False)
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)
    fast_trainer(tmp_path, callbacks=[tracker], max_epochs=3).fit(model, datamodule=TinyData())
    # an epoch's two layers are made one after the other: at each epoch's first, none is alive
    assert alive_when_made[0::2] == [False, False, False]
    assert earlier[-1]() is tracker.results["backbone.relu2"].class_means


class _Block(nn.Module):
    """A block around a ReLU module: the tracker's sign probe runs the model once to see that it
    returns its ReLU's output."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class _CallsItsNet(pl.LightningModule):
    """A module whose steps call ``self.net(x)``, not ``self(x)``, as many tutorials do."""

    def __init__(self) -> None:
        super().__init__()
        pl.seed_everything(0, verbose=False)
        self.net = nn.Sequential(
            _Block(1, 4), _Block(4, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_analyses_running_the_model_in_a_batch_do_not_shift_its_call_sites(tmp_path):
    """The sign probe (and any analysis's forward in a tracked batch) runs through the module's
    forward; the batch's own forward here does not, so nothing resets the calls counted between
    them. They are not counted: every call is call 0, and the first batch is in the statistics."""
    model, data = _CallsItsNet(), TinyData()
    tracker = ActivationTracker()
    trainer = fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=data)
    assert not [w for w in record if "times per forward pass" in str(w.message)]
    assert set(tracker.results) == {"net.0", "net.1"}
    outputs, labels = [], []
    handle = model.net[1].register_forward_hook(lambda m, i, o: outputs.append(o.mean(dim=(2, 3))))
    with torch.no_grad():
        for x, y in data.val_dataloader():
            model.eval()(x)
            labels.append(y)
    handle.remove()
    acts, y = torch.cat(outputs).double(), torch.cat(labels)
    expected = torch.stack([acts[y == c].mean(0) for c in range(3)])
    # the same float32 outputs, summed in float64 by the tracker and here: within a few ulps
    torch.testing.assert_close(
        tracker.results["net.1"].class_means.double(), expected, rtol=1e-6, atol=1e-7
    )
    assert tracker.results["net.1"].counts.sum() == len(data.vy)


class _ValidatesNothing(ImageClassifier):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return None  # a step that never runs the model


class _Skips(nn.Module):
    """TinyNet with a branch its forward never takes."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.unused = TinyNet(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _tracker_warnings(tmp_path, model: pl.LightningModule) -> list[str]:
    tracker = ActivationTracker(layers=["backbone.*relu*", "backbone.unused"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast_trainer(tmp_path, callbacks=[tracker], max_epochs=2, logger=False).fit(
            model, datamodule=TinyData()
        )
    return [str(w.message) for w in caught if "ran" in str(w.message)]


def test_a_step_that_never_runs_the_model_is_told_once(tmp_path):
    pl.seed_everything(0, verbose=False)
    said = _tracker_warnings(tmp_path, _ValidatesNothing(_Skips(), num_classes=3))
    assert len(said) == 1, said  # one warning, not one per layer and epoch
    assert "none of its layers ran in the 3 validation batch(es)" in said[0]
    assert "`validation_step` run the model" in said[0]


def test_a_layer_that_never_runs_is_told_once_by_name(tmp_path):
    pl.seed_everything(0, verbose=False)
    said = _tracker_warnings(tmp_path, ImageClassifier(_Skips(), num_classes=3))
    assert said == [
        "ActivationTracker: layer 'backbone.unused' did not run in the forward passes of this "
        "epoch (module 'backbone.unused' ran 0 time(s) per pass); it has no statistics."
    ]
