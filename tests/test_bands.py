"""`display_channels`: which channels of multispectral images every figure draws."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from conftest import FAST_VIS, TinyData, TinyNet, fast_trainer

import lightning_neurons.projector as projector
from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    NeuronsError,
)
from lightning_neurons.bands import check_display_channels, shown_channels
from lightning_neurons.loggers import AnalysisLogger
from lightning_neurons.models import ImageClassifier

BANDS = [3, 1, 0]


class BandData(TinyData):
    """Four-channel images, channel ``c`` in [0.2 c, 0.2 c + 0.1] (a class signal in each): the
    values a figure's channels hold tell which bands it shows."""

    def __init__(self, display_channels: list[int] | None = None) -> None:
        super().__init__()
        offsets = torch.arange(4.0).view(1, -1, 1, 1) * 0.2
        self.x = self.x.expand(-1, 4, -1, -1).clamp(0, 1) * 0.1 + offsets
        self.vx = self.vx.expand(-1, 4, -1, -1).clamp(0, 1) * 0.1 + offsets
        if display_channels is not None:
            self.display_channels = display_channels


def _fit(tmp_path, data: TinyData, vis: FeatureVisualizer) -> list[pl.Callback]:
    callbacks = [
        ActivationTracker(on_error="raise"),
        vis,
        CategoryClustering(on_error="raise", n_clusters=2),
        NeuronClustering(on_error="raise", method="kmeans", n_clusters=2),
        NeuronContribution(on_error="raise", max_batches=1, max_probes=2),
    ]
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(TinyNet(in_channels=4), num_classes=3, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1).fit(module, datamodule=data)
    return callbacks


@pytest.fixture
def drawn(monkeypatch) -> dict[str, tuple]:
    """What each figure was asked to draw (its arguments), and the projector's sprite tiles."""
    seen: dict[str, tuple] = {}
    figure, write = AnalysisLogger.figure, projector.write_embedding

    def record(self, tag, plot, *args, **kwargs):
        seen[tag] = args
        return figure(self, tag, plot, *args, **kwargs)

    def record_sprite(log_dir, name, folder, features, metadata, tiles, replaces=None):
        seen[f"sprite/{name}"] = (tiles,)
        return write(log_dir, name, folder, features, metadata, tiles, replaces)

    monkeypatch.setattr(AnalysisLogger, "figure", record)
    monkeypatch.setattr(projector, "write_embedding", record_sprite)
    return seen


def test_the_data_modules_display_channels_choose_what_every_figure_draws(tmp_path, drawn):
    _, vis, *_ = _fit(tmp_path, BandData(BANDS), FeatureVisualizer(on_error="raise", **FAST_VIS))
    assert vis.results["classes"].images.shape[1] == 4  # the results keep every channel
    classes = drawn["preference/classes"][0]
    torch.testing.assert_close(classes, vis.results["classes"].images[:, BANDS], rtol=0, atol=0)
    focus = drawn["focus/gradient"][0]
    torch.testing.assert_close(focus, vis.saliency_results.images[:, BANDS], rtol=0, atol=0)
    # the data's images: bands 3, 1 and 0 hold [0.6, 0.7], [0.2, 0.3] and [0, 0.1]
    probes = drawn["contribution/backbone.relu1/probes"][0]  # the probe tiles
    means = probes.mean(dim=(0, 2, 3))
    assert means[0] > 0.55 and 0.15 < means[1] < 0.35 and means[2] < 0.15, means
    # the sprites' crops are padded alike in every channel where they leave the image: the
    # channels differ by the bands' offsets, 0.4 and 0.2 (the first three: -0.2 and -0.2)
    sprites = [torch.as_tensor(v[0]) for k, v in drawn.items() if k.startswith("sprite/")]
    assert sprites
    for tiles in [probes, *sprites]:
        assert tiles.shape[1] == 3
        red, green, blue = tiles.mean(dim=(0, 2, 3)).tolist()
        assert red > green > blue and (red - green) / (green - blue) == pytest.approx(2, abs=0.1)


def test_feature_visualizers_display_channels_are_taken_first(tmp_path, drawn):
    vis = FeatureVisualizer(on_error="raise", display_channels=[2], **FAST_VIS)
    _fit(tmp_path, BandData(BANDS), vis)
    grey = drawn["preference/classes"][0]
    torch.testing.assert_close(grey, vis.results["classes"].images[:, [2]], rtol=0, atol=0)
    assert drawn["contribution/backbone.relu1/probes"][0].shape[1] == 3  # grey, drawn as RGB
    probes = drawn["contribution/backbone.relu1/probes"][0]
    assert torch.equal(probes[:, 0], probes[:, 1]) and torch.equal(probes[:, 1], probes[:, 2])


def test_a_channel_the_images_do_not_have_is_a_clear_error(tmp_path):
    with pytest.raises(NeuronsError, match=r"names channel 4, but the images have 4 channels"):
        _fit(tmp_path, BandData([4, 1, 0]), FeatureVisualizer(**FAST_VIS))


@pytest.mark.parametrize("value", [[1, 2], [0, -1, 2], "rgb", [0.5, 1, 2], [True, 1, 0]])
def test_display_channels_are_three_or_one_channel_indices(value):
    with pytest.raises(NeuronsError, match="3 channel indices"):
        FeatureVisualizer(display_channels=value)
    with pytest.raises(NeuronsError, match="must be 3 channel indices"):
        check_display_channels(value)


def test_shown_channels_picks_the_bands_in_their_order():
    images = torch.arange(5.0).view(1, 5, 1, 1).expand(2, 5, 3, 3)
    assert shown_channels(images, (4, 2, 0))[0, :, 0, 0].tolist() == [4.0, 2.0, 0.0]
    assert shown_channels(images, None) is images
    with pytest.raises(NeuronsError, match="images have 5 channels"):
        shown_channels(images, (5, 1, 0))
