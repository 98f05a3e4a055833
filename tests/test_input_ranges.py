"""Inputs that are not display images and no ``input_transform`` saying so: ``uint8`` images
(0-255) made floats in the model's own ``forward`` (``x.float() / 255``, or torchvision's
``to_dtype(..., scale=True)``), and images normalised in the data pipeline. Every analysis gives
what it gives for the same network fed the display images, or given the transform."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyData, TinyNet, fast_trainer
from torch import nn
from torchvision.transforms.v2 import functional as TF

from lightning_neurons import (
    ActivationTracker,
    FeatureVisualizer,
    NeuronContribution,
    RenderOptions,
)
from lightning_neurons.batch import input_transform_of, to_display
from lightning_neurons.callbacks._plan import byte_images_transform
from lightning_neurons.data import (
    NORMALIZATIONS,
    ByteImages,
    ChannelsLast,
    Normalize,
    known_normalization,
)
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.models import ImageClassifier


class Scales(nn.Module):
    """Divides by 255 itself: fed 0-255 values, float or not."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255)


class Converts(Scales):
    """torchvision's conversion: uint8 divided by 255, float images taken as [0, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(TF.to_dtype(x, torch.float32, scale=True))


class ThreeChannels(Scales):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet(in_channels=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Floats(Scales):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ByteData(TinyData):
    """TinyData's images as uint8, or (``as_float``) those very values divided by 255."""

    def __init__(self, as_float: bool = False) -> None:
        super().__init__()
        self.x, self.vx = ((v.clamp(0, 1) * 255).round().to(torch.uint8) for v in (self.x, self.vx))
        if as_float:
            self.x, self.vx = self.x.float() / 255, self.vx.float() / 255


def _fit(tmp_path, net: type, data: TinyData) -> tuple[list[pl.Callback], list[str]]:
    """The callbacks after one epoch, and the warnings given."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(net(), num_classes=3, lr=1e-2)
    quiet = dict(on_error="raise", enable_logging=False)
    callbacks = [
        ActivationTracker(**quiet),
        FeatureVisualizer(**quiet, render=RenderOptions(steps=2), smoothgrad_samples=2),
        NeuronContribution(**quiet, max_batches=1, max_probes=2),
    ]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1).fit(module, datamodule=data)
    assert count_forward_hooks(module) == 0
    return callbacks, [str(w.message) for w in said]


def _assert_same_analyses(ours: tuple, reference: tuple) -> None:
    """FeatureVisualizer's and NeuronContribution's results equal the reference fit's: renderings
    within 1e-4 (see the uint8 test for the arithmetic), the same saliency images to the bit,
    maps and contributions within 1e-6 (+1e-4 relative); no failures."""
    (vis, contribution), (ref, ref_contribution) = ours, reference
    for key, rendering in ref.results.items():
        torch.testing.assert_close(vis.results[key].images, rendering.images, atol=1e-4, rtol=0)
    maps, ref_maps = vis.saliency_results, ref.saliency_results
    torch.testing.assert_close(maps.images, ref_maps.images, atol=0, rtol=0)  # the same bytes
    for method, values in ref_maps.maps.items():
        torch.testing.assert_close(maps.maps[method], values, atol=1e-6, rtol=1e-4)
    for layer, result in ref_contribution.results.items():
        mine = contribution.results[layer].stats.class_contribution
        torch.testing.assert_close(mine, result.stats.class_contribution, atol=1e-6, rtol=1e-4)
    for cb in (vis, contribution):
        assert not cb.failures, cb.failures


@pytest.mark.parametrize(("net", "transform"), [(Scales, ByteImages), (Converts, type(None))])
def test_uint8_images_are_analysed_as_the_same_network_fed_floats(tmp_path, net, transform):
    # Trained alike to the bit: the model's first operation makes the float images the float
    # model is fed. The renderings differ only by the rounding of (v * 255) / 255 (one ulp of
    # v < 1, 6e-8) carried through 2 Adam steps (measured: 6e-8); 1e-4 leaves room for kernels.
    (_, vis, contribution), said = _fit(tmp_path / "bytes", net, ByteData())
    assert not [m for m in said if "FeatureVisualizer: the images" in m]
    (_, ref, ref_contribution), _ = _fit(tmp_path / "floats", Floats, ByteData(as_float=True))
    assert isinstance(vis._plan.transform, transform)
    _assert_same_analyses((vis, contribution), (ref, ref_contribution))
    assert vis.saliency_results.inputs.dtype == torch.uint8  # the probes kept as the loader gave


def test_uint8_images_are_shown_divided_by_255():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    shown, exact = to_display(x, None)
    assert exact and shown.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0], abs=1e-7)
    torch.testing.assert_close(to_display(x, ByteImages())[0], shown, atol=0, rtol=0)


def test_a_model_reading_floats_neither_way_gets_a_warning_naming_the_fix():
    class NormalisesBytes(Scales):
        """Normalises uint8 images, and takes float inputs as normalised already."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype == torch.uint8:
                x = (x.float() / 255 - 0.5) / 0.25
            return self.net(x)

    torch.manual_seed(0)
    x = (torch.rand(4, 1, 8, 8) * 255).to(torch.uint8)
    # the closer reading is 8% of the logits' size off here (2-12% for seeds 0-4)
    with pytest.warns(UserWarning, match="match neither.*Pass `input_transform`"):
        assert byte_images_transform(NormalisesBytes(), x, None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(byte_images_transform(Scales(), x, None), ByteImages)
        assert byte_images_transform(Converts(), x, None) is None


def _display_images(n: int = 24, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] whose every channel spans it (as natural images' do)."""
    x = torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    x[0, :, 0, 0], x[0, :, 0, 1] = 0.0, 1.0
    return x


@pytest.mark.parametrize("name", list(NORMALIZATIONS))
def test_the_normalisations_people_use_are_told_apart_by_their_range(name):
    mean, std = NORMALIZATIONS[name]
    images = _display_images(channels=len(mean) if len(mean) == 3 else 1)
    found, normalize = known_normalization(Normalize(mean, std)(images))
    assert found == name
    torch.testing.assert_close(normalize.inverse(Normalize(mean, std)(images)), images)


def test_a_range_no_normalisation_fits_is_not_guessed():
    assert known_normalization(Normalize((0.3,), (0.4,))(_display_images(channels=1))) is None
    assert known_normalization(_display_images()[:, :, :4] * 0.5) is None  # spans too little


class NormalisedData(TinyData):
    """Display images with a class signal, normalised as ImageNet's (``given``: and saying so)."""

    def __init__(self, given: bool) -> None:
        super().__init__()
        imagenet = Normalize(*NORMALIZATIONS["ImageNet"])
        for attr, seed in (("x", 0), ("vx", 1)):
            labels = self.y if attr == "x" else self.vy
            shown = (_display_images(len(labels), seed=seed) + labels.view(-1, 1, 1, 1) * 0.3) / 1.6
            setattr(self, attr, imagenet(shown))
        self.input_transform = imagenet if given else None


def test_normalised_images_without_a_transform_are_analysed_as_with_it(tmp_path):
    data = NormalisedData(given=False)
    (_, vis, contribution), said = _fit(tmp_path / "guessed", ThreeChannels, data)
    (_, ref, _), given_said = _fit(tmp_path / "given", ThreeChannels, NormalisedData(given=True))
    told = [m for m in said if "FeatureVisualizer: the images are not display images" in m]
    assert len(told) == 1 and "fits the ImageNet normalisation, Normalize(mean=[0.485" in told[0]
    assert not [m for m in given_said if "FeatureVisualizer: the images" in m]
    for key, rendering in ref.results.items():
        torch.testing.assert_close(vis.results[key].images, rendering.images, atol=0, rtol=0)
    shown = vis.saliency_results.images  # display images, not the normalised inputs
    torch.testing.assert_close(shown, ref.saliency_results.images)
    assert float(shown.min()) >= 0 and float(shown.max()) <= 1 and float(shown.std()) > 0.1
    assert not vis.failures
    # the other analyses show images through it too (NeuronContribution's probes, the sprites)
    trainer = SimpleNamespace(callbacks=[contribution, vis], datamodule=data)
    assert input_transform_of(trainer) is vis.resolved_input_transform
    probes = next(iter(contribution.results.values())).probes.images  # normalised inputs
    displayed = Normalize(*NORMALIZATIONS["ImageNet"]).inverse(probes)
    torch.testing.assert_close(to_display(probes, input_transform_of(trainer))[0], displayed)


class ErasedData(NormalisedData):
    """NormalisedData whose training images are augmented after the normalisation, as
    RandomErasing with random values is: pixels at 4, beyond every normalisation's range."""

    def __init__(self, given: bool) -> None:
        super().__init__(given)
        self.x = self.x.clone()
        self.x[::2, :, :2, :2] = 4.0


def test_the_normalisation_is_read_from_validation_images_not_augmented_training_ones(tmp_path):
    """The first batch is a training batch (no sanity check): its range fits no normalisation,
    the validation images' does; the analyses are those of the fit given the normalisation."""
    (_, vis, _), said = _fit(tmp_path / "guessed", ThreeChannels, ErasedData(given=False))
    (_, ref, _), _ = _fit(tmp_path / "given", ThreeChannels, ErasedData(given=True))
    told = [m for m in said if "FeatureVisualizer: the images are not display images" in m]
    assert len(told) == 1 and "fits the ImageNet normalisation" in told[0]
    assert repr(vis.resolved_input_transform) == repr(ref.resolved_input_transform)
    for key, rendering in ref.results.items():
        torch.testing.assert_close(vis.results[key].images, rendering.images, atol=0, rtol=0)
    torch.testing.assert_close(vis.saliency_results.images, ref.saliency_results.images)
    assert not vis.failures


def test_under_ddp_the_normalisation_is_named_not_guessed():
    """Each process would guess from its own batch; the processes must render alike."""
    from lightning_neurons.callbacks._plan import guessed_normalization

    images = Normalize(*NORMALIZATIONS["[-1, 1]"])(_display_images())
    with pytest.warns(UserWarning, match=r"not taken on a guess.*data\.Normalize\(mean=\[0.5\]"):
        assert guessed_normalization(images, world_size=2) is None
    with pytest.warns(UserWarning, match="through which images are rendered"):
        assert isinstance(guessed_normalization(images, world_size=1), Normalize)


class Permutes(ThreeChannels):
    """Fed channels-last images ``[B, H, W, C]``, as from NumPy or Keras-style loaders."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


class ImageData(TinyData):
    """Display images with a class signal, 3 channels; ``channels_last``: as ``[B, H, W, C]``."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        for attr, labels, seed in (("x", self.y, 0), ("vx", self.vy, 1)):
            shown = (_display_images(len(labels), seed=seed) + labels.view(-1, 1, 1, 1) * 0.3) / 1.6
            setattr(self, attr, shown.permute(0, 2, 3, 1).contiguous() if channels_last else shown)


def test_channels_last_images_are_analysed_as_the_same_network_fed_channels_first(tmp_path):
    (_, vis, contribution), said = _fit(tmp_path / "last", Permutes, ImageData(channels_last=True))
    (_, ref, ref_contribution), _ = _fit(tmp_path / "first", ThreeChannels, ImageData(False))
    told = [m for m in said if "FeatureVisualizer: the images are [8, 8, 8, 3] batches" in m]
    assert len(told) == 1 and "read as channels last" in told[0]
    assert isinstance(vis._plan.transform, ChannelsLast)
    # the same arithmetic but for the permutation, which may pick other convolution kernels
    assert all(r.images.shape[1:] == (3, 8, 8) for r in vis.results.values())
    _assert_same_analyses((vis, contribution), (ref, ref_contribution))


def test_channels_last_uint8_images_are_shown_channels_first():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 5, 2, 3)
    shown, exact = to_display(x, None)
    assert exact and shown.shape == (1, 3, 5, 2)
    assert shown[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0], abs=1e-7)
    torch.testing.assert_close(to_display(x, ChannelsLast(ByteImages()))[0], shown)
