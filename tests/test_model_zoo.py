"""A model zoo: every callback, default layers, ``on_error="raise"``, on the models people train.

torchvision's classifiers (no weights, 32x32 inputs), a model returning a tuple, one fed dict
batches, and one whose activation module runs twice per forward pass. ``trainer.validate`` runs
every analysis once on two tiny batches; each must produce results, count every validation image
once in every tracked layer, and leave no hook behind. Rendering is cut to one step, one channel
and the deepest default layer, and figures are off: what is tested is that the analyses work on
these models.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from conftest import TinyNet, fast_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    RenderOptions,
)
from lightning_neurons.hooks import count_forward_hooks, resolve_layers, selects
from lightning_neurons.models import ImageClassifier

# every test here trains or runs whole models: heavy, `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

CLASSES, IMAGES, SIZE = 4, 8, 32


class TupleNet(TinyNet):
    """Returns ``(logits, aux_logits)``, as torchvision's GoogLeNet and Inception do in training."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = super().forward(x)
        return logits, logits.detach() * 0.5


class TupleClassifier(ImageClassifier):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(x)

    def _step(self, batch, stage: str, acc) -> torch.Tensor:
        logits, _ = self(batch[0])
        return torch.nn.functional.cross_entropy(logits, batch[1])


class SharedReLUNet(nn.Module):
    """One ReLU module called after each of two convs (as torchvision's BasicBlock does)."""

    def __init__(self, in_channels: int = 3, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def _as_dict(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"pixels": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}


class DictBatchClassifier(ImageClassifier):
    def _step(self, batch, stage: str, acc) -> torch.Tensor:
        return super()._step((batch["pixels"], batch["y"]), stage, acc)


def _loader(dict_batches: bool) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(IMAGES) % CLASSES
    x = torch.rand(IMAGES, 3, SIZE, SIZE, generator=g) * 0.5 + 0.1 * y.view(-1, 1, 1, 1)
    return DataLoader(
        TensorDataset(x, y), batch_size=IMAGES // 2, collate_fn=_as_dict if dict_batches else None
    )


def _torchvision(name: str) -> nn.Module:
    return getattr(torchvision.models, name)(weights=None, num_classes=CLASSES)


MODELS = {
    "resnet18": lambda: ImageClassifier(_torchvision("resnet18"), CLASSES),
    "vgg11_bn": lambda: ImageClassifier(_torchvision("vgg11_bn"), CLASSES),
    "mobilenet_v3_small": lambda: ImageClassifier(_torchvision("mobilenet_v3_small"), CLASSES),
    "efficientnet_b0": lambda: ImageClassifier(_torchvision("efficientnet_b0"), CLASSES),
    "densenet121": lambda: ImageClassifier(_torchvision("densenet121"), CLASSES),
    "convnext_tiny": lambda: ImageClassifier(_torchvision("convnext_tiny"), CLASSES),
    "tuple_output": lambda: TupleClassifier(TupleNet(3, CLASSES), CLASSES),
    "dict_batches": lambda: DictBatchClassifier(TinyNet(3, CLASSES), CLASSES),
    "shared_activation": lambda: ImageClassifier(SharedReLUNet(), CLASSES),
}


def _covers(layers: list[str], results: dict) -> bool:
    """Every result is a call site of the layer list, and every listed layer has a result."""
    return all(selects(layers, name) for name in results) and all(
        any(selects([spec], name) for name in results) for spec in layers
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_every_analysis_works_with_defaults(tmp_path, name):
    pl.seed_everything(0, verbose=False)
    module = MODELS[name]()
    dict_batches = name == "dict_batches"
    reader = dict(input_fn=lambda b: b["pixels"]) if dict_batches else {}
    quiet = dict(on_error="raise", enable_logging=False)
    tracker = ActivationTracker(**quiet, **reader)
    # rendering every default layer of DenseNet-121 would take minutes: the deepest one here
    rendered = resolve_layers(module, None)[-1:]
    callbacks = [
        tracker,
        FeatureVisualizer(
            rendered, render=RenderOptions(steps=1), max_channels=1, smoothgrad_samples=2, **quiet
        ),
        CategoryClustering(**quiet),
        NeuronClustering(**quiet),
        NeuronContribution(**quiet),
    ]
    trainer = fast_trainer(tmp_path, callbacks=callbacks, logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(module, dataloaders=_loader(dict_batches), verbose=False)

    assert tracker.layers and _covers(tracker.layers, tracker.results)
    if name == "shared_activation":  # one ReLU module called twice: two layers, never one mix
        assert set(tracker.results) == {"backbone.relu", "backbone.relu#1"}
    for layer, stats in tracker.results.items():  # every validation image counted once
        assert stats.counts.tolist() == [IMAGES // CLASSES] * CLASSES, layer
    vis, category, neuron, contribution = callbacks[1:]
    assert set(vis.results) >= set(vis.layers) | {"classes"}
    assert set(vis.saliency_results.maps) == {"gradient", "smoothgrad", "gradcam"}
    assert vis.saliency_results.labels.tolist() == list(range(CLASSES))
    assert category.results and neuron.results
    assert _covers(contribution.layers, contribution.results)
    assert all(res.counts.sum() == IMAGES for res in contribution.results.values())
    assert contribution.results[contribution.ablation_layers[-1]].ablation is not None
    assert count_forward_hooks(module) == 0
