"""The analyses on the set-ups people really train: normalised data, several validation loaders,
mid-epoch validation, tuple/dict outputs, custom batches, no validation data, bf16, dead layers
and set-up errors. Each either gives the right numbers or a clear error at the first batch."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import FAST_VIS, TinyData, TinyNet, fast_trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    NeuronsError,
)
from lightning_neurons.clustering import NeuronClusterer
from lightning_neurons.data import Flatten, Normalize, TorchvisionDataModule
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.models import ImageClassifier, SmallCNN
from lightning_neurons.visualize import integrated_gradients


def _all_five(on_error: str = "raise", **tracker_kwargs) -> list[pl.Callback]:
    """Every callback, small and without figures (what is read matters here, not the logging)."""
    quiet = dict(on_error=on_error, enable_logging=False)
    return [
        ActivationTracker(**quiet, **tracker_kwargs),
        FeatureVisualizer(**quiet, **FAST_VIS),
        CategoryClustering(**quiet, n_clusters=2),
        NeuronClustering(**quiet, method="kmeans", n_clusters=2),
        NeuronContribution(**quiet, max_batches=1, max_probes=2),
    ]


def _module(net: nn.Module | None = None, cls: type = ImageClassifier) -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    return cls(net if net is not None else TinyNet(), num_classes=3, lr=1e-2)


def _quiet_fit(trainer: pl.Trainer, module: pl.LightningModule, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, **kwargs)


def _assert_every_analysis_produced(callbacks: list[pl.Callback], module: nn.Module) -> None:
    tracker, vis, category, neuron, contribution = callbacks
    assert tracker.results and vis.results and category.results and neuron.results
    assert contribution.results and vis.saliency_results.maps
    for cb in callbacks:
        assert not cb.failures, cb.failures
    assert count_forward_hooks(module) == 0


# ---- 4. normalised data --------------------------------------------------------------------------


def _image_folder(root, classes: int = 2, per_class: int = 6, size: int = 8) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 127 + 128 * c).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_normalised_loaders_probes_are_display_images_and_predictions_the_models(tmp_path):
    _image_folder(tmp_path / "data")
    data = TorchvisionDataModule(
        "imagefolder",
        root=str(tmp_path / "data"),
        image_size=8,
        batch_size=4,
        val_fraction=0.5,
        num_workers=0,
        normalize=True,
    )
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(SmallCNN(in_channels=3, num_classes=2, widths=(4, 8)), 2)
    vis = FeatureVisualizer(saliency=["gradient"], on_error="raise", **FAST_VIS)
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(), vis], max_epochs=1)
    _quiet_fit(trainer, module, datamodule=data)

    res = vis.saliency_results
    data.setup()
    loader_inputs = torch.cat([x for x, _ in data.val_dataloader()])
    assert loader_inputs.min() < 0  # the loaders yield normalised model inputs
    for probe in res.inputs:  # kept exactly as the loader yielded them
        assert (loader_inputs == probe).flatten(1).all(dim=1).any()
    images = res.images  # shown as display images: the inverse of the normalisation
    assert images.min() >= 0 and images.max() <= 1
    # Normalize(display) vs the input: float32 rounding of values of a few units
    torch.testing.assert_close(Normalize(*data._STATS["imagefolder"])(images), res.inputs)
    module.eval()
    with torch.no_grad():
        assert torch.equal(res.predicted, module(res.inputs).argmax(dim=1))


# ---- 5. several validation loaders -----------------------------------------------------------------


class MultiLoaderClassifier(ImageClassifier):
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val", self.val_acc)


class TwoValLoaders(TinyData):
    def val_dataloader(self) -> list[DataLoader]:
        other = TensorDataset(torch.rand(10, 1, 8, 8), torch.arange(10) % 3)
        return [super().val_dataloader(), DataLoader(other, batch_size=4)]


@pytest.mark.parametrize(("index", "images"), [(0, 24), (1, 10)])
def test_one_validation_loader_is_analysed_and_the_user_told_once(tmp_path, index, images):
    tracker = ActivationTracker(layers=["backbone.fc"], dataloader_idx=index, enable_logging=False)
    contribution = NeuronContribution(max_batches=10, max_probes=0, enable_logging=False)
    trainer = fast_trainer(tmp_path, callbacks=[tracker, contribution], max_epochs=2)
    with pytest.warns(UserWarning, match="2 data loaders; the analyses use loader") as record:
        trainer.fit(_module(cls=MultiLoaderClassifier), datamodule=TwoValLoaders())
    assert sum("2 data loaders" in str(w.message) for w in record) == 1
    assert tracker.results["backbone.fc"].counts.sum() == images
    assert contribution.results["backbone.fc"].counts.sum() == images


def test_a_dataloader_idx_beyond_the_loaders_is_an_error(tmp_path):
    tracker = ActivationTracker(layers=["backbone.fc"], dataloader_idx=2)
    trainer = fast_trainer(tmp_path, callbacks=[tracker], max_epochs=1)
    with pytest.raises(NeuronsError, match=r"dataloader_idx=2.*has 2 data loader"):
        _quiet_fit(trainer, _module(cls=MultiLoaderClassifier), datamodule=TwoValLoaders())


# ---- 6. training-stage statistics with mid-epoch validation ----------------------------------------


def test_train_stage_statistics_cover_the_whole_epoch_despite_mid_epoch_validation(tmp_path):
    tracker = ActivationTracker(layers=["backbone.fc"], stage="train")
    callbacks = [
        tracker,
        FeatureVisualizer(saliency=[], classes=[], **FAST_VIS),
        NeuronContribution(max_batches=1, max_probes=0, ablation_layers=[]),
    ]
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1, val_check_interval=0.5)
    _quiet_fit(trainer, _module(), datamodule=TinyData())
    assert tracker.results["backbone.fc"].counts.sum() == 48  # every training image
    assert not any(cb.failures for cb in callbacks)


# ---- 8. tuple and dict outputs, 9. custom batch layouts ---------------------------------------------


class TupleNet(TinyNet):
    """Returns ``(logits, aux_logits)`` like torchvision's aux-logit models."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = super().forward(x)
        return logits, 0.5 * logits


class DictNet(TinyNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": super().forward(x)}


class AnyOutputClassifier(ImageClassifier):
    """Trains on ``read(self(x))`` whatever the backbone returns."""

    def _step(self, batch, stage: str, acc) -> torch.Tensor:
        x, y = batch[0], batch[1]
        out = self(x)
        logits = out[0] if isinstance(out, tuple) else out["scores"]
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss)
        return loss


def test_tuple_outputs_are_read_by_every_analysis(tmp_path):
    callbacks = _all_five()
    module = _module(TupleNet(), AnyOutputClassifier)
    _quiet_fit(
        fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1), module, datamodule=TinyData()
    )
    _assert_every_analysis_produced(callbacks, module)


def test_dict_outputs_with_output_fn_are_read_by_every_analysis(tmp_path):
    callbacks = _all_five(output_fn=lambda out: out["scores"])
    module = _module(DictNet(), AnyOutputClassifier)
    _quiet_fit(
        fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1), module, datamodule=TinyData()
    )
    _assert_every_analysis_produced(callbacks, module)


def test_unreadable_dict_outputs_warn_and_training_goes_on(tmp_path):
    callbacks = _all_five(on_error="warn")
    tracker, vis, _, neuron, contribution = callbacks
    module = _module(DictNet(), AnyOutputClassifier)
    trainer = fast_trainer(tmp_path, callbacks=callbacks)
    with pytest.warns(UserWarning, match="output_fn="):
        trainer.fit(module, datamodule=TinyData())
    assert trainer.current_epoch == 2  # the fit was not stopped
    assert tracker.results and neuron.results  # they need no logits
    assert vis.results and "classes" not in vis.results and vis.saliency_results is None
    assert any("output_fn" in f for f in vis.failures + contribution.failures)
    assert count_forward_hooks(module) == 0


def _as_dict(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"img": torch.stack([x for x, _ in items]), "cls": torch.stack([y for _, y in items])}


class DictBatches(TinyData):
    """Batches ``{"img": x, "cls": y}``: keys that no default reads."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8, collate_fn=_as_dict)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.vx, self.vy), batch_size=8, collate_fn=_as_dict)


class DictBatchClassifier(ImageClassifier):
    def _step(self, batch, stage: str, acc) -> torch.Tensor:
        return super()._step((batch["img"], batch["cls"]), stage, acc)


def test_custom_batches_are_read_by_every_analysis_through_the_trackers_functions(tmp_path):
    callbacks = _all_five(input_fn=lambda b: b["img"], label_fn=lambda b: b["cls"])
    module = _module(cls=DictBatchClassifier)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=DictBatches())
    assert not [w for w in record if "cannot be read" in str(w.message)]
    _assert_every_analysis_produced(callbacks, module)
    probes = callbacks[1].saliency_results
    assert probes.labels.tolist() == [0, 1, 2]  # the first image of each class


# ---- 10. no validation data ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["limit_val_batches", "no_val_loader"])
def test_no_validation_data_gives_one_warning_naming_the_fix(tmp_path, how):
    tracker = ActivationTracker(layers=["backbone.fc"])
    data = TinyData()
    if how == "limit_val_batches":
        trainer = fast_trainer(tmp_path, callbacks=[tracker], max_epochs=3, limit_val_batches=0)
        kwargs = {"datamodule": data}
    else:
        trainer = fast_trainer(tmp_path, callbacks=[tracker], max_epochs=3)
        kwargs = {"train_dataloaders": data.train_dataloader()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(_module(), **kwargs)
    notes = [str(w.message) for w in record if "saw no validation batches" in str(w.message)]
    assert len(notes) == 1 and "ActivationTracker(stage='train')" in notes[0]
    assert not tracker.results


# ---- 11. bf16-true / 16-true -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16)]
)
def test_half_precision_models_are_rendered_and_explained_in_their_dtype(
    tmp_path, precision, dtype
):
    callbacks = _all_five()
    module = _module()
    trainer = fast_trainer(tmp_path, callbacks=callbacks, precision=precision)
    with warnings.catch_warnings():  # validate: pure float16 training diverges with Adam's eps
        warnings.simplefilter("ignore")
        trainer.validate(module, datamodule=TinyData(), verbose=False)
    assert next(module.parameters()).dtype == dtype
    _assert_every_analysis_produced(callbacks, module)
    vis = callbacks[1]
    assert all(torch.isfinite(m).all() for m in vis.saliency_results.maps.values())
    assert vis.results["classes"].images.dtype == torch.float32


# ---- 12. one failing layer ---------------------------------------------------------------------------


class DeadBranchNet(nn.Module):
    """``dead`` is a ReLU whose input is always far below zero: every neuron constant (dead)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.dead = nn.ReLU()
        self.head = nn.Linear(8, 3)
        self.num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x))
        off = self.dead(h - 1e4)
        return self.head((h + off).mean(dim=(2, 3)))


def test_a_dead_layer_is_left_unclustered_and_does_not_sink_the_others(tmp_path):
    tracker = ActivationTracker(layers=["backbone.relu", "backbone.dead"], enable_logging=False)
    neuron = NeuronClustering(method="kmeans", n_clusters=2)
    trainer = fast_trainer(tmp_path, callbacks=[tracker, neuron], max_epochs=2)
    with pytest.warns(UserWarning, match="8 of the 8 neurons of layer 'backbone.dead'") as record:
        trainer.fit(_module(DeadBranchNet()), datamodule=TinyData())
    assert sum("respond the same" in str(w.message) for w in record) == 1  # once per layer
    assert bool(tracker.results["backbone.dead"].dead.all())
    dead, live = neuron.results["backbone.dead"], neuron.results["backbone.relu"]
    assert dead.n_clusters == 0 and (dead.labels == -1).all() and dead.epoch == 1
    assert live.n_clusters == 2 and not neuron.failures


def test_a_layer_narrower_than_the_clusterer_needs_says_so(tmp_path):
    tracker = ActivationTracker(layers=["backbone.relu", "backbone.head"], enable_logging=False)
    neuron = NeuronClustering(method="kmeans", n_clusters=4)
    trainer = fast_trainer(tmp_path, callbacks=[tracker, neuron], max_epochs=1)
    message = "layer 'backbone.head' has 3 neurons; clustering needs at least 4 neurons whose"
    with pytest.warns(UserWarning, match=message) as record:
        trainer.fit(_module(DeadBranchNet()), datamodule=TinyData())
    assert not any("respond the same" in str(w.message) for w in record)  # they need not
    assert neuron.results["backbone.head"].n_clusters == 0
    assert neuron.results["backbone.relu"].n_clusters == 4


def test_a_failing_layer_does_not_sink_the_others(tmp_path, monkeypatch):
    original = NeuronClusterer.fit

    def broken(self, X, y=None):
        if np.shape(X)[1] == 4:  # the 4 channels of backbone.conv1 (backbone.fc has 8 units)
            raise RuntimeError("out of memory")
        return original(self, X, y)

    monkeypatch.setattr(NeuronClusterer, "fit", broken)
    tracker = ActivationTracker(layers=["backbone.conv1", "backbone.fc"], enable_logging=False)
    neuron = NeuronClustering(method="kmeans", n_clusters=2, enable_logging=False)
    trainer = fast_trainer(tmp_path, callbacks=[tracker, neuron], max_epochs=1)
    with pytest.warns(UserWarning, match="clustering of layer 'backbone.conv1' failed"):
        trainer.fit(_module(), datamodule=TinyData())
    assert list(neuron.results) == ["backbone.fc"]
    assert len(neuron.failures) == 1 and "out of memory" in neuron.failures[0]


def test_clusters_from_an_older_epoch_say_so(tmp_path):
    # NeuronClustering analyses every 2nd epoch: in epoch 2 the clusters of epoch 1 are ablated
    quiet = dict(enable_logging=False)
    contribution = NeuronContribution(max_batches=1, max_probes=0, **quiet)
    neuron = NeuronClustering(method="kmeans", n_clusters=2, every_n_epochs=2, **quiet)
    callbacks = [ActivationTracker(layers=["backbone.fc"], **quiet), contribution, neuron]
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=3)
    with pytest.warns(UserWarning, match="ablated in epoch 2 are NeuronClustering's of epoch 1"):
        trainer.fit(_module(), datamodule=TinyData())
    assert contribution.results["backbone.fc"].ablation.clusters_epoch == 1
    assert contribution.results["backbone.fc"].epoch == 2
    assert neuron.results["backbone.fc"].epoch == 1


# ---- 13. set-up errors before any training step -------------------------------------------------------


class CountingClassifier(ImageClassifier):
    steps = 0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


class SanityEnd(pl.Callback):
    ended = False

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ended = True


def test_a_label_out_of_range_is_reported_in_the_sanity_check(tmp_path):
    CountingClassifier.steps = 0
    data = TinyData(num_classes=4)  # labels 0..3 for a model of 3 classes
    sanity = SanityEnd()
    trainer = fast_trainer(
        tmp_path, callbacks=[ActivationTracker(), sanity], num_sanity_val_steps=1
    )
    with pytest.raises(NeuronsError, match=r"label 3 is outside \[0, 3\)"):
        _quiet_fit(trainer, _module(cls=CountingClassifier), datamodule=data)
    assert CountingClassifier.steps == 0 and not sanity.ended  # raised inside the sanity check


def test_a_wrong_image_shape_is_reported_before_the_first_training_step(tmp_path):
    CountingClassifier.steps = 0
    vis = FeatureVisualizer(image_shape=[3, 8, 8], **FAST_VIS)  # the model takes 1 channel
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(), vis])
    with pytest.raises(NeuronsError, match=r"failed on a \(1, 3, 8, 8\) image batch"):
        _quiet_fit(trainer, _module(cls=CountingClassifier), datamodule=TinyData())
    assert CountingClassifier.steps == 0 and trainer.global_step == 0


# ---- models on flattened images ------------------------------------------------------------------


class FlatData(TinyData):
    """TinyData's images flattened to ``[B, 64]`` vectors, as an MLP tutorial feeds them."""

    def __init__(self) -> None:
        super().__init__()
        self.x, self.vx = self.x.flatten(1), self.vx.flatten(1)


def _five_around(vis: FeatureVisualizer) -> list[pl.Callback]:
    """Every callback, raising on errors, with logging (what is logged matters here), around
    ``vis``."""
    return [
        ActivationTracker(on_error="raise"),
        vis,
        CategoryClustering(on_error="raise", n_clusters=2),
        NeuronClustering(on_error="raise", method="kmeans", n_clusters=2),
        NeuronContribution(on_error="raise", max_batches=1, max_probes=2),
    ]


def _image_tags(tmp_path) -> list[str]:
    """The image tags of ``fast_trainer``'s TensorBoard run under ``tmp_path``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb" / "version_0"
    return EventAccumulator(str(log_dir), size_guidance={"images": 0}).Reload().Tags()["images"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_a_model_on_flattened_images_gets_every_analysis_but_the_image_ones(tmp_path):
    vis = FeatureVisualizer(
        on_error="raise",
        image_shape=[1, 8, 8],
        input_transform=lambda im: im.flatten(1),
        **FAST_VIS,
    )
    callbacks = _five_around(vis)
    module = _module(_mlp())
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1)
    with pytest.warns(UserWarning, match=r"inputs are \[8, 64\] batches.*saliency maps"):
        trainer.fit(module, datamodule=FlatData())
    tracker, _, category, neuron, contribution = callbacks
    assert tracker.results and category.results and neuron.results and contribution.results
    assert vis.results["classes"].images.shape[1:] == (1, 8, 8)  # rendered through the transform
    assert vis.saliency_results is None  # no images to take maps of
    probes = next(iter(contribution.results.values())).probes
    assert probes is not None and probes.images.shape[1:] == (64,)
    for cb in callbacks:
        assert not cb.failures, cb.failures
    # the projector's points are written without a sprite; the probes get their table alone
    configs = list(tmp_path.rglob("projector_config.pbtxt"))
    assert configs and all("sprite" not in c.read_text() for c in configs)
    assert "tensor_path" in configs[0].read_text()
    assert not list(tmp_path.rglob("sprite.png"))
    images = _image_tags(tmp_path)
    assert "contribution/backbone.1/class_contribution" in images
    assert not [tag for tag in images if tag.endswith("/probes") or tag.startswith("focus/")]
    assert count_forward_hooks(module) == 0


def test_a_model_on_flattened_images_gets_every_analysis_through_flatten(tmp_path):
    methods = ["gradient", "smoothgrad", "integrated", "gradcam"]
    flatten = Flatten((1, 8, 8))
    vis = FeatureVisualizer(
        on_error="raise",
        input_transform=flatten,
        saliency=methods,
        integrated_steps=3,
        integrated_baseline="blur",
        **FAST_VIS,
    )
    callbacks = _five_around(vis)
    module = _module(_mlp())
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=FlatData())
    said = [str(w.message) for w in record]
    assert any("no Conv2d layer, nor transformer tokens" in m for m in said)  # Grad-CAM left out
    assert not any("not images" in m or "param='maco'" in m for m in said), said
    for cb in callbacks:
        assert not cb.failures, cb.failures
    # the image shape is Flatten's; the prior is estimated from the images it gives back
    assert vis.results["classes"].images.shape[1:] == (1, 8, 8)
    assert vis.estimated_prior is not None
    maps = vis.saliency_results
    assert set(maps.maps) == {"gradient", "smoothgrad", "integrated"}
    # Integrated Gradients of the display images through the transform, at integrated_steps,
    # from the images blurred (integrated_baseline), not from black
    common = dict(steps=3, input_transform=flatten)
    own = integrated_gradients(module, maps.images, maps.predicted, baseline="blur", **common)
    torch.testing.assert_close(maps.maps["integrated"], own, rtol=1e-4, atol=1e-6)
    black = integrated_gradients(module, maps.images, maps.predicted, **common)
    assert not torch.allclose(maps.maps["integrated"], black, rtol=0.05, atol=1e-3)
    assert maps.images.shape[1:] == (1, 8, 8) and maps.inputs.shape[1:] == (64,)
    # probe images are the data's images: the flat inputs folded back (display images are
    # clamped to [0, 1]; TinyData's reach 1.6), exactly
    folded = maps.inputs.view(-1, 1, 8, 8).clamp(0, 1)
    torch.testing.assert_close(maps.images, folded, rtol=0, atol=0)
    assert list(tmp_path.rglob("sprite.png"))  # the projector shows the neurons' top crops
    images = _image_tags(tmp_path)
    focus = {"focus/gradient", "focus/smoothgrad", "focus/integrated"}
    assert {"contribution/backbone.1/probes", *focus} <= set(images)
    assert count_forward_hooks(module) == 0


class ChannelData(TinyData):
    """TinyData with ``channels`` channels (two-channel microscopy, RGB-D, multispectral)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.x = self.x.expand(-1, channels, -1, -1) * torch.linspace(0.5, 1, channels).view(
            1, -1, 1, 1
        )
        self.vx = self.vx.expand(-1, channels, -1, -1).clone()


@pytest.mark.parametrize("channels", [2, 4])
def test_images_of_two_or_four_channels_get_every_analysis_and_figure(tmp_path, channels):
    callbacks = _five_around(FeatureVisualizer(on_error="raise", **FAST_VIS))
    module = _module(TinyNet(in_channels=channels))
    _quiet_fit(
        fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1),
        module,
        datamodule=ChannelData(channels),
    )
    _assert_every_analysis_produced(callbacks, module)
    vis = callbacks[1]
    assert vis.results["classes"].images.shape[1] == channels  # every channel kept
    assert vis.saliency_results.images.shape[1] == channels
    assert list(tmp_path.rglob("sprite.png"))
    images = set(_image_tags(tmp_path))
    grids = {
        "preference/classes",
        "preference/backbone.relu1",
        "preference/clusters/backbone.relu1",
    }
    assert grids | {"focus/gradient", "contribution/backbone.relu1/probes"} <= images


def test_flattened_images_without_an_image_shape_are_a_clear_error(tmp_path):
    trainer = fast_trainer(tmp_path, callbacks=[FeatureVisualizer(**FAST_VIS)], max_epochs=1)
    with pytest.raises(NeuronsError, match=r"model input is \[8, 64\].*image_shape=\[C, H, W\]"):
        _quiet_fit(trainer, _module(_mlp()), datamodule=FlatData())
    assert trainer.global_step == 0


# ---- a LightningModule without forward ------------------------------------------------------------


class NoForward(pl.LightningModule):
    """Steps call ``self.model(x)``; no ``forward`` (Lightning does not require one)."""

    def __init__(self) -> None:
        super().__init__()
        pl.seed_everything(0, verbose=False)
        self.model = TinyNet()

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self.model(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class WithForward(NoForward):
    def forward(self, x):
        return self.model(x)


def test_a_module_without_forward_is_run_through_its_only_child_with_parameters(tmp_path):
    """Every analysis runs ``self.model`` (its only child with parameters), as a ``forward``
    calling it would: FeatureVisualizer and NeuronContribution stopped at set-up before."""
    results = []
    for cls in (NoForward, WithForward):
        callbacks = _all_five()
        module = cls()
        trainer = fast_trainer(tmp_path / cls.__name__, callbacks=callbacks, max_epochs=1)
        _quiet_fit(trainer, module, datamodule=TinyData())
        _assert_every_analysis_produced(callbacks, module)
        assert "forward" not in vars(module)  # borrowed only while an analysis runs
        results.append(callbacks[-1].results)
    borrowed, own = results
    assert borrowed.keys() == own.keys()
    for layer in own:  # the same float32 operations in the same order, in the same process
        assert torch.equal(borrowed[layer].class_contribution, own[layer].class_contribution), layer


class TwoParts(NoForward):
    """A backbone and a head, both with parameters, called one after the other by the steps."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)


@pytest.mark.parametrize("who", [FeatureVisualizer, NeuronContribution])
def test_a_module_without_forward_and_two_children_with_parameters_is_told_to_add_one(
    tmp_path, who
):
    trainer = fast_trainer(tmp_path, callbacks=[ActivationTracker(), who()], max_epochs=1)
    with pytest.raises(
        NeuronsError,
        match=r"no `forward` and its parameters are not in one submodule \(model, head\)",
    ):
        _quiet_fit(trainer, TwoParts(), datamodule=TinyData())
    assert trainer.global_step == 0


def test_a_module_without_forward_gets_the_analyses_of_its_own_batches(tmp_path):
    callbacks = [
        ActivationTracker(on_error="raise"),
        CategoryClustering(on_error="raise", n_clusters=2),
        NeuronClustering(on_error="raise", method="kmeans", n_clusters=2),
    ]
    _quiet_fit(
        fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1),
        NoForward(),
        datamodule=TinyData(),
    )
    assert all(cb.results and not cb.failures for cb in callbacks)
    assert list(tmp_path.rglob("sprite.png"))  # crops of the batches the steps ran


# ---- a binary classifier: one logit, a sigmoid, 0.0 / 1.0 targets ---------------------------------


class OneLogit(pl.LightningModule):
    """A binary classifier as people write one: one logit, BCE on float targets."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.binary_cross_entropy_with_logits(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _binary_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(32) % 2).float()[:, None]  # [B, 1] float targets, as BCE takes them
    x = torch.rand(32, 1, 8, 8, generator=g) + 0.5 * y[:, :, None, None]
    return DataLoader(TensorDataset(x, y), batch_size=8)


def test_a_binary_classifier_with_one_logit_gets_every_analysis_but_category_clustering(tmp_path):
    callbacks = [cb for cb in _all_five() if not isinstance(cb, CategoryClustering)]
    tracker, vis, neurons, contribution = callbacks
    module = OneLogit()
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1)
    _quiet_fit(
        trainer, module, train_dataloaders=_binary_loader(), val_dataloaders=_binary_loader()
    )
    assert tracker.num_classes == 2 and not any(cb.failures for cb in callbacks)
    stats = tracker.results["net.1"]
    assert stats.counts.tolist() == [16, 16], "the 0.0 and 1.0 targets are the two classes"
    assert vis.results["classes"].channels.tolist() == [0, 1]
    probability = vis.results["classes"].probability
    assert torch.all((probability > 0) & (probability < 1))
    assert neurons.results and contribution.results["net.1"].class_contribution.shape == (2, 4)
    assert count_forward_hooks(module) == 0
    with pytest.raises(NeuronsError, match="needs 3 classes or more, and the model predicts 2"):
        fast_trainer(tmp_path, callbacks=_all_five()).fit(
            OneLogit(), _binary_loader(), _binary_loader()
        )


class BuiltInConfigureModel(ImageClassifier):
    """Builds its network in ``configure_model`` (Lightning's way for large models), or in
    ``setup``: both run after the callbacks' ``setup``."""

    def __init__(self, hook: str) -> None:
        super().__init__(nn.Identity(), num_classes=3, lr=1e-2)
        self.hook = hook

    def _build(self) -> None:
        if isinstance(self.backbone, nn.Identity):
            pl.seed_everything(0, verbose=False)
            self.backbone = TinyNet()

    def configure_model(self) -> None:
        if self.hook == "configure_model":
            self._build()

    def setup(self, stage: str) -> None:
        if self.hook == "setup":
            self._build()


@pytest.mark.parametrize("hook", ["configure_model", "setup"])
def test_a_model_built_after_the_callbacks_setup_gets_every_analysis(tmp_path, hook):
    """The layers are read at the stage's start (before: "could not tell how many classes"
    at set-up, the model being an ``nn.Identity`` then); the same layers as a model built in
    ``__init__``, in a fit and in a later ``trainer.validate`` of a new model."""
    callbacks = _all_five()
    module = BuiltInConfigureModel(hook)
    _quiet_fit(
        fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1), module, datamodule=TinyData()
    )
    _assert_every_analysis_produced(callbacks, module)
    assert callbacks[0].layers == ["backbone.relu1", "backbone.relu2", "backbone.relu()"]
    assert callbacks[0].num_classes == 3
    validated = _all_five()
    trainer = fast_trainer(tmp_path, callbacks=validated, logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(BuiltInConfigureModel(hook), datamodule=TinyData(), verbose=False)
    assert list(validated[0].results) == callbacks[0].layers
    assert validated[4].results and validated[1].results
