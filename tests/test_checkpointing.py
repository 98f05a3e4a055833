"""Models trained with activation checkpointing (timm's ``set_grad_checkpointing()``, Hugging
Face's ``gradient_checkpointing_enable()``): a checkpointed block runs its forward again in the
backward pass, hooks and all."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
from conftest import FAST_VIS, TinyData, fast_trainer
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_neurons import ActivationTracker, FeatureVisualizer, NeuronContribution
from lightning_neurons.hooks import count_forward_hooks
from lightning_neurons.models import ImageClassifier
from lightning_neurons.visualize import Channel, render


class CheckpointedNet(nn.Module):
    """As timm's models are: ``grad_checkpointing`` makes ``forward`` checkpoint its block, in
    training and in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, 3)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing:
            x = checkpoint(self.block, x, use_reentrant=False)
        else:
            x = self.block(x)
        return self.head(x.mean(dim=(2, 3)))


def _net(checkpointing: bool) -> CheckpointedNet:
    torch.manual_seed(0)
    net = CheckpointedNet()
    net.grad_checkpointing = checkpointing
    return net


def test_rendering_a_checkpointed_block_renders_as_without_checkpointing():
    """Rendering takes gradients through the block: its forward, recomputed in the backward
    pass, ran the scoring hook's operations again (a `CheckpointError` before)."""
    objectives = [Channel("block.1", c) for c in range(3)]
    images = {}
    for on in (False, True):
        net = _net(on)
        images[on] = render(net, objectives, image_shape=(1, 8, 8), steps=3).images
        assert net.grad_checkpointing is on  # given back
        assert count_forward_hooks(net) == 0
    torch.testing.assert_close(images[True], images[False], atol=0, rtol=0)  # the same passes


def test_training_batches_are_counted_once_in_a_checkpointed_block(tmp_path):
    """In training the block's forward runs again in the backward pass: not a second call of
    the layer (``block#1``), nor its batches counted twice."""
    # the recomputation runs the block's conv (its output is saved for the ReLU): hooked there
    layers = ["backbone.block", "backbone.block.0", "backbone.block.1"]
    tracker = ActivationTracker(layers=layers, stage="train", enable_logging=False)
    contribution = NeuronContribution(layers=["backbone.block.1"], enable_logging=False)
    visualizer = FeatureVisualizer(["backbone.block.1"], enable_logging=False, **FAST_VIS)
    callbacks = [tracker, contribution, visualizer]
    for callback in callbacks:
        callback.on_error = "raise"
    module = ImageClassifier(_net(True), num_classes=3, lr=1e-2)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, max_epochs=1)
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=TinyData())
    said = [str(w.message) for w in record]
    assert not [m for m in said if "times per forward pass" in m]  # not a second call
    assert set(tracker.results) == set(layers)  # no "block.0#1"
    for stats in tracker.results.values():
        assert stats.counts.tolist() == [16, 16, 16]  # 48 training images, once each
    assert set(contribution.results) == {"backbone.block.1"}
    assert "backbone.block.1" in visualizer.results
    assert module.backbone.grad_checkpointing  # given back after every analysis
