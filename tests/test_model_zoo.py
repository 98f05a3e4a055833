"""A model zoo: every callback, default layers, ``on_error="raise"``, on the models people train.

torchvision's and timm's classifiers (no weights, 32x32 inputs; timm's and torchvision's vision
transformers and Swins included), a model written as the tutorials write it (``F.relu`` in
``forward``), one with its own ``Swish`` module, a model returning a tuple, one fed dict
batches, one whose activation module runs twice per forward pass, one whose forward runs its
backbone's parts itself, timm's ViT trained with activation checkpointing; and, on small models,
Hugging Face style batches and outputs, ``bf16-mixed`` and ``fast_dev_run`` (compiled models:
``test_compiled.py``). ``trainer.validate`` runs
every analysis once on two tiny batches; each must produce results, count every validation image
once in every tracked layer, and leave no hook behind. Rendering is cut to one step, one channel
and the deepest default layer, and figures are off: what is tested is that the analyses work on
these models.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
import torchvision
from conftest import TinyNet, fast_trainer
from test_token_grids import TutorialViT
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    RenderOptions,
)
from lightning_neurons.functional import is_function_layer, split_function_layer
from lightning_neurons.hooks import count_forward_hooks, get_module, resolve_layers, selects
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


class TutorialNet(nn.Module):
    """As PyTorch's CIFAR-10 tutorial writes it: F.relu and F.max_pool2d in forward."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class SwishNet(nn.Module):
    """A user's own activation class, not torch's."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 6, 3, stride=2), Swish()
        self.conv2, self.act2 = nn.Conv2d(6, 8, 3, stride=2), Swish()
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
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


def _timm(name: str, **options) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **options)


def _torchvision_vit() -> nn.Module:
    vit = torchvision.models.vision_transformer.VisionTransformer(
        image_size=SIZE,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=CLASSES,
    )
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision starts it at zero
    return vit


def _swin() -> nn.Module:  # timm's Swin, small: its stages output [B, H, W, C]
    return _timm(
        "swin_tiny_patch4_window7_224",
        img_size=SIZE,
        window_size=4,
        embed_dim=24,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
    )


def _torchvision_swin() -> nn.Module:  # small; Permute modules make its stages [B, H, W, C]
    return torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[1, 1, 1],
        num_heads=[1, 1, 1],
        window_size=[2, 2],
        num_classes=CLASSES,
    )


class BackboneParts(nn.Module):
    """A forward that runs its backbone's parts itself (a torchvision ResNet-18's), with an
    ``F.relu`` of its own on the pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _torchvision("resnet18")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.net
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return b.fc(F.relu(torch.flatten(b.avgpool(x), 1)))


def _checkpointing_vit() -> nn.Module:  # trained with activation checkpointing
    vit = _timm("vit_tiny_patch16_224", img_size=SIZE, patch_size=8)
    vit.set_grad_checkpointing(True)
    return vit


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
    "tutorial_functional": lambda: ImageClassifier(TutorialNet(), CLASSES),
    "backbone_parts": lambda: ImageClassifier(BackboneParts(), CLASSES),
    "swish": lambda: ImageClassifier(SwishNet(), CLASSES),
    "torchvision_vit": lambda: ImageClassifier(_torchvision_vit(), CLASSES),
    "torchvision_swin": lambda: ImageClassifier(_torchvision_swin(), CLASSES),
    "timm_resnet18": lambda: ImageClassifier(_timm("resnet18"), CLASSES),
    "timm_efficientnet_b0": lambda: ImageClassifier(_timm("efficientnet_b0"), CLASSES),
    "timm_convnext_atto": lambda: ImageClassifier(_timm("convnext_atto"), CLASSES),
    "timm_regnetx_002": lambda: ImageClassifier(_timm("regnetx_002"), CLASSES),
    "timm_mobilenetv3_small_050": lambda: ImageClassifier(_timm("mobilenetv3_small_050"), CLASSES),
    "timm_vit_tiny": lambda: ImageClassifier(
        _timm("vit_tiny_patch16_224", img_size=SIZE, patch_size=4), CLASSES
    ),
    "timm_swin": lambda: ImageClassifier(_swin(), CLASSES),
    # a convolutional stem, then attention stages of [B, N, C] tokens with no patch embedding
    "timm_levit": lambda: ImageClassifier(_timm("levit_128s", img_size=SIZE), CLASSES),
    "timm_mobilevit": lambda: ImageClassifier(_timm("mobilevit_xxs"), CLASSES),  # hybrid blocks
    # StarReLU (with parameters) in its blocks, SquaredReLU (a module with a child) in its head
    "timm_caformer": lambda: ImageClassifier(_timm("caformer_s18"), CLASSES),
    "timm_vit_checkpointing": lambda: ImageClassifier(_checkpointing_vit(), CLASSES),
    # blocks return (pixel tokens [B * N, P, C], patch tokens [B, N, D]): the second is read
    "timm_tnt": lambda: ImageClassifier(
        _timm("tnt_s_patch16_224", img_size=SIZE, patch_size=4, depth=4), CLASSES
    ),
    # patches by a Linear, a class token, torch's nn.TransformerEncoder: no Conv2d at all
    "tutorial_vit": lambda: ImageClassifier(TutorialViT(size=SIZE, classes=CLASSES), CLASSES),
}
#: Quick enough for every run; the others are marked slow.
FAST = {
    "tuple_output",
    "dict_batches",
    "shared_activation",
    "tutorial_functional",
    "swish",
    "tutorial_vit",
}


def _covers(layers: list[str], results: dict) -> bool:
    """Every result is a call site of the layer list, and every listed layer has a result."""
    return all(selects(layers, name) for name in results) and all(
        any(selects([spec], name) for name in results) for spec in layers
    )


def _callbacks(module: nn.Module, **reader) -> list:
    quiet = dict(on_error="raise", enable_logging=False)
    # rendering every default layer of DenseNet-121 would take minutes: the deepest one here
    rendered = resolve_layers(module, None)[-1:]
    return [
        ActivationTracker(**quiet, **reader),
        FeatureVisualizer(
            rendered, render=RenderOptions(steps=1), max_channels=1, smoothgrad_samples=2, **quiet
        ),
        CategoryClustering(**quiet),
        NeuronClustering(**quiet),
        NeuronContribution(**quiet),
    ]


def _check_results(module: nn.Module, callbacks: list, images: int = IMAGES) -> None:
    """Every analysis produced results, every image was counted once, no hook is left."""
    tracker, vis, category, neuron, contribution = callbacks
    assert tracker.layers and _covers(tracker.layers, tracker.results)
    for layer, stats in tracker.results.items():  # every validation image counted once
        assert stats.counts.tolist() == [images // CLASSES] * CLASSES, layer
    assert set(vis.results) >= set(vis.layers) | {"classes"}
    assert set(vis.saliency_results.maps) == {"gradient", "smoothgrad", "gradcam"}
    assert vis.saliency_results.labels.tolist() == list(range(CLASSES))
    assert category.results and neuron.results
    assert _covers(contribution.layers, contribution.results)
    assert all(res.counts.sum() == images for res in contribution.results.values())
    assert contribution.results[contribution.ablation_layers[-1]].ablation is not None
    _check_responses(module, tracker.results)
    assert count_forward_hooks(module) == 0


def _validate(tmp_path, module, callbacks, loader, **trainer_options) -> None:
    trainer = fast_trainer(tmp_path, callbacks=callbacks, logger=False, **trainer_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(module, dataloaders=loader, verbose=False)


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]
)
def test_every_analysis_works_with_defaults(tmp_path, name):
    pl.seed_everything(0, verbose=False)
    module = MODELS[name]()
    dict_batches = name == "dict_batches"
    callbacks = _callbacks(module, **(dict(input_fn=lambda b: b["pixels"]) if dict_batches else {}))
    _validate(tmp_path, module, callbacks, _loader(dict_batches))
    _check_results(module, callbacks)
    tracker = callbacks[0]
    if name == "resnet18":  # layer4 is 1x1 at 32 px: Grad-CAM reads layer3 (2 x 2), not flat
        maps = callbacks[1].saliency_results.maps["gradcam"].flatten(1)  # a flat map's spread is
        assert (maps.std(dim=1) > 1e-3 * maps.amax(dim=1)).any()  # rounding: 1e-7 of its value
    if name == "shared_activation":  # one ReLU module called twice: two layers, never one mix
        assert set(tracker.results) == {"backbone.relu", "backbone.relu#1"}
    if name == "tutorial_functional":  # F.relu in forward: three calls, three layers
        assert list(tracker.results) == [f"backbone.relu(){c}" for c in ("", "#1", "#2")]
    if name == "backbone_parts":  # its own F.relu once; the ResNet's ReLUs are the blocks'
        blocks = [f"backbone.net.layer{i}.{j}" for i in range(1, 5) for j in range(2)]
        assert list(tracker.results) == ["backbone.net.relu", *blocks, "backbone.relu()"]
    if name == "swish":
        assert list(tracker.results) == ["backbone.act1", "backbone.act2"]
    if name == "timm_convnext_atto":  # timm's own GELU class: its stages are blocks
        assert list(tracker.results) == [f"backbone.stages.{i}" for i in range(4)]
    if name == "timm_vit_tiny":  # 12 blocks of [B, 1 + 64, 192] tokens: 192 neurons each
        assert list(tracker.results) == [f"backbone.blocks.{i}" for i in range(12)]
        assert {s.num_neurons for s in tracker.results.values()} == {192}
    if name == "timm_vit_checkpointing":  # on during training, off during the analyses
        assert module.backbone.grad_checkpointing
    if name == "timm_levit":  # its stem's activations, then its stages' tokens: C neurons each
        assert list(tracker.results)[-3:] == [f"backbone.stages.{i}" for i in range(3)]
        assert [s.num_neurons for s in tracker.results.values()][-3:] == [128, 256, 384]
    if name == "tutorial_vit":  # the encoder's layers; Grad-CAM before the class-token head
        assert list(tracker.results) == [f"backbone.encoder.layers.{i}" for i in range(3)]
        assert callbacks[1].saliency_results.gradcam_layer == "backbone.encoder.layers.1"
    if name == "timm_tnt":  # the patch tokens, 1 + 8 x 8 of 384 channels; Grad-CAM on them
        assert list(tracker.results) == [f"backbone.blocks.{i}" for i in range(4)]
        assert {s.num_neurons for s in tracker.results.values()} == {384}
        assert callbacks[1].saliency_results.gradcam_layer == "backbone.blocks.2"
    if name == "timm_caformer":  # stages are blocks; the head's SquaredReLU holds an nn.ReLU
        stages = [f"backbone.stages.{i}" for i in range(4)]
        assert list(tracker.results) == [*stages, "backbone.head.fc.act.relu"]
    if name in ("timm_swin", "torchvision_swin"):  # [B, H, W, C] stages: C neurons each
        widths = [s.num_neurons for s in tracker.results.values()]
        assert widths == ([24, 48, 96, 192] if name == "timm_swin" else [8, 16, 32])


class HFOutput(dict):
    """A mapping with attribute access, as Hugging Face's ``ModelOutput``."""

    def __getattr__(self, name: str) -> torch.Tensor:
        return self[name]


class HFStyleClassifier(pl.LightningModule):
    """Takes ``pixel_values``, returns ``HFOutput(logits=...)``, fed ``{"pixel_values",
    "labels"}`` batches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TutorialNet()
        self.num_classes = CLASSES

    def forward(self, pixel_values: torch.Tensor) -> HFOutput:
        return HFOutput(logits=self.net(pixel_values))

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self(pixel_values=batch["pixel_values"])
        return F.cross_entropy(out.logits, batch["labels"])


def _hf_batches(items):
    return {
        "pixel_values": torch.stack([x for x, _ in items]),
        "labels": torch.stack([y for _, y in items]),
    }


def test_hugging_face_style_batches_and_outputs(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = HFStyleClassifier()
    loader = DataLoader(_loader(False).dataset, batch_size=IMAGES // 2, collate_fn=_hf_batches)
    callbacks = _callbacks(module)
    _validate(tmp_path, module, callbacks, loader)
    _check_results(module, callbacks)
    assert list(callbacks[0].results)[0] == "net.relu()"


def test_bf16_mixed_precision(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(TutorialNet(), CLASSES)
    callbacks = _callbacks(module)
    _validate(tmp_path, module, callbacks, _loader(False), precision="bf16-mixed")
    _check_results(module, callbacks)


def test_fast_dev_run(tmp_path):
    """One training and one validation batch: the analyses run on that one batch."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(SwishNet(), CLASSES)
    callbacks = _callbacks(module)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, logger=False, fast_dev_run=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=_loader(False), val_dataloaders=_loader(False))
    _check_results(module, callbacks, images=IMAGES // 2)


def _check_responses(module: nn.Module, results: dict) -> None:
    """The default layers are responses: a ReLU-family output never has a negative class mean,
    a Swish output never one below Swish's minimum, -0.2785 (x = -1.2785)."""
    for layer, stats in results.items():
        site = layer.split("#")[0]
        if is_function_layer(site):
            op = split_function_layer(site)[1]
            floor = 0.0 if op in ("relu", "relu6") else None
        else:
            found = get_module(module, site)
            floor = {nn.ReLU: 0.0, nn.ReLU6: 0.0, Swish: -0.2785}.get(type(found))
        if floor is not None:
            assert float(stats.class_means.min()) >= floor, layer
